"""HTML pages for people in a browser: the upload form, a request's live page, the API
docs and upload errors. Server-rendered; the request page polls the status JSON.

Everything that comes from a user (names, URLs, messages) is escaped here, and set
with textContent in the page's script, never parsed as HTML.
"""

from __future__ import annotations

import html
import json
from typing import Any

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; color: #1d2330; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
a { color: #1257b3; } code { background: #f2f4f7; padding: 0 .25rem; border-radius: 3px; }
form { border: 1px solid #d6dae1; border-radius: 6px; padding: 1rem; background: #fafbfc; }
label { display: block; margin: .5rem 0 .2rem; font-weight: 600; }
input[type=url] { width: 100%; max-width: 30rem; padding: .3rem; }
button { margin-top: 1rem; padding: .45rem 1.1rem; font-size: 1rem; }
progress { width: 100%; height: 1.4rem; }
table { border-collapse: collapse; width: 100%; margin-top: 1rem; }
td, th { border-bottom: 1px solid #e3e6eb; padding: .4rem; vertical-align: top; text-align: left; }
.pair { display: flex; gap: .75rem; align-items: flex-start; }
.pair figure { margin: 0; width: 12rem; }
.pair img { max-width: 12rem; max-height: 9rem; display: block; background: #eee; }
figcaption { font-size: .8rem; color: #555; } .error { color: #b3261e; } .muted { color: #666; }
.status { font-weight: 600; } .problems li { margin: .2rem 0; }
"""


def _page(title: str, body: str, script: str = "") -> str:
    tail = f"<script>{script}</script>" if script else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}{tail}</body></html>"
    )


def index(base_url: str) -> str:
    """The upload form."""
    body = f"""
<h1>imgsvc</h1>
<p>Upload a CSV of products: <code>S. No.,Product Name,Input Image Urls</code>, one product a row,
its image URLs comma-separated in one quoted cell. Every image is compressed to half its quality
and stored; you can follow the progress on the next page.</p>
<form method="post" action="{html.escape(base_url)}/upload" enctype="multipart/form-data">
  <label for="file">CSV file</label>
  <input id="file" name="file" type="file" accept=".csv,text/csv" required>
  <label for="webhook_url">Webhook URL (optional)</label>
  <input id="webhook_url" name="webhook_url" type="url" placeholder="https://example.com/hooks/imgsvc">
  <div><button type="submit">Upload</button></div>
</form>
<p class="muted"><a href="{html.escape(base_url)}/docs">API documentation</a> ·
<a href="{html.escape(base_url)}/requests">recent requests (JSON)</a></p>"""
    return _page("imgsvc: upload", body)


_REQUEST_SCRIPT = r"""
const statusUrl = document.body.dataset.statusUrl;
const el = (tag, text, cls) => { const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text; if (cls) e.className = cls; return e; };
const size = (n) => n == null ? ""
  : n >= 1048576 ? (n / 1048576).toFixed(1) + " MB" : (n / 1024).toFixed(0) + " KB";
const httpUrl = (u) => typeof u === "string" && /^https?:\/\//i.test(u);
function figure(url, caption) {
  const f = el("figure");
  if (httpUrl(url)) {
    const img = el("img"); img.src = url; img.alt = caption; img.loading = "lazy"; f.append(img);
  }
  f.append(el("figcaption", caption)); return f;
}
function render(s) {
  const finished = s.counts.done + s.counts.failed + s.counts.cancelled;
  const percent = Math.floor(100 * finished / Math.max(1, s.counts.total));
  document.getElementById("bar").value = percent;
  document.getElementById("percent").textContent = percent + "%";
  document.getElementById("state").textContent = s.status;
  document.getElementById("counts").textContent =
    `${s.counts.done} done, ${s.counts.failed} failed, ${s.counts.cancelled} cancelled, ` +
    `${s.counts.processing} in progress, ${s.counts.queued} waiting, of ${s.counts.total} images` +
    (s.reuse.reused ? ` (${s.reuse.reused} reused, ${size(s.reuse.bytes_saved)} saved)` : "");
  const csv = document.getElementById("csv");
  if (["queued", "processing"].includes(s.status)) { csv.hidden = true; }
  else { csv.hidden = false; csv.href = s.output_csv_download_url; }
  const rows = document.getElementById("rows"); rows.replaceChildren();
  for (const p of s.products) {
    for (const i of p.images) {
      const tr = el("tr");
      tr.append(el("td", p.serial), el("td", p.name), el("td", String(i.position)));
      const pair = el("div", undefined, "pair");
      pair.append(figure(i.input_url, "before " + size(i.bytes_in)));
      if (i.status === "done") {
        const saving = i.bytes_in ? Math.round(100 * (1 - i.bytes_out / i.bytes_in)) : 0;
        pair.append(figure(i.output_url, `after ${size(i.bytes_out)} (${saving}% smaller)`));
      }
      const cell = el("td"); cell.append(pair); tr.append(cell);
      const state = el("td", i.status, i.status === "failed" ? "error" : "status");
      if (i.reused) { state.append(el("div", "reused: " + i.reused.replace("_", " "), "muted")); }
      if (i.error) { state.append(el("div", i.error, i.status === "failed" ? "error" : "muted")); }
      tr.append(state); rows.append(tr);
    }
  }
  return ["queued", "processing"].includes(s.status);
}
async function poll() {
  try {
    const response = await fetch(statusUrl + "?per_page=500", {headers: {Accept: "application/json"}});
    if (response.ok && !render(await response.json())) return;
  } catch (e) { /* try again */ }
  setTimeout(poll, 1000);
}
poll();
"""


def request_page(request_id: str, status_url: str) -> str:
    """A request's page: a live progress bar, and each image before and after."""
    body = f"""
<h1>Request <code>{html.escape(request_id)}</code></h1>
<p>Status: <span id="state" class="status">loading</span> · <span id="counts"></span></p>
<progress id="bar" max="100" value="0"></progress> <span id="percent">0%</span>
<p><a id="csv" hidden download>Download the output CSV</a></p>
<table><thead>
<tr><th>S. No.</th><th>Product</th><th>#</th><th>Before and after</th><th>Status</th></tr>
</thead>
<tbody id="rows"></tbody></table>"""
    page = _page(f"imgsvc: request {request_id}", body, _REQUEST_SCRIPT)
    return page.replace("<body>", f'<body data-status-url="{html.escape(status_url)}">', 1)


def upload_error(error: dict[str, Any], base_url: str) -> str:
    """An upload that was refused, for a browser: what was wrong, line by line."""
    items = "".join(
        f"<li>line {problem['line']}"
        + (f", column {html.escape(str(problem.get('column_name')))}" if problem.get("column") else "")
        + f": {html.escape(str(problem['message']))}</li>"
        for problem in error.get("problems", [])
    )
    more = ""
    if error.get("problem_count", 0) > len(error.get("problems", [])):
        more = f"<p class='muted'>… {error['problem_count']} problems in all.</p>"
    body = (
        f"<h1>The upload was refused</h1><p class='error'>{html.escape(str(error['message']))}</p>"
        f"<ul class='problems'>{items}</ul>{more}"
        f"<p><a href='{html.escape(base_url)}/'>Upload another file</a></p>"
    )
    return _page("imgsvc: upload refused", body)


def docs(document: dict[str, Any]) -> str:
    """The API documentation, rendered from the OpenAPI document."""
    parts = [
        f"<h1>{html.escape(document['info']['title'])} API {html.escape(document['info']['version'])}</h1>",
        f"<p>{html.escape(document['info']['description'])}</p>",
        "<p>The machine-readable document: <a href='openapi.json'>openapi.json</a> (OpenAPI 3.1).</p>",
    ]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            parts.append(
                f"<h2><code>{method.upper()} {html.escape(path)}</code></h2>"
                f"<p>{html.escape(operation.get('summary', ''))}</p>"
            )
            if "description" in operation:
                parts.append(f"<p class='muted'>{html.escape(operation['description'])}</p>")
            params = operation.get("parameters", [])
            if params:
                rows = "".join(
                    f"<tr><td><code>{html.escape(p['name'])}</code></td><td>{p['in']}</td>"
                    f"<td>{html.escape(json.dumps(p.get('schema', {})))}</td></tr>"
                    for p in params
                )
                parts.append(f"<table><tr><th>parameter</th><th>in</th><th>schema</th></tr>{rows}</table>")
            rows = "".join(
                f"<tr><td>{code}</td><td>{html.escape(answer['description'])}</td></tr>"
                for code, answer in operation["responses"].items()
            )
            parts.append(f"<table><tr><th>status</th><th>meaning</th></tr>{rows}</table>")
    schemas = html.escape(json.dumps(document["components"]["schemas"], indent=2))
    parts.append(f"<h2>Schemas</h2><pre>{schemas}</pre>")
    return _page("imgsvc: API", "".join(parts))

"""The command-line client: `imgsvc submit` and `imgsvc status`, over the HTTP API.

Exit codes say what happened: 0 completed (or accepted, or still running without
--wait), 3 completed with errors, 4 failed, 5 cancelled, 1 the server refused the
request or could not be reached, 2 a usage error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import aiohttp

EXIT_CODES = {
    "completed": 0,
    "queued": 0,
    "processing": 0,
    "completed_with_errors": 3,
    "failed": 4,
    "cancelled": 5,
}
ERROR = 1


@dataclasses.dataclass(frozen=True, slots=True)
class Server:
    """Where the API is, and the key to use."""

    url: str
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


class ClientError(Exception):
    """The server refused the request or could not be reached; the message says which."""


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body: dict[str, Any] = await response.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        raise ClientError(f"the server answered HTTP {response.status} without JSON") from None
    if response.status >= 400:
        lines = [f"HTTP {response.status}: {body.get('message', body)}"]
        lines += [
            f"  line {p['line']}"
            + (f", {p['column_name']}" if p.get("column_name") else "")
            + f": {p['message']}"
            for p in body.get("problems", [])
        ]
        if body.get("problem_count", 0) > len(body.get("problems", [])):
            lines.append(f"  … {body['problem_count']} problems in all")
        raise ClientError("\n".join(lines))
    return body


async def upload(
    session: aiohttp.ClientSession,
    server: Server,
    csv_path: Path,
    *,
    webhook_url: str | None = None,
    idempotency_key: str | None = None,
    reprocess: bool = False,
) -> dict[str, Any]:
    """POST the CSV; return the 202 answer."""
    form = aiohttp.FormData()
    data = await asyncio.to_thread(csv_path.read_bytes)
    form.add_field("file", data, filename=csv_path.name, content_type="text/csv")
    if webhook_url:
        form.add_field("webhook_url", webhook_url)
    if reprocess:
        form.add_field("reprocess", "true")
    headers = dict(server.headers)
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    async with session.post(f"{server.url}/upload", data=form, headers=headers) as response:
        return await _json(response)


async def status(
    session: aiohttp.ClientSession, server: Server, request_id: str, per_page: int = 1
) -> dict[str, Any]:
    """The request's status JSON (one page of products)."""
    async with session.get(
        f"{server.url}/status/{request_id}?per_page={per_page}", headers=server.headers
    ) as response:
        return await _json(response)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def progress_line(state: dict[str, Any], elapsed: float, finished_at_start: int, width: int = 24) -> str:
    """One line: a bar, the share finished, done and failed counts, the rate and time left."""
    counts = state["counts"]
    total = max(1, counts["total"])
    finished = counts["done"] + counts["failed"] + counts.get("cancelled", 0)
    filled = int(width * finished / total)
    rate = (finished - finished_at_start) / elapsed if elapsed > 0 else 0.0
    left = f"{_clock((total - finished) / rate)} left" if rate > 0 and finished < total else ""
    bar = "#" * filled + "." * (width - filled)
    return (
        f"[{bar}] {100 * finished // total:3d}%  {finished}/{counts['total']}  done {counts['done']}  "
        f"failed {counts['failed']}  {rate:.1f} img/s  {left}"
    ).rstrip()


async def watch(
    session: aiohttp.ClientSession, server: Server, request_id: str, out: TextIO, interval: float = 1.0
) -> dict[str, Any]:
    """Show progress until the request is final; return its last status."""
    started = time.monotonic()
    state = await status(session, server, request_id)
    first = state["counts"]["done"] + state["counts"]["failed"] + state["counts"].get("cancelled", 0)
    live = out.isatty()
    last = ""
    while True:
        line = progress_line(state, time.monotonic() - started, first)
        if live:
            out.write("\r" + line.ljust(len(last)))
        elif line != last:
            out.write(line + "\n")
        out.flush()
        last = line
        if state["status"] not in ("queued", "processing"):
            break
        await asyncio.sleep(interval)
        state = await status(session, server, request_id)
    if live:
        out.write("\n")
    return state


async def summary(session: aiohttp.ClientSession, server: Server, state: dict[str, Any], out: TextIO) -> None:
    """The final status, the output CSV, and the first failures with their reasons."""
    counts = state["counts"]
    out.write(
        f"{state['status']}: {counts['done']} done, {counts['failed']} failed"
        + (f", {counts['cancelled']} cancelled" if counts.get("cancelled") else "")
        + f" of {counts['total']} images\n"
    )
    if state.get("output_csv_download_url") and state["status"] not in ("queued", "processing"):
        out.write(f"output CSV: {state['output_csv_url'] or state['output_csv_download_url']}\n")
    if counts["failed"]:
        full = await status(session, server, state["request_id"], per_page=500)
        failures = [
            (p["serial"], i["input_url"], i["error"])
            for p in full["products"]
            for i in p["images"]
            if i["status"] == "failed"
        ]
        for serial, url, error in failures[:10]:
            out.write(f"  failed: {serial} {url}: {error}\n")
        if counts["failed"] > 10:
            out.write(f"  … and {counts['failed'] - 10} more (see {state['status_url']})\n")


SHOWN_WARNINGS = 10


def warnings_text(accepted: dict[str, Any]) -> str:
    """The warnings of a 202 answer, a line each: the first ten, then how many in all."""
    warnings = accepted.get("warnings", [])
    lines = [f"warning: line {w['line']}: {w['message']}\n" for w in warnings[:SHOWN_WARNINGS]]
    total = accepted.get("warning_count", len(warnings))
    if total > len(lines):
        lines.append(f"warning: … {total:,} warnings in all\n")
    return "".join(lines)


async def submit(
    server: Server,
    csv_path: Path,
    *,
    wait: bool,
    webhook_url: str | None,
    idempotency_key: str | None,
    reprocess: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Upload a CSV, and with ``wait`` follow it to the end; return the exit code. What
    the server assumed to read the CSV goes to ``err``, as warnings."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        accepted = await upload(
            session,
            server,
            csv_path,
            webhook_url=webhook_url,
            idempotency_key=idempotency_key,
            reprocess=reprocess,
        )
        out.write(
            f"request {accepted['request_id']}: {accepted['products']} products, "
            f"{accepted['images']} images\nstatus: {accepted['status_url']}\n"
        )
        err.write(warnings_text(accepted))
        if not wait:
            return 0
        state = await watch(session, server, accepted["request_id"], out)
        await summary(session, server, state, out)
        return EXIT_CODES.get(state["status"], ERROR)


async def show(server: Server, request_id: str, *, wait: bool, out: TextIO = sys.stdout) -> int:
    """Print a request's status (following it with ``wait``); return the exit code."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        state = await (
            watch(session, server, request_id, out) if wait else status(session, server, request_id)
        )
        if not wait:
            out.write(progress_line(state, 0, 0) + "\n")
        await summary(session, server, state, out)
        return EXIT_CODES.get(state["status"], ERROR)


def run(coroutine: Any) -> int:
    """Run a client command; a refusal or an unreachable server is one clear message."""
    try:
        code: int = asyncio.run(coroutine)
        return code
    except ClientError as exc:
        print(f"imgsvc: {exc}", file=sys.stderr)
    except aiohttp.ClientConnectionError as exc:
        print(f"imgsvc: cannot reach the server ({exc})", file=sys.stderr)
    except TimeoutError:
        print("imgsvc: the server did not answer in time", file=sys.stderr)
    except OSError as exc:
        print(f"imgsvc: {exc.strerror or exc}", file=sys.stderr)
    return ERROR

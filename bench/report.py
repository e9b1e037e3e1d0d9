"""The printed table, made from the same dictionary that is written as JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench import imageset

_LABELS = {c.key: c.label for c in imageset.CLASSES} | {"all": "all classes"}


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align_left: int = 1) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [
            str(cell).ljust(widths[i]) if i < align_left else str(cell).rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    return [line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]]


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per size class and for all: pipeline, ceiling and their ratio (also put in the JSON)."""
    pipeline = {m["group"]: m for m in results["pipeline"]["throughput"]}
    ceiling = results["codec"]["ceiling"]
    rows: list[dict[str, Any]] = []
    for size_class in imageset.CLASSES:
        p, c = pipeline.get(size_class.key), ceiling.get(size_class.key)
        if p is None and not size_class.always:
            continue
        rows.append(_row(size_class.key, [(p, c)] if p and c else []))
    rows.append(_row("all", [(p, ceiling[key]) for key, p in pipeline.items() if key in ceiling]))
    return rows


def _row(group: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Pipeline and ceiling on the same images: each class's images at the ceiling's rate
    for that class (its passes may repeat the images to last long enough)."""
    pipeline = [p for p, _ in pairs]
    images = sum(p["images"] for p in pipeline)
    if not images:
        return {"group": group, "label": _LABELS[group], "images": 0}
    mp = sum(p["megapixels"] for p in pipeline)
    p_seconds = sum(p["seconds"] for p in pipeline)
    p_cpu = sum(p["cpu_seconds_total"] for p in pipeline)
    c_seconds = sum(p["images"] * c["seconds"] / c["images"] for p, c in pairs)
    c_cpu = sum(p["images"] * c["cpu_seconds"] / c["images"] for p, c in pairs)
    by_process: dict[str, float] = {}
    for p in pipeline:
        for name, value in p["cpu_seconds"].items():
            by_process[name] = by_process.get(name, 0.0) + value
    row: dict[str, Any] = {
        "group": group,
        "label": _LABELS[group],
        "images": images,
        "megapixels": round(mp, 2),
        "pipeline_images_per_s": images / p_seconds,
        "pipeline_images_per_s_range": [p["images_per_s_min"] for p in pipeline][:1]
        + [p["images_per_s_max"] for p in pipeline][:1]
        if len(pipeline) == 1
        else None,
        "pipeline_megapixels_per_s": mp / p_seconds,
        "ceiling_images_per_s": images / c_seconds if c_seconds else None,
        "ceiling_megapixels_per_s": mp / c_seconds if c_seconds else None,
        "pipeline_cpu_s_per_image": p_cpu / images,
        "ceiling_cpu_s_per_image": c_cpu / images,
        "pipeline_cpu_s_per_image_by_process": {k: v / images for k, v in by_process.items()},
    }
    if c_seconds:
        row["ratio_images_per_s"] = row["pipeline_images_per_s"] / row["ceiling_images_per_s"]
        row["ratio_megapixels_per_s"] = row["pipeline_megapixels_per_s"] / row["ceiling_megapixels_per_s"]
        row["ratio_cpu_per_image"] = row["pipeline_cpu_s_per_image"] / row["ceiling_cpu_s_per_image"]
    return row


def _mib(kib: int | None, digits: int = 0) -> str:
    return "?" if kib is None else f"{kib / 1024:,.{digits}f}"


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def _large_uploads(large: dict[str, Any]) -> list[str]:
    """The large-uploads section: the 10,000-row uploads and the 50 MB CSV, beside their targets."""
    out = [
        "",
        "Large uploads (worker stopped; POST /upload timed from the send to the end of the 202 answer)",
    ]
    rows = large["rows_upload"]
    if rows:
        c = rows["csv"]
        what = f"  {c['rows']:,} rows, {c['urls']:,} URLs, {c['mib']:.1f} MiB, {rows['uploads']} uploads: "
        if rows["accepted"]:
            what += (
                f"p50 {rows['p50_ms']:,.0f} ms (target < {rows['target_p50_ms']:.0f} ms: "
                f"{_verdict(rows['target_met'])}), p90 {rows['p90_ms']:,.0f}, min {rows['min_ms']:,.0f}, "
                f"max {rows['max_ms']:,.0f} ms; API RSS {_mib(rows['api_rss_before_kib'])} before, "
                f"peak {_mib(rows['api_rss_peak_kib'])} MiB"
            )
        if rows["accepted"] < rows["uploads"]:
            failed = next(a for a in rows["answers"] if a["status"] != 202)
            what += "; " if rows["accepted"] else ""
            what += (
                f"{rows['accepted']} answered 202, then {failed['status'] or 'no answer'}: {failed['error']}"
            )
        out.append(what)
    big = large["large_csv"]
    if big:
        c = big["csv"]
        what = f"  {c['mib']:.1f} MiB CSV ({c['rows']:,} rows, {c['urls']:,} URLs): "
        answer = big["answer"]
        if big["accepted"]:
            growth = big["api_rss_growth_kib"]
            what += (
                f"202 in {big['seconds']:.1f} s; API RSS "
                f"{'?' if growth is None else f'{growth / 1024:+,.1f}'} MiB "
                f"({_mib(big['api_rss_before_kib'], 1)} → {_mib(big['api_rss_peak_kib'], 1)} MiB, "
                f"sampled every {large['rss_sample_interval_s'] * 1000:.0f} ms; target growth < "
                f"{big['target_rss_growth_mib']:.0f} MB: {_verdict(big['target_met'])})"
            )
            if big["api_vm_hwm_growth_kib"] is not None:
                what += f"; VmHWM {big['api_vm_hwm_growth_kib'] / 1024:+,.1f} MiB"
        else:
            what += (
                f"answered {answer['status'] or 'nothing'} after {big['seconds']:.1f} s: {answer['error']} "
                f"(target growth < {big['target_rss_growth_mib']:.0f} MB: not measured)"
            )
        out.append(what)
    return out


def _rerun(rerun: dict[str, Any]) -> list[str]:
    """The re-run phase: a catalog sent three times, then its changed images alone."""
    rows = [
        [r["run"], str(r["images"]), _num(r["seconds"], 2), str(r["downloads"]), str(r["not_modified"]),
         str(r["compressed"]), str(r["stored"]), str(r["reused"])]
        for r in rerun["runs"]
    ]  # fmt: skip
    speedup, changed = rerun["unchanged_speedup"], rerun["changed_over_changed_only"]
    unchanged = rerun["runs"][1]
    return [
        "",
        f"Re-run: a catalog of {rerun['images']} images, sent three times ({rerun['changed']} changed "
        "before the third), then its changed images alone",
        *_table(["request", "images", "s", "downloads", "304s", "compressed", "stored", "reused"], rows),
        "  CPU ms an image: "
        + "; ".join(
            f"{r['run']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_per_image"].items())
            for r in rerun["runs"]
        ),
        f"  unchanged re-run: {speedup:.1f}x faster than the first, {unchanged['compressed']} compressed, "
        f"{unchanged['stored']} stored (target >= 5x, aim 20x, 0 and 0): "
        + _verdict(speedup >= 5 and unchanged["compressed"] == 0 and unchanged["stored"] == 0),
        f"  1% changed: {changed:.2f}x the time of the changed images alone, "
        f"{rerun['changed_over_changed_only_cpu']:.2f}x their CPU (target <= 3x): " + _verdict(changed <= 3),
        *_statements("unchanged re-run", rerun.get("unchanged_statements")),
    ]


def _statements(phase: str, rows: list[dict[str, Any]] | None) -> list[str]:
    """PostgreSQL's time by statement (``--pg-statements``)."""
    if not rows:
        return []
    table = [
        [
            _num(r["ms_per_image"], 3),
            _num(r["calls_per_image"], 2),
            _num(r["ms_per_call"], 3),
            _num(r.get("blocks_per_call"), 0),
            r["query"],
        ]
        for r in rows
    ]
    return [
        f"  PostgreSQL's time by statement, {phase} (pg_stat_statements, execution + planning):",
        *(
            "  " + line
            for line in _table(["ms/image", "calls/image", "ms/call", "buffers/call", "statement"], table)
        ),
    ]


def _quiet(quiet: dict[str, dict[str, Any]]) -> list[str]:
    """What each measured request found left open by the ones before it."""
    if not quiet:
        return []
    found = {phase: {k: v for k, v in q["pending_at_first"].items() if v} for phase, q in quiet.items()}
    noisy = [phase for phase, q in quiet.items() if not q["quiet"]]
    return [
        "",
        f"Quiet before each request ({len(quiet)}): no open request, image, job or webhook, no statement "
        "or autovacuum running, the services' trees under 0.1 core",
        "  left open at the start: "
        + ("; ".join(f"{p} {f}" for p, f in found.items() if f) or "nothing")
        + f"; longest wait {max(q['waited_seconds'] for q in quiet.values()):.1f} s"
        + (f"; NOT quiet: {', '.join(noisy)}" if noisy else ""),
    ]


def _tiny(tiny: dict[str, Any]) -> list[str]:
    """The tiny-image phase: the pipeline's own cost."""
    cpu = tiny["cpu_ms_per_image"]
    postgres = cpu.get("postgres", 0.0)
    return [
        "",
        f"Tiny images: {tiny['images']} distinct 64x48 JPEGs in one request, every one compressed and stored",
        f"  {tiny['images_per_second']:.0f} images/s ({tiny['seconds']:.2f} s, target >= 200); "
        + "CPU ms an image: "
        + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()),
        f"  other load {tiny['foreign_cores']:.2f} cores"
        + (
            f" (the least disturbed of {tiny['attempts']} requests: "
            + ", ".join(f"{c:.2f}" for c in tiny["attempts_foreign_cores"])
            + ")"
            if tiny.get("attempts", 1) > 1
            else ""
        ),
        f"  PostgreSQL {postgres:.2f} CPU ms an image (target <= 0.5, aim 0.25): "
        + _verdict(postgres <= 0.5),
        *_statements("tiny images", tiny.get("statements")),
    ]


def _settings_table(variants_by_group: dict[str, list[dict[str, Any]]], run: dict[str, Any]) -> list[str]:
    """What each encode setting costs, one added at a time."""
    out = [
        "",
        "Encode settings, one added at a time (JPEG sources, same pool; CPU = this process, all threads)",
    ]
    rows = []
    for group, variants in variants_by_group.items():
        previous: float | None = None
        for v in variants:
            cpu = v["cpu_ms_per_image"]
            delta = "" if previous is None or v["variant"] == "service" else f"{cpu - previous:+.1f}"
            if v["variant"] != "service":
                previous = cpu
            rows.append(
                [
                    _LABELS[group] if v is variants[0] else "",
                    v["label"],
                    str(v["distinct_images"]),
                    _num(v["images_per_s"], 1),
                    _num(v["megapixels_per_s"], 1),
                    _num(cpu, 1),
                    delta,
                    _num(v["cpu_ms_per_megapixel"], 1),
                    _num((v["out_bytes_per_image"] or 0) / 1024, 0),
                ]
            )
    out += _table(
        ["class", "setting", "images", "img/s", "MP/s", "CPU ms/img", "+/- ms", "CPU ms/MP", "out KiB/img"],
        rows,
        align_left=2,
    )
    icc = run["icc_images"]
    rot = run["rotated_images"]
    out.append(
        f"({icc} of {run['images']} images have an ICC profile; {rot} have an EXIF orientation other than 1)"
    )
    return out


#: The issue's targets: the pipeline and compress() against the loop that makes the same bytes.
PIPELINE_TARGET = 0.90
SERVICE_TARGET = 0.95


def three_way_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per size class: the plain loop, the optimised loop and compress() on the same
    images, which loop makes compress()'s bytes, and the ratios against it."""
    codec = results["codec"]
    pipeline = {row["group"]: row for row in results["summary"]}
    rows = []
    for group, ways in codec["three_way"].items():
        matched = codec["matched"][group]
        loop = ways[matched["loop"]]
        p = pipeline.get(group, {})
        rows.append(
            {
                "group": group,
                "label": _LABELS[group],
                "images": ways["service"]["distinct_images"],
                "loop": matched["loop"],
                "same_bytes": matched["same_bytes"],
                "bytes_apart": matched["bytes_apart"],
                "images_per_s": {key: way["images_per_s"] for key, way in ways.items()},
                "out_bytes_per_image": {key: way["out_bytes_per_image"] for key, way in ways.items()},
                "cpu_ms_per_image": {key: way["cpu_ms_per_image"] for key, way in ways.items()},
                "service_over_loop": matched["service_over_loop"],
                "service_cpu_over_loop": round(
                    loop["cpu_ms_per_image"] / ways["service"]["cpu_ms_per_image"], 4
                )
                if ways["service"]["cpu_ms_per_image"]
                else None,
                "pipeline_over_loop": p.get("ratio_images_per_s"),
                "service_bytes_over_plain": matched["service_bytes_over_plain"],
            }
        )
    return rows


def _three_way(results: dict[str, Any]) -> list[str]:
    """The ceiling three ways, and the headline ratios against the loop of the same bytes."""
    out = [
        "",
        "Ceiling three ways (same images, same threads, same run): bare loop with plain Huffman tables, "
        "with optimize_coding, and the service's compress()",
    ]
    table = []
    for r in results.get("three_way") or three_way_rows(results):
        for key, name in (
            ("plain", "loop, plain"),
            ("optimize", "loop, optimize_coding"),
            ("service", "compress()"),
        ):
            table.append(
                [
                    r["label"] if key == "plain" else "",
                    name + (" *" if key == r["loop"] else ""),
                    _num(r["images_per_s"][key], 2),
                    _num(r["cpu_ms_per_image"][key], 1),
                    _num((r["out_bytes_per_image"][key] or 0) / 1024, 1),
                ]
            )
    out += _table(["class", "way", "img/s", "CPU ms/img", "out KiB/img"], table, align_left=2)
    out.append("  * the loop that makes compress()'s bytes: the ceiling of the throughput table")
    for r in results.get("three_way") or three_way_rows(results):
        same = "same bytes" if r["same_bytes"] else "NO loop makes the same bytes"
        pipeline, service, plain = (
            r["pipeline_over_loop"],
            r["service_over_loop"],
            r["service_bytes_over_plain"],
        )
        out.append(
            f"  {r['label']}: against the {r['loop']} loop ({same}, {r['bytes_apart']:.1%} apart): "
            f"pipeline {_num(pipeline, 3)} (target >= {PIPELINE_TARGET:.2f}: "
            f"{_verdict(pipeline is not None and pipeline >= PIPELINE_TARGET)}), "
            f"compress() {_num(service, 3)} (target >= {SERVICE_TARGET:.2f}: "
            f"{_verdict(service is not None and service >= SERVICE_TARGET)}; "
            f"by CPU {_num(r['service_cpu_over_loop'], 3)}); output {_num(plain, 3)} of the plain loop's "
            f"(never larger: {_verdict(plain is not None and plain <= 1)})"
        )
    return out


def render(results: dict[str, Any]) -> str:
    """The whole report as text."""
    m, run = results["machine"], results["run"]
    codec = results["codec"]
    out: list[str] = [
        "",
        f"imgsvc benchmark: {run['images']} images from {run['images_dir']} ({run['distinct_files']} files), "
        f"{m['cores']} cores, {m['memory_gib']} GiB, {m['cpu_model']}",
        f"libvips {m['libvips']}, Python {m['python']}, PostgreSQL {m['postgresql']}, rclone {m['rclone']}, "
        f"imgsvc {m['imgsvc']} ({m['git_commit']})",
        "",
        f"Throughput: upload to final status, one request per class, median of {run['repeat']} requests; "
        f"ceiling = the bare codec loop that makes the service's bytes (within "
        f"{codec['same_bytes_within']:.0%}) in a {codec['threads']}-thread pool, median of {codec['rounds']} "
        "passes",
    ]
    rows = []
    for r in results["summary"]:
        if not r["images"]:
            rows.append([r["label"], "0", "no images", "", "", "", "", "", "", "", "", ""])
            continue
        rows.append(
            [
                r["label"],
                str(r["images"]),
                _num(r["megapixels"]),
                _num(r["pipeline_images_per_s"], 2),
                "-".join(f"{v:.1f}" for v in r["pipeline_images_per_s_range"] or []),
                _num(r["pipeline_megapixels_per_s"]),
                _num(r["ceiling_images_per_s"], 2),
                _num(r["ceiling_megapixels_per_s"]),
                _num(r.get("ratio_images_per_s"), 3),
                _num(r.get("ratio_megapixels_per_s"), 3),
                _num(r["pipeline_cpu_s_per_image"] * 1000, 0),
                _num((r["ceiling_cpu_s_per_image"] or 0) * 1000, 0),
            ]
        )
    out += _table(
        [
            "class",
            "images",
            "MP",
            "img/s",
            "(min-max)",
            "MP/s",
            "ceil img/s",
            "ceil MP/s",
            "img/s ratio",
            "MP/s ratio",
            "CPU ms/img",
            "ceil CPU ms/img",
        ],
        rows,
    )
    everything = results["summary"][-1]
    if everything["images"]:
        parts = ", ".join(
            f"{name} {v * 1000:.0f}" for name, v in everything["pipeline_cpu_s_per_image_by_process"].items()
        )
        out.append(f"Pipeline CPU ms per image by process (all classes): {parts}")
    for c in results["pipeline"]["throughput"]:
        ratios = c.get("paired_ratios") or []
        if ratios:
            ceilings = [(r["paired_ceiling"] or {}).get("images_per_s") or 0 for r in c["runs"]]
            out.append(
                f"Paired, {_LABELS[c['group']]}: each request against a bare-loop pass of its images "
                f"right after it (ceiling {', '.join(f'{v:.2f}' for v in ceilings)} img/s): "
                f"ratio {c['paired_ratio_median']:.3f} median, {ratios[0]:.3f}-{ratios[-1]:.3f}"
            )

    out += _three_way(results)

    if any(codec["variants"].values()):
        out += _settings_table(codec["variants"], run)
    else:
        out += ["", "Encode settings: not measured (--no-settings, or no JPEG sources)"]

    pipeline = results["pipeline"]
    if pipeline["latency"]:
        lb = pipeline["latency_batch"]
        out += [
            "",
            f"Latency while a {lb['images']}-image request runs ({lb['seconds']:.1f} s, "
            f"{lb['images_per_s']:.2f} img/s under this load); open loop, from the scheduled time",
        ]
        rows = [
            [
                s["name"],
                _num(s["rate_per_s"], 1),
                str(s["sent"]),
                str(s["ok"]),
                str(s["failed"] + s["unfinished"]),
                _num(s["p50_ms"]),
                _num(s["p90_ms"]),
                _num(s["p99_ms"]),
                _num(s["max_ms"]),
            ]
            for s in pipeline["latency"]
        ]
        out += _table(
            ["endpoint", "rate/s", "sent", "ok", "failed", "p50 ms", "p90 ms", "p99 ms", "max ms"], rows
        )
        lag = pipeline.get("api_loop_lag")
        if lag and lag["timers"]:
            out.append(
                f"The API's event loop meanwhile (imgsvc_event_loop_lag_seconds): {lag['timers']} timers, "
                f"{lag['over_50ms']} of them over 50 ms late, the most late by at most "
                f"{lag['max_lag_le_s']} s"
            )
        if lag:
            out.append(
                f"This benchmark's own loop, which sends the probes: {lag['bench_over_50ms']} of "
                f"{lag['bench_timers']} timers over 50 ms late, the most late by {lag['bench_max_ms']} ms"
            )

    rss, hwm = pipeline["peak_rss_kib_whole_run"], pipeline["vm_hwm_kib"]
    per_phase = ", ".join(
        f"{_LABELS[t['group']]}: api {t['peak_rss_kib_all_repeats'].get('api', 0) / 1024:.0f}, "
        f"worker {t['peak_rss_kib_all_repeats'].get('worker', 0) / 1024:.0f}"
        for t in pipeline["throughput"]
    )
    out += [
        "",
        "Peak RSS, MiB (sampled every 50 ms; VmHWM = the kernel's high-water mark at the end"
        + ("; before the large uploads)" if results.get("large_uploads") else ")"),
        f"  api {rss.get('api', 0) / 1024:.0f} (VmHWM {(hwm.get('api') or 0) / 1024:.0f}), "
        f"worker {rss.get('worker', 0) / 1024:.0f} (VmHWM {(hwm.get('worker') or 0) / 1024:.0f}), "
        f"postgres (PSS, all processes) {rss.get('postgres', 0) / 1024:.0f}, "
        f"rclone {rss.get('s3 (rclone)', 0) / 1024:.0f}; "
        f"ceiling: this process {(codec['rss_before_kib'] or 0) / 1024:.0f} before, "
        f"peak {(codec['peak_rss_kib'] or 0) / 1024:.0f}",
        f"  during the throughput batches: {per_phase}",
    ]

    profile = pipeline.get("profile")
    if profile:
        out += ["", "Worker profile (py-spy)"]
        if "error" in profile:
            out.append(f"  {profile['error']}")
        elif profile.get("samples"):
            out.append(
                f"  {profile['samples']} busy samples at {profile['rate_hz']} Hz over a "
                f"{profile['images']}-image request: codec {profile['codec_percent']}%, outside the codec "
                f"{profile['outside_codec_percent']}%"
            )
            if profile.get("event_loop_busy_percent") is not None:
                out.append(
                    f"  event loop (MainThread) busy {profile['event_loop_busy_percent']}% of the time"
                )
            out.append("  by stage, % of all busy samples:")
            out += [f"    {e['percent_of_busy']:5.1f}%  {e['name']}" for e in profile.get("by_stage", [])]
            for key, title in (
                ("outside_codec_by_activity", "what the service was doing"),
                ("outside_codec_by_package_self", "package of the innermost frame (self)"),
                ("outside_codec_by_package_inclusive", "any frame in the package (inclusive)"),
            ):
                out.append(f"  outside the codec, by {title}, % of all busy samples:")
                out += [f"    {e['percent_of_busy']:5.1f}%  {e['name']}" for e in profile[key][:8]]
    large = results.get("large_uploads")
    if large:
        out += _large_uploads(large)
    if results.get("rerun"):
        out += _rerun(results["rerun"])
    if results.get("tiny"):
        out += _tiny(results["tiny"])
    out += _quiet(results["pipeline"].get("quiet") or {})
    foreign = {
        "throughput": max((t["machine_cpu"]["foreign_cores"] for t in pipeline["throughput"]), default=0.0),
        "latency": (pipeline["latency_batch"] or {}).get("machine_cpu", {}).get("foreign_cores", 0.0),
        # the passes kept (a disturbed pass is done again, and the quietest attempt kept)
        "ceiling": max(
            (
                f
                for m in [
                    *(way for ways in codec["three_way"].values() for way in ways.values()),
                    *(v for vs in codec["variants"].values() for v in vs),
                ]
                for f in m.get("passes_foreign_cores", [])
            ),
            default=codec["machine_cpu"]["foreign_cores"],
        ),
    }
    if large:
        foreign["large uploads"] = max(
            (
                part["machine_cpu"]["foreign_cores"]
                for part in (large["rows_upload"], large["large_csv"])
                if part is not None
            ),
            default=0.0,
        )
    out += [
        "",
        "Other load on the machine (CPU used by processes not ours, in cores): "
        + ", ".join(f"{k} {v:.2f}" for k, v in foreign.items()),
    ]
    if max(foreign.values()) > 0.1:
        out.append("  WARNING: something else was using the CPU; these figures are not clean. Run again.")
    out += ["", f"JSON: {run['out']}", ""]
    return "\n".join(out)

"""Where the worker's CPU goes outside the codec, finer than `make bench --profile`.

``python -m bench.workercost PROFILE.raw ...`` reads py-spy raw profiles of a worker
(``py-spy record --format raw --threads``, or `make bench --profile`'s
``bench-results/bench-worker-profile.txt``) and splits the busy samples outside the
codec by what they were doing: the S3 PUT's parts inside botocore (endpoint rules,
signing, checksums, parameter validation, serializing, event hooks, parsing the
answer), its HTTP, the download, hashing, asyncpg, procrastinate, logging, metrics.
A sample is counted under the first of those whose code is on its stack.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from bench import profiling

#: The S3 PUT's parts, by priority: a sample is counted under the first whose files are
#: anywhere on its stack (the endpoint rules call botocore's utilities, for instance).
_S3_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "S3: endpoint rules",
        ("botocore/endpoint_provider.py", "botocore/regions.py", "aiobotocore/regions.py"),
    ),
    (
        "S3: SigV4 signing (hashes the body)",
        ("botocore/auth.py", "botocore/signers.py", "aiobotocore/signers.py"),
    ),
    ("S3: checksums", ("botocore/httpchecksum.py", "aiobotocore/httpchecksum.py")),
    ("S3: parameter validation", ("botocore/validate.py",)),
    ("S3: serializing the request", ("botocore/serialize.py",)),
    ("S3: parsing the answer", ("botocore/parsers.py", "aiobotocore/parsers.py")),
    ("S3: user agent string", ("botocore/useragent.py",)),
    ("S3: retries", ("botocore/retries/", "aiobotocore/retries/", "botocore/retryhandler.py")),
    ("S3: handlers and event hooks", ("botocore/hooks.py", "botocore/handlers.py", "aiobotocore/hooks.py")),
    (
        "S3: HTTP (aiohttp under aiobotocore)",
        ("aiobotocore/httpsession.py", "aiobotocore/_endpoint_helpers.py", "aiohttp/"),
    ),
    ("S3: client call, other", ("aiobotocore/", "botocore/", "imgsvc/store.py")),
)

#: Everything else; the first whose files are anywhere on the stack.
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("download: aiohttp GET, reading and hashing the body", ("imgsvc/fetch.py",)),
    ("hashing the output (SHA-256)", ("imgsvc/catalog.py:sha256",)),
    ("imgsvc SQL (asyncpg)", ("imgsvc/db.py", "imgsvc/recorder.py", "imgsvc/reuse.py", "asyncpg/")),
    (
        "job queue: procrastinate (psycopg)",
        ("procrastinate/", "psycopg/", "psycopg_pool/", "imgsvc/queue.py"),
    ),
    ("logging", ("logging/", "imgsvc/logs.py")),
    ("metrics", ("prometheus_client/", "imgsvc/metrics.py")),
    ("aiohttp, other (its protocol callbacks)", ("aiohttp/", "multidict/", "yarl/")),
    ("imgsvc pipeline", ("imgsvc/",)),
)


def _matches(frame: profiling.Frame, pattern: str) -> bool:
    if ":" in pattern:
        file, _, function = pattern.partition(":")
        return frame.file == file and frame.function == function
    return frame.file.startswith(pattern)


def _in_s3(stack: profiling.Stack) -> bool:
    """Inside the S3 call, or aiohttp writing a request body (only PUTs send one)."""
    return any(
        f.file.startswith(("aiobotocore/", "botocore/"))
        or f.function in ("S3Storage.put", "ClientRequest.write_bytes")
        for f in stack.frames
    )


def what(stack: profiling.Stack) -> str:
    """What a busy sample outside the codec was doing."""
    if _in_s3(stack):
        for name, patterns in _S3_PARTS:
            if any(_matches(f, p) for f in stack.frames for p in patterns):
                return name
        return "S3: client call, other"
    for name, patterns in _RULES:
        if any(_matches(f, p) for f in stack.frames for p in patterns):
            return name
    return "event loop and other"


def split(stacks: list[profiling.Stack]) -> tuple[int, int, collections.Counter[str]]:
    """Busy samples, those in the codec, and the rest by what they did."""
    busy = [s for s in stacks if not profiling.is_waiting(s)]
    counts: collections.Counter[str] = collections.Counter()
    for stack in busy:
        if not stack.in_codec:
            counts[what(stack)] += stack.count
    total = sum(s.count for s in busy)
    return total, total - sum(counts.values()), counts


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.workercost", description=__doc__.splitlines()[0])
    p.add_argument("profiles", nargs="+", type=Path)
    args = p.parse_args()
    for path in args.profiles:
        total, codec, counts = split(profiling.parse_raw(path.read_text()))
        outside = total - codec
        s3 = sum(n for name, n in counts.items() if name.startswith("S3:"))
        print(f"{path}: {total} busy samples, codec {codec}, outside the codec {outside}, S3 {s3}")
        for name, n in sorted(counts.items(), key=lambda item: (not item[0].startswith("S3:"), -item[1])):
            of_s3 = f"{100 * n / s3:6.1f}% of S3" if name.startswith("S3:") and s3 else ""
            print(f"  {name:<54} {n:>6} {100 * n / max(outside, 1):6.1f}% of outside {of_s3}")


if __name__ == "__main__":
    main()

"""How the SQL of one image, and of one status call, grows with the size of a request.

    python -m bench.dbscale [--sizes 1000,10000,100000]

In a private PostgreSQL (migrated with `imgsvc migrate`), makes one request per size
with that many products and images, half of them done, and times with EXPLAIN ANALYZE
(best of 5) the service's own named queries, read from its queries.sql, prepared
and with a generic plan, as the service runs them:

- ``record_images``: run for every image, alone or with others of its job (it locks the
  request row, records the image and counts it on the request); timed for one image,
  inside a transaction that is rolled back;
- ``final_status_by_count``: after a cancel, for a request with nothing left running
  (it counts all its images);
- ``get_request``: the summary behind every GET /status.

A query the service no longer has is reported as missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from imgsvc import db, localdb


def _psql(cluster: localdb.LocalPostgres, *statements: str) -> str:
    """Run statements in one session (one -c each), as the cluster's owner; return the output."""
    args = [str(cluster.bindir / "psql"), "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1"]
    args += ["-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", "-d", localdb.DATABASE]
    for statement in statements:
        args += ["-c", statement]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip())
    return done.stdout


def _best_ms(
    cluster: localdb.LocalPostgres, sql: str, args: str, *, rollback: bool = False, repeats: int = 5
) -> float:
    """The best execution time of ``sql`` run as the service runs it: a prepared statement,
    with the generic plan it settles on after its first runs."""
    best = float("inf")
    for _ in range(repeats):
        explain = f"EXPLAIN (ANALYZE, TIMING OFF) EXECUTE q ({args})"
        session = ["SET plan_cache_mode = force_generic_plan", f"PREPARE q AS {sql}"]
        plan = (
            _psql(cluster, *session, "BEGIN", explain, "ROLLBACK")
            if rollback
            else _psql(cluster, *session, explain)
        )
        found = re.search(r"Execution Time: ([\d.]+) ms", plan)
        if found is None:
            raise RuntimeError(f"no execution time in:\n{plan}")
        best = min(best, float(found.group(1)))
    return best


def _make_request(cluster: localdb.LocalPostgres, request_id: str, size: int) -> None:
    def run(sql: str) -> None:
        cluster.execute(sql, database=localdb.DATABASE)

    run(
        "INSERT INTO requests (id, product_count, image_count, status) "
        f"VALUES ('{request_id}', {size}, {size}, 'processing')"
    )
    run(
        "INSERT INTO products (request_id, position, line, serial, serial_number, name) "
        f"SELECT '{request_id}', g, g + 1, g::text, g, 'product ' || g FROM generate_series(1, {size}) g"
    )
    run(
        "INSERT INTO images (request_id, product_id, position, input_url, status) "
        f"SELECT '{request_id}', p.id, 1, 'http://127.0.0.1/' || p.position, 'queued' "
        f"FROM products p WHERE p.request_id = '{request_id}'"
    )
    # Half of them done ('done' rows need an output URL, by a check constraint).
    run(
        "UPDATE images SET status = 'done', output_url = 'http://127.0.0.1/out' "
        f"WHERE request_id = '{request_id}' AND id % 2 = 0"
    )
    run("ANALYZE")


def main() -> None:
    """Print one line per size."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000,100000", help="images per request, comma-separated")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    queries = db.queries()
    root = Path(tempfile.mkdtemp(prefix="imgsvc-dbscale-"))
    os.chmod(root, 0o755)  # noqa: S103 - PostgreSQL runs as 'nobody' when we are root
    cluster = localdb.LocalPostgres(root / "pg", fast=False)
    try:
        url = cluster.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGSVC_", "AWS_", "PG"))}
        env |= {"DATABASE_URL": url, "IMGSVC_DATA_DIR": str(root / "data")}
        subprocess.run(
            [sys.executable, "-m", "imgsvc", "migrate"], env=env, check=True, capture_output=True, timeout=120
        )
        print(
            "images   record_images (one image)   final_status_by_count (after a cancel)"
            "   get_request (every GET /status)"
        )
        for size in sizes:
            request_id = f"00000000-0000-4000-8000-{size:012d}"
            _make_request(cluster, request_id, size)
            open_image = cluster.execute(
                f"SELECT min(id) FROM images WHERE request_id = '{request_id}' AND status = 'queued'",
                database=localdb.DATABASE,
            )
            ending = {
                "id": int(open_image), "status": "done", "output_key": "k",
                "output_url": "http://127.0.0.1/out", "bytes_in": 1000, "bytes_out": 500, "width": 100,
                "height": 100, "format_in": "jpeg", "format_out": "jpeg", "quality_in": 90,
                "quality_out": 45, "kept_original": False,
            }  # fmt: skip
            values = {
                1: f"'{request_id}'::uuid",
                2: f"'{json.dumps([ending])}'",
                3: "'requests'",
                4: "'finish_request'",
            }
            cells = []
            for name, params, rollback in (
                ("record_images", values, True),
                ("final_status_by_count", {1: values[1]}, False),
                ("get_request", {1: values[1], 2: "NULL"}, False),
            ):
                if name not in queries:
                    cells.append(f"{'missing':>12}")
                    continue
                given = ", ".join(params[number] for number in sorted(params))
                cells.append(f"{_best_ms(cluster, queries[name], given, rollback=rollback):9.2f} ms")
            print(f"{size:>7}   {cells[0]:>26}   {cells[1]:>39}   {cells[2]:>31}")
    finally:
        cluster.remove()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

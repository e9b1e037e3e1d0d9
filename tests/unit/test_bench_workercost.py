"""bench.workercost: each sample counted under what it was doing, from py-spy's raw output."""

from __future__ import annotations

from bench import profiling, workercost

LOOP = "thread (0x1): MainThread;<module> (imgsvc/__main__.py:3);run (asyncio/runners.py:190)"
PUT = (
    f"{LOOP};_output (imgsvc/pipeline.py:236);S3Storage.put (imgsvc/store.py:140)"
    ";_make_api_call (aiobotocore/client.py:400)"
)
RAW = "\n".join(
    [
        # The rules call botocore's utilities: counted as the rules, not as utilities.
        f"{PUT};construct_endpoint (botocore/regions.py:500);is_valid_host_label (botocore/utils.py:90) 7",
        f"{PUT};sign (botocore/auth.py:400);payload (botocore/auth.py:340) 5",
        # The body is written by a task of aiohttp's own: no botocore frame on its stack.
        f"{LOOP};ClientRequest.write_bytes (aiohttp/client_reqrep.py:700)"
        ";_write (aiohttp/http_writer.py:80) 4",
        f"{LOOP};_fetch (imgsvc/fetch.py:280);ClientSession._request (aiohttp/client.py:600) 3",
        f"{LOOP};remember_output (imgsvc/reuse.py:135);_do_execute (asyncpg/connection.py:1800) 2",
        "thread (0x2): imgsvc-image-0;_worker (concurrent/futures/thread.py:83)"
        ";compress (imgsvc/compress.py:200) 9",
        f"{LOOP};select (selectors.py:468) 50",
    ]
)


def test_each_sample_is_counted_under_what_it_did_and_the_codec_and_waits_apart() -> None:
    total, codec, counts = workercost.split(profiling.parse_raw(RAW))
    assert (total, codec) == (30, 9)
    assert counts == {
        "S3: endpoint rules": 7,
        "S3: SigV4 signing (hashes the body)": 5,
        "S3: HTTP (aiohttp under aiobotocore)": 4,
        "download: aiohttp GET, reading and hashing the body": 3,
        "imgsvc SQL (asyncpg)": 2,
    }

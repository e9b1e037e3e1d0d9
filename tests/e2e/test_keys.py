"""API keys with names and roles, over HTTP against the service as a process: a user
key sees, lists and cancels only its own requests, and every other one is a 404 as an
unknown id is; admin keys see all; Idempotency-Keys are each key's own."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from imgsvc import config_parsers, db, intake, localdb, models
from tests.e2e.processes import Process, assert_clean_exit, post_csv, service_env, wait_for_final
from tests.servers import ImageServer, S3Server

SHOP_A = "k-shop-a-0123456789abc"
SHOP_B = "k-shop-b-0123456789abc"
OPS = "k-ops-0123456789abcdef"
PLAIN = "k-plain-0123456789abcd"  # the form without a name: an admin key
KEYS = f"shop-a:{SHOP_A},shop-b:{SHOP_B}:user,ops:{OPS}:admin,{PLAIN}"
PLAIN_NAME = config_parsers.plain_key_name(PLAIN)
HEADER = "S. No.,Product Name,Input Image Urls\n"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextlib.asynccontextmanager
async def keyed_service(env: dict[str, str], log: Path) -> AsyncIterator[dict[str, aiohttp.ClientSession]]:
    """`imgsvc serve` with API keys, once /healthz (which needs no key) answers, and a
    session per role: each key, no key, and a key the service does not know. Stopped
    cleanly after, with no key in its log."""
    server = Process([sys.executable, "-m", "imgsvc", "serve"], env, log)
    base = f"http://127.0.0.1:{env['PORT']}"
    sessions = {
        "shop-a": aiohttp.ClientSession(headers=bearer(SHOP_A)),
        "shop-b": aiohttp.ClientSession(headers=bearer(SHOP_B)),
        "ops": aiohttp.ClientSession(headers=bearer(OPS)),
        "plain": aiohttp.ClientSession(headers=bearer(PLAIN)),
        "none": aiohttp.ClientSession(),
        "wrong": aiohttp.ClientSession(headers=bearer("k-wrong-0123456789abcd")),
    }
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                async with sessions["none"].get(base + "/healthz") as response:
                    assert response.status == 200
                    break
            except aiohttp.ClientConnectionError:
                assert time.monotonic() < deadline and server.popen.poll() is None, server.output()
                await asyncio.sleep(0.2)
        yield sessions
    finally:
        for session in sessions.values():
            await session.close()
        assert_clean_exit(server)
    output = server.output()
    assert not any(key in output for key in (SHOP_A, SHOP_B, OPS, PLAIN)), "a key reached the log"


async def answer(
    session: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    async with session.request(method, url, headers=headers) as response:
        return response.status, (await response.read()).decode(errors="replace")


def endpoints(base: str, rid: str) -> list[tuple[str, str, dict[str, str] | None]]:
    """Every endpoint keyed by a request id: the status, the request's JSON and its
    browser page, the output CSV, cancel."""
    return [
        ("GET", f"{base}/status/{rid}", None),
        ("GET", f"{base}/requests/{rid}", None),
        ("GET", f"{base}/requests/{rid}", {"Accept": "text/html"}),
        ("GET", f"{base}/requests/{rid}/output.csv", None),
        ("POST", f"{base}/requests/{rid}/cancel", None),
    ]


async def listed(session: aiohttp.ClientSession, base: str) -> dict[str, str | None]:
    async with session.get(base + "/requests") as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
    assert body["page"]["total"] == len(body["requests"])
    return {row["request_id"]: row["owner"] for row in body["requests"]}


async def fetch_one(database_url: str, sql: str, *args: object) -> Any:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def test_each_role_on_each_endpoint(
    database_url: str, s3: S3Server, tmp_path: Path, image_server: ImageServer
) -> None:
    # A request stored before owners were kept (or without keys): no owner.
    pool = await db.create_pool(database_url)
    try:
        url = image_server.url("/img/png_palette_trns.png")
        old = await intake.insert_request(
            pool,
            file_name="old.csv",
            webhook_url=None,
            products=[models.Product(line=2, serial="1", serial_number=1, name="P", urls=(url,))],
            queue=models.IMAGE_QUEUE,
            task=models.PROCESS_IMAGES,
        )
    finally:
        await pool.close()
    env = {**service_env(database_url, s3, tmp_path, localdb.free_port()), "IMGSVC_API_KEYS": KEYS}
    csv_body = (HEADER + f"1,P,{image_server.url('/img/png_palette_trns.png')}\n").encode()
    slow_body = (HEADER + f"1,P,{image_server.url('/slow/3000/png_palette_trns.png')}\n").encode()
    base = f"http://127.0.0.1:{env['PORT']}"
    async with keyed_service(env, tmp_path / "serve.log") as c:
        status, mine = await post_csv(c["shop-a"], base, csv_body)
        assert status == 202
        status, theirs = await post_csv(c["ops"], base, csv_body)
        assert status == 202
        done = await wait_for_final(c["shop-a"], mine["status_url"])
        assert done["owner"] == "shop-a"  # a key sees its own name
        await wait_for_final(c["ops"], theirs["status_url"])
        rid, ops_rid = mine["request_id"], theirs["request_id"]
        unknown = str(uuid.uuid4())

        # The owner: 200 on each, but cancel, which is 409 for a finished request.
        for method, url, headers in endpoints(base, rid):
            code, text = await answer(c["shop-a"], method, url, headers)
            assert code == (409 if method == "POST" else 200), (url, code, text)
        # Another user key: exactly what an unknown id gets.
        for (method, url, headers), (_, missing, _) in zip(
            endpoints(base, rid), endpoints(base, unknown), strict=True
        ):
            code, text = await answer(c["shop-b"], method, url, headers)
            assert code == 404, (url, code, text)
            assert text == (await answer(c["shop-b"], method, missing, headers))[1].replace(unknown, rid)
        # A user key and an admin's request, and one made before owners were kept.
        for other in (ops_rid, old.request_id):
            for method, url, headers in endpoints(base, other):
                code, text = await answer(c["shop-a"], method, url, headers)
                assert code == 404, (url, code, text)
        # Admin keys, named or plain: everything, owners shown.
        for admin in ("ops", "plain"):
            for method, url, headers in endpoints(base, rid):
                code, text = await answer(c[admin], method, url, headers)
                assert code == (409 if method == "POST" else 200), (admin, url, code, text)
            async with c[admin].get(f"{base}/status/{old.request_id}") as response:
                assert response.status == 200 and (await response.json())["owner"] is None
        # No key, or a wrong one: 401 everywhere, whoever owns the request.
        for who in ("none", "wrong"):
            for method, url, headers in endpoints(base, rid):
                code, _ = await answer(c[who], method, url, headers)
                assert code == 401, (who, url, code)
            assert (await answer(c[who], "GET", base + "/requests"))[0] == 401
            assert (await post_csv(c[who], base, csv_body))[0] == 401

        # Cancel: another user key cannot, the owner can.
        status, slow = await post_csv(c["shop-a"], base, slow_body)
        assert status == 202
        cancel = f"{base}/requests/{slow['request_id']}/cancel"
        assert (await answer(c["shop-b"], "POST", cancel))[0] == 404
        assert await fetch_one(
            database_url,
            "SELECT cancel_requested_at IS NULL FROM requests WHERE id = $1",
            uuid.UUID(slow["request_id"]),
        )
        assert (await answer(c["shop-a"], "POST", cancel))[0] == 202

        # The list: a user key's own; admins all, with their owners.
        assert await listed(c["shop-a"], base) == {rid: "shop-a", slow["request_id"]: "shop-a"}
        assert await listed(c["shop-b"], base) == {}
        everything = {rid: "shop-a", slow["request_id"]: "shop-a", ops_rid: "ops", old.request_id: None}
        assert await listed(c["ops"], base) == everything
        assert await listed(c["plain"], base) == everything
        async with c["shop-a"].get(base + "/requests?status=completed") as response:
            assert [r["request_id"] for r in (await response.json())["requests"]] == [rid]

    # In SQL: the key's name, never the key.
    owners = await fetch_one(database_url, "SELECT array_agg(DISTINCT coalesce(owner, '-')) FROM requests")
    assert sorted(owners) == ["-", "ops", "shop-a"]
    described = await fetch_one(
        database_url,
        "SELECT col_description('requests'::regclass, attnum) FROM pg_attribute"
        " WHERE attrelid = 'requests'::regclass AND attname = 'owner'",
    )
    assert "API key" in described


async def test_an_idempotency_key_is_each_keys_own(
    database_url: str, s3: S3Server, tmp_path: Path, image_server: ImageServer
) -> None:
    env = {**service_env(database_url, s3, tmp_path, localdb.free_port()), "IMGSVC_API_KEYS": KEYS}
    csv_body = (HEADER + f"1,P,{image_server.url('/img/png_palette_trns.png')}\n").encode()
    replay = {"Idempotency-Key": "order-2026-12-07-001"}
    base = f"http://127.0.0.1:{env['PORT']}"
    async with keyed_service(env, tmp_path / "serve.log") as c:
        firsts: dict[str, str] = {}
        for who in ("shop-a", "shop-b", "ops"):
            status, body = await post_csv(c[who], base, csv_body, headers=replay)
            assert status == 202, body
            firsts[who] = body["request_id"]
        assert len(set(firsts.values())) == 3  # nobody got another's request back
        for who in ("shop-a", "shop-b", "ops"):
            form = aiohttp.FormData()
            form.add_field("file", csv_body, filename="products.csv", content_type="text/csv")
            async with c[who].post(base + "/upload", data=form, headers=replay) as response:
                assert response.status == 202
                assert response.headers.get("Idempotent-Replayed") == "true"
                assert (await response.json())["request_id"] == firsts[who]
        # A different file under shop-a's key is refused; under a fresh owner it is new.
        other = csv_body + f"2,Q,{image_server.url('/img/png_palette_trns.png')}\n".encode()
        status, body = await post_csv(c["shop-a"], base, other, headers=replay)
        assert (status, body["error"]) == (422, "idempotency_key_reused")
        status, body = await post_csv(c["plain"], base, other, headers=replay)
        assert status == 202 and body["request_id"] not in firsts.values()
        for who, rid in firsts.items():
            async with c[who].get(f"{base}/status/{rid}") as response:
                assert (await response.json())["owner"] == who
    owners = await fetch_one(
        database_url,
        "SELECT array_agg(owner ORDER BY owner) FROM requests WHERE idempotency_key = $1",
        replay["Idempotency-Key"],
    )
    assert owners == sorted(["shop-a", "shop-b", "ops", PLAIN_NAME])


async def test_local_files_are_the_owners_only(
    database_url: str, s3: S3Server, tmp_path: Path, image_server: ImageServer
) -> None:
    env = service_env(database_url, s3, tmp_path, localdb.free_port())
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")} | {"IMGSVC_API_KEYS": KEYS}
    csv_body = (HEADER + f"1,P,{image_server.url('/img/png_palette_trns.png')}\n").encode()
    base = f"http://127.0.0.1:{env['PORT']}"
    async with keyed_service(env, tmp_path / "serve.log") as c:
        status, body = await post_csv(c["shop-a"], base, csv_body)
        assert status == 202
        done = await wait_for_final(c["shop-a"], body["status_url"])
        image, output_csv = done["products"][0]["images"][0]["output_url"], done["output_csv_url"]
        assert f"/files/{body['request_id']}/" in output_csv and "/files/img/" in image
        for url in (image, output_csv):
            assert (await answer(c["shop-a"], "GET", url))[0] == 200
            assert (await answer(c["ops"], "GET", url))[0] == 200
            assert (await answer(c["none"], "GET", url))[0] == 401
        # The request's own files are its owner's; an image named by its bytes is anyone's
        # who has a key, as a bucket's object is anyone's who has its URL.
        assert (await answer(c["shop-b"], "GET", output_csv))[0] == 404
        assert (await answer(c["shop-b"], "GET", image))[0] == 200
        hidden = f"{base}/files/img/../{body['request_id']}/output.csv"
        assert (await answer(c["shop-b"], "GET", hidden))[0] == 404
        unknown = f"{base}/files/{uuid.uuid4()}/output.csv"
        assert (await answer(c["shop-b"], "GET", unknown))[0] == 404
        escape = f"{base}/files/{uuid.uuid4()}/../{body['request_id']}/output.csv"
        assert (await answer(c["shop-b"], "GET", escape))[0] == 404


@pytest.mark.parametrize("raw", [f"shop-a:{SHOP_A},shop-b:tiny-k3y", f"shop-a:{SHOP_A}:root"])
def test_a_bad_key_list_stops_start_up_with_one_line(
    database_url: str, s3: S3Server, tmp_path: Path, raw: str
) -> None:
    env = {**service_env(database_url, s3, tmp_path, localdb.free_port()), "IMGSVC_API_KEYS": raw}
    server = Process([sys.executable, "-m", "imgsvc", "serve"], env, tmp_path / "serve.log")
    assert server.popen.wait(30) == 2
    output = server.output()
    assert output.startswith("imgsvc: configuration error: IMGSVC_API_KEYS: entry "), output
    assert SHOP_A not in output and "tiny-k3y" not in output and "Traceback" not in output

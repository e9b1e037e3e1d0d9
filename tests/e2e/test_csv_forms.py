"""The CSVs people write, sent to the service over HTTP and with the CLI: what is read
as meant is stored so, the 202 says what was assumed, and what is ambiguous is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import asyncpg

from imgsvc import localdb
from tests.e2e.processes import post_csv, service_env, serving, wait_for_final
from tests.servers import ImageServer, S3Server

UNQUOTED = "the image URLs were not quoted and were read as one list"


async def stored_products(database_url: str, request_id: str) -> list[tuple[int, str, str, list[str]]]:
    """Each product of a request as the database holds it: line, serial, name, image URLs."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT p.line, p.serial, p.name, array_agg(i.input_url ORDER BY i.position) AS urls"
            " FROM products p JOIN images i ON i.product_id = p.id"
            " WHERE p.request_id = $1 GROUP BY p.id ORDER BY p.position",
            request_id,
        )
    finally:
        await conn.close()
    return [(row["line"], row["serial"], row["name"], list(row["urls"])) for row in rows]


async def test_an_unquoted_sample_is_stored_as_meant_and_says_what_was_assumed(
    service: str, image_server: ImageServer, database_url: str
) -> None:
    a, b, c, d = (
        image_server.url(f"/img/{name}")
        for name in (
            "kodak_kodim23.png",
            "bimg_northern_cardinal_bird.jpg",
            "gif_animated_loop3.gif",
            "webp_lossy_alpha_5_webp_a.webp",
        )
    )
    # As one public sample has it: the assignment's "Serial Number", URL lists unquoted.
    body = (
        "Serial Number,Product Name,Input Image Urls\n"
        f"1,Parrots,{a},{b}\n"
        f"2,Badge,{c}\n"
        f'3,"Sticker, round",{d}, {a},{c}\n'
    )
    async with aiohttp.ClientSession() as session:
        status, accepted = await post_csv(session, service, body.encode())
        assert status == 202, accepted
        assert (accepted["products"], accepted["images"]) == (3, 6)
        assert accepted["warning_count"] == 2
        assert accepted["warnings"] == [
            {"line": 2, "message": f"4 cells; {UNQUOTED}"},
            {"line": 4, "message": f"5 cells; {UNQUOTED}"},
        ]
        final = await wait_for_final(session, accepted["status_url"])
    assert await stored_products(database_url, accepted["request_id"]) == [
        (2, "1", "Parrots", [a, b]),
        (3, "2", "Badge", [c]),
        (4, "3", "Sticker, round", [d, a, c]),
    ]
    assert final["status"] == "completed" and final["counts"]["done"] == 6


async def test_aliases_and_other_separators_are_stored_without_warnings(
    service: str, database_url: str
) -> None:
    # A BOM, the short header names, "|" and line breaks between URLs, no final newline.
    body = (
        "\ufeff#,Product,Images\r\n"
        "1,Shirt,http://a.test/1.jpg|http://a.test/2.jpg?w=1&h=2\r\n"
        '2,Socks,"http://a.test/3.jpg\r\nhttp://a.test/4.jpg\r\n"\r\n'
        '3,Hat,"http://a.test/5.jpg, http://a.test/6.jpg"'
    )
    async with aiohttp.ClientSession() as session:
        status, accepted = await post_csv(session, service, body.encode())
    assert status == 202, accepted
    assert (accepted["warning_count"], accepted["warnings"]) == (0, [])
    assert await stored_products(database_url, accepted["request_id"]) == [
        (2, "1", "Shirt", ["http://a.test/1.jpg", "http://a.test/2.jpg?w=1&h=2"]),
        (3, "2", "Socks", ["http://a.test/3.jpg", "http://a.test/4.jpg"]),
        (6, "3", "Hat", ["http://a.test/5.jpg", "http://a.test/6.jpg"]),  # Socks took three lines
    ]


async def test_what_is_ambiguous_is_refused_and_nothing_is_stored(service: str, database_url: str) -> None:
    header = "Serial Number,Product Name,Input Image Urls\n"
    async with aiohttp.ClientSession() as session:
        # An unquoted comma in the name: "large" could be the name's or a URL that is not one.
        status, refused = await post_csv(
            session,
            service,
            (header + "1,A,http://a.test/1.jpg\n2,Mug, large,http://a.test/2.jpg\n").encode(),
        )
        assert (status, refused["error"], refused["problem_count"]) == (422, "invalid_csv", 1)
        (problem,) = refused["problems"]
        assert problem["line"] == 3
        assert problem["message"].startswith(
            "4 cells where 3 are expected, and column 3 ('large') is not a URL"
        )
        status, refused = await post_csv(
            session, service, b"Serial,Title,Pictures\n1,A,http://a.test/1.jpg\n"
        )
        assert status == 422
        assert refused["problems"][0]["message"].startswith(
            "the header must be 'S. No.,Product Name,Input Image Urls' or aliases of those names; "
            "found 3 columns: 'Serial', 'Title', 'Pictures'"
        )
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM requests") == 0
    finally:
        await conn.close()


def unquoted_rows(count: int) -> str:
    return "".join(f"{n},P{n},http://a.test/{n}a.jpg,http://a.test/{n}b.jpg\n" for n in range(1, count + 1))


async def test_a_large_unquoted_file_gets_a_bounded_answer_and_the_same_on_replay(
    database_url: str, s3: S3Server, tmp_path: Path
) -> None:
    env = service_env(database_url, s3, tmp_path, localdb.free_port()) | {"IMGSVC_MAX_ROWS": "10000"}
    body = ("S.No,Name,Image Urls\n" + unquoted_rows(10_000)).encode()
    key = {"Idempotency-Key": "large-unquoted"}
    # No worker: nothing is fetched, and what the upload stored stays as it was.
    with serving(env, tmp_path / "serve.log", "--no-worker") as (base, _):
        async with aiohttp.ClientSession() as session:
            status, accepted = await post_csv(session, base, body, headers=key)
            replay_status, replayed = await post_csv(session, base, body, headers=key)
    assert status == 202, accepted
    assert (accepted["products"], accepted["images"], accepted["warning_count"]) == (10_000, 20_000, 10_000)
    assert accepted["warnings"] == [{"line": n, "message": f"4 cells; {UNQUOTED}"} for n in range(2, 52)]
    assert (replay_status, replayed) == (202, accepted)
    products = await stored_products(database_url, accepted["request_id"])
    assert len(products) == 10_000
    assert products[0] == (2, "1", "P1", ["http://a.test/1a.jpg", "http://a.test/1b.jpg"])
    assert products[-1] == (
        10_001,
        "10000",
        "P10000",
        ["http://a.test/10000a.jpg", "http://a.test/10000b.jpg"],
    )


def test_the_cli_prints_the_first_warnings_and_how_many(service: str, tmp_path: Path) -> None:
    csv_file = tmp_path / "unquoted.csv"
    csv_file.write_text("Serial Number,Product Name,Input Image Urls\n" + unquoted_rows(12))
    done = subprocess.run(
        [sys.executable, "-m", "imgsvc", "submit", str(csv_file), "--server", service],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("request ") and "warning" not in done.stdout
    assert done.stderr.splitlines() == [
        *(f"warning: line {n}: 4 cells; {UNQUOTED}" for n in range(2, 12)),
        "warning: … 12 warnings in all",
    ]

"""The output CSV's quoting, and webhook signatures checked by an independent verifier."""

from __future__ import annotations

import base64
import csv
import io
import json
import time
from collections.abc import AsyncIterator

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from imgsvc import errors, notify, report, settings

AWKWARD = ['Mug, "large"', "Line one\nline two", "Crème brûlée 🍮", "  spaced  ", "=SUM(A1)", ""]


def test_output_csv_reads_back_value_by_value() -> None:
    rows = [
        report.Row(
            serial=f"{n}.",
            name=name,
            input_urls=("http://a/1.jpg", "http://a/2.jpg"),
            output_urls=("http://s3/1.jpg", None),
        )
        for n, name in enumerate(AWKWARD, start=1)
    ]
    data = report.render_csv(rows)
    read = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    assert read[0] == ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"]
    assert read[1:] == [[r.serial, r.name, "http://a/1.jpg,http://a/2.jpg", "http://s3/1.jpg,"] for r in rows]


def test_a_failed_image_keeps_its_slot() -> None:
    row = report.Row(serial="1", name="P", input_urls=("a", "b", "c"), output_urls=(None, "y", None))
    line = report.render_csv([row]).decode().splitlines()[1]
    assert line == '1,P,"a,b,c",",y,"'


SECRET = "whsec_" + base64.b64encode(b"a-secret-key-of-some-length!").decode()


def test_signatures_verify_with_the_standard_webhooks_library() -> None:
    body = notify.event_payload(
        request_id="r",
        status="completed",
        counts={"total": 1},
        output_csv_url=None,
        status_url="http://x/status/r",
        completed_at="2026-01-01T00:00:00+00:00",
    ).encode()
    timestamp = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": notify.sign(notify.secret_key(SECRET), "msg_1", timestamp, body),
    }
    assert Webhook(SECRET).verify(body, headers)["type"] == "request.completed"
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"completed", b"failed"), headers)
    other = "whsec_" + base64.b64encode(b"another-key-entirely-different").decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)


def test_event_payload_fields() -> None:
    payload = json.loads(
        notify.event_payload(
            request_id="r",
            status="completed_with_errors",
            counts={"total": 2, "done": 1, "failed": 1},
            output_csv_url="http://s3/r/output.csv",
            status_url="http://x/status/r",
            completed_at="2026-01-01T00:00:00+00:00",
        )
    )
    assert payload == {
        "type": "request.completed",
        "request_id": "r",
        "status": "completed_with_errors",
        "counts": {"total": 2, "done": 1, "failed": 1},
        "output_csv_url": "http://s3/r/output.csv",
        "status_url": "http://x/status/r",
        "completed_at": "2026-01-01T00:00:00+00:00",
    }


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, "delivered"),
        (204, "delivered"),
        (500, "retry"),
        (503, "retry"),
        (408, "retry"),
        (429, "retry"),
        (400, "give_up"),
        (401, "give_up"),
        (404, "give_up"),
        (410, "give_up"),
        (301, "give_up"),
    ],
)
def test_judge(status: int, verdict: str) -> None:
    assert notify.judge(status)[0] == verdict


def test_plain_secrets_are_their_bytes_and_whsec_secrets_are_base64() -> None:
    assert notify.secret_key("plain text") == b"plain text"
    assert notify.secret_key(SECRET) == b"a-secret-key-of-some-length!"


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"WEBHOOK_URL": "https://hooks.test/x"}, "WEBHOOK_SECRET"),
        ({"WEBHOOK_SECRET": "whsec_not base64!"}, "WEBHOOK_SECRET"),
        ({"IMGSVC_WEBHOOK_TIMEOUT": "0"}, "IMGSVC_WEBHOOK_TIMEOUT"),
    ],
)
def test_webhook_settings_are_checked(env: dict[str, str], name: str) -> None:
    with pytest.raises(errors.SettingsError) as caught:
        settings.from_env(env)
    assert caught.value.name == name
    assert "not base64!" not in caught.value.message  # a secret is never echoed


async def test_the_streamed_csv_is_the_whole_csv_in_chunks() -> None:
    rows = [
        report.Row(serial=str(n), name=f"P {n}", input_urls=(f"http://a/{n}.jpg",), output_urls=(None,))
        for n in range(1, 6)
    ]

    async def chunks() -> AsyncIterator[list[report.Row]]:
        for start in range(0, len(rows), 2):
            yield rows[start : start + 2]

    streamed = [part async for part in report.stream_csv(chunks())]
    assert len(streamed) == 4  # the header, then three chunks
    assert b"".join(streamed) == report.render_csv(rows)


def test_with_two_secrets_either_one_verifies() -> None:
    old, new = SECRET, "whsec_" + base64.b64encode(b"the-next-secret-of-some-length").decode()
    body = b'{"type":"request.completed"}'
    timestamp = int(time.time())
    header = notify.signatures(tuple(map(notify.secret_key, (new, old))), "msg_2", timestamp, body)
    assert header.count("v1,") == 2 and " " in header
    headers = {"webhook-id": "msg_2", "webhook-timestamp": str(timestamp), "webhook-signature": header}
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers)["type"] == "request.completed"
    stranger = "whsec_" + base64.b64encode(b"a-third-secret-nobody-was-given").decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(stranger).verify(body, headers)

"""Webhooks: signed as Standard Webhooks sign them, delivered one attempt per job, and
the verdict on each attempt.

Headers: ``webhook-id`` (the event's id, the same on every attempt),
``webhook-timestamp`` (seconds, of this attempt) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, one
such signature per secret of ``WEBHOOK_SECRET``, space-separated: while a secret is
rotated, a receiver that knows either the old or the new one accepts the event.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import time
import uuid
from typing import Any

import aiohttp
import yarl

from imgsvc import db, errors, fetch, metrics, models, resources

logger = logging.getLogger("imgsvc.notify")

_RETRY_STATUSES = frozenset({408, 425, 429})


def secret_key(secret: str) -> bytes:
    """The HMAC key: a ``whsec_`` secret is base64 after the prefix, any other is its UTF-8."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    return secret.encode()


def new_event_id() -> str:
    """A unique event id, the value of every attempt's webhook-id header."""
    return f"msg_{uuid.uuid4().hex}"


def sign(key: bytes, event_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header value."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signatures(keys: tuple[bytes, ...], event_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header value: a signature with each key, space-separated."""
    return " ".join(sign(key, event_id, timestamp, body) for key in keys)


def event_payload(
    *,
    request_id: str,
    status: str,
    counts: dict[str, int],
    output_csv_url: str | None,
    status_url: str,
    completed_at: str,
) -> str:
    """The JSON body of a request.completed event."""
    return json.dumps(
        {
            "type": "request.completed",
            "request_id": request_id,
            "status": status,
            "counts": counts,
            "output_csv_url": output_csv_url,
            "status_url": status_url,
            "completed_at": completed_at,
        },
        separators=(",", ":"),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """What one delivery attempt came to."""

    started_at: float
    duration_ms: int
    http_status: int | None
    error: str | None
    verdict: str  # "delivered", "retry" or "give_up"


def judge(status: int) -> tuple[str, str | None]:
    """The verdict on an HTTP answer, and the reason when it is not a success."""
    if 200 <= status < 300:
        return "delivered", None
    if status == 410:
        return "give_up", "the receiver answered 410 Gone: it wants no more of these"
    if status in _RETRY_STATUSES or status >= 500:
        return "retry", f"the receiver answered HTTP {status}"
    return "give_up", f"the receiver answered HTTP {status}"


async def post(
    session: aiohttp.ClientSession,
    url: str | yarl.URL,
    *,
    keys: tuple[bytes, ...],
    event_id: str,
    body: bytes,
    time_limit: float,
) -> Attempt:
    """Send one attempt; never raises for what the receiver or the network does."""
    started = time.time()
    clock = time.monotonic()
    timestamp = int(started)
    headers: dict[str, Any] = {
        "Content-Type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signatures(keys, event_id, timestamp, body),
    }
    status: int | None = None
    try:
        async with session.post(
            url,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=time_limit),
        ) as response:
            status = response.status
            await response.content.read(64 * 1024)  # drain a little; the body is ignored
        verdict, error = judge(status)
    except TimeoutError:
        verdict, error = "retry", f"the receiver did not answer within {time_limit:g} s"
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, fetch.RefusedAddress):
            verdict, error = "give_up", f"refused: {exc.os_error}"
        else:
            verdict, error = "retry", f"could not connect to {exc.host}:{exc.port}"
    except aiohttp.ClientError as exc:
        verdict, error = "retry", f"the connection failed ({type(exc).__name__})"
    duration = int((time.monotonic() - clock) * 1000)
    return Attempt(started_at=started, duration_ms=duration, http_status=status, error=error, verdict=verdict)


async def queue_delivery(conn: db.Connection, delivery_id: int) -> None:
    """Queue a job for a webhook delivery. Its lock runs the jobs of one delivery one at
    a time, should there ever be two (a requeue racing the first): the second then finds
    the delivery settled, where running beside the first it would have posted again."""
    await db.defer_job(
        conn,
        models.REQUEST_QUEUE,
        models.DELIVER_WEBHOOK,
        {"delivery_id": delivery_id},
        lock=f"delivery:{delivery_id}",
    )


def _ready_to_post(res: resources.Resources, url: str) -> tuple[yarl.URL, tuple[bytes, ...]] | str:
    """Where to post a webhook and the keys to sign it with, or why it cannot be sent.
    Literal IP hosts are checked here, as for sources; names, by the resolver."""
    secrets = res.settings.webhook_secret
    if not secrets:
        return "no WEBHOOK_SECRET is configured to sign the event"
    try:
        return fetch.check_address(url, res.download_limits), tuple(map(secret_key, secrets))
    except errors.PermanentError as exc:
        return str(exc)


async def deliver(res: resources.Resources, delivery_id: int) -> str:
    """One attempt at a webhook; raise TransientError when another should follow."""
    claimed = await db.claim_delivery(res.pool, delivery_id)
    if claimed is None:
        return "already settled"
    config = res.settings
    attempt_no = claimed.attempts
    ready = _ready_to_post(res, claimed.url)
    if isinstance(ready, str):
        attempt = Attempt(
            started_at=datetime.datetime.now(datetime.UTC).timestamp(),
            duration_ms=0,
            http_status=None,
            verdict="give_up",
            error=ready,
        )
    else:
        target, keys = ready
        attempt = await post(
            res.http,
            target,
            keys=keys,
            event_id=claimed.event_id,
            body=claimed.payload.encode(),
            time_limit=config.webhook_timeout,
        )
    state: models.DeliveryState
    if attempt.verdict == "delivered":
        state = models.DeliveryState.DELIVERED
    elif attempt.verdict == "retry" and attempt_no < config.webhook_max_attempts:
        state = models.DeliveryState.RETRYING
    else:
        state = models.DeliveryState.FAILED
    error = attempt.error
    if state is models.DeliveryState.FAILED and attempt.verdict == "retry":
        error = f"{attempt.error} (gave up after {attempt_no} attempts)"
    await db.record_attempt(
        res.pool,
        delivery_id,
        attempt_no,
        datetime.datetime.fromtimestamp(attempt.started_at, datetime.UTC),
        attempt.duration_ms,
        attempt.http_status,
        error,
        state,
    )
    logger.info("webhook %s attempt %s: %s", claimed.event_id, attempt_no, error or state)
    metrics.webhooks.labels(str(state)).inc()
    if state is models.DeliveryState.RETRYING:
        raise errors.TransientError(error)
    return str(state)

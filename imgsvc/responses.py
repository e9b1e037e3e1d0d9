"""What the HTTP answers share: JSON bodies, and whether the caller is a browser."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse


def json(body: dict[str, Any], status_code: int = 200, **kwargs: Any) -> JSONResponse:
    """A JSON answer."""
    return JSONResponse(body, status_code=status_code, **kwargs)


def wants_html(request: Request) -> bool:
    """True for a browser: it asks for HTML before JSON."""
    accept = request.headers.get("accept", "")
    return "text/html" in accept and "application/json" not in accept.split("text/html")[0]

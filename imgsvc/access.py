"""Who is asking: the API key an HTTP request came with, and which requests it sees.

The web app's key middleware puts a ``Caller`` on every request it lets through.
A user key sees only the requests it made; an admin key, and everyone when the service
runs without keys, sees all. A request another key cannot see is answered as if it did
not exist (404), so that its id tells nothing.
"""

from __future__ import annotations

import dataclasses

from starlette.requests import HTTPConnection
from starlette.types import Scope

from imgsvc import config_parsers

_SCOPE_KEY = "imgsvc.caller"


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """The key behind a request: its name (None without keys) and whether it sees all."""

    name: str | None
    admin: bool

    @classmethod
    def of_key(cls, key: config_parsers.ApiKey) -> Caller:
        """The caller that presented this key."""
        return cls(key.name, key.admin)

    @property
    def only_owner(self) -> str | None:
        """The owner whose requests alone this caller sees, or None when it sees all."""
        return None if self.admin else self.name


OPEN = Caller(None, admin=True)  # the service runs without API keys


def put(scope: Scope, caller: Caller) -> None:
    """Record who is asking, for the handlers."""
    scope[_SCOPE_KEY] = caller


def caller_of(connection: HTTPConnection | Scope) -> Caller:
    """Who is asking. Fails (a 500, never an open door) on a request the key middleware
    did not see."""
    scope = connection.scope if isinstance(connection, HTTPConnection) else connection
    caller = scope.get(_SCOPE_KEY)
    if not isinstance(caller, Caller):
        raise RuntimeError("a request reached a handler without passing the API key middleware")
    return caller

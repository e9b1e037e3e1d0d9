"""How a setting is declared: its variables, its parser, and how it is documented.

A ``Parser`` pairs a function, which raises ``ValueError`` on text it does not accept,
with what the error message says was expected and how it quotes the text it got (URLs
without their credentials). A ``Declaration`` adds the variable's names, the topic and
meaning that docs/configuration.md shows, and whether the value is a secret, never
quoted. ``settings`` declares each of its fields with one.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import ipaddress
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from imgsvc import errors

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

MIB = 1024 * 1024


class Refused(ValueError):
    """A value refused with a message that is safe to print: it names the part that is
    wrong (an entry's position) and never quotes a secret."""


@dataclasses.dataclass(frozen=True, slots=True)
class Parser(Generic[T_co]):
    """How a variable's text is read, and how an error about it is worded."""

    parse: Callable[[str], T_co]
    expected: str = "text"
    shown: Callable[[str], str] = repr
    # The value is this many times the number written (MiB settings hold bytes).
    unit: int = 1


@dataclasses.dataclass(frozen=True, slots=True)
class Declaration:
    """How one setting is read from the environment, and how it is documented."""

    names: tuple[str, ...]  # the first one set wins; the first is the usual name
    topic: str
    parser: Parser[object]
    meaning: str
    secret: bool = False  # a malformed value is not quoted in the error
    default_text: str | None = None  # for defaults computed at start-up, like core counts

    def read(self, env: Mapping[str, str]) -> tuple[str, Any] | None:
        """The first of the names that is set and its parsed value, or None when none is.
        A value that does not parse is quoted in the error through the parser's ``shown``,
        or not at all when it is a ``secret``."""
        for name in self.names:
            raw = env.get(name, "").strip()
            if not raw:
                continue
            try:
                return name, self.parser.parse(raw)
            except Refused as exc:
                raise errors.SettingsError(name, str(exc)) from None
            except ValueError:
                quoted = "a value that is not" if self.secret else self.parser.shown(raw)
                raise errors.SettingsError(name, f"expected {self.parser.expected}, got {quoted}") from None
        return None

    def shown_default(self, default: object) -> str:
        """The default as the documentation writes it."""
        if self.default_text is not None:
            return self.default_text
        if default is None:
            return "unset"
        if default in ("", ()):
            return "empty"
        if isinstance(default, bool):
            return f"`{str(default).lower()}`"
        if isinstance(default, float):
            return f"`{default:g}`"
        if isinstance(default, int):
            number = default // self.parser.unit
            mib = f" ({number // MIB} MiB)" if number >= MIB and number % MIB == 0 else ""
            return f"`{number}`{mib}"
        return f"`{default}`"

    def markdown_row(self, default: object) -> str:
        """The setting's row in the documentation: variables, default, meaning."""
        variables = " or ".join(f"`{name}`" for name in self.names)
        return f"| {variables} | {self.shown_default(default)} | {self.meaning} |"


def declare(
    default: T,
    names: str | tuple[str, ...],
    topic: str,
    parser: Parser[T],
    meaning: str,
    *,
    secret: bool = False,
    default_text: str | None = None,
) -> T:
    """A field of a settings dataclass: its default, and its declaration in the metadata."""
    names = (names,) if isinstance(names, str) else names
    declared = Declaration(names, topic, parser, meaning, secret, default_text)
    return dataclasses.field(default=default, metadata={"declaration": declared})


def without_credentials(raw: str) -> str:
    """A URL that did not parse, as it may be printed: nothing before its last "@" but
    a scheme (a user and password, however mangled: urlsplit cannot be trusted to find
    them in a malformed URL), and nothing from its query on (tokens live there)."""
    shown, hidden = raw, False
    if "@" in shown:
        scheme = re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/*", shown)
        shown = (scheme.group(0) if scheme else "") + "…@" + shown.rpartition("@")[2]
        hidden = True
    for mark in "?#":
        if mark in shown:
            shown, hidden = shown.partition(mark)[0], True
    return repr(shown) + (" (credentials and query not shown)" if hidden else "")


def _text(raw: str) -> str:
    return raw


def _prefix(raw: str) -> str:
    return raw.strip("/")


def _positive_int(raw: str) -> int:
    value = int(raw.replace("_", ""))
    if value < 1:
        raise ValueError(raw)
    return value


def _nice_steps(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 19:
        raise ValueError(raw)
    return value


def _quality(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= 100:
        raise ValueError(raw)
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(raw)
    return value


def _mib(raw: str) -> int:
    return MIB * _non_negative_int(raw)


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError(raw)
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:  # NaN too
        raise ValueError(raw)
    return value


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 1:
        raise ValueError(raw)
    return value


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 < value < 65536:
        raise ValueError(raw)
    return value


def _http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(raw)
    return raw


def _db_url(raw: str) -> str:
    if urlsplit(raw).scheme not in ("postgres", "postgresql"):
        raise ValueError(raw)
    return raw


def _webhook_secrets(raw: str) -> tuple[str, ...]:
    secrets = tuple(raw.split())
    for number, secret in enumerate(secrets, 1):
        if secret.startswith("whsec_"):
            try:
                base64.b64decode(secret.removeprefix("whsec_"), validate=True)
            except ValueError:
                raise Refused(
                    f"secret {number} of {len(secrets)} starts with whsec_ but the rest is not base64"
                ) from None
    if len(set(secrets)) != len(secrets):
        raise Refused("the same secret is given twice")
    return secrets


def _networks(raw: str) -> tuple[str, ...]:
    return tuple(
        str(ipaddress.ip_network(part.strip(), strict=False)) for part in raw.split(",") if part.strip()
    )


ADMIN, USER = "admin", "user"
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKey:
    """One entry of IMGSVC_API_KEYS: the name requests are owned by, the key, its role."""

    name: str
    key: str = dataclasses.field(repr=False)
    role: str = USER

    @property
    def admin(self) -> bool:
        """An admin key sees and cancels every request; another, only its own."""
        return self.role == ADMIN


def plain_key_name(key: str) -> str:
    """The name of a key given without one: stable whatever the order of the list, and
    telling nothing useful about the key (8 hex digits of its SHA-256)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def _api_key(entry: str) -> ApiKey:
    """``KEY`` (an admin key, named by its hash), ``NAME:KEY`` (a user key) or
    ``NAME:KEY:ROLE``."""
    parts = entry.split(":")
    if len(parts) == 1:
        return ApiKey(plain_key_name(entry), entry, ADMIN)
    if len(parts) > 3:
        raise Refused("more than two ':' (a key with a name holds none)")
    name, key, role = (*parts, USER) if len(parts) == 2 else parts
    if not _KEY_NAME.fullmatch(name):
        raise Refused("a name is 1 to 64 letters, digits, '.', '_' or '-', and starts with a letter or digit")
    if role not in (ADMIN, USER):
        raise Refused(f"the role must be {ADMIN} or {USER}")
    return ApiKey(name, key, role)


def _api_keys(raw: str) -> tuple[ApiKey, ...]:
    entries = [part.strip() for part in raw.split(",")]
    keys: list[ApiKey] = []
    for number, entry in enumerate(entries, 1):
        if not entry:
            continue
        try:
            key = _api_key(entry)
            if len(key.key) < 16:
                raise Refused("the key is shorter than 16 characters")
            if any(k.key == key.key for k in keys):
                raise Refused("the same key is given twice")
            if any(k.name == key.name for k in keys):
                raise Refused(f"the name {key.name!r} is given twice")
        except Refused as exc:
            form = "KEY, NAME:KEY or NAME:KEY:admin"
            raise Refused(f"entry {number} of {len(entries)}: {exc} ({form}; the key is not shown)") from None
        keys.append(key)
    return tuple(keys)


def _log_format(raw: str) -> str:
    if raw.lower() not in ("text", "json"):
        raise ValueError(raw)
    return raw.lower()


def _output_urls(raw: str) -> str:
    if raw.lower() not in ("public", "presigned"):
        raise ValueError(raw)
    return raw.lower()


# S3 signs a GET for at most 7 days (SigV4).
PRESIGN_MAX_SECONDS = 7 * 24 * 3600


def _presign_seconds(raw: str) -> int:
    value = int(raw.replace("_", ""))
    if not 1 <= value <= PRESIGN_MAX_SECONDS:
        raise ValueError(raw)
    return value


def _level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(raw)
    return level


TEXT = Parser(_text)
PATH = Parser(Path, "a path")
S3_PREFIX = Parser(_prefix)  # "/out/" and "out" are the same folder
PORT = Parser(_port, "a port number from 1 to 65535")
HTTP_URL = Parser(_http_url, "an http(s) URL", shown=without_credentials)
DATABASE_URL = Parser(_db_url, "a postgresql:// URL", shown=without_credentials)
LOG_LEVEL = Parser(_level, "DEBUG, INFO, WARNING or ERROR")
LOG_FORMAT = Parser(_log_format, "text or json")
OUTPUT_URLS = Parser(_output_urls, "public or presigned")
PRESIGN_SECONDS = Parser(
    _presign_seconds, f"a whole number of seconds from 1 to {PRESIGN_MAX_SECONDS} (7 days)"
)
BOOL = Parser(_bool, "true or false")
NETWORKS = Parser(_networks, "comma-separated networks like 10.1.0.0/16")
API_KEYS = Parser(_api_keys, "comma-separated NAME:KEY[:admin] entries or plain keys")
WEBHOOK_SECRETS = Parser(_webhook_secrets, "space-separated secrets: whsec_ and base64, or other text")
COUNT = Parser(_positive_int, "a whole number above 0")
SECONDS = Parser(_positive_float, "a number of seconds above 0")
SECONDS_OR_NONE = Parser(_non_negative_float, "a number of seconds, 0 (none) or more")
MEBIBYTES = Parser(_mib, "a whole number of MiB, 0 (no limit) or more", unit=MIB)
REDIRECTS = Parser(_non_negative_int, "a whole number, 0 or more")
NICE_STEPS = Parser(_nice_steps, "a whole number from 0 to 19")
FRACTION = Parser(_fraction, "a number above 0 and at most 1")
SECONDS_OR_ALWAYS = Parser(_non_negative_int, "a whole number of seconds, 0 (always) or more")
QUALITY = Parser(_quality, "a quality from 1 to 100")
PIXELS_OR_NEVER = Parser(_non_negative_int, "a whole number of pixels, 0 (never) or more")
HOURS = Parser(_non_negative_int, "a whole number of hours, 0 or more")
PIXELS_OR_NO_RULE = Parser(_non_negative_int, "a whole number of pixels, 0 (no such rule) or more")

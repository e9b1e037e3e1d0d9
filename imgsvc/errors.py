"""The project's errors. Library errors are translated into these where the library
is called (``raise ... from exc``); the rest of the code sees only these.

    ImgsvcError
     ├── SettingsError          a bad environment value; stops start-up
     ├── SchemaError            the database is not migrated to this version
     ├── UploadError            a request the API refuses (status_code says how)
     │    └── CsvInvalid        a CSV with line-numbered problems
     ├── PermanentError         one image fails now: retrying cannot help
     │    ├── BlockedAddress    the source resolves to a private network
     │    ├── SourceTooLarge    bytes, pixels or frames over a limit
     │    └── NotAnImage        bytes that no allowed loader reads
     └── TransientError         worth another try later (timeouts, 5xx, 429, S3, DB)
          ├── DatabaseUnavailable
          └── DatabaseConflict  a deadlock or serialization failure, rolled back

A message is what a person reads: it says what was wrong and where (line, column,
URL, limit), never a stack trace or a library's message as-is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imgsvc import responses


class ImgsvcError(Exception):
    """Something went wrong in imgsvc."""

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or "").strip()
        super().__init__(self.message)


class SettingsError(ImgsvcError):
    """A setting in the environment is missing or malformed."""

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        super().__init__(f"{name}: {problem}")


class SchemaError(ImgsvcError):
    """The database schema is not current: run `imgsvc migrate` (or pass --migrate)."""


class UploadError(ImgsvcError):
    """The upload was refused."""

    status_code = 400
    code = "bad_request"

    def __init__(
        self, message: str | None = None, *, status_code: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code
        if code is not None:
            self.code = code

    def body(self) -> responses.Error | responses.CsvError:
        """The body the API answers with."""
        return responses.Error(error=self.code, message=self.message)

    def to_json(self) -> dict[str, Any]:
        """The body as plain JSON values (the browser's error page reads them)."""
        body: dict[str, Any] = responses.to_dict(self.body())
        return body


class CsvInvalid(UploadError):
    """The CSV has problems; nothing was stored."""

    status_code = 422
    code = "invalid_csv"

    def __init__(self, problems: Sequence[dict[str, Any]], total: int) -> None:
        self.problems = list(problems)
        self.total = total
        noun = "problem" if total == 1 else "problems"
        super().__init__(f"The CSV has {total} {noun}; nothing was stored.")

    def body(self) -> responses.CsvError:
        return responses.CsvError(
            error=self.code,
            message=self.message,
            problem_count=self.total,
            problems=[responses.Problem(**problem) for problem in self.problems],
        )


class PermanentError(ImgsvcError):
    """The image cannot be processed, and trying again will not help."""


class BlockedAddress(PermanentError):
    """The source address is in a private, loopback, link-local or reserved network."""


class SourceTooLarge(PermanentError):
    """The source image is over a configured limit."""


class NotAnImage(PermanentError):
    """The source is not an image in a format imgsvc reads."""


class TransientError(ImgsvcError):
    """A temporary failure; the job will be tried again."""


class DatabaseUnavailable(TransientError):
    """The database is not answering."""


class DatabaseConflict(TransientError):
    """The database rolled a statement back over a conflict with another (a deadlock or a
    serialization failure); running it again usually succeeds."""

"""Logging: one line per event, as text or JSON (IMGSVC_LOG_FORMAT=json), with the
request id and image id on every line that concerns them, the process's name on every
line of a worker of several processes, and never a traceback for failures the service
expects and recovers from."""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import json
import logging

import asyncpg
import psycopg
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate.worker import WORKER_NAME

from imgsvc import errors

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
image_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("image_id", default=None)

# Failures the service expects and recovers from: our own errors (a transient failure
# that will be retried), jobs cancelled at shutdown (the image is queued again), and
# lost database connections (the pools reconnect, the worker is started again).
EXPECTED = (
    errors.ImgsvcError,
    asyncio.CancelledError,
    OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InterfaceError,
    psycopg.OperationalError,
    procrastinate_exceptions.ConnectorException,
)


class _Context(logging.Filter):
    """Adds the process's name (if it has one), the current request and image ids, and
    drops tracebacks of expected failures (libraries log them with one; for these the
    message says all an operator needs)."""

    def __init__(self, process: str | None) -> None:
        super().__init__()
        self.process = process

    def filter(self, record: logging.LogRecord) -> bool:
        # Not "process": LogRecord has that already (the pid).
        record.process_name = self.process
        record.request_id = request_id.get()
        record.image_id = image_id.get()
        if record.exc_info and isinstance(record.exc_info[1], EXPECTED):
            record.exc_info = None
            record.exc_text = None
        return True


# What a line says about where it comes from, in this order; JSON names process_name
# "process".
_IDS = ("process_name", "request_id", "image_id")
_FIELDS = {"process_name": "process"}


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [
            f"{_FIELDS.get(name, name)}={value}"
            for name in _IDS
            if (value := getattr(record, name, None)) is not None
        ]
        return f"{line} [{' '.join(ids)}]" if ids else line


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _IDS:
            if (value := getattr(record, name, None)) is not None:
                entry[_FIELDS.get(name, name)] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


# The periodic tasks whose every run procrastinate would report at INFO (deferred,
# started, ended: three lines each 15 s); their own lines say when a run did something.
HOUSEKEEPING_TASKS = frozenset({"maintenance", "prune_jobs"})


class _Housekeeping(logging.Filter):
    """Lowers procrastinate's INFO lines about a housekeeping task's runs to DEBUG, and
    drops them unless DEBUG is on; its warnings and errors pass as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        job = getattr(record, "job", None)
        if (
            record.levelno == logging.INFO
            and record.name.startswith("procrastinate.")
            and isinstance(job, dict)
            and job.get("task_name") in HOUSEKEEPING_TASKS
        ):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_HOUSEKEEPING = _Housekeeping()


def quiet_libraries() -> None:
    """libvips reports every finished thread pool at INFO, a line or two an image;
    procrastinate every run of the maintenance task."""
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    # A worker logs as procrastinate.worker.NAME, "worker" unless it is given a name.
    for name in ("procrastinate.periodic", "procrastinate.worker", f"procrastinate.worker.{WORKER_NAME}"):
        logger = logging.getLogger(name)
        if _HOUSEKEEPING not in logger.filters:
            logger.addFilter(_HOUSEKEEPING)


def configure(level: str, fmt: str, process: str | None = None) -> None:
    """Send every log line to stderr in the chosen format, each naming ``process``
    (``supervisor``, ``worker-2``) if given."""
    handler = logging.StreamHandler()
    handler.addFilter(_HOUSEKEEPING)  # a worker's own child logger too (procrastinate.worker.NAME)
    handler.addFilter(_Context(process))
    if fmt == "json":
        handler.setFormatter(_Json())
    else:
        handler.setFormatter(_Text("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_libraries()
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True

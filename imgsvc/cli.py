"""Command line: `imgsvc serve | worker | migrate | submit | status`.

With DATABASE_URL unset, serve, worker and migrate start a private PostgreSQL in
IMGSVC_DATA_DIR (kept between runs) and stop it on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import uvloop

from imgsvc import __version__, client, cores, errors, localdb, logs, metrics, migrate, settings, supervisor

logger = logging.getLogger("imgsvc")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgsvc", description="Compress product images in bulk.")
    parser.add_argument("--version", action="version", version=f"imgsvc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP API (and a worker, unless --no-worker)")
    serve.add_argument("--no-worker", action="store_true", help="serve the API only")
    serve.add_argument("--migrate", action="store_true", help="apply the schema first")
    worker = commands.add_parser("worker", help="run a standalone worker")
    worker.add_argument("--migrate", action="store_true", help="apply the schema first")
    worker.add_argument(
        "--processes",
        type=_processes,
        default=None,
        metavar="N",
        help="worker processes under one supervisor (default: one per 2 usable cores,"
        f" {supervisor.default_processes(cores.usable_cores())} here)",
    )
    # A supervisor's child: who its parent is, and which of the N it is.
    worker.add_argument("--child-of", type=int, default=None, help=argparse.SUPPRESS)
    worker.add_argument("--slot", type=int, default=1, help=argparse.SUPPRESS)
    migrate_command = commands.add_parser("migrate", help="apply the database schema (idempotent)")
    migrate_command.add_argument(
        "--post",
        action="store_true",
        help="apply procrastinate's post-migrations too: only once no older imgsvc process runs",
    )
    submit = commands.add_parser("submit", help="upload a CSV; with --wait, show its progress to the end")
    submit.add_argument("csv", type=Path, help="the CSV of products and image URLs")
    submit.add_argument("--wait", action="store_true", help="follow the request until it finishes")
    submit.add_argument("--webhook-url", help="a webhook for this request")
    submit.add_argument("--idempotency-key", help="send it again safely: the same key, the same request")
    submit.add_argument(
        "--reprocess", action="store_true", help="compress every image again: reuse no stored result"
    )
    status = commands.add_parser("status", help="show a request's status")
    status.add_argument("request_id")
    status.add_argument("--wait", action="store_true", help="follow the request until it finishes")
    for command in (submit, status):
        command.add_argument(
            "--server",
            default=None,
            help="the imgsvc URL (default: $IMGSVC_SERVER or http://localhost:$PORT)",
        )
        command.add_argument("--api-key", default=None, help="an API key (default: $IMGSVC_API_KEY)")
    return parser


def _processes(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number above 0, got {text!r}")
    return count


def _client(args: argparse.Namespace) -> int:
    """submit and status: talk to a running server; no database or settings needed."""
    url = (
        args.server or os.environ.get("IMGSVC_SERVER") or f"http://localhost:{os.environ.get('PORT', '5000')}"
    )
    server = client.Server(url=url.rstrip("/"), api_key=args.api_key or os.environ.get("IMGSVC_API_KEY"))
    if args.command == "submit":
        if not args.csv.is_file():
            print(f"imgsvc: {args.csv}: no such file", file=sys.stderr)
            return client.ERROR
        return client.run(
            client.submit(
                server,
                args.csv,
                wait=args.wait,
                webhook_url=args.webhook_url,
                idempotency_key=args.idempotency_key,
                reprocess=args.reprocess,
            )
        )
    return client.run(client.show(server, args.request_id, wait=args.wait))


@contextlib.contextmanager
def _database(config: settings.Settings) -> Iterator[str]:
    """The database URL: DATABASE_URL, or a private cluster started for this run."""
    if config.database_url:
        yield config.database_url
        return
    with localdb.running(config.data_dir / "pg") as cluster:
        logger.info("local PostgreSQL: psql %s", cluster.url)
        yield cluster.url


def _serve(config: settings.Settings, url: str, run_worker: bool) -> None:
    import uvicorn

    from imgsvc import web

    app = web.create_app(config, url, run_worker=run_worker)
    print(
        f"imgsvc {__version__} on {config.base_url} (worker: {'yes' if run_worker else 'no'})\n"
        f"  try: curl -F file=@products.csv {config.base_url}/upload\n"
        f"  then: curl {config.base_url}/status/<request_id>",
        flush=True,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level.lower(),
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=30,
        )
    )
    uvloop.run(server.serve())
    if not server.started:
        raise SystemExit(1)


async def _worker(config: settings.Settings, url: str, process: str | None = None, slot: int = 1) -> None:
    """One worker process; ``process`` names it when it is ``slot`` of a supervisor's."""
    from imgsvc import priority, queue, resources

    priority.lower_session_priority(config.worker_session_nice)
    app = queue.create_app(config, url)
    async with resources.opened(config, url) as res, app.open_async():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if config.metrics_port:
            port = config.metrics_port + slot - 1  # worker-1 on the port itself, worker-2 on the next
            metrics.serve_worker(port, config.host, process)
            logger.info("metrics on http://%s:%s/metrics", config.host, port)
        logger.info("worker started (concurrency %s)", config.worker_concurrency)
        await queue.run_worker(app, res, stop)


def _migrate(url: str, *, post: bool) -> None:
    outcome = asyncio.run(migrate.apply(url, post=post))
    if outcome.applied:
        print(f"migrate: applied {', '.join(outcome.applied)}", flush=True)
    elif not outcome.waiting:
        print("migrate: the schema is current", flush=True)
    if outcome.waiting:
        print(
            f"migrate: waiting: procrastinate {', '.join(outcome.waiting)}; run `imgsvc migrate --post` "
            "once every process of the older imgsvc has stopped",
            flush=True,
        )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # uvicorn re-raises the SIGTERM it handled once it has shut down; ending through
    # SystemExit, rather than the default handler, lets the local cluster stop too.
    raise SystemExit(0)


def _supervise(config: settings.Settings, url: str, processes: int) -> int:
    """Run ``processes`` workers under a supervisor until SIGTERM or SIGINT."""
    from imgsvc import priority

    # The session is the supervisor's, and autogroup schedules its children with it.
    priority.lower_session_priority(config.worker_session_nice)
    boss = supervisor.Supervisor(
        lambda slot: supervisor.child_command(processes, slot),
        processes,
        config.shutdown_seconds,
        env={**os.environ, "DATABASE_URL": url},
    )
    return boss.run()


def _process_name(args: argparse.Namespace) -> str | None:
    """How logs and metrics name this process: a supervisor's or its child's name, or none."""
    if args.command != "worker":
        return None
    if args.child_of is not None:
        return supervisor.name(args.slot)
    return supervisor.SUPERVISOR if args.processes != 1 else None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `imgsvc` command."""
    args = _parser().parse_args(argv)
    if args.command in ("submit", "status"):
        raise SystemExit(_client(args))
    if args.command == "worker":
        if args.child_of is not None:
            supervisor.follow_parent(args.child_of)
        if args.processes is None:
            args.processes = supervisor.default_processes(cores.usable_cores())
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        config = settings.from_env()
    except errors.SettingsError as exc:
        print(f"imgsvc: configuration error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    process = _process_name(args)
    logs.configure(config.log_level, config.log_format, process)
    try:
        with _database(config) as url:
            if args.command == "migrate" or getattr(args, "migrate", False):
                _migrate(url, post=getattr(args, "post", False))
            if args.command in ("serve", "worker"):
                asyncio.run(migrate.require_current(url))
            if args.command == "serve":
                _serve(config, url, run_worker=not args.no_worker)
            elif args.command == "worker" and args.child_of is None and args.processes > 1:
                raise SystemExit(_supervise(config, url, args.processes))
            elif args.command == "worker":
                uvloop.run(_worker(supervisor.share(config, args.processes), url, process, args.slot))
    except errors.ImgsvcError as exc:
        print(f"imgsvc: {exc.message}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        pass

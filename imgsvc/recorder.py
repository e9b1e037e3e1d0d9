"""A job's images recorded together: one statement for the images that end close
together.

An image that ends waits a little (``IMGSVC_RECORD_LINGER_SECONDS``) for the job's
others, or less if they all end first; those that end while a statement is in flight
go in the next one. A job whose images end together (a re-sent catalog, answered by
``304``; small images) costs one statement instead of one per image, and a status read
lags the work by at most the linger. Each image still learns whether its own record
finished the request.

An image whose record was not made (the worker stopped, the database failed) is not
finished: its job, or the requeue of an interrupted job, takes it again. The records of
its source and output go in the same statement, so that second time makes the output
again: the same bytes, stored under the same key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from imgsvc import db, finish, models


@dataclasses.dataclass(frozen=True, slots=True)
class Recorded:
    """What recording one image did: how many duplicates ended with it."""

    duplicates: int


class Recorder:
    """Records a job's image endings, in as few statements as the timing allows.

    An ending waits up to ``linger`` seconds for the job's other images to end (none
    waits once the ``expected`` endings are all in, or what is left of the job will not
    end: ``left_out``), then goes with those that came meanwhile."""

    def __init__(
        self, pool: db.Pool, finish_job: tuple[str, str], *, expected: int = 1, linger: float = 0.0
    ) -> None:
        self._pool = pool
        self._finish_job = finish_job
        self._expected = expected
        self._linger = linger
        self._waiting: list[tuple[db.Ending, asyncio.Future[Recorded]]] = []
        self._since: float | None = None  # when the oldest waiting ending came
        self._all_in = asyncio.Event()
        self._lock = asyncio.Lock()
        self.statements = 0  # statements sent, for the tests and the profile
        self._count(0)

    def left_out(self) -> None:
        """One expected image will not end in this job (it is retried later)."""
        self._count(-1)

    def _count(self, change: int) -> None:
        self._expected += change
        if self._expected <= 0:
            self._all_in.set()

    async def record(self, ending: db.Ending) -> Recorded:
        """Record ``ending`` (with any others that end meanwhile); raise what the database
        raised if the statement that carried it failed."""
        loop = asyncio.get_running_loop()
        mine: asyncio.Future[Recorded] = loop.create_future()
        self._waiting.append((ending, mine))
        if self._since is None:
            self._since = loop.time()
        self._count(-1)
        try:
            wait = self._since + self._linger - loop.time()
            if wait > 0 and not self._all_in.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._all_in.wait(), wait)
            async with self._lock:
                if not mine.done():
                    await self._flush(mine)
        except asyncio.CancelledError:
            self._waiting = [(e, f) for e, f in self._waiting if f is not mine]
            if mine.done() and not mine.cancelled():
                mine.exception()  # taken: nobody waits for it any more
            raise
        return mine.result()

    async def _flush(self, mine: asyncio.Future[Recorded]) -> None:
        batch, self._waiting, self._since = self._waiting, [], None
        self.statements += 1
        try:
            recorded = await db.record_images(
                self._pool, [ending for ending, _ in batch], finish_job=self._finish_job
            )
        except asyncio.CancelledError:
            # This image's task was cancelled; the others in the batch were not, and
            # wait: they go in the next statement (recording is idempotent).
            self._waiting[:0] = [(e, f) for e, f in batch if f is not mine and not f.done()]
            raise
        except Exception as exc:
            for _, future in batch:
                future.set_exception(exc)
            return
        if recorded.status is not None:
            finish.announce(batch[0][0].task.request_id, models.RequestStatus(recorded.status))
        for ending, future in batch:
            future.set_result(Recorded(duplicates=recorded.duplicates[ending.task.image_id]))

"""A job's images recorded together: one statement for the images that end while the
previous statement runs.

The first image of a job to end is recorded at once; those that end while its
statement is in flight wait for it and then go in the next one, together. Nothing
waits for a timer: a lone image is recorded as soon as it ends, and a job whose images
end together (a re-sent catalog, answered by ``304``) costs a statement or two instead
of one per image. Each image still learns whether its own record finished the request.

An image whose record was not made (the worker stopped, the database failed) is not
finished: its job, or the requeue of an interrupted job, takes it again, and the stored
results it made answer that second time (``reuse``).
"""

from __future__ import annotations

import asyncio
import dataclasses

from imgsvc import db, finish, models


@dataclasses.dataclass(frozen=True, slots=True)
class Recorded:
    """What recording one image did: how many duplicates ended with it."""

    duplicates: int


class Recorder:
    """Records a job's image endings, in as few statements as the timing allows."""

    def __init__(self, pool: db.Pool, finish_job: tuple[str, str]) -> None:
        self._pool = pool
        self._finish_job = finish_job
        self._waiting: list[tuple[db.Ending, asyncio.Future[Recorded]]] = []
        self._lock = asyncio.Lock()
        self.statements = 0  # statements sent, for the tests and the profile

    async def record(self, ending: db.Ending) -> Recorded:
        """Record ``ending`` (with any others that end meanwhile); raise what the database
        raised if the statement that carried it failed."""
        mine: asyncio.Future[Recorded] = asyncio.get_running_loop().create_future()
        self._waiting.append((ending, mine))
        try:
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
        batch, self._waiting = self._waiting, []
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

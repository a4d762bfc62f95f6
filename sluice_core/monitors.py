"""Monitors: conclusions Sluice draws from silence (docs/architecture.md).

A killed worker sends nothing: its heartbeats just stop, and the jobs it was
running stay ``active`` forever unless someone decides otherwise. The worker
monitor decides: a worker whose heartbeat is overdue goes offline, and the
jobs it held become ``lost``. Both conclusions are recorded as ordinary
events through the pipeline, so they are stored, folded and streamed like any
other, and a job that later turns out to have finished still completes (a
later-stamped terminal event wins, see sluice_core.merge).

Silence counts only while Sluice listened: a heartbeat sent while Sluice was
stopped, or while a source was reconnecting, was not missed by the worker but by
Sluice. After a start or a reconnect every worker gets a whole window from then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from sluice_core.model import JobEvent, JobState, Worker, WorkerEvent, event_id
from sluice_core.sources import Sink
from sluice_core.storage import MAX_PAGE, JobQuery, Storage

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_FREQ = 2.0  # Celery's default, for workers that did not say
HELD_STATES = frozenset({JobState.RECEIVED, JobState.ACTIVE, JobState.SCHEDULED})


def sends_task_events(worker: Worker, named_by_jobs: bool) -> bool | None:
    """Whether a worker's task events reach Sluice (docs/architecture.md).

    True when some stored job names the worker. False when its heartbeats say it
    ran jobs (``processed``, ``active``) yet no job names it: it runs without
    ``-E``. None when it cannot be told yet (an idle worker sends no task events
    either way).
    """
    if named_by_jobs:
        return True
    if worker.processed or worker.active:
        return False
    return None


async def workers_task_events(storage: Storage) -> list[tuple[Worker, bool | None]]:
    """Every worker, with :func:`sends_task_events` for it."""
    workers = await storage.list_workers()
    named = await storage.job_workers([worker.hostname for worker in workers]) if workers else set()
    return [(worker, sends_task_events(worker, worker.hostname in named)) for worker in workers]


class WorkerMonitor:
    """Marks workers offline after ``missed`` heartbeat intervals, and their jobs lost.

    A worker that stopped cleanly (worker-offline) and still holds jobs once the
    same deadline has passed left them unfinished too: they become lost as well.
    ``clock`` gives epoch seconds (tests drive it from trio's clock).
    ``listening_since`` gives the epoch seconds since which Sluice has heard its
    sources without a break, or None while one is down: nothing is concluded then.
    """

    def __init__(
        self,
        storage: Storage,
        sink: Sink,
        *,
        missed: float = 3.0,
        interval: float = 1.0,
        clock: Callable[[], float] = time.time,
        listening_since: Callable[[], float | None] = lambda: 0.0,
    ) -> None:
        self._storage = storage
        self._sink = sink
        self.missed = missed
        self.interval = interval
        self._clock = clock
        self._listening_since = listening_since
        # The last heartbeat each worker's silence was concluded on: one
        # conclusion per silence, not one query per worker at every round.
        self._settled: dict[str, float] = {}

    async def run(self) -> None:
        while True:
            try:
                await self.check(self._clock())
            except Exception as exc:  # the database may be away: try again next round
                log.warning("worker monitor: %s", exc)
            await trio.sleep(self.interval)

    async def check(self, now: float) -> int:
        """Conclude what the silence up to ``now`` means; return how many workers went offline."""
        gone = 0
        since = self._listening_since()
        if since is None:
            return 0  # a source is down: the silence now is Sluice's, not the workers'
        for worker in await self._storage.list_workers():
            if worker.last_heartbeat is None:
                continue  # known only from its answer to a control command: nothing to time
            if self._settled.get(worker.hostname) == worker.last_heartbeat:
                continue
            freq = worker.freq or DEFAULT_HEARTBEAT_FREQ
            heard = max(worker.last_heartbeat, since)
            # Also the grace a clean stop gets: events the worker sent just before
            # its worker-offline (batched in task.multi) may still be on their way.
            deadline = heard + freq * self.missed
            if now < deadline:
                continue
            if worker.status == "online":
                gone += 1
                reason = (
                    f"no heartbeat from {worker.hostname} for {now - heard:.0f}s while Sluice"
                    f" listened (expected every {freq:g}s): the worker process died or lost"
                    " its broker"
                )
                log.warning("worker %s is offline: %s", worker.hostname, reason)
                offline = [
                    WorkerEvent(
                        hostname=worker.hostname,
                        framework=worker.framework,
                        type="offline",
                        timestamp=deadline,
                        extra={"reason": reason},
                    )
                ]
            else:
                reason = (
                    f"{worker.hostname} stopped (worker-offline) without finishing it;"
                    " the broker may deliver it again if it was not acknowledged"
                )
                offline = []
            # Stamped at the deadline, not at ``now``: the same silence gives the
            # same event ids, so two agents do not record it twice.
            lost = await self._held_jobs_lost(worker.hostname, worker.framework, deadline, reason)
            if lost or offline:
                self._sink.put_events(lost, offline)
            self._settled[worker.hostname] = worker.last_heartbeat
        return gone

    async def _held_jobs_lost(
        self, hostname: str, framework: str, at: float, reason: str
    ) -> list[JobEvent]:
        events: list[JobEvent] = []
        cursor = None
        while True:
            page = await self._storage.list_jobs(
                JobQuery(worker=hostname, states=HELD_STATES, limit=MAX_PAGE, cursor=cursor)
            )
            for job in page.jobs:
                events.append(
                    JobEvent(
                        id=event_id(job.id, "lost", hostname, at),
                        job_id=job.id,
                        framework=framework,
                        type="sluice-lost",
                        state=JobState.LOST,
                        timestamp=max(at, job.updated_at or at),
                        worker=hostname,
                        fields={"exception": f"WorkerLost: {reason}"},
                    )
                )
            if page.next_cursor is None:
                return events
            cursor = page.next_cursor

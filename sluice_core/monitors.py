"""Monitors: conclusions Sluice draws from silence (docs/architecture.md).

A killed worker sends nothing: its heartbeats just stop, and the jobs it was
running stay ``active`` forever unless someone decides otherwise. The worker
monitor decides: a worker whose heartbeat is overdue goes offline; the jobs it
had started become ``lost``, and those it held unstarted (prefetched, or waiting
for their ETA) ``redelivering``: the broker gives their unacknowledged messages
back, and the monitor says when. The conclusions are recorded as ordinary
events through the pipeline, so they are stored, folded and streamed like any
other; a job that later turns out to have finished still completes, and one
that another worker receives resumes (see sluice_core.merge).

Workers without task events (started without ``-E``) take jobs unseen: a job
known from its task-sent that has left its queue (the probes' depth says so)
with no worker saying it took it becomes ``unknown``, with the reason and the fix,
instead of ``queued`` (and stuck) forever.

Silence counts only while Sluice listened: a heartbeat sent while Sluice was
stopped, or while a source was reconnecting, was not missed by the worker but by
Sluice. After a start or a reconnect every worker gets a whole window from then.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

import attrs
import trio

from sluice_core.frameworks import Frameworks
from sluice_core.merge import HELD_STATES, LOST_EVENT, REDELIVERY_EVENT, UNSEEN_EVENT
from sluice_core.model import Job, JobEvent, JobState, Worker, WorkerEvent, event_id
from sluice_core.sources import Sink
from sluice_core.storage import MAX_PAGE, JobQuery, Storage

log = logging.getLogger(__name__)

# Seconds between looks for jobs taken unseen: the probes' default interval (reading the
# queues' latest depths also computes their rates).
UNSEEN_INTERVAL = 5.0
# Queued jobs read per queue and look: a longer backlog has its oldest jobs judged as it
# drains (they stay queued meanwhile).
UNSEEN_SCAN = 10 * MAX_PAGE


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


async def workers_task_events(
    storage: Storage, workers: list[Worker] | None = None
) -> list[tuple[Worker, bool | None]]:
    """Every worker (or those given), with :func:`sends_task_events` for it."""
    if workers is None:
        workers = await storage.list_workers()
    named = await storage.job_workers([worker.hostname for worker in workers]) if workers else set()
    return [(worker, sends_task_events(worker, worker.hostname in named)) for worker in workers]


class WorkerMonitor:
    """Marks workers offline after ``missed`` heartbeat intervals, their started jobs
    lost and their unstarted ones redelivering; and jobs taken unseen, unknown.

    A worker that stopped cleanly (worker-offline) and still holds jobs once the
    same deadline has passed left them unfinished too: the same conclusions apply.
    ``clock`` gives epoch seconds (tests drive it from trio's clock).
    ``listening_since`` gives the epoch seconds since which Sluice has heard its
    sources without a break, or None while one is down: nothing is concluded then.
    ``frameworks`` say what the frameworks' plugins know: heartbeat intervals, the
    fix for workers without job events, when a broker gives back a dead worker's job.
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
        frameworks: Frameworks | None = None,
    ) -> None:
        self._storage = storage
        self._sink = sink
        self.missed = missed
        self.interval = interval
        self._clock = clock
        self._listening_since = listening_since
        self.frameworks = frameworks or Frameworks()
        # The last heartbeat each worker's silence was concluded on: one
        # conclusion per silence, not one query per worker at every round.
        self._settled: dict[str, float] = {}
        self._unseen_at = float("-inf")  # when jobs taken unseen were last looked for
        # The ``now`` of the last check that judged every worker (all sources heard):
        # silence up to then has been concluded on. None before the first.
        self.judged_until: float | None = None

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
        workers = await self._storage.list_workers()
        if now - self._unseen_at >= UNSEEN_INTERVAL:
            self._unseen_at = now
            unseen = await self._unseen_jobs(workers)
            if unseen:
                self._sink.put_events(unseen, [])
        for worker in workers:
            if worker.last_heartbeat is None:
                continue  # known only from its answer to a control command: nothing to time
            if self._settled.get(worker.hostname) == worker.last_heartbeat:
                continue
            freq = worker.freq or self.frameworks.get(worker.framework).heartbeat_s
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
                reason = f"{worker.hostname} stopped (worker-offline) without finishing it"
                offline = []
            # Stamped at the deadline, not at ``now``: the same silence gives the
            # same event ids, so two agents do not record it twice.
            held = [
                self._held_job_concluded(job, worker, deadline, reason)
                async for job in self._jobs(JobQuery(worker=worker.hostname, states=HELD_STATES))
            ]
            if held or offline:
                self._sink.put_events(held, offline)
            self._settled[worker.hostname] = worker.last_heartbeat
        self.judged_until = now
        return gone

    def _held_job_concluded(self, job: Job, worker: Worker, at: float, reason: str) -> JobEvent:
        """A job its worker held when it went: lost if started, else redelivering."""
        framework = self.frameworks.get(job.framework)
        comes_back = framework.redelivery(
            job.extra.get("broker"), job.received_at, stopped=worker.status != "online"
        )
        if job.state is JobState.ACTIVE:
            kind, state = LOST_EVENT, JobState.LOST
            why = f"WorkerLost: {reason}. It had started: it is lost"
            if framework.started_redelivered_if is not None:
                why += f", unless {framework.started_redelivered_if}, and then {comes_back}"
        else:
            kind, state = REDELIVERY_EVENT, JobState.REDELIVERING
            why = (
                f"WorkerLost: {reason}. It had not started: {comes_back}, and it resumes"
                " when a worker receives it"
            )
        return JobEvent(
            id=event_id(job.id, kind, worker.hostname, at),
            job_id=job.id,
            framework=worker.framework,
            type=kind,
            state=state,
            timestamp=max(at, job.updated_at or at),
            worker=worker.hostname,
            # The attempt judged: the conclusion applies to it only (sluice_core.merge).
            fields={"exception": why, "retries": job.retries},
        )

    async def _unseen_jobs(self, workers: list[Worker]) -> list[JobEvent]:
        """Queued jobs that left a queue consumed by workers without task events.

        A queue holds at most ``depth`` of the jobs queued on it when its probe
        sampled it, the newest (queues are first in, first out); the older ones were
        taken, and since no worker said it received them, by a worker Sluice cannot
        see: one that consumes the queue and was alive after the job was sent (it may have
        stopped since). Jobs published without task-sent hold places too, so this
        errs towards leaving jobs queued.
        """
        takers: dict[str, list[Worker]] = defaultdict(list)
        for worker, sends in await workers_task_events(self._storage, workers):
            if sends is False:
                for queue in worker.queues or ():
                    takers[queue].append(worker)
        if not takers:
            return []
        depth: dict[str, int] = defaultdict(int)
        sampled: dict[str, float] = {}
        for stats in await self._storage.list_queues(self._clock()):
            if stats.name in takers:
                if stats.depth is None or stats.updated_at is None:
                    takers.pop(stats.name)  # a broker that cannot tell: conclude nothing
                    continue
                depth[stats.name] += stats.depth
                sampled[stats.name] = min(sampled.get(stats.name, stats.updated_at),
                                          stats.updated_at)
        events = []
        for name, at in sampled.items():
            if name not in takers:
                continue
            places = depth[name]
            queued = JobQuery(queue=name, states=frozenset({JobState.QUEUED}))
            async for job in self._jobs(queued, at_most=UNSEEN_SCAN):
                if places > 0:
                    places -= 1
                    continue
                sent = job.sent_at
                if sent is None or sent >= at:
                    continue
                blind = sorted(
                    w.hostname for w in takers[name] if (w.last_heartbeat or 0.0) >= sent
                )
                if not blind:
                    continue  # none was alive since: purged, or taken by someone unknown
                why = (
                    f"Unseen: taken from queue {name} and never seen received: its consumers"
                    f" ({', '.join(blind)}) send no task events, so Sluice cannot see it run"
                    f" or end. To see it:"
                    f" {self.frameworks.get(job.framework).job_events_advice}"
                )
                events.append(
                    JobEvent(
                        # One conclusion per attempt, whichever sample showed it.
                        id=event_id(job.id, UNSEEN_EVENT, job.retries),
                        job_id=job.id,
                        framework=job.framework,
                        type=UNSEEN_EVENT,
                        state=JobState.UNKNOWN,
                        timestamp=max(at, job.updated_at or at),
                        fields={"exception": why, "retries": job.retries},
                    )
                )
        return events

    async def _jobs(self, query: JobQuery, at_most: int | None = None) -> AsyncIterator[Job]:
        """The jobs the query matches (every one, or the first ``at_most``), newest first,
        page by page."""
        cursor = None
        left = at_most
        while left is None or left > 0:
            limit = MAX_PAGE if left is None else min(MAX_PAGE, left)
            page = await self._storage.list_jobs(attrs.evolve(query, limit=limit, cursor=cursor))
            for job in page.jobs:
                yield job
            if page.next_cursor is None:
                return
            if left is not None:
                left -= len(page.jobs)
            cursor = page.next_cursor

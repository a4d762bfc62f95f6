"""Reconciling a gap on one Celery broker: ask the workers, then the result backend.

:class:`CeleryReconciler` is what the core's gap watch (:mod:`sluice_core.reconcile`)
calls once a broker is heard again after a gap. It asks every worker through the
mailbox (:mod:`sluice_celery.control`; the replies' shapes are Celery's
``celery/worker/control.py``, see docs/celery-protocol.md section 5):

- ``active`` (``safe``: the argument reprs): ``{worker: [request info]}``, a request's
  info being ``{"id", "name", "args", "kwargs", "type", "hostname", "time_start",
  "acknowledged", "delivery_info", "worker_pid"}``: the job is active on that worker,
  since ``time_start``;
- ``reserved``: ``{worker: [request info]}`` (args and kwargs as values): received;
- ``scheduled``: ``{worker: [{"eta", "priority", "request": request info}]}``: scheduled
  for ``eta``. Scheduled later than an open job's stored start, it is a retry the gap
  hid, and the job's next attempt;
- ``revoked``: ``{worker: [job id]}``: an open job among them was revoked;
- ``query_task`` (``{"ids": [...]}``) for jobs first seen mid-life:
  ``{worker: {id: [state, request info]}}``, which names them.

On Redis, a queued job whose message still waits in its queue's lists (a queue of at
most ``WAITING_SCAN`` messages: a longer one is not read) is still queued: nothing
happened to it. RabbitMQ lets no one read a queue without taking its messages.

An open job no worker holds may have finished in the gap: the result backend, if
given (``--result-backend``), has its outcome, stamped at its ``date_done`` and
marked ``extra["outcome_from"]``; it also has the outcomes of jobs sent and finished
within the gap, which Sluice never saw. What neither tells, the core marks unknown.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import orjson
import redis

from sluice_celery.control import Mailbox, NoListener, RedisClient
from sluice_celery.events import FRAMEWORK, SOURCE_PREFIX
from sluice_celery.redis_probe import PRIORITY_SUFFIXES
from sluice_celery.result_backend import Outcome, ResultBackend, epoch
from sluice_core.actions import BROKER
from sluice_core.model import Job, JobEvent, JobState, event_id
from sluice_core.reconcile import Known, Reconciled
from sluice_core.storage import Gap

log = logging.getLogger(__name__)

# The events' extra: where an outcome came from (and, by sluice_core.actions.BROKER,
# which broker's workers said it, as the normalizer records a broker's own events).
OUTCOME_FROM = "outcome_from"
# query_task's states (celery/worker/control.py, _state_of_task); "ready" is finishing.
_QUERIED_STATES = {
    "active": JobState.ACTIVE,
    "reserved": JobState.RECEIVED,
    "scheduled": JobState.SCHEDULED,
}
# Messages of one queue looked through for the jobs still waiting in it (a longer
# queue is not read: its queued jobs stay unknowable), and per LRANGE.
WAITING_SCAN = 100_000
WAITING_CHUNK = 2_000

# Which of these jobs ({job id: its queue}) still wait in their queue.
Waiting = Callable[[dict[str, str]], Awaitable[set[str]]]


@attrs.frozen
class Held:
    """A job a worker says it holds."""

    job_id: str
    state: JobState  # ACTIVE, RECEIVED or SCHEDULED
    worker: str
    info: dict[str, Any]  # the request's info
    eta: str | None = None


class CeleryReconciler:
    """The reconciler of one broker's source."""

    def __init__(
        self,
        broker: str,
        mailbox: Mailbox,
        backend: ResultBackend | None,
        *,
        sole: bool,
        waiting: Waiting | None = None,
    ) -> None:
        """``broker``: its URL without credentials (what the normalizer records);
        ``sole``: it is the only broker, so jobs whose broker no event named are its own;
        ``waiting``: how to tell the jobs still in their queue (None: the broker cannot)."""
        self.broker = broker
        self.source = SOURCE_PREFIX + broker
        self.mailbox = mailbox
        self.backend = backend
        self._sole = sole
        self._waiting = waiting

    def owns(self, job: Job) -> bool:
        if job.framework != FRAMEWORK:
            return False
        broker = job.extra.get(BROKER)
        return broker == self.broker or (broker is None and self._sole)

    async def reconcile(
        self, gap: Gap, open_jobs: list[Job], mid_life: list[Job], known: Known
    ) -> Reconciled:
        out = Reconciled()
        now = time.time()
        held, revoked = await self._ask()
        jobs = {job.id: job for job in open_jobs}
        for item in held.values():
            job = jobs.get(item.job_id)
            if (
                job is not None
                and item.state is JobState.SCHEDULED
                and _retried(job, item.eta)
            ):
                out.events.append(self._retried(job, gap))
                out.counts["retried"] += 1
            out.events.append(self._held(item, now))
            out.settled.add(item.job_id)
            out.counts[str(item.state)] += 1
        for job in open_jobs:
            if job.id in revoked and job.id not in held:
                out.events.append(self._event(job.id, "sluice-revoked", JobState.REVOKED, now))
                out.settled.add(job.id)
                out.counts["revoked"] += 1
        if self._waiting is not None:
            queued = {
                job.id: job.queue
                for job in open_jobs
                if job.state is JobState.QUEUED and job.queue and job.id not in out.settled
            }
            still = await self._waiting(queued) if queued else set()
            out.settled |= still
            if still:
                out.counts["still queued"] += len(still)
        unnamed = [job.id for job in mid_life if job.id not in held]
        if unnamed:
            for event in await self._query(unnamed, now):
                out.events.append(event)
                out.counts["named (query_task)"] += 1
        if self.backend is not None:
            open_ids = [job.id for job in open_jobs if job.id not in out.settled]
            await self._outcomes(gap, open_ids, unnamed, known, out)
        return out

    async def _ask(self) -> tuple[dict[str, Held], set[str]]:
        """What the workers hold, by job id, and the ids they have revoked."""
        try:
            active = await self.mailbox.request("active", {"safe": True})
            reserved = await self.mailbox.request("reserved")
            scheduled = await self.mailbox.request("scheduled")
            revoked = await self.mailbox.request("revoked")
        except NoListener:
            return {}, set()  # no worker at all: none holds anything
        held: dict[str, Held] = {}
        for state, replies in ((JobState.RECEIVED, reserved), (JobState.ACTIVE, active)):
            for worker, infos in replies.items():
                for info in infos if isinstance(infos, list) else ():
                    if isinstance(info, dict) and isinstance(info.get("id"), str):
                        held[info["id"]] = Held(info["id"], state, worker, info)
        for worker, entries in scheduled.items():
            for entry in entries if isinstance(entries, list) else ():
                info = entry.get("request") if isinstance(entry, dict) else None
                if isinstance(info, dict) and isinstance(info.get("id"), str):
                    eta = entry.get("eta")
                    held.setdefault(
                        info["id"],
                        Held(info["id"], JobState.SCHEDULED, worker, info,
                             eta if isinstance(eta, str) else None),
                    )
        ids = {
            job_id
            for listed in revoked.values() if isinstance(listed, list)
            for job_id in listed if isinstance(job_id, str)
        }
        return held, ids

    async def _query(self, job_ids: list[str], now: float) -> list[JobEvent]:
        """Events naming jobs first seen mid-life, from their workers' ``query_task``."""
        try:
            replies = await self.mailbox.request("query_task", {"ids": job_ids})
        except NoListener:
            return []
        events = []
        for worker, found in replies.items():
            for job_id, answer in (found.items() if isinstance(found, dict) else ()):
                if not (isinstance(answer, list) and len(answer) == 2):
                    continue
                state, info = answer
                if isinstance(info, dict):
                    held_state = _QUERIED_STATES.get(state) if isinstance(state, str) else None
                    if held_state is not None:
                        events.append(self._held(Held(job_id, held_state, worker, info), now))
                    else:  # finishing: its name and arguments only
                        events.append(
                            self._event(job_id, "sluice-query-task", None, now, worker,
                                        _call_fields(info))
                        )
        return events

    async def _outcomes(
        self, gap: Gap, open_ids: list[str], unnamed: list[str], known: Known, out: Reconciled
    ) -> None:
        assert self.backend is not None
        found = await self.backend.outcomes([*open_ids, *unnamed])
        for job_id in open_ids:
            if (done := found.get(job_id)) is not None:
                out.events.append(self._outcome(done))
                out.settled.add(job_id)
                out.counts[f"{done.state} (result backend)"] += 1
        for job_id in unnamed:
            if (done := found.get(job_id)) is not None and job_id not in out.settled:
                out.events.append(self._outcome(done))
        # Jobs sent and finished within the gap: Sluice never saw them.
        finished = await self.backend.finished_between(gap.started_at, gap.ended_at)
        stored = await known([done.job_id for done in finished])
        unseen = [done for done in finished if done.job_id not in stored]
        for done in unseen:
            out.events.append(self._outcome(done))
        if unseen:
            out.counts["unseen, finished (result backend)"] += len(unseen)

    def _held(self, item: Held, now: float) -> JobEvent:
        """A job a worker holds is in that state on that worker: active since it started."""
        fields = _call_fields(item.info)
        timestamp = now
        if item.state is JobState.ACTIVE:
            started = item.info.get("time_start")
            if isinstance(started, int | float) and started > 0:
                timestamp = float(started)
        elif item.state is JobState.SCHEDULED and item.eta is not None:
            fields["eta"] = item.eta
        return JobEvent(
            # The same answer gives the same id, whoever asked, whenever.
            id=event_id(item.job_id, "reconciled", item.state, item.worker,
                        item.info.get("time_start"), item.eta),
            job_id=item.job_id,
            framework=FRAMEWORK,
            type=f"sluice-{item.state}",
            state=item.state,
            timestamp=timestamp,
            worker=item.worker,
            fields=fields,
            extra={BROKER: self.broker},
        )

    def _retried(self, job: Job, gap: Gap) -> JobEvent:
        """A retry the gap hid opens the job's next attempt (see sluice_core.merge)."""
        return JobEvent(
            id=event_id(job.id, "retried", job.retries, gap.source, gap.ended_at),
            job_id=job.id,
            framework=FRAMEWORK,
            type="sluice-retried",
            state=JobState.RETRYING,
            timestamp=gap.ended_at,
            worker=job.worker,
        )

    def _outcome(self, done: Outcome) -> JobEvent:
        fields: dict[str, Any] = {
            "name": done.name,
            "args": done.args,
            "kwargs": done.kwargs,
            "queue": done.queue,
            "result": done.result,
            "exception": done.exception,
            "traceback": done.traceback,
        }
        return JobEvent(
            id=event_id(done.job_id, "result-backend", done.state, done.finished_at),
            job_id=done.job_id,
            framework=FRAMEWORK,
            type="sluice-result-backend",
            state=done.state,
            timestamp=done.finished_at,
            worker=done.worker,
            fields={key: value for key, value in fields.items() if value is not None},
            extra={OUTCOME_FROM: f"result backend {self.backend.url if self.backend else ''}"},
        )

    def _event(
        self,
        job_id: str,
        kind: str,
        state: JobState | None,
        now: float,
        worker: str | None = None,
        fields: dict[str, Any] | None = None,
    ) -> JobEvent:
        return JobEvent(
            id=event_id(job_id, kind, worker),
            job_id=job_id,
            framework=FRAMEWORK,
            type=kind,
            state=state,
            timestamp=now,
            worker=worker,
            fields=fields or {},
            extra={BROKER: self.broker},
        )

    async def aclose(self) -> None:
        await self.mailbox.aclose()
        if self.backend is not None:
            await self.backend.aclose()


def _retried(job: Job, eta: str | None) -> bool:
    """Whether a job stored as started and now scheduled (for ``eta``) is a retry: it
    runs again later than it started. (A redelivered job keeps its first ETA.)"""
    if job.state is not JobState.ACTIVE or job.started_at is None or eta is None:
        return False
    when = epoch(eta)
    return when is not None and when > job.started_at


def _call_fields(info: dict[str, Any]) -> dict[str, Any]:
    """The name and arguments in a request's info, as the events carry them (reprs)."""
    fields: dict[str, Any] = {}
    if isinstance(info.get("name"), str):
        fields["name"] = info["name"]
    args, kwargs = info.get("args"), info.get("kwargs")
    if isinstance(args, str):  # ``active`` with safe: Celery's own reprs
        fields["args"] = args
    elif isinstance(args, list):
        fields["args"] = repr(tuple(args))
    if isinstance(kwargs, str):
        fields["kwargs"] = kwargs
    elif isinstance(kwargs, dict):
        fields["kwargs"] = repr(kwargs)
    return fields


async def waiting_in_redis(client: RedisClient, queued: dict[str, str]) -> set[str]:
    """The jobs among ``queued`` ({job id: its queue}) whose message still waits in the
    queue's Redis lists (kombu's: one per priority step, after the ``global_keyprefix``)."""
    by_queue: defaultdict[str, set[str]] = defaultdict(set)
    for job_id, queue in queued.items():
        by_queue[queue].add(job_id)

    def look(r: redis.Redis) -> set[str]:
        found: set[str] = set()
        for queue, ids in by_queue.items():
            keys = [f"{client.keyprefix}{queue}{suffix}" for suffix in PRIORITY_SUFFIXES]
            lengths = [int(r.llen(key)) for key in keys]
            if sum(lengths) > WAITING_SCAN:
                continue
            for key, length in zip(keys, lengths, strict=True):
                for start in range(0, length, WAITING_CHUNK):
                    for raw in r.lrange(key, start, start + WAITING_CHUNK - 1):
                        job_id = _message_id(raw)
                        if job_id in ids:
                            found.add(job_id)
        return found

    return await client.call(look)


def _message_id(raw: Any) -> str | None:
    """The job id in the headers of a kombu envelope (task protocol 2)."""
    try:
        envelope = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    headers = envelope.get("headers") if isinstance(envelope, dict) else None
    job_id = headers.get("id") if isinstance(headers, dict) else None
    return job_id if isinstance(job_id, str) else None

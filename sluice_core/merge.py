"""Folding a job's events into its row: the row is a pure function of its events.

Events arrive late, twice and out of order, yet the row must be a pure
function of the *set* of a job's events. The fold therefore never looks at
arrival order: it applies events sorted by ``(timestamp, id)`` and decides the
state by precedence, not by which event came last.

Precedence is ``(attempt, rank)``. ``attempt`` is the retry count Celery
stamps on sent/received events. Events that carry none (started, succeeded,
failed...) belong to the run after as many retries as the fold has seen
task-retried events: the n-th task-retried ends attempt n-1 and opens attempt
n at the lowest rank, so that attempt's own queued/received events take over
when they come. Counting retries, rather than trusting the last received
event, matters because the worker's processes stamp events on their own: a
run's task-started can be stamped after the next attempt's task-received (seen
on real workers). Within an attempt the state only moves forward, so a late,
earlier-stamped event can never undo a terminal state.

One happening may be reported by several sources: the broker's event stream
Sluice reads, the SDK inside the application, a remote agent. Their reports of
it differ in stamp, clock and process, hence in id, so :func:`timeline` folds
them into one event first (the rule is on :func:`timeline`); the row and the
timeline shown are built from its result.

Within an attempt, a job may be delivered more than once: the broker gives a
message back when the worker that took it died before acknowledging it (Redis
after its visibility timeout, RabbitMQ when the connection closes). Precedence
is therefore ``(attempt, delivery, rank)``. Sluice's conclusion that a worker
died holding the job (:data:`LOST_EVENT`, :data:`REDELIVERY_EVENT`, from
sluice_core.monitors) ends the delivery and opens the next at the lowest rank,
the way task-retried opens the next attempt, so the next task-received takes
over and the job resumes. A task-received after a lost state, or from another
worker while one was running the job, is such a redelivery too (the broker
was quicker than the conclusion). A conclusion applies only to what it
judged: a row still held by the worker it names, in the state and attempt it
saw; otherwise it stays on the timeline and moves nothing (the job finished,
or another worker already had it).

Storage applies new events directly when they all sort after the row's fold
position and come from the one source the row was built from (the common case,
see :func:`applies_in_order`; the row keeps its sources in ``fold_sources``), and
otherwise re-folds the job's whole stored history with :func:`rebuild`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import attrs

from sluice_core.actions import PUSHED_BY
from sluice_core.model import TERMINAL_STATES, Job, JobEvent, JobState

_RANK: dict[JobState, int] = {
    JobState.RETRYING: -1,  # opens the next attempt, below its queued event
    JobState.REDELIVERING: -1,  # opens the next delivery, below its received event
    JobState.QUEUED: 0,
    JobState.SCHEDULED: 1,
    JobState.UNKNOWN: 1,  # taken from its queue unseen: above queued, below any sighting
    JobState.RECEIVED: 2,
    JobState.ACTIVE: 3,
    **{state: 4 for state in TERMINAL_STATES},
}

# Sluice's conclusions from silence (sluice_core.monitors), by event type.
LOST_EVENT = "sluice-lost"  # a worker died running the job
REDELIVERY_EVENT = "sluice-redelivery"  # a worker died holding it unstarted: it comes back
UNSEEN_EVENT = "sluice-unseen"  # its queue drained, and no worker said it took the job
# Reconciliation after a gap (sluice_core.reconcile): its events were missed, and neither
# the workers nor a result backend could tell what became of it.
MISSED_EVENT = "sluice-missed"
HELD_STATES = frozenset({JobState.RECEIVED, JobState.SCHEDULED, JobState.ACTIVE})
# The states each conclusion judged: it applies only to a row still in one of them.
_JUDGED: dict[str, frozenset[JobState]] = {
    LOST_EVENT: HELD_STATES,
    REDELIVERY_EVENT: HELD_STATES,
    UNSEEN_EVENT: frozenset({JobState.QUEUED}),
}
# Those that end the delivery: the broker may give the job again.
_ENDS_DELIVERY = frozenset({LOST_EVENT, REDELIVERY_EVENT})
# States whose event says why on the row (``exception``) until the next outcome.
_EXPLAINED = frozenset({JobState.RETRYING, JobState.REDELIVERING, JobState.UNKNOWN})

# Storage keeps ``(delivery, rank)`` in one integer (the fold_rank_state column), which
# orders as the pair does for ranks -1 to 4 and reads a row stored before deliveries
# were counted as delivery 0.
_DELIVERY_SPAN = 10


def pack_rank(delivery: int, rank: int) -> int:
    return delivery * _DELIVERY_SPAN + rank


def unpack_rank(packed: int) -> tuple[int, int]:
    delivery = (packed + 1) // _DELIVERY_SPAN
    return delivery, packed - delivery * _DELIVERY_SPAN


# Copied from any event that carries them: the latest value in fold order wins (args
# and kwargs: the latest complete ones, once there are any; see ARGS_COMPLETE).
# retry_of / retried_as are the links Sluice's own retry action records.
_COPIED = frozenset((
    "name", "queue", "args", "kwargs", "parent_id", "root_id", "eta", "expires",
    "retry_of", "retried_as",
))


_ARGUMENTS = frozenset(("args", "kwargs"))
# The key of ``JobEvent.extra`` a normalizer sets (to True) when the event's args and
# kwargs are the job's complete arguments, not a display repr that may be cut: those
# win over any other event's, whatever the order (the job's extra keeps the mark).
ARGS_COMPLETE: Final = "args_complete"

# How far apart two sources may stamp one happening. They stamp it on the same host,
# from different processes (a pool child's signal, the worker's main process): a few
# ms apart, seconds on a loaded worker. A real second happening of one type on one
# worker (a redelivery) takes a restart or a requeue: both sources report it too,
# and each report pairs with its nearest partner (see timeline).
SAME_HAPPENING_S: Final = 5.0
# Reports of one type a report is compared with, at most: a job with thousands of
# events of one type in seconds is pushed by a hostile sender, not by a worker.
_CANDIDATES = 16


def sort_key(event: JobEvent) -> tuple[float, str]:
    return (event.timestamp, event.id)


def source(event: JobEvent) -> str | None:
    """Who reported the event: the API key it was pushed with, None for Sluice itself
    (a broker it reads, its monitors and actions). One source reports a happening
    once: two of its events are two happenings."""
    key = event.extra.get(PUSHED_BY)
    return None if key is None else str(key)


def applies_in_order(job: Job, events: list[JobEvent]) -> bool:
    """True when every event sorts after the job's fold position, and neither they
    nor the row's events can be one happening reported twice: one source reported
    every event that moves the job (``Job.fold_sources``), so :func:`timeline` has
    nothing to merge.

    ``events`` must already be sorted by :func:`sort_key`. When this holds,
    ``fold(job, events)`` equals a rebuild from the whole history.
    """
    if not events:
        return True
    if job.fold_sources is None:
        return False  # stored before the row kept its sources: rebuilt once
    reporters = {source(event) or "" for event in events if event.state is not None}
    if len(reporters.union(job.fold_sources)) > 1:
        return False
    return sort_key(events[0]) > (job.fold_ts, job.fold_event)


def fold(job: Job, events: Iterable[JobEvent]) -> Job:
    """Apply events, sorted by :func:`sort_key` and after the job's position, in place."""
    for event in events:
        _apply(job, event)
    return job


def rebuild(job_id: str, framework: str, events: Iterable[JobEvent]) -> Job:
    """The job's row from scratch, from any collection of its events (duplicates allowed)."""
    events = list(events)
    job = fold(Job(id=job_id, framework=framework), timeline(events))
    # Every report's source, merged ones too: the next event may pair with any of them.
    job.fold_sources = tuple(sorted({source(e) or "" for e in events if e.state is not None}))
    return job


def timeline(events: Iterable[JobEvent]) -> list[JobEvent]:
    """The job's events sorted by :func:`sort_key`, each happening once.

    Two events are one happening reported by two sources when they come from
    different sources (:func:`source`), move the job (an annotation is never
    merged), have the same type, the same worker (or one names none: a producer),
    the same attempt where both carry one (``retries``), and stamps at most
    :data:`SAME_HAPPENING_S` apart. Pairs are taken closest first, and a merged
    event holds at most one report per source, so a redelivery to the same worker
    stays two happenings: each report pairs with its own partner, and two events
    of one source are never merged. A function of the set of events, whatever
    their order.

    The merged event is the earliest report, with what the others add: fields and
    extra it lacks, and complete arguments (:data:`ARGS_COMPLETE`) over a repr.
    """
    unique = sorted({event.id: event for event in events}.values(), key=sort_key)
    if len({source(event) for event in unique if event.state is not None}) < 2:
        return unique
    by_type: dict[str, list[int]] = {}
    for i, event in enumerate(unique):
        if event.state is not None:
            by_type.setdefault(event.type, []).append(i)
    pairs = []
    for indexes in by_type.values():
        for n, i in enumerate(indexes):
            for j in indexes[n + 1 : n + 1 + _CANDIDATES]:
                a, b = unique[i], unique[j]
                if b.timestamp - a.timestamp > SAME_HAPPENING_S:
                    break
                if _reports_alike(a, b):
                    pairs.append((b.timestamp - a.timestamp, i, j))
    if not pairs:
        return unique
    # Union-find over the reports: a merged event never holds two of one source.
    root = list(range(len(unique)))
    sources = [{source(event)} for event in unique]

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for _, i, j in sorted(pairs):
        first, second = sorted((find(i), find(j)))
        if first != second and sources[first].isdisjoint(sources[second]):
            root[second] = first
            sources[first] |= sources[second]
    groups: dict[int, list[JobEvent]] = {}
    for i, event in enumerate(unique):
        groups.setdefault(find(i), []).append(event)
    return [_merged(reports) for _, reports in sorted(groups.items())]


def _reports_alike(a: JobEvent, b: JobEvent) -> bool:
    if source(a) == source(b) or (a.worker != b.worker and None not in (a.worker, b.worker)):
        return False
    ra, rb = a.fields.get("retries"), b.fields.get("retries")
    return ra is None or rb is None or ra == rb


def _merged(reports: list[JobEvent]) -> JobEvent:
    """One happening from its reports (sorted, the earliest first)."""
    first = reports[0]
    if len(reports) == 1:
        return first
    fields: dict[str, object] = {}
    extra: dict[str, object] = {}
    for report in reversed(reports):  # the earliest report's values win
        fields.update(report.fields)
        extra.update(report.extra)
    complete = [r for r in reports if r.extra.get(ARGS_COMPLETE) is True]
    if complete:
        fields.update((k, v) for k, v in complete[0].fields.items() if k in _ARGUMENTS)
    worker = next((r.worker for r in reports if r.worker is not None), None)
    return attrs.evolve(first, worker=worker, fields=fields, extra=extra)


def _apply(job: Job, event: JobEvent) -> None:
    ts = event.timestamp
    job.fold_ts, job.fold_event = ts, event.id
    if job.created_at is None or ts < job.created_at:
        job.created_at = ts
    if job.updated_at is None or ts > job.updated_at:
        job.updated_at = ts

    fields = event.fields
    # Complete arguments, once seen, are replaced only by complete ones.
    keep_arguments = (
        job.extra.get(ARGS_COMPLETE) is True and event.extra.get(ARGS_COMPLETE) is not True
    )
    # Most events carry two or three of these: look up what they carry, not all ten.
    for name in _COPIED.intersection(fields):
        value = fields[name]
        if value is not None and not (keep_arguments and name in _ARGUMENTS):
            setattr(job, name, value)
    # Annotations (an operator's action, say) stay on the timeline: their extra
    # describes the action, not the job.
    if event.state is not None:
        if event.extra:
            job.extra = {**job.extra, **event.extra}
        reporter = source(event) or ""
        if job.fold_sources is not None and reporter not in job.fold_sources:
            job.fold_sources = tuple(sorted((*job.fold_sources, reporter)))
    if job.worker is None:
        job.worker = event.worker  # until an attempt's own events say whose it is

    state = event.state
    if state is None:
        return
    if event.type == MISSED_EVENT:
        # Unknown whatever the state before, and at the bottom of its attempt's ranks:
        # any later event of the job says more. A known outcome stays known.
        if job.state not in TERMINAL_STATES:
            job.state = state
            job.exception = fields.get("exception")
            job.finished_at = job.runtime = job.result = None
            job.fold_rank = (job.fold_rank[0], job.fold_rank[1], -1)
        return
    explicit = fields.get("retries")
    attempt = job.fold_attempt
    delivery = job.fold_rank[1]
    if state is JobState.QUEUED:
        attempt = explicit if explicit is not None else attempt
        if job.sent_at is None or ts < job.sent_at:
            job.sent_at = ts
    elif state in (JobState.RECEIVED, JobState.SCHEDULED):
        attempt = explicit if explicit is not None else attempt
        job.received_at = ts
        if attempt == job.fold_rank[0] and _redelivered(job, event):
            delivery += 1
    elif state is JobState.RETRYING:
        job.fold_attempt += 1
        attempt = job.fold_attempt
    elif event.type in _JUDGED:
        attempt = explicit if explicit is not None else attempt
        if not (
            attempt == job.fold_rank[0]
            and job.state in _JUDGED[event.type]
            and (event.worker is None or event.worker == job.worker)
        ):
            return  # overtaken: the job moved on since Sluice concluded this
        if event.type in _ENDS_DELIVERY:
            delivery += 1
    elif state is JobState.ACTIVE:
        job.started_at = ts

    rank = (attempt, delivery, -1 if event.type in _ENDS_DELIVERY else _RANK[state])
    if rank < job.fold_rank:
        return
    if job.state is JobState.UNKNOWN:
        job.exception = None  # why it was unknown: this event tells more
    job.fold_rank = rank
    job.state = state
    job.retries = attempt
    # The worker of the current attempt, by the same precedence as the state: a retry's
    # task-retried (stamped by the worker that ran the last attempt) may sort after the
    # next attempt's task-received on another worker, and that one holds the job.
    if event.worker is not None:
        job.worker = event.worker
    if state in TERMINAL_STATES:
        job.finished_at = ts
        job.result = fields.get("result")
        job.exception = fields.get("exception")
        job.traceback = fields.get("traceback")
        runtime = fields.get("runtime")
        if runtime is None and job.started_at is not None and state is not JobState.REVOKED:
            runtime = max(0.0, ts - job.started_at)
        job.runtime = runtime
    else:
        # A new attempt or delivery, or an earlier stage: nothing has finished yet. A
        # retry keeps the exception that caused it on the row until the next outcome,
        # as a redelivery or an unseen job keeps why Sluice says so.
        job.finished_at = job.runtime = job.result = None
        if state in _EXPLAINED:
            job.exception = fields.get("exception")
            job.traceback = fields.get("traceback")


def _redelivered(job: Job, event: JobEvent) -> bool:
    """Whether a task-received of the job's current attempt is a new delivery: after
    the job was lost, or from another worker while one ran it. (A message is
    delivered again only once its first taker is gone: a broker that was quicker than
    Sluice's conclusion, or a worker's own WorkerLostError with acks_late.)"""
    if job.state is JobState.LOST:
        return True
    return (
        job.state is JobState.ACTIVE
        and event.worker is not None
        and job.worker is not None
        and event.worker != job.worker
    )

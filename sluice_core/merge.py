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

Storage applies new events directly when they all sort after the row's fold
position (the common case, see :func:`applies_in_order`), and otherwise
re-folds the job's whole stored history with :func:`rebuild`.
"""

from __future__ import annotations

from collections.abc import Iterable

from sluice_core.model import TERMINAL_STATES, Job, JobEvent, JobState

_RANK: dict[JobState, int] = {
    JobState.RETRYING: -1,  # opens the next attempt, below its queued event
    JobState.QUEUED: 0,
    JobState.SCHEDULED: 1,
    JobState.RECEIVED: 2,
    JobState.ACTIVE: 3,
    **{state: 4 for state in TERMINAL_STATES},
}

# Copied from any event that carries them: the latest value in fold order wins.
# retry_of / retried_as are the links Sluice's own retry action records.
_COPIED = frozenset((
    "name", "queue", "args", "kwargs", "parent_id", "root_id", "eta", "expires",
    "retry_of", "retried_as",
))


def sort_key(event: JobEvent) -> tuple[float, str]:
    return (event.timestamp, event.id)


def applies_in_order(job: Job, events: list[JobEvent]) -> bool:
    """True when every event sorts after the job's fold position.

    ``events`` must already be sorted by :func:`sort_key`. When this holds,
    ``fold(job, events)`` equals a rebuild from the whole history.
    """
    return not events or sort_key(events[0]) > (job.fold_ts, job.fold_event)


def fold(job: Job, events: Iterable[JobEvent]) -> Job:
    """Apply events, sorted by :func:`sort_key` and after the job's position, in place."""
    for event in events:
        _apply(job, event)
    return job


def rebuild(job_id: str, framework: str, events: Iterable[JobEvent]) -> Job:
    """The job's row from scratch, from any collection of its events (duplicates allowed)."""
    unique = {event.id: event for event in events}
    return fold(Job(id=job_id, framework=framework), sorted(unique.values(), key=sort_key))


def _apply(job: Job, event: JobEvent) -> None:
    ts = event.timestamp
    job.fold_ts, job.fold_event = ts, event.id
    if job.created_at is None or ts < job.created_at:
        job.created_at = ts
    if job.updated_at is None or ts > job.updated_at:
        job.updated_at = ts

    fields = event.fields
    # Most events carry two or three of these: look up what they carry, not all ten.
    for name in _COPIED.intersection(fields):
        value = fields[name]
        if value is not None:
            setattr(job, name, value)
    # Annotations (an operator's action, say) stay on the timeline: their extra
    # describes the action, not the job.
    if event.extra and event.state is not None:
        job.extra = {**job.extra, **event.extra}
    if job.worker is None:
        job.worker = event.worker  # until an attempt's own events say whose it is

    state = event.state
    if state is None:
        return
    explicit = fields.get("retries")
    if state is JobState.QUEUED:
        attempt = explicit if explicit is not None else job.fold_attempt
        if job.sent_at is None or ts < job.sent_at:
            job.sent_at = ts
    elif state in (JobState.RECEIVED, JobState.SCHEDULED):
        attempt = explicit if explicit is not None else job.fold_attempt
        job.received_at = ts
    elif state is JobState.RETRYING:
        job.fold_attempt += 1
        attempt = job.fold_attempt
    else:
        attempt = job.fold_attempt
        if state is JobState.ACTIVE:
            job.started_at = ts

    rank = (attempt, _RANK[state])
    if rank < job.fold_rank:
        return
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
        # A new attempt or an earlier stage: nothing has finished yet. A retry
        # keeps the exception that caused it on the row until the next outcome.
        job.finished_at = job.runtime = job.result = None
        if state is JobState.RETRYING:
            job.exception = fields.get("exception")
            job.traceback = fields.get("traceback")

"""The normalized model: jobs, their events, workers (docs/plugins.md, the model).

Nothing here is Celery-specific. A framework plugin turns its own wire format
into :class:`JobEvent` and :class:`WorkerEvent`; storage folds job events into
:class:`Job` rows with :func:`sluice_core.merge.fold`.
"""

from __future__ import annotations

import enum
import hashlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs


class JobState(enum.StrEnum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    RECEIVED = "received"
    ACTIVE = "active"
    RETRYING = "retrying"
    REDELIVERING = "redelivering"  # its worker died before starting it: the broker gives it back
    COMPLETED = "completed"
    FAILED = "failed"
    REVOKED = "revoked"
    REJECTED = "rejected"
    LOST = "lost"
    UNKNOWN = "unknown"


TERMINAL_STATES = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.REVOKED, JobState.REJECTED, JobState.LOST}
)

# Fields of a job that an event may carry in ``JobEvent.fields``. Anything else
# a framework wants to keep goes into ``JobEvent.extra``.
JOB_EVENT_FIELDS = frozenset(
    {
        "name",
        "queue",
        "args",
        "kwargs",
        "result",
        "exception",
        "traceback",
        "retries",
        "parent_id",
        "root_id",
        "eta",
        "expires",
        "runtime",
        "retry_of",
        "retried_as",
    }
)


def event_id(*parts: object) -> str:
    """A deterministic id for an event, from what identifies it on the wire.

    Two agents reading the same broker derive the same id for the same event,
    which is what makes ingestion idempotent (docs/architecture.md).
    """
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=16)
    return digest.hexdigest()


@attrs.frozen(slots=True)
class JobEvent:
    """One thing that happened to a job: a row of its timeline.

    ``state`` is the normalized state the event moves the job to, or ``None``
    for an event that only annotates the timeline (an operator's action, say).
    ``timestamp`` is epoch seconds, UTC, as the sender stamped it.
    """

    id: str
    job_id: str
    framework: str
    type: str  # the framework's own name for the event, e.g. "task-succeeded"
    state: JobState | None
    timestamp: float
    worker: str | None = None  # None for producers and for Sluice itself
    fields: dict[str, Any] = attrs.field(factory=dict)
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(slots=True)
class WorkerEvent:
    """A worker announced itself: online, heartbeat or offline."""

    hostname: str
    framework: str
    type: str  # "online", "heartbeat" or "offline"
    timestamp: float
    freq: float | None = None  # seconds between heartbeats
    active: int | None = None
    processed: int | None = None
    loadavg: list[float] | None = None
    pid: int | None = None
    sw_ver: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.define(slots=True)
class Job:
    """A job's current row: a pure function of the set of its events.

    The ``fold_*`` attributes are the fold's own bookkeeping (see
    :mod:`sluice_core.merge`); storage keeps them so that an event arriving in
    order is applied without re-reading the job's history.
    """

    id: str
    framework: str
    state: JobState = JobState.UNKNOWN
    name: str | None = None
    queue: str | None = None
    worker: str | None = None
    args: str | None = None
    kwargs: str | None = None
    result: str | None = None
    exception: str | None = None
    traceback: str | None = None
    retries: int = 0
    parent_id: str | None = None
    root_id: str | None = None
    eta: str | None = None
    expires: str | None = None
    sent_at: float | None = None
    received_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    runtime: float | None = None
    created_at: float | None = None  # timestamp of the earliest event
    updated_at: float | None = None  # timestamp of the latest event
    retry_of: str | None = None
    retried_as: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)
    # The fold's position: the last event applied, and the state's precedence.
    fold_ts: float = float("-inf")
    fold_event: str = ""
    fold_attempt: int = 0  # retries seen (task-retried events): the attempt running now
    fold_rank: tuple[int, int, int] = (-1, 0, -1)  # (attempt, delivery, rank) of ``state``
    # Who reported the events that moved the job (sluice_core.merge.source; "" for Sluice
    # itself), sorted; None for a row stored before they were kept.
    fold_sources: tuple[str, ...] | None = ()


@attrs.define(slots=True)
class Worker:
    hostname: str
    framework: str
    status: str = "online"  # "online" or "offline"
    last_heartbeat: float | None = None
    freq: float | None = None
    active: int | None = None
    processed: int | None = None
    loadavg: list[float] | None = None
    pid: int | None = None
    sw_ver: str | None = None
    queues: list[str] | None = None
    concurrency: int | None = None
    updated_at: float | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(slots=True)
class RawBatch:
    """Messages as a source read them, before any decoding, handed on together.

    Sources hand over batches, never single messages: crossing a channel or a
    thread costs tens of microseconds, decoding one event a few.
    ``kind`` names the wire format so that the right normalizer claims it
    (e.g. ``"celery/redis"``); each message is ``(channel, body)``, where the
    channel is the pub/sub channel or the routing key.
    """

    kind: str
    source: str  # the source's name, for logs and metrics
    messages: list[tuple[str, bytes]]
    received_at: float  # epoch seconds when Sluice read them (for ingest lag)
    # Called (on trio's thread) once Sluice is done with the batch: its events stored or
    # dead-lettered, its messages counted as malformed, or the batch dropped and counted;
    # never if Sluice stops first. A source that can have a message delivered again
    # (AMQP) acknowledges it then, and not before.
    settled: Callable[[], None] | None = attrs.field(default=None, eq=False)


@attrs.define(slots=True)
class Normalized:
    """What a normalizer made of a :class:`RawBatch`."""

    job_events: list[JobEvent] = attrs.field(factory=list)
    worker_events: list[WorkerEvent] = attrs.field(factory=list)
    malformed: int = 0  # messages that could not be decoded (logged, counted, skipped)
    ignored: int = 0  # well-formed messages that carry nothing for Sluice
    # Set by the core's check of values from outside (sluice_core.validate), by reason:
    # events left out, events stored with values corrected; and why each was left out.
    rejected: Counter[str] = attrs.field(factory=Counter)
    corrected: Counter[str] = attrs.field(factory=Counter)
    problems: list[str] = attrs.field(factory=list)


@attrs.define(slots=True)
class QueueSample:
    """A probe's reading of one queue at one moment."""

    name: str
    framework: str
    broker: str  # the broker URL without credentials
    timestamp: float
    depth: int | None = None  # messages waiting (None: the probe cannot tell)
    reserved: int | None = None  # prefetched or scheduled, taken by a worker but not acked
    consumers: int | None = None

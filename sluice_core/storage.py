"""The storage contract every backend implements (docs/architecture.md, Storage).

Backends live in ``storage/`` (package ``sluice_storage``) and are plugins
(hook ``sluice_storage``). All methods are async; a backend runs its blocking
driver in worker threads itself. Rows are folded with :mod:`sluice_core.merge`
so every backend merges events the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs

from sluice_core.alerting.model import Channel, Incident, IncidentState, Rule
from sluice_core.leader import LeaderLock
from sluice_core.model import Job, JobEvent, JobState, QueueSample, Worker, WorkerEvent
from sluice_core.probes import WorkerQueues
from sluice_core.redact import Redactor
from sluice_core.retention import PRUNE_BATCH, RetentionPolicy

MAX_PAGE = 500
DEFAULT_PAGE = 50
# A job is stuck when queued this long with no worker taking it, or active far
# beyond its name's usual runtime (see sluice_storage.common.stuck_sql).
DEFAULT_STUCK_AFTER_S = 600.0


class StorageUnavailable(Exception):
    """The database cannot answer now (down, refusing connections, locked, failing its
    disk), as opposed to a wrong query: the same read may succeed later. Raised by the
    backends' reads; the web answers 503 with ``Retry-After: retry_after``."""

    retry_after = 5  # seconds: about how long a pool takes to reconnect


@attrs.frozen
class JobQuery:
    """Filters of ``GET /api/jobs`` (the API in README.md), already validated."""

    q: str | None = None  # id prefix, or text in name, args, kwargs, exception
    name: str | None = None
    states: frozenset[JobState] = frozenset()
    queue: str | None = None
    worker: str | None = None
    framework: str | None = None
    since: float | None = None  # epoch seconds, on the job's created_at
    until: float | None = None
    ids: frozenset[str] = frozenset()
    stuck: bool = False  # only jobs queued or active for too long (DEFAULT_STUCK_AFTER_S)
    limit: int = DEFAULT_PAGE
    cursor: int | None = None  # the last page's last ``seq``; see Page


@attrs.frozen
class Page:
    jobs: list[Job]
    # ``seq`` of the last job when more may follow, else None. Jobs are listed
    # newest first by ``seq``, the order Sluice first stored them in, which
    # never changes: pages have no duplicates or gaps while jobs stream in.
    next_cursor: int | None


@attrs.frozen
class IngestResult:
    jobs: list[Job]  # rows that changed, as they are now
    workers: list[Worker]
    events_stored: int  # new event rows (duplicates of stored events are not counted)
    new_events: list[JobEvent] = attrs.field(factory=list)  # those rows' events
    # The first ``new_jobs`` of ``jobs`` were stored for the first time, in that order.
    new_jobs: int = 0


@attrs.frozen
class Change:
    """What a process sharing the database just stored, as the others hear of it."""

    jobs: tuple[str, ...] = ()  # ids of the jobs whose rows changed
    new_jobs: int = 0  # the first ``new_jobs`` of them were stored for the first time
    workers: tuple[str, ...] = ()  # hostnames of the workers whose rows changed
    queues: tuple[QueueSample, ...] = ()  # probe samples, whole


class ChangeFeed(Protocol):
    async def follow(
        self, on_change: Callable[[Change], None], on_gap: Callable[[], None]
    ) -> None:
        """Until cancelled, call ``on_change`` for every change committed to the database,
        and ``on_gap`` whenever changes may have been missed (each time the feed connects:
        nothing is kept for a listener while it is away)."""


@attrs.frozen
class QueueStats:
    """A queue as ``GET /api/queues`` shows it: the latest probe sample plus event-derived rates."""

    name: str
    framework: str
    broker: str | None
    depth: int | None
    reserved: int | None
    consumers: int | None
    throughput_per_min: float
    failure_rate: float
    avg_wait_s: float | None
    updated_at: float | None


@attrs.frozen
class ApiKey:
    """A key for the ingest endpoints as stored: its hash stays in the database, the key
    itself is known only to whoever created it."""

    id: int
    name: str
    created_at: float
    revoked_at: float | None = None
    last_used_at: float | None = None


class ApiKeyExists(ValueError):
    """An active API key already has this name (revoke it first, or pick another)."""


class RejectedData(Exception):
    """:meth:`Storage.ingest` cannot store a batch because of what it holds (a value beyond
    a column, a character the database does not keep): sent again, it fails again. The
    pipeline then splits the batch to find the events at fault and dead-letters them. Any
    other error is the database's (away, full, locked): the batch is held and retried."""


class WritesRefused(Exception):
    """:meth:`Storage.ingest` cannot write anything until someone acts: the database's disk
    is full, it is read-only, or Sluice may not write. Not the batch's fault (it would
    store once the database takes writes): the pipeline holds and retries it, and
    /healthz says why with ``reason``, the database's words without hosts or paths."""

    def __init__(self, reason: str, cause: Exception) -> None:
        super().__init__(f"the database refuses writes: {reason} ({type(cause).__name__}: {cause})")
        self.reason = reason


# Dead letters kept; past this the oldest go (a flood of bad events must not fill the disk).
DEAD_LETTERS_KEPT = 10_000


@attrs.frozen
class DeadLetter:
    """An event storage refused, kept aside with why, for an operator to see."""

    kind: str  # "job" or "worker"
    event: str  # the event as JSON text (sluice_core.serialize's wire form), escaped to ASCII
    reason: str  # what the database said
    created_at: float  # when it was refused
    id: int | None = None  # once stored


@attrs.frozen
class Gap:
    """A time a source was not heard, so its events in it may be missed
    (sluice_core/reconcile.py): Sluice was stopped (``cause`` "stopped"), the source
    was reconnecting ("reconnect"), or full buffers dropped its events ("dropped")."""

    source: str  # the source's name, which names its broker (without credentials)
    cause: str
    started_at: float
    ended_at: float
    reconciled_at: float | None = None
    summary: str | None = None  # what reconciling learnt, for people
    id: int | None = None  # once stored

    @property
    def duration(self) -> float:
        return self.ended_at - self.started_at


@attrs.frozen
class Pruned:
    """What :meth:`Storage.prune` deleted (or, in a dry run, would delete)."""

    jobs_by_state: dict[str, int] = attrs.field(factory=dict)  # every way, by state
    events: int = 0  # deleted row by row (a dropped partition's are not counted)
    chunks: int = 0  # transactions (a dry run's reads count alike)
    largest_chunk: int = 0  # the most jobs one transaction deleted
    longest_chunk_s: float = 0.0  # the longest of those transactions, in seconds
    dry_run: bool = False
    # PostgreSQL's day partitions (migration 0013): dropped, the jobs that went with them,
    # the jobs the policy kept that moved out first, the bytes freed, the longest drop.
    partitions: int = 0
    dropped_jobs: int = 0
    moved_jobs: int = 0
    dropped_bytes: int = 0
    longest_drop_s: float = 0.0
    # Alert incidents resolved past --retain-failed-days, with their timelines and
    # notifications (and notifications of no incident, as old).
    incidents: int = 0

    @property
    def jobs(self) -> int:
        return sum(self.jobs_by_state.values())

    def __add__(self, other: Pruned) -> Pruned:
        states = dict(self.jobs_by_state)
        for state, n in other.jobs_by_state.items():
            states[state] = states.get(state, 0) + n
        return Pruned(
            states,
            self.events + other.events,
            self.chunks + other.chunks,
            max(self.largest_chunk, other.largest_chunk),
            max(self.longest_chunk_s, other.longest_chunk_s),
            self.dry_run or other.dry_run,
            self.partitions + other.partitions,
            self.dropped_jobs + other.dropped_jobs,
            self.moved_jobs + other.moved_jobs,
            self.dropped_bytes + other.dropped_bytes,
            max(self.longest_drop_s, other.longest_drop_s),
            self.incidents + other.incidents,
        )


@attrs.frozen
class Footprint:
    """How much history the database holds (``/metrics``)."""

    bytes: int  # on disk: SQLite's file and its WAL; PostgreSQL's database
    oldest_job_at: float | None  # the oldest stored job's created_at
    # PostgreSQL's day partitions (migration 0013): held now (the kept one aside), and
    # dropped by expiry so far, the last when. None, 0 and None on SQLite.
    partitions: int | None = None
    partitions_dropped: int = 0
    last_dropped_at: float | None = None


# Jobs (with their events) scrubbed in one transaction by Storage.redact.
REDACT_BATCH = 500


@attrs.frozen
class Redacted:
    """What :meth:`Storage.redact` went through, and what held a secret (and was
    replaced, if it applied the rules)."""

    jobs: int = 0
    jobs_changed: int = 0
    events: int = 0
    events_changed: int = 0
    dead_letters: int = 0
    dead_letters_changed: int = 0
    # What the backend cannot do itself to remove the old values from its files.
    note: str = ""

    def __add__(self, other: Redacted) -> Redacted:
        return Redacted(
            *(getattr(self, f.name) + getattr(other, f.name) for f in attrs.fields(Redacted))
        )


@attrs.frozen
class Notification:
    """A row of the alerting outbox: one message for one channel, until delivered or
    given up (sluice_core/alerting/outbox.py). ``body`` is the message's fields
    (:func:`sluice_core.alerting.outbox.message_from_body` makes it a Message again)."""

    incident_id: int | None  # None for a summary of several
    channel_id: int
    event: str  # "incident.firing", "incident.resolved", "summary"
    body: Mapping[str, Any]
    created_at: float
    next_attempt_at: float
    attempts: int = 0
    id: int | None = None  # once stored


@attrs.frozen
class TimelineEntry:
    """A row of an incident's timeline (``IncidentDetail.timeline``)."""

    at: float
    what: str  # "pending", "firing", "resolved", "queued", "delivered", "failed", ...
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "what": self.what, "detail": self.detail}


class Storage(Protocol):
    url: str  # without credentials: safe to show
    # How many ingest transactions may run at once: the pipeline splits its batches
    # by job id between this many writers (one job is never in two transactions).
    ingest_writers: int

    async def open(self) -> list[int]:
        """Connect and apply pending migrations; return the versions applied."""

    async def aclose(self) -> None: ...

    async def migrate(self) -> list[int]:
        """Apply pending migrations; return the versions applied."""

    async def ingest(
        self, job_events: list[JobEvent], worker_events: list[WorkerEvent]
    ) -> IngestResult:
        """Store a batch in one transaction: every new event, and the rows it changes.

        Idempotent: an event already stored (same id) changes nothing. Raises
        :class:`RejectedData` when the batch's own values are what the database refused.
        """

    async def get_job(self, job_id: str) -> Job | None: ...

    async def job_events(self, job_id: str) -> list[JobEvent]:
        """Every stored event of the job, each source's report as it came, oldest first
        (:func:`sluice_core.merge.timeline` makes the timeline shown of them)."""

    async def list_jobs(self, query: JobQuery) -> Page: ...

    async def count_jobs(self, query: JobQuery, at_most: int) -> int:
        """The jobs ``query`` matches (its cursor and limit aside), counting no further
        than ``at_most``: a filter matching millions costs no more than that."""
        ...

    async def count_jobs_by_state(self) -> dict[str, int]: ...

    async def prune(
        self,
        policy: RetentionPolicy,
        now: float,
        *,
        dry_run: bool = False,
        batch: int = PRUNE_BATCH,
    ) -> Pruned:
        """Delete the jobs ``policy`` says have expired at ``now``, with their events,
        search entries and their share of the overview's counts (sluice_core/retention.py):
        at most ``batch`` jobs a transaction, each its own short one, yielding between
        them so ingest is never held up long. Then give the space back where the
        backend can (SQLite: incremental vacuum, WAL truncated). With ``dry_run``,
        delete nothing and count what would go."""

    async def footprint(self) -> Footprint: ...

    async def list_workers(self) -> list[Worker]: ...

    async def record_queue_samples(self, samples: list[QueueSample]) -> None: ...

    async def set_worker_queues(self, workers: list[WorkerQueues]) -> None:
        """Record which queues workers consume and their pool sizes. A worker
        Sluice has no row for yet (no heartbeat stored) gets one, online."""

    async def job_workers(self, hostnames: list[str]) -> set[str]:
        """The hostnames among ``hostnames`` that some stored job names as its worker
        (i.e. workers whose task events reach Sluice)."""

    async def list_queues(self, now: float) -> list[QueueStats]: ...

    async def queue_names(self) -> set[str]:
        """The queues :meth:`list_queues` lists, without their rates (which read
        every job of the window: what the probes ask every few seconds needs none)."""

    async def queue_depth_history(
        self, name: str, broker: str, since: float
    ) -> list[tuple[float, int]]:
        """The queue's probed depth since ``since``: ``(timestamp, depth)``, oldest first.

        Samples whose probe could not tell the depth are left out.
        """

    async def job_throughput(self, since: float, bucket_s: float) -> list[tuple[float, int, int]]:
        """Jobs that finished since ``since``, per bucket of ``bucket_s`` seconds.

        ``(bucket start, completed, failed)``, oldest first; buckets with neither are left out.
        Counted by the minute (``bucket_s`` a multiple of 60): the minute holding ``since``
        counts whole.
        """

    async def top_failing_names(self, since: float, limit: int) -> list[tuple[str, int]]:
        """The job names with the most failures since ``since``: ``(name, failed)``, most first.

        Counted by the minute, as :meth:`job_throughput`."""

    async def ping(self) -> None:
        """Raise if the database cannot be reached."""

    def change_feed(self) -> ChangeFeed | None:
        """What every process stores, told to this one (web replicas follow it), or None
        when no other process can share this database."""

    def leader_lock(self, name: str) -> LeaderLock | None:
        """A lock that elects one leader among the processes sharing this database
        (sluice_core.leader), or None when only one process can use it."""

    async def create_api_key(self, name: str) -> tuple[ApiKey, str]:
        """Create a key; return its row and the key itself, which nothing can show again.

        Raises :class:`ApiKeyExists` if an active key has this name.
        """

    async def list_api_keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""

    async def revoke_api_key(self, name: str) -> ApiKey | None:
        """Revoke the active key of this name; None if there is none."""

    async def check_api_key(self, key: str) -> ApiKey | None:
        """The active key this secret is, or None (unknown or revoked).

        Records the use in ``last_used_at``, at most once a minute per key (a
        write per request would compete with the pipeline's writes).
        """

    async def record_gap(self, gap: Gap) -> int:
        """Store a gap; return its id."""

    async def gap_reconciled(self, gap_id: int, at: float, summary: str) -> None:
        """Record that the gap was reconciled at ``at``, and what that learnt."""

    async def list_gaps(self, limit: int) -> list[Gap]:
        """The latest gaps, the newest first."""

    async def mark_listening(self, marks: dict[str, float]) -> None:
        """Record, per source name, that it was heard until then (never moves a mark back)."""

    async def listening_marks(self) -> dict[str, float]:
        """Per source name, the last moment a process sharing this database heard it."""

    async def last_heard(self) -> float | None:
        """The newest stored job event or heartbeat: where a database from before the
        listening marks says Sluice last heard anything. None when empty."""

    async def dead_letter(self, letters: list[DeadLetter]) -> None:
        """Keep events :meth:`ingest` refused (:class:`RejectedData`); only the newest
        ``DEAD_LETTERS_KEPT`` stay."""

    async def list_dead_letters(self, limit: int) -> list[DeadLetter]:
        """The newest ``limit`` dead letters, newest first."""

    async def redact(
        self, redactor: Redactor, *, apply: bool, batch: int = REDACT_BATCH
    ) -> Redacted:
        """Scrub what is stored with ``redactor`` (``sluice redact``): job rows (their
        argument reprs, result, exception, traceback, extra), their events' fields and
        extra, the search index, dead letters; ``batch`` jobs and their events a
        transaction, so a large database is never locked long. Without ``apply``,
        change nothing and count what would change. Idempotent."""

    # -- alerting (migration 0010; docs/alerting.md) ----------------------------------

    async def name_outcomes(
        self,
        names: Sequence[str],
        since: float,
        created_since: float,
        queue: str | None = None,
        worker: str | None = None,
    ) -> dict[str, tuple[int, int]]:
        """Per name of ``names`` with any: ``(failed, finished)``, its runs (on ``queue``,
        ``worker``) that failed, and that failed or completed, since ``since``, among those
        created since ``created_since`` (which bounds the read: a range of each name's
        index)."""

    async def latest_queue_samples(self) -> list[QueueSample]:
        """Each queue's latest probe sample."""

    async def alert_channels(self) -> list[Channel]:
        """Every channel, oldest first, with its config (secrets included: the caller
        masks them)."""

    async def add_alert_channel(
        self, name: str, type: str, config: Mapping[str, Any], at: float
    ) -> Channel:
        """Raises :class:`~sluice_core.alerting.model.Invalid` (``name``) if one has it."""

    async def delete_alert_channel(self, channel_id: int) -> bool:
        """False if there was none."""

    async def recent_deliveries(self, channel_id: int, since: float) -> list[float]:
        """When the channel's messages delivered since ``since`` went (the outbox's
        rate limit, read back after a restart or a change of leader)."""

    async def alert_rules(self) -> list[Rule]:
        """Every rule, oldest first."""

    async def save_alert_rule(self, rule: Rule) -> Rule:
        """Insert a rule (``id`` 0) or replace the rule of that id; the rule as stored.
        Raises :class:`~sluice_core.alerting.model.Invalid` (``name``) if another rule has
        its name, :class:`~sluice_core.alerting.model.NotFound` for an unknown id."""

    async def delete_alert_rule(self, rule_id: int) -> bool:
        """Delete the rule; its open incidents are resolved (history stays). False if none."""

    async def replace_file_channels(
        self, channels: Sequence[tuple[str, str, Mapping[str, Any]]], at: float
    ) -> list[Channel]:
        """Make the channels of the configuration file (``from_file``) exactly
        ``channels`` ((name, type, config), checked), by name, in one transaction; the
        file's channels as stored. Raises :class:`~sluice_core.alerting.model.Invalid`
        (``name``) when a channel the API made has one of their names."""

    async def replace_file_rules(self, rules: Sequence[Rule]) -> list[Rule]:
        """Make the rules of the configuration file (``from_file``) exactly ``rules``, by
        name, in one transaction; a rule the API made with one of their names becomes the
        file's. The file's rules as stored."""

    async def open_incidents(self) -> list[Incident]:
        """Every pending or firing incident."""

    async def list_incidents(self, state: IncidentState | None, limit: int) -> list[Incident]:
        """The newest ``limit`` incidents (of ``state``), newest first."""

    async def get_incident(self, incident_id: int) -> Incident | None: ...

    async def save_incident(
        self,
        incident: Incident,
        log: Sequence[TimelineEntry] = (),
        notify: Sequence[Notification] = (),
    ) -> Incident:
        """Insert (``id`` 0) or update the incident (but its acks and silences, see
        :meth:`mark_incident`), add ``log`` to its timeline and queue
        ``notify`` (their ``incident_id`` set to its id), in one transaction: a state
        change and its notifications are stored together or not at all. Inserting while
        the rule's group has an open incident already (another leader's) changes nothing
        and returns that one."""

    async def mark_incident(
        self,
        incident_id: int,
        entry: TimelineEntry,
        *,
        acked_by: str | None = None,
        silenced_until: float | None = None,
    ) -> Incident | None:
        """An operator's mark: acknowledged (``entry.what`` "acknowledged", at
        ``entry.at``, by ``acked_by``) or silenced until ``silenced_until``; ``entry`` goes
        on the timeline. :meth:`save_incident` never overwrites these. None if unknown."""

    async def incident_timeline(self, incident_id: int) -> list[TimelineEntry]:
        """Oldest first."""

    async def due_notifications(self, now: float, limit: int) -> list[Notification]:
        """Outbox rows due at ``now`` (neither delivered nor given up), oldest first."""

    async def notification_attempted(
        self,
        notification: Notification,
        entry: TimelineEntry,
        *,
        delivered: bool = False,
        retry_at: float | None = None,
    ) -> None:
        """Record one delivery attempt of a row (its incident's timeline gets ``entry``):
        delivered, to be retried at ``retry_at``, or (neither) given up."""

    async def merge_notifications(
        self, merged: Sequence[Notification], summary: Notification, at: float
    ) -> Notification:
        """Queue ``summary`` in place of ``merged`` (which are closed as delivered in it,
        each incident's timeline saying so), in one transaction; the summary as stored."""

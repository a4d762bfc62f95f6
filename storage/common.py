"""What both backends share: row mapping, the per-batch fold, migrations, list queries.

A backend supplies a :class:`Transaction` (its side of one ingest: a handful of
bulk statements) and a :class:`Dialect` (how it spells a parameter, a list
membership and a free-text match); everything else is here, so SQLite and
PostgreSQL store and fold events identically.

Everything in this module is blocking: backends call it from worker threads.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import math
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import attrs
import orjson

from sluice_core import merge
from sluice_core.alerting.model import (
    Channel,
    Incident,
    IncidentState,
    Invalid,
    Kind,
    Match,
    NotFound,
    Rule,
)
from sluice_core.config import STUCK_AFTER, Config
from sluice_core.model import Job, JobEvent, JobState, QueueSample, Worker, WorkerEvent
from sluice_core.probes import WorkerQueues
from sluice_core.redact import Redactor
from sluice_core.retention import PRUNE_BATCH, PRUNE_CHUNK_FIRST, RetentionPolicy, next_chunk
from sluice_core.storage import (
    DEAD_LETTERS_KEPT,
    DEFAULT_STUCK_AFTER_S,
    REDACT_BATCH,
    ApiKey,
    ApiKeyExists,
    DeadLetter,
    Footprint,
    Gap,
    IngestResult,
    JobQuery,
    Notification,
    Page,
    Pruned,
    QueueStats,
    Redacted,
    RejectedData,
    TimelineEntry,
    WritesRefused,
)

# -- rows -------------------------------------------------------------------

# Column order of every statement that reads or writes whole rows.
JOB_COLUMNS = (
    "id", "framework", "state", "name", "queue", "worker", "args", "kwargs", "result",
    "exception", "traceback", "retries", "parent_id", "root_id", "eta", "expires",
    "sent_at", "received_at", "started_at", "finished_at", "runtime", "created_at",
    "updated_at", "retry_of", "retried_as", "extra",
    "fold_ts", "fold_event", "fold_attempt", "fold_rank_attempt", "fold_rank_state",
    "fold_sources",
)
EVENT_COLUMNS = (
    "id", "job_id", "framework", "type", "state", "timestamp", "worker", "fields", "extra",
)
WORKER_COLUMNS = (
    "hostname", "framework", "status", "last_heartbeat", "freq", "active", "processed",
    "loadavg", "pid", "sw_ver", "queues", "concurrency", "updated_at", "extra",
)

Row = tuple[Any, ...]
T = TypeVar("T")


def cols(columns: Sequence[str], prefix: str = "") -> str:
    return ", ".join(prefix + c for c in columns)


def dumps(value: Any) -> str | None:
    """JSON text for a JSON column (both backends take text and parse it server-side)."""
    return None if value is None else orjson.dumps(value).decode()


def dumps_object(value: dict[str, Any]) -> str:
    """:func:`dumps` for a JSON object column; most events' extra is empty."""
    return orjson.dumps(value).decode() if value else "{}"


def loads(text: str | bytes | None) -> Any:
    return None if text is None else orjson.loads(text)


def job_to_row(job: Job) -> Row:
    return (
        job.id, job.framework, job.state.value, job.name, job.queue, job.worker, job.args,
        job.kwargs, job.result, job.exception, job.traceback, job.retries, job.parent_id,
        job.root_id, job.eta, job.expires, job.sent_at, job.received_at, job.started_at,
        job.finished_at, job.runtime, job.created_at, job.updated_at, job.retry_of,
        job.retried_as, dumps(job.extra),
        job.fold_ts, job.fold_event, job.fold_attempt, job.fold_rank[0],
        merge.pack_rank(job.fold_rank[1], job.fold_rank[2]),
        None if job.fold_sources is None else dumps(list(job.fold_sources)),
    )


def job_from_row(row: Row) -> Job:
    (
        id_, framework, state, name, queue, worker, args, kwargs, result, exception,
        traceback, retries, parent_id, root_id, eta, expires, sent_at, received_at,
        started_at, finished_at, runtime, created_at, updated_at, retry_of, retried_as,
        extra, fold_ts, fold_event, fold_attempt, rank_attempt, rank_state, sources,
    ) = row
    return Job(
        id=id_, framework=framework, state=JobState(state), name=name, queue=queue,
        worker=worker, args=args, kwargs=kwargs, result=result, exception=exception,
        traceback=traceback, retries=retries, parent_id=parent_id, root_id=root_id, eta=eta,
        expires=expires, sent_at=sent_at, received_at=received_at, started_at=started_at,
        finished_at=finished_at, runtime=runtime, created_at=created_at,
        updated_at=updated_at, retry_of=retry_of, retried_as=retried_as, extra=loads(extra),
        fold_ts=fold_ts, fold_event=fold_event, fold_attempt=fold_attempt,
        fold_rank=(rank_attempt, *merge.unpack_rank(rank_state)),
        fold_sources=None if sources is None else tuple(loads(sources)),
    )


def event_to_row(event: JobEvent) -> Row:
    return (
        event.id, event.job_id, event.framework, event.type,
        None if event.state is None else event.state.value, event.timestamp, event.worker,
        dumps_object(event.fields), dumps_object(event.extra),
    )


def event_from_row(row: Row) -> JobEvent:
    id_, job_id, framework, type_, state, timestamp, worker, fields, extra = row
    return JobEvent(
        id=id_, job_id=job_id, framework=framework, type=type_,
        state=None if state is None else JobState(state), timestamp=timestamp,
        worker=worker, fields=loads(fields), extra=loads(extra),
    )


def worker_to_row(worker: Worker) -> Row:
    return (
        worker.hostname, worker.framework, worker.status, worker.last_heartbeat, worker.freq,
        worker.active, worker.processed, dumps(worker.loadavg), worker.pid, worker.sw_ver,
        dumps(worker.queues), worker.concurrency, worker.updated_at, dumps(worker.extra),
    )


def worker_from_row(row: Row) -> Worker:
    (
        hostname, framework, status, last_heartbeat, freq, active, processed, loadavg, pid,
        sw_ver, queues, concurrency, updated_at, extra,
    ) = row
    return Worker(
        hostname=hostname, framework=framework, status=status,
        last_heartbeat=last_heartbeat, freq=freq, active=active, processed=processed,
        loadavg=loads(loadavg), pid=pid, sw_ver=sw_ver, queues=loads(queues),
        concurrency=concurrency, updated_at=updated_at, extra=loads(extra),
    )


# -- ingest -------------------------------------------------------------------


class Transaction(Protocol):
    """A backend's side of one ingest transaction. Each method is one bulk step."""

    def lock_jobs(self, ids: list[str]) -> dict[str, Job]:
        """The stored rows of these jobs (sorted ids), locked until the transaction ends.

        Called first, with every job of the batch.
        """

    def day_of(self, job_id: str) -> int:
        """The day partition (PostgreSQL's migration 0013) a job of this batch is stored
        in: its row's, as locked, or the day a new one goes to; 0 without partitions."""

    def insert_events(self, events: list[JobEvent]) -> set[str]:
        """Store events (unique ids) not stored yet; return the ids stored now."""

    def load_events(self, job_ids: list[str]) -> list[JobEvent]:
        """Every stored event of these jobs, including this transaction's."""

    def write_jobs(self, new: list[Job], changed: list[Job]) -> set[str]:
        """Insert ``new`` rows and update ``changed`` ones.

        Returns the ids of ``new`` jobs another writer stored first (PostgreSQL:
        two agents, one new job); their rows are rebuilt and written as changed.
        """

    def lock_workers(self, hostnames: list[str]) -> dict[str, Worker]: ...

    def write_workers(self, workers: list[Worker]) -> None:
        """Upsert; a row already holding a later heartbeat is kept (a concurrent writer)."""

    def add_counts(self, rollup: Rollup) -> None:
        """Add the rollup's changes to the counts (migration 0009), in key order."""

    def announce(self, result: IngestResult) -> None:
        """Tell the processes sharing the database what changed (heard at commit)."""


def ingest(
    tx: Transaction, job_events: list[JobEvent], worker_events: list[WorkerEvent]
) -> IngestResult:
    """Fold a batch into storage inside ``tx``: only events never stored before count."""
    unique = {event.id: event for event in job_events}
    stored = tx.lock_jobs(sorted({event.job_id for event in job_events}))
    # In the order read, not sorted by id: a backend stores them in its own key's
    # order (SQLite's job_seq, PostgreSQL's ORDER BY id for its locks).
    stored_now = tx.insert_events(list(unique.values()))
    fresh: dict[str, list[JobEvent]] = defaultdict(list)
    for event_id in stored_now:
        event = unique[event_id]
        fresh[event.job_id].append(event)

    new: list[Job] = []
    changed: list[Job] = []
    out_of_order: list[str] = []
    # Every row written leaves its counts as stored (taken now: the fold changes the
    # stored row in place) for its counts as written.
    rollup = Rollup()
    for job_id, events in fresh.items():
        events.sort(key=merge.sort_key)
        job = stored.get(job_id)
        if job is not None:
            rollup.count(job, -1, tx.day_of(job_id))
        if job is None:
            # Every event of a job not stored yet is in this batch.
            new.append(merge.rebuild(job_id, events[0].framework, events))
        elif merge.applies_in_order(job, events):
            changed.append(merge.fold(job, events))
        else:
            out_of_order.append(job_id)
    changed += _rebuild(tx, out_of_order)
    # Jobs listed in the order they were first seen: seq follows created_at within a batch.
    new.sort(key=lambda job: (job.created_at, job.id))
    raced = tx.write_jobs(new, changed)
    if raced:
        # Stored by another writer since lock_jobs: its row is what this batch changes.
        for job in tx.lock_jobs(sorted(raced)).values():
            rollup.count(job, -1, tx.day_of(job.id))
        rebuilt = _rebuild(tx, sorted(raced))
        tx.write_jobs([], rebuilt)
        new = [job for job in new if job.id not in raced] + rebuilt
    for job in new + changed:
        rollup.count(job, 1, tx.day_of(job.id))
    if rollup:
        tx.add_counts(rollup)

    workers = _fold_workers(tx, worker_events)
    result = IngestResult(
        jobs=new + changed,
        workers=workers,
        events_stored=len(stored_now),
        new_events=[unique[i] for i in stored_now],
        new_jobs=len(new),
    )
    tx.announce(result)
    return result


# -- rollups (migration 0009) ---------------------------------------------------------------

# A finished_at beyond this (or not finite) has no minute: see migration 0009.
_MINUTE_TS_MAX = 2.0**53


def finished_minute(job: Job) -> int | None:
    """The minute a completed or failed job counts in (job_finished, job_failures)."""
    at = job.finished_at
    if job.state not in (JobState.COMPLETED, JobState.FAILED) or at is None:
        return None
    if not (math.isfinite(at) and abs(at) < _MINUTE_TS_MAX):
        return None
    return math.floor(at / 60)


@attrs.define
class Rollup:
    """What one ingest changes in the overview's counts (migration 0009).

    A job row counts once in each table, by what it holds now; ingest takes each row it
    writes out of its counts as stored (none for a new job) and into its counts as written. So
    the counts follow every fold, rebuild or late event, and a duplicate event, which
    changes no row, changes no count. Each count is by the day partition its jobs are
    stored in (migration 0013), so a dropped day takes its counts with it.
    """

    states: defaultdict[tuple[str, int], int] = attrs.field(factory=lambda: defaultdict(int))
    finished: defaultdict[tuple[int, str, int], int] = attrs.field(
        factory=lambda: defaultdict(int)
    )
    failures: defaultdict[tuple[int, str, int], int] = attrs.field(
        factory=lambda: defaultdict(int)
    )

    def count(self, job: Job, sign: int, day: int) -> None:
        self.states[(job.state.value, day)] += sign
        minute = finished_minute(job)
        if minute is not None:
            self.finished[(minute, job.state.value, day)] += sign
            if job.state is JobState.FAILED and job.name is not None:
                self.failures[(minute, job.name, day)] += sign

    def rows(self) -> tuple[list[Row], list[Row], list[Row]]:
        """The changed counts of job_states, job_finished and job_failures, in key order
        (two writers adding to the same counts lock them in one order)."""

        def changed(counts: dict[Any, int]) -> list[Row]:
            return sorted((*key, n) for key, n in counts.items() if n)

        return changed(self.states), changed(self.finished), changed(self.failures)

    def __bool__(self) -> bool:
        return any(any(rows) for rows in self.rows())


def add_counts_sql(marker: str, shard: str) -> tuple[str, str, str]:
    """Upserts adding to job_states, job_finished and job_failures (rows as
    :meth:`Rollup.rows`); ``shard`` is the SQL of the writer's shard."""
    p = marker

    def upsert(table: str, key: tuple[str, ...]) -> str:
        names, values = ", ".join(key), ", ".join([p] * len(key))
        return (
            f"INSERT INTO {table} ({names}, shard, jobs) VALUES ({values}, {shard}, {p})"
            f" ON CONFLICT ({names}, shard) DO UPDATE SET jobs = {table}.jobs + excluded.jobs"
        )

    return (
        upsert("job_states", ("state", "day")),
        upsert("job_finished", ("minute", "state", "day")),
        upsert("job_failures", ("minute", "name", "day")),
    )


def write_counts(cursor: Any, statements: Sequence[str], rollup: Rollup) -> None:
    """Add ``rollup`` to the counts with ``statements`` (:func:`add_counts_sql`'s, for the
    writer's shard) on a DB-API cursor or connection."""
    for sql, rows in zip(statements, rollup.rows(), strict=True):
        if rows:
            cursor.executemany(sql, rows)


def rollups_from_jobs(day: str) -> tuple[str, ...]:
    """The counts from scratch, as migration 0009 fills them for the jobs stored before it
    (bench.queries.replicate, which copies jobs in SQL, refills them with these); ``day``
    is the SQL of a job row's day partition."""
    return (
        "DELETE FROM job_states",
        "DELETE FROM job_finished",
        "DELETE FROM job_failures",
        f"INSERT INTO job_states (state, day, shard, jobs) SELECT state, {day}, 0, count(*)"
        " FROM jobs GROUP BY 1, 2",
        "INSERT INTO job_finished (minute, state, day, shard, jobs)"
        f" SELECT CAST(floor(finished_at / 60) AS BIGINT), state, {day}, 0, count(*) FROM jobs"
        " WHERE state IN ('completed', 'failed') AND abs(finished_at) < 9007199254740992"
        " GROUP BY 1, 2, 3",
        "INSERT INTO job_failures (minute, name, day, shard, jobs)"
        f" SELECT CAST(floor(finished_at / 60) AS BIGINT), name, {day}, 0, count(*) FROM jobs"
        " WHERE state = 'failed' AND name IS NOT NULL AND abs(finished_at) < 9007199254740992"
        " GROUP BY 1, 2, 3",
    )


def _rebuild(tx: Transaction, job_ids: list[str]) -> list[Job]:
    if not job_ids:
        return []
    history: dict[str, list[JobEvent]] = defaultdict(list)
    for event in tx.load_events(job_ids):
        history[event.job_id].append(event)
    return [
        merge.rebuild(job_id, history[job_id][0].framework, history[job_id])
        for job_id in job_ids
    ]


def _fold_workers(tx: Transaction, events: list[WorkerEvent]) -> list[Worker]:
    if not events:
        return []
    stored = tx.lock_workers(sorted({event.hostname for event in events}))
    current = {hostname: attrs.evolve(worker) for hostname, worker in stored.items()}
    for event in sorted(events, key=lambda event: event.timestamp):
        worker = current.get(event.hostname)
        if worker is None:
            worker = current[event.hostname] = Worker(event.hostname, event.framework)
        elif worker.last_heartbeat is not None and event.timestamp < worker.last_heartbeat:
            continue  # older than what the row says: a late heartbeat must not revive it
        worker.status = "offline" if event.type == "offline" else "online"
        worker.last_heartbeat = worker.updated_at = event.timestamp
        for name in ("freq", "active", "processed", "loadavg", "pid", "sw_ver"):
            value = getattr(event, name)
            if value is not None:
                setattr(worker, name, value)
        if event.type == "offline":
            # It runs nothing now, whatever its last heartbeat said (the monitor's offline
            # event carries no count): what it held is lost, or the broker delivers it again.
            worker.active = 0
        if event.extra:
            worker.extra = {**worker.extra, **event.extra}
    changed = [w for h, w in sorted(current.items()) if stored.get(h) != w]
    tx.write_workers(changed)
    return changed


def upsert_workers_sql(marker: str) -> str:
    updates = ", ".join(f"{c} = excluded.{c}" for c in WORKER_COLUMNS[1:])
    return (
        f"INSERT INTO workers ({cols(WORKER_COLUMNS)})"
        f" VALUES ({', '.join([marker] * len(WORKER_COLUMNS))})"
        f" ON CONFLICT (hostname) DO UPDATE SET {updates}"
        # Another process may have stored a later heartbeat meanwhile: keep it.
        " WHERE workers.last_heartbeat IS NULL"
        " OR excluded.last_heartbeat >= workers.last_heartbeat"
    )


def set_worker_queues_sql(marker: str) -> str:
    """Parameters per worker: hostname, framework, queues (JSON text), concurrency.

    A worker that answered before its first heartbeat was stored gets its row now
    (it is online: it answered); heartbeats fill in the rest.
    """
    p = marker
    return (
        "INSERT INTO workers (hostname, framework, status, queues, concurrency)"
        f" VALUES ({p}, {p}, 'online', {p}, {p})"
        " ON CONFLICT (hostname) DO UPDATE"
        " SET queues = excluded.queues, concurrency = excluded.concurrency"
    )


def worker_queues_rows(workers: list[WorkerQueues]) -> list[Row]:
    return [(w.hostname, w.framework, dumps(w.queues), w.concurrency) for w in workers]


SAMPLE_COLUMNS = ("name", "framework", "broker", "timestamp", "depth", "reserved", "consumers")


def sample_to_row(sample: QueueSample) -> Row:
    return (
        sample.name, sample.framework, sample.broker, sample.timestamp, sample.depth,
        sample.reserved, sample.consumers,
    )


def sample_from_row(row: Sequence[Any]) -> QueueSample:
    name, framework, broker, timestamp, depth, reserved, consumers = row
    return QueueSample(name, framework, broker, timestamp, depth, reserved, consumers)


def record_samples_sql(marker: str) -> tuple[str, str]:
    """Append to the time series, and keep the latest sample per queue in ``queues``."""
    values = ", ".join([marker] * len(SAMPLE_COLUMNS))
    updates = ", ".join(
        f"{c} = excluded.{c}" for c in SAMPLE_COLUMNS if c not in ("name", "broker")
    )
    return (
        f"INSERT INTO queue_samples ({cols(SAMPLE_COLUMNS)}) VALUES ({values})",
        f"INSERT INTO queues ({cols(SAMPLE_COLUMNS)}) VALUES ({values})"
        f" ON CONFLICT (name, broker) DO UPDATE SET {updates}"
        " WHERE excluded.timestamp >= queues.timestamp",
    )


# -- API keys -------------------------------------------------------------------

API_KEY_COLUMNS = ("id", "name", "created_at", "revoked_at", "last_used_at")
API_KEY_PREFIX = "sluice_"  # lets secret scanners recognise a leaked key
LAST_USED_EVERY_S = 60.0


def new_api_key() -> tuple[str, str]:
    """A fresh key and the hash to store."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_api_key(key)


def hash_api_key(key: str) -> str:
    # A fast hash is right here: keys are 256 random bits, so there is nothing to
    # brute-force, unlike passwords. argon2 would cost ~0.1 s of CPU on every request.
    return hashlib.sha256(key.encode()).hexdigest()


def api_key_from_row(row: Row) -> ApiKey:
    id_, name, created_at, revoked_at, last_used_at = row
    return ApiKey(int(id_), name, created_at, revoked_at, last_used_at)


def api_key_stale(key: ApiKey, now: float) -> bool:
    """Whether ``last_used_at`` is old enough to be written again."""
    return key.last_used_at is None or now - key.last_used_at >= LAST_USED_EVERY_S

# -- migrations -----------------------------------------------------------------


def migrations(dialect: str) -> list[tuple[int, str]]:
    """``(version, sql)`` of the package's migrations for ``dialect``, in order.

    Files are ``migrations/<dialect>/NNNN_name.sql``; the number is the version.
    """
    folder = importlib.resources.files("sluice_storage") / "migrations" / dialect
    found = [
        (int(entry.name.split("_", 1)[0]), entry.read_text())
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found)


# -- reads ------------------------------------------------------------------------


class Dialect(Protocol):
    @property
    def marker(self) -> str:
        """The driver's positional parameter: "?" or "%s"."""

    def any_of(self, column: str, values: Collection[str]) -> tuple[str, list[Any]]:
        """SQL true when ``column`` is one of ``values``."""

    def text_match(self, q: str) -> tuple[str, list[Any]]:
        """SQL for the free-text filter: id prefix, or substring of name/args/kwargs/exception."""

    def text_match_row(self, q: str) -> tuple[str, list[Any]]:
        """The same filter as :meth:`text_match`, tested on each row read (no text index)."""


# A free-text search first reads this many of the newest jobs itself; see RecentRows.
RECENT_ROWS = 10_000


@attrs.frozen
class RecentRows:
    """A :class:`Dialect` whose free-text filter reads the newest ``rows`` jobs below ``cursor``.

    A text index hands over every match before the newest can be picked: a
    common term ("timed out" in 100,000 of a million jobs) took 280 ms that way
    on SQLite. A page of such a term is among the newest jobs, found by reading
    a few hundred rows. When these rows hold a full page it is the right page
    (every other job is older); when not, the index answers.
    """

    base: Dialect
    cursor: int | None
    rows: int = RECENT_ROWS

    @property
    def marker(self) -> str:
        return self.base.marker

    def any_of(self, column: str, values: Collection[str]) -> tuple[str, list[Any]]:
        return self.base.any_of(column, values)

    def text_match(self, q: str) -> tuple[str, list[Any]]:
        below, params = (
            ("", []) if self.cursor is None else (f"WHERE seq < {self.marker}", [self.cursor])
        )
        newest = f"(SELECT coalesce(max(seq), 0) FROM jobs {below}) - {int(self.rows)}"
        sql, values = self.base.text_match_row(q)
        return f"seq > {newest} AND {sql}", [*params, *values]

    def text_match_row(self, q: str) -> tuple[str, list[Any]]:
        return self.base.text_match_row(q)


def id_prefixes(q: str) -> list[str]:
    """The id prefixes a free-text search tries. Ids match case-sensitively (so their
    index answers), and uuids are stored lower case: one typed or copied in capitals
    is tried lower-cased as well."""
    return list(dict.fromkeys([q, q.lower()]))


def like_escape(text: str) -> str:
    """``text`` as a literal inside a LIKE pattern (escape character backslash)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# Stuck jobs. Active ones are judged against their name's usual runtime: the
# mean of its last TYPICAL_RUNS completions (the (name, seq) index finds them
# newest first), times STUCK_RUNTIME_FACTOR, never under STUCK_ACTIVE_FLOOR_S
# (a 50 ms task running 1 s is not stuck). A name with no completed run yet
# gets the queued threshold.
TYPICAL_RUNS = 100
STUCK_RUNTIME_FACTOR = 5
STUCK_ACTIVE_FLOOR_S = 60


def stuck_after(config: Config) -> float:
    """The ``--stuck-after`` option, in seconds."""
    return config.get(STUCK_AFTER)


def stuck_sql(marker: str) -> tuple[str, str]:
    """The two kinds of stuck job: queued (parameter: ``now - stuck_after``) and active
    (parameters: ``now``, ``stuck_after``). See :func:`list_jobs_sql`."""
    p = marker
    typical = f"avg(r.runtime) * {STUCK_RUNTIME_FACTOR}"
    return f"state = 'queued' AND sent_at < {p}", f"""state = 'active' AND started_at < {p} - (
    SELECT CASE WHEN count(r.runtime) = 0 THEN {p}
        WHEN {typical} > {STUCK_ACTIVE_FLOOR_S} THEN {typical}
        ELSE {STUCK_ACTIVE_FLOOR_S} END
    FROM (SELECT runtime FROM jobs r
        WHERE r.name = jobs.name AND r.state = 'completed' AND r.runtime IS NOT NULL
        ORDER BY r.seq DESC LIMIT {TYPICAL_RUNS}) r)"""


def job_filters(
    query: JobQuery,
    dialect: Dialect,
    *,
    now: float | None = None,
    stuck_after: float = DEFAULT_STUCK_AFTER_S,
) -> list[tuple[list[str], list[Any]]]:
    """The query's filters and cursor as SQL conditions and their parameters, one list
    per kind of job it asks for (a stuck job is one of two kinds; see below).

    ``now`` and ``stuck_after`` (seconds) judge ``query.stuck``; ``now`` defaults to the clock.
    """
    p = dialect.marker
    where: list[str] = []
    params: list[Any] = []

    def add(sql: str, *values: Any) -> None:
        where.append(sql)
        params.extend(values)

    if query.q:
        sql, values = dialect.text_match(query.q)
        add(sql, *values)
    def one_of(column: str, values: list[str]) -> None:
        if len(values) == 1:
            # Plain equality lets the (column, seq) index deliver rows already in order.
            add(f"{column} = {p}", values[0])
        elif values:
            sql, params = dialect.any_of(column, values)
            add(sql, *params)

    one_of("state", sorted(s.value for s in query.states))
    one_of("id", sorted(query.ids))
    for column in ("name", "queue", "worker", "framework"):
        value = getattr(query, column)
        if value is not None:
            add(f"{column} = {p}", value)
    if query.since is not None:
        add(f"created_at >= {p}", query.since)
    if query.until is not None:
        add(f"created_at <= {p}", query.until)
    if query.cursor is not None:
        add(f"seq < {p}", query.cursor)
    if query.stuck:
        # Queued and active jobs are each read newest first from the (state, seq)
        # index. One "queued OR active" filter was read as a bitmap of both
        # states instead: on PostgreSQL that index holds an entry for every
        # version of every job (each was queued once) until VACUUM, and under
        # ingest the bitmap visited the whole table, 10 s a /metrics scrape.
        at = time.time() if now is None else now
        queued, active = stuck_sql(p)
        return [
            ([*where, queued], [*params, at - stuck_after]),
            ([*where, active], [*params, at, stuck_after]),
        ]
    return [(where, params)]


def list_jobs_sql(
    query: JobQuery,
    dialect: Dialect,
    *,
    now: float | None = None,
    stuck_after: float = DEFAULT_STUCK_AFTER_S,
    window_first: bool = False,
) -> tuple[str, list[Any]]:
    """The page query: ``JOB_COLUMNS`` then ``seq``, newest first, one row past the page.

    ``now`` and ``stuck_after`` as for :func:`job_filters`.
    ``window_first`` (PostgreSQL): read every job matching the filters, then take the
    newest, instead of walking the jobs newest first until a page matches; right for a
    small time window in the past, which the walk reaches only after every newer job.
    """
    p = dialect.marker
    # The page's seqs first, then their rows: a filter that matches many jobs (a
    # day of them, say) sorts their seqs, read from an index, not their whole rows.
    limit = query.limit + 1
    kinds = job_filters(query, dialect, now=now, stuck_after=stuck_after)
    selects, values = [], []
    for conditions, kind_params in kinds:
        select = "SELECT seq FROM jobs"
        if conditions:
            select += " WHERE " + " AND ".join(conditions)
        if window_first:
            # OFFSET 0 keeps the planner from merging the two levels back into the walk.
            select = f"SELECT seq FROM ({select} OFFSET 0) AS window_"
        selects.append(f"{select} ORDER BY seq DESC LIMIT {p}")
        values += [*kind_params, limit]
    sql = f"SELECT {cols(JOB_COLUMNS)}, seq FROM jobs WHERE seq IN ({{}}) ORDER BY seq DESC"
    if len(selects) == 1:
        return sql.format(selects[0]), values
    # Each kind gave a page: the newest of both make the page.
    union = " UNION ALL ".join(
        f"SELECT seq FROM ({select}) AS kind_{i}" for i, select in enumerate(selects)
    )
    return f"{sql.format(union)} LIMIT {p}", [*values, limit]


def count_jobs_sql(
    query: JobQuery,
    dialect: Dialect,
    at_most: int,
    *,
    now: float | None = None,
    stuck_after: float = DEFAULT_STUCK_AFTER_S,
) -> tuple[str, list[Any]]:
    """How many jobs match the query's filters (its cursor aside), counting no more
    than ``at_most`` of each kind: with no order to keep, the database reads them from
    whichever index suits the filters and stops there, whatever the table's size."""
    selects, values = [], []
    for conditions, params in job_filters(
        attrs.evolve(query, cursor=None), dialect, now=now, stuck_after=stuck_after
    ):
        where = " WHERE " + " AND ".join(conditions) if conditions else ""
        selects.append(f"SELECT 1 AS one FROM jobs{where} LIMIT {dialect.marker}")
        values += [*params, at_most]
    union = " UNION ALL ".join(
        f"SELECT one FROM ({select}) AS kind_{i}" for i, select in enumerate(selects)
    )
    return f"SELECT count(*) FROM ({union}) AS matched", values


def page(rows: list[Row], limit: int) -> Page:
    jobs = [job_from_row(row[:-1]) for row in rows[:limit]]
    more = len(rows) > limit
    return Page(jobs=jobs, next_cursor=rows[limit - 1][-1] if more else None)


QUEUE_WINDOW_S = 300.0  # queue rates cover jobs that finished or started this recently

# Queues named by jobs, without reading every job: walk the (queue, seq) index
# from one distinct value to the next (a loose index scan).
JOB_QUEUES_SQL = """
WITH RECURSIVE q(name) AS (
    SELECT min(queue) FROM jobs
    UNION ALL
    SELECT (SELECT min(queue) FROM jobs WHERE queue > q.name) FROM q WHERE q.name IS NOT NULL
)
SELECT name, (SELECT framework FROM jobs WHERE queue = q.name ORDER BY seq DESC LIMIT 1)
FROM q WHERE name IS NOT NULL
"""

LATEST_SAMPLES_SQL = (
    "SELECT name, framework, broker, timestamp, depth, reserved, consumers FROM queues"
)


def queue_rates_sql(marker: str) -> str:
    """Per queue: jobs finished, failed, and the mean wait of jobs started in the window.

    Parameters: see :func:`queue_rates_params`.
    """
    p = marker
    return f"""
WITH recent AS MATERIALIZED (
    SELECT queue, state, sent_at, started_at, finished_at FROM jobs WHERE updated_at >= {p}
)
SELECT queue,
    sum(CASE WHEN finished_at >= {p} AND finished_at <= {p} THEN 1 ELSE 0 END),
    sum(CASE WHEN finished_at >= {p} AND finished_at <= {p} AND state = 'failed'
        THEN 1 ELSE 0 END),
    avg(CASE WHEN started_at >= {p} AND started_at <= {p} AND sent_at IS NOT NULL
        THEN started_at - sent_at END)
FROM recent
WHERE queue IS NOT NULL
GROUP BY queue
"""


def queue_rates_params(now: float) -> list[float]:
    start = now - QUEUE_WINDOW_S
    return [start, start, now, start, now, start, now]


def queue_stats(
    samples: Iterable[Row], job_queues: Iterable[Row], rates: Iterable[Row]
) -> list[QueueStats]:
    """Every queue known from probe samples or from jobs, with its latest sample and rates."""
    by_queue = {name: (finished, failed, wait) for name, finished, failed, wait in rates}
    minutes = QUEUE_WINDOW_S / 60

    def stats(name: str, framework: str, broker: str | None, sample: Row | None) -> QueueStats:
        finished, failed, wait = by_queue.get(name, (0, 0, None))
        finished, failed = int(finished or 0), int(failed or 0)
        timestamp, depth, reserved, consumers = sample or (None, None, None, None)
        return QueueStats(
            name=name, framework=framework, broker=broker, depth=depth, reserved=reserved,
            consumers=consumers, throughput_per_min=finished / minutes,
            failure_rate=failed / finished if finished else 0.0,
            avg_wait_s=None if wait is None else float(wait), updated_at=timestamp,
        )

    out = [
        stats(name, framework, broker, (timestamp, depth, reserved, consumers))
        for name, framework, broker, timestamp, depth, reserved, consumers in samples
    ]
    sampled = {queue.name for queue in out}
    out += [
        stats(name, framework, None, None)
        for name, framework in job_queues
        if name not in sampled
    ]
    return sorted(out, key=lambda queue: (queue.name, queue.broker or ""))


# -- history (dashboard charts) ---------------------------------------------------------


def queue_depth_history_sql(marker: str) -> str:
    """Parameters: name, broker, since."""
    p = marker
    return (
        f"SELECT timestamp, depth FROM queue_samples"
        f" WHERE name = {p} AND broker = {p} AND timestamp >= {p} AND depth IS NOT NULL"
        " ORDER BY timestamp"
    )


# The overview's windows are read from the counts ingest keeps (migration 0009): what
# they cost is the minutes of the window, whatever the database holds. A window starts
# at the minute that holds ``since``: that minute's jobs count whole.
def job_throughput_sql(marker: str) -> str:
    """Parameters: the minute of since, bucket seconds. Rows: (bucket number, completed,
    failed)."""
    p = marker
    return f"""
SELECT floor(minute * 60.0 / {p}) AS bucket,
    sum(CASE WHEN state = 'completed' THEN jobs ELSE 0 END),
    sum(CASE WHEN state = 'failed' THEN jobs ELSE 0 END)
FROM job_finished
WHERE minute >= {p}
GROUP BY bucket
HAVING sum(jobs) <> 0
ORDER BY bucket
"""


def throughput(rows: Iterable[Row], bucket_s: float) -> list[tuple[float, int, int]]:
    return [(float(bucket) * bucket_s, int(done), int(failed)) for bucket, done, failed in rows]


OUTCOME_NAMES = 500  # task names counted by one statement (name_outcomes)


def top_failing_sql(marker: str) -> str:
    """Parameters: the minute of since, limit."""
    p = marker
    return f"""
SELECT name, sum(jobs) AS failed
FROM job_failures
WHERE minute >= {p}
GROUP BY name
HAVING sum(jobs) > 0
ORDER BY failed DESC, name
LIMIT {p}
"""


def minute_of(since: float) -> int:
    return math.floor(since / 60)


# -- what both backends run alike -------------------------------------------------


class SharedSql:
    """The Storage methods whose SQL is the same on both backends.

    A backend provides ``_read`` / ``_write`` (run a function on a connection in
    a worker thread), its driver's placeholder and its unique-violation error, its
    side of an ingest transaction, and which of its driver's errors a batch's own
    values cause.
    """

    _marker: str
    _duplicate_key: type[Exception]
    _transaction: Callable[[Any], Transaction]

    @staticmethod
    def _refused_data(exc: Exception) -> bool:
        """Whether ``exc`` is the database refusing a value of the batch (it would fail
        again), not the database being away, full or locked (worth retrying)."""
        raise NotImplementedError

    @staticmethod
    def _refused_writes(exc: Exception) -> str:
        """Why the database refuses every write, when ``exc`` says it does (its disk is
        full, it is read-only, Sluice may not write): words /healthz may show; else ''."""
        raise NotImplementedError
    _events_of_job: str  # the WHERE clause of a job's timeline, its id the parameter
    _dialect: Dialect
    stuck_after: float
    recent_rows = RECENT_ROWS  # see RecentRows

    async def _read(self, fn: Callable[[Any], T]) -> T:
        raise NotImplementedError

    async def _write(self, fn: Callable[[Any], T]) -> T:
        raise NotImplementedError

    async def ingest(
        self, job_events: list[JobEvent], worker_events: list[WorkerEvent]
    ) -> IngestResult:
        try:
            return await self._write(
                lambda conn: ingest(self._transaction(conn), job_events, worker_events)
            )
        except Exception as exc:
            if self._refused_data(exc):
                raise RejectedData(f"{type(exc).__name__}: {exc}") from exc
            if reason := self._refused_writes(exc):
                raise WritesRefused(reason, exc) from exc
            raise

    async def dead_letter(self, letters: list[DeadLetter]) -> None:
        p = self._marker
        rows = [(letter.kind, letter.event, letter.reason, letter.created_at) for letter in letters]

        def write(conn: Any) -> None:
            cur = conn.cursor()
            cur.executemany(
                f"INSERT INTO dead_letters (kind, event, reason, created_at)"
                f" VALUES ({p}, {p}, {p}, {p})",
                rows,
            )
            cur.execute(
                f"DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - {p}",
                (DEAD_LETTERS_KEPT,),
            )

        if rows:
            await self._write(write)

    async def record_gap(self, gap: Gap) -> int:
        p = self._marker
        row = (gap.source, gap.cause, gap.started_at, gap.ended_at, gap.reconciled_at, gap.summary)

        def write(conn: Any) -> int:
            cur = conn.cursor()
            cur.execute(
                "INSERT INTO gaps (source, cause, started_at, ended_at, reconciled_at, summary)"
                f" VALUES ({p}, {p}, {p}, {p}, {p}, {p}) RETURNING id",
                row,
            )
            return int(cur.fetchone()[0])

        return await self._write(write)

    async def gap_reconciled(self, gap_id: int, at: float, summary: str) -> None:
        p = self._marker
        await self._write(
            lambda conn: conn.cursor().execute(
                f"UPDATE gaps SET reconciled_at = {p}, summary = {p} WHERE id = {p}",
                (at, summary, gap_id),
            )
        )

    async def list_gaps(self, limit: int) -> list[Gap]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT source, cause, started_at, ended_at, reconciled_at, summary, id"
                f" FROM gaps ORDER BY ended_at DESC, id DESC LIMIT {self._marker}",
                (limit,),
            ).fetchall()
        )
        return [Gap(*row) for row in rows]

    async def mark_listening(self, marks: dict[str, float]) -> None:
        p = self._marker

        def write(conn: Any) -> None:
            conn.cursor().executemany(
                f"INSERT INTO listening (source, heard_until) VALUES ({p}, {p})"
                " ON CONFLICT (source) DO UPDATE SET heard_until = excluded.heard_until"
                " WHERE listening.heard_until < excluded.heard_until",
                list(marks.items()),
            )

        if marks:
            await self._write(write)

    async def listening_marks(self) -> dict[str, float]:
        rows = await self._read(
            lambda conn: conn.execute("SELECT source, heard_until FROM listening").fetchall()
        )
        return {source: until for source, until in rows}

    async def last_heard(self) -> float | None:
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT (SELECT max(updated_at) FROM jobs),"
                " (SELECT max(last_heartbeat) FROM workers)"
            ).fetchone()
        )
        heard = [value for value in row if value is not None]
        return max(heard) if heard else None

    # -- sluice redact ----------------------------------------------------------------

    # Whether job_events is keyed by its job's seq (SQLite) rather than its id.
    _events_by_seq: bool = False
    _lock_rows = ""  # what locks the rows a SELECT reads until the transaction ends
    partition_day_sql = "0"  # the SQL of a job row's day partition (see Rollup)

    def _prune_scope(self, policy: RetentionPolicy, cutoff: float, now: float) -> str:
        """SQL narrowing a state's prune (``cutoff``: see RetentionPolicy.scan) to the rows
        that may be deleted one by one (PostgreSQL: not those its drops take)."""
        return "1 = 1"

    def _left_to_drop(self, policy: RetentionPolicy, job: Job, day: int) -> bool:
        """Whether an expired job goes with its day's partition, not by a DELETE."""
        return False

    def _scrubbing(self, conn: Any) -> None:
        """Called first in each transaction that replaces secrets."""

    def _reindex(self, conn: Any, jobs: list[tuple[int, Job]]) -> None:
        """Write the search entries of these ``(seq, job)`` (an index of its own only)."""

    async def _scrubbed(self) -> str:
        """After every replacement: remove what the files still hold, or say how to."""
        return ""

    async def redact(
        self, redactor: Redactor, *, apply: bool, batch: int = REDACT_BATCH
    ) -> Redacted:
        run = self._write if apply else self._read
        total, after = Redacted(), 0
        while True:
            found = await run(
                functools.partial(self._redact_jobs, redactor=redactor, after=after,
                                  batch=batch, apply=apply)
            )
            if found is None:
                break
            after, counts = found
            total += counts
        total += await run(
            functools.partial(self._redact_dead_letters, redactor=redactor, apply=apply)
        )
        if apply:
            total = attrs.evolve(total, note=await self._scrubbed())
        return total

    def _redact_jobs(
        self, conn: Any, *, redactor: Redactor, after: int, batch: int, apply: bool
    ) -> tuple[int, Redacted] | None:
        """The next ``batch`` jobs after seq ``after`` and their events: the last seq
        read and the counts; None past the last job."""
        p = self._marker
        last = conn.execute(
            f"SELECT max(seq) FROM (SELECT seq FROM jobs WHERE seq > {p} ORDER BY seq LIMIT {p})"
            " AS batch",
            (after, batch),
        ).fetchone()[0]
        if last is None:
            return None
        # Locked as ingest locks them, in id order (PostgreSQL; SQLite's write lock is
        # the database's): a job ingest folds meanwhile is not written back stale.
        rows = conn.execute(
            f"SELECT seq, {cols(JOB_COLUMNS)} FROM jobs WHERE seq > {p} AND seq <= {p}"
            f" ORDER BY id{self._lock_rows if apply else ''}",
            (after, last),
        ).fetchall()
        jobs = [(row[0], job_from_row(row[1:])) for row in rows]
        key = "job_seq" if self._events_by_seq else "job_id"
        keys = {job.id: seq if self._events_by_seq else job.id for seq, job in jobs}
        where, params = self._dialect.any_of(key, list(keys.values()))
        events = [
            event_from_row(row)
            for row in conn.execute(
                f"SELECT {cols(EVENT_COLUMNS)} FROM job_events WHERE {where}", params
            ).fetchall()
        ]
        changed_jobs = [(seq, new) for seq, job in jobs if (new := redactor.job(job)) is not job]
        changed_events = [
            redacted for event in events if (redacted := redactor.job_event(event)) is not event
        ]
        if apply and (changed_jobs or changed_events):
            self._scrubbing(conn)
            cur = conn.cursor()
            cur.executemany(
                f"UPDATE jobs SET args = {p}, kwargs = {p}, result = {p}, exception = {p},"
                f" traceback = {p}, extra = {p} WHERE seq = {p}",
                [
                    (job.args, job.kwargs, job.result, job.exception, job.traceback,
                     dumps(job.extra), seq)
                    for seq, job in changed_jobs
                ],
            )
            cur.executemany(
                f"UPDATE job_events SET fields = {p}, extra = {p} WHERE {key} = {p} AND id = {p}",
                [
                    (dumps_object(e.fields), dumps_object(e.extra), keys[e.job_id], e.id)
                    for e in changed_events
                ],
            )
            self._reindex(conn, changed_jobs)
        return last, Redacted(
            jobs=len(jobs), jobs_changed=len(changed_jobs),
            events=len(events), events_changed=len(changed_events),
        )

    def _redact_dead_letters(self, conn: Any, *, redactor: Redactor, apply: bool) -> Redacted:
        # At most DEAD_LETTERS_KEPT rows: one transaction.
        rows = conn.execute("SELECT id, event FROM dead_letters").fetchall()
        changed = [
            (text, id_) for id_, event in rows if (text := redactor.json_text(event)) != event
        ]
        if apply and changed:
            self._scrubbing(conn)
            conn.cursor().executemany(
                f"UPDATE dead_letters SET event = {self._marker} WHERE id = {self._marker}",
                changed,
            )
        return Redacted(dead_letters=len(rows), dead_letters_changed=len(changed))

    # -- retention (sluice_core/retention.py) ----------------------------------------

    def _unindex(self, conn: Any, seqs: list[int]) -> None:
        """Delete the search entries of these jobs (an index of its own only)."""

    async def _pruned(self) -> None:
        """After a prune that deleted rows: give the space back where the backend can."""

    def _database_bytes(self, conn: Any) -> int:
        raise NotImplementedError

    def _partitions_held(self, conn: Any) -> tuple[int | None, int, float | None]:
        """Day partitions held, dropped so far, the last drop's time (see Footprint)."""
        return None, 0, None

    async def prune(
        self,
        policy: RetentionPolicy,
        now: float,
        *,
        dry_run: bool = False,
        batch: int = PRUNE_BATCH,
    ) -> Pruned:
        run = self._read if dry_run else self._write
        total = Pruned(dry_run=dry_run)
        size = min(batch, PRUNE_CHUNK_FIRST)
        for state, cutoff in policy.scan(now).items():
            after: tuple[float, int] | None = None
            while True:
                found = await run(
                    functools.partial(
                        self._prune_chunk, policy=policy, state=state, cutoff=cutoff, now=now,
                        after=after, batch=size, dry_run=dry_run,
                    )
                )
                if found is None:
                    break
                # The write limiter is fair (first come, first served): an ingest waiting
                # for the writer takes it before this loop's next chunk does.
                after, counts = found
                total += counts
                size = next_chunk(size, counts.longest_chunk_s, batch)
        resolved_before = policy.incidents_cutoff(now)
        while resolved_before is not None:
            incidents: int = await (self._read if dry_run else self._write)(
                functools.partial(
                    self._prune_incidents, cutoff=resolved_before, batch=batch, dry_run=dry_run
                )
            )
            total += Pruned(incidents=incidents, dry_run=dry_run)
            if dry_run or incidents < batch:
                break
        if total.jobs and not dry_run:
            await self._pruned()
        return total

    def _prune_incidents(self, conn: Any, *, cutoff: float, batch: int, dry_run: bool) -> int:
        """Delete (or count) up to ``batch`` incidents resolved before ``cutoff``, with
        their timelines and notifications, and the notifications of no incident closed
        before it. Returns the incidents."""
        p = self._marker
        if dry_run:
            row = conn.execute(
                f"SELECT count(*) FROM incidents WHERE state = 'resolved' AND resolved_at < {p}",
                (cutoff,),
            ).fetchone()
            return int(row[0])
        ids = [
            row[0]
            for row in conn.execute(
                f"SELECT id FROM incidents WHERE state = 'resolved' AND resolved_at < {p}"
                f" ORDER BY id LIMIT {p}",
                (cutoff, batch),
            ).fetchall()
        ]
        cur = conn.cursor()
        if ids:
            where, params = self._dialect.any_of("incident_id", ids)
            cur.execute(f"DELETE FROM incident_log WHERE {where}", params)
            cur.execute(f"DELETE FROM outbox WHERE {where}", params)
            where, params = self._dialect.any_of("id", ids)
            cur.execute(f"DELETE FROM incidents WHERE {where}", params)
        cur.execute(
            f"DELETE FROM outbox WHERE incident_id IS NULL"
            f" AND coalesce(delivered_at, gave_up_at) < {p}",
            (cutoff,),
        )
        return len(ids)

    def _prune_chunk(
        self,
        conn: Any,
        *,
        policy: RetentionPolicy,
        state: JobState,
        cutoff: float,
        now: float,
        after: tuple[float, int] | None,
        batch: int,
        dry_run: bool,
    ) -> tuple[tuple[float, int], Pruned] | None:
        """The next ``batch`` jobs of ``state`` last changed before ``cutoff``, after the
        ``(updated_at, seq)`` cursor ``after``: those ``policy`` expires are deleted (or
        counted). The new cursor and the counts; None past the last."""
        started = time.perf_counter()
        p = self._marker
        where = [self._prune_scope(policy, cutoff, now), f"state = {p}", f"updated_at < {p}"]
        params: list[Any] = [state.value, cutoff]
        if after is not None:
            where.append(f"(updated_at, seq) > ({p}, {p})")
            params += list(after)
        # Walked by the (state, updated_at) index (migration 0011), oldest first; a kept
        # job (a longer rule for its name) is passed over by the cursor, not read again.
        found = conn.execute(
            f"SELECT updated_at, seq FROM jobs WHERE {' AND '.join(where)}"
            f" ORDER BY updated_at, seq LIMIT {p}",
            (*params, batch),
        ).fetchall()
        if not found:
            return None
        last = (found[-1][0], found[-1][1])
        # The rows themselves, locked as ingest locks them (in id order: no deadlock with
        # it), and judged as they are now: a late event may have moved one meanwhile.
        rows = conn.execute(
            f"SELECT seq, {self.partition_day_sql}, {cols(JOB_COLUMNS)} FROM jobs"
            f" WHERE {' AND '.join(where)} AND (updated_at, seq) <= ({p}, {p})"
            f" ORDER BY id{'' if dry_run else self._lock_rows}",
            (*params, *last),
        ).fetchall()
        days: dict[str, int] = {}
        expired = []
        for seq, day, *row in rows:
            job = job_from_row(row)
            expires = policy.expired(job.state, job.name, job.updated_at, now)
            if expires and not self._left_to_drop(policy, job, day):
                expired.append((seq, job))
                days[job.id] = day
        key = "job_seq" if self._events_by_seq else "job_id"
        events_where, events_params = self._dialect.any_of(
            key, [seq if self._events_by_seq else job.id for seq, job in expired]
        )
        if not expired:
            events = 0
        elif dry_run:
            events = conn.execute(
                f"SELECT count(*) FROM job_events WHERE {events_where}", events_params
            ).fetchone()[0]
        else:
            events = self._delete_jobs(conn, expired, days, events_where, events_params)
        return last, Pruned(
            {state.value: len(expired)} if expired else {},
            events=int(events),
            chunks=1,
            largest_chunk=len(expired),
            longest_chunk_s=time.perf_counter() - started,
            dry_run=dry_run,
        )

    def _delete_jobs(
        self,
        conn: Any,
        jobs: list[tuple[int, Job]],
        days: dict[str, int],
        events_where: str,
        events_params: list[Any],
    ) -> int:
        """Delete these ``(seq, job)`` (in ``days``' partitions), their events and search
        entries, and take them out
        of the overview's counts (migration 0009) as ingest would: the counts stay what
        a count of the jobs left says. Returns the events deleted."""
        cur = conn.cursor()
        cur.execute(f"DELETE FROM job_events WHERE {events_where}", events_params)
        events = int(cur.rowcount)
        self._unindex(conn, sorted(seq for seq, _ in jobs))
        ids_where, ids_params = self._dialect.any_of("id", [job.id for _, job in jobs])
        cur.execute(f"DELETE FROM jobs WHERE {ids_where}", ids_params)
        rollup = Rollup()
        for _, job in jobs:
            rollup.count(job, -1, days[job.id])
        self._transaction(conn).add_counts(rollup)
        # Counts down to nothing are rows no reader needs: a year of pruned minutes
        # would otherwise stay as zeros.
        minutes = [minute for minute, _, _ in rollup.finished]
        if minutes:
            p = self._marker
            for table in ("job_finished", "job_failures"):
                cur.execute(
                    f"DELETE FROM {table} WHERE minute >= {p} AND minute <= {p} AND jobs = 0",
                    (min(minutes), max(minutes)),
                )
        cur.execute("DELETE FROM job_states WHERE jobs = 0")
        return events

    async def footprint(self) -> Footprint:
        def read(conn: Any) -> Footprint:
            oldest = conn.execute("SELECT min(created_at) FROM jobs").fetchone()[0]
            return Footprint(self._database_bytes(conn), oldest, *self._partitions_held(conn))

        return await self._read(read)

    async def list_dead_letters(self, limit: int) -> list[DeadLetter]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT kind, event, reason, created_at, id FROM dead_letters"
                f" ORDER BY id DESC LIMIT {self._marker}",
                (limit,),
            ).fetchall()
        )
        return [DeadLetter(*row) for row in rows]

    async def get_job(self, job_id: str) -> Job | None:
        row = await self._read(
            lambda conn: conn.execute(
                f"SELECT {cols(JOB_COLUMNS)} FROM jobs WHERE id = {self._marker}", (job_id,)
            ).fetchone()
        )
        return None if row is None else job_from_row(row)

    async def job_events(self, job_id: str) -> list[JobEvent]:
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {cols(EVENT_COLUMNS)} FROM job_events WHERE {self._events_of_job}"
                " ORDER BY timestamp, id",
                (job_id,),
            ).fetchall()
        )
        return [event_from_row(row) for row in rows]

    async def list_jobs(self, query: JobQuery) -> Page:
        if query.q:
            recent = RecentRows(self._dialect, query.cursor, self.recent_rows)
            sql, params = list_jobs_sql(query, recent, stuck_after=self.stuck_after)
            rows = await self._read(lambda conn: conn.execute(sql, params).fetchall())
            if len(rows) > query.limit:
                return page(rows, query.limit)

        def read(conn: Any) -> list[Row]:
            sql, params = list_jobs_sql(
                query, self._dialect, stuck_after=self.stuck_after,
                window_first=self._window_first(conn, query),
            )
            rows: list[Row] = conn.execute(sql, params).fetchall()
            return rows

        return page(await self._read(read), query.limit)

    def _window_first(self, conn: Any, query: JobQuery) -> bool:
        """Whether to read the query's time window whole (see :func:`list_jobs_sql`)."""
        return False

    async def count_jobs(self, query: JobQuery, at_most: int) -> int:
        """The jobs matching the query's filters (not its cursor), counted up to ``at_most``."""

        async def count(dialect: Dialect) -> int:
            sql, params = count_jobs_sql(query, dialect, at_most, stuck_after=self.stuck_after)
            row = await self._read(lambda conn: conn.execute(sql, params).fetchone())
            return min(int(row[0]), at_most)

        if query.q:
            # As list_jobs: a common term has its matches among the newest jobs.
            found = await count(RecentRows(self._dialect, None, self.recent_rows))
            if found == at_most:
                return found
        return await count(self._dialect)

    async def count_jobs_by_state(self) -> dict[str, int]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT state, sum(jobs) FROM job_states GROUP BY state HAVING sum(jobs) <> 0"
            ).fetchall()
        )
        return {state: int(count) for state, count in rows}

    async def list_queues(self, now: float) -> list[QueueStats]:
        def read(conn: Any) -> list[QueueStats]:
            return queue_stats(
                conn.execute(LATEST_SAMPLES_SQL).fetchall(),
                conn.execute(JOB_QUEUES_SQL).fetchall(),
                conn.execute(queue_rates_sql(self._marker), queue_rates_params(now)).fetchall(),
            )

        return await self._read(read)

    async def queue_names(self) -> set[str]:
        def read(conn: Any) -> set[str]:
            sampled = conn.execute(LATEST_SAMPLES_SQL).fetchall()
            return {row[0] for row in sampled + conn.execute(JOB_QUEUES_SQL).fetchall()}

        return await self._read(read)

    async def queue_depth_history(
        self, name: str, broker: str, since: float
    ) -> list[tuple[float, int]]:
        sql = queue_depth_history_sql(self._marker)
        rows = await self._read(lambda conn: conn.execute(sql, (name, broker, since)).fetchall())
        return [(float(ts), int(depth)) for ts, depth in rows]

    async def job_throughput(self, since: float, bucket_s: float) -> list[tuple[float, int, int]]:
        sql = job_throughput_sql(self._marker)
        rows = await self._read(
            lambda conn: conn.execute(sql, (bucket_s, minute_of(since))).fetchall()
        )
        return throughput(rows, bucket_s)

    async def top_failing_names(self, since: float, limit: int) -> list[tuple[str, int]]:
        sql = top_failing_sql(self._marker)
        rows = await self._read(
            lambda conn: conn.execute(sql, (minute_of(since), limit)).fetchall()
        )
        return [(name, int(count)) for name, count in rows]

    async def create_api_key(self, name: str) -> tuple[ApiKey, str]:
        key, hashed = new_api_key()
        p = self._marker

        def create(conn: Any) -> ApiKey:
            try:
                row = conn.execute(
                    f"INSERT INTO api_keys (name, hash, created_at) VALUES ({p}, {p}, {p})"
                    f" RETURNING {cols(API_KEY_COLUMNS)}",
                    (name, hashed, time.time()),
                ).fetchone()
            except self._duplicate_key:
                raise ApiKeyExists(f"an active API key is already named {name!r}") from None
            return api_key_from_row(row)

        return await self._write(create), key

    async def list_api_keys(self) -> list[ApiKey]:
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {cols(API_KEY_COLUMNS)} FROM api_keys ORDER BY id"
            ).fetchall()
        )
        return [api_key_from_row(row) for row in rows]

    async def revoke_api_key(self, name: str) -> ApiKey | None:
        p = self._marker
        row = await self._write(
            lambda conn: conn.execute(
                f"UPDATE api_keys SET revoked_at = {p} WHERE name = {p} AND revoked_at IS NULL"
                f" RETURNING {cols(API_KEY_COLUMNS)}",
                (time.time(), name),
            ).fetchone()
        )
        return None if row is None else api_key_from_row(row)

    async def check_api_key(self, key: str) -> ApiKey | None:
        p = self._marker
        row = await self._read(
            lambda conn: conn.execute(
                f"SELECT {cols(API_KEY_COLUMNS)} FROM api_keys"
                f" WHERE hash = {p} AND revoked_at IS NULL",
                (hash_api_key(key),),
            ).fetchone()
        )
        if row is None:
            return None
        found, now = api_key_from_row(row), time.time()
        if api_key_stale(found, now):
            await self._write(
                lambda conn: conn.execute(
                    f"UPDATE api_keys SET last_used_at = {p} WHERE id = {p}", (now, found.id)
                )
            )
        return found

    # -- alerting (migration 0010) ------------------------------------------------------

    async def name_outcomes(
        self,
        names: Sequence[str],
        since: float,
        created_since: float,
        queue: str | None = None,
        worker: str | None = None,
    ) -> dict[str, tuple[int, int]]:
        p = self._marker
        where = [f"seq >= {p}", f"finished_at >= {p}"]
        params: list[object] = [since]
        for column, value in (("queue", queue), ("worker", worker)):
            if value is not None:
                where.append(f"{column} = {p}")
                params.append(value)

        def read(conn: Any) -> dict[str, tuple[int, int]]:
            # The first job created in the range: from there on, each name's jobs are one
            # range of its (name, seq) index, however many jobs the table holds.
            first = conn.execute(
                f"SELECT seq FROM jobs WHERE created_at >= {p} ORDER BY created_at LIMIT 1",
                (created_since,),
            ).fetchone()
            out: dict[str, tuple[int, int]] = {}
            if first is None:
                return out
            # Many names a statement (a thousand failure_rate rules are a few statements
            # a round, not a thousand), within SQLite's limit on parameters.
            for start in range(0, len(names), OUTCOME_NAMES):
                chunk = names[start : start + OUTCOME_NAMES]
                rows = conn.execute(
                    "SELECT name, sum(CASE WHEN state = 'failed' THEN 1 ELSE 0 END),"
                    " sum(CASE WHEN state IN ('failed', 'completed') THEN 1 ELSE 0 END)"
                    f" FROM jobs WHERE name IN ({', '.join([p] * len(chunk))})"
                    f" AND {' AND '.join(where)} GROUP BY name",
                    [*chunk, first[0], *params],
                ).fetchall()
                for name, failed, done in rows:
                    out[name] = int(failed or 0), int(done or 0)
            return out

        return await self._read(read)

    async def latest_queue_samples(self) -> list[QueueSample]:
        rows = await self._read(lambda conn: conn.execute(LATEST_SAMPLES_SQL).fetchall())
        return [sample_from_row(row) for row in rows]

    async def alert_channels(self) -> list[Channel]:
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {cols(CHANNEL_COLUMNS)} FROM alert_channels ORDER BY id"
            ).fetchall()
        )
        return [channel_from_row(row) for row in rows]

    async def add_alert_channel(
        self, name: str, type: str, config: Mapping[str, Any], at: float
    ) -> Channel:
        p = self._marker

        def add(conn: Any) -> Channel:
            try:
                row = conn.execute(
                    "INSERT INTO alert_channels (name, type, config, created_at)"
                    f" VALUES ({p}, {p}, {p}, {p}) RETURNING {cols(CHANNEL_COLUMNS)}",
                    (name, type, dumps(dict(config)), at),
                ).fetchone()
            except self._duplicate_key:
                raise Invalid("name", f"a channel is already named {name!r}") from None
            return channel_from_row(row)

        return await self._write(add)

    async def delete_alert_channel(self, channel_id: int) -> bool:
        p = self._marker
        row = await self._write(
            lambda conn: conn.execute(
                f"DELETE FROM alert_channels WHERE id = {p} RETURNING id", (channel_id,)
            ).fetchone()
        )
        return row is not None

    async def replace_file_channels(
        self, channels: Sequence[tuple[str, str, Mapping[str, Any]]], at: float
    ) -> list[Channel]:
        p = self._marker
        # Upserted by name (a rule's channel id stays across restarts); a channel the API
        # made is not taken over: the WHERE leaves it, and no row comes back.
        upsert = (
            "INSERT INTO alert_channels (name, type, config, created_at, from_file)"
            f" VALUES ({p}, {p}, {p}, {p}, {p}) ON CONFLICT (name) DO UPDATE SET"
            " type = excluded.type, config = excluded.config"
            f" WHERE alert_channels.from_file = {p} RETURNING {cols(CHANNEL_COLUMNS)}"
        )

        def replace(conn: Any) -> list[Channel]:
            stored = []
            for name, type_, config in channels:
                row = conn.execute(upsert, (name, type_, dumps(dict(config)), at, True, True))
                row = row.fetchone()
                if row is None:
                    raise Invalid("name", f"a channel made in the dashboard is named {name!r}")
                stored.append(channel_from_row(row))
            keep = [channel.id for channel in stored]
            conn.execute(
                f"DELETE FROM alert_channels WHERE from_file = {p}"
                + "".join(f" AND id <> {p}" for _ in keep),
                (True, *keep),
            )
            return stored

        return await self._write(replace)

    async def recent_deliveries(self, channel_id: int, since: float) -> list[float]:
        p = self._marker
        # Rows merged into a summary are closed as delivered without an attempt: not sent.
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT delivered_at FROM outbox WHERE channel_id = {p}"
                f" AND delivered_at >= {p} AND attempts > 0",
                (channel_id, since),
            ).fetchall()
        )
        return [float(at) for (at,) in rows]

    async def alert_rules(self) -> list[Rule]:
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {cols(RULE_COLUMNS)} FROM alert_rules ORDER BY id"
            ).fetchall()
        )
        return [rule_from_row(row) for row in rows]

    async def save_alert_rule(self, rule: Rule) -> Rule:
        p = self._marker
        values = rule_to_row(rule)[1:]
        names = RULE_COLUMNS[1:]

        def save(conn: Any) -> Rule:
            try:
                if rule.id == 0:
                    row = conn.execute(
                        f"INSERT INTO alert_rules ({cols(names)})"
                        f" VALUES ({', '.join([p] * len(names))}) RETURNING {cols(RULE_COLUMNS)}",
                        values,
                    ).fetchone()
                else:
                    # created_at stays as it was.
                    kept = [name for name in names if name != "created_at"]
                    row = conn.execute(
                        f"UPDATE alert_rules SET {', '.join(f'{n} = {p}' for n in kept)}"
                        f" WHERE id = {p} RETURNING {cols(RULE_COLUMNS)}",
                        (*(v for n, v in zip(names, values, strict=True) if n != "created_at"),
                         rule.id),
                    ).fetchone()
            except self._duplicate_key:
                raise Invalid("name", f"a rule is already named {rule.name!r}") from None
            if row is None:
                raise NotFound(f"no rule {rule.id}")
            return rule_from_row(row)

        return await self._write(save)

    async def delete_alert_rule(self, rule_id: int) -> bool:
        def delete(conn: Any) -> bool:
            found = conn.execute(
                f"DELETE FROM alert_rules WHERE id = {self._marker} RETURNING id", (rule_id,)
            ).fetchone()
            if found is not None:
                self._close_incidents(conn, [rule_id], time.time(), "its rule was deleted")
            return found is not None

        return await self._write(delete)

    def _close_incidents(self, conn: Any, rule_ids: list[int], at: float, why: str) -> None:
        """Resolve the open incidents of rules that are gone, without notifying."""
        p = self._marker
        for rule_id in rule_ids:
            closed = conn.execute(
                f"UPDATE incidents SET state = 'resolved', resolved_at = {p}"
                f" WHERE rule_id = {p} AND state <> 'resolved' RETURNING id",
                (at, rule_id),
            ).fetchall()
            conn.cursor().executemany(
                f"INSERT INTO incident_log (incident_id, at, what, detail)"
                f" VALUES ({p}, {p}, 'resolved', {p})",
                [(incident_id, at, why) for (incident_id,) in closed],
            )

    async def replace_file_rules(self, rules: Sequence[Rule]) -> list[Rule]:
        p = self._marker
        names = RULE_COLUMNS[1:]
        # A file rule keeps its id (and its incidents) across restarts: upserted by name.
        # A mute is an operator's, not the file's: it stays.
        updated = [n for n in names if n not in ("created_at", "muted_until")]
        upsert = (
            f"INSERT INTO alert_rules ({cols(names)}) VALUES ({', '.join([p] * len(names))})"
            f" ON CONFLICT (name) DO UPDATE SET"
            f" {', '.join(f'{n} = excluded.{n}' for n in updated)}"
            f" RETURNING {cols(RULE_COLUMNS)}"
        )

        def replace(conn: Any) -> list[Rule]:
            stored = [
                rule_from_row(conn.execute(upsert, rule_to_row(rule)[1:]).fetchone())
                for rule in rules
            ]
            keep = {rule.id for rule in stored}
            gone = [
                rule_id
                for (rule_id,) in conn.execute(
                    f"SELECT id FROM alert_rules WHERE from_file = {p}", (True,)
                ).fetchall()
                if rule_id not in keep
            ]
            for rule_id in gone:
                conn.execute(f"DELETE FROM alert_rules WHERE id = {p}", (rule_id,))
            self._close_incidents(conn, gone, time.time(), "its rule left the configuration file")
            return stored

        return await self._write(replace)

    async def open_incidents(self) -> list[Incident]:
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {cols(INCIDENT_COLUMNS)} FROM incidents"
                " WHERE state IN ('pending', 'firing') ORDER BY id"
            ).fetchall()
        )
        return [incident_from_row(row) for row in rows]

    async def list_incidents(self, state: IncidentState | None, limit: int) -> list[Incident]:
        p = self._marker
        where, params = "", list[Any]([limit])
        if state is not None:
            where, params = f"WHERE state = {p}", [str(state), limit]
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {cols(INCIDENT_COLUMNS)} FROM incidents {where}"
                f" ORDER BY id DESC LIMIT {p}",
                params,
            ).fetchall()
        )
        return [incident_from_row(row) for row in rows]

    async def get_incident(self, incident_id: int) -> Incident | None:
        row = await self._read(
            lambda conn: conn.execute(
                f"SELECT {cols(INCIDENT_COLUMNS)} FROM incidents WHERE id = {self._marker}",
                (incident_id,),
            ).fetchone()
        )
        return None if row is None else incident_from_row(row)

    async def save_incident(
        self,
        incident: Incident,
        log: Sequence[TimelineEntry] = (),
        notify: Sequence[Notification] = (),
    ) -> Incident:
        p = self._marker
        names = INCIDENT_COLUMNS[1:]
        values = incident_to_row(incident)[1:]

        def save(conn: Any) -> Incident:
            if incident.id == 0:
                row = conn.execute(
                    f"INSERT INTO incidents ({cols(names)})"
                    f" VALUES ({', '.join([p] * len(names))})"
                    " ON CONFLICT (rule_id, group_key) WHERE state <> 'resolved' DO NOTHING"
                    " RETURNING id",
                    values,
                ).fetchone()
                if row is None:  # another leader opened it first: theirs stands
                    return incident_from_row(
                        conn.execute(
                            f"SELECT {cols(INCIDENT_COLUMNS)} FROM incidents WHERE rule_id = {p}"
                            f" AND group_key = {p} AND state <> 'resolved'",
                            (incident.rule_id, incident.group_key),
                        ).fetchone()
                    )
                incident_id = int(row[0])
            else:
                # Acks and silences are the operators' (mark_incident): never written back
                # from the evaluator's copy, which may predate them.
                incident_id = incident.id
                kept = [(n, v) for n, v in zip(names, values, strict=True) if n not in MARKS]
                conn.execute(
                    f"UPDATE incidents SET {', '.join(f'{n} = {p}' for n, _ in kept)}"
                    f" WHERE id = {p}",
                    (*(v for _, v in kept), incident_id),
                )
            cur = conn.cursor()
            cur.executemany(
                f"INSERT INTO incident_log (incident_id, at, what, detail)"
                f" VALUES ({p}, {p}, {p}, {p})",
                [(incident_id, entry.at, entry.what, entry.detail) for entry in log],
            )
            self._queue(conn, [attrs.evolve(n, incident_id=incident_id) for n in notify])
            return attrs.evolve(incident, id=incident_id)

        return await self._write(save)

    async def mark_incident(
        self,
        incident_id: int,
        entry: TimelineEntry,
        *,
        acked_by: str | None = None,
        silenced_until: float | None = None,
    ) -> Incident | None:
        p = self._marker
        sets, params = [], []
        if entry.what == "acknowledged":
            sets += [f"acked_at = {p}", f"acked_by = {p}"]
            params += [entry.at, acked_by]
        if silenced_until is not None:
            sets.append(f"silenced_until = {p}")
            params.append(silenced_until)

        def write(conn: Any) -> Incident | None:
            row = conn.execute(
                f"UPDATE incidents SET {', '.join(sets) or 'id = id'} WHERE id = {p}"
                f" RETURNING {cols(INCIDENT_COLUMNS)}",
                (*params, incident_id),
            ).fetchone()
            if row is not None:
                self._log_each(conn, [incident_id], entry)
            return None if row is None else incident_from_row(row)

        return await self._write(write)

    def _queue(self, conn: Any, notifications: Sequence[Notification]) -> list[int]:
        p = self._marker
        names = OUTBOX_COLUMNS[1:]
        return [
            int(
                conn.execute(
                    f"INSERT INTO outbox ({cols(names)}) VALUES ({', '.join([p] * len(names))})"
                    " RETURNING id",
                    notification_to_row(n)[1:],
                ).fetchone()[0]
            )
            for n in notifications
        ]

    async def incident_timeline(self, incident_id: int) -> list[TimelineEntry]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT at, what, detail FROM incident_log"
                f" WHERE incident_id = {self._marker} ORDER BY id",
                (incident_id,),
            ).fetchall()
        )
        return [TimelineEntry(*row) for row in rows]

    async def due_notifications(self, now: float, limit: int) -> list[Notification]:
        p = self._marker
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {cols(OUTBOX_COLUMNS)} FROM outbox"
                " WHERE delivered_at IS NULL AND gave_up_at IS NULL"
                f" AND next_attempt_at <= {p} ORDER BY next_attempt_at, id LIMIT {p}",
                (now, limit),
            ).fetchall()
        )
        return [notification_from_row(row) for row in rows]

    async def notification_attempted(
        self,
        notification: Notification,
        entry: TimelineEntry,
        *,
        delivered: bool = False,
        retry_at: float | None = None,
    ) -> None:
        p = self._marker
        delivered_at = entry.at if delivered else None
        gave_up_at = entry.at if not delivered and retry_at is None else None

        def write(conn: Any) -> None:
            conn.execute(
                f"UPDATE outbox SET attempts = attempts + 1, delivered_at = {p},"
                f" gave_up_at = {p}, next_attempt_at = coalesce({p}, next_attempt_at)"
                f" WHERE id = {p}",
                (delivered_at, gave_up_at, retry_at, notification.id),
            )
            self._log_each(conn, concerned(notification), entry)

        await self._write(write)

    def _log_each(self, conn: Any, incident_ids: Iterable[int], entry: TimelineEntry) -> None:
        p = self._marker
        conn.cursor().executemany(
            f"INSERT INTO incident_log (incident_id, at, what, detail) VALUES ({p}, {p}, {p}, {p})",
            [(incident_id, entry.at, entry.what, entry.detail) for incident_id in incident_ids],
        )

    async def merge_notifications(
        self, merged: Sequence[Notification], summary: Notification, at: float
    ) -> Notification:
        p = self._marker

        def write(conn: Any) -> Notification:
            (summary_id,) = self._queue(conn, [summary])
            for notification in merged:
                conn.execute(
                    f"UPDATE outbox SET delivered_at = {p} WHERE id = {p}", (at, notification.id)
                )
                self._log_each(
                    conn,
                    concerned(notification),
                    TimelineEntry(at, "summarized", f"rate limit: held for summary #{summary_id}"),
                )
            return attrs.evolve(summary, id=summary_id)

        return await self._write(write)


# -- alerting rows --------------------------------------------------------------------

CHANNEL_COLUMNS = ("id", "name", "type", "config", "created_at", "from_file")
RULE_COLUMNS = (
    "id", "name", "kind", "match", "params", "severity", "channels", "for_s", "repeat_s",
    "muted_until", "from_file", "created_at", "updated_at",
)
INCIDENT_COLUMNS = (
    "id", "rule_id", "rule_name", "kind", "group_key", "labels", "state", "severity",
    "summary", "count", "started_at", "fired_at", "resolved_at", "last_notified_at",
    "last_seen_at", "acked_at", "acked_by", "silenced_until", "job_ids",
)
MARKS = frozenset({"acked_at", "acked_by", "silenced_until"})  # see mark_incident
OUTBOX_COLUMNS = (
    "id", "incident_id", "channel_id", "event", "body", "created_at", "attempts",
    "next_attempt_at",
)


def channel_from_row(row: Row) -> Channel:
    id_, name, type_, config, created_at, from_file = row
    return Channel(id=int(id_), name=name, type=type_, config=loads(config),
                   created_at=created_at, from_file=bool(from_file))


def rule_to_row(rule: Rule) -> Row:
    return (
        rule.id, rule.name, str(rule.kind), dumps(rule.match.to_dict()), dumps(dict(rule.params)),
        rule.severity, dumps(list(rule.channels)), rule.for_s, rule.repeat_s, rule.muted_until,
        rule.from_file, rule.created_at, rule.updated_at,
    )


def rule_from_row(row: Row) -> Rule:
    (id_, name, kind, match, params, severity, channels, for_s, repeat_s, muted_until,
     from_file, created_at, updated_at) = row
    return Rule(
        id=int(id_), name=name, kind=Kind(kind), match=Match(**loads(match)),
        params=loads(params), severity=severity, channels=tuple(loads(channels)),
        for_s=for_s, repeat_s=repeat_s, muted_until=muted_until, from_file=bool(from_file),
        created_at=created_at, updated_at=updated_at,
    )


def incident_to_row(incident: Incident) -> Row:
    i = incident
    return (
        i.id, i.rule_id, i.rule_name, str(i.kind), i.group_key, dumps(i.labels), str(i.state),
        i.severity, i.summary, i.count, i.started_at, i.fired_at, i.resolved_at,
        i.last_notified_at, i.last_seen_at, i.acked_at, i.acked_by, i.silenced_until,
        dumps(i.job_ids),
    )


def incident_from_row(row: Row) -> Incident:
    (id_, rule_id, rule_name, kind, group_key, labels, state, severity, summary, count,
     started_at, fired_at, resolved_at, last_notified_at, last_seen_at, acked_at, acked_by,
     silenced_until, job_ids) = row
    return Incident(
        id=int(id_), rule_id=int(rule_id), rule_name=rule_name, kind=Kind(kind),
        group_key=group_key, labels=loads(labels), state=IncidentState(state),
        severity=severity, summary=summary, count=int(count), started_at=started_at,
        fired_at=fired_at, resolved_at=resolved_at, last_notified_at=last_notified_at,
        acked_at=acked_at, acked_by=acked_by, silenced_until=silenced_until,
        job_ids=loads(job_ids), last_seen_at=last_seen_at,
    )


def notification_to_row(n: Notification) -> Row:
    return (
        n.id, n.incident_id, n.channel_id, n.event, dumps(dict(n.body)), n.created_at,
        n.attempts, n.next_attempt_at,
    )


def notification_from_row(row: Row) -> Notification:
    id_, incident_id, channel_id, event, body, created_at, attempts, next_attempt_at = row
    return Notification(
        incident_id=None if incident_id is None else int(incident_id),
        channel_id=int(channel_id), event=event, body=loads(body), created_at=created_at,
        next_attempt_at=next_attempt_at, attempts=int(attempts), id=int(id_),
    )


def concerned(notification: Notification) -> list[int]:
    """The incidents a notification speaks of: its own, or a summary's."""
    if notification.incident_id is not None:
        return [notification.incident_id]
    return [int(item["id"]) for item in notification.body.get("incidents", ())]

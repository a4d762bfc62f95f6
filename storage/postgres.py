"""PostgreSQL storage for production and for split deployments (``postgresql://...``).

psycopg 3 in worker threads, through a psycopg_pool connection pool: the pool
checks a connection before lending it, so after the server restarts (or kills
our sessions) the next call reconnects instead of failing forever.

An ingest is one transaction of a few bulk statements: the touched jobs are
read ``FOR UPDATE`` in id order (two agents folding the same job take turns,
and cannot deadlock), the batch's events are COPYed into ``job_events`` (or,
when some were stored before, through a temporary table with ``ON CONFLICT DO
NOTHING RETURNING id``, which tells which are new), and the changed rows are
COPYed and written back once.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeVar

import attrs
import orjson
import psycopg
import trio
from psycopg.types.string import TextLoader
from psycopg_pool import ConnectionPool, PoolTimeout

from sluice_core import hookimpl
from sluice_core.config import Config, redact_url
from sluice_core.model import Job, JobEvent, QueueSample, Worker, WorkerEvent
from sluice_core.probes import WorkerQueues
from sluice_core.retention import DAY, PRUNE_BATCH, RetentionPolicy
from sluice_core.storage import (
    DEFAULT_STUCK_AFTER_S,
    Change,
    IngestResult,
    JobQuery,
    Page,
    Pruned,
    StorageUnavailable,
)
from sluice_storage import common, partitions
from sluice_storage.common import EVENT_COLUMNS, JOB_COLUMNS, WORKER_COLUMNS, cols

T = TypeVar("T")

log = logging.getLogger(__name__)

READERS = 4
# Ingest transactions at once: while the server works on one batch, Sluice folds
# the next (measured, storage alone: one 24,400 events/s, two 34,000, three no more).
INGEST_WRITERS = 2
CONNECT_TIMEOUT = 10.0  # seconds to get a connection before a call fails (and is retried)
MIGRATION_LOCK = 5_811_500  # advisory lock: two processes starting together migrate in turn
# Seconds within which the server frees a dead leader's lock, and a cut-off leader knows it.
LOCK_KEEPALIVE_S = 8
# Connections that must notice a dead peer: the leader's lock, the change feed. A
# probe every 2 s, three unanswered: a dead peer is seen after about LOCK_KEEPALIVE_S.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 2,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": LOCK_KEEPALIVE_S * 1000,
}

# SQLSTATEs that refuse every write until someone acts, and what /healthz says of them.
WRITE_REFUSALS = {
    "25006": "read-only",  # read_only_sql_transaction
    "53100": "disk full",  # disk_full
    "42501": "no permission to write",  # insufficient_privilege
}

# The free-text expression; identical (as an expression) to the GIN trigram index's.
TEXT_EXPR = (
    "(coalesce(name, '') || ' ' || coalesce(args, '') || ' ' || coalesce(kwargs, '')"
    " || ' ' || coalesce(exception, ''))"
)


@hookimpl
def sluice_storage(url: str, config: Config) -> PostgresStorage | None:
    if not url.startswith(("postgresql://", "postgres://")):
        return None
    return PostgresStorage(url, stuck_after=common.stuck_after(config))


class _Lending(threading.local):
    """What the worker thread asking the pool for a connection will do with it."""

    check = True  # a write: see PostgresStorage._check


def _configure(conn: psycopg.Connection[Any]) -> None:
    # JSON columns come back as text and are decoded by common.loads (orjson), like SQLite's.
    conn.adapters.register_loader("jsonb", TextLoader)
    # "relation already exists, skipping" from the staging tables is expected on every batch.
    conn.execute("SET client_min_messages = warning")


# The trigram index reads the whole posting list of every trigram of the searched
# text: "user999750@example.com" took 0.9 s over ten million jobs, nearly all of it
# in "use", "@ex", "com" and their like, which every job has. The index is asked
# for the rarest INDEXED_CHARS of the text instead (16 ms), the rows it finds are
# checked for the whole text, and what is rare is judged on a sample of jobs.
INDEXED_CHARS = 6
SAMPLE_JOBS = 2_000
SAMPLE_TTL_S = 600.0


def _trigrams(text: str) -> set[str]:
    text = text.lower()
    return {text[i : i + 3] for i in range(len(text) - 2)}


@attrs.frozen
class TrigramSample:
    """How many of a sample of jobs' searched texts hold each trigram."""

    counts: Counter[str]
    taken_at: float

    @classmethod
    def of(cls, texts: Iterable[str], taken_at: float) -> TrigramSample:
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(_trigrams(text))
        return cls(counts, taken_at)

    def rarest_part(self, q: str) -> str:
        """The ``INDEXED_CHARS`` of ``q`` whose trigrams are least common."""
        if len(q) <= INDEXED_CHARS:
            return q
        parts = (q[i : i + INDEXED_CHARS] for i in range(len(q) - INDEXED_CHARS + 1))
        return min(parts, key=lambda part: sum(self.counts[t] for t in _trigrams(part)))


@attrs.frozen
class _Dialect:
    sample: TrigramSample | None = None
    marker = "%s"

    def any_of(self, column: str, values: Collection[str]) -> tuple[str, list[Any]]:
        return f"{column} = ANY(%s)", [list(values)]

    def text_match(self, q: str) -> tuple[str, list[Any]]:
        # The prefix match uses the text_pattern_ops index, the substring the trigram index.
        escaped = common.like_escape(q)
        prefixes = [common.like_escape(p) + "%" for p in common.id_prefixes(q)]
        ids = " OR ".join(["id LIKE %s"] * len(prefixes))
        part = q if self.sample is None else self.sample.rarest_part(q)
        if part == q:
            return f"({ids} OR {TEXT_EXPR} ILIKE %s)", [*prefixes, f"%{escaped}%"]
        contains, values = self._contains(q)
        return (
            f"({ids} OR ({TEXT_EXPR} ILIKE %s AND {contains}))",
            [*prefixes, f"%{common.like_escape(part)}%", *values],
        )

    def text_match_row(self, q: str) -> tuple[str, list[Any]]:
        # What text_match means, in a form no index answers: the planner must read
        # the newest rows (given by seq) instead of asking the trigram index, which
        # is what this filter is for.
        contains, values = self._contains(q)
        prefixes = common.id_prefixes(q)
        ids = " OR ".join(["starts_with(id, %s)"] * len(prefixes))
        return f"({ids} OR {contains})", [*prefixes, *values]

    def _contains(self, q: str) -> tuple[str, list[Any]]:
        # lower() folds case as ILIKE does.
        return f"strpos(lower({TEXT_EXPR}), lower(%s)) > 0", [q]


# -- what every process stores, told to the others (web replicas) ------------------------

CHANGES_CHANNEL = "sluice_changes"
# A NOTIFY payload must stay under 8,000 bytes: larger changes go as several.
NOTIFY_BYTES = 7_000


def encode_change(change: Change) -> list[str]:
    """``change`` as NOTIFY payloads, each under NOTIFY_BYTES: ids, not rows (a listener
    reads the rows it wants), and probe samples whole (they are small)."""
    parts: list[dict[str, Any]] = []
    new_left = change.new_jobs
    chunk: list[str] = []
    size = 0
    for job_id in change.jobs:
        if size + len(job_id) + 3 > NOTIFY_BYTES:
            parts.append({"j": chunk, "n": min(new_left, len(chunk))})
            new_left -= min(new_left, len(chunk))
            chunk, size = [], 0
        chunk.append(job_id)
        size += len(job_id) + 3
    if chunk:
        parts.append({"j": chunk, "n": min(new_left, len(chunk))})
    if change.workers:
        parts.append({"w": list(change.workers)})
    if change.queues:
        parts.append({"q": [common.sample_to_row(sample) for sample in change.queues]})
    return [orjson.dumps(part).decode() for part in parts]


def decode_change(payload: str) -> Change:
    part = orjson.loads(payload)
    return Change(
        jobs=tuple(part.get("j", ())),
        new_jobs=part.get("n", 0),
        workers=tuple(part.get("w", ())),
        queues=tuple(common.sample_from_row(row) for row in part.get("q", ())),
    )


def _notify(cur: psycopg.Cursor[Any], change: Change) -> None:
    # Inside the writing transaction: PostgreSQL delivers it at commit, never before.
    for payload in encode_change(change):
        cur.execute("SELECT pg_notify(%s, %s)", (CHANGES_CHANNEL, payload))


class PostgresChangeFeed:
    """:class:`sluice_core.storage.ChangeFeed`: LISTEN on a connection of its own, in a
    thread; reconnects with backoff and reports each (re)connection as a gap."""

    def __init__(self, conninfo: str, url: str) -> None:
        self._conninfo = conninfo
        self._url = url  # redacted, for logs

    async def follow(
        self, on_change: Callable[[Change], None], on_gap: Callable[[], None]
    ) -> None:
        token = trio.lowlevel.current_trio_token()
        stop = threading.Event()

        def deliver(payload: str) -> None:
            try:
                change = decode_change(payload)
            except (ValueError, TypeError, KeyError) as exc:  # not ours: say so, go on
                log.warning("change feed: a notification Sluice cannot read: %s", exc)
                return
            on_change(change)

        try:
            await trio.to_thread.run_sync(
                self._listen, token, deliver, on_gap, stop, abandon_on_cancel=True
            )
        finally:
            stop.set()

    def _listen(
        self,
        token: trio.lowlevel.TrioToken,
        deliver: Callable[[str], None],
        on_gap: Callable[[], None],
        stop: threading.Event,
    ) -> None:
        delay = 0.1
        while not stop.is_set():
            try:
                with psycopg.connect(
                    self._conninfo,
                    autocommit=True,
                    connect_timeout=int(CONNECT_TIMEOUT),
                    application_name="sluice-changes",
                    **KEEPALIVES,
                ) as conn:
                    conn.execute(f"LISTEN {CHANGES_CHANNEL}")
                    token.run_sync_soon(on_gap)  # what was committed before now is unheard
                    delay = 0.1
                    while not stop.is_set():
                        for notify in conn.notifies(timeout=0.5):
                            token.run_sync_soon(deliver, notify.payload)
            except psycopg.Error as exc:
                log.warning("change feed from %s: %s; again in %gs", self._url, exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, 5.0)
            except trio.RunFinishedError:
                return


def lock_key(name: str) -> int:
    """A named advisory lock's key: a signed 64-bit integer, as PostgreSQL takes it."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class AdvisoryLock:
    """:class:`sluice_core.leader.LeaderLock` as a session advisory lock on a connection of its own.

    The server releases the lock when the session ends: at once when the holder's
    process dies (its socket closes), within about LOCK_KEEPALIVE_S when its host or
    network does, because the session asks the server for short TCP keepalives (the
    server's default would hold the lock for hours). The holder checks its connection
    at every poll and, with ``tcp_user_timeout``, learns within the same bound that
    it can no longer tell, and stops leading.
    """

    def __init__(self, conninfo: str, name: str) -> None:
        self._conninfo = conninfo
        self._key = lock_key(name)
        self._conn: psycopg.Connection[Any] | None = None
        self._held = False
        self._limiter = trio.CapacityLimiter(1)

    async def hold(self) -> bool:
        return await trio.to_thread.run_sync(self._hold, limiter=self._limiter)

    async def release(self) -> None:
        await trio.to_thread.run_sync(self._close, limiter=self._limiter)

    def _hold(self) -> bool:
        try:
            if self._conn is None:
                self._conn = self._connect()
            if self._held:
                self._conn.execute("SELECT 1")
            else:
                row = self._conn.execute(
                    "SELECT pg_try_advisory_lock(%s)", (self._key,)
                ).fetchone()
                self._held = bool(row and row[0])
        except psycopg.Error:
            self._close()
        return self._held

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=int(CONNECT_TIMEOUT),
            # Which process leads, for whoever looks at pg_stat_activity.
            application_name=f"sluice-leader/{socket.gethostname()}/{os.getpid()}",
            **KEEPALIVES,
        )
        # The server's side of the same keepalives: it frees a dead holder's lock.
        for setting, value in (
            ("tcp_keepalives_idle", KEEPALIVES["keepalives_idle"]),
            ("tcp_keepalives_interval", KEEPALIVES["keepalives_interval"]),
            ("tcp_keepalives_count", KEEPALIVES["keepalives_count"]),
            ("statement_timeout", LOCK_KEEPALIVE_S * 1000),
        ):
            conn.execute(f"SET {setting} = {value}")
        return conn

    def _close(self) -> None:
        conn, self._conn, self._held = self._conn, None, False
        if conn is not None:
            conn.close()  # ends the session: the server releases the lock


def _event_key(row: common.Row) -> tuple[str, str]:
    return row[1], row[0]  # job_id, id


# A shard per connection (of ROLLUP_SHARDS): the writers of an agent, or of an HA pair,
# add to the same minute's counts without waiting for each other's commits.
ROLLUP_SHARDS = 4
_ADD_COUNTS = common.add_counts_sql("%s", f"pg_backend_pid() %% {ROLLUP_SHARDS}")


# Within this many seconds of midnight (UTC), two writers storing one new job could each
# pick their own today for it, and store it twice (a partition's unique index holds only
# its day): ingests then take turns, under this advisory lock, and the second finds the
# first's row. Wider than any two hosts' clocks should differ.
MIDNIGHT_MARGIN_S = 300.0
NEW_JOBS_LOCK = 5_811_502


class _Transaction:
    """:class:`sluice_storage.common.Transaction` on one pooled connection, in a transaction.

    ``now`` (epoch seconds) picks the day partition new jobs go to (migration 0013).
    """

    def __init__(self, conn: psycopg.Connection[Any], now: float) -> None:
        self._cur = conn.cursor()
        self._jobs_staged = False
        self._today = partitions.day_of(now)
        self._days: dict[str, int] = {}  # the stored jobs' partitions, as locked
        self._take_turns = abs(now - round(now / DAY) * DAY) < MIDNIGHT_MARGIN_S

    def insert_events(self, events: list[JobEvent]) -> set[str]:
        if not events:
            return set()
        # In the unique index's order, (job_id, id): two agents inserting the same
        # events lock them in one order, and a job's events share index pages.
        rows = sorted(
            ((*common.event_to_row(e), self.day_of(e.job_id)) for e in events), key=_event_key
        )
        # Nearly every batch is new events only: COPY them straight in. A stored
        # one (a redelivery, an HA pair's other agent) fails the COPY, undone to
        # the savepoint, and the batch goes through the staging table. (Storage
        # alone: 16.6 buffer accesses an event where staging every batch took 21.7.)
        try:
            with self._cur.connection.transaction(), self._cur.copy(
                f"COPY job_events ({cols(EVENT_COLUMNS)}, day) FROM STDIN"
            ) as copy:
                for row in rows:
                    copy.write_row(row)
            return {event.id for event in events}
        except psycopg.errors.UniqueViolation:
            return self._insert_new_events(rows)

    def _insert_new_events(self, rows: list[common.Row]) -> set[str]:
        c = cols(EVENT_COLUMNS) + ", day"
        self._cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS _sluice_events ON COMMIT DELETE ROWS"
            f" AS SELECT {c} FROM job_events WITH NO DATA"
        )
        with self._cur.copy(f"COPY _sluice_events ({c}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        self._cur.execute(
            f"INSERT INTO job_events ({c}) SELECT {c} FROM _sluice_events ORDER BY job_id, id"
            " ON CONFLICT DO NOTHING RETURNING id"
        )
        return {row[0] for row in self._cur.fetchall()}

    def lock_jobs(self, ids: list[str]) -> dict[str, Job]:
        if not ids:
            return {}
        if self._take_turns:
            self._cur.execute("SELECT pg_advisory_xact_lock(%s)", (NEW_JOBS_LOCK,))
            self._take_turns = False  # held to the end of the transaction
        self._cur.execute(
            f"SELECT day, {cols(JOB_COLUMNS)} FROM jobs WHERE id = ANY(%s)"
            " ORDER BY id FOR UPDATE",
            (ids,),
        )
        jobs = {}
        for day, *row in self._cur.fetchall():
            jobs[row[0]] = common.job_from_row(row)
            self._days[row[0]] = day
        return jobs

    def day_of(self, job_id: str) -> int:
        return self._days.get(job_id, self._today)

    def load_events(self, job_ids: list[str]) -> list[JobEvent]:
        # In their jobs' days only: the other days' indexes are not read.
        self._cur.execute(
            f"SELECT {cols(EVENT_COLUMNS)} FROM job_events WHERE job_id = ANY(%s)"
            " AND day = ANY(%s)",
            (job_ids, sorted({self.day_of(job_id) for job_id in job_ids})),
        )
        return [common.event_from_row(row) for row in self._cur.fetchall()]

    def write_jobs(self, new: list[Job], changed: list[Job]) -> set[str]:
        if not new and not changed:
            return set()
        c = cols(JOB_COLUMNS)
        if self._jobs_staged:
            self._cur.execute("DELETE FROM _sluice_jobs")
        else:
            self._cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS _sluice_jobs ON COMMIT DELETE ROWS"
                f" AS SELECT seq, day, {c}, true AS is_new FROM jobs WITH NO DATA"
            )
            self._jobs_staged = True
        # New jobs take seqs in the order they were first seen (``new`` is in that
        # order), but are inserted in id order, as every row this transaction
        # locks: two agents inserting the same new jobs then wait for each other
        # in one order, never in a cycle. (In created_at order they deadlocked:
        # two batches can see one job's first event at different times.)
        seqs: list[int] = []
        if new:
            self._cur.execute(
                "SELECT nextval(pg_get_serial_sequence('jobs', 'seq'))"
                " FROM generate_series(1, %s)",
                (len(new),),
            )
            seqs = sorted(row[0] for row in self._cur.fetchall())
        with self._cur.copy(f"COPY _sluice_jobs (seq, day, {c}, is_new) FROM STDIN") as copy:
            for seq, job in zip(seqs, new, strict=True):
                copy.write_row((seq, self._today, *common.job_to_row(job), True))
            for job in changed:
                copy.write_row((None, self.day_of(job.id), *common.job_to_row(job), False))
        raced: set[str] = set()
        if new:
            # A conflict is with a row of the same day's partition (its unique index):
            # another writer's, stored since lock_jobs.
            self._cur.execute(
                f"INSERT INTO jobs (seq, day, {c}) SELECT seq, day, {c} FROM _sluice_jobs"
                " WHERE is_new ORDER BY id ON CONFLICT DO NOTHING RETURNING id"
            )
            inserted = {row[0] for row in self._cur.fetchall()}
            raced = {job.id for job in new} - inserted
        rest = JOB_COLUMNS[1:]
        # A statement a day: its partition is known when the statement is planned, and
        # the other days' indexes are not read.
        for day in sorted({self.day_of(job.id) for job in changed}):
            self._cur.execute(
                f"UPDATE jobs SET ({cols(rest)}) = ({cols(rest, 't.')})"
                " FROM _sluice_jobs t WHERE jobs.day = %s AND t.day = %s"
                " AND jobs.id = t.id AND NOT t.is_new",
                (day, day),
            )
        return raced

    def lock_workers(self, hostnames: list[str]) -> dict[str, Worker]:
        self._cur.execute(
            f"SELECT {cols(WORKER_COLUMNS)} FROM workers WHERE hostname = ANY(%s)"
            " ORDER BY hostname FOR UPDATE",
            (hostnames,),
        )
        return {row[0]: common.worker_from_row(row) for row in self._cur.fetchall()}

    def write_workers(self, workers: list[Worker]) -> None:
        if workers:
            self._cur.executemany(
                common.upsert_workers_sql("%s"), [common.worker_to_row(w) for w in workers]
            )

    def add_counts(self, rollup: common.Rollup) -> None:
        common.write_counts(self._cur, _ADD_COUNTS, rollup)

    def announce(self, result: IngestResult) -> None:
        change = Change(
            jobs=tuple(job.id for job in result.jobs),
            new_jobs=result.new_jobs,
            workers=tuple(worker.hostname for worker in result.workers),
        )
        _notify(self._cur, change)


class PostgresStorage(common.SharedSql):
    ingest_writers = INGEST_WRITERS
    _marker = "%s"
    _duplicate_key = psycopg.errors.UniqueViolation
    partition_day_sql = "day"

    def _prune_scope(self, policy: RetentionPolicy, cutoff: float, now: float) -> str:
        # Unless a rule (or the failed jobs' retention) is shorter than the completed
        # jobs', every expired row outside day 0 goes with its day's partition.
        if policy.days == 0 or cutoff > now - policy.days * DAY:
            return "1 = 1"
        return f"day = {partitions.KEPT}"

    def _left_to_drop(self, policy: RetentionPolicy, job: Job, day: int) -> bool:
        return (
            day != partitions.KEPT
            and policy.days > 0
            and policy.kept_days(job.state, job.name) >= policy.days
        )

    @staticmethod
    def _refused_data(exc: Exception) -> bool:
        # The server's data errors (an integer past its column, a NUL in jsonb) and
        # constraint violations, a key too long for an index, and psycopg's own refusals
        # before sending (a NUL in text, a value it cannot adapt: no SQLSTATE). Every other
        # error (the server away, out of disk, a deadlock) is worth retrying.
        return isinstance(
            exc,
            (
                psycopg.DataError, psycopg.IntegrityError, psycopg.errors.ProgramLimitExceeded,
                ValueError, TypeError, OverflowError,
            ),
        ) or (isinstance(exc, psycopg.ProgrammingError) and exc.sqlstate is None)

    @staticmethod
    def _refused_writes(exc: Exception) -> str:
        # A read-only database (default_transaction_read_only, a standby) says 25006, an
        # InternalError, so never taken for bad data above.
        sqlstate = exc.sqlstate if isinstance(exc, psycopg.Error) else None
        return WRITE_REFUSALS.get(sqlstate or "", "")
    _events_of_job = "job_id = %s"

    def __init__(self, url: str, *, stuck_after: float = DEFAULT_STUCK_AFTER_S) -> None:
        # The clock that picks new jobs' day partitions (a test sets history's).
        self.clock: Callable[[], float] = time.time
        self._partitions_ready = range(0)  # the days known to have their partitions
        self.url = redact_url(url)
        self.stuck_after = stuck_after
        self._conninfo = url
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._write_limiter = trio.CapacityLimiter(INGEST_WRITERS)
        self._read_limiter = trio.CapacityLimiter(READERS)
        self._ping_limiter = trio.CapacityLimiter(1)  # see ping
        self._dialect: _Dialect = _Dialect()
        self._lending = _Lending()

    def _check(self, conn: psycopg.Connection[Any]) -> None:
        # A connection lent for a write is checked first (a transaction that fails on a
        # dead connection would be retried whole, batches later). One lent for a read is
        # not: the check is a round trip of its own beside each of a replica's reads, and
        # a read that finds its connection dead is asked again (_run).
        if self._lending.check:
            ConnectionPool.check_connection(conn)

    # -- threads ---------------------------------------------------------------

    def _run(self, fn: Callable[[psycopg.Connection[Any]], T], transaction: bool) -> T:
        pool = self._pool
        if pool is None:
            raise RuntimeError("PostgreSQL storage is not open: call open() first")
        self._lending.check = transaction
        if not transaction:
            lent: psycopg.Connection[Any] | None = None
            try:
                with pool.connection(timeout=CONNECT_TIMEOUT) as lent:
                    return fn(lent)
            except psycopg.OperationalError:
                if lent is None or not lent.broken:
                    raise  # no connection to be had, or the query failed and not it
            # The server ended the connection (a restart, a failover, a terminated
            # session): it may have ended the pool's others too. They are checked (the
            # dead replaced) before the read is asked again, on a working one.
            pool.check()
            with pool.connection(timeout=CONNECT_TIMEOUT) as conn:
                return fn(conn)
        with pool.connection(timeout=CONNECT_TIMEOUT) as conn:
            try:
                with conn.transaction():
                    return fn(conn)
            except psycopg.errors.ReadOnlySqlTransaction:
                # A session keeps the read-only default it began with (a database set
                # read-only, a standby): writable again, only a new one would write. The
                # pool replaces a connection given back closed.
                conn.close()
                raise

    async def _write(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        # Never abandoned on cancel: the transaction commits or rolls back first.
        return await trio.to_thread.run_sync(self._run, fn, True, limiter=self._write_limiter)

    async def _read(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        try:
            return await trio.to_thread.run_sync(self._run, fn, False, limiter=self._read_limiter)
        except psycopg.OperationalError as exc:  # no connection (PoolTimeout), or it broke
            raise StorageUnavailable(f"PostgreSQL at {self.url}: {exc}") from exc

    # -- lifecycle -----------------------------------------------------------------

    async def open(self) -> list[int]:
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=READERS + INGEST_WRITERS,
            open=False,
            kwargs={"autocommit": True, "connect_timeout": int(CONNECT_TIMEOUT)},
            configure=_configure,
            # A connection the server dropped is replaced before it is lent for a write,
            # not after a failure; a read finds out by failing (see _check).
            check=self._check,
            timeout=CONNECT_TIMEOUT,
            name="sluice-postgres",
        )
        try:
            await trio.to_thread.run_sync(lambda: pool.open(wait=True, timeout=CONNECT_TIMEOUT))
        except BaseException as exc:
            await trio.to_thread.run_sync(pool.close)
            if isinstance(exc, PoolTimeout):
                raise ConnectionError(
                    f"cannot connect to PostgreSQL at {self.url} within {CONNECT_TIMEOUT:g}s:"
                    " is the server up, and are the host, user and database in the URL right?"
                ) from exc
            raise
        self._pool = pool
        applied = await self.migrate()
        await self._partitions_for(self.clock())
        return applied

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await trio.to_thread.run_sync(pool.close, limiter=self._write_limiter)

    async def migrate(self) -> list[int]:
        def apply(conn: psycopg.Connection[Any]) -> list[int]:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            applied = []
            for version, sql in common.migrations("postgresql"):
                if version in done:
                    continue
                conn.execute(sql)  # several statements: allowed without parameters
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                applied.append(version)
            return applied

        return await self._write(apply)

    def change_feed(self) -> PostgresChangeFeed:
        return PostgresChangeFeed(self._conninfo, self.url)

    def leader_lock(self, name: str) -> AdvisoryLock:
        return AdvisoryLock(self._conninfo, name)

    _lock_rows = " FOR UPDATE"

    # -- day partitions (migration 0013, sluice_storage.partitions) -------------------

    def _transaction(self, conn: psycopg.Connection[Any]) -> _Transaction:
        return _Transaction(conn, self.clock())

    async def _partitions_for(self, now: float) -> None:
        """Make sure today's partitions, and AHEAD days', exist before a write needs them."""
        today = partitions.day_of(now)
        if today in self._partitions_ready and today + 1 in self._partitions_ready:
            return
        last = today + partitions.AHEAD
        await self._write(lambda conn: partitions.ensure(conn, today, last))
        self._partitions_ready = range(today, last + 1)

    async def ingest(
        self, job_events: list[JobEvent], worker_events: list[WorkerEvent]
    ) -> IngestResult:
        await self._partitions_for(self.clock())
        result: IngestResult = await super().ingest(job_events, worker_events)
        return result

    async def prune(
        self,
        policy: RetentionPolicy,
        now: float,
        *,
        dry_run: bool = False,
        batch: int = PRUNE_BATCH,
    ) -> Pruned:
        # Past days whole go with their partitions; then day 0's expired rows one by one.
        total = Pruned(dry_run=dry_run)
        before = policy.drop_before(now)
        if not dry_run:
            await self._write(partitions.discard_detached)  # a drop stopped halfway
        if before is not None:
            for day in await self._read(partitions.days):
                if partitions.KEPT < day < before:
                    expired = await self._expire_day(day, policy, now, batch, dry_run)
                    if expired is None:
                        break  # the tables are busy: the next prune tries again
                    total += expired
        rows: Pruned = await super().prune(policy, now, dry_run=dry_run, batch=batch)
        return total + rows

    async def _expire_day(
        self, day: int, policy: RetentionPolicy, now: float, batch: int, dry_run: bool
    ) -> Pruned | None:
        """Expire one day (sluice_storage.partitions); None when its drop could not lock
        the tables in time (what moved out before stays moved: it is kept either way)."""
        moved = 0
        # What the policy keeps moves out first, in short transactions, so that the drop's,
        # which holds both tables, has (nearly) nothing left to move; then a look again,
        # which finds what changed meanwhile and, reading past the rows moved, marks their
        # index entries dead for the drop's own look (the first read after 30,000 moves
        # took 100 ms).
        for _ in range(0 if dry_run else 2):
            kept = await self._read(lambda conn: partitions.kept_seqs(conn, day, policy, now))
            seqs = [seq for seq, _ in kept]
            for i in range(0, len(seqs), batch):
                moved += await self._write(
                    functools.partial(
                        partitions.move_kept, day=day, seqs=seqs[i : i + batch], policy=policy,
                        now=now,
                    )
                )
        run = self._read if dry_run else self._write
        try:
            dropped: Pruned = await run(
                functools.partial(
                    partitions.drop, day=day, policy=policy, now=now, dry_run=dry_run, moved=moved
                )
            )
        except psycopg.errors.LockNotAvailable:
            log.warning(
                "%s not dropped: the tables stayed busy past %s (a long read?); the next"
                " prune tries again", partitions.names(day)[0], partitions.DROP_LOCK_TIMEOUT,
            )
            return None
        if not dry_run:
            await self._write(partitions.discard_detached)
        log.info(
            "%s %s: %d jobs, %d moved to the kept partition first, %.1f MB, in %.0f ms",
            "would drop" if dry_run else "dropped", partitions.names(day)[0],
            dropped.dropped_jobs, dropped.moved_jobs, dropped.dropped_bytes / 1e6,
            dropped.longest_drop_s * 1000,
        )
        return dropped

    async def _scrubbed(self) -> str:
        return (
            "PostgreSQL keeps the replaced row versions in its files until VACUUM reuses"
            " their space: to remove them now, run VACUUM FULL jobs, job_events,"
            " dead_letters (it locks each table while it rewrites it)"
        )

    def _partitions_held(
        self, conn: psycopg.Connection[Any]
    ) -> tuple[int | None, int, float | None]:
        held = sum(1 for day in partitions.days(conn) if day != partitions.KEPT)
        row = conn.execute("SELECT count(*), max(dropped_at) FROM dropped_partitions").fetchone()
        assert row is not None  # an aggregate: always one row
        return held, int(row[0]), row[1]

    def _database_bytes(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        assert row is not None  # always one row
        return int(row[0])

    async def ping(self) -> None:
        # Abandoned when the caller stops waiting (/healthz has a deadline; a connection
        # attempt may hang for CONNECT_TIMEOUT, a query on a hung server for ever), and
        # one at a time, so that stuck pings cannot take every pooled connection.
        await trio.to_thread.run_sync(
            self._run,
            lambda conn: conn.execute("SELECT 1").fetchone(),
            False,
            limiter=self._ping_limiter,
            abandon_on_cancel=True,
        )

    # -- writes ----------------------------------------------------------------------

    async def record_queue_samples(self, samples: list[QueueSample]) -> None:
        rows = [common.sample_to_row(sample) for sample in samples]

        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.cursor() as cur:
                for sql in common.record_samples_sql("%s"):
                    cur.executemany(sql, rows)
                _notify(cur, Change(queues=tuple(samples)))

        if rows:
            await self._write(write)

    async def set_worker_queues(self, workers: list[WorkerQueues]) -> None:
        rows = common.worker_queues_rows(workers)

        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.cursor() as cur:
                cur.executemany(common.set_worker_queues_sql("%s"), rows)

        if rows:
            await self._write(write)

    # -- reads -----------------------------------------------------------------------

    async def list_jobs(self, query: JobQuery) -> Page:
        sample = self._dialect.sample
        if query.q and (sample is None or time.time() - sample.taken_at > SAMPLE_TTL_S):
            texts = await self._read(
                lambda conn: conn.execute(
                    f"SELECT {TEXT_EXPR} FROM jobs ORDER BY seq DESC LIMIT {SAMPLE_JOBS}"
                ).fetchall()
            )
            self._dialect = _Dialect(TrigramSample.of((t for (t,) in texts), time.time()))
        return await super().list_jobs(query)

    def _window_first(self, conn: psycopg.Connection[Any], query: JobQuery) -> bool:
        # Newest first, the planner walks the seq index and expects the window's jobs
        # spread along it, but they are together, behind every newer job: a day a month
        # back took 0.5 s over ten million jobs, five months back 3.5 s. Reading the
        # window whole from the (created_at, seq) index takes 8-12 ms for a day. The
        # walk reads the jobs newer than the window, the other way the window's jobs,
        # at half the cost each (from the index alone, where the walk reads the rows
        # for created_at): their numbers are estimated from the planner's statistics.
        if query.until is None:
            return False  # the newest jobs are in the window: the walk finds them first
        window, params = "created_at <= %s", [query.until]
        if query.since is not None:
            window, params = f"created_at >= %s AND {window}", [query.since, *params]
        newer = self._estimate(conn, "created_at > %s", [query.until])
        return self._estimate(conn, window, params) < 2 * newer

    @staticmethod
    def _estimate(conn: psycopg.Connection[Any], where: str, params: list[Any]) -> int:
        """The planner's estimate of the jobs matching ``where``: no row is read."""
        row = conn.execute(
            f"EXPLAIN (FORMAT JSON) SELECT seq FROM jobs WHERE {where}", params
        ).fetchone()
        assert row is not None  # EXPLAIN always answers one row
        return int(row[0][0]["Plan"]["Plan Rows"])

    async def list_workers(self) -> list[Worker]:
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {cols(WORKER_COLUMNS)} FROM workers ORDER BY hostname"
            ).fetchall()
        )
        return [common.worker_from_row(row) for row in rows]

    async def job_workers(self, hostnames: list[str]) -> set[str]:
        rows = await self._read(
            lambda conn: conn.execute(
                # One probe of the (worker, seq) index per hostname, not a scan of its jobs.
                "SELECT h FROM unnest(%s::text[]) AS h"
                " WHERE EXISTS (SELECT 1 FROM jobs WHERE worker = h)",
                (hostnames,),
            ).fetchall()
        )
        return {row[0] for row in rows}


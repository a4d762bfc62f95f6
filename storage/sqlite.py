"""SQLite storage: the zero set-up default (``sqlite:///sluice.db``).

One writer connection, used by one thread at a time (a capacity limiter of
one), and a few reader connections, so the dashboard reads while the pipeline
writes (WAL mode). Each ingest is one ``BEGIN IMMEDIATE`` transaction: it takes
the database's write lock up front, so another process writing the same file
waits (busy_timeout) instead of failing half-way.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

import trio

from sluice_core import hookimpl
from sluice_core.config import Config, ConfigError, redact_url
from sluice_core.model import Job, JobEvent, QueueSample, Worker
from sluice_core.probes import WorkerQueues
from sluice_core.storage import (
    DEFAULT_STUCK_AFTER_S,
    IngestResult,
    StorageUnavailable,
)
from sluice_storage import common
from sluice_storage.common import EVENT_COLUMNS, JOB_COLUMNS, WORKER_COLUMNS, cols

T = TypeVar("T")

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
READERS = 4
# SQLite's primary result codes that say the database cannot be read now, not that the
# query is wrong: busy or locked past the busy timeout, a file that cannot be opened, I/O.
UNAVAILABLE = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR}
)
# ... and those that say a path cannot hold a database (at start: give another).
UNWRITABLE = frozenset(
    {sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR}
)

# ... and those that refuse every write until someone acts, with what /healthz says of them.
WRITE_REFUSALS = {
    sqlite3.SQLITE_FULL: "disk full",
    sqlite3.SQLITE_READONLY: "read-only",
    sqlite3.SQLITE_PERM: "no permission to write",
}


@hookimpl
def sluice_storage(url: str, config: Config) -> SQLiteStorage | None:
    if not url.startswith("sqlite:"):
        return None
    return SQLiteStorage(url, stuck_after=common.stuck_after(config))


def _path(url: str) -> Path:
    # SQLAlchemy's convention: three slashes then a relative path, four for an absolute one.
    prefix = "sqlite:///"
    path = url[len(prefix):].split("?", 1)[0] if url.startswith(prefix) else ""
    if not path or path == ":memory:":
        raise ConfigError(
            f"bad SQLite URL {url!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    return Path(path)


WRITER_CACHE_KIB = 64 * 1024
WAL_KEPT_BYTES = 4 * 2**20
# A file made before incremental auto-vacuum is switched to it at open by a VACUUM (which
# rewrites it whole, holding the writer: about a second per 200 MB) only below this size.
VACUUM_AT_OPEN_BYTES = 256 * 2**20
# Pages an incremental vacuum step moves and frees in one write (6 ms median, 21 ms at most; see
# docs/architecture.md, Retention).
VACUUM_STEP_PAGES = 2_000


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    # isolation_level=None: transactions are begun explicitly (BEGIN IMMEDIATE).
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        # Before the first table is created this makes a new file give back what a prune
        # frees (sluice_core/retention.py); an older file needs a VACUUM (see open).
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        # With WAL, NORMAL loses at most the last transactions on power loss, never integrity.
        conn.execute("PRAGMA synchronous = NORMAL")
        # Events and jobs are keyed by random ids: their index pages are touched
        # all over the file. A 64 MiB page cache keeps them in memory between
        # batches (the default 2 MiB made ingest fall off as the tables grew).
        conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
        # Checkpoint every 64 MiB of WAL rather than 4 MiB: fewer, larger copies
        # back into the database (measured about a fifth more ingest).
        conn.execute("PRAGMA wal_autocheckpoint = 16384")
        # That is a 67 MB WAL (16384 pages of 4 KiB and their headers), and a WAL file is
        # never made smaller by itself: past a checkpoint, cut it back to this.
        conn.execute(f"PRAGMA journal_size_limit = {WAL_KEPT_BYTES}")
    return conn


class _Dialect:
    marker = "?"

    def any_of(self, column: str, values: Collection[str]) -> tuple[str, list[Any]]:
        # One parameter whatever the count (SQLite caps the number of parameters).
        return f"{column} IN (SELECT value FROM json_each(?))", [common.dumps(list(values))]

    def text_match(self, q: str) -> tuple[str, list[Any]]:
        # GLOB, case-sensitive like ids, can use the id index; the trigram index
        # (migration 0003) answers LIKE, which ignores ASCII case. It is only used
        # for a LIKE without ESCAPE: text with % or _ is rare, and scans.
        like, pattern = _like(q)
        ids, prefixes = _id_prefixes(q)
        return (
            f"({ids} OR seq IN (SELECT rowid FROM job_search WHERE text {like}))",
            [*prefixes, pattern],
        )

    def text_match_row(self, q: str) -> tuple[str, list[Any]]:
        like, pattern = _like(q)
        ids, prefixes = _id_prefixes(q)
        return f"({ids} OR {_SEARCH_TEXT} {like})", [*prefixes, pattern]


# What migration 0003's job_search_text view indexes, and _search_text writes.
_SEARCH_TEXT = (
    "(coalesce(name, '') || char(10) || coalesce(args, '') || char(10) ||"
    " coalesce(kwargs, '') || char(10) || coalesce(exception, ''))"
)


def _id_prefixes(q: str) -> tuple[str, list[str]]:
    prefixes = common.id_prefixes(q)
    return " OR ".join(["id GLOB ?"] * len(prefixes)), [_id_prefix(p) for p in prefixes]


def _id_prefix(q: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in q) + "*"


def _like(q: str) -> tuple[str, str]:
    if "%" in q or "_" in q or "\\" in q:
        return "LIKE ? ESCAPE '\\'", f"%{common.like_escape(q)}%"
    return "LIKE ?", f"%{q}%"


_DIALECT = _Dialect()


# One writer at a time: one shard.
_ADD_COUNTS = common.add_counts_sql("?", "0")


class _Transaction:
    """:class:`sluice_storage.common.Transaction` on the writer connection.

    Events are stored under their job's seq (migration 0004), so this transaction
    knows every job's seq: stored ones from :meth:`lock_jobs`, which comes first,
    and new ones from the next seqs, which it hands out itself (BEGIN IMMEDIATE
    holds the write lock: no one else stores a job meanwhile).
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._seq: dict[str, int] = {}
        # The rows of the jobs as stored before this batch.
        self._rows: dict[str, common.Row] = {}

    def lock_jobs(self, ids: list[str]) -> dict[str, Job]:
        # BEGIN IMMEDIATE already holds the database's write lock.
        rows = self._conn.execute(
            f"SELECT seq, {cols(JOB_COLUMNS)} FROM jobs"
            " WHERE id IN (SELECT value FROM json_each(?))",
            (common.dumps(ids),),
        )
        jobs = {}
        for seq, *row in rows:
            job = jobs[row[0]] = common.job_from_row(row)
            self._seq[job.id] = seq
            self._rows[job.id] = tuple(row)
        return jobs

    def day_of(self, job_id: str) -> int:
        return 0  # one table, no day partitions

    def insert_events(self, events: list[JobEvent]) -> set[str]:
        # A stored job's events are one range of the table: read them, not each id.
        stored_jobs = {event.job_id for event in events if event.job_id in self._seq}
        known = {
            row[0]
            for row in self._conn.execute(
                "SELECT id FROM job_events WHERE job_seq IN"
                " (SELECT value FROM json_each(?))",
                (common.dumps([self._seq[job_id] for job_id in stored_jobs]),),
            )
        } if stored_jobs else set()
        new = [event for event in events if event.id not in known]
        # New jobs are listed in the order they were first seen: by earliest event.
        first_seen: dict[str, tuple[float, str]] = {}
        for event in new:
            if event.job_id not in self._seq:
                seen = first_seen.get(event.job_id)
                if seen is None or event.timestamp < seen[0]:
                    first_seen[event.job_id] = (event.timestamp, event.job_id)
        found = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'")
        last = (found.fetchone() or (0,))[0]
        for seq, job_id in enumerate(sorted(first_seen, key=first_seen.__getitem__), last + 1):
            self._seq[job_id] = seq
        seq_of = self._seq
        self._conn.executemany(
            f"INSERT INTO job_events (job_seq, {cols(EVENT_COLUMNS)})"
            f" VALUES (?, {_marks(EVENT_COLUMNS)})",
            # In key order: B-tree appends, each job's range written once (storage
            # alone: 41,700 events/s when they came sorted by event id, 50,700 now).
            sorted((seq_of[event.job_id], *common.event_to_row(event)) for event in new),
        )
        return {event.id for event in new}

    def load_events(self, job_ids: list[str]) -> list[JobEvent]:
        rows = self._conn.execute(
            f"SELECT {cols(EVENT_COLUMNS)} FROM job_events"
            " WHERE job_seq IN (SELECT value FROM json_each(?))",
            (common.dumps([self._seq[job_id] for job_id in job_ids]),),
        )
        return [common.event_from_row(row) for row in rows]

    def write_jobs(self, new: list[Job], changed: list[Job]) -> set[str]:
        seq_of = self._seq
        self._conn.executemany(
            f"INSERT INTO jobs (seq, {cols(JOB_COLUMNS)}) VALUES (?, {_marks(JOB_COLUMNS)})",
            [(seq_of[job.id], *common.job_to_row(job)) for job in new],
        )
        # Only the columns that changed: SQLite rewrites an index only when the
        # UPDATE sets one of its columns, and most events change the state, the
        # worker and updated_at, not the name, the queue or created_at.
        # Search entries are written with the rows, from text built here: joining
        # it back from jobs in SQL took ten times as long. Most events change no
        # searched column: only the jobs whose did are re-indexed.
        updates: dict[tuple[int, ...], list[common.Row]] = defaultdict(list)
        reindex: list[tuple[int, str]] = []
        for job in changed:
            row, before = common.job_to_row(job), self._rows[job.id]
            columns = tuple(i for i in range(1, len(row)) if row[i] != before[i])
            if columns:
                updates[columns].append((*(row[i] for i in columns), seq_of[job.id]))
            if not _SEARCHED.isdisjoint(columns):
                reindex.append((seq_of[job.id], _search_text(job)))
        for columns, params in updates.items():
            assignments = ", ".join(f"{JOB_COLUMNS[i]} = ?" for i in columns)
            self._conn.executemany(f"UPDATE jobs SET {assignments} WHERE seq = ?", params)
        # In ascending rowids: FTS5 flushes what it holds in memory to a new
        # segment whenever a rowid comes lower than the last one written (a
        # delete and re-insert of one rowid does not count), and those flushes
        # cost 50 us a row where an insert costs 8.
        for seq, text in sorted(reindex):
            self._conn.execute("DELETE FROM job_search WHERE rowid = ?", (seq,))
            self._conn.execute("INSERT INTO job_search (rowid, text) VALUES (?, ?)", (seq, text))
        self._conn.executemany(
            "INSERT INTO job_search (rowid, text) VALUES (?, ?)",
            sorted((seq_of[job.id], _search_text(job)) for job in new),
        )
        return set()  # the write lock is held since BEGIN: no one else stored a job

    def lock_workers(self, hostnames: list[str]) -> dict[str, Worker]:
        rows = self._conn.execute(
            f"SELECT {cols(WORKER_COLUMNS)} FROM workers"
            " WHERE hostname IN (SELECT value FROM json_each(?))",
            (common.dumps(hostnames),),
        )
        return {row[0]: common.worker_from_row(row) for row in rows}

    def write_workers(self, workers: list[Worker]) -> None:
        self._conn.executemany(common.upsert_workers_sql("?"), map(common.worker_to_row, workers))

    def add_counts(self, rollup: common.Rollup) -> None:
        common.write_counts(self._conn, _ADD_COUNTS, rollup)

    def announce(self, result: IngestResult) -> None:
        pass  # no other process shares the file


# The columns _search_text reads, as positions in JOB_COLUMNS.
_SEARCHED = frozenset(JOB_COLUMNS.index(c) for c in ("name", "args", "kwargs", "exception"))


def _search_text(job: Job) -> str:
    """A job's entry in the search index: what migration 0003's job_search_text joins."""
    return "\n".join((job.name or "", job.args or "", job.kwargs or "", job.exception or ""))


def _marks(columns: tuple[str, ...]) -> str:
    return ", ".join("?" * len(columns))


class _Readers:
    """Idle reader connections; at most ``READERS`` exist (the read limiter's size)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = _connect(self._path, readonly=True)
        try:
            result = fn(conn)
        except BaseException:
            conn.close()  # may be broken; the next read opens a fresh one
            raise
        with self._lock:
            keep = not self._closed
            if keep:
                self._idle.append(conn)
        if not keep:
            conn.close()  # closed while this read ran
        return result

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class SQLiteStorage(common.SharedSql):
    ingest_writers = 1  # SQLite has one writer at a time
    _marker = "?"
    _duplicate_key = sqlite3.IntegrityError
    _transaction = _Transaction

    @staticmethod
    def _refused_data(exc: Exception) -> bool:
        # An integer past 64 bits (OverflowError), a NULL where none goes, a lone
        # surrogate (UnicodeEncodeError), a value of a type SQLite does not bind; every
        # other error (locked, disk full, I/O) is the database's.
        return isinstance(
            exc, (OverflowError, ValueError, TypeError, sqlite3.IntegrityError, sqlite3.DataError)
        ) or (isinstance(exc, sqlite3.ProgrammingError) and str(exc).startswith("Error binding"))

    @staticmethod
    def _refused_writes(exc: Exception) -> str:
        # Only errors from the library carry a code (not a closed connection's, say).
        code = getattr(exc, "sqlite_errorcode", None)
        return "" if code is None else WRITE_REFUSALS.get(code & 0xFF, "")  # extended codes too
    _events_of_job = "job_seq = (SELECT seq FROM jobs WHERE id = ?)"
    _dialect = _DIALECT
    _events_by_seq = True

    def __init__(self, url: str, *, stuck_after: float = DEFAULT_STUCK_AFTER_S) -> None:
        self.url = redact_url(url)
        self.stuck_after = stuck_after
        self._path = _path(url)
        self._writer: sqlite3.Connection | None = None
        self._write_limiter = trio.CapacityLimiter(1)  # one writer connection, one thread
        self._read_limiter = trio.CapacityLimiter(READERS)
        self._ping_limiter = trio.CapacityLimiter(1)  # see ping
        self._readers = _Readers(self._path)

    # -- threads ---------------------------------------------------------------

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        # Never abandoned on cancel: the transaction finishes (or rolls back) first.
        return await trio.to_thread.run_sync(self._write_sync, fn, limiter=self._write_limiter)

    def _write_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            self._writer = _connect(self._path, readonly=False)
        conn = self._writer
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                # The connection is unusable: reconnect on the next write.
                conn.close()
                self._writer = None
            raise
        return result

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await trio.to_thread.run_sync(self._readers.run, fn, limiter=self._read_limiter)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in UNAVAILABLE:
                raise
            raise StorageUnavailable(f"cannot read the database at {self._path}: {exc}") from exc

    # -- lifecycle -----------------------------------------------------------------

    async def open(self) -> list[int]:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            # Opening for appending creates the file (SQLite takes an empty one for an
            # empty database) and the OS says why a path cannot be written ("read-only
            # file system"), where SQLite would only say "unable to open database file".
            with self._path.open("ab"):
                pass
            applied = await self.migrate()
            await self._plain_write(self._incremental_vacuum_on)
            return applied
        except OSError as exc:
            raise self._unwritable((exc.strerror or str(exc)).lower()) from None
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in UNWRITABLE:
                raise
            raise self._unwritable(str(exc)) from None

    def _incremental_vacuum_on(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:  # INCREMENTAL
            return
        size = self._path.stat().st_size
        if size > VACUUM_AT_OPEN_BYTES:
            log.warning(
                "%s does not give back the space pruning frees (made before Sluice 0.11):"
                " with Sluice stopped, run sqlite3 %s 'PRAGMA auto_vacuum = INCREMENTAL; VACUUM'",
                self._path, self._path,
            )
            return
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")

    async def _plain_write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` on the writer connection outside a transaction (what a transaction
        cannot hold: VACUUM, checkpoints)."""

        def run() -> T:
            if self._writer is None:
                self._writer = _connect(self._path, readonly=False)
            return fn(self._writer)

        return await trio.to_thread.run_sync(run, limiter=self._write_limiter)

    def _unwritable(self, reason: str) -> ConfigError:
        return ConfigError(
            f"cannot write the database at {self._path}: {reason}; give --db a writable path"
        )

    async def aclose(self) -> None:
        def close() -> None:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._readers.close()

        await trio.to_thread.run_sync(close, limiter=self._write_limiter)

    async def migrate(self) -> list[int]:
        def apply(conn: sqlite3.Connection) -> list[int]:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            applied = []
            for version, sql in common.migrations("sqlite"):
                if version in done:
                    continue
                # executescript would commit the open transaction: run statement by statement.
                for statement in _statements(sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, time.time()),
                )
                applied.append(version)
            return applied

        return await self._write(apply)

    def change_feed(self) -> None:
        return None  # one process owns the file: it publishes what it stores itself

    def leader_lock(self, name: str) -> None:
        return None  # one process owns the file: it leads

    # -- sluice redact ---------------------------------------------------------------

    def _scrubbing(self, conn: sqlite3.Connection) -> None:
        # Deleted and replaced values are overwritten with zeros, not left in free space.
        conn.execute("PRAGMA secure_delete = ON")

    def _reindex(self, conn: sqlite3.Connection, jobs: list[tuple[int, Job]]) -> None:
        for seq, job in sorted(jobs, key=lambda pair: pair[0]):
            conn.execute("DELETE FROM job_search WHERE rowid = ?", (seq,))
            conn.execute(
                "INSERT INTO job_search (rowid, text) VALUES (?, ?)", (seq, _search_text(job))
            )

    async def _scrubbed(self) -> str:
        def checkpoint() -> None:
            # The write-ahead log still holds the pages as they were before: copy the
            # new ones into the database and empty it.
            if self._writer is not None:
                self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        await trio.to_thread.run_sync(checkpoint, limiter=self._write_limiter)
        return ""

    # -- retention -------------------------------------------------------------------

    def _unindex(self, conn: sqlite3.Connection, seqs: list[int]) -> None:
        # In ascending rowids, as ingest writes them (see _Transaction.write_jobs).
        conn.executemany("DELETE FROM job_search WHERE rowid = ?", [(seq,) for seq in seqs])

    def _database_bytes(self, conn: sqlite3.Connection) -> int:
        return sum(
            path.stat().st_size
            for path in (self._path, self._path.with_name(self._path.name + "-wal"))
            if path.exists()
        )

    async def _pruned(self) -> None:
        # What the prune freed goes back to the file system a step at a time, each its own
        # short write: moving pages holds the writer like any transaction.
        def step(conn: sqlite3.Connection) -> bool:
            if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                return False  # an old file (see _incremental_vacuum_on): pages are reused
            free: int = conn.execute("PRAGMA freelist_count").fetchone()[0]
            # A step per page: fetchall runs them all.
            conn.execute(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})").fetchall()
            left: int = conn.execute("PRAGMA freelist_count").fetchone()[0]
            return 0 < left < free

        while await self._write(step):
            pass  # between steps, a waiting ingest takes the writer (the limiter is fair)
        await self._plain_write(self._checkpoint)

    @staticmethod
    def _checkpoint(conn: sqlite3.Connection) -> None:
        # The WAL holds every page the prune and the vacuum wrote: copy them into the file
        # (which shrinks then) and empty the WAL. A reader still on an older snapshot makes
        # it wait: 50 ms at most, not the usual busy timeout, with the writer held;
        # journal_size_limit then cuts the WAL back at the next write instead.
        conn.execute("PRAGMA busy_timeout = 50")
        try:
            busy, frames, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if busy:
            log.info("after pruning: WAL checkpoint blocked by a reader (%d of %d frames)",
                     done, frames)

    async def ping(self) -> None:
        # Abandoned when the caller stops waiting (/healthz has a deadline), and one at a
        # time, so that pings stuck on a hung disk cannot take every reader.
        await trio.to_thread.run_sync(
            self._readers.run,
            lambda conn: conn.execute("SELECT 1").fetchone(),
            limiter=self._ping_limiter,
            abandon_on_cancel=True,
        )

    # -- writes ----------------------------------------------------------------------

    async def record_queue_samples(self, samples: list[QueueSample]) -> None:
        rows = [common.sample_to_row(sample) for sample in samples]

        def write(conn: sqlite3.Connection) -> None:
            for sql in common.record_samples_sql("?"):
                conn.executemany(sql, rows)

        if rows:
            await self._write(write)

    async def set_worker_queues(self, workers: list[WorkerQueues]) -> None:
        rows = common.worker_queues_rows(workers)
        if rows:
            sql = common.set_worker_queues_sql("?")
            await self._write(lambda conn: conn.executemany(sql, rows))

    # -- reads -----------------------------------------------------------------------

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
                "SELECT value FROM json_each(?)"
                " WHERE EXISTS (SELECT 1 FROM jobs WHERE worker = value)",
                (common.dumps(hostnames),),
            ).fetchall()
        )
        return {row[0] for row in rows}



def _statements(script: str) -> list[str]:
    """Split a migration into statements (sqlite3 executes one at a time)."""
    out, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current)
            current = ""
    if current.strip():
        out.append(current)
    return out

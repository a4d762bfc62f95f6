"""Retention (issue 20): bytes on disk per event and per job, and a prune under a live stream.

The history is the generator's stream spread over ``HISTORY_DAYS`` days, written through
the storage backend's ``ingest`` (:func:`bench.queries.fill`). The issue asks for 10 days
at 1,000 tasks/s: 864 million jobs, days of writing on this machine. The run keeps the
shape (10 days, each job's events at its time, 10% failed, 3% retried) with fewer jobs:
a prune's work grows with the jobs it deletes, and a chunk's with ``--prune-batch``, not
with the history's size.

*Sizes*: after the fill, each table and its indexes apart (PostgreSQL:
``pg_table_size``, with TOAST, and ``pg_indexes_size``; SQLite: the ``dbstat`` virtual
table's pages), over the events and the jobs stored.

*Prune*: the issue's policy (completed jobs 2 days, failed 7) at the end of the history,
with a live stream of ``LIVE_RATE`` events/s going through Sluice's own
:class:`~sluice_core.pipeline.Pipeline` (the engine's writers, batching and retries) to the
same database meanwhile; first the same stream for ``BASELINE_S`` without a prune, for
the rate to compare with. The stream is paced (a tenth of a second's events every tenth
of a second), so a prune that holds the writer shows as the age of the oldest event not
yet stored, and as a rate below the one offered.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import psycopg
import trio

from bench import queries
from bench import storage as storage_alone
from bench.services import database
from sluice_core.bus import Bus
from sluice_core.config import Config
from sluice_core.metrics import Metrics
from sluice_core.model import JobEvent
from sluice_core.pipeline import Pipeline
from sluice_core.plugins import PluginManager
from sluice_core.retention import RetentionPolicy
from sluice_core.storage import IngestResult, Pruned, Storage

HISTORY_DAYS = 10
HISTORY_TICKS = 480  # the history's jobs come in a batch every half hour
POLICY = RetentionPolicy(days=2, failed_days=7)  # the done-means
LIVE_RATE = 10_000  # events/s, the target
STEP_S = 0.1  # the live stream offers a step's events at once
BASELINE_S = 20.0
WARMUP_S = 2.0  # of the stream before the prune starts
# Distinct live events pre-built (their normalizing is not what is measured); the stream
# goes round them again as new jobs (ids suffixed by the lap, times moved on).
LIVE_POOL_S = 10.0


@attrs.define
class TableSize:
    table: str
    rows: int
    table_bytes: int
    index_bytes: int


@attrs.define
class LiveRun:
    offered: int
    stored: int  # new events stored, once each (their ids are new)
    dropped: int
    rate: float  # events stored per second inside the window measured
    max_lag_s: float  # the oldest event not yet stored, at its worst (sampled each step)


@attrs.define
class RetentionRun:
    storage: str
    jobs: int
    events: int
    fill_s: float
    sizes: list[TableSize]
    pruned: Pruned
    prune_s: float
    bytes_before: int  # the database on disk (SQLite: file and WAL)
    bytes_after: int
    kept_days: dict[str, float]  # per state, the age of its oldest job left (days)
    baseline: LiveRun
    during: LiveRun

    @property
    def total_bytes(self) -> int:
        return sum(s.table_bytes + s.index_bytes for s in self.sizes)


def _open(url: str) -> Storage:
    return PluginManager().storage(Config(db=url))


# -- sizes --------------------------------------------------------------------------


def _sqlite_sizes(path: Path) -> list[TableSize]:
    import sqlite3

    with sqlite3.connect(path) as conn:
        owner = dict(conn.execute("SELECT name, tbl_name FROM sqlite_master"))
        by_table: dict[str, list[int]] = {}
        for name, kind, nbytes in conn.execute(
            "SELECT d.name, m.type, sum(d.pgsize) FROM dbstat d"
            " LEFT JOIN sqlite_master m ON m.name = d.name GROUP BY d.name"
        ):
            table = owner.get(name, name)  # an index's table (the schema's own: itself)
            sizes = by_table.setdefault(table, [0, 0])
            sizes[0 if kind == "table" else 1] += int(nbytes)
        return [
            TableSize(table, _count(conn, table), t, i)
            for table, (t, i) in sorted(by_table.items())
            if table in owner.values() and not table.startswith("sqlite_")
        ]


def _count(conn: Any, table: str) -> int:  # a connection of either driver
    return int(conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])


def _postgres_sizes(url: str) -> list[TableSize]:
    with psycopg.connect(url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT c.relname, pg_table_size(c.oid), pg_indexes_size(c.oid) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY c.relname"
        ).fetchall()
        return [
            TableSize(name, _count(conn, name), int(heap), int(index))
            for name, heap, index in tables
        ]


def _sizes(url: str) -> list[TableSize]:
    if url.startswith("sqlite"):
        return _sqlite_sizes(_sqlite_path(url))
    return _postgres_sizes(url)


def _sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def _on_disk(url: str) -> int:
    if url.startswith("sqlite"):
        path = _sqlite_path(url)
        return sum(
            os.path.getsize(f"{path}{suffix}")
            for suffix in ("", "-wal")
            if os.path.exists(f"{path}{suffix}")
        )
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert row is not None
    return int(row[0])


def _kept_days(url: str, now: float) -> dict[str, float]:
    """Per state, the age of the history's oldest job left (the live stream's ids have a
    colon: not theirs)."""
    sql = (
        "SELECT state, min(updated_at) FROM jobs WHERE id NOT LIKE '%:%'"
        " GROUP BY state ORDER BY state"
    )
    if url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(_sqlite_path(url)) as conn:
            rows = conn.execute(sql).fetchall()
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute(sql).fetchall()
    return {state: (now - oldest) / 86_400 for state, oldest in rows if oldest is not None}


# -- the live stream ----------------------------------------------------------------


def live_pool() -> list[JobEvent]:
    """``LIVE_POOL_S`` of a ``LIVE_RATE`` stream's job events, stamped from now on."""
    batches = storage_alone.batches(LIVE_RATE, int(LIVE_RATE * LIVE_POOL_S))
    return [event for batch in batches for event in batch]


class LiveStream:
    """The pool's events, lap after lap, each lap as new jobs (ids tagged by the stream
    and the lap) LIVE_POOL_S later."""

    def __init__(self, pool: list[JobEvent], tag: str) -> None:
        self._pool = pool
        self._tag = tag
        self._lap = 0
        self._at = 0
        self.offered = 0

    def step(self, n: int) -> list[JobEvent]:
        out = []
        for _ in range(n):
            if self._at == len(self._pool):
                self._at, self._lap = 0, self._lap + 1
            event = self._pool[self._at]
            self._at += 1
            out.append(
                attrs.evolve(
                    event,
                    id=f"{event.id}:{self._tag}{self._lap}",
                    job_id=f"{event.job_id}:{self._tag}{self._lap}",
                    timestamp=event.timestamp + self._lap * LIVE_POOL_S,
                )
            )
        self.offered += n
        return out


async def _live(
    storage: Storage,
    stream: LiveStream,
    meanwhile: Callable[[], Awaitable[object]] | None,
    seconds: float,
) -> tuple[LiveRun, float]:
    """Stream for ``seconds`` (or, with ``meanwhile``, from WARMUP_S before it starts until
    it ends); return the run, measured over the window (``meanwhile``'s, else all but the
    first WARMUP_S), and the seconds ``meanwhile`` took."""
    metrics = Metrics()
    stored: list[tuple[float, int]] = []  # (when, events stored)

    def on_stored(result: IngestResult) -> None:
        stored.append((time.monotonic(), result.events_stored))

    pipeline = Pipeline(
        normalize=lambda batch: None,  # the stream is normalized already
        storage=storage,
        metrics=metrics,
        bus=Bus(),
        on_stored=on_stored,
        writers=getattr(storage, "ingest_writers", 1),
    )
    window: list[float] = []
    max_lag = 0.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipeline.run)
        done = trio.Event()

        async def run_meanwhile(act: Callable[[], Awaitable[object]]) -> None:
            await trio.sleep(WARMUP_S)
            window.append(time.monotonic())
            await act()
            window.append(time.monotonic())
            done.set()

        if meanwhile is not None:
            nursery.start_soon(run_meanwhile, meanwhile)
        started = trio.current_time()
        per_step = LIVE_RATE * STEP_S
        owed = 0.0
        step = 0
        while True:
            step += 1
            owed += per_step
            n = int(owed)
            owed -= n
            pipeline.put_events(stream.step(n), [])
            oldest = pipeline.writes.oldest_unstored
            if oldest is not None:
                max_lag = max(max_lag, time.time() - oldest)
            if meanwhile is None:
                if not window and step * STEP_S >= WARMUP_S:
                    window.append(time.monotonic())
                if step * STEP_S >= seconds:
                    window.append(time.monotonic())
                    break
            elif done.is_set():
                break
            await trio.sleep_until(started + step * STEP_S)
        pipeline.close()  # then run() stores what is left and returns
    first, last = window
    inside = sum(n for at, n in stored if first <= at <= last)
    dropped = metrics.registry.get_sample_value(
        "sluice_events_dropped_total", {"source": "ingest"}
    )
    return (
        LiveRun(stream.offered, sum(n for _, n in stored), int(dropped or 0),
                inside / (last - first), max_lag),
        last - first,
    )


# -- the run ------------------------------------------------------------------------


async def _measure(url: str, jobs: int, events: int, fill_s: float) -> RetentionRun:
    storage = _open(url)
    await storage.open()
    try:
        now = time.time()
        if hasattr(storage, "clock"):
            storage.clock = time.time  # the live stream: today's partition
        sizes = _sizes(url)
        pool = live_pool()
        baseline, _ = await _live(storage, LiveStream(pool, "b"), None, BASELINE_S)
        before = _on_disk(url)
        result: list[Pruned] = []

        async def prune() -> None:
            result.append(await storage.prune(POLICY, now))

        during, prune_s = await _live(storage, LiveStream(pool, "p"), prune, math.inf)
        after = _on_disk(url)
    finally:
        await storage.aclose()
    return RetentionRun(
        storage=url.split(":", 1)[0], jobs=jobs, events=events, fill_s=fill_s, sizes=sizes,
        pruned=result[0], prune_s=prune_s, bytes_before=before, bytes_after=after,
        kept_days=_kept_days(url, now), baseline=baseline, during=during,
    )


def run(*, storage: str, jobs: int, run_dir: Path, log: Callable[[str], None]) -> RetentionRun:
    with database(storage, run_dir) as url:
        t0 = time.perf_counter()
        events = trio.run(
            lambda: queries.fill(
                url, jobs, span_days=HISTORY_DAYS, jobs_per_batch=max(1, jobs // HISTORY_TICKS)
            )
        )
        fill_s = time.perf_counter() - t0
        log(f"    filled {jobs:,} jobs ({events:,} events) over {HISTORY_DAYS} days"
            f" in {fill_s:.0f}s")
        r = trio.run(_measure, url, jobs, events, fill_s)
        r.storage = storage
        log(f"    pruned {r.pruned.jobs:,} jobs, {r.pruned.events:,} events in {r.prune_s:.1f}s"
            f" ({r.pruned.chunks} chunks, longest {r.pruned.longest_chunk_s * 1000:.0f} ms);"
            f" live {r.during.rate:,.0f}/s during vs {r.baseline.rate:,.0f}/s before;"
            f" lost {r.during.offered - r.during.stored}")
        return r



# -- one large day, dropped (PostgreSQL) -----------------------------------------------

DROP_AGE_DAYS = 5  # the day dropped: past the policy's 2 days, inside its failed 7
DROP_FAILED = 0.10  # of the day's jobs: kept, moved out before the drop
DROP_EVENTS_A_JOB = 4


@attrs.define
class DropRun:
    jobs: int
    events: int
    day_bytes: int  # the day's two partitions with their indexes, before
    fill_s: float
    pruned: Pruned
    prune_s: float  # the whole prune: the kept jobs moved out, then the drop


def _fill_day(url: str, day: int, jobs: int) -> None:
    """``jobs`` jobs (and DROP_EVENTS_A_JOB events each) in ``day``'s partitions, by SQL:
    the generator through ingest would take an hour for a day this large."""
    from sluice_storage.common import rollups_from_jobs

    at = day * 86_400.0 + 3_600.0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO jobs (day, id, framework, state, name, queue, worker, args, kwargs,"
            " result, exception, sent_at, received_at, started_at, finished_at, runtime,"
            " created_at, updated_at, fold_ts, fold_event, fold_attempt, fold_rank_attempt,"
            " fold_rank_state)"
            " SELECT %(day)s, md5(i::text)::uuid::text, 'celery',"
            " CASE WHEN i %% 10 = 0 THEN 'failed' ELSE 'completed' END,"
            " 'tasks.t' || (i %% 50), 'default', 'w' || (i %% 8) || '@host',"
            " '(' || i || ', ''user' || i || '@example.com'')', '{}',"
            " CASE WHEN i %% 10 = 0 THEN NULL ELSE '42' END,"
            " CASE WHEN i %% 10 = 0 THEN 'ValueError(''bad ' || i || ''')' END,"
            " t, t + 0.01, t + 0.02, t + 0.5, 0.48, t, t + 0.5, t + 0.5, 'e', 0, 0, 4"
            " FROM generate_series(1, %(jobs)s) AS i, LATERAL (SELECT %(at)s + i * 0.05 AS t) AS x",
            {"day": day, "jobs": jobs, "at": at},
        )
        conn.execute(
            "INSERT INTO job_events (day, id, job_id, framework, type, state, timestamp, worker)"
            " SELECT day, id || ':' || k, id, 'celery', 'task-' || k, state, updated_at, worker"
            " FROM jobs, generate_series(1, %s) AS k WHERE day = %s",
            (DROP_EVENTS_A_JOB, day),
        )
        for statement in rollups_from_jobs("day"):
            conn.execute(statement)
        conn.execute("ANALYZE")


async def _drop(url: str, day: int, now: float) -> tuple[Pruned, float]:
    storage = _open(url)
    storage.clock = lambda: now  # type: ignore[attr-defined]
    await storage.open()
    try:
        started = time.perf_counter()
        pruned = await storage.prune(POLICY, now)
        return pruned, time.perf_counter() - started
    finally:
        await storage.aclose()


def run_drop(*, jobs: int, run_dir: Path, log: Callable[[str], None]) -> DropRun:
    """A day of ``jobs`` jobs, DROP_AGE_DAYS old, expired by the issue's policy."""
    from sluice_storage import partitions

    now = time.time()
    day = partitions.day_of(now) - DROP_AGE_DAYS
    with database("postgresql", run_dir) as url:
        storage = _open(url)
        storage.clock = lambda: day * 86_400.0  # type: ignore[attr-defined]
        trio.run(storage.open)  # migrated, the day's partitions made
        trio.run(storage.aclose)
        t0 = time.perf_counter()
        _fill_day(url, day, jobs)
        fill_s = time.perf_counter() - t0
        names = partitions.names(day)
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT pg_total_relation_size(%s) + pg_total_relation_size(%s)", names
            ).fetchone()
        day_bytes = int(row[0]) if row else 0
        log(f"    filled a day of {jobs:,} jobs ({day_bytes / 1e9:.2f} GB) in {fill_s:.0f}s")
        pruned, prune_s = trio.run(_drop, url, day, now)
        log(f"    prune {prune_s:.1f}s: {pruned.moved_jobs:,} kept jobs moved out, then the"
            f" drop of {pruned.dropped_jobs:,} jobs in {pruned.longest_drop_s * 1000:.0f} ms")
        return DropRun(
            jobs=jobs, events=jobs * DROP_EVENTS_A_JOB, day_bytes=day_bytes, fill_s=fill_s,
            pruned=pruned, prune_s=prune_s,
        )

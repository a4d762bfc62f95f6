"""History that stays bounded (issue 20): day partitions on PostgreSQL, dropped whole.

The done-means: ten days of generated history, completed jobs kept 2 days and failed ones 7;
a prune while a stream is stored. On PostgreSQL the expired rows go with their day's
partitions (no DELETE), on SQLite in chunks, and the file gives space back; the stream
loses nothing.
"""

from __future__ import annotations

import uuid

import psycopg
import trio

from sluice_core.metrics import Metrics, StorageGauges
from sluice_core.model import JobEvent, JobState
from sluice_core.retention import DAY, Pruner, RetentionPolicy
from sluice_core.storage import JobQuery, Storage
from sluice_storage import common, partitions
from tests.fixtures.storage import database_url, open_storage, pg_admin
from tests.test_retention import counts_from_scratch, ingest_at, job, partitioned

NOW = 1_800_000_000.0  # 08:00 UTC
POLICY = RetentionPolicy(days=2, failed_days=7)
DONE, FAILED = 100, 6  # jobs a day
STREAM = 20  # batches of 10 new jobs (20 events) stored during the prune


async def _ten_days(storage: Storage) -> None:
    """Each day's jobs stored on that day, at 07:00; one still running."""
    for age in range(10):
        at = NOW - age * DAY - 3600
        events: list[JobEvent] = []
        for i in range(DONE):
            events += job(f"d{age}-done-{i}", JobState.COMPLETED, at + i)
        for i in range(FAILED):
            events += job(f"d{age}-failed-{i}", JobState.FAILED, at + i)
        events += job(f"d{age}-open", JobState.ACTIVE, at)
        await ingest_at(storage, at, events)


async def _ids(storage: Storage, state: JobState) -> set[str]:
    ids: set[str] = set()
    cursor = None
    while True:
        page = await storage.list_jobs(
            JobQuery(states=frozenset({state}), limit=500, cursor=cursor)
        )
        ids |= {j.id for j in page.jobs}
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor


async def test_ten_days_expire_while_a_stream_is_stored(db_url: str) -> None:
    storage = open_storage(db_url)
    if partitioned(storage):
        storage.clock = lambda: NOW  # type: ignore[attr-defined]
    await storage.open()
    try:
        await _ten_days(storage)
        before = await storage.footprint()
        if partitioned(storage):
            storage.clock = lambda: NOW  # type: ignore[attr-defined]
        streamed: list[str] = []

        async def stream() -> None:
            for b in range(STREAM):
                ids = [f"live-{b}-{i}" for i in range(10)]
                events = [e for i in ids for e in job(i, JobState.COMPLETED, NOW)]
                with trio.fail_after(60):
                    result = await storage.ingest(events, [])
                assert result.events_stored == len(events)
                streamed.extend(ids)
                await trio.lowlevel.checkpoint()  # the prune's chunks between batches

        metrics = Metrics()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream)
            pruned = await Pruner(storage, metrics, POLICY, interval=600).prune_once(NOW)
        after = await storage.footprint()
        await StorageGauges(metrics, storage).refresh()
        text = metrics.render().decode()

        # What the policy keeps: completed jobs of the last 2 days (on PostgreSQL, of the
        # days not yet past 2 days whole: one more), failed ones of 7, every open one.
        done_days = 3 if partitioned(storage) else 2
        assert await _ids(storage, JobState.COMPLETED) == {
            f"d{age}-done-{i}" for age in range(done_days) for i in range(DONE)
        } | set(streamed)
        assert len(streamed) == STREAM * 10
        assert await _ids(storage, JobState.FAILED) == {
            f"d{age}-failed-{i}" for age in range(7) for i in range(FAILED)
        }
        assert await _ids(storage, JobState.ACTIVE) == {f"d{age}-open" for age in range(10)}
        gone = (10 - done_days) * DONE + 3 * FAILED
        assert pruned.jobs == gone
        await counts_from_scratch(storage)
        if partitioned(storage):
            # Days 3 to 9 dropped whole; first out of them, the failed jobs of days 3 to 6
            # and the open ones. Every expired job went with its partition.
            # (and the template database's, made at today's real date: empty)
            assert pruned.partitions >= 7 and pruned.dropped_jobs == gone
            assert pruned.moved_jobs == 4 * FAILED + 7
            assert pruned.events == 0 and pruned.chunks == 0
            # /metrics and the dashboard (through the footprint) say what went.
            assert after.partitions == 5 and after.partitions_dropped == pruned.partitions
            assert f"sluice_partitions_dropped_total {pruned.partitions:.1f}" in text
            assert f"sluice_jobs_dropped_total {gone:.1f}" in text
            assert "sluice_day_partitions 5.0" in text
        else:
            assert pruned.events == 2 * gone
            assert after.bytes < before.bytes and after.partitions is None
            assert f"sluice_events_pruned_total {2 * gone:.1f}" in text
    finally:
        await storage.aclose()
    if partitioned(storage):
        # No row was deleted from a table that stays (the moved ones left partitions that
        # were then dropped). The sessions have ended: their counts are flushed.
        with psycopg.connect(db_url) as conn:
            deleted = conn.execute(
                "SELECT relname, n_tup_del FROM pg_stat_user_tables"
                " WHERE relname LIKE 'jobs_%' OR relname LIKE 'job_events_%'"
            ).fetchall()
            left = partitions.days(conn)
            assert partitions.discard_detached(conn) == 0  # the detached ones were dropped
        assert deleted and all(n == 0 for _, n in deleted), deleted
        today = partitions.day_of(NOW)
        assert left == [partitions.KEPT, *range(today - 2, today + partitions.AHEAD + 1)]


async def test_an_unpartitioned_database_becomes_the_kept_partition() -> None:
    """A database from before migration 0013 keeps every row, in day 0, without a copy;
    its jobs take new events where they are and expire by the chunked DELETE."""
    name = f"sluice_test_{uuid.uuid4().hex[:12]}"
    pg_admin(f'CREATE DATABASE "{name}"')
    url = database_url(name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for version, sql in common.migrations("postgresql"):
                if version == 9:  # rollups: counted from the jobs stored before it
                    _legacy_rows(conn)
                if version < 13:
                    conn.execute(sql)
                    conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
        storage = open_storage(url)
        storage.clock = lambda: NOW  # type: ignore[attr-defined]
        await storage.open()  # migration 0013
        try:
            assert await storage.count_jobs(JobQuery(), 10**6) == 300
            old = await storage.get_job("legacy-0")
            assert old is not None and old.state is JobState.COMPLETED
            assert [e.type for e in await storage.job_events("legacy-0")] == ["task-succeeded"]
            assert (await storage.list_jobs(JobQuery(q="legacy.task"))).jobs
            # A new event for a stored job folds into its row, in day 0 (checked below): not
            # a second row in today's partition.
            await ingest_at(storage, NOW, job("legacy-1", JobState.FAILED, NOW))
            assert await storage.count_jobs(JobQuery(), 10**6) == 300
            assert len(await storage.job_events("legacy-1")) == 3
            await counts_from_scratch(storage)
            # The 200 completed 20 days before expire row by row (day 0 is not dropped).
            pruned = await storage.prune(POLICY, NOW)
            assert pruned.jobs_by_state == {"completed": 199} and pruned.partitions == 0
            assert pruned.events == 199
            await counts_from_scratch(storage)
        finally:
            await storage.aclose()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT DISTINCT day FROM jobs").fetchall() == [(0,)]
            assert partitions.KEPT in partitions.days(conn)
    finally:
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _legacy_rows(conn: psycopg.Connection[object]) -> None:
    """300 jobs as the schema before 0009 held them: 200 completed 20 days before NOW,
    100 completed a minute before; one event each."""
    conn.execute(
        "INSERT INTO jobs (id, framework, state, name, args, created_at, updated_at,"
        " finished_at, fold_ts, fold_event, fold_attempt, fold_rank_attempt, fold_rank_state)"
        " SELECT 'legacy-' || i, 'celery', 'completed', 'legacy.task', '()', t, t, t, t,"
        " 'e' || i, 0, 0, 4"
        " FROM generate_series(0, 299) AS i,"
        " LATERAL (SELECT CASE WHEN i < 200 THEN %s ELSE %s END AS t) AS at",
        (NOW - 20 * DAY, NOW - 60),
    )
    conn.execute(
        "INSERT INTO job_events (id, job_id, framework, type, state, timestamp)"
        " SELECT 'e' || i, 'legacy-' || i, 'celery', 'task-succeeded', 'completed', updated_at"
        " FROM jobs, LATERAL (SELECT substr(id, 8) AS i) AS n"
    )


async def test_a_drop_that_cannot_lock_the_tables_waits_for_the_next_prune(pg_url: str) -> None:
    """A long read holds the tables: the drop gives up after its lock timeout, keeps every
    row, and the next prune drops the day."""
    storage = open_storage(pg_url)
    storage.clock = lambda: NOW  # type: ignore[attr-defined]
    await storage.open()
    try:
        old = NOW - 5 * DAY
        await ingest_at(storage, old, job("old-done", JobState.COMPLETED, old))
        await ingest_at(storage, old, job("old-failed", JobState.FAILED, old))
        with psycopg.connect(pg_url) as reader:
            reader.execute("SELECT count(*) FROM jobs")  # its transaction stays open
            blocked = await storage.prune(POLICY, NOW)
            assert blocked.partitions == 0 and blocked.jobs == 0
            assert await storage.get_job("old-done") is not None
            reader.rollback()
        pruned = await storage.prune(POLICY, NOW)
        assert pruned.partitions > 0 and pruned.jobs_by_state == {"completed": 1}
        assert await storage.get_job("old-done") is None
        assert await storage.get_job("old-failed") is not None
        await counts_from_scratch(storage)
    finally:
        await storage.aclose()

"""Retention (issue 20): the policy, Storage.prune on both backends, the SQLite file giving
space back, `sluice prune`, the leader's duty and its metrics. Time is an injected ``now``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from sluice_core.config import Config, ConfigError, build, core_options
from sluice_core.metrics import Metrics, StorageGauges
from sluice_core.model import JobEvent, JobState, event_id
from sluice_core.retention import (
    DAY,
    PRUNE_CHUNK_MIN,
    Pruner,
    RetentionPolicy,
    Rule,
    next_chunk,
)
from sluice_core.storage import JobQuery, Pruned, Storage
from tests.fixtures.storage import open_storage

NOW = 1_800_000_000.0

_OUTCOME = {
    JobState.COMPLETED: "task-succeeded",
    JobState.FAILED: "task-failed",
    JobState.REVOKED: "task-revoked",
    JobState.REJECTED: "task-rejected",
    JobState.LOST: "task-lost",
    JobState.ACTIVE: "task-started",
    JobState.QUEUED: None,
    JobState.RETRYING: "task-retried",
    JobState.UNKNOWN: "task-unknown",
}


def job(job_id: str, state: JobState, at: float, name: str = "tasks.add") -> list[JobEvent]:
    """A job sent at ``at - 1`` whose last event, at ``at``, left it in ``state``."""
    sent = JobEvent(
        id=event_id(job_id, "task-sent"), job_id=job_id, framework="celery", type="task-sent",
        state=JobState.QUEUED, timestamp=at - 1, fields={"name": name, "args": "()"},
    )
    outcome = _OUTCOME[state]
    if outcome is None:
        return [sent]
    fields: dict[str, Any] = {"runtime": 0.5} if state is JobState.COMPLETED else {}
    last = JobEvent(
        id=event_id(job_id, outcome), job_id=job_id, framework="celery", type=outcome,
        state=state, timestamp=at, worker="w1@host", fields=fields,
    )
    return [sent, last]


async def ingest(storage: Storage, events: list[JobEvent]) -> None:
    with trio.fail_after(60):
        await storage.ingest(events, [])


async def stored_ids(storage: Storage) -> set[str]:
    page = await storage.list_jobs(JobQuery(limit=500))
    return {j.id for j in page.jobs}


async def counts_from_scratch(storage: Storage) -> tuple[dict[str, int], list[Any]]:
    """The overview's counts as kept (migration 0009), and as a count of the jobs left."""
    kept = await storage.count_jobs_by_state()
    by_state: dict[str, int] = {}
    for state in JobState:
        n = await storage.count_jobs(JobQuery(states=frozenset({state})), 10**6)
        if n:
            by_state[state.value] = n
    assert kept == by_state
    return kept, await storage.job_throughput(0.0, 60.0)


POLICY = RetentionPolicy(days=14, failed_days=30, rules=(Rule("billing.*", 90, 90),))

# id: (state, age in days of its last event, name), and whether POLICY keeps it at NOW.
CASES: dict[str, tuple[JobState, float, str, bool]] = {
    "done-new": (JobState.COMPLETED, 13.9, "tasks.add", True),
    "done-old": (JobState.COMPLETED, 14.1, "tasks.add", False),
    "failed-20": (JobState.FAILED, 20, "tasks.add", True),
    "failed-31": (JobState.FAILED, 31, "tasks.add", False),
    "lost-31": (JobState.LOST, 31, "tasks.add", False),
    "revoked-31": (JobState.REVOKED, 31, "tasks.add", False),
    "rejected-29": (JobState.REJECTED, 29, "tasks.add", True),
    "billing-60": (JobState.COMPLETED, 60, "billing.charge", True),
    "billing-91": (JobState.FAILED, 91, "billing.charge", False),
    "queued-400": (JobState.QUEUED, 400, "tasks.add", True),
    "active-400": (JobState.ACTIVE, 400, "tasks.add", True),
    "retrying-400": (JobState.RETRYING, 400, "tasks.add", True),
    "unknown-400": (JobState.UNKNOWN, 400, "tasks.add", True),
}


def test_policy_judges_each_class_and_rule() -> None:
    for job_id, (state, age, name, kept) in CASES.items():
        assert POLICY.expired(state, name, NOW - age * DAY, NOW) is not kept, job_id
    # Exactly at the edge: kept; a second past it: expired.
    assert not POLICY.expired(JobState.COMPLETED, "x", NOW - 14 * DAY, NOW)
    assert POLICY.expired(JobState.COMPLETED, "x", NOW - 14 * DAY - 1, NOW)
    forever = RetentionPolicy(days=0, failed_days=0)
    assert forever.forever and not forever.expired(JobState.FAILED, "x", 0.0, NOW)
    # A rule may prune one name sooner while the rest is kept forever.
    noisy = RetentionPolicy(days=0, failed_days=0, rules=(Rule.parse("health.*=1/7"),))
    assert noisy.scan(NOW)[JobState.COMPLETED] == NOW - DAY
    assert noisy.expired(JobState.COMPLETED, "health.ping", NOW - 2 * DAY, NOW)
    assert not noisy.expired(JobState.FAILED, "health.ping", NOW - 2 * DAY, NOW)
    assert not noisy.expired(JobState.COMPLETED, "tasks.add", NOW - 900 * DAY, NOW)
    assert POLICY.describe() == (
        "Keeping completed jobs 14 days, failed 30 days; billing.* 90 days"
    )


def test_options_flags_env_and_file(tmp_path: Path) -> None:
    options = core_options().for_command("prune")
    toml = tmp_path / "sluice.toml"
    toml.write_text('retain_failed_days = 60\nretain = ["billing.*=90", "health.*=1/7"]\n')
    config = build(
        options,
        {"retain_days": "3", "config": str(toml)},
        environ={"SLUICE_RETAIN_DAYS": "5", "SLUICE_RETAIN_FAILED_DAYS": "45"},
    )
    policy = RetentionPolicy.from_config(config)
    assert policy == RetentionPolicy(
        3, 45, (Rule("billing.*", 90, 90), Rule("health.*", 1, 7))
    )
    with pytest.raises(ConfigError, match="--retain: expected a list of GLOB=DAYS"):
        build(options, {"retain": ["billing.*"]}, environ={})
    with pytest.raises(ConfigError, match="--retain-days"):
        build(options, {"retain_days": "-1"}, environ={})


def partitioned(storage: Storage) -> bool:
    """PostgreSQL: jobs are stored in day partitions (migration 0013), by its clock."""
    return hasattr(storage, "clock")


async def ingest_at(storage: Storage, at: float, events: list[JobEvent]) -> None:
    """Ingest as if at ``at``: on PostgreSQL, into that day's partition."""
    if partitioned(storage):
        storage.clock = lambda: at  # type: ignore[attr-defined]
    await ingest(storage, events)


async def _history(storage: Storage) -> None:
    for job_id, (state, age, name, _) in CASES.items():
        await ingest_at(storage, NOW - age * DAY, job(job_id, state, NOW - age * DAY, name))


async def test_prune_keeps_exactly_what_the_policy_keeps(storage: Storage) -> None:
    await _history(storage)
    before = await counts_from_scratch(storage)
    expired = {job_id for job_id, case in CASES.items() if not case[3]}

    dry = await storage.prune(POLICY, NOW, dry_run=True)
    assert await stored_ids(storage) == set(CASES)  # nothing deleted
    assert await counts_from_scratch(storage) == before

    pruned = await storage.prune(POLICY, NOW)
    # On PostgreSQL a completed job goes with its day, once the day is past the retention
    # whole: done-old (14.1 days) shares its day with the cutoff (14 days), not yet past.
    late = {"done-old"} if partitioned(storage) else set()
    assert await stored_ids(storage) == set(CASES) - expired | late
    by_state = {"completed": 1, "failed": 2, "lost": 1, "revoked": 1}
    if late:
        del by_state["completed"]
        # Every expired job went with a partition (no DELETE of a row); kept ones moved.
        assert pruned.partitions > 0 and pruned.events == dry.events == 0
        assert pruned.moved_jobs == dry.moved_jobs == len(set(CASES) - expired) - 1
        assert pruned.dropped_jobs == dry.dropped_jobs == len(expired) - 1
    else:
        assert pruned.events == dry.events == 2 * len(expired)
    assert pruned.jobs_by_state == dry.jobs_by_state == by_state
    assert not pruned.dry_run and dry.dry_run
    for job_id in expired - late:
        assert await storage.get_job(job_id) is None
        assert await storage.job_events(job_id) == []
    for job_id in set(CASES) - expired | late:
        assert await storage.job_events(job_id)
    # The overview's counts (migration 0009) lost exactly the pruned jobs.
    kept, throughput = await counts_from_scratch(storage)
    assert sum(kept.values()) == len(CASES) - len(expired - late)
    # done-new, failed-20, billing-60 (and done-old, not yet gone)
    assert sum(done + failed for _, done, failed in throughput) == 3 + len(late)
    # Free text no longer finds them (SQLite's search index is its own table).
    assert (await storage.list_jobs(JobQuery(q="failed-31"))).jobs == []

    again = await storage.prune(POLICY, NOW)
    assert again.jobs == 0
    if late:
        # A day on, its day is past whole: it goes, and done-new (14.9 days by then) too.
        later = await storage.prune(POLICY, NOW + DAY)
        assert later.jobs_by_state == {"completed": 2} and later.events == 0
        await counts_from_scratch(storage)


async def test_prune_goes_in_chunks_and_ingest_continues(storage: Storage) -> None:
    old = NOW - 40 * DAY
    # Completed jobs kept forever: no day partition is dropped (PostgreSQL), failed jobs
    # go row by row on both backends.
    policy = attrs.evolve(POLICY, days=0)
    await ingest_at(
        storage, old, [e for i in range(25) for e in job(f"old-{i:02}", JobState.FAILED, old)]
    )
    # A kept job among the expired ones: the cursor passes it, no chunk reads it twice.
    await ingest(storage, job("billing-kept", JobState.FAILED, old, "billing.x"))

    dry = await storage.prune(policy, NOW, dry_run=True, batch=10)
    assert (dry.chunks, dry.largest_chunk, dry.jobs) == (3, 10, 25)

    pruned = await storage.prune(policy, NOW, batch=10)
    # 26 candidates, ten a transaction: 10, 10 (one kept: 9 or 10 deleted), then the rest.
    assert pruned.chunks == 3 and pruned.largest_chunk == 10 and pruned.jobs == 25
    assert await stored_ids(storage) == {"billing-kept"}
    # What arrives later for a pruned job starts it afresh, and is counted.
    await ingest(storage, job("old-00", JobState.COMPLETED, NOW))
    assert await stored_ids(storage) == {"billing-kept", "old-00"}
    await counts_from_scratch(storage)


def test_a_slow_chunk_halves_the_next_and_a_quick_one_doubles_it() -> None:
    assert next_chunk(500, 0.08, 500) == 250
    assert next_chunk(250, 0.08, 500) == 125
    assert next_chunk(12, 0.5, 500) == PRUNE_CHUNK_MIN
    assert next_chunk(125, 0.03, 500) == 125  # within budget: kept
    assert next_chunk(125, 0.005, 500) == 250
    assert next_chunk(400, 0.005, 500) == 500  # never past the batch asked for


async def test_sqlite_file_gives_space_back(tmp_path: Path) -> None:
    """50,000 jobs, 40,000 of them expired: the file (and its WAL) shrinks, every chunk
    deletes at most a batch, and the numbers are printed for docs/architecture.md."""
    path = tmp_path / "big.db"
    storage = open_storage(f"sqlite:///{path}")
    await storage.open()
    try:
        batch: list[JobEvent] = []
        for i in range(50_000):
            age = 20 if i < 40_000 else 1  # days
            batch += job(f"job-{i:05}-{'x' * 30}", JobState.COMPLETED, NOW - age * DAY + i)
            if len(batch) >= 10_000:
                await ingest(storage, batch)
                batch = []
        await ingest(storage, batch)
        before = await storage.footprint()

        pruned = await storage.prune(POLICY, NOW, batch=500)
        after = await storage.footprint()
        wal = path.with_name(path.name + "-wal")
        print(
            f"\nsqlite prune: {pruned.jobs} jobs, {pruned.events} events,"
            f" {pruned.chunks} chunks of <= {pruned.largest_chunk},"
            f" longest {pruned.longest_chunk_s * 1000:.1f} ms;"
            f" {before.bytes} bytes -> {after.bytes} (file {path.stat().st_size},"
            f" WAL {wal.stat().st_size if wal.exists() else 0})"
        )
        assert pruned.jobs == 40_000 and pruned.events == 80_000
        # 50 a transaction first, doubled after a quick one up to the 500 asked, halved
        # after one that held the writer over 50 ms.
        assert pruned.chunks >= 80 and 50 <= pruned.largest_chunk <= 500
        assert after.bytes < before.bytes * 0.5
        assert after.oldest_job_at is not None and after.oldest_job_at > NOW - 2 * DAY
        assert await storage.count_jobs(JobQuery(), 10**6) == 10_000
    finally:
        await storage.aclose()


async def test_an_old_sqlite_file_is_switched_to_incremental_vacuum(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE before_sluice (x)")  # made without auto_vacuum
    conn.close()
    storage = open_storage(f"sqlite:///{path}")
    await storage.open()
    await storage.aclose()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    conn.close()


async def test_pruner_duty_prunes_every_interval_and_counts(
    sqlite_url: str, autojump_clock: trio.testing.MockClock
) -> None:
    storage = open_storage(sqlite_url)
    await storage.open()
    try:
        # Past any default retention by the wall clock the duty reads.
        await ingest(storage, job("ancient", JobState.COMPLETED, 1_000_000_000.0))
        await ingest(storage, job("open", JobState.ACTIVE, 1_000_000_000.0))
        metrics = Metrics()
        done = trio.Event()

        class Told(Pruner):
            async def prune_once(self, now: float) -> Pruned:
                pruned = await super().prune_once(now)
                done.set()
                return pruned

        pruner = Told(storage, metrics, RetentionPolicy(), interval=600)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pruner.run)
            started = trio.current_time()
            await done.wait()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - started >= 600  # not at once: a start has a backlog first
        assert pruner.last is not None and pruner.last.jobs_by_state == {"completed": 1}
        await StorageGauges(metrics, storage).refresh()
        text = metrics.render().decode()
        assert 'sluice_jobs_pruned_total{state="completed"} 1.0' in text
        assert "sluice_events_pruned_total 2.0" in text
        assert "sluice_oldest_job_timestamp_seconds 9.99999999e+08" in text
        size = next(
            line for line in text.splitlines() if line.startswith("sluice_database_bytes ")
        )
        assert float(size.split()[1]) > 0
    finally:
        await storage.aclose()


def _sluice(*args: str, db: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SLUICE_DATABASE_URL": db}
    return subprocess.run(
        [sys.executable, "-m", "sluice_core", "prune", *args],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )


async def test_sluice_prune_cli(db_url: str) -> None:
    now = time.time()  # what the command judges by
    storage = open_storage(db_url)
    await storage.open()
    try:
        for job_id, state, age in [
            ("cli-old", JobState.COMPLETED, 20),
            ("cli-new", JobState.COMPLETED, 1),
            ("cli-failed", JobState.FAILED, 20),
            ("cli-open", JobState.ACTIVE, 400),
        ]:
            await ingest_at(storage, now - age * DAY, job(job_id, state, now - age * DAY))
    finally:
        await storage.aclose()
    dry = await trio.to_thread.run_sync(lambda: _sluice("--dry-run", db=db_url))
    lines = dry.stdout.splitlines()
    if partitioned(storage):
        # cli-old goes with its day; cli-failed and cli-open move out of theirs first.
        assert lines[1] == "completed: would delete 1 jobs"
        assert lines[2].startswith("total: would delete 1 jobs and 0 events in 0 transactions")
        # (each ingest made its day's partitions and two days' ahead)
        assert re.match(r"day partitions: would drop \d+ \(1 jobs; 2 kept moved out", lines[3])
        assert lines[5] == "dry run: nothing was deleted"
    else:
        assert lines == [
            "Keeping completed jobs 14 days, failed 30 days",
            "completed: would delete 1 jobs",
            lines[2],  # the transactions and their time
            lines[3],  # the database's size
            "dry run: nothing was deleted",
        ]
        assert lines[2].startswith("total: would delete 1 jobs and 2 events in 1")
    done = await trio.to_thread.run_sync(lambda: _sluice(db=db_url))
    assert "completed: deleted 1 jobs" in done.stdout
    storage = open_storage(db_url)
    await storage.open()
    try:
        assert await stored_ids(storage) == {"cli-new", "cli-failed", "cli-open"}
    finally:
        await storage.aclose()


def test_the_policy_read_from_a_config() -> None:
    policy = RetentionPolicy.from_config(Config(retain_days=7, retain=["a*=1"]))
    assert policy.describe() == "Keeping completed jobs 7 days, failed 30 days; a* 1 day"

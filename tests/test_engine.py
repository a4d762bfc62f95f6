"""The engine's pipeline: bounded buffering, counted drops, flush on stop, restarts."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import trio

from bench.generator import Plan, build_ticks, redis_channel, redis_envelope
from sluice_celery.events import normalize_batch
from sluice_core import merge
from sluice_core.config import Config
from sluice_core.engine import Engine
from sluice_core.metrics import Metrics, StorageGauges
from sluice_core.model import JobEvent, JobState, RawBatch, Worker
from sluice_core.plugins import PluginManager
from sluice_core.storage import JobQuery, Page
from tests.fixtures.services import PG_URL, free_port, wait_port
from tests.fixtures.storage import pg_admin
from tests.metrics import metric
from tests.waiting import wait_until


def job_events(n: int, start: float) -> list[JobEvent]:
    return [
        JobEvent(
            id=f"e{i}",
            job_id=f"job-{i}",
            framework="test",
            type="sent",
            state=JobState.QUEUED,
            timestamp=start + i * 1e-3,
            fields={"name": "tasks.add", "queue": "default"},
        )
        for i in range(n)
    ]


def ingested(engine: Engine) -> float:
    return metric(engine.metrics, "sluice_events_ingested_total")


def make_engine(tmp_path: Path, **config: object) -> Engine:
    pm = PluginManager()
    cfg = Config(db=f"sqlite:///{tmp_path}/engine.db", **config)  # type: ignore[arg-type]
    pm.configure(cfg)
    return Engine(cfg, pm)


async def test_stop_flushes_everything_already_read(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, batch_events=100)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(engine.run, web=False))
            engine.pipeline.put_events(job_events(5_000, time.time()), [])
            engine.stop()  # at once: the events are still in the buffer
    reopened = make_engine(tmp_path)
    await reopened.storage.open()
    try:
        counts = await reopened.storage.count_jobs_by_state()
        assert counts.get("queued") == 5_000
    finally:
        await reopened.storage.aclose()


async def test_a_full_buffer_drops_and_counts_instead_of_blocking_the_source(
    tmp_path: Path,
) -> None:
    engine = make_engine(tmp_path, buffer_messages=1_000, spool_mb=0)
    batch = RawBatch("celery/redis", "test-source", [("ch", b"{}")] * 600, time.time())
    # Not started: nothing drains the buffer, as when storage is stalled.
    engine.pipeline.put_raw(batch)
    engine.pipeline.put_raw(batch)  # 1,200 > 1,000: this one is dropped, not queued
    dropped = metric(engine.metrics, "sluice_events_dropped_total", source="test-source")
    received = metric(engine.metrics, "sluice_messages_received_total", source="test-source")
    assert (dropped, received) == (600, 1_200)


async def test_the_buffer_is_bounded_in_bytes_too(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, buffer_mb=1, spool_mb=0)
    big = RawBatch("celery/redis", "test-source", [("ch", b"x" * 400_000)], time.time())
    for _ in range(3):  # 1.2 MB: the third does not fit in 1 MiB
        engine.pipeline.put_raw(big)
    assert metric(engine.metrics, "sluice_events_dropped_total", source="test-source") == 1


async def test_past_the_memory_buffer_batches_are_spooled_to_disk_and_all_stored(
    tmp_path: Path,
) -> None:
    plan = Plan(broker="redis://localhost:6379/0", events=20_000)
    messages = [
        (redis_channel("", 0, m.routing_key), redis_envelope(m))
        for tick in build_ticks(plan, 0)
        for m in tick
    ]
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    engine = make_engine(
        tmp_path, buffer_mb=1, spool_mb=64, spool_dir=str(spool_dir), batch_events=5_000
    )
    engine.pm.load(["celery"])
    # Not started yet, as when storage is stalled: 1 MiB stays in memory, the rest spools.
    for i in range(0, len(messages), 200):
        engine.pipeline.put_raw(RawBatch("celery/redis", "test", messages[i : i + 200], 0.0))
    raw_bytes = sum(len(body) for _, body in messages)
    assert raw_bytes > 8 * 2**20
    assert metric(engine.metrics, "sluice_spooled_bytes") > raw_bytes - 2 * 2**20
    assert metric(engine.metrics, "sluice_events_dropped_total", source="test") == 0
    assert metric(engine.metrics, "sluice_buffered_messages") == len(messages)
    assert list(spool_dir.iterdir()) == []  # unlinked at once: a crash leaves nothing behind
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(engine.run, web=False))
            engine.stop()
    expected = normalize_batch(RawBatch("celery/redis", "test", messages, 0.0))
    assert ingested(engine) == len(expected.job_events)
    assert metric(engine.metrics, "sluice_spooled_bytes") == 0
    reopened = make_engine(tmp_path)
    await reopened.storage.open()
    try:
        counts = await reopened.storage.count_jobs_by_state()
        assert sum(counts.values()) == len({event.job_id for event in expected.job_events})
    finally:
        await reopened.storage.aclose()


def test_sigterm_stops_sluice_run_cleanly(tmp_path: Path) -> None:
    port = free_port()
    db = f"sqlite:///{tmp_path}/run.db"
    env = {**os.environ, "SLUICE_DATABASE_URL": db, "SLUICE_PORT": str(port)}
    env.pop("SLUICE_BROKER_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice_core", "run"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_port(port)
        # Serving; with no broker nor API key nothing can send events, and health says so.
        health = httpx.get(f"http://127.0.0.1:{port}/healthz")
        assert health.status_code == 503 and health.json()["sources"]["ingest"]["up"] is False
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM received" in err and "stopped" in err


async def test_a_database_outage_holds_the_events_until_it_is_back(pg_url: str) -> None:
    """While PostgreSQL refuses the database, the pipeline keeps the batch and retries;
    every event read meanwhile is stored once it is back."""
    name = pg_url.rsplit("/", 1)[1]
    pm = PluginManager()
    config = Config(db=pg_url)
    pm.configure(config)
    engine = Engine(config, pm)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(engine.run, web=False))
            pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            pg_admin(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            )
            engine.pipeline.put_events(job_events(500, time.time()), [])
            await wait_until(lambda: metric(engine.metrics, "sluice_storage_errors_total") >= 1)
            assert ingested(engine) == 0
            pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await wait_until(lambda: ingested(engine) >= 500)
            assert ingested(engine) == 500
            counts = await engine.storage.count_jobs_by_state()
            engine.stop()
    assert counts == {"queued": 500}


async def test_with_two_writers_every_job_is_folded_whole(
    pg_url: str,
) -> None:
    """PostgreSQL takes two ingest transactions at once: the pipeline splits batches by
    job id, so a job's events, spread over many batches, all reach one writer, in order."""
    plan = Plan(broker="redis://localhost:6379/0", events=6_000)
    batches = [
        RawBatch("celery/redis", "test", [(redis_channel("", 0, m.routing_key), redis_envelope(m))
                                          for m in tick], 0.0)
        for tick in build_ticks(plan, 0)
    ]
    pm = PluginManager()
    config = Config(db=pg_url, batch_events=300)  # many small transactions, in flight together
    pm.configure(config)
    pm.load(["celery"])
    engine = Engine(config, pm)
    assert engine.storage.ingest_writers == 2
    expected = [normalize_batch(batch) for batch in batches]
    events = [event for n in expected for event in n.job_events]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(engine.run, web=False))
            for batch in batches:
                engine.pipeline.put_raw(batch)
            await wait_until(lambda: ingested(engine) >= len(events))
            history: dict[str, list[JobEvent]] = {}
            for event in events:
                history.setdefault(event.job_id, []).append(event)
            for job_id, job_events_ in history.items():
                stored = await engine.storage.get_job(job_id)
                assert stored == merge.rebuild(job_id, "celery", job_events_)
            engine.stop()
    assert metric(engine.metrics, "sluice_storage_errors_total") == 0


class _SlowCounts:
    """The storage reads the gauges make, the job count taking ``delay`` seconds as under
    heavy ingest. In memory: a database call runs in a thread, and autojump moves the
    clock on whenever a thread call is slow (on a busy machine, past a whole sleep)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.counts = 0

    async def count_jobs_by_state(self) -> dict[str, int]:
        self.counts += 1
        await trio.sleep(self.delay)
        return {"queued": 3}

    async def list_workers(self) -> list[Worker]:
        return []

    async def list_jobs(self, query: JobQuery) -> Page:
        return Page(jobs=[], next_cursor=None)


async def test_job_gauges_are_counted_in_the_background_while_scraped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A slow count never holds up a scrape after the first, takes at most a fifth of
    the time, and stops once nobody scrapes."""
    metrics = Metrics()
    slow = _SlowCounts(delay=10.0)
    gauges = StorageGauges(metrics, slow, interval=5.0, duty=0.2, idle_after=120.0)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gauges.run)
        await trio.sleep(60)
        assert slow.counts == 0  # nobody asked
        gauges.want()
        await gauges.refreshed.wait()
        assert metric(metrics, "sluice_jobs", state="queued") == 3
        # 10 s a count, a fifth of the time at most: the next one starts 40 s later.
        started = trio.current_time()
        await wait_until(lambda: slow.counts >= 2, timeout=120)
        assert trio.current_time() - started >= 39
        slow.delay = 0.0
        await trio.sleep(600)  # no scrape since: counting stops after idle_after
        idle = slow.counts
        await trio.sleep(600)
        assert slow.counts == idle <= 2 + 120 / 5 + 1
        gauges.want()
        await trio.sleep(1)
        assert slow.counts == idle + 1
        nursery.cancel_scope.cancel()


def sessions_waiting_on_a_lock(url: str) -> int:
    """How many sessions of ``url``'s database wait for a lock another one holds."""
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            (url.rsplit("/", 1)[1],),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_with_two_writers_an_offered_batch_is_acked_once_all_its_parts_are_stored(
    pg_url: str,
) -> None:
    """The ingest endpoint answers when ``stored`` is set: every part must be in by then.

    Another session holds an uncommitted row of one job, so the part with that job
    waits on it while the other part is written.
    """
    pm = PluginManager()
    config = Config(db=pg_url)
    pm.configure(config)
    engine = Engine(config, pm)
    events = job_events(200, time.time())
    blocker = psycopg.connect(pg_url)
    blocker.execute(
        # In today's partition, where ingest stores a new job (migration 0013).
        "INSERT INTO jobs (day, id, framework, state, fold_ts, fold_event, fold_attempt,"
        " fold_rank_attempt, fold_rank_state) VALUES"
        " (floor(extract(epoch FROM now()) / 86400), 'job-0', 'test', 'queued', 0, '', 0, 0, 0)"
    )
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(engine.run, web=False))
                stored = trio.Event()
                assert engine.pipeline.offer(events, [], stored)
                try:
                    await wait_until(lambda: ingested(engine) > 0, "the part without job-0")
                    await wait_until(
                        lambda: trio.to_thread.run_sync(sessions_waiting_on_a_lock, pg_url),
                        "the part with job-0 to wait for the blocker's row",
                    )
                    assert not stored.is_set()
                finally:  # the blocked writer's thread cannot be cancelled: free it first
                    await trio.to_thread.run_sync(blocker.rollback)
                await stored.wait()
                counts = await engine.storage.count_jobs_by_state()
                empty = trio.Event()
                assert engine.pipeline.offer([], [], empty)  # nothing to write: still acked
                await empty.wait()
                engine.stop()
    finally:
        blocker.close()
    assert counts == {"queued": 200}

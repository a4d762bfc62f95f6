"""Web replicas: what one process stores reaches the others' live streams, through
PostgreSQL's LISTEN/NOTIFY (storage/postgres.py PostgresChangeFeed, sluice_core/follow.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import orjson
import psycopg
import trio

from sluice_core.bus import Bus, Gap
from sluice_core.follow import Follower
from sluice_core.model import JobEvent, JobState, QueueSample, WorkerEvent
from sluice_core.storage import Change
from sluice_storage.postgres import NOTIFY_BYTES, decode_change, encode_change
from tests.fixtures.services import free_port, listening
from tests.fixtures.storage import open_storage
from tests.test_stream import next_of, sse
from tests.waiting import wait_until


def sent(job_id: str, at: float) -> JobEvent:
    return JobEvent(
        id=f"sent-{job_id}", job_id=job_id, framework="test", type="sent",
        state=JobState.QUEUED, timestamp=at, fields={"name": "tasks.add", "queue": "q"},
    )


def test_a_large_change_goes_as_several_payloads_each_under_the_limit() -> None:
    ids = tuple(f"{i:08d}-0000-4000-8000-000000000000" for i in range(1_000))
    sample = QueueSample("q", "test", "redis://h", 1.0, depth=3, reserved=1, consumers=2)
    change = Change(jobs=ids, new_jobs=600, workers=("w1",), queues=(sample,))
    payloads = encode_change(change)
    assert len(payloads) > 2
    assert all(len(p.encode()) < NOTIFY_BYTES + 100 for p in payloads)
    parts = [decode_change(p) for p in payloads]
    assert tuple(i for part in parts for i in part.jobs) == ids
    assert sum(part.new_jobs for part in parts) == 600
    assert [w for part in parts for w in part.workers] == ["w1"]
    assert [q for part in parts for q in part.queues] == [sample]


async def test_what_one_process_stores_the_other_hears_and_a_cut_feed_is_a_gap(
    pg_url: str,
) -> None:
    writer, reader = open_storage(pg_url), open_storage(pg_url)
    await writer.open()
    await reader.open()
    feed = reader.change_feed()
    assert feed is not None
    heard: list[Change] = []
    gaps: list[float] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed.follow, heard.append, lambda: gaps.append(time.time()))
            await wait_until(lambda: gaps, "the feed connects")
            now = time.time()
            ids = [f"job-{i:04d}-{'x' * 30}" for i in range(400)]  # several payloads
            await writer.ingest(
                [sent(job_id, now + i * 1e-3) for i, job_id in enumerate(ids)],
                [WorkerEvent("w1", "test", "heartbeat", now, freq=2.0)],
            )
            await wait_until(lambda: sum(len(c.jobs) for c in heard) == 400, "every id heard")
            assert [i for c in heard for i in c.jobs] == ids
            assert sum(c.new_jobs for c in heard) == 400
            assert [w for c in heard for w in c.workers] == ["w1"]

            sample = QueueSample("q", "test", "redis://h", now, depth=7, consumers=1)
            await writer.record_queue_samples([sample])
            await wait_until(lambda: any(c.queues for c in heard), "the sample heard")
            assert [q for c in heard for q in c.queues] == [sample]

            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = 'sluice-changes' AND datname = current_database()"
                )
            await wait_until(lambda: len(gaps) == 2, "the feed reconnects, and says it missed")
            heard.clear()
            await writer.ingest([sent("after", time.time())], [])
            await wait_until(lambda: heard, "changes are heard again")
            assert heard == [Change(jobs=("after",), new_jobs=1)]
            nursery.cancel_scope.cancel()
    finally:
        await writer.aclose()
        await reader.aclose()


async def test_a_follower_publishes_the_rows_the_writer_stored(pg_url: str) -> None:
    writer, reader = open_storage(pg_url), open_storage(pg_url)
    await writer.open()
    await reader.open()
    feed = reader.change_feed()
    assert feed is not None
    # The follower's reads are the windows: what it read goes out then, not on the
    # bus's own cadence (a window this long would hold the second change a minute).
    bus = Bus(window=60.0)
    follower = Follower(reader, feed, bus)
    try:
        async with trio.open_nursery() as nursery:
            with bus.subscribe():
                nursery.start_soon(follower.run)
                # The first connection is a gap: a stream from before it resyncs.
                start = bus.last_id
                await wait_until(lambda: bus.last_id > start, "the feed connects")
                position = bus.last_id
                now = time.time()
                await writer.ingest([sent("j1", now), sent("j2", now + 1e-3)], [])
                batch = await bus.next_batch(position)
                assert [(m.kind, m.key, m.new) for m in batch.messages] == [
                    ("job", "j1", True), ("job", "j2", True)
                ]
                assert batch.messages[0].job is not None
                assert batch.messages[0].job.state is JobState.QUEUED
                position = batch.last_id
                await writer.ingest(
                    [JobEvent(id="done-j1", job_id="j1", framework="test", type="done",
                              state=JobState.COMPLETED, timestamp=now + 1, worker="w1")],
                    [WorkerEvent("w1", "test", "heartbeat", now + 1, freq=2.0)],
                )
                messages = []
                with trio.fail_after(10):
                    while len(messages) < 2:  # the row and the worker, in one window or two
                        batch = await bus.next_batch(position)
                        messages += batch.messages
                        position = batch.last_id
                assert {(m.kind, m.key) for m in messages} == {("job", "j1"), ("worker", "w1")}
                job = next(m.job for m in messages if m.kind == "job")
                assert job is not None and job.state is JobState.COMPLETED

                with psycopg.connect(pg_url, autocommit=True) as conn:
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE"
                        " application_name = 'sluice-changes' AND datname = current_database()"
                    )
                with trio.fail_after(30):
                    try:
                        await bus.next_batch(position)
                    except Gap:
                        pass
                    else:
                        raise AssertionError("an up-to-date stream must resync after a cut feed")
            nursery.cancel_scope.cancel()
    finally:
        await writer.aclose()
        await reader.aclose()


@asynccontextmanager
async def sluice_web(db: str) -> AsyncIterator[str]:
    """A `sluice web` process on ``db``; its base URL once it listens."""
    port = free_port()
    env = {**os.environ, "SLUICE_DATABASE_URL": db, "SLUICE_PORT": str(port)}
    env.pop("SLUICE_BROKER_URL", None)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "sluice_core", "web"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        await wait_until(lambda: listening(port) or proc.poll() is not None, "it listens")
        assert proc.returncode is None, "sluice web exited"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        with trio.move_on_after(20):
            await proc.wait()
        proc.kill()


async def test_two_web_replicas_stream_what_an_agent_stores(pg_url: str) -> None:
    writer = open_storage(pg_url)
    await writer.open()
    try:
        with trio.fail_after(60):
            async with (
                sluice_web(pg_url) as first,
                sluice_web(pg_url) as second,
                httpx.AsyncClient(timeout=30) as client,
                client.stream("GET", f"{first}/api/stream") as one,
                client.stream("GET", f"{second}/api/stream") as two,
            ):
                streams = [sse(one), sse(two)]
                for events in streams:
                    assert "retry" in await anext(events)  # subscribed
                await writer.ingest([sent("from-the-agent", time.time())], [])
                for events in streams:
                    job = orjson.loads((await next_of(events, "job"))["data"])
                    assert (job["id"], job["state"]) == ("from-the-agent", "queued")
                health = await client.get(f"{first}/healthz")
                # Healthy without a source of its own; it runs no singleton duty.
                assert health.status_code == 200, health.text
                assert (health.json()["sources"], health.json()["leader"]) == ({}, False)
    finally:
        await writer.aclose()


def test_sluice_web_on_sqlite_is_one_line_saying_it_needs_postgresql(tmp_path: Path) -> None:
    env = {**os.environ, "SLUICE_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    proc = subprocess.run(
        [sys.executable, "-m", "sluice_core", "web"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sluice: error: sluice web serves a database that agents write: it needs PostgreSQL"
        " (--db postgresql://...), not sqlite"
    ]

"""Queues and workers: depth, reserved, consumers, offline workers, lost and stuck jobs, metrics.

The probes and the engine run against the machine's Redis and RabbitMQ and a
real Celery worker, each test under its own key prefix (the ``keyprefix``
fixture) and, on RabbitMQ, vhost. What a user sees of queues and workers is
the same on both brokers, and proven by the same tests.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from sluice_celery.redis_probe import RedisQueueProbe
from sluice_core.config import Config
from sluice_core.engine import Engine
from sluice_core.model import JobState, QueueSample, WorkerEvent
from sluice_core.plugins import PluginManager
from sluice_core.probes import WorkerProbe, WorkerQueues
from sluice_core.storage import JobQuery, Storage
from sluice_rabbitmq.probe import AmqpQueueProbe
from tests.celery_app import make_app
from tests.fixtures.celery_worker import CeleryWorker
from tests.fixtures.services import REDIS_URL
from tests.test_api import ingest, job_event, serving
from tests.waiting import wait_until

BOTH = pytest.mark.parametrize("celery_worker", ["redis", "rabbitmq"], indirect=True)

# -- the Redis probe -----------------------------------------------------------------


async def test_depth_of_a_queue_with_no_consumer_counts_every_priority(keyprefix: str) -> None:
    app = make_app(REDIS_URL, keyprefix=keyprefix, queue="jobs")
    sent = {0: 2, 3: 1, 6: 1, 9: 2}  # kombu keeps one list per priority step

    def publish() -> None:
        for priority, count in sent.items():
            for _ in range(count):
                app.send_task("tests.add", args=(1, 2), queue="jobs", priority=priority)

    probe = RedisQueueProbe(REDIS_URL, keyprefix=keyprefix, queues=["configured-only"])
    try:
        with trio.fail_after(30):
            await trio.to_thread.run_sync(publish)
            samples = {s.name: s for s in await probe.probe({"known-from-jobs"})}
    finally:
        app.close()
        await probe.aclose()
    # "jobs" was found in kombu's bindings; the others came from configuration and jobs.
    assert set(samples) == {"jobs", "configured-only", "known-from-jobs"}
    jobs = samples["jobs"]
    assert (jobs.depth, jobs.reserved, jobs.consumers) == (sum(sent.values()), 0, 0)
    assert samples["configured-only"].depth == 0
    assert jobs.broker == "redis://localhost:6379/0" and jobs.framework == "celery"


async def test_reserved_counts_prefetched_jobs_and_consumers_come_from_the_worker(
    celery_worker: CeleryWorker,
) -> None:
    probe = RedisQueueProbe(REDIS_URL, keyprefix=celery_worker.keyprefix)
    queue = celery_worker.queue
    try:
        with trio.fail_after(30):
            # Both pool children busy: the next four wait in the worker, prefetched (unacked).
            for _ in range(2):
                await celery_worker.send("tests.sleep", 5)
            for _ in range(4):
                await celery_worker.send("tests.add", 1, 1)

            async def prefetched() -> QueueSample | None:
                sample = {s.name: s for s in await probe.probe(set())}[queue]
                return sample if (sample.depth, sample.reserved) == (0, 4) else None

            sample = await wait_until(prefetched, "none waiting, four reserved", poll=0.2)
    finally:
        await probe.aclose()
    assert sample.consumers == 1


# -- both brokers' probes --------------------------------------------------------------


def broker_probe(worker: CeleryWorker) -> RedisQueueProbe | AmqpQueueProbe:
    """The probe Sluice's plugins run for the worker's broker."""
    pm = PluginManager()
    pm.load(["celery", "rabbitmq"])
    config = Config(broker=[worker.broker_url], redis_keyprefix=worker.keyprefix)
    [probe] = pm.probes(config)
    assert isinstance(probe, RedisQueueProbe | AmqpQueueProbe)
    return probe


@BOTH
async def test_a_workers_queues_and_concurrency_are_learnt_and_its_queue_measured(
    celery_worker: CeleryWorker,
) -> None:
    probe = broker_probe(celery_worker)
    queue = celery_worker.queue
    try:
        with trio.fail_after(30):
            await probe.probe(set())
            learnt = probe.take_worker_queues()
            again = probe.take_worker_queues()
            # No job named the queue: the broker's bindings or the worker's answer did.
            sample = {s.name: s for s in await probe.probe(set())}[queue]
    finally:
        await probe.aclose()
    assert isinstance(probe, WorkerProbe)  # the engine stores what it learns
    assert learnt == [WorkerQueues(celery_worker.hostname, "celery", [queue], concurrency=2)]
    assert again == []  # reported once
    assert (sample.depth, sample.consumers) == (0, 1)


# -- the engine with a real worker --------------------------------------------------


@asynccontextmanager
async def watching(
    tmp_path: Path, worker: CeleryWorker
) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    """``sluice run --plugin celery --plugin rabbitmq`` on the worker's broker (and key
    prefix), with its web server."""
    pm = PluginManager()
    pm.load(["celery", "rabbitmq"])
    config = Config(
        broker=[worker.broker_url],
        db=f"sqlite:///{tmp_path}/sluice.db",
        port=0,
        redis_keyprefix=worker.keyprefix,
        redis_probe_interval=0.5,
        rabbitmq_probe_interval=0.5,
        heartbeat_missed=1.5,
    )
    pm.configure(config)
    engine = Engine(config, pm)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        base = engine.web_addresses[0].replace("0.0.0.0", "127.0.0.1")
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            yield engine, client
        engine.stop()


@BOTH
async def test_killed_worker_goes_offline_and_its_running_job_becomes_lost(
    celery_worker: CeleryWorker, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with watching(tmp_path, celery_worker) as (_, client):

            async def worker() -> dict[str, Any] | None:
                # Known from its heartbeats (not only from its answer to active_queues).
                found = [w for w in (await client.get("/api/workers")).json()
                         if w["hostname"] == celery_worker.hostname and w["last_heartbeat"]]
                return found[0] if found else None

            async def job(job_id: str, state: str) -> dict[str, Any] | None:
                response = await client.get(f"/api/jobs/{job_id}")
                return response.json() if response.json().get("state") == state else None

            online = await wait_until(worker, "the worker, known from its heartbeats")
            assert online["status"] == "online"
            job_id = await celery_worker.send("tests.sleep", 30)
            await wait_until(functools.partial(job, job_id, "active"), "the job active")
            celery_worker.kill()
            killed_at = trio.current_time()
            lost = await wait_until(functools.partial(job, job_id, "lost"), "the job lost")
            # Heartbeats every 2 s, offline after 1.5 missed: seconds, not minutes.
            assert trio.current_time() - killed_at < 10
            assert (await worker() or {})["status"] == "offline"
            assert "no heartbeat" in lost["exception"]
            page = (await client.get("/workers")).text
            assert celery_worker.hostname in page and "status-offline" in page


@BOTH
async def test_stopped_worker_goes_offline_cleanly_and_its_queue_then_fills_with_no_consumer(
    celery_worker: CeleryWorker, tmp_path: Path
) -> None:
    queue = celery_worker.queue
    with trio.fail_after(60):
        async with watching(tmp_path, celery_worker) as (_, client):

            async def queue_row() -> dict[str, Any] | None:
                rows = [q for q in (await client.get("/api/queues")).json() if q["name"] == queue]
                return rows[0] if rows else None

            async def workers() -> list[dict[str, Any]]:
                return list((await client.get("/api/workers")).json())

            served = await wait_until(queue_row, "the queue in /api/queues")
            assert served["depth"] == 0
            await wait_until(lambda: _consumers(queue_row, 1))
            [online] = await wait_until(workers, "the worker in /api/workers")
            assert online["queues"] == [queue] and online["concurrency"] == 2
            await trio.to_thread.run_sync(celery_worker.stop)
            [offline] = await wait_until(
                lambda: _matching(workers, lambda w: w["status"] == "offline")
            )
            assert offline["hostname"] == celery_worker.hostname
            for _ in range(3):
                await celery_worker.send("tests.add", 1, 2)
            filled = await wait_until(
                lambda: _matching_one(queue_row, lambda q: q["depth"] == 3 and q["consumers"] == 0)
            )
            # RabbitMQ's passive declare counts ready messages only: reserved is unknown.
            on_redis = celery_worker.broker_url.startswith("redis")
            assert filled["reserved"] == (0 if on_redis else None)
            html = (await client.get("/queues")).text
            assert f'data-queue="{queue}"' in html


async def _consumers(row: Callable[[], Awaitable[dict[str, Any] | None]], n: int) -> bool:
    found = await row()
    return found is not None and found["consumers"] == n


async def _matching(
    rows: Callable[[], Awaitable[list[dict[str, Any]]]], test: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    return [row for row in await rows() if test(row)]


async def _matching_one(
    row: Callable[[], Awaitable[dict[str, Any] | None]], test: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    found = await row()
    return found if found is not None and test(found) else None


# -- stuck jobs ------------------------------------------------------------------------


async def test_stuck_jobs_are_queued_with_no_taker_or_running_far_beyond_their_usual_runtime(
    storage: Storage,
) -> None:
    now = time.time()
    events = [
        job_event("queued-long", "task-sent", JobState.QUEUED, now - 700, name="t.a"),
        job_event("queued-recent", "task-sent", JobState.QUEUED, now - 60, name="t.a"),
        job_event("received-long", "task-sent", JobState.QUEUED, now - 700, name="t.a"),
        job_event("received-long", "task-received", JobState.RECEIVED, now - 690),
    ]
    # t.quick usually runs 2 s: stuck past max(60 s, 5 x 2 s).
    for i in range(5):
        events += [
            job_event(f"quick-{i}", "task-started", JobState.ACTIVE, now - 500, name="t.quick"),
            job_event(f"quick-{i}", "task-succeeded", JobState.COMPLETED, now - 498, runtime=2.0),
        ]
    events += [
        job_event("quick-slow", "task-started", JobState.ACTIVE, now - 120, name="t.quick"),
        job_event("quick-normal", "task-started", JobState.ACTIVE, now - 20, name="t.quick"),
        # No completed run yet: judged against the queued threshold (600 s).
        job_event("new-5min", "task-started", JobState.ACTIVE, now - 300, name="t.new"),
        job_event("new-11min", "task-started", JobState.ACTIVE, now - 660, name="t.new"),
    ]
    await storage.ingest(events, [])
    page = await storage.list_jobs(JobQuery(stuck=True))
    assert {job.id for job in page.jobs} == {"queued-long", "quick-slow", "new-11min"}
    # Queued and active ones are read apart and merged: pages, newest first, are whole.
    newest_first = [job.id for job in page.jobs]
    assert newest_first == ["quick-slow", "new-11min", "queued-long"]  # by first event, newest first
    for limit in (1, 2):
        paged, cursor = [], None
        while True:
            part = await storage.list_jobs(JobQuery(stuck=True, limit=limit, cursor=cursor))
            paged += [job.id for job in part.jobs]
            if part.next_cursor is None:
                break
            cursor = part.next_cursor
        assert paged == newest_first, limit
    # Combined with the other filters like any of them.
    page = await storage.list_jobs(JobQuery(stuck=True, name="t.quick"))
    assert [job.id for job in page.jobs] == ["quick-slow"]


async def test_api_lists_stuck_jobs_and_rejects_a_bad_flag(tmp_path: Path) -> None:
    now = time.time()
    async with serving(tmp_path) as (engine, client):
        await ingest(
            engine,
            client,
            [
                job_event("old", "task-sent", JobState.QUEUED, now - 3600, name="t.a"),
                job_event("fresh", "task-sent", JobState.QUEUED, now - 1, name="t.a"),
            ],
        )
        listed = (await client.get("/api/jobs", params={"stuck": "true"})).json()["jobs"]
        assert [job["id"] for job in listed] == ["old"]
        assert len((await client.get("/api/jobs", params={"stuck": "false"})).json()["jobs"]) == 2
        bad = await client.get("/api/jobs", params={"stuck": "maybe"})
        assert bad.status_code == 400 and "stuck" in bad.json()["error"]["message"]
        page = (await client.get("/jobs", params={"stuck": "true"})).text
        assert "/jobs/old" in page and "/jobs/fresh" not in page


# -- metrics -------------------------------------------------------------------------


async def test_metrics_count_jobs_by_name_and_state_with_runtime_histograms(
    tmp_path: Path,
) -> None:
    now = 1_750_000_000.0
    events = []
    for i, runtime in enumerate((0.2, 0.3, 4.0)):
        events += [
            job_event(f"j{i}", "task-sent", JobState.QUEUED, now, name="t.add", queue="q1"),
            job_event(f"j{i}", "task-succeeded", JobState.COMPLETED, now + 5, runtime=runtime),
        ]
    events.append(job_event("f", "task-sent", JobState.QUEUED, now, name="t.add", queue="q1"))
    events.append(job_event("f", "task-failed", JobState.FAILED, now + 1, exception="KeyError()"))
    async with serving(tmp_path) as (engine, client):
        await ingest(engine, client, events)
        await ingest(engine, client, events)  # the same events again count once
        text = (await client.get("/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    labels = (("name", "t.add"), ("queue", "q1"))
    assert samples[("sluice_job_events_total", (*labels, ("state", "completed")))] == 3
    assert samples[("sluice_job_events_total", (*labels, ("state", "failed")))] == 1
    assert samples[("sluice_job_events_total", (*labels, ("state", "queued")))] == 4
    assert samples[("sluice_job_runtime_seconds_count", labels)] == 3
    assert samples[("sluice_job_runtime_seconds_bucket", (("le", "0.5"), *labels))] == 2
    assert samples[("sluice_jobs_stuck", ())] == 0


async def test_worker_queues_are_kept_across_heartbeats_even_when_learnt_first(
    storage: Storage,
) -> None:
    await storage.set_worker_queues([WorkerQueues("celery@a", "celery", ["q1", "q2"], 8)])
    heartbeat = WorkerEvent("celery@a", "celery", "heartbeat", time.time(), freq=2.0)
    await storage.ingest([], [heartbeat])
    [worker] = await storage.list_workers()
    assert (worker.status, worker.queues, worker.concurrency) == ("online", ["q1", "q2"], 8)
    assert worker.freq == 2.0

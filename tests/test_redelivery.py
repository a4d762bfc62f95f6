"""Redelivery is not loss, and what Sluice cannot see it says so (issue 17, items 5 and 6).

Real Celery workers on Redis and on RabbitMQ, watched by a whole Sluice (sources,
pipeline, probes, the worker monitor): a worker SIGKILLed while it runs jobs and
holds others prefetched or waiting for their ETA, then a second worker on the same
queue; and a worker started without task events that takes jobs announced by
task-sent events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from sluice_celery.framework import TASK_EVENTS_ADVICE
from sluice_core.config import Config
from sluice_core.engine import Engine
from sluice_core.model import Job, JobState
from sluice_core.monitors import workers_task_events
from sluice_core.plugins import PluginManager
from sluice_core.storage import JobQuery
from tests.celery_app import ENV_TASK_EVENTS, ENV_VISIBILITY_TIMEOUT, make_app
from tests.fixtures.celery_worker import BROKERS, CeleryWorker
from tests.waiting import wait_until

TIMEOUT = 180  # absolute bound per test: two worker starts and a visibility timeout
VISIBILITY_TIMEOUT = 10.0  # seconds, on Redis: kombu's default is an hour
HELD = frozenset({JobState.ACTIVE, JobState.RECEIVED, JobState.SCHEDULED})


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    with BROKERS[request.param]() as url:
        yield url


@asynccontextmanager
async def sluice(
    tmp_path: Path, broker_url: str, keyprefix: str
) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    """A whole Sluice on the broker, listening, and a client of its web server."""
    pm = PluginManager()
    pm.load(["celery", "rabbitmq"])
    config = Config(
        broker=[broker_url],
        db=f"sqlite:///{tmp_path}/sluice.db",
        redis_keyprefix=keyprefix,
        visibility_timeout=VISIBILITY_TIMEOUT,
        redis_probe_interval=1.0,
        rabbitmq_probe_interval=1.0,
        port=0,
    )
    pm.configure(config)
    engine = Engine(config, pm)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await wait_until(lambda: engine.listening_since() is not None, "the source to connect")
        base = engine.web_addresses[0].replace("0.0.0.0", "127.0.0.1")
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            yield engine, client
        engine.stop()


def worker(broker_url: str, keyprefix: str, tmp_path: Path, name: str, **env: str) -> CeleryWorker:
    return CeleryWorker(broker_url, keyprefix, tmp_path / f"{name}.log", env=env)


async def send(producer: CeleryWorker, name: str, *args: Any, **options: Any) -> str:
    result = await trio.to_thread.run_sync(
        lambda: producer.app.send_task(name, args, queue=producer.queue, **options)
    )
    return str(result.id)


async def states(engine: Engine, ids: list[str]) -> dict[str, Job]:
    jobs = {job_id: await engine.storage.get_job(job_id) for job_id in ids}
    return {job_id: job for job_id, job in jobs.items() if job is not None}


async def until_states(engine: Engine, expected: dict[str, JobState], what: str) -> dict[str, Job]:
    async def reached() -> dict[str, Job] | None:
        jobs = await states(engine, list(expected))
        ok = len(jobs) == len(expected) and all(
            jobs[job_id].state is state for job_id, state in expected.items()
        )
        return jobs if ok else None

    return await wait_until(reached, what, timeout=90)


async def test_a_killed_workers_started_jobs_are_lost_and_its_held_ones_run_elsewhere(
    broker_url: str, keyprefix: str, tmp_path: Path
) -> None:
    on_redis = broker_url.startswith("redis")
    first = worker(broker_url, keyprefix, tmp_path, "first",
                   **{ENV_VISIBILITY_TIMEOUT: str(VISIBILITY_TIMEOUT)})
    second = worker(broker_url, keyprefix, tmp_path, "second",
                    **{ENV_VISIBILITY_TIMEOUT: str(VISIBILITY_TIMEOUT)})
    second.queue = first.queue
    try:
        with trio.fail_after(TIMEOUT):
            async with sluice(tmp_path, broker_url, keyprefix) as (engine, client):
                await trio.to_thread.run_sync(first.start)
                # Both pool processes busy: one job that acknowledges on receipt (Celery's
                # default), one that acknowledges late; then three prefetched, one ETA.
                running = await send(first, "tests.sleep", 120)
                running_late = await send(first, "tests.sleep_late", 8)
                await until_states(engine, {running: JobState.ACTIVE,
                                            running_late: JobState.ACTIVE}, "both to run")
                prefetched = [await send(first, "tests.add", n, n) for n in range(3)]
                eta = await send(first, "tests.add", 7, 7, countdown=25)
                await until_states(
                    engine,
                    {**dict.fromkeys(prefetched, JobState.RECEIVED), eta: JobState.SCHEDULED},
                    "the rest to be held by the first worker",
                )

                first.kill()
                held = [*prefetched, eta]
                jobs = await until_states(
                    engine,
                    {running: JobState.LOST, running_late: JobState.LOST,
                     **dict.fromkeys(held, JobState.REDELIVERING)},
                    "the monitor's conclusions",
                )
                # Nothing shows as running on the dead worker any more.
                [gone] = [w for w in await engine.storage.list_workers()
                          if w.hostname == first.hostname]
                assert gone.status == "offline" and gone.active == 0
                page = await engine.storage.list_jobs(
                    JobQuery(worker=first.hostname, states=HELD)
                )
                assert page.jobs == []
                comes_back = (
                    f"visibility timeout ({VISIBILITY_TIMEOUT:g}s) has passed" if on_redis
                    else "RabbitMQ gives it back at once"
                )
                for job_id in held:
                    why = jobs[job_id].exception or ""
                    assert "It had not started" in why and comes_back in why, why
                assert "unless its task acknowledges late" in (jobs[running].exception or "")
                # The API filters by the new state; the job page says why, as no failure.
                listed = (await client.get("/api/jobs", params={"state": "redelivering"})).json()
                assert sorted(j["id"] for j in listed["jobs"]) == sorted(held)
                page = (await client.get(f"/jobs/{prefetched[0]}")).text
                assert "Why redelivering" in page and 'class="card explained"' in page
                assert "It had not started" in page

                # Another worker consumes the queue: what the broker gives back runs there,
                # the late-acknowledged job again; the other started one stays lost.
                await trio.to_thread.run_sync(second.start)
                jobs = await until_states(
                    engine,
                    {running_late: JobState.COMPLETED,
                     **dict.fromkeys(held, JobState.COMPLETED)},
                    "the jobs given back to complete on the second worker",
                )
                assert {jobs[j].worker for j in [running_late, *held]} == {second.hostname}
                assert all(jobs[j].retries == 0 and jobs[j].exception is None
                           for j in [running_late, *held])
                lost = await engine.storage.get_job(running)
                assert lost is not None and lost.state is JobState.LOST
                # The timeline keeps both deliveries.
                kinds = [(e.type, e.worker) for e in await engine.storage.job_events(prefetched[0])]
                assert ("task-received", first.hostname) in kinds
                assert ("sluice-redelivery", first.hostname) in kinds
                assert ("task-received", second.hostname) in kinds
    finally:
        first.close()
        second.close()


async def test_jobs_of_a_worker_without_task_events_are_flagged_not_left_queued(
    broker_url: str, keyprefix: str, tmp_path: Path
) -> None:
    blind = worker(broker_url, keyprefix, tmp_path, "blind", **{ENV_TASK_EVENTS: "0"})
    blind.task_events = False  # no -E
    # The application announces what it publishes (task_send_sent_event), as the README asks.
    blind.app = make_app(broker_url, keyprefix=keyprefix, queue=blind.queue, events=True)
    try:
        with trio.fail_after(TIMEOUT):
            async with sluice(tmp_path, broker_url, keyprefix) as (engine, _):
                await trio.to_thread.run_sync(blind.start)
                ids = [await send(blind, "tests.add", n, 1) for n in range(10)]
                jobs = await until_states(
                    engine, dict.fromkeys(ids, JobState.UNKNOWN), "the jobs to leave queued"
                )
                why = jobs[ids[0]].exception or ""
                assert f"its consumers ({blind.hostname}) send no task events" in why
                assert TASK_EVENTS_ADVICE in why
                assert all(job.worker is None for job in jobs.values())
                flags = {w.hostname: flag for w, flag in await workers_task_events(engine.storage)}
                assert flags[blind.hostname] is False
    finally:
        blind.close()

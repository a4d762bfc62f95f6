"""No event can stop Sluice: values from outside are checked at the door, a batch storage
refuses is split and its culprits dead-lettered, a stored value never breaks a page, and
stopping never hangs. Real Redis, real databases, the real engine.
"""

from __future__ import annotations

import functools
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

import sluice_celery.plugin as celery_plugin
from sluice_core.config import Config
from sluice_core.engine import Engine
from sluice_core.model import JobEvent, JobState, WorkerEvent
from sluice_core.plugins import PluginManager
from tests.fixtures.services import REDIS_URL, free_port
from tests.fixtures.storage import open_storage, pg_admin
from tests.metrics import metric
from tests.test_agent import envelope
from tests.test_api import job_event, serving
from tests.test_ingest import bearer, celery_events, new_key
from tests.test_reader import engine_with_reader, healthy, sluice_run, source_up
from tests.test_redis_source import publish
from tests.test_stream import next_of, stream
from tests.waiting import wait_until

YEAR_33658 = 1e12  # epoch seconds: what a clock in milliseconds sends as seconds


def task_multi(keyprefix: str, events: list[dict[str, Any]]) -> tuple[str, bytes]:
    """Celery worker events as one ``task.multi`` message on Redis."""
    return f"{keyprefix}/0.celeryev/task.multi", envelope(events, "celery@w")


def heartbeat(keyprefix: str, **values: Any) -> tuple[str, bytes]:
    event = {
        "type": "worker-heartbeat", "hostname": "celery@w", "timestamp": time.time(),
        "freq": 2.0, "active": 0, "processed": 0, "pid": 42, **values,
    }
    return f"{keyprefix}/0.celeryev/worker.heartbeat", envelope(event, "celery@w")


def started(job_id: str, ts: float | None = None) -> dict[str, Any]:
    return {
        "type": "task-started", "uuid": job_id, "hostname": "celery@w",
        "timestamp": time.time() if ts is None else ts,
    }


def malformed(engine: Engine, reason: str) -> float:
    return metric(engine.metrics, "sluice_events_malformed_total", reason=reason)


@asynccontextmanager
async def watching_redis(db_url: str, keyprefix: str) -> AsyncIterator[Engine]:
    """An engine on ``db_url`` reading Celery events from Redis, subscribed."""
    async with engine_with_reader(db_url, keyprefix) as engine:
        await wait_until(lambda: source_up(engine), "the Redis source to subscribe")
        yield engine


# -- finding 1: a timestamp outside years 1-9999 ----------------------------------------


async def test_an_event_stamped_in_year_33658_is_refused_and_the_stream_goes_on(
    tmp_path: Path, keyprefix: str
) -> None:
    bad, good = str(uuid.uuid4()), str(uuid.uuid4())
    with trio.fail_after(30):
        async with serving(
            tmp_path, celery_plugin, broker=[REDIS_URL], redis_keyprefix=keyprefix,
            reader_process=False,
        ) as (engine, client), stream(client, engine) as events:
            await wait_until(lambda: source_up(engine), "the Redis source to subscribe")
            await publish(REDIS_URL, [task_multi(keyprefix, [started(bad, YEAR_33658)])])
            await publish(REDIS_URL, [task_multi(keyprefix, [started(good)])])
            job = orjson.loads((await next_of(events, "job"))["data"])
            assert job["id"] == good
            assert malformed(engine, "timestamp") == 1
            assert (await client.get(f"/api/jobs/{bad}")).status_code == 404


async def test_times_already_stored_out_of_range_render_as_null_on_every_page(
    tmp_path: Path,
) -> None:
    """A database written before the door checked timestamps: no page or stream breaks."""
    storage = open_storage(f"sqlite:///{tmp_path}/s.db")  # the file serving() opens
    await storage.open()
    await storage.ingest(
        [job_event("old", "task-started", JobState.ACTIVE, YEAR_33658, name="tasks.add")],
        [WorkerEvent("celery@w", "celery", "heartbeat", YEAR_33658)],
    )
    await storage.aclose()
    with trio.fail_after(30):
        async with serving(tmp_path) as (engine, client):
            for path in ["/api/jobs", "/api/jobs/old", "/jobs", "/jobs/old", "/", "/api/workers",
                         "/workers"]:
                response = await client.get(path)
                assert response.status_code == 200, (path, response.text[:500])
            job = (await client.get("/api/jobs/old")).json()
            assert job["started_at"] is None and job["events"][0]["timestamp"] is None
            assert (await client.get("/api/workers")).json()[0]["last_heartbeat"] is None
            # The next event of that job reaches an open stream.
            async with stream(client, engine) as events:
                engine.pipeline.put_events(
                    [job_event("old", "task-succeeded", JobState.COMPLETED, time.time())], []
                )
                job = orjson.loads((await next_of(events, "job"))["data"])
                assert (job["id"], job["state"], job["updated_at"]) == ("old", "completed", None)
# -- finding 2: values storage cannot hold ----------------------------------------------

# Each beyond what its column holds on one backend or the other (an SQLite INTEGER and
# PostgreSQL's bigint end at 2**63 - 1, its integer at 2**31 - 1; PostgreSQL text and
# jsonb hold no NUL).
HOSTILE_HEARTBEATS = [
    {"processed": 2**63},
    {"active": 2**31},
    {"pid": 2**63},
    {"hostname": "celery@w\x00"},
]


@pytest.mark.parametrize("values", HOSTILE_HEARTBEATS, ids=lambda v: next(iter(v)))
async def test_a_heartbeat_no_column_holds_is_corrected_at_the_door(
    db_url: str, keyprefix: str, values: dict[str, Any]
) -> None:
    job = str(uuid.uuid4())
    with trio.fail_after(30):
        async with watching_redis(db_url, keyprefix) as engine:
            await publish(
                REDIS_URL, [heartbeat(keyprefix, **values), task_multi(keyprefix, [started(job)])]
            )
            await wait_until(lambda: engine.storage.get_job(job), "the job after the heartbeat")
            workers = await engine.storage.list_workers()
            assert [w.hostname for w in workers] == ["celery@w"]
            assert metric(engine.metrics, "sluice_events_dead_lettered_total") == 0
            assert metric(engine.metrics, "sluice_events_malformed_total") == 1


async def test_task_events_no_column_holds_are_corrected_at_the_door(
    db_url: str, keyprefix: str
) -> None:
    job, after = str(uuid.uuid4()), str(uuid.uuid4())
    sent = {
        "type": "task-sent", "uuid": job, "hostname": "gen1@h\x00", "timestamp": time.time(),
        "name": "tasks.\x00add", "queue": "celery\x1b", "exchange": "ex\x00", "retries": 2**63,
        "args": "('a\x00b',)" + "x" * 200_000, "kwargs": "{}",
    }
    with trio.fail_after(30):
        async with watching_redis(db_url, keyprefix) as engine:
            await publish(
                REDIS_URL,
                [(f"{keyprefix}/0.celeryev/task.sent", envelope(sent, "gen1@h")),
                 task_multi(keyprefix, [started(after)])],
            )
            await wait_until(lambda: engine.storage.get_job(after), "the next job")
            stored = await engine.storage.get_job(job)
            assert stored is not None
            assert (stored.name, stored.queue, stored.retries) == ("tasks.add", "celery", 0)
            assert stored.extra["exchange"] == "ex"
            assert stored.args is not None and "\x00" not in stored.args
            assert len(stored.args) < 100_000 and "truncated" in stored.args
            for reason in ("control_characters", "out_of_range", "too_long"):
                assert malformed(engine, reason) == 1, reason


async def test_the_ingest_endpoint_corrects_and_refuses_like_the_broker_path(
    tmp_path: Path,
) -> None:
    job, late = str(uuid.uuid4()), str(uuid.uuid4())
    events = celery_events(job)
    events[0] = {**events[0], "name": "tests.\x00add", "retries": 2**63}
    with trio.fail_after(30):
        async with serving(tmp_path, celery_plugin) as (engine, client):
            key = bearer(await new_key(engine))
            response = await client.post(
                "/api/ingest", json={"format": "celery", "events": events}, headers=key
            )
            assert response.json() == {"accepted": 4}
            stored = await engine.storage.get_job(job)
            assert stored is not None and (stored.name, stored.retries) == ("tests.add", 0)
            # Normalized events from an agent take the same door.
            heartbeat = {
                "hostname": "w\x00@h", "framework": "celery", "type": "heartbeat",
                "timestamp": time.time(), "processed": 2**63,
            }
            response = await client.post(
                "/api/ingest", json={"format": "sluice", "worker_events": [heartbeat]},
                headers=key,
            )
            assert response.json() == {"accepted": 1}
            assert [w.hostname for w in await engine.storage.list_workers()] == ["w@h"]
            # A time Sluice cannot believe is refused, saying which and why.
            response = await client.post(
                "/api/ingest",
                json={"format": "celery", "events": [started(late, YEAR_33658)]},
                headers=key,
            )
            assert response.status_code == 400 and "timestamp" in response.text
            assert malformed(engine, "timestamp") == 1
            assert await engine.storage.get_job(late) is None


# -- a batch storage refuses is split, not retried for ever -----------------------------


def refused_by_storage(job_id: str) -> list[JobEvent]:
    """Events no door let through (another plugin's, or a value no check foresaw)."""
    return [
        job_event(job_id, "task-sent", JobState.QUEUED, time.time(), name="a\x00b"),
        job_event(job_id + "-2", "task-sent", JobState.QUEUED, time.time(), retries=2**63),
    ]


async def test_events_storage_refuses_are_dead_lettered_and_the_rest_of_the_batch_stored(
    db_url: str,
) -> None:
    config = Config(db=db_url)
    pm = PluginManager()
    pm.configure(config)
    engine = Engine(config, pm)
    good = [
        job_event(f"good-{i}", "task-sent", JobState.QUEUED, time.time(), name="tasks.add")
        for i in range(50)
    ]
    bad_worker = WorkerEvent("celery@w", "celery", "heartbeat", time.time(), processed=2**63)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(engine.run, web=False))
            engine.pipeline.put_events(
                [*good[:25], *refused_by_storage("bad"), *good[25:]], [bad_worker]
            )
            await wait_until(
                lambda: metric(engine.metrics, "sluice_events_dead_lettered_total") >= 2
                and metric(engine.metrics, "sluice_events_ingested_total") >= 50,
                "the refused events dead-lettered, the 50 others stored",
            )
            letters = await engine.storage.list_dead_letters(10)
            kinds = sorted((letter.kind, orjson.loads(letter.event).get("job_id"))
                           for letter in letters)
            # PostgreSQL refuses the NUL, SQLite does not: what each one refused.
            assert ("job", "bad-2") in kinds
            assert all(letter.reason for letter in letters)
            counts = await engine.storage.count_jobs_by_state()
            assert counts["queued"] >= 50
            # The next batch is stored at once: nothing is held.
            engine.pipeline.put_events(
                [job_event("after", "task-sent", JobState.QUEUED, time.time())], []
            )
            await wait_until(lambda: engine.storage.get_job("after"), "the next batch")
            engine.stop()


async def test_the_diagnostics_page_shows_dead_letters_and_malformed_counts(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path) as (engine, client):
            engine.pipeline.put_events(refused_by_storage("bad"), [])
            await wait_until(
                lambda: metric(engine.metrics, "sluice_events_dead_lettered_total") >= 1,
                "the refused event in the dead-letter table",
            )
            page = await client.get("/diagnostics")
            assert page.status_code == 200
            assert "bad-2" in page.text and "too large" in page.text.lower()
            assert 'href="/diagnostics"' in (await client.get("/")).text


# -- stopping is bounded ----------------------------------------------------------------


async def test_sigterm_with_the_database_away_stops_in_bounded_time_saying_what_it_lost(
    pg_url: str, keyprefix: str, tmp_path: Path
) -> None:
    name = pg_url.rsplit("/", 1)[1]
    port = free_port()
    env = {
        **os.environ, "SLUICE_DATABASE_URL": pg_url, "SLUICE_PORT": str(port),
        "SLUICE_STOP_TIMEOUT": "2",
    }
    log = tmp_path / "stderr.log"
    proc = await sluice_run(log, env, keyprefix)
    try:
        with trio.fail_after(90):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                await wait_until(lambda: healthy(client), "/healthz to answer 200")
            pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            pg_admin(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            )
            jobs = [str(uuid.uuid4()) for _ in range(20)]
            await publish(REDIS_URL, [task_multi(keyprefix, [started(j) for j in jobs])])
            await wait_until(lambda: "storage write of" in log.read_text(), "a failed write")
            signalled = trio.current_time()
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
            took = trio.current_time() - signalled
    finally:
        if proc.returncode is None:
            proc.kill()
        pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    err = log.read_text()
    assert proc.returncode == 0, err
    assert "could not store 20 events" in err, err
    # The stop timeout (2 s), then the write in progress (a connection attempt of at most
    # 10 s), then closing the pool.
    print(f"SIGTERM to exit, the database away: {took:.1f} s")
    assert took < 20, err

"""The SDK (sdk/, import name ``sluice``) in a real Celery application.

The worker runs WITHOUT -E and the app sends no Celery events at all
(tests/celery_app.py with SLUICE_TEST_SDK=1): everything the central Sluice
shows comes from the SDK's signal receivers, in the producer (this test
process) and in the worker and its prefork children, over POST /api/ingest.
The Sluice server has no broker configured.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sluice
import trio

import sluice_celery.plugin as celery_plugin
from sluice_core.actions import PUSHED_BY
from sluice_core.engine import Engine
from sluice_core.model import Job, JobState
from tests.celery_app import ENV_SDK, ENV_SDK_REDACT_KEYS, SDK_REDACT_KEYS
from tests.fixtures.celery_worker import CeleryWorker
from tests.fixtures.services import REDIS_URL, free_port
from tests.test_actions import sluice as sluice_server
from tests.test_agent import server
from tests.test_redact import assert_nowhere_in
from tests.waiting import wait_until


@pytest.fixture
def sdk_off() -> Iterator[None]:
    """Whatever a test configures, the SDK is stopped after it (it is process-wide)."""
    try:
        yield
    finally:
        sluice.shutdown(timeout=0)


def sdk_worker(keyprefix: str, tmp_path: Path, url: str, key: str) -> CeleryWorker:
    return CeleryWorker(
        REDIS_URL,
        keyprefix,
        tmp_path / "celery-worker.log",
        task_events=False,
        env={ENV_SDK: "1", "SLUICE_URL": url, "SLUICE_API_KEY": key},
    )


async def job_in(engine: Engine, job_id: str, *states: JobState) -> Job:
    """The job once in one of ``states`` and once the producer's task-sent is in too: the
    producer and the worker each run an SDK, flushing on their own timers."""

    async def found() -> Job | None:
        job = await engine.storage.get_job(job_id)
        return job if job is not None and job.state in states and job.sent_at is not None else None

    wanted = " or ".join(str(state) for state in states)
    return await wait_until(found, f"job {job_id} {wanted}, with its task-sent", poll=0.1)


async def test_jobs_show_with_full_arguments_without_worker_flags(
    tmp_path: Path, keyprefix: str, sdk_off: None
) -> None:
    db, port = tmp_path / "s.db", free_port()
    url = f"http://127.0.0.1:{port}"
    with trio.fail_after(90):
        async with server(db, port, celery_plugin) as engine:
            _, key = await engine.storage.create_api_key("billing-app")
            # The two added lines of a Celery application (here: the producer's process).
            assert sluice.init(url=url, api_key=key, redact_keys=SDK_REDACT_KEYS)
            worker = sdk_worker(keyprefix, tmp_path, url, key)
            try:
                await trio.to_thread.run_sync(worker.start)
                add = await worker.send("tests.add", 2, 3)
                echo = await worker.send("tests.echo", "a", user="bob", password="hunter2")
                fail = await worker.send("tests.fail", "missing")

                done = await job_in(engine, add, JobState.COMPLETED)
                assert (done.name, done.args, done.kwargs, done.result) == (
                    "tests.add",
                    "(2, 3)",
                    "{}",
                    "5",
                )
                assert done.worker == worker.hostname and done.queue == worker.queue
                assert done.sent_at is not None and done.started_at is not None
                assert done.runtime is not None and done.runtime < 5
                message = done.extra["message"]
                assert message["args"] == [2, 3] and message["kwargs"] == {}
                assert message["redacted"] is False
                assert message["options"]["queue"] == worker.queue

                echoed = await job_in(engine, echo, JobState.COMPLETED)
                assert "'bob'" in echoed.kwargs and "[redacted]" in echoed.kwargs
                assert echoed.extra["message"]["redacted"] is True
                assert echoed.extra["message"]["kwargs"]["password"] == "[redacted]"

                failed = await job_in(engine, fail, JobState.FAILED)
                assert "KeyError" in failed.exception and "KeyError" in failed.traceback

                await wait_until(lambda: sluice.stats()["buffered"] == 0)
                workers = {w.hostname: w for w in await engine.storage.list_workers()}
                assert workers[worker.hostname].status == "online"
                assert workers[worker.hostname].sw_ver  # a heartbeat or worker-online, via the SDK
            finally:
                await trio.to_thread.run_sync(worker.close)
    # The secret never left the processes: not in any stored row.
    with sqlite3.connect(db) as conn:
        for table in ("jobs", "job_events"):
            rows = conn.execute(f"SELECT * FROM {table}").fetchall()
            assert rows and not [row for row in rows if "hunter2" in repr(row)]
    assert sluice.stats()["dropped"] == 0


async def test_the_app_is_unaffected_while_sluice_is_down_and_the_sdk_catches_up(
    tmp_path: Path, keyprefix: str, sdk_off: None
) -> None:
    db, port = tmp_path / "s.db", free_port()
    url = f"http://127.0.0.1:{port}"
    with trio.fail_after(120):
        async with server(db, port, celery_plugin) as engine:
            _, key = await engine.storage.create_api_key("billing-app")
        assert sluice.init(url=url, api_key=key, flush_interval=0.2)
        worker = sdk_worker(keyprefix, tmp_path, url, key)
        try:
            await trio.to_thread.run_sync(worker.start)
            # Sluice is down: publishing and running tasks go on as if it did not exist.
            started = time.monotonic()
            ids = [await worker.send("tests.add", i, i) for i in range(5)]
            assert time.monotonic() - started < 2.0
            await wait_until(
                lambda: all(
                    f"[{job_id}] succeeded" in worker.log_path.read_text() for job_id in ids
                ),
                poll=0.2,
            )
            # The SDK tried, failed, and holds the task-sent events (on a busy machine
            # the tasks can finish before its first attempt: wait for it).
            await wait_until(lambda: sluice.stats()["failed_requests"] >= 1)
            await wait_until(lambda: sluice.stats()["buffered"] == 5)

            async with server(db, port, celery_plugin) as engine:
                for i, job_id in enumerate(ids):
                    job = await job_in(engine, job_id, JobState.COMPLETED)
                    assert job.result == str(2 * i) and job.sent_at is not None
                    assert job.runtime is not None and job.runtime < 1.0  # never blocked
                await wait_until(lambda: sluice.stats()["buffered"] == 0)
        finally:
            await trio.to_thread.run_sync(worker.close)
    assert sluice.stats()["dropped"] == 0


@pytest.mark.parametrize("which", ["wrong", "revoked"])
async def test_a_wrong_or_revoked_key_stores_nothing(
    tmp_path: Path, keyprefix: str, sdk_off: None, which: str
) -> None:
    db, port = tmp_path / "s.db", free_port()
    producer = CeleryWorker(REDIS_URL, keyprefix, tmp_path / "unused.log", task_events=False)
    with trio.fail_after(30):
        async with server(db, port, celery_plugin) as engine:
            _, key = await engine.storage.create_api_key("billing-app")
            if which == "revoked":
                await engine.storage.revoke_api_key("billing-app")
            else:
                key = "sluice_" + "x" * 43
            sluice.init(url=f"http://127.0.0.1:{port}", api_key=key, flush_interval=0.1)
            try:
                await producer.send("tests.add", 1, 1)
                await wait_until(lambda: sluice.stats()["failed_requests"] >= 1)
            finally:
                await trio.to_thread.run_sync(producer.close)
            assert sluice.stats()["sent"] == 0 and sluice.stats()["buffered"] == 1
            assert await engine.storage.count_jobs_by_state() == {}


async def test_with_sluice_unreachable_the_buffer_is_bounded_and_drops_are_counted(
    tmp_path: Path, keyprefix: str, sdk_off: None
) -> None:
    closed = free_port()  # nothing listens there
    producer = CeleryWorker(REDIS_URL, keyprefix, tmp_path / "unused.log", task_events=False)
    sluice.init(url=f"http://127.0.0.1:{closed}", api_key="sluice_k", max_buffer=5)
    try:
        with trio.fail_after(30):
            started = time.monotonic()
            for i in range(20):
                await producer.send("tests.add", i, i)
            assert time.monotonic() - started < 5.0
    finally:
        await trio.to_thread.run_sync(producer.close)
    stats = sluice.stats()
    assert (stats["buffered"], stats["dropped"], stats["sent"]) == (5, 15, 0)
    assert stats["errors"] == 0


async def test_the_sdk_beside_task_events_tells_one_story_and_keeps_no_secret(
    tmp_path: Path, keyprefix: str, sdk_off: None
) -> None:
    """The SDK in the producer and in a worker started with -E: every happening reaches
    Sluice twice (the broker's event, the SDK's), with other stamps, clocks and ids.
    Neither SDK redacts anything: the server's default rules hide the password."""
    secret, blob = "p4ss-SECRET", "x" * 3000  # the broker's kwargsrepr stops at 1,024
    with trio.fail_after(120):
        async with sluice_server(tmp_path, REDIS_URL, keyprefix) as (engine, client):
            _, key = await engine.storage.create_api_key("billing-app")
            url = str(client.base_url)
            assert sluice.init(url=url, api_key=key, flush_interval=0.2)
            worker = CeleryWorker(
                REDIS_URL,
                keyprefix,
                tmp_path / "celery-worker.log",
                task_events=True,  # -E, and the producer's task_send_sent_event
                env={
                    ENV_SDK: "1", ENV_SDK_REDACT_KEYS: "", "SLUICE_URL": url,
                    "SLUICE_API_KEY": key,
                },
            )
            try:
                await trio.to_thread.run_sync(worker.start)
                echo = await worker.send("tests.echo", "bob", password=secret, blob=blob)
                flaky = await worker.send("tests.flaky", 2)

                attempt = ["task-sent", "task-received", "task-started"]
                # job: (its timeline, how many happenings the broker reported of it: the
                # retry's task-sent comes from the SDK alone, the worker's app sends none).
                expected = {
                    echo: ([*attempt, "task-succeeded"], 4),
                    flaky: ([*attempt, "task-retried", *attempt, "task-succeeded"], 7),
                }
                for job_id, (types, by_broker) in expected.items():
                    await wait_until(
                        functools.partial(_reported, engine, job_id, len(types), by_broker),
                        f"job {job_id}'s events from the broker and from the SDK",
                        poll=0.2,
                    )
                    shown = (await client.get(f"/api/jobs/{job_id}")).json()
                    assert sorted(e["type"] for e in shown["events"]) == sorted(types)
                    assert shown["state"] == "completed"

                row = await engine.storage.get_job(flaky)
                assert row is not None and row.retries == 1  # one retry, reported twice

                row = await engine.storage.get_job(echo)
                assert row is not None and row.kwargs is not None
                # The SDK's full arguments, the password redacted by the server.
                assert row.args == "('bob',)"
                assert row.kwargs == repr({"password": "[redacted]", "blob": blob})
                assert row.extra["args_complete"] is True
                assert row.extra["message"]["redacted"] is True  # no retry with placeholders
                shown = (await client.get(f"/api/jobs/{echo}")).json()
                assert secret not in str(shown)
                assert (await client.get("/api/jobs", params={"q": secret})).json()["jobs"] == []
            finally:
                await trio.to_thread.run_sync(worker.close)
    assert_nowhere_in(tmp_path, secret.encode())


async def _reported(engine: Engine, job_id: str, by_sdk: int, by_broker: int) -> bool:
    """Whether both sources' events of the job are all stored."""
    events = await engine.storage.job_events(job_id)
    pushed = sum(PUSHED_BY in event.extra for event in events)
    return (pushed, len(events) - pushed) == (by_sdk, by_broker)

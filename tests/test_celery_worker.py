"""A real Celery worker on Redis and on RabbitMQ, watched through Sluice's event source
for its broker and the normalizer.

Each test runs tasks on its own worker and queue (and on RabbitMQ, vhost) and
checks the normalized events Sluice makes of what the worker really sent: the
same on both brokers, though RabbitMQ carries a worker's task events as
``task.multi`` lists of raw JSON and Redis as single kombu envelopes.
"""

from __future__ import annotations

import pytest
import trio

from sluice_core.config import Config
from sluice_core.merge import rebuild
from sluice_core.model import Job, JobEvent, JobState
from sluice_core.plugins import PluginManager
from tests.fixtures.celery_worker import CeleryWorker, CollectingSink

TIMEOUT = 60  # absolute bound per test: a worker start on a busy machine takes seconds

pytestmark = pytest.mark.parametrize("celery_worker", ["redis", "rabbitmq"], indirect=True)


async def watch(worker: CeleryWorker, nursery: trio.Nursery) -> CollectingSink:
    """Run the source Sluice's plugins choose for the worker's broker URL."""
    pm = PluginManager()
    pm.load(["celery", "rabbitmq"])
    config = Config(broker=[worker.broker_url], redis_keyprefix=worker.keyprefix)
    [source] = pm.sources(config)
    sink = CollectingSink()
    await nursery.start(source.run, sink)
    return sink


def events_of(sink: CollectingSink, job_id: str) -> list[JobEvent]:
    return sorted(
        (e for e in sink.job_events if e.job_id == job_id), key=lambda e: (e.timestamp, e.id)
    )


def has_state(sink: CollectingSink, job_id: str, state: JobState) -> bool:
    return any(e.state is state for e in events_of(sink, job_id))


def job_row(sink: CollectingSink, job_id: str) -> Job:
    return rebuild(job_id, "celery", events_of(sink, job_id))


async def test_add_is_queued_received_active_then_completed(
    celery_worker: CeleryWorker, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TIMEOUT):
        sink = await watch(celery_worker, nursery)
        job_id = await celery_worker.send("tests.add", 2, 3)
        await sink.wait_for(lambda: has_state(sink, job_id, JobState.COMPLETED))

    events = events_of(sink, job_id)
    by_state = {e.state: e for e in events}
    assert sorted(by_state) == sorted(
        [JobState.QUEUED, JobState.RECEIVED, JobState.ACTIVE, JobState.COMPLETED]
    )
    assert len(events) == 4
    assert len({e.id for e in events}) == 4
    assert all(e.framework == "celery" for e in events)
    assert sink.malformed == 0
    # The worker's own events are causally ordered; task-sent may be stamped after
    # task-received (the producer publishes first, then announces it).
    worker_side = [e.state for e in events if e.state is not JobState.QUEUED]
    assert worker_side == [JobState.RECEIVED, JobState.ACTIVE, JobState.COMPLETED]

    queued = by_state[JobState.QUEUED]
    assert queued.worker is None  # sent by this test process, a gen<pid>@host producer
    assert queued.fields["name"] == "tests.add"
    assert queued.fields["args"] == "(2, 3)"
    assert queued.fields["queue"] == celery_worker.queue
    assert queued.extra["routing_key"] == celery_worker.queue
    received = by_state[JobState.RECEIVED]
    assert received.worker == celery_worker.hostname
    assert received.fields["args"] == "(2, 3)"
    completed = by_state[JobState.COMPLETED]
    assert completed.fields["result"] == "5"
    assert completed.fields["runtime"] >= 0

    job = job_row(sink, job_id)
    assert (job.state, job.name, job.args, job.result, job.queue, job.worker) == (
        JobState.COMPLETED, "tests.add", "(2, 3)", "5", celery_worker.queue, celery_worker.hostname
    )
    assert job.sent_at and job.received_at and job.started_at and job.finished_at


async def test_failing_task_is_failed_with_its_traceback(
    celery_worker: CeleryWorker, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TIMEOUT):
        sink = await watch(celery_worker, nursery)
        job_id = await celery_worker.send("tests.fail", "missing")
        await sink.wait_for(lambda: has_state(sink, job_id, JobState.FAILED))

    failed = next(e for e in events_of(sink, job_id) if e.state is JobState.FAILED)
    assert failed.fields["exception"] == "KeyError('missing')"
    assert "KeyError: 'missing'" in failed.fields["traceback"]
    assert job_row(sink, job_id).state is JobState.FAILED


async def test_retried_task_keeps_its_id_counts_retries_and_completes(
    celery_worker: CeleryWorker, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TIMEOUT):
        sink = await watch(celery_worker, nursery)
        # Fails twice, succeeds on the third attempt; each retry waits 1 s on the worker.
        job_id = await celery_worker.send("tests.flaky", 3, countdown=1.0)
        await sink.wait_for(lambda: has_state(sink, job_id, JobState.COMPLETED))

    events = events_of(sink, job_id)
    retried = [e for e in events if e.state is JobState.RETRYING]
    assert len(retried) == 2
    assert all("RuntimeError" in e.fields["exception"] for e in retried)
    # Each retry is a new message with the same id, sent by the pool child, held by
    # the worker until its countdown passes: scheduled, not received.
    assert sorted(e.fields["retries"] for e in events if e.state is JobState.QUEUED) == [0, 1, 2]
    held = [e for e in events if e.state is JobState.SCHEDULED]
    assert sorted(e.fields["retries"] for e in held) == [1, 2]
    assert all(e.fields["eta"] for e in held)
    completed = next(e for e in events if e.state is JobState.COMPLETED)
    assert completed.fields["result"] == "3"

    # The worker stamps each retry's task-received before the task-retried that
    # ends the previous attempt; the row must still come out right.
    row = job_row(sink, job_id)
    assert (row.state, row.retries, row.result) == (JobState.COMPLETED, 2, "3")


async def test_killed_pool_child_makes_the_job_lost(
    celery_worker: CeleryWorker, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TIMEOUT):
        sink = await watch(celery_worker, nursery)
        job_id = await celery_worker.send("tests.kill_child")
        await sink.wait_for(lambda: has_state(sink, job_id, JobState.LOST))

    events = events_of(sink, job_id)
    assert not any(e.state is JobState.FAILED for e in events)
    lost = next(e for e in events if e.state is JobState.LOST)
    assert "WorkerLostError" in lost.fields["traceback"]
    assert job_row(sink, job_id).state is JobState.LOST


async def test_worker_online_heartbeat_and_offline_on_clean_stop(
    celery_worker: CeleryWorker, nursery: trio.Nursery
) -> None:
    hostname = celery_worker.hostname

    def seen(kind: str) -> list[float]:
        return [
            e.timestamp for e in sink.worker_events if e.hostname == hostname and e.type == kind
        ]

    with trio.fail_after(TIMEOUT):
        sink = await watch(celery_worker, nursery)
        # The fixture's worker came up before we subscribed: a clean stop sends
        # worker-offline, and starting it again shows it come online.
        await trio.to_thread.run_sync(celery_worker.stop)
        await sink.wait_for(lambda: bool(seen("offline")))
        await trio.to_thread.run_sync(celery_worker.start)
        await sink.wait_for(
            lambda: bool(seen("online")) and max(seen("heartbeat"), default=0) > seen("online")[0]
        )

    assert seen("offline")[0] < seen("online")[0]
    first = next(e for e in sink.worker_events if e.hostname == hostname and e.type == "online")
    assert first.framework == "celery"
    assert first.freq == 2.0
    assert isinstance(first.pid, int) and isinstance(first.processed, int)
    assert first.sw_ver == "5.7.0"
    assert first.extra["sw_ident"] == "py-celery"
    assert len(first.loadavg or []) == 3

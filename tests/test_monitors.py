"""The worker monitor: offline after missed heartbeats, held jobs lost, clean stops.

Time is trio's MockClock (autojump): the monitor's clock is driven from it, so
"six seconds of silence" takes no real time. Storage is a real SQLite file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing

from sluice_celery.framework import TASK_EVENTS_ADVICE, celery
from sluice_core import monitors
from sluice_core.frameworks import Frameworks
from sluice_core.model import JobEvent, JobState, QueueSample, WorkerEvent, event_id
from sluice_core.monitors import WorkerMonitor, workers_task_events
from sluice_core.probes import WorkerQueues
from sluice_core.storage import JobQuery, Storage
from tests.fixtures.celery_worker import CollectingSink
from tests.fixtures.storage import open_storage

EPOCH = 1_750_000_000.0  # the wall-clock time the tests start at
CELERY = Frameworks([celery()])  # the workers here are Celery's
FREQ = 2.0
MISSED = 3.0
WORKER = "celery@box"


def epoch_clock(autojump_clock: trio.testing.MockClock) -> Callable[[], float]:
    """Epoch seconds that follow trio's mock clock. (Tests take ``autojump_clock``
    themselves: pytest-trio only runs a test on a clock it requests directly.)"""
    start = autojump_clock.current_time()
    return lambda: EPOCH + autojump_clock.current_time() - start


@pytest.fixture
def storage_in_trio_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's calls run in trio's own thread. In a worker thread, a call that is slow (on
    a busy machine) leaves every task waiting, and autojump moves the mock clock on to the
    next deadline in the middle of a monitor round; inline, time stands still meanwhile."""

    async def inline(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)


@pytest.fixture
async def sqlite(sqlite_url: str, storage_in_trio_thread: None) -> AsyncIterator[Storage]:
    backend = open_storage(sqlite_url)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.aclose()


def heartbeat(ts: float, kind: str = "heartbeat", hostname: str = WORKER) -> WorkerEvent:
    return WorkerEvent(hostname, "celery", kind, ts, freq=FREQ, active=1, processed=3)


def job(
    job_id: str,
    state: JobState,
    ts: float,
    *,
    worker: str | None = WORKER,
    broker: str | None = None,
    queue: str | None = None,
) -> JobEvent:
    return JobEvent(
        id=event_id(job_id, state, ts),
        job_id=job_id,
        framework="celery",
        type=f"task-{state}",
        state=state,
        timestamp=ts,
        worker=worker,
        fields={"name": "tasks.work", **({"queue": queue} if queue else {})},
        extra={"broker": broker} if broker else {},
    )


async def run_monitor(
    storage: Storage, sink: CollectingSink, clock: Callable[[], float], nursery: trio.Nursery
) -> WorkerMonitor:
    monitor = WorkerMonitor(
        storage, sink, missed=MISSED, interval=1.0, clock=clock, frameworks=CELERY
    )
    nursery.start_soon(monitor.run)
    return monitor


async def test_silent_worker_goes_offline_its_started_jobs_are_lost_and_the_rest_come_back(
    sqlite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    clock = epoch_clock(autojump_clock)
    await sqlite.ingest(
        [
            job("running", JobState.RECEIVED, EPOCH - 1),
            job("running", JobState.ACTIVE, EPOCH - 0.5),
            job("waiting", JobState.RECEIVED, EPOCH - 0.2),
            job("done", JobState.RECEIVED, EPOCH - 1),
            job("done", JobState.COMPLETED, EPOCH - 0.1),
            job("elsewhere", JobState.ACTIVE, EPOCH - 0.5, worker="celery@other"),
        ],
        [heartbeat(EPOCH), heartbeat(EPOCH, hostname="celery@other")],
    )
    sink = CollectingSink()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await run_monitor(sqlite, sink, clock, nursery)
            await trio.sleep(FREQ * MISSED - 0.5)
            assert sink.worker_events == []  # two heartbeats missed is not yet offline
            await sink.wait_for(lambda: bool(sink.worker_events))
            concluded_at = clock()
            nursery.cancel_scope.cancel()
    deadline = EPOCH + FREQ * MISSED
    # Within one monitor round of the deadline.
    assert deadline <= concluded_at <= deadline + 1.0 + 0.1
    offline = {e.hostname: e for e in sink.worker_events}
    assert offline[WORKER].type == "offline" and offline[WORKER].timestamp == deadline
    assert "no heartbeat" in offline[WORKER].extra["reason"]
    concluded = {e.job_id: e for e in sink.job_events if e.worker == WORKER}
    assert set(concluded) == {"running", "waiting"}  # the completed job is not lost
    assert concluded["running"].state is JobState.LOST  # it had started
    assert concluded["waiting"].state is JobState.REDELIVERING  # it had not
    assert "died or lost its broker" in concluded["running"].fields["exception"]
    assert "acks_late" in concluded["running"].fields["exception"]


async def test_lost_and_offline_are_stored_and_a_silence_is_concluded_once(
    sqlite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    clock = epoch_clock(autojump_clock)
    await sqlite.ingest(
        [job("running", JobState.ACTIVE, EPOCH - 0.5)], [heartbeat(EPOCH)]
    )
    sink = CollectingSink()
    monitor = WorkerMonitor(sqlite, sink, missed=MISSED, clock=clock, frameworks=CELERY)
    await trio.sleep(FREQ * MISSED)
    assert await monitor.check(clock()) == 1
    await sqlite.ingest(sink.job_events, sink.worker_events)
    [worker] = await sqlite.list_workers()
    stored = await sqlite.get_job("running")
    assert worker.status == "offline"
    assert stored is not None and stored.state is JobState.LOST
    assert stored.exception is not None and stored.exception.startswith("WorkerLost:")
    # Later rounds conclude nothing more: no events, and the worker stays offline.
    seen = len(sink.job_events) + len(sink.worker_events)
    for _ in range(3):
        await trio.sleep(FREQ * MISSED)
        assert await monitor.check(clock()) == 0
    assert len(sink.job_events) + len(sink.worker_events) == seen


async def test_clean_stop_keeps_finished_jobs_and_loses_held_ones_after_the_grace(
    sqlite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    clock = epoch_clock(autojump_clock)
    await sqlite.ingest(
        [
            job("done", JobState.ACTIVE, EPOCH - 3),
            job("done", JobState.COMPLETED, EPOCH - 2),
            job("prefetched", JobState.RECEIVED, EPOCH - 2),
        ],
        [heartbeat(EPOCH - 4, "online"), heartbeat(EPOCH, "offline")],
    )
    sink = CollectingSink()
    monitor = WorkerMonitor(sqlite, sink, missed=MISSED, clock=clock, frameworks=CELERY)
    # Events sent just before worker-offline may still be in flight: wait the grace.
    await trio.sleep(FREQ * MISSED - 0.5)
    await monitor.check(clock())
    assert sink.job_events == []
    await trio.sleep(0.5)
    assert await monitor.check(clock()) == 0  # already offline: no second offline event
    assert sink.worker_events == []
    [back] = sink.job_events
    assert back.job_id == "prefetched" and back.state is JobState.REDELIVERING
    assert "stopped (worker-offline)" in back.fields["exception"]


async def test_silence_while_sluice_was_not_listening_is_not_the_workers(
    sqlite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    clock = epoch_clock(autojump_clock)
    # Heard last 35 s ago, before Sluice (re)started listening at EPOCH: the heartbeats
    # sent meanwhile were missed by Sluice, not by the worker.
    await sqlite.ingest([job("running", JobState.ACTIVE, EPOCH - 36)], [heartbeat(EPOCH - 35)])
    sink = CollectingSink()
    monitor = WorkerMonitor(
        sqlite, sink, missed=MISSED, clock=clock, listening_since=lambda: EPOCH
    )
    assert await monitor.check(clock()) == 0
    await trio.sleep(FREQ * MISSED - 0.5)
    assert await monitor.check(clock()) == 0  # a fresh window from the start is not over
    assert sink.job_events == [] and sink.worker_events == []
    # Silent for a whole window while Sluice listened: now it is the worker's silence.
    await trio.sleep(0.5)
    assert await monitor.check(clock()) == 1
    [offline] = sink.worker_events
    assert offline.timestamp == EPOCH + FREQ * MISSED
    assert "for 6s while Sluice listened" in offline.extra["reason"]


async def test_nothing_is_concluded_while_a_source_is_down(
    sqlite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    clock = epoch_clock(autojump_clock)
    await sqlite.ingest([job("running", JobState.ACTIVE, EPOCH - 1)], [heartbeat(EPOCH)])
    sink = CollectingSink()
    reconnected: list[float | None] = [None]  # down
    monitor = WorkerMonitor(
        sqlite, sink, missed=MISSED, clock=clock, listening_since=lambda: reconnected[0]
    )
    await trio.sleep(FREQ * MISSED * 10)
    assert await monitor.check(clock()) == 0
    assert sink.job_events == [] and sink.worker_events == []
    reconnected[0] = clock()  # back: the worker gets a whole window from now
    await trio.sleep(FREQ * MISSED - 0.5)
    assert await monitor.check(clock()) == 0
    await trio.sleep(0.5)
    assert await monitor.check(clock()) == 1
    assert [e.job_id for e in sink.job_events] == ["running"]


async def test_heartbeat_arriving_in_time_keeps_the_worker_online(
    sqlite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    clock = epoch_clock(autojump_clock)
    await sqlite.ingest([], [heartbeat(EPOCH)])
    sink = CollectingSink()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await run_monitor(sqlite, sink, clock, nursery)
            for _ in range(10):  # 20 s of heartbeats every FREQ seconds
                await trio.sleep(FREQ)
                await sqlite.ingest([], [heartbeat(clock())])
            nursery.cancel_scope.cancel()
    assert sink.worker_events == []
    [worker] = await sqlite.list_workers()
    assert worker.status == "online"


async def test_worker_that_runs_jobs_without_task_events_is_flagged(storage: Storage) -> None:
    now = 1_750_000_000.0
    await storage.ingest(
        [job("a", JobState.ACTIVE, now, worker="celery@with-events")],
        [
            heartbeat(now, hostname="celery@with-events"),
            heartbeat(now, hostname="celery@no-events"),  # processed=3, yet no job names it
            WorkerEvent("celery@idle", "celery", "heartbeat", now, processed=0, active=0),
        ],
    )
    flags = {w.hostname: flag for w, flag in await workers_task_events(storage)}
    assert flags == {"celery@with-events": True, "celery@no-events": False, "celery@idle": None}


@pytest.mark.parametrize(
    ("broker", "expected"),
    [
        # Taken at EPOCH - 21: back 30 s later.
        ("redis://cache:6379/0", "visibility timeout (30s) has passed since the worker took it,"
                                 " at 2025-06-15T15:06:49+00:00"),
        ("amqp://guest@rabbit:5672//", "RabbitMQ gives it back at once"),
        (None, "the broker gives it back when it notices the worker is gone"),
    ],
)
async def test_a_held_job_says_when_its_broker_gives_it_back(
    sqlite: Storage, autojump_clock: trio.testing.MockClock, broker: str | None, expected: str
) -> None:
    clock = epoch_clock(autojump_clock)
    await sqlite.ingest(
        [
            job("prefetched", JobState.RECEIVED, EPOCH - 21, broker=broker),
            job("running", JobState.RECEIVED, EPOCH - 20, broker=broker),
            job("running", JobState.ACTIVE, EPOCH - 1),
        ],
        [heartbeat(EPOCH)],
    )
    sink = CollectingSink()
    monitor = WorkerMonitor(
        sqlite, sink, missed=MISSED, clock=clock, frameworks=Frameworks([celery(30)])
    )
    await trio.sleep(FREQ * MISSED)
    assert await monitor.check(clock()) == 1
    why = {e.job_id: e.fields["exception"] for e in sink.job_events}
    assert expected in why["prefetched"] and "it resumes when a worker receives it" in why["prefetched"]
    assert "unless its task acknowledges late" in why["running"]
    assert expected.partition(", at")[0] in why["running"]


async def test_a_clean_stop_on_redis_gives_the_jobs_back_at_once(
    sqlite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    clock = epoch_clock(autojump_clock)
    await sqlite.ingest(
        [job("prefetched", JobState.RECEIVED, EPOCH - 2, broker="redis://cache:6379/0")],
        [heartbeat(EPOCH - 4, "online"), heartbeat(EPOCH, "offline")],
    )
    sink = CollectingSink()
    monitor = WorkerMonitor(sqlite, sink, missed=MISSED, clock=clock, frameworks=CELERY)
    await trio.sleep(FREQ * MISSED)
    await monitor.check(clock())
    [back] = sink.job_events
    assert "Redis has it back at once" in back.fields["exception"]


async def test_an_offline_workers_jobs_stop_running_and_resume_on_the_next_worker(
    sqlite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    clock = epoch_clock(autojump_clock)
    await sqlite.ingest(
        [
            job("running", JobState.ACTIVE, EPOCH - 1),
            job("prefetched", JobState.RECEIVED, EPOCH - 1),
            job("eta", JobState.SCHEDULED, EPOCH - 1),
        ],
        [heartbeat(EPOCH)],
    )
    sink = CollectingSink()
    monitor = WorkerMonitor(sqlite, sink, missed=MISSED, clock=clock, frameworks=CELERY)
    await trio.sleep(FREQ * MISSED)
    assert await monitor.check(clock()) == 1
    await sqlite.ingest(sink.job_events, sink.worker_events)
    # Nothing of the offline worker shows as running or held any more.
    held = await sqlite.list_jobs(
        JobQuery(worker=WORKER, states=frozenset({JobState.ACTIVE, JobState.RECEIVED,
                                                  JobState.SCHEDULED}))
    )
    assert held.jobs == []
    states = {j.id: j.state for j in (await sqlite.list_jobs(JobQuery(worker=WORKER))).jobs}
    assert states == {"running": JobState.LOST, "prefetched": JobState.REDELIVERING,
                      "eta": JobState.REDELIVERING}
    # The broker gives them to another worker: they go on (the started one too, had its
    # task acknowledged late).
    later = clock() + 30
    await sqlite.ingest(
        [
            event
            for job_id in ("running", "prefetched", "eta")
            for event in (
                job(job_id, JobState.RECEIVED, later, worker="celery@next"),
                job(job_id, JobState.ACTIVE, later + 1, worker="celery@next"),
                job(job_id, JobState.COMPLETED, later + 2, worker="celery@next"),
            )
        ],
        [],
    )
    for job_id in ("running", "prefetched", "eta"):
        stored = await sqlite.get_job(job_id)
        assert stored is not None
        assert (stored.state, stored.worker) == (JobState.COMPLETED, "celery@next")


BLIND = "celery@blind"
QUEUE = "emails"


async def blind_worker_with_queued_jobs(
    storage: Storage, sent: int, *, heard: float = EPOCH, kind: str = "heartbeat"
) -> list[str]:
    """A worker without task events consuming QUEUE, last ``heard`` with a ``kind``
    event, and ``sent`` jobs announced on QUEUE a minute before EPOCH."""
    ids = [f"job-{n:02d}" for n in range(sent)]
    await storage.ingest(
        [job(i, JobState.QUEUED, EPOCH - 60 + n, worker=None, queue=QUEUE)
         for n, i in enumerate(ids)],
        [heartbeat(heard, kind, hostname=BLIND)],  # processed=3, yet no job names it
    )
    await storage.set_worker_queues([WorkerQueues(BLIND, "celery", [QUEUE], 2)])
    return ids


def depth(value: int | None, at: float) -> QueueSample:
    return QueueSample(QUEUE, "celery", "redis://cache:6379/0", at, depth=value, consumers=1)


async def test_jobs_taken_by_a_worker_without_task_events_are_unknown_not_queued(
    sqlite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    clock = epoch_clock(autojump_clock)
    ids = await blind_worker_with_queued_jobs(sqlite, 10)
    # Queued for an hour by the real clock: stuck, as the issue saw them.
    assert len((await sqlite.list_jobs(JobQuery(stuck=True))).jobs) == 10
    sink = CollectingSink()
    monitor = WorkerMonitor(
        sqlite, sink, missed=MISSED, clock=clock, frameworks=CELERY
    )
    await sqlite.record_queue_samples([depth(4, EPOCH)])
    await monitor.check(clock())
    # Four may still wait in the queue (the newest); the six before them were taken.
    unseen = {e.job_id: e for e in sink.job_events}
    assert sorted(unseen) == ids[:6]
    event = unseen[ids[0]]
    assert event.state is JobState.UNKNOWN and event.worker is None
    assert f"consumers ({BLIND}) send no task events" in event.fields["exception"]
    assert TASK_EVENTS_ADVICE in event.fields["exception"]
    await sqlite.ingest(sink.job_events, [])
    # The queue drained: every job left it.
    await trio.sleep(5)
    await sqlite.record_queue_samples([depth(0, clock())])
    await monitor.check(clock())
    await sqlite.ingest(sink.job_events, [])
    rows = [await sqlite.get_job(i) for i in ids]
    assert all(row is not None and row.state is JobState.UNKNOWN for row in rows)
    assert rows[0] is not None and rows[0].exception == event.fields["exception"]
    assert (await sqlite.list_jobs(JobQuery(stuck=True))).jobs == []
    # Concluded once per job: the second round's events for the first six are the same.
    assert len({e.id for e in sink.job_events}) == 10
    # Still a worker without task events: the conclusion does not name it as the jobs'.
    flags = {w.hostname: flag for w, flag in await workers_task_events(sqlite)}
    assert flags[BLIND] is False


@pytest.mark.parametrize("sample", [None, 3, "seeing"])
async def test_nothing_is_concluded_of_a_queue_sluice_cannot_judge(
    sqlite: Storage, autojump_clock: trio.testing.MockClock, sample: int | str | None
) -> None:
    """No depth known, the queue still holds them all, or its consumer sends events."""
    clock = epoch_clock(autojump_clock)
    await blind_worker_with_queued_jobs(sqlite, 3)
    if sample == "seeing":
        await sqlite.ingest([job("seen", JobState.ACTIVE, EPOCH, worker=BLIND)], [])
        sample = 0
    await sqlite.record_queue_samples([depth(sample, EPOCH)])
    sink = CollectingSink()
    monitor = WorkerMonitor(sqlite, sink, missed=MISSED, clock=clock, frameworks=CELERY)
    await monitor.check(clock())
    assert sink.job_events == []


async def test_a_long_backlog_is_judged_a_part_at_a_time(
    sqlite: Storage, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(monitors, "UNSEEN_SCAN", 4)
    clock = epoch_clock(autojump_clock)
    ids = await blind_worker_with_queued_jobs(sqlite, 10)
    await sqlite.record_queue_samples([depth(0, EPOCH)])
    sink = CollectingSink()
    monitor = WorkerMonitor(sqlite, sink, missed=MISSED, clock=clock, frameworks=CELERY)
    concluded = []
    for _ in range(3):
        await monitor.check(clock())
        concluded.append(sorted({e.job_id for e in sink.job_events}))
        await sqlite.ingest(sink.job_events, [])
        await trio.sleep(monitors.UNSEEN_INTERVAL)
    # Four queued jobs read per look, newest first: all ten in three looks.
    assert [len(part) for part in concluded] == [4, 8, 10]
    assert concluded[-1] == ids


@pytest.mark.parametrize("stopped", [EPOCH, EPOCH - 120])
async def test_a_worker_without_task_events_took_only_what_was_sent_while_it_lived(
    sqlite: Storage, autojump_clock: trio.testing.MockClock, stopped: float
) -> None:
    """It stopped since (the jobs were taken, by it), or before they were sent (they were
    not: purged, or taken by a consumer Sluice does not know)."""
    clock = epoch_clock(autojump_clock)
    await blind_worker_with_queued_jobs(sqlite, 3, heard=stopped, kind="offline")
    await sqlite.record_queue_samples([depth(0, EPOCH)])
    sink = CollectingSink()
    monitor = WorkerMonitor(sqlite, sink, missed=MISSED, clock=clock, frameworks=CELERY)
    await monitor.check(clock())
    assert len(sink.job_events) == (3 if stopped == EPOCH else 0)

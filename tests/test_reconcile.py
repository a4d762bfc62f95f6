"""Reconciliation after a gap (issue 17, item 2): gaps are recorded, the workers and the
result backend are asked, and what nobody can tell is unknown, never lost.

The scenario tests run real Celery workers (two, on one queue) and stop a real engine
for a few seconds while they work, on Redis and on RabbitMQ.
"""

from __future__ import annotations

import datetime as dt
import functools
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import psycopg
import pytest
import redis
import trio
import trio.testing

from sluice_celery.reconcile import CeleryReconciler, _retried
from sluice_celery.result_backend import DatabaseResultBackend, open_backend
from sluice_core.config import Config, ConfigError
from sluice_core.engine import Engine
from sluice_core.merge import rebuild
from sluice_core.model import Job, JobEvent, JobState, Normalized, event_id
from sluice_core.pipeline import SourceStatus
from sluice_core.plugins import PluginManager
from sluice_core.reconcile import (
    DROPPED,
    KEPT,
    RECONNECT,
    STOPPED,
    GapWatch,
    Reconciled,
    explanation,
    unknown_event,
)
from sluice_core.serialize import gap_to_dict
from sluice_core.storage import Gap, JobQuery, Storage
from sluice_rabbitmq.connection import AmqpParams, close_quietly, connect
from tests.celery_app import ENV_RESULT_BACKEND
from tests.fixtures.celery_worker import BROKERS, CeleryWorker
from tests.fixtures.services import PG_URL, REDIS_URL
from tests.fixtures.storage import database_url, open_storage, pg_admin
from tests.waiting import wait_until

# -- the fold: unknown gives way to any later event, never to an earlier one -----------


def _event(job: str, state: JobState | None, ts: float, **fields: Any) -> JobEvent:
    return JobEvent(event_id(job, state, ts), job, "celery", f"t-{state}", state, ts,
                    fields=fields)


GAP = Gap("celery/redis://localhost:6379/0", STOPPED, 100.0, 130.0)


def test_unknown_overrides_an_open_state_with_the_gaps_explanation() -> None:
    job = Job("j", "celery", updated_at=105.0)
    events = [_event("j", JobState.RECEIVED, 101.0), _event("j", JobState.ACTIVE, 105.0),
              unknown_event(job, GAP)]
    row = rebuild("j", "celery", events)
    assert row.state is JobState.UNKNOWN
    assert row.exception == explanation(GAP)
    assert "1970-01-01 00:01:40.000 UTC – 1970-01-01 00:02:10.000 UTC" in explanation(GAP)  # noqa: RUF001
    assert GAP.source in explanation(GAP)


def test_a_later_event_wins_over_unknown_whatever_its_rank() -> None:
    job = Job("j", "celery", updated_at=105.0)
    base = [_event("j", JobState.ACTIVE, 105.0), unknown_event(job, GAP)]
    # Redelivered after the gap: received again (a lower rank than the active before).
    row = rebuild("j", "celery", [*base, _event("j", JobState.RECEIVED, 140.0)])
    assert (row.state, row.exception) == (JobState.RECEIVED, None)
    row = rebuild("j", "celery", [*base, _event("j", JobState.COMPLETED, 150.0, result="1")])
    assert (row.state, row.result) == (JobState.COMPLETED, "1")


def test_an_outcome_is_never_made_unknown() -> None:
    job = Job("j", "celery", updated_at=105.0)
    # The outcome arrives late but was stamped in the gap (a RabbitMQ queue's backlog).
    events = [_event("j", JobState.ACTIVE, 101.0), _event("j", JobState.FAILED, 110.0),
              unknown_event(job, GAP)]
    assert rebuild("j", "celery", events).state is JobState.FAILED
    lost = [_event("j", JobState.LOST, 101.0), unknown_event(job, GAP)]
    assert rebuild("j", "celery", lost).state is JobState.LOST


def test_an_event_stamped_before_the_gaps_end_does_not_undo_unknown() -> None:
    job = Job("j", "celery", updated_at=101.0)
    events = [_event("j", JobState.QUEUED, 101.0), unknown_event(job, GAP),
              _event("j", JobState.RECEIVED, 120.0)]
    assert rebuild("j", "celery", events).state is JobState.UNKNOWN


# -- storage: gaps and listening marks, on both backends --------------------------------


async def test_gaps_and_listening_marks_are_stored(storage: Storage) -> None:
    assert await storage.list_gaps(10) == []
    assert await storage.listening_marks() == {}
    assert await storage.last_heard() is None
    first = await storage.record_gap(Gap("celery/a", STOPPED, 10.0, 20.0))
    second = await storage.record_gap(Gap("celery/b", DROPPED, 30.0, 31.5))
    await storage.gap_reconciled(first, 25.0, "3 open jobs: 3 unknown")
    gaps = await storage.list_gaps(10)
    assert [gap.id for gap in gaps] == [second, first]  # the newest first
    assert gaps[1] == Gap("celery/a", STOPPED, 10.0, 20.0, 25.0, "3 open jobs: 3 unknown", first)
    assert gap_to_dict(gaps[0])["duration_s"] == 1.5
    assert await storage.list_gaps(1) == gaps[:1]

    await storage.mark_listening({"celery/a": 50.0, "celery/b": 40.0})
    await storage.mark_listening({"celery/a": 45.0})  # late: a mark never moves back
    assert await storage.listening_marks() == {"celery/a": 50.0, "celery/b": 40.0}
    await storage.mark_listening({"celery/a": 60.0})
    assert (await storage.listening_marks())["celery/a"] == 60.0

    await storage.ingest([_event("j", JobState.QUEUED, 77.0)], [])
    assert await storage.last_heard() == 77.0


# -- the gap watch, with a reconciler of its own and a real database -------------------


class _Told:
    """A reconciler that settles the jobs it is told to and records what it was asked."""

    def __init__(self, source: str, settles: dict[str, JobEvent]) -> None:
        self.source = source
        self.settles = settles
        self.asked: list[tuple[Gap, list[str]]] = []

    def owns(self, job: Job) -> bool:
        return True

    async def reconcile(
        self, gap: Gap, open_jobs: list[Job], mid_life: list[Job], known: Any
    ) -> Reconciled:
        self.asked.append((gap, sorted(job.id for job in open_jobs)))
        out = Reconciled()
        for job in open_jobs:
            if job.id in self.settles:
                out.events.append(self.settles[job.id])
                out.settled.add(job.id)
                out.counts["completed"] += 1
        return out


class _Sink:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.pending: list[JobEvent] = []

    def put_raw(self, batch: Any) -> None:
        raise AssertionError("the gap watch hands over normalized events only")

    def put_events(self, job_events: list[JobEvent], worker_events: list[Any]) -> None:
        self.pending += job_events

    def source_status(self, name: str, up: bool, detail: str = "") -> None:
        raise AssertionError("not a source")

    async def flush(self) -> None:
        events, self.pending = self.pending, []
        await self.storage.ingest(events, [])


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """Trio's autojump clock, but jumping only after 0.2 s of real idleness: the database's
    threads take real time, and the clock must not run past the deadlines meanwhile."""
    return trio.testing.MockClock(autojump_threshold=0.2)


async def test_reconnect_and_drops_are_gaps_reconciled_by_the_sources_reconciler(
    sqlite_url: str, patient_clock: trio.abc.Clock
) -> None:
    storage = open_storage(sqlite_url)
    await storage.open()
    source = "celery/redis://x:6379/0"
    sources: dict[str, SourceStatus] = {}
    dropped: dict[str, float] = {}
    epoch = 1_700_000_000.0

    def clock() -> float:
        return epoch + trio.current_time()

    done = _event("done-in-gap", JobState.COMPLETED, clock() + 3, result="7")
    reconciler = _Told(source, {"done-in-gap": done})
    sink = _Sink(storage)
    admitted: list[Normalized] = []

    def admit(normalized: Normalized) -> Normalized:
        admitted.append(normalized)
        return normalized

    watch = GapWatch(storage, sink, admit=admit, reconcilers=[reconciler],
                     sources=lambda: sources, dropped=lambda: dropped, clock=clock)
    await storage.ingest([_event("done-in-gap", JobState.ACTIVE, clock()),
                          _event("quiet", JobState.RECEIVED, clock())], [])
    try:
        await watch.prepare()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run)
            sources[source] = SourceStatus(True, "", clock())


            async def marked() -> bool:
                return source in await storage.listening_marks()

            await wait_until(marked, "the source's listening mark")
            assert await storage.list_gaps(10) == []  # a first start on an empty database

            sources[source] = SourceStatus(False, "connection reset", clock())
            await trio.sleep(10)
            sources[source] = SourceStatus(True, "", clock())
            await wait_until(lambda: watch.reconciled == 1)
            await sink.flush()
            [gap] = await storage.list_gaps(10)
            assert (gap.source, gap.cause) == (source, RECONNECT)
            # From the last poll that heard it (every POLL_S, or later while the
            # database's threads hold up the mock clock) to when it was up again.
            assert 10 <= gap.duration <= 13
            assert reconciler.asked == [(attrs.evolve(gap, reconciled_at=None, summary=None,
                                                      id=None), ["done-in-gap", "quiet"])]
            assert gap.summary == "2 open jobs: 1 completed, 1 unknown"
            assert (await storage.get_job("done-in-gap")).state is JobState.COMPLETED  # type: ignore[union-attr]
            quiet = await storage.get_job("quiet")
            assert quiet is not None and quiet.state is JobState.UNKNOWN
            assert quiet.exception == explanation(gap)
            assert admitted, "what a reconciler tells passes the door of events from outside"

            # Drops: from the first seen to the last, reconciled once they stop.
            dropped[source] = 5.0
            await trio.sleep(0.5)
            dropped[source] = 12.0
            await wait_until(lambda: watch.reconciled >= 2)
            latest = (await storage.list_gaps(10))[0]
            assert (latest.cause, latest.source) == (DROPPED, source)
            assert latest.summary == "0 open jobs: nothing to correct"
            nursery.cancel_scope.cancel()
    finally:
        await storage.aclose()


async def test_an_outage_another_process_heard_through_is_no_gap(
    sqlite_url: str, patient_clock: trio.abc.Clock
) -> None:
    storage = open_storage(sqlite_url)
    await storage.open()
    source = "celery/redis://x:6379/0"
    sources = {source: SourceStatus(True, "", trio.current_time())}
    watch = GapWatch(storage, _Sink(storage), admit=lambda n: n, reconcilers=[],
                     sources=lambda: sources, dropped=dict, clock=trio.current_time)
    try:
        await watch.prepare()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run)
            await trio.sleep(2)
            sources[source] = SourceStatus(False, "connection reset", trio.current_time())
            for _ in range(10):  # the other half of an HA pair hears it all along
                await trio.sleep(1)
                await storage.mark_listening({source: trio.current_time()})
            sources[source] = SourceStatus(True, "", trio.current_time())
            await trio.sleep(3)
            assert watch._watched[source].since == sources[source].since  # the watch saw it
            nursery.cancel_scope.cancel()
        assert await storage.list_gaps(10) == []
    finally:
        await storage.aclose()


# -- the database result backend, on SQLite and PostgreSQL -------------------------------

# Celery's own table (celery/backends/database/models.py, TaskExtended), as SQLAlchemy
# creates it; values are what its JSON result serializer stores.
TASKMETA = """
CREATE TABLE celery_taskmeta (
    id INTEGER PRIMARY KEY, task_id VARCHAR(155) UNIQUE, status VARCHAR(50),
    result {blob}, date_done TIMESTAMP, traceback TEXT, children {blob},
    name VARCHAR(155), args {blob}, kwargs {blob}, worker VARCHAR(155), retries INTEGER,
    queue VARCHAR(155), stamps {blob}
)
"""
DONE = dt.datetime(2026, 12, 6, 5, 0, 0, 250_000)  # naive UTC, as Celery stores it
ROWS = [
    ("ok", "SUCCESS", orjson.dumps({"n": 5}), DONE, None, "tests.add", orjson.dumps([2, 3])),
    ("bad", "FAILURE",
     orjson.dumps({"exc_type": "KeyError", "exc_message": ["k"], "exc_module": "builtins"}),
     DONE + dt.timedelta(seconds=1), "Traceback...\nKeyError: 'k'", "tests.fail", None),
    ("gone", "REVOKED",
     orjson.dumps({"exc_type": "TaskRevokedError", "exc_message": ["revoked"]}),
     DONE + dt.timedelta(seconds=2), None, None, None),
    ("waiting", "RETRY", orjson.dumps(None), DONE, None, None, None),
    ("pickled", "SUCCESS", b"\x80\x04K\x05.", DONE, None, None, None),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def taskmeta_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    insert = ("INSERT INTO celery_taskmeta (task_id, status, result, date_done, traceback,"
              " name, args) VALUES ({m}, {m}, {m}, {m}, {m}, {m}, {m})")
    if request.param == "sqlite":
        path = tmp_path / "results.db"
        conn = sqlite3.connect(path)
        conn.execute(TASKMETA.format(blob="BLOB"))
        rows = [(*row[:3], row[3].isoformat(" "), *row[4:]) for row in ROWS]
        conn.executemany(insert.format(m="?"), rows)
        conn.commit()
        conn.close()
        yield f"db+sqlite:///{path}"
        return
    name = f"sluice_results_{uuid.uuid4().hex[:12]}"
    pg_admin(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(database_url(name), autocommit=True) as pg:
            pg.execute(TASKMETA.format(blob="BYTEA").replace("INTEGER PRIMARY KEY",
                                                             "SERIAL PRIMARY KEY"))
            pg.cursor().executemany(insert.format(m="%s"), ROWS)
        yield "db+" + database_url(name).replace("postgresql://", "postgresql+psycopg2://")
    finally:
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_database_result_backend_outcomes(taskmeta_url: str) -> None:
    backend = open_backend(taskmeta_url)
    assert isinstance(backend, DatabaseResultBackend)
    done = DONE.replace(tzinfo=dt.UTC).timestamp()
    with trio.fail_after(30):
        found = await backend.outcomes(["ok", "bad", "gone", "waiting", "pickled", "nope"])
        between = await backend.finished_between(done + 0.5, done + 5)
    # RETRY is no outcome; a pickled value is never unpickled; "nope" was never stored.
    assert sorted(found) == ["bad", "gone", "ok", "pickled"]
    ok = found["ok"]
    assert (ok.state, ok.finished_at, ok.result, ok.name, ok.args) == (
        JobState.COMPLETED, done, "{'n': 5}", "tests.add", "(2, 3)"
    )
    assert found["pickled"].result is None
    bad = found["bad"]
    assert (bad.state, bad.exception, bad.traceback) == (
        JobState.FAILED, "KeyError('k')", "Traceback...\nKeyError: 'k'"
    )
    assert (found["gone"].state, found["gone"].exception) == (
        JobState.REVOKED, "TaskRevokedError('revoked')"
    )
    assert sorted(o.job_id for o in between) == ["bad", "gone"]


def test_a_result_backend_sluice_cannot_read_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="Sluice reads"):
        open_backend("mongodb://localhost/results")
    with pytest.raises(ConfigError, match="PostgreSQL"):
        open_backend("db+mysql://u@h/results")
    assert PG_URL  # the database fixture's server


# -- the scenario: Sluice stopped while two workers work ---------------------------------

HEARTBEAT_FREQ = 2.0  # Celery's: a worker is offline after 3 of them


async def _judged_past_the_window(engine: Engine) -> None:
    """Until the worker monitor has judged the workers' silence past a whole heartbeat
    window after the start: any worker it calls offline is offline by then."""
    window_end = engine.started_at + 3 * HEARTBEAT_FREQ + 1
    await wait_until(
        lambda: (engine.worker_monitor.judged_until or 0.0) > window_end,
        "the monitor judged a heartbeat window after the start",
    )
SECRET = "p4ss-SECRET"
TIMEOUT = 150


class Cluster:
    """Two real workers on one queue, their results kept in Redis under the test's prefix."""

    def __init__(self, broker: str, keyprefix: str, tmp: Path) -> None:
        self.keyprefix = keyprefix
        env = {ENV_RESULT_BACKEND: REDIS_URL}
        self.w1 = CeleryWorker(broker, keyprefix, tmp / "w1.log", env=env)
        self.w2 = CeleryWorker(broker, keyprefix, tmp / "w2.log", env=env)
        self.w2.queue = self.w1.queue
        self.workers = (self.w1, self.w2)

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        client = redis.Redis.from_url(REDIS_URL)
        with client:
            keys = list(client.scan_iter(match=self.keyprefix + "*", count=1000))
            if keys:
                client.delete(*keys)

    async def send(self, name: str, *args: Any, countdown: float | None = None,
                   queue: str | None = None, **kwargs: Any) -> str:
        app, queue = self.w1.app, queue or self.w1.queue
        result = await trio.to_thread.run_sync(
            lambda: app.send_task(name, args=args, kwargs=kwargs, queue=queue,
                                  countdown=countdown)
        )
        return str(result.id)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, keyprefix: str, tmp_path: Path) -> Iterator[Cluster]:
    with BROKERS[request.param]() as url:
        two = Cluster(url, keyprefix, tmp_path)
        try:
            two.start()
            yield two
        finally:
            two.close()


def _engine(db: str, cluster: Cluster, *, result_backend: bool) -> Engine:
    pm = PluginManager()
    pm.load(["celery", "rabbitmq"])
    options: dict[str, Any] = {}
    if result_backend:
        options = {"result_backend": REDIS_URL, "result_backend_keyprefix": cluster.keyprefix}
    config = Config(db=db, broker=[cluster.w1.broker_url], redis_keyprefix=cluster.keyprefix,
                    port=0, **options)
    pm.configure(config)
    return Engine(config, pm)


async def _job(engine: Engine, job_id: str) -> Job | None:
    return await engine.storage.get_job(job_id)


async def _state(engine: Engine, job_id: str) -> JobState | None:
    job = await _job(engine, job_id)
    return None if job is None else job.state


def _lose_event_queue(url: str, queue: str) -> None:
    """What a broker restart, or an outage past the queue's expiry, does to Sluice's queue."""
    conn = connect(AmqpParams.from_url(url), name="sluice test")
    try:
        conn.channel().queue_delete(queue)
    finally:
        close_quietly(conn)


async def _run_gap(
    db: str, cluster: Cluster, *, result_backend: bool, lose_queue: bool = False
) -> tuple[Engine, dict[str, str]]:
    """Watch the workers, stop Sluice for a few seconds while they work, start it again
    (``lose_queue``: RabbitMQ lost Sluice's event queue meanwhile).

    Returns the second engine, not yet running, and the jobs by role."""
    jobs: dict[str, str] = {}
    first = _engine(db, cluster, result_backend=result_backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(first.run, web=False))
        await wait_until(
            lambda: _workers_seen(first, cluster), "both workers' heartbeats stored"
        )
        jobs["seen_done"] = await cluster.send("tests.add", 1, 1)
        # Started while Sluice watched, finished while it was away.
        jobs["ends_in_gap"] = await cluster.send("tests.sleep", 2.0)
        # Sent to a queue no worker consumes: it waits there, through the gap.
        jobs["waiting"] = await cluster.send("tests.add", 0, 0, queue=cluster.w1.queue + "-idle")
        await wait_until(lambda: _state(first, jobs["waiting"]), "the waiting job stored")
        await wait_until(lambda: _is(first, jobs["seen_done"], JobState.COMPLETED),
                         "the first job done while Sluice watched")
        await wait_until(
            lambda: _is(first, jobs["ends_in_gap"], JobState.ACTIVE), "the sleeping job started"
        )
        first.stop()
    gap_began = time.time()
    if lose_queue:
        [source] = first.sources
        await trio.to_thread.run_sync(_lose_event_queue, cluster.w1.broker_url,
                                      source.queue)  # type: ignore[attr-defined]
    # While Sluice is away: jobs finish, one retries, one is held for an ETA past the gap,
    # one starts and runs on across it.
    jobs["add_in_gap"] = await cluster.send("tests.add", 20, 22)
    jobs["fail_in_gap"] = await cluster.send("tests.fail", "key")
    jobs["retried_in_gap"] = await cluster.send("tests.flaky", 2, countdown=0.5)
    jobs["eta"] = await cluster.send("tests.add", 4, 5, countdown=12.0)
    jobs["across"] = await cluster.send("tests.sleep", 10.0)
    jobs["secret"] = await cluster.send("tests.echo", user="ann", password=SECRET)
    await trio.sleep(max(0.0, 5.0 - (time.time() - gap_began)))
    second = _engine(db, cluster, result_backend=result_backend)
    return second, jobs


async def _workers_seen(engine: Engine, cluster: Cluster) -> bool:
    names = {worker.hostname for worker in await engine.storage.list_workers()}
    return {cluster.w1.hostname, cluster.w2.hostname} <= names


async def _is(engine: Engine, job_id: str, state: JobState) -> bool:
    return await _state(engine, job_id) is state


async def _reconciled(engine: Engine) -> Gap | None:
    gaps = await engine.storage.list_gaps(10)
    return next((gap for gap in gaps if gap.reconciled_at is not None), None)


@pytest.mark.parametrize(
    ("cluster", "lose_queue"),
    [("redis", False), ("rabbitmq", False), ("rabbitmq", True)],
    indirect=["cluster"],
    ids=["redis", "rabbitmq-queue-kept", "rabbitmq-queue-lost"],
)
async def test_after_a_stop_the_workers_and_the_result_backend_tell_what_happened(
    cluster: Cluster, lose_queue: bool, sqlite_url: str
) -> None:
    with trio.fail_after(TIMEOUT):
        engine, jobs = await _run_gap(sqlite_url, cluster, result_backend=True,
                                      lose_queue=lose_queue)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            gap = await wait_until(lambda: _reconciled(engine), "the gap reconciled")
            async with httpx.AsyncClient(base_url=engine.web_addresses[0], timeout=10) as web:
                shown = (await web.get("/api/gaps")).json()
                overview = (await web.get("/")).text
                await wait_until(lambda: _is(engine, jobs["add_in_gap"], JobState.COMPLETED))
                job_page = (await web.get(f"/jobs/{jobs['add_in_gap']}")).text
            # Held across the gap: active on its worker, from the workers' answers.
            across = await wait_until(lambda: _job(engine, jobs["across"]))
            assert across.name == "tests.sleep"
            # Then every job runs its course.
            for role in ("across", "eta", "ends_in_gap", "add_in_gap", "retried_in_gap",
                         "secret"):
                await wait_until(lambda role=role: _is(engine, jobs[role], JobState.COMPLETED),
                                 f"{role} completed")
            await wait_until(lambda: _is(engine, jobs["fail_in_gap"], JobState.FAILED))
            # A fresh heartbeat window after the start, judged: no worker is offline.
            await _judged_past_the_window(engine)
            workers = await engine.storage.list_workers()
            states = await engine.storage.count_jobs_by_state()
            rows = {role: await _job(engine, job_id) for role, job_id in jobs.items()}
            timeline = await engine.storage.job_events(jobs["across"])
            engine.stop()

    assert gap.cause == STOPPED and gap.source.startswith("celery/")
    assert 4 <= gap.duration <= 30
    assert shown[0] == gap_to_dict(gap)
    assert 'id="gaps"' in overview and gap.source in overview and "Sluice was stopped" in overview
    assert {w.status for w in workers} == {"online"}, [(w.hostname, w.status) for w in workers]
    assert "lost" not in states, states
    # Only RabbitMQ's queue, once lost, leaves a job unknowable: no one can look into a
    # RabbitMQ queue without taking its messages.
    assert states.get("unknown", 0) == (1 if lose_queue else 0), states
    by = {role: row for role, row in rows.items() if row is not None}
    assert set(by) == set(jobs)
    waiting = by["waiting"]
    if lose_queue:
        assert (waiting.state, waiting.exception) == (JobState.UNKNOWN, explanation(gap))
    else:
        assert waiting.state is JobState.QUEUED
    assert by["eta"].name == "tests.add" and by["eta"].args == "(4, 5)"
    assert by["eta"].result == "9"
    assert by["fail_in_gap"].exception == "KeyError('key')"
    assert by["add_in_gap"].result == "42"
    assert by["across"].worker in {cluster.w1.hostname, cluster.w2.hostname}
    # What the workers and the result backend told went through the server's redaction.
    secret = by["secret"]
    assert SECRET not in f"{secret.kwargs} {secret.result} {secret.extra}"
    assert "ann" in (secret.result or "")
    database = Path(sqlite_url.removeprefix("sqlite:///"))
    for path in (database, database.with_name(database.name + "-wal")):
        assert not path.exists() or SECRET.encode() not in path.read_bytes(), path
    if cluster.w1.broker_url.startswith("redis") or lose_queue:
        # Nothing of the gap was kept: what finished in it came from the result backend.
        for role in ("ends_in_gap", "add_in_gap", "fail_in_gap", "retried_in_gap"):
            assert by[role].extra.get("outcome_from", "").startswith("result backend"), role
        assert by["add_in_gap"].name == "tests.add"  # result_extended named it
        assert any(e.type == "sluice-active" for e in timeline), [e.type for e in timeline]
        assert 'id="outcome-from"' in job_page and "result backend" in job_page
        if not lose_queue:  # Redis: the waiting job's message was found in its list
            assert "1 still queued" in (gap.summary or ""), gap.summary
    else:
        # RabbitMQ's queue kept the gap's events: each job has its own story, and the
        # workers need not be asked.
        assert gap.summary == KEPT
        assert by["add_in_gap"].extra.get("outcome_from") is None
        assert not any(e.type.startswith("sluice-") for e in timeline)


async def test_without_a_result_backend_what_finished_in_the_gap_is_unknown(
    keyprefix: str, tmp_path: Path, sqlite_url: str
) -> None:
    with BROKERS["redis"]() as url:
        two = Cluster(url, keyprefix, tmp_path)
        try:
            await trio.to_thread.run_sync(two.start)
            with trio.fail_after(TIMEOUT):
                engine, jobs = await _run_gap(sqlite_url, two, result_backend=False)
                async with trio.open_nursery() as nursery:
                    await nursery.start(functools.partial(engine.run, web=False))
                    gap = await wait_until(lambda: _reconciled(engine), "the gap reconciled")
                    ended = await _job(engine, jobs["ends_in_gap"])
                    across = await wait_until(lambda: _job(engine, jobs["across"]))
                    await wait_until(lambda: _is(engine, jobs["across"], JobState.COMPLETED))
                    await _judged_past_the_window(engine)
                    ended_later = await _job(engine, jobs["ends_in_gap"])
                    workers = await engine.storage.list_workers()
                    page = await engine.storage.list_jobs(JobQuery(states=frozenset({JobState.LOST})))
                    engine.stop()
        finally:
            two.close()

    assert ended is not None and ended.state is JobState.UNKNOWN
    assert ended.exception == explanation(gap)
    assert ended_later is not None and ended_later.state is JobState.UNKNOWN  # never lost
    assert page.jobs == []
    assert across.name == "tests.sleep"
    assert {w.status for w in workers} == {"online"}
    assert "1 unknown" in (gap.summary or "")


# -- the workers' answers, as real workers give them ------------------------------------


def _reconciler(worker: CeleryWorker) -> CeleryReconciler:
    pm = PluginManager()
    pm.load(["celery", "rabbitmq"])
    config = Config(broker=[worker.broker_url], redis_keyprefix=worker.keyprefix)
    [reconciler] = pm.reconcilers(config)
    assert isinstance(reconciler, CeleryReconciler)
    return reconciler


@pytest.mark.parametrize("celery_worker", ["redis", "rabbitmq"], indirect=True)
async def test_query_task_names_a_job_first_seen_mid_life(celery_worker: CeleryWorker) -> None:
    reconciler = _reconciler(celery_worker)
    try:
        with trio.fail_after(60):
            job_id = await celery_worker.send("tests.sleep", 10.0)


            async def running() -> bool:
                held, _ = await reconciler._ask()
                return job_id in held and held[job_id].state is JobState.ACTIVE

            await wait_until(running, "the worker running the job")
            [event] = await reconciler._query([job_id], time.time())
    finally:
        await reconciler.aclose()
    assert (event.job_id, event.state, event.worker) == (
        job_id, JobState.ACTIVE, celery_worker.hostname
    )
    assert event.fields["name"] == "tests.sleep"
    assert event.fields["args"] == "(10.0,)"


def test_a_job_scheduled_after_it_started_was_retried_in_the_gap() -> None:
    started = dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp()
    job = Job("j", "celery", state=JobState.ACTIVE, started_at=started)
    later = dt.datetime(2026, 1, 1, 0, 0, 5, tzinfo=dt.UTC).isoformat()
    earlier = dt.datetime(2025, 12, 31, 23, 59, tzinfo=dt.UTC).isoformat()
    assert _retried(job, later)
    assert not _retried(job, earlier)  # a redelivery keeps its first ETA
    assert not _retried(attrs.evolve(job, state=JobState.RECEIVED), later)

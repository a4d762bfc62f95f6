"""Both storage backends against real databases: what the pipeline, the API and the UI rely on."""

from __future__ import annotations

import functools
import random
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import trio

from sluice_core import merge
from sluice_core.config import Config, ConfigError
from sluice_core.model import Job, JobEvent, JobState, QueueSample, WorkerEvent, event_id
from sluice_core.plugins import PluginManager
from sluice_core.storage import IngestResult, JobQuery, Storage
from sluice_storage import common
from sluice_storage.common import SharedSql, migrations
from tests.fixtures.services import PG_URL
from tests.fixtures.storage import (
    RETRIED,
    by_job,
    celery_fixture_events,
    database_url,
    open_storage,
)

EVENTS, WORKER_EVENTS = celery_fixture_events()
JOBS = by_job(EVENTS)
T0 = 1_800_000_000.0

_FLOW = (
    ("task-sent", JobState.QUEUED),
    ("task-received", JobState.RECEIVED),
    ("task-started", JobState.ACTIVE),
)
_OUTCOME = {
    JobState.COMPLETED: "task-succeeded",
    JobState.FAILED: "task-failed",
    JobState.REVOKED: "task-revoked",
}


def lifecycle(
    job_id: str,
    t: float,
    state: JobState = JobState.COMPLETED,
    *,
    name: str = "tasks.add",
    queue: str | None = "celery",
    worker: str = "w1@host",
    args: str = "(2, 3)",
    kwargs: str = "{}",
    exception: str | None = None,
    framework: str = "celery",
) -> list[JobEvent]:
    """A job's events from sent up to ``state``, one every 10 ms from ``t``."""
    steps = list(_FLOW)
    if state in _OUTCOME:
        steps.append((_OUTCOME[state], state))
    else:
        steps = steps[: [s for _, s in _FLOW].index(state) + 1]
    out = []
    for i, (etype, st) in enumerate(steps):
        fields: dict[str, Any] = {}
        if etype == "task-sent":
            fields = {"name": name, "args": args, "kwargs": kwargs, "retries": 0}
            if queue is not None:
                fields["queue"] = queue
        elif st is JobState.FAILED:
            fields = {"exception": exception, "traceback": "Traceback ..."}
        out.append(
            JobEvent(
                id=event_id(job_id, etype),
                job_id=job_id,
                framework=framework,
                type=etype,
                state=st,
                timestamp=t + i * 0.01,
                worker=None if etype == "task-sent" else worker,
                fields=fields,
            )
        )
    return out


def rebuilt(events: list[JobEvent]) -> Job:
    return merge.rebuild(events[0].job_id, events[0].framework, events)


async def ingest(
    storage: Storage, events: list[JobEvent], workers: list[WorkerEvent] | None = None
) -> IngestResult:
    with trio.fail_after(20):
        return await storage.ingest(events, workers or [])


async def all_pages(storage: Storage, query: JobQuery) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        page = await storage.list_jobs(attrs.evolve(query, cursor=cursor))
        ids += [job.id for job in page.jobs]
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor


async def assert_counts_from_scratch(storage: Storage, since: float) -> None:
    """The overview's counts (kept by ingest, migration 0009) are those of the stored
    rows counted from scratch: here in Python, and again by ROLLUPS_FROM_JOBS in SQL."""
    jobs = [await storage.get_job(job_id) for job_id in await all_pages(storage, JobQuery(limit=500))]
    states: dict[str, int] = {}
    finished: dict[float, list[int]] = {}
    failing: dict[str, int] = {}
    for job in jobs:
        assert job is not None
        states[job.state.value] = states.get(job.state.value, 0) + 1
        minute = common.finished_minute(job)
        if minute is None or minute < common.minute_of(since):
            continue
        counts = finished.setdefault(minute * 60.0, [0, 0])
        counts[job.state is JobState.FAILED] += 1
        if job.state is JobState.FAILED and job.name is not None:
            failing[job.name] = failing.get(job.name, 0) + 1
    expected = (
        states,
        [(minute, done, failed) for minute, (done, failed) in sorted(finished.items())],
        sorted(failing.items(), key=lambda item: (-item[1], item[0])),
    )

    async def kept() -> tuple[Any, ...]:
        return (
            await storage.count_jobs_by_state(),
            await storage.job_throughput(since, 60),
            await storage.top_failing_names(since, 1000),
        )

    assert await kept() == expected
    assert isinstance(storage, SharedSql)

    def from_scratch(conn: Any) -> None:
        for statement in common.rollups_from_jobs(storage.partition_day_sql):
            conn.execute(statement)

    await storage._write(from_scratch)
    assert await kept() == expected


# -- ingest ---------------------------------------------------------------------


async def test_ingested_jobs_read_back_as_folded(storage: Storage) -> None:
    result = await ingest(storage, EVENTS, WORKER_EVENTS)
    assert result.events_stored == len(EVENTS)
    assert {job.id for job in result.jobs} == set(JOBS)
    for job_id, events in JOBS.items():
        assert await storage.get_job(job_id) == rebuilt(events)
        timeline = await storage.job_events(job_id)
        assert timeline == sorted(events, key=merge.sort_key)  # oldest first, every field kept
    assert await storage.get_job("no-such-job") is None
    assert await storage.job_events("no-such-job") == []


async def test_overview_counts_follow_late_and_duplicate_events(storage: Storage) -> None:
    """The counts ingest keeps equal a count from scratch after every batch, whatever
    order the events come in, however often: jobs that fail, complete, stay open, are
    retried (the real capture), whose outcome comes before their start, and batches
    that repeat what was stored."""
    rng = random.Random(18)
    states = [JobState.COMPLETED, JobState.FAILED, JobState.ACTIVE, JobState.REVOKED,
              JobState.QUEUED]
    events = [
        event
        for i in range(120)
        for event in lifecycle(
            f"roll-{i:03}", T0 + i * 7.3, states[i % len(states)], name=f"tasks.n{i % 4}",
            exception="E()" if states[i % len(states)] is JobState.FAILED else None,
        )
    ] + JOBS[RETRIED]
    rng.shuffle(events)
    stored: list[JobEvent] = []
    while events:
        batch, events = events[: rng.randint(1, 60)], events[rng.randint(1, 60):]
        repeated = rng.sample(stored, min(len(stored), rng.randint(0, 20)))
        await ingest(storage, batch + repeated + batch[:3])
        stored += batch
        await assert_counts_from_scratch(storage, T0 - 60)
    # Where a window starts within the history, the minutes before it are left out.
    await assert_counts_from_scratch(storage, T0 + 300)


async def test_duplicate_ingest_stores_once_and_changes_nothing(storage: Storage) -> None:
    await ingest(storage, EVENTS)
    before = {job_id: await storage.get_job(job_id) for job_id in JOBS}
    again = await ingest(storage, EVENTS + EVENTS[:5])  # duplicates within the batch too
    assert again.events_stored == 0
    assert again.jobs == []
    assert {job_id: await storage.get_job(job_id) for job_id in JOBS} == before
    assert sum((await storage.count_jobs_by_state()).values()) == len(JOBS)


async def test_a_batch_of_new_and_stored_events_stores_the_new_ones(storage: Storage) -> None:
    # A redelivery overlapping new traffic: the stored events must not cost the new ones.
    await ingest(storage, EVENTS[::2])
    again = await ingest(storage, EVENTS)
    assert again.events_stored == len(EVENTS[1::2])
    assert sorted(event.id for event in again.new_events) == sorted(e.id for e in EVENTS[1::2])
    for job_id, events in JOBS.items():
        assert await storage.get_job(job_id) == rebuilt(events)
        assert len(await storage.job_events(job_id)) == len(events)


async def test_late_events_take_the_slow_path_to_the_same_row(storage: Storage) -> None:
    # Newest first, one event per batch: every batch but the first is out of order.
    for event in sorted(EVENTS, key=merge.sort_key, reverse=True):
        await ingest(storage, [event])
    for job_id, events in JOBS.items():
        assert await storage.get_job(job_id) == rebuilt(events)


async def test_jobs_finished_in_a_later_batch_are_updated_and_searchable(
    storage: Storage,
) -> None:
    """Batches as live ingest makes them: each holds the ends of earlier jobs and new jobs.

    A job changed by a later batch has only its changed columns rewritten, and its
    search entry only when the searched text changed (a failure's exception).
    """
    events = {
        f"job-{i:02}": lifecycle(
            f"job-{i:02}", T0 + i, JobState.FAILED if i % 3 == 0 else JobState.COMPLETED,
            name=f"tasks.n{i}", exception=f"KeyError('missing-{i}')",
        )
        for i in range(12)
    }
    for batch in range(4):  # batch k: jobs 3k..3k+2 are sent, the jobs of batch k-1 end
        sent = [events[f"job-{i:02}"][0] for i in range(3 * batch, 3 * batch + 3)]
        ended = [e for i in range(3 * batch - 3, 3 * batch) if i >= 0
                 for e in events[f"job-{i:02}"][1:]]
        await ingest(storage, ended + sent)
    await ingest(storage, [e for i in range(9, 12) for e in events[f"job-{i:02}"][1:]])
    for job_id, job_events in events.items():
        assert await storage.get_job(job_id) == rebuilt(job_events)

    async def found(q: str) -> list[str]:
        return [job.id for job in (await storage.list_jobs(JobQuery(q=q))).jobs]

    assert await found("missing-") == ["job-09", "job-06", "job-03", "job-00"]
    assert await found("missing-6") == ["job-06"]
    assert await found("tasks.n1") == ["job-11", "job-10", "job-01"]  # not re-indexed, kept


async def test_a_terminal_state_is_not_overwritten_by_a_late_earlier_event(
    storage: Storage,
) -> None:
    events = lifecycle("j-late", T0, JobState.FAILED, exception="ValueError('x')")
    await ingest(storage, [events[-1]])
    await ingest(storage, events[:-1])
    job = await storage.get_job("j-late")
    assert job is not None
    assert job.state is JobState.FAILED
    assert job.exception == "ValueError('x')"
    assert job.finished_at == events[-1].timestamp and job.sent_at == T0


async def test_a_retried_job_counts_retries_and_keeps_every_attempt(storage: Storage) -> None:
    await ingest(storage, JOBS[RETRIED])
    job = await storage.get_job(RETRIED)
    assert job is not None and job.state is JobState.COMPLETED and job.retries == 1
    types = [event.type for event in await storage.job_events(RETRIED)]
    assert types.count("task-received") == 2 and types.count("task-started") == 2


async def test_events_of_many_jobs_in_one_batch_each_stored(storage: Storage) -> None:
    events = [e for i in range(300) for e in lifecycle(f"bulk-{i:03}", T0 + i)]
    result = await ingest(storage, events)
    assert result.events_stored == len(events) and len(result.jobs) == 300
    assert await storage.count_jobs_by_state() == {"completed": 300}
    # Listed newest first: first stored order follows the jobs' first events.
    ids = await all_pages(storage, JobQuery(limit=500))
    assert ids == [f"bulk-{i:03}" for i in reversed(range(300))]


# -- listing -----------------------------------------------------------------------


async def test_every_list_filter(storage: Storage) -> None:
    await ingest(
        storage,
        lifecycle("aaa-1", T0, name="tasks.Add", args="(1, 2)")
        + lifecycle("aab-2", T0 + 10, JobState.FAILED, name="tasks.mul", queue="math",
                    exception="ZeroDivisionError('boom')", worker="w2@host")
        + lifecycle("bbb-3", T0 + 20, JobState.ACTIVE, name="tasks.mul", queue="math",
                    kwargs="{'user': 'Ada'}")
        + lifecycle("ccc-4", T0 + 30, JobState.QUEUED, name="reports.build", queue=None,
                    framework="rq")
        + lifecycle("c%_5", T0 + 40, name="tasks.odd_name"),
    )

    async def ids(**filters: Any) -> list[str]:
        return [job.id for job in (await storage.list_jobs(JobQuery(**filters))).jobs]

    assert await ids() == ["c%_5", "ccc-4", "bbb-3", "aab-2", "aaa-1"]
    assert await ids(q="aa") == ["aab-2", "aaa-1"]  # id prefix
    assert await ids(q="add") == ["aaa-1"]  # name, any case
    assert await ids(q="(1, 2") == ["aaa-1"]  # args
    assert await ids(q="ada") == ["bbb-3"]  # kwargs
    assert await ids(q="zerodivision") == ["aab-2"]  # exception
    assert await ids(q="c%") == ["c%_5"]  # wildcards are literal
    assert await ids(q="d_n") == ["c%_5"]
    assert await ids(q="s_a") == []  # "_" is not a wildcard either
    assert await ids(q="nothing-like-this") == []
    assert await ids(states=frozenset({JobState.FAILED, JobState.ACTIVE})) == ["bbb-3", "aab-2"]
    assert await ids(name="tasks.mul") == ["bbb-3", "aab-2"]
    assert await ids(queue="math") == ["bbb-3", "aab-2"]
    assert await ids(worker="w2@host") == ["aab-2"]
    assert await ids(framework="rq") == ["ccc-4"]
    assert await ids(since=T0 + 10, until=T0 + 30) == ["ccc-4", "bbb-3", "aab-2"]
    assert await ids(ids=frozenset({"aaa-1", "ccc-4", "unknown"})) == ["ccc-4", "aaa-1"]
    assert await ids(name="tasks.mul", states=frozenset({JobState.FAILED})) == ["aab-2"]
    page = await storage.list_jobs(JobQuery(limit=2))
    assert [job.id for job in page.jobs] == ["c%_5", "ccc-4"] and page.next_cursor is not None
    last = await storage.list_jobs(JobQuery(limit=5))
    assert last.next_cursor is None


async def test_an_id_prefix_typed_in_capitals_finds_the_job(storage: Storage) -> None:
    twins = ["6f1c2a9e-4b7d-4e0a-9c51-3d2f8a7b1e04", "6f1c2a9e-0000-4e0a-9c51-3d2f8a7b1e05"]
    await ingest(
        storage,
        lifecycle(twins[0], T0) + lifecycle(twins[1], T0 + 1, name="emails.Send")
        + lifecycle("Report-7", T0 + 2, args="('6F1C2A9E',)"),
    )

    async def found(q: str, limit: int = 50) -> list[str]:
        return [job.id for job in (await storage.list_jobs(JobQuery(q=q, limit=limit))).jobs]

    newest_first = ["Report-7", twins[1], twins[0]]  # Report-7: its arguments hold the text
    assert await found("6F1C2A9E") == newest_first
    assert await found("6F1C2A9E-4B7D") == [twins[0]]
    assert await found(twins[0].upper()) == [twins[0]]
    # The newest rows alone hold a full page: answered from them, not from the index.
    assert await found("6F1C2A9E", limit=1) == ["Report-7"]
    # Free text ignores case as before; an id in capitals still matches as written.
    assert await found("SEND") == [twins[1]]
    assert await found("Report") == ["Report-7"]
    assert await found("0000-4E0A") == []  # a prefix, not a substring


async def test_matching_jobs_are_counted_up_to_a_cap(storage: Storage) -> None:
    assert isinstance(storage, SharedSql)
    events = []
    for i in range(30):
        state = JobState.FAILED if i % 3 == 0 else JobState.COMPLETED
        events += lifecycle(f"job-{i:02}", T0 + i, state, name=f"tasks.n{i % 2}",
                            exception="KeyError('missing')", args=f"('arg-{i}',)")
    await ingest(storage, events)

    async def count(at_most: int = 100, **filters: Any) -> int:
        return await storage.count_jobs(JobQuery(**filters), at_most)

    assert await count() == 30
    assert await count(at_most=11) == 11
    assert await count(states=frozenset({JobState.FAILED})) == 10
    assert await count(name="tasks.n1", states=frozenset({JobState.FAILED})) == 5
    assert await count(since=T0 + 10, until=T0 + 19.5) == 10
    assert await count(q="missing") == 10
    assert await count(q="JOB-1") == 10  # an id prefix, in capitals
    assert await count(q="arg-", at_most=7) == 7
    assert await count(stuck=True) == 0
    # The total of the filters, whichever page the cursor is at.
    second = (await storage.list_jobs(JobQuery(limit=5))).next_cursor
    assert await count(cursor=second) == 30
    # A term common among the newest jobs is counted from them; a rarer one by the index.
    storage.recent_rows = 4
    assert await count(q="arg-", at_most=3) == 3
    assert await count(q="missing") == 10


async def test_cursor_pages_have_no_duplicates_or_gaps_while_jobs_stream_in(
    storage: Storage,
) -> None:
    await ingest(storage, [e for i in range(25) for e in lifecycle(f"old-{i:02}", T0 + i)])
    seen: list[str] = []
    cursor = None
    n = 0
    while True:
        page = await storage.list_jobs(JobQuery(limit=7, cursor=cursor))
        seen += [job.id for job in page.jobs]
        # Between pages: new jobs arrive, and listed ones change state.
        n += 1
        await ingest(
            storage,
            [e for i in range(3) for e in lifecycle(f"new-{n}-{i}", T0 + 100 + n * 10 + i)]
            + lifecycle("old-03", T0 + 3, JobState.FAILED, exception="late")[-1:],
        )
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [f"old-{i:02}" for i in reversed(range(25))]


# -- workers ---------------------------------------------------------------------


def worker_event(kind: str, t: float, **fields: Any) -> WorkerEvent:
    return WorkerEvent(hostname="w1@host", framework="celery", type=kind, timestamp=t, **fields)


async def test_worker_status_follows_the_newest_event(storage: Storage) -> None:
    result = await ingest(
        storage,
        [],
        [
            worker_event("heartbeat", T0 + 2, active=3, processed=10, freq=2.0),
            worker_event("online", T0, active=0, processed=0, pid=42, sw_ver="5.7.0"),
        ],
    )
    assert [w.hostname for w in result.workers] == ["w1@host"]
    (worker,) = await storage.list_workers()
    assert (worker.status, worker.last_heartbeat) == ("online", T0 + 2)
    assert (worker.active, worker.processed, worker.pid, worker.sw_ver) == (3, 10, 42, "5.7.0")

    # Offline as the worker monitor concludes it, with no count: it runs nothing now.
    await ingest(storage, [], [worker_event("offline", T0 + 4)])
    assert [(w.status, w.active) for w in await storage.list_workers()] == [("offline", 0)]

    # A heartbeat sent before the offline one, delivered late: changes nothing.
    late = await ingest(storage, [], [worker_event("heartbeat", T0 + 3, active=9)])
    assert late.workers == []
    (worker,) = await storage.list_workers()
    assert (worker.status, worker.active, worker.last_heartbeat) == ("offline", 0, T0 + 4)

    await ingest(storage, [], [worker_event("online", T0 + 60, active=1, loadavg=[0.5, 0.2, 0.1])])
    (worker,) = await storage.list_workers()
    assert (worker.status, worker.active, worker.loadavg) == ("online", 1, [0.5, 0.2, 0.1])


# -- queues -----------------------------------------------------------------------


async def test_queues_from_samples_and_from_jobs_with_rates(storage: Storage) -> None:
    now = T0 + 1000
    broker = "redis://localhost:6379/0"
    await storage.record_queue_samples(
        [
            QueueSample("celery", "celery", broker, now - 20, depth=7, reserved=2, consumers=1),
            QueueSample("idle", "celery", broker, now - 20, depth=3, consumers=0),
        ]
    )
    # An older reading recorded later does not replace the latest one.
    await storage.record_queue_samples(
        [QueueSample("celery", "celery", broker, now - 60, depth=99, consumers=5)]
    )
    events = []
    for i in range(4):  # 4 finished in the window, one of them failed
        state = JobState.FAILED if i == 0 else JobState.COMPLETED
        events += lifecycle(f"recent-{i}", now - 100 + i, state, queue="emails")
    events += lifecycle("old", now - 3600, queue="emails")  # outside the window
    events += lifecycle("running", now - 50, JobState.ACTIVE, queue="celery")
    await ingest(storage, events)

    queues = {q.name: q for q in await storage.list_queues(now)}
    assert set(queues) == {"celery", "emails", "idle"}
    assert await storage.queue_names() == set(queues)  # what the probes ask for
    celery, emails, idle = queues["celery"], queues["emails"], queues["idle"]
    assert (celery.depth, celery.reserved, celery.consumers, celery.broker) == (7, 2, 1, broker)
    assert celery.updated_at == now - 20
    assert celery.throughput_per_min == 0.0
    assert celery.avg_wait_s == pytest.approx(0.02)  # started 20 ms after sent
    assert (idle.depth, idle.consumers, idle.throughput_per_min) == (3, 0, 0.0)
    # A queue known only from jobs: no probe reading, rates from its jobs.
    assert (emails.depth, emails.consumers, emails.broker) == (None, None, None)
    assert emails.throughput_per_min == pytest.approx(4 / 5)
    assert emails.failure_rate == pytest.approx(0.25)
    assert emails.avg_wait_s == pytest.approx(0.02)


# -- lifecycle ----------------------------------------------------------------------


def applied_versions(url: str) -> list[int]:
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
    with psycopg.connect(url) as conn:
        return [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A database with no schema at all (pg_url's come migrated from the template)."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_url")
        return
    name = f"sluice_empty_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield database_url(name)
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_open_migrates_once_and_data_persists(empty_db_url: str) -> None:
    dialect = "sqlite" if empty_db_url.startswith("sqlite") else "postgresql"
    every_version = [version for version, _ in migrations(dialect)]
    first = open_storage(empty_db_url)
    with trio.fail_after(30):
        assert await first.open() == every_version
        assert applied_versions(empty_db_url) == every_version
        await ingest(first, EVENTS, WORKER_EVENTS)
        await first.aclose()

        again = open_storage(empty_db_url)
        await again.open()
        try:
            assert await again.migrate() == []
            assert applied_versions(empty_db_url) == every_version
            for job_id, events in JOBS.items():
                assert await again.get_job(job_id) == rebuilt(events)
            assert len(await again.list_workers()) == len({w.hostname for w in WORKER_EVENTS})
            await again.ping()
        finally:
            await again.aclose()


async def test_text_search_pages_the_same_from_recent_rows_or_from_the_index(
    storage: Storage,
) -> None:
    """A term common among the newest jobs is found by reading them; a rare one by the index."""
    assert isinstance(storage, SharedSql)
    storage.recent_rows = 4
    with trio.fail_after(30):
        events = []
        for i in range(30):
            args = f"('Common-{i}',)" if i % 2 else "('other',)"
            if i == 0:
                args = "('rare-term',)"
            if i in (2, 29):  # LIKE's wildcards are plain characters to a search
                args = args[:-3] + " snake_case 100%',)"
            events += lifecycle(f"job-{i:02}", T0 + i, args=args)
        await ingest(storage, events)
        newest_first = [f"job-{i:02}" for i in reversed(range(30))]
        for q, matches in (
            ("common", [j for j in newest_first if int(j[4:]) % 2]),
            ("rare-term", ["job-00"]),
            ("job-0", [f"job-0{i}" for i in reversed(range(10))]),  # an id prefix
            ("no-such", []),
            ("E_c", ["job-29", "job-02"]),
            ("100%", ["job-29", "job-02"]),
            ("e%c", []),
        ):
            for limit in (1, 3, 50):
                found = await all_pages(storage, JobQuery(q=q, limit=limit))
                assert found == matches, (q, limit)


async def test_sqlite_events_stored_before_0004_keep_their_timeline_and_dedupe(
    sqlite_url: str,
) -> None:
    """Migration 0004 moves events from the id-keyed table into the job-clustered one."""
    path = sqlite_url.removeprefix("sqlite:///")
    events = lifecycle("old-job", T0, JobState.FAILED, exception="KeyError('k')")
    job = rebuilt(events)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
        for version, sql in migrations("sqlite"):
            if version < 4:
                conn.executescript(sql)
                conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (version,))
        # The row as it was then, without the column migration 0008 added.
        then = common.JOB_COLUMNS[: common.JOB_COLUMNS.index("fold_sources")]
        conn.execute(
            f"INSERT INTO jobs ({common.cols(then)}) VALUES ({', '.join('?' * len(then))})",
            common.job_to_row(job)[: len(then)],
        )
        conn.executemany(
            f"INSERT INTO job_events ({common.cols(common.EVENT_COLUMNS)})"
            f" VALUES ({', '.join('?' * len(common.EVENT_COLUMNS))})",
            map(common.event_to_row, events),
        )
        # As ingest before 0004 indexed a job for search.
        conn.execute("INSERT INTO job_search (rowid, text) SELECT seq, text FROM job_search_text")
    storage = open_storage(sqlite_url)
    with trio.fail_after(30):
        assert 4 in await storage.open()
        try:
            assert await storage.job_events("old-job") == sorted(events, key=merge.sort_key)
            assert (await ingest(storage, events)).events_stored == 0
            late = attrs.evolve(events[-1], id=event_id("old-job", "late"), timestamp=T0 - 1)
            assert (await ingest(storage, [late])).events_stored == 1
            assert await storage.get_job("old-job") == rebuilt([*events, late])
            new = lifecycle("new-job", T0 + 5)
            await ingest(storage, new)
            page = await storage.list_jobs(JobQuery())
            assert [j.id for j in page.jobs] == ["new-job", "old-job"]
            assert [j.id for j in (await storage.list_jobs(JobQuery(q="KeyError"))).jobs] == [
                "old-job"
            ]
        finally:
            await storage.aclose()


async def test_postgresql_reconnects_after_its_connections_are_terminated(pg_url: str) -> None:
    storage = open_storage(pg_url)
    dbname = pg_url.rsplit("/", 1)[1]
    with trio.fail_after(30):
        await storage.open()
        try:
            await ingest(storage, lifecycle("before", T0))
            with psycopg.connect(PG_URL, autocommit=True) as admin:
                killed = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = %s",
                    (dbname,),
                ).fetchone()
            assert killed is not None and killed[0] >= 1
            result = await ingest(storage, lifecycle("after", T0 + 1))
            assert result.events_stored == 4
            assert [j.id for j in (await storage.list_jobs(JobQuery())).jobs] == ["after", "before"]
            await storage.ping()
        finally:
            await storage.aclose()


async def test_postgresql_reads_on_connections_the_server_ended_are_asked_again(
    pg_url: str,
) -> None:
    # Reads are lent connections unchecked (PostgresStorage._check): one that finds its
    # connection dead is asked again on a checked one, and answers.
    storage = open_storage(pg_url)
    dbname = pg_url.rsplit("/", 1)[1]
    with trio.fail_after(30):
        await storage.open()
        try:
            await ingest(storage, lifecycle("before", T0))
            for _ in range(3):
                with psycopg.connect(PG_URL, autocommit=True) as admin:
                    admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = %s",
                        (dbname,),
                    )
                assert [j.id for j in (await storage.list_jobs(JobQuery())).jobs] == ["before"]
                assert await storage.get_job("before") is not None
        finally:
            await storage.aclose()


def test_backends_are_chosen_by_url_scheme_and_hide_passwords(tmp_path: Path) -> None:
    pm = PluginManager()
    assert type(pm.storage(Config(db=f"sqlite:///{tmp_path}/x.db"))).__name__ == "SQLiteStorage"
    for url in ("postgresql://sluice:s3cret@db:5432/sluice", "postgres://sluice:s3cret@db/sluice"):
        backend = pm.storage(Config(db=url))
        assert type(backend).__name__ == "PostgresStorage"
        assert "s3cret" not in backend.url and "sluice:***@db" in backend.url
    with pytest.raises(ConfigError, match="no storage backend"):
        pm.storage(Config(db="mysql://db/sluice"))
    with pytest.raises(ConfigError, match="SQLite URL"):
        pm.storage(Config(db="sqlite://"))


async def test_two_agents_writing_the_same_jobs_at_once_agree(pg_url: str) -> None:
    """An HA pair on one PostgreSQL: both read the same broker, each sees part of the events."""
    agents = [open_storage(pg_url), open_storage(pg_url)]
    with trio.fail_after(60):
        for agent in agents:
            await agent.open()
        try:
            for round_ in range(5):
                jobs = {
                    f"ha-{round_}-{i:03}": lifecycle(f"ha-{round_}-{i:03}", T0 + i)
                    for i in range(100)
                }
                # Each agent stores its own events of every new job in one batch, both
                # at once: one of them finds the jobs created meanwhile by the other.
                # (A shared event would make the second wait for the first to commit.)
                halves: list[list[JobEvent]] = [[], []]
                for evs in jobs.values():
                    halves[0] += evs[:2]
                    halves[1] += evs[2:]
                async with trio.open_nursery() as nursery:
                    for agent, half in zip(agents, halves, strict=True):
                        nursery.start_soon(agent.ingest, half, [])
                for job_id, evs in jobs.items():
                    assert await agents[round_ % 2].get_job(job_id) == rebuilt(evs)
                # Each raced job was counted once: by the writer that rebuilt it.
                await assert_counts_from_scratch(agents[round_ % 2], T0 - 60)
        finally:
            for agent in agents:
                await agent.aclose()


def test_postgresql_asks_its_trigram_index_for_the_rarest_part_of_the_text() -> None:
    from sluice_storage.postgres import INDEXED_CHARS, TrigramSample

    texts = [f"tasks.send (user{n}@example.com,) {{}}" for n in range(1_000)]
    sample = TrigramSample.of(texts, taken_at=0.0)
    part = sample.rarest_part("user999750.c9@example.com")
    assert len(part) == INDEXED_CHARS
    assert part in "user999750.c9@example.com"
    # Every sampled job has "user" and "@example.com": the part avoids both.
    assert "use" not in part.lower() and "exa" not in part.lower()
    assert sample.rarest_part("short") == "short"


async def test_postgresql_reads_a_past_time_window_whole_instead_of_walking_to_it(
    pg_url: str,
) -> None:
    from sluice_storage.postgres import PostgresStorage

    storage = open_storage(pg_url)
    assert isinstance(storage, PostgresStorage)
    await storage.open()
    try:
        minutes = 2_000  # a job a minute
        events = [e for i in range(minutes) for e in lifecycle(f"w-{i:04}", T0 + 60 * i)]
        await ingest(storage, events)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("ANALYZE jobs")  # what autovacuum does as a table grows
            decide = functools.partial(storage._window_first, conn)
            # Half an hour at the start: every newer job stands before it, newest first.
            old = JobQuery(since=T0, until=T0 + 60 * 29.5)
            assert decide(old)
            # The last half hour, or everything since a moment: the walk starts in it.
            assert not decide(JobQuery(since=T0 + 60 * (minutes - 30), until=T0 + 60 * minutes))
            assert not decide(JobQuery(since=T0 + 60 * 100))
        page = await storage.list_jobs(attrs.evolve(old, limit=10))
        assert [job.id for job in page.jobs] == [f"w-{i:04}" for i in range(29, 19, -1)]
        rest = await storage.list_jobs(attrs.evolve(old, limit=50, cursor=page.next_cursor))
        assert [job.id for job in rest.jobs] == [f"w-{i:04}" for i in range(19, -1, -1)]
    finally:
        await storage.aclose()

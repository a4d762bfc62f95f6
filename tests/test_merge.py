"""The fold's merging rules (docs/plugins.md, the model) over real captured Celery events.

The events are the captured Redis traffic in tests/fixtures/celery-5.7,
decoded by the Celery plugin's own normalizer, so the sequences are what a real
worker and producer send: a retry, a revoke, failures, jobs seen only as sent.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice_core import merge
from sluice_core.model import TERMINAL_STATES, Job, JobEvent, JobState
from tests.fixtures.storage import (
    RETRIED,
    by_job,
    celery_fixture_events,
    open_storage,
)

EVENTS, _ = celery_fixture_events()
JOBS = by_job(EVENTS)


def rebuild_all(events: Sequence[JobEvent]) -> dict[str, Job]:
    return {
        job_id: merge.rebuild(job_id, evs[0].framework, evs)
        for job_id, evs in by_job(list(events)).items()
    }


@st.composite
def deliveries(draw: st.DrawFn, events: list[JobEvent]) -> list[list[JobEvent]]:
    """The events as a broker may deliver them: any order, some twice, in batches."""
    stream = list(draw(st.permutations(events)))
    for again in draw(st.lists(st.sampled_from(events), max_size=len(events) // 2)):
        stream.insert(draw(st.integers(0, len(stream))), again)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def fold_incrementally(batches: list[list[JobEvent]]) -> tuple[dict[str, Job], set[str]]:
    """What storage does per batch: fold new events in order, or rebuild from the history.

    Returns the rows and which paths were taken ("fast", "slow").
    """
    seen: dict[str, dict[str, JobEvent]] = {}
    rows: dict[str, Job] = {}
    paths: set[str] = set()
    for batch in batches:
        fresh: dict[str, list[JobEvent]] = {}
        for event in batch:
            history = seen.setdefault(event.job_id, {})
            if event.id not in history:
                history[event.id] = event
                fresh.setdefault(event.job_id, []).append(event)
        for job_id, events in fresh.items():
            events.sort(key=merge.sort_key)
            row = rows.get(job_id)
            if row is not None and merge.applies_in_order(row, events):
                merge.fold(row, events)
                paths.add("fast")
            else:
                rows[job_id] = merge.rebuild(job_id, "celery", seen[job_id].values())
                paths.add("slow" if row is not None else "new")
    return rows, paths


@given(job_id=st.sampled_from(sorted(JOBS)), data=st.data())
def test_row_is_a_function_of_the_event_set(job_id: str, data: st.DataObject) -> None:
    events = JOBS[job_id]
    shuffled = data.draw(st.permutations(events))
    duplicated = shuffled + data.draw(st.lists(st.sampled_from(events), max_size=5))
    assert merge.rebuild(job_id, "celery", duplicated) == merge.rebuild(job_id, "celery", events)


@settings(max_examples=200)
@given(batches=deliveries(EVENTS))
def test_incremental_fold_equals_rebuild(batches: list[list[JobEvent]]) -> None:
    rows, _ = fold_incrementally(batches)
    assert rows == rebuild_all(EVENTS)


def test_in_order_events_take_the_fast_path_and_late_ones_the_slow_path() -> None:
    events = sorted(JOBS[RETRIED], key=merge.sort_key)
    _, paths = fold_incrementally([[event] for event in events])
    assert paths == {"new", "fast"}
    _, paths = fold_incrementally([[event] for event in reversed(events)])
    assert "slow" in paths


FINISHED = [j for j, e in JOBS.items() if merge.rebuild(j, "celery", e).state in TERMINAL_STATES]


@pytest.mark.parametrize("job_id", FINISHED)
def test_terminal_state_survives_earlier_stamped_late_events(job_id: str) -> None:
    events = sorted(JOBS[job_id], key=merge.sort_key)
    final = merge.rebuild(job_id, "celery", events)
    terminal = [e for e in events if e.state in TERMINAL_STATES]
    earlier = [e for e in events if e.state not in TERMINAL_STATES]
    # The outcome first, then every earlier-stamped event, one late batch at a time.
    rows, _ = fold_incrementally([terminal, *([e] for e in reversed(earlier))])
    assert rows[job_id].state == final.state
    assert rows[job_id].finished_at == final.finished_at
    assert rows[job_id] == final


def test_a_retry_counts_and_keeps_both_attempts() -> None:
    events = JOBS[RETRIED]
    job = merge.rebuild(RETRIED, "celery", events)
    assert job.state is JobState.COMPLETED
    assert job.retries == 1
    types = sorted(e.type for e in events)
    # Both attempts: two received and two started, the retry between them.
    assert types.count("task-received") == 2 and types.count("task-started") == 2
    assert "task-retried" in types


def _suffixed(events: list[JobEvent], suffix: str) -> list[JobEvent]:
    """The same events for other job ids, so examples share one database."""
    return [attrs.evolve(e, id=e.id + suffix, job_id=e.job_id + suffix) for e in events]


async def _ingest_through(url: str, batches: list[list[JobEvent]]) -> dict[str, Job | None]:
    storage = open_storage(url)
    with trio.fail_after(30):
        await storage.open()
        try:
            for batch in batches:
                await storage.ingest(batch, [])
            job_ids = {event.job_id for batch in batches for event in batch}
            return {job_id: await storage.get_job(job_id) for job_id in job_ids}
        finally:
            await storage.aclose()


def _check_backend(url: str, batches: list[list[JobEvent]]) -> None:
    suffix = "-" + uuid.uuid4().hex[:8]
    batches = [_suffixed(batch, suffix) for batch in batches]
    stored = trio.run(_ingest_through, url, batches)
    assert stored == rebuild_all(_suffixed(EVENTS, suffix))


# One database for all examples: each example uses job ids of its own.
ONE_DB = [HealthCheck.function_scoped_fixture]


@settings(max_examples=25, deadline=None, suppress_health_check=ONE_DB)
@given(batches=deliveries(EVENTS))
def test_incremental_ingest_into_sqlite_equals_rebuild(
    sqlite_url: str, batches: list[list[JobEvent]]
) -> None:
    _check_backend(sqlite_url, batches)


@settings(max_examples=8, deadline=None, suppress_health_check=ONE_DB)
@given(batches=deliveries(EVENTS))
def test_incremental_ingest_into_postgresql_equals_rebuild(
    pg_url: str, batches: list[list[JobEvent]]
) -> None:
    _check_backend(pg_url, batches)


def test_a_run_stamped_after_the_next_attempts_receipt_still_counts_once() -> None:
    """Seen on a real RabbitMQ worker: attempt 1's task-started is stamped after the
    task-received of attempt 2 (the worker's processes stamp events on their own)."""
    steps = [
        ("task-sent", JobState.QUEUED, 0),
        ("task-received", JobState.RECEIVED, 0),
        ("task-started", JobState.ACTIVE, None),
        ("task-sent", JobState.QUEUED, 1),
        ("task-received", JobState.SCHEDULED, 1),
        ("task-retried", JobState.RETRYING, None),
        ("task-sent", JobState.QUEUED, 2),
        ("task-received", JobState.SCHEDULED, 2),
        ("task-started", JobState.ACTIVE, None),  # attempt 1's run, stamped late
        ("task-retried", JobState.RETRYING, None),
        ("task-started", JobState.ACTIVE, None),
        ("task-succeeded", JobState.COMPLETED, None),
    ]
    events = [
        JobEvent(
            id=f"e{i:02d}", job_id="j", framework="celery", type=kind, state=state,
            timestamp=1_000.0 + i * 0.001,
            fields={} if retries is None else {"retries": retries},
        )
        for i, (kind, state, retries) in enumerate(steps)
    ]
    row = merge.rebuild("j", "celery", events)
    assert (row.state, row.retries) == (JobState.COMPLETED, 2)


def test_the_job_is_held_by_the_worker_of_its_current_attempt() -> None:
    """w1 runs attempt 0 and retries it; w2 receives attempt 1 (an ETA) and stamps its
    task-received before w1 stamps task-retried. The job is held by w2, whatever the
    order the events come in: w1's death must not lose it, w2's must."""
    steps = [
        ("task-sent", JobState.QUEUED, 0, None),
        ("task-received", JobState.RECEIVED, 0, "w1"),
        ("task-started", JobState.ACTIVE, None, "w1"),
        ("task-sent", JobState.QUEUED, 1, None),
        ("task-received", JobState.SCHEDULED, 1, "w2"),
        ("task-retried", JobState.RETRYING, None, "w1"),
    ]
    events = [
        JobEvent(
            id=f"e{i:02d}", job_id="j", framework="celery", type=kind, state=state,
            timestamp=1_000.0 + i * 0.001, worker=worker,
            fields={} if retries is None else {"retries": retries},
        )
        for i, (kind, state, retries, worker) in enumerate(steps)
    ]
    for order in itertools.permutations(events):
        row = merge.rebuild("j", "celery", order)
        assert (row.state, row.retries, row.worker) == (JobState.SCHEDULED, 1, "w2")
    # Until an attempt's worker is known, the job shows the last one that ran it.
    row = merge.rebuild("j", "celery", events[:3] + events[5:])
    assert (row.state, row.worker) == (JobState.RETRYING, "w1")

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
from sluice_core.actions import PUSHED_BY
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


def _check_backend(
    url: str, batches: list[list[JobEvent]], events: Sequence[JobEvent] = EVENTS
) -> None:
    suffix = "-" + uuid.uuid4().hex[:8]
    batches = [_suffixed(batch, suffix) for batch in batches]
    stored = trio.run(_ingest_through, url, batches)
    assert stored == rebuild_all(_suffixed(list(events), suffix))


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


# -- one happening, two sources --------------------------------------------------------


def _reported_again(
    events: Sequence[JobEvent], jitters: Sequence[float], key: str = "billing-app"
) -> list[JobEvent]:
    """The same happenings as another source reports them (the SDK beside a worker's -E):
    its own ids, its own stamps a little apart, pushed with an API key."""
    return [
        attrs.evolve(
            event,
            id=f"{event.id}-{key}",
            timestamp=event.timestamp + jitter,
            extra={**event.extra, PUSHED_BY: key},
        )
        for event, jitter in zip(events, itertools.cycle(jitters), strict=False)
    ]


def _stages(job: Job) -> tuple[object, ...]:
    return (job.state, job.retries, job.worker, job.name, job.queue, job.result)


JITTERS = st.lists(st.floats(-0.2, 0.2), min_size=1, max_size=8)


@settings(max_examples=100)
@given(job_id=st.sampled_from(sorted(JOBS)), jitters=JITTERS)
def test_two_sources_of_one_job_make_one_timeline(job_id: str, jitters: list[float]) -> None:
    broker = JOBS[job_id]
    both = broker + _reported_again(broker, jitters)
    shown = merge.timeline(both)
    assert sorted(e.type for e in shown) == sorted(e.type for e in broker)


@settings(max_examples=100)
@given(job_id=st.sampled_from(sorted(JOBS)), jitters=st.lists(st.floats(0, 0.2), min_size=1))
def test_a_second_source_changes_no_stage_of_the_row(job_id: str, jitters: list[float]) -> None:
    """The SDK stamping each happening after the broker (merged events keep the
    earliest stamp): the row is the broker's, plus what the SDK adds."""
    broker = JOBS[job_id]
    both = broker + _reported_again(broker, jitters)
    shown = merge.timeline(both)
    # Every happening holds both reports: the broker's fields and the SDK's key.
    assert all(e.extra.get(PUSHED_BY) == "billing-app" for e in shown if e.state is not None)
    assert _stages(merge.rebuild(job_id, "celery", both)) == _stages(
        merge.rebuild(job_id, "celery", broker)
    )


def test_a_retry_reported_by_two_sources_is_one_retry() -> None:
    broker = JOBS[RETRIED]
    row = merge.rebuild(RETRIED, "celery", broker + _reported_again(broker, [0.003, -0.002]))
    assert (row.state, row.retries) == (JobState.COMPLETED, 1)


@settings(max_examples=150)
@given(jitters=JITTERS, data=st.data())
def test_two_sources_fold_incrementally_as_they_rebuild(
    jitters: list[float], data: st.DataObject
) -> None:
    # Some of the SDK's reports missing (a buffer dropped, a process killed before it sent).
    sdk = [
        e for e in _reported_again(EVENTS, jitters) if data.draw(st.booleans(), label=e.type)
    ]
    batches = data.draw(deliveries(EVENTS + sdk))
    rows, _ = fold_incrementally(batches)
    assert rows == rebuild_all(EVENTS + sdk)


def _event(
    i: int, kind: str, state: JobState, at: float, *, worker: str | None = "w1",
    key: str | None = None, **fields: object,
) -> JobEvent:
    return JobEvent(
        id=f"e{i:02d}{key or ''}", job_id="j", framework="celery", type=kind, state=state,
        timestamp=at, worker=worker, fields=dict(fields),
        extra={} if key is None else {PUSHED_BY: key},
    )


@pytest.mark.parametrize("sdk_saw_the_first", [True, False])
def test_a_redelivery_to_the_same_worker_stays_two_deliveries(sdk_saw_the_first: bool) -> None:
    """w1 restarts under the same name and gets the job again 2 s later: two receipts,
    two starts, whichever reports of them the SDK got out before the kill."""
    broker = [
        _event(0, "task-received", JobState.RECEIVED, 100.0, retries=0),
        _event(1, "task-started", JobState.ACTIVE, 100.01),
        _event(2, "task-received", JobState.RECEIVED, 102.0, retries=0),
        _event(3, "task-started", JobState.ACTIVE, 102.01),
        _event(4, "task-succeeded", JobState.COMPLETED, 102.5, result="1"),
    ]
    sdk = _reported_again(broker, [0.002, -0.001])
    if not sdk_saw_the_first:
        sdk = sdk[2:]
    shown = [(e.type, round(e.timestamp)) for e in merge.timeline(broker + sdk)]
    assert shown == [
        ("task-received", 100), ("task-started", 100), ("task-received", 102),
        ("task-started", 102), ("task-succeeded", 102),
    ]


def test_one_source_is_never_merged_with_itself() -> None:
    """A requeue hands the job back to the same worker at once: two receipts a few ms
    apart from the one broker are two happenings."""
    events = [
        _event(0, "task-received", JobState.RECEIVED, 100.0, retries=0),
        _event(1, "task-rejected", JobState.REJECTED, 100.001),
        _event(2, "task-received", JobState.RECEIVED, 100.002, retries=0),
    ]
    assert merge.timeline(events) == events


def test_reports_too_far_apart_or_of_other_attempts_stay_apart() -> None:
    events = [
        _event(0, "task-received", JobState.RECEIVED, 100.0, retries=0),
        _event(1, "task-received", JobState.RECEIVED, 100.0 + merge.SAME_HAPPENING_S + 1,
               key="sdk", retries=0),
        _event(2, "task-received", JobState.RECEIVED, 300.0, retries=1),
        _event(3, "task-received", JobState.RECEIVED, 300.01, key="sdk", retries=2),
        _event(4, "task-received", JobState.RECEIVED, 400.0, worker="w2", retries=3),
        _event(5, "task-received", JobState.RECEIVED, 400.01, key="sdk", retries=3),
    ]
    assert len(merge.timeline(events)) == 6


FULL_KWARGS = "{'blob': '" + "x" * 3000 + "'}"
CUT_KWARGS = FULL_KWARGS[:1020] + "...'}"


@pytest.mark.parametrize("sdk_first", [True, False])
def test_complete_arguments_win_over_a_cut_repr_whatever_the_order(sdk_first: bool) -> None:
    broker = _event(0, "task-received", JobState.RECEIVED, 100.0, retries=0,
                    args="()", kwargs=CUT_KWARGS)
    sdk = attrs.evolve(
        _event(1, "task-received", JobState.RECEIVED, 100.0 + (-0.01 if sdk_first else 0.01),
               key="sdk", retries=0, args="()", kwargs=FULL_KWARGS),
        extra={PUSHED_BY: "sdk", merge.ARGS_COMPLETE: True},
    )
    # A later event carrying the cut repr again (a redelivery, say) does not undo them.
    later = _event(2, "task-received", JobState.RECEIVED, 200.0, retries=0,
                   args="()", kwargs=CUT_KWARGS)
    for events in itertools.permutations([broker, sdk, later]):
        row = merge.rebuild("j", "celery", events)
        assert row.kwargs == FULL_KWARGS
    (shown, *_) = merge.timeline([broker, sdk])
    assert shown.fields["kwargs"] == FULL_KWARGS


# -- deliveries: a job its worker died holding is delivered again (issue 17, item 5) ------

D = 1_000.0  # when the monitor concluded w1 was gone


def _delivery(
    n: str, kind: str, state: JobState, ts: float, worker: str | None, **fields: object
) -> JobEvent:
    return JobEvent(
        id=n, job_id="j", framework="celery", type=kind, state=state, timestamp=ts,
        worker=worker, fields=dict(fields),
    )


def _redelivered_after_start(w2_at: float) -> list[JobEvent]:
    """w1 starts the job (acks_late) and dies; the monitor concludes lost at D; the
    broker gives it to w2, which receives, runs and completes it from ``w2_at``."""
    return [
        _delivery("a-sent", "task-sent", JobState.QUEUED, D - 10, None, retries=0),
        _delivery("b-recv1", "task-received", JobState.RECEIVED, D - 9, "w1", retries=0),
        _delivery("c-start1", "task-started", JobState.ACTIVE, D - 8.5, "w1"),
        _delivery("d-lost", merge.LOST_EVENT, JobState.LOST, D, "w1",
               exception="WorkerLost: w1 died", retries=0),
        _delivery("e-recv2", "task-received", JobState.RECEIVED, w2_at, "w2", retries=0),
        _delivery("f-start2", "task-started", JobState.ACTIVE, w2_at + 0.1, "w2"),
        _delivery("g-done2", "task-succeeded", JobState.COMPLETED, w2_at + 0.2, "w2", runtime=0.1),
    ]


def _redelivered_unstarted(w2_at: float) -> list[JobEvent]:
    """w1 holds the job prefetched and dies; w2 receives it again and completes it."""
    return [
        _delivery("a-sent", "task-sent", JobState.QUEUED, D - 10, None, retries=0),
        _delivery("b-recv1", "task-received", JobState.RECEIVED, D - 9, "w1", retries=0),
        _delivery("d-redeliver", merge.REDELIVERY_EVENT, JobState.REDELIVERING, D, "w1",
               exception="WorkerLost: w1 died", retries=0),
        _delivery("e-recv2", "task-received", JobState.RECEIVED, w2_at, "w2", retries=0),
        _delivery("f-start2", "task-started", JobState.ACTIVE, w2_at + 0.1, "w2"),
        _delivery("g-done2", "task-succeeded", JobState.COMPLETED, w2_at + 0.2, "w2", runtime=0.1),
    ]


# w2 after the conclusion (Redis, after the visibility timeout), or before it, even
# before w1's last event would have been (RabbitMQ requeues at once).
W2_TIMES = [D + 30, D - 5, D - 8.4]


@pytest.mark.parametrize("w2_at", W2_TIMES)
@pytest.mark.parametrize("story", [_redelivered_after_start, _redelivered_unstarted])
def test_a_redelivered_job_resumes_and_completes_on_the_next_worker(
    story: object, w2_at: float
) -> None:
    events = story(w2_at)  # type: ignore[operator]
    final = merge.rebuild("j", "celery", events)
    assert (final.state, final.worker, final.retries) == (JobState.COMPLETED, "w2", 0)
    assert final.exception is None and final.runtime == pytest.approx(0.1)
    for order in itertools.permutations(events):
        assert merge.rebuild("j", "celery", order) == final


@pytest.mark.parametrize("story", [_redelivered_after_start, _redelivered_unstarted])
def test_the_job_waits_between_the_conclusion_and_the_next_delivery(story: object) -> None:
    events = [e for e in story(D + 30) if e.worker != "w2"]  # type: ignore[operator]
    row = merge.rebuild("j", "celery", events)
    waiting = JobState.LOST if story is _redelivered_after_start else JobState.REDELIVERING
    assert (row.state, row.worker) == (waiting, "w1")
    assert row.exception == "WorkerLost: w1 died"
    # The next delivery's receipt takes over: received by w2, nothing finished yet.
    row = merge.rebuild("j", "celery", story(D + 30)[:-2])  # type: ignore[operator]
    assert (row.state, row.worker, row.finished_at) == (JobState.RECEIVED, "w2", None)


def test_a_conclusion_overtaken_by_the_job_moves_nothing() -> None:
    """w1's task-succeeded, stamped before the conclusion, reaches Sluice after it: the
    job completed, it was not lost. And a conclusion about w1 leaves w2's job alone."""
    done = [
        _delivery("a-recv", "task-received", JobState.RECEIVED, D - 9, "w1", retries=0),
        _delivery("b-start", "task-started", JobState.ACTIVE, D - 8, "w1"),
        _delivery("c-done", "task-succeeded", JobState.COMPLETED, D - 1, "w1"),
        _delivery("d-lost", merge.LOST_EVENT, JobState.LOST, D, "w1", retries=0),
    ]
    assert merge.rebuild("j", "celery", done).state is JobState.COMPLETED
    elsewhere = [*done[:2], attrs.evolve(done[3], worker="w2")]
    assert merge.rebuild("j", "celery", elsewhere).state is JobState.ACTIVE
    # Nor does a conclusion about an attempt that is over.
    older = [*done[:2], attrs.evolve(done[3], fields={"retries": 1})]
    assert merge.rebuild("j", "celery", older).state is JobState.ACTIVE


def test_a_worker_lost_error_with_acks_late_is_received_again_and_resumes() -> None:
    """The pool child died (the worker's own task-failed: WorkerLostError, lost); with
    acks_late the broker gives the message again, and the job goes on."""
    events = [
        _delivery("a-recv", "task-received", JobState.RECEIVED, D, "w1", retries=0),
        _delivery("b-start", "task-started", JobState.ACTIVE, D + 1, "w1"),
        _delivery("c-lost", "task-failed", JobState.LOST, D + 2, "w1"),
        _delivery("d-recv", "task-received", JobState.RECEIVED, D + 3, "w1", retries=0),
        _delivery("e-start", "task-started", JobState.ACTIVE, D + 4, "w1"),
        _delivery("f-done", "task-succeeded", JobState.COMPLETED, D + 5, "w1"),
    ]
    assert merge.rebuild("j", "celery", events[:3]).state is JobState.LOST
    assert merge.rebuild("j", "celery", events[:4]).state is JobState.RECEIVED
    assert merge.rebuild("j", "celery", events).state is JobState.COMPLETED


REDELIVERED = [
    *_suffixed(_redelivered_after_start(D + 30), "-late"),
    *_suffixed(_redelivered_after_start(D - 5), "-quick"),
    *_suffixed(_redelivered_unstarted(D + 30), "-unstarted"),
    *_suffixed(_redelivered_unstarted(D - 8.4), "-unstarted-quick"),
]


@settings(max_examples=200)
@given(batches=deliveries(REDELIVERED))
def test_incremental_fold_of_redeliveries_equals_rebuild(batches: list[list[JobEvent]]) -> None:
    rows, _ = fold_incrementally(batches)
    assert rows == rebuild_all(REDELIVERED)


@settings(max_examples=15, deadline=None, suppress_health_check=ONE_DB)
@given(batches=deliveries(REDELIVERED))
def test_deliveries_survive_storage(sqlite_url: str, batches: list[list[JobEvent]]) -> None:
    """The delivery is stored with the rank (storage packs them in one column): a row
    read back folds later events as the one in memory would."""
    suffix = "-" + uuid.uuid4().hex[:8]
    stored = trio.run(_ingest_through, sqlite_url, [_suffixed(b, suffix) for b in batches])
    assert stored == rebuild_all(_suffixed(REDELIVERED, suffix))


@pytest.mark.parametrize("packed", range(-1, 45))
def test_a_packed_rank_reads_back(packed: int) -> None:
    delivery, rank = merge.unpack_rank(packed)
    assert -1 <= rank <= 8 and merge.pack_rank(delivery, rank) == packed
    # Rows stored before deliveries were counted hold ranks -1 to 4: delivery 0.
    assert delivery == 0 or packed > 4


def test_one_source_folds_incrementally_and_two_rebuild() -> None:
    """The SDK alone (or a remote agent) is one source, like the broker alone: its
    in-order events are applied to the row. A second source's make it a rebuild."""
    sdk = sorted(_reported_again(JOBS[RETRIED], [0.0]), key=merge.sort_key)
    _, paths = fold_incrementally([[event] for event in sdk])
    assert paths == {"new", "fast"}
    broker = sorted(JOBS[RETRIED], key=merge.sort_key)
    _, paths = fold_incrementally([[broker[0]], *([event] for event in sdk)])
    assert paths == {"new", "slow"}


def test_a_row_stored_before_its_sources_were_kept_is_rebuilt_once() -> None:
    events = sorted(JOBS[RETRIED], key=merge.sort_key)
    row = merge.rebuild(RETRIED, "celery", events[:2])
    assert row.fold_sources == ("",)
    old = attrs.evolve(row, fold_sources=None)
    assert not merge.applies_in_order(old, events[2:3])
    assert merge.rebuild(RETRIED, "celery", events).fold_sources == ("",)


BOTH = EVENTS + _reported_again(EVENTS, [0.004, -0.003, 0.0])


@settings(max_examples=15, deadline=None, suppress_health_check=ONE_DB)
@given(batches=deliveries(BOTH))
def test_two_sources_ingest_into_sqlite_as_they_rebuild(
    sqlite_url: str, batches: list[list[JobEvent]]
) -> None:
    _check_backend(sqlite_url, batches, BOTH)


@settings(max_examples=5, deadline=None, suppress_health_check=ONE_DB)
@given(batches=deliveries(BOTH))
def test_two_sources_ingest_into_postgresql_as_they_rebuild(
    pg_url: str, batches: list[list[JobEvent]]
) -> None:
    _check_backend(pg_url, batches, BOTH)


@st.composite
def with_conclusions(draw: st.DrawFn) -> list[JobEvent]:
    """A captured job's events and conclusions of the monitor about it, drawn anywhere in
    its life, about any of its workers and attempts: what arrives when Sluice judged
    early, late, or wrongly."""
    job_id = draw(st.sampled_from(sorted(JOBS)))
    # Its life so far: a job still held is what conclusions are about.
    events = sorted(JOBS[job_id], key=merge.sort_key)
    events = events[: draw(st.integers(1, len(events)))]
    first, last = events[0].timestamp, events[-1].timestamp
    workers = sorted({e.worker for e in events if e.worker is not None}) or ["w"]
    kinds = [
        (merge.LOST_EVENT, JobState.LOST),
        (merge.REDELIVERY_EVENT, JobState.REDELIVERING),
        (merge.UNSEEN_EVENT, JobState.UNKNOWN),
    ]
    conclusions = []
    for n in range(draw(st.integers(0, 3))):
        kind, state = draw(st.sampled_from(kinds))
        conclusions.append(
            JobEvent(
                id=f"conclusion-{n}", job_id=job_id, framework="celery", type=kind,
                state=state, timestamp=draw(st.floats(first - 1, last + 1)),
                worker=None if kind == merge.UNSEEN_EVENT else draw(st.sampled_from(workers)),
                fields={"exception": "why", "retries": draw(st.integers(0, 2))},
            )
        )
    return events + conclusions


@settings(max_examples=200)
@given(events=with_conclusions(), data=st.data())
def test_conclusions_anywhere_keep_the_row_a_function_of_the_event_set(
    events: list[JobEvent], data: st.DataObject
) -> None:
    job_id = events[0].job_id
    final = merge.rebuild(job_id, "celery", events)
    assert merge.rebuild(job_id, "celery", data.draw(st.permutations(events))) == final
    rows, _ = fold_incrementally(data.draw(deliveries(events)))
    assert rows[job_id] == final

"""The live bus: windows that coalesce each job's updates, shared by every subscriber;
resumable for a while after the last client leaves, then cheap."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sluice_core.bus import RESUME_GRACE_S, WINDOW_S, Batch, Bus, Gap
from sluice_core.model import Job, JobState


def job(job_id: str, state: JobState = JobState.QUEUED, created_at: float = 0.0) -> Job:
    return Job(id=job_id, framework="celery", state=state, created_at=created_at)


def rows(batch: Batch) -> list[tuple[str, str, bool]]:
    """A batch's job messages as (id, state, stored for the first time)."""
    return [(m.data["id"], m.data["state"], m.new) for m in batch.messages if m.kind == "job"]


async def test_a_client_that_left_recently_can_resume(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = Bus()
    assert not bus.wanted  # nobody ever listened: nothing to build
    with bus.subscribe():
        bus.publish_jobs([job("a")], new=1)
        assert bus.wanted
    await trio.sleep(RESUME_GRACE_S / 2)
    assert bus.wanted
    bus.publish_jobs([job("b")], new=1)
    assert rows(await bus.next_batch(1)) == [("b", "queued", True)]


async def test_after_the_grace_period_messages_are_skipped_and_resumers_resync(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = Bus()
    with bus.subscribe():
        bus.publish_jobs([job("a")], new=1)
    await trio.sleep(RESUME_GRACE_S + 1)
    assert not bus.wanted
    bus.skip(3)
    assert bus.last_id == 4
    with pytest.raises(Gap):  # what it missed was never built: reload
        await bus.next_batch(1)


async def test_a_rendered_page_resumes_from_its_render_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = Bus()
    await trio.sleep(RESUME_GRACE_S + 1)
    rendered_at = bus.expect_subscriber()
    assert bus.wanted  # messages are built until the page subscribes
    bus.publish_jobs([job("between render and subscribe")], new=1)
    assert rows(await bus.next_batch(rendered_at)) == [
        ("between render and subscribe", "queued", True)
    ]


async def test_a_window_holds_the_latest_state_of_each_job(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = Bus()
    start = trio.current_time()
    # After a quiet spell a job goes out at once.
    bus.publish_jobs([job("a", created_at=1.0)], new=1)
    first = await bus.next_batch(0)
    assert trio.current_time() == start
    assert rows(first) == [("a", "queued", True)]

    async def publish() -> None:
        await trio.sleep(0.05)
        bus.publish_jobs([job("b", created_at=2.0), job("a", JobState.ACTIVE, 1.0)], new=1)
        bus.publish("worker", {"hostname": "w1", "active": 1}, key="w1")
        await trio.sleep(0.1)
        bus.publish_jobs([job("a", JobState.COMPLETED, 1.0), job("b", JobState.ACTIVE, 2.0)])
        bus.publish("worker", {"hostname": "w1", "active": 2}, key="w1")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish)
        second = await bus.next_batch(first.last_id)
    # The next window closes one window after the first: everything since, coalesced.
    assert trio.current_time() == start + WINDOW_S
    assert [m.data for m in second.messages if m.kind == "worker"] == [
        {"hostname": "w1", "active": 2}
    ]
    # In the list's order, oldest first: a (updated) before b (stored in this window),
    # which stays new though its latest state came from an update.
    assert rows(second) == [("a", "completed", False), ("b", "active", True)]
    assert [m.id for m in second.messages] == [2, 3, 4]
    # Every subscriber that is up to date reads this same window.
    assert await bus.next_batch(first.last_id) is second


async def test_a_window_closed_early_reaches_a_waiting_subscriber_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A web replica's follower closes the window when its read is published.
    bus = Bus()
    bus.publish_jobs([job("a")], new=1)
    first = await bus.next_batch(0)
    start = trio.current_time()

    async def publish_then_close() -> None:
        bus.publish_jobs([job("b")], new=1)  # the subscriber now waits for this window
        await trio.sleep(0.01)
        bus.close_window()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish_then_close)
        second = await bus.next_batch(first.last_id)
    assert trio.current_time() == start + 0.01
    assert rows(second) == [("b", "queued", True)]


async def test_a_subscriber_behind_by_several_windows_gets_them_coalesced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = Bus()
    bus.publish_jobs([job("a"), job("b")], new=2)
    bus.close_window()
    bus.publish_jobs([job("a", JobState.ACTIVE)])
    bus.close_window()
    bus.publish_jobs([job("c"), job("a", JobState.COMPLETED)], new=1)
    bus.close_window()
    # From the start: each job once, where its latest message is, and still new.
    assert rows(await bus.next_batch(0)) == [
        ("b", "queued", True), ("a", "completed", True), ("c", "queued", True)
    ]
    # Resuming from within the first window: what came after that id only.
    assert rows(await bus.next_batch(1)) == [
        ("b", "queued", True), ("a", "completed", False), ("c", "queued", True)
    ]


async def test_a_subscriber_the_history_no_longer_reaches_must_resync(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = Bus(history=10)
    bus.publish_jobs([job(f"j{i}") for i in range(6)], new=6)
    bus.close_window()
    bus.publish_jobs([job(f"k{i}") for i in range(6)], new=6)
    bus.close_window()  # 12 kept messages > 10: the first window is forgotten
    with pytest.raises(Gap):
        await bus.next_batch(0)
    assert [m.id for m in (await bus.next_batch(6)).messages] == list(range(7, 13))

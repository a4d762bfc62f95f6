"""The live bus: resumable for a while after the last client leaves, then cheap."""

from __future__ import annotations

import trio
import trio.testing

from sluice_core.bus import RESUME_GRACE_S, Bus


async def test_a_client_that_left_recently_can_resume(autojump_clock: trio.testing.MockClock) -> None:
    bus = Bus()
    assert not bus.wanted  # nobody ever listened: nothing to build
    with bus.subscribe():
        bus.publish("job", {"id": "a"})
        assert bus.wanted
    await trio.sleep(RESUME_GRACE_S / 2)
    assert bus.wanted
    bus.publish("job", {"id": "b"})
    assert [m.data["id"] for m in bus.since(1) or []] == ["b"]


async def test_after_the_grace_period_messages_are_skipped_and_resumers_resync(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = Bus()
    with bus.subscribe():
        bus.publish("job", {"id": "a"})
    await trio.sleep(RESUME_GRACE_S + 1)
    assert not bus.wanted
    bus.skip(3)
    assert bus.last_id == 4
    assert bus.since(1) is None  # what it missed was never built: reload
    assert bus.since(4) == []


async def test_a_rendered_page_resumes_from_its_render_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = Bus()
    await trio.sleep(RESUME_GRACE_S + 1)
    rendered_at = bus.expect_subscriber()
    assert bus.wanted  # messages are built until the page subscribes
    bus.publish("job", {"id": "between render and subscribe"})
    assert [m.data["id"] for m in bus.since(rendered_at) or []] == [
        "between render and subscribe"
    ]

"""tests/waiting.py: the one way tests wait, with a deadline and a message that says why."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
import trio.testing

from tests.waiting import wait_until


async def test_returns_the_first_truthy_result_of_a_function_or_a_coroutine(
    autojump_clock: trio.testing.MockClock,
) -> None:
    values: Iterator[object] = iter([0, None, [], "ready"])
    assert await wait_until(lambda: next(values)) == "ready"

    async def job() -> dict[str, str] | None:
        await trio.sleep(1)
        return {"state": "done"} if trio.current_time() > 3 else None

    assert await wait_until(job) == {"state": "done"}


async def test_gives_up_at_its_deadline_saying_what_it_waited_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = {"rows": 2}
    started = trio.current_time()
    message = (r"gave up after 5 s waiting for tests/test_waiting\.py:\d+:"
               r" lambda: state\[\"rows\"\] == 3 \(last result: False\)")
    with pytest.raises(AssertionError, match=message):
        await wait_until(lambda: state["rows"] == 3, timeout=5)
    assert trio.current_time() - started == pytest.approx(5)
    with pytest.raises(AssertionError, match="waiting for the third row"):
        await wait_until(lambda: False, "the third row", timeout=1)


async def test_rechecks_when_told_of_a_change_instead_of_polling() -> None:
    changed = trio.Event()
    seen = []

    async def wait_changed() -> None:
        await changed.wait()

    def check() -> bool:
        seen.append(changed.is_set())
        return changed.is_set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: wait_until(check, changed=wait_changed, timeout=5))
        await trio.testing.wait_all_tasks_blocked()
        changed.set()
    assert seen == [False, True]  # once at first, once on the change: no polling between

"""Waiting in tests: for the state that proves something happened, never for a fixed time.

A test that sleeps and then asserts is a race on a loaded machine; one that
waits for the proof runs as fast as the machine allows. Every wait in the
tests goes through :func:`wait_until`, which gives up after a deadline and says
what it was waiting for.
"""

from __future__ import annotations

import functools
import inspect
import linecache
from collections.abc import Awaitable, Callable
from typing import Any, overload

import trio

TIMEOUT = 30.0  # seconds: a real worker or broker on a busy two-core machine
POLL = 0.05


@overload
async def wait_until[T](
    check: Callable[[], Awaitable[T]],
    what: str | None = None,
    *,
    timeout: float = TIMEOUT,
    poll: float = POLL,
    changed: Callable[[], Awaitable[object]] | None = None,
) -> T: ...
@overload
async def wait_until[T](
    check: Callable[[], T],
    what: str | None = None,
    *,
    timeout: float = TIMEOUT,
    poll: float = POLL,
    changed: Callable[[], Awaitable[object]] | None = None,
) -> T: ...
async def wait_until(
    check: Callable[[], Any],
    what: str | None = None,
    *,
    timeout: float = TIMEOUT,
    poll: float = POLL,
    changed: Callable[[], Awaitable[object]] | None = None,
) -> Any:
    """Return the first truthy result of ``check()`` (a function or a coroutine function).

    It is checked again every ``poll`` seconds, or, when ``changed`` is given, each time
    ``changed()`` returns (for state that signals its changes). After ``timeout`` seconds
    (of trio's clock: under ``autojump_clock`` a mock deadline) it fails with an
    AssertionError naming ``what`` was awaited (by default the source line of ``check``)
    and what ``check()`` last returned.
    """
    last: object = None
    with trio.move_on_after(timeout):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            last = result
            if changed is None:
                await trio.sleep(poll)
            else:
                await changed()
    raise AssertionError(
        f"gave up after {timeout:g} s waiting for {what or _describe(check)}"
        f" (last result: {last!r})"
    )


def _describe(check: Callable[[], object]) -> str:
    """Where ``check`` is written, and how: ``tests/test_x.py:12: lambda: ...``."""
    while isinstance(check, functools.partial):
        check = check.func
    code = getattr(check, "__code__", None)
    if code is None:
        return repr(check)
    line = linecache.getline(code.co_filename, code.co_firstlineno).strip()
    source = _lambda_text(line) if "lambda" in line else line
    path = code.co_filename
    shown = path[path.rfind("/tests/") + 1 :] if "/tests/" in path else path
    return f"{shown}:{code.co_firstlineno}: {source}"


def _lambda_text(line: str) -> str:
    """``lambda: f(x) == 2`` out of ``await wait_until(lambda: f(x) == 2, timeout=5)``: up to
    the comma or parenthesis that ends it in the call."""
    start = line.index("lambda")
    depth = 0
    for i in range(line.index(":", start) + 1, len(line)):
        if line[i] in "([{":
            depth += 1
        elif line[i] in ")]}" or (line[i] == "," and depth == 0):
            if depth == 0:
                return line[start:i].strip()
            depth -= 1
    return line[start:].strip()

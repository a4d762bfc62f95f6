"""Leadership: singleton duties run in one process of many (docs/architecture.md).

Two agents on one broker are a high-availability pair: both read, both store
(ingest is idempotent), but some duties must run once: the worker monitor that
marks jobs lost, queue probes, and later alert and schedule evaluation. Those
run only while this process leads, and the storage decides who leads: on
PostgreSQL, a session advisory lock (``PostgresStorage.leader_lock``), which the
server releases the moment the leader's connection ends, so the other process
takes over within one poll plus the time the server needs to see the leader's
connection gone (seconds: the lock's session asks for short TCP keepalives).

A storage that offers no lock (SQLite: one process owns the file) leaves this
process the leader for as long as it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

log = logging.getLogger(__name__)

# Seconds between checks that the lock is still held (or free to take): with the
# server's detection of a dead session, what bounds the takeover.
POLL_INTERVAL = 2.0


class LeaderLock(Protocol):
    """A lock that one process of many holds, checked by polling."""

    async def hold(self) -> bool:
        """Whether this process holds the lock now: takes it if it is free.

        False when another process holds it or the lock cannot be reached (a
        leader that cannot tell whether it still leads must stop acting as one).
        """
        ...

    async def release(self) -> None: ...


class Leadership:
    """Runs ``duties`` while this process leads, and cancels them when it stops leading."""

    def __init__(
        self,
        lock: LeaderLock | None,
        *,
        name: str,
        poll_interval: float = POLL_INTERVAL,
        on_change: Callable[[bool], None] = lambda leading: None,
    ) -> None:
        self._lock = lock
        self.name = name
        self.poll_interval = poll_interval
        self._on_change = on_change
        self.leading = False

    async def run(self, duties: Callable[[], Awaitable[None]]) -> None:
        if self._lock is None:
            self._set(True)
            await duties()
            return
        try:
            while True:
                if await self._lock.hold():
                    await self._lead(self._lock, duties)
                await trio.sleep(self.poll_interval)
        finally:
            self._set(False)
            with trio.CancelScope(shield=True):
                await self._lock.release()

    async def _lead(self, lock: LeaderLock, duties: Callable[[], Awaitable[None]]) -> None:
        self._set(True)
        log.info("%s: this process leads; its singleton duties start", self.name)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(duties)
            while True:
                await trio.sleep(self.poll_interval)
                if not await lock.hold():
                    break
            nursery.cancel_scope.cancel()
        self._set(False)
        log.warning("%s: this process no longer leads; its singleton duties stopped", self.name)

    def _set(self, leading: bool) -> None:
        if leading != self.leading:
            self.leading = leading
            self._on_change(leading)

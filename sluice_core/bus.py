"""The live bus: what was just persisted, fanned out to SSE clients.

Publishing never waits: each subscriber has a bounded queue, and a subscriber
that falls behind is marked to resync (its client reloads) instead of slowing
ingestion. Recent messages are kept in a ring so a reconnecting client can
resume from ``Last-Event-ID``.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio

# How long after the last client left the bus keeps building messages, so a
# dashboard that reloads or reconnects resumes from Last-Event-ID.
RESUME_GRACE_S = 120.0


@attrs.frozen
class LiveMessage:
    id: int
    kind: str  # "job", "worker" or "queue"
    data: dict[str, Any]


@attrs.define(eq=False)
class Subscription:
    send: trio.MemorySendChannel[LiveMessage]
    receive: trio.MemoryReceiveChannel[LiveMessage]
    # Set when this subscriber missed messages; the stream tells its client to resync.
    overflowed: bool = False


class Bus:
    def __init__(self, *, history: int = 10_000, per_subscriber: int = 2_000) -> None:
        self._next_id = 1
        self._recent: collections.deque[LiveMessage] = collections.deque(maxlen=history)
        self._subscribers: set[Subscription] = set()
        self._per_subscriber = per_subscriber
        # trio time someone last showed interest: the last subscriber left, or a
        # page that will subscribe was rendered.
        self._interest_at: float | None = None

    @property
    def last_id(self) -> int:
        return self._next_id - 1

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        message = LiveMessage(self._next_id, kind, data)
        self._next_id += 1
        self._recent.append(message)
        for sub in self._subscribers:
            if sub.overflowed:
                continue
            try:
                sub.send.send_nowait(message)
            except trio.WouldBlock:
                sub.overflowed = True

    @property
    def wanted(self) -> bool:
        """True while someone listens, or left recently enough to come back and resume."""
        if self._subscribers:
            return True
        return (
            self._interest_at is not None
            and trio.current_time() - self._interest_at < RESUME_GRACE_S
        )

    def expect_subscriber(self) -> int:
        """A page was rendered and will subscribe: build messages from now on, so it
        can resume from the returned id and miss nothing in between."""
        self._interest_at = trio.current_time()
        return self.last_id

    def skip(self, count: int) -> None:
        """Account for ``count`` messages nobody was listening to, without building them.

        The ids advance and the ring forgets, so a client that comes back with
        an older ``Last-Event-ID`` is told to resync rather than miss them.
        """
        self._next_id += count
        self._recent.clear()

    def since(self, last_id: int) -> list[LiveMessage] | None:
        """Messages after ``last_id``, or None if some are no longer kept (resync)."""
        if last_id >= self.last_id:
            return []
        if not self._recent or self._recent[0].id > last_id + 1:
            return None
        return [m for m in self._recent if m.id > last_id]

    @contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        send, receive = trio.open_memory_channel[LiveMessage](self._per_subscriber)
        sub = Subscription(send, receive)
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)
            if not self._subscribers:
                self._interest_at = trio.current_time()
            send.close()
            receive.close()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

"""The live bus: what was just persisted, fanned out to SSE clients.

Publishing never waits, and neither it nor a subscriber costs more with more
subscribers:

- Messages are coalesced in windows: within one, the latest state of a job
  (a worker, a queue) replaces the earlier ones. A window closes ``window``
  seconds after the one before at the earliest, so a lone event goes out at
  once and a busy stream a few times a second, however many events it holds.
- A closed window gets its ids and is kept as a :class:`Batch` in the recent
  history. Subscribers have no queue of their own: each reads the batches
  after the last id it has sent, so a slow one delays no other and costs no
  memory, and one whose position the history no longer holds gets
  :class:`Gap` (its client reloads). The same history lets a reconnecting
  client resume from ``Last-Event-ID``.
- A job's dict and JSON are built once, by the first subscriber that sends it,
  and shared; subscribers that show the same view of a window share what they
  made of it (``Batch.views``).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import orjson
import trio

from sluice_core.model import Job, QueueSample, Worker
from sluice_core.serialize import job_to_dict, worker_to_dict

# How long after the last client left the bus keeps building messages, so a
# dashboard that reloads or reconnects resumes from Last-Event-ID.
RESUME_GRACE_S = 120.0
# A window: short enough to feel live, long enough that a job's few events
# (sent, received, started, done often come within it) go out as one row.
WINDOW_S = 0.25


class Gap(Exception):
    """What a subscriber has not read yet is no longer kept: its client must reload."""


@attrs.define(eq=False)
class LiveMessage:
    id: int
    kind: str  # "job", "worker" or "queue"
    # Within a window, a message replaces the earlier one of its kind and key
    # (a job's id, a worker's hostname); None: it replaces nothing.
    key: str | None
    # A job message carries the stored row: filters read it, and its dict is
    # built only if some subscriber sends it. Other kinds carry their data.
    job: Job | None = None
    payload: dict[str, Any] | None = None
    new: bool = False  # a job stored for the first time within the window
    _json: bytes | None = attrs.field(default=None, init=False)

    @property
    def data(self) -> dict[str, Any]:
        if self.job is not None:
            return job_to_dict(self.job)
        assert self.payload is not None
        return self.payload

    @property
    def json(self) -> bytes:
        """The data as JSON: made by the first subscriber that sends it, for all of them."""
        if self._json is None:
            self._json = orjson.dumps(self.data)
        return self._json


@attrs.define(eq=False)
class Batch:
    """What a subscriber has not read: one window, or (for a subscriber that fell
    behind or resumes) every window after its position, coalesced the same way.
    One message per kind and key, in id order; never empty."""

    messages: list[LiveMessage]
    # What subscribers made of this batch, by what they show (filters, page size):
    # kept on the newest window only, the one up-to-date subscribers read.
    views: dict[Hashable, bytes] = attrs.field(factory=dict)

    @property
    def first_id(self) -> int:
        return self.messages[0].id

    @property
    def last_id(self) -> int:
        return self.messages[-1].id


@attrs.define(eq=False)
class _Pending:
    """A message of the open window, before it has an id."""

    kind: str
    key: str | None
    job: Job | None
    payload: dict[str, Any] | None
    # The order messages get their ids in: workers and queues first, then jobs
    # as the job list orders them (oldest first, so the newest is sent last).
    rank: tuple[int, float]
    new: bool


# Ranks. Jobs stored for the first time are the newest (in the order stored);
# a job updated was stored before them all, and among such jobs the one
# created last is the likeliest to be on a page of the newest.
_OTHER, _UPDATED, _CREATED = 0, 1, 2


class Bus:
    def __init__(self, *, history: int = 10_000, window: float = WINDOW_S) -> None:
        self._next_id = 1
        # Closed windows, oldest first, holding about ``history`` messages.
        self._recent: collections.deque[Batch] = collections.deque()
        self._kept = 0
        self._history = history
        self._window = window
        self._pending: dict[tuple[str, str | int], _Pending] = {}
        self._unkeyed = itertools.count()  # keys for messages that coalesce with none
        self._created = itertools.count()  # the order jobs were first stored in
        self._closed_at = float("-inf")
        self._due = float("-inf")  # when the open window closes
        # Set (then replaced) when a window opens or closes, or ids are skipped.
        self._changed = trio.Event()
        self._subscribers = 0
        # trio time someone last showed interest: the last subscriber left, or a
        # page that will subscribe was rendered.
        self._interest_at: float | None = None

    @property
    def last_id(self) -> int:
        """The id of the last message of the last closed window.

        A window is closed by whoever looks after it is due (a publish, a
        subscriber, this): the bus needs no task of its own."""
        self._close_if_due()
        return self._next_id - 1

    def publish(self, kind: str, data: dict[str, Any], *, key: str | None = None) -> None:
        """A worker's or a queue's new state (``data`` as the API shows it)."""
        # Equal ranks keep the order published: the sort is stable.
        self._add(kind, key, None, data, (_OTHER, 0.0), new=False)
        self._close_if_due()

    def publish_jobs(self, jobs: Sequence[Job], *, new: int = 0) -> None:
        """Job rows as just stored; the first ``new`` were stored for the first time,
        in that order. The rows must not change afterwards: they are serialized
        later, and only if a subscriber sends them."""
        for i, job in enumerate(jobs):
            if i < new:
                rank = (_CREATED, float(next(self._created)))
            else:
                rank = (_UPDATED, job.created_at or 0.0)
            self._add("job", job.id, job, None, rank, new=i < new)
        self._close_if_due()

    def publish_workers(self, workers: Sequence[Worker]) -> None:
        for worker in workers:
            self.publish("worker", worker_to_dict(worker), key=worker.hostname)

    def publish_samples(self, samples: Sequence[QueueSample]) -> None:
        for sample in samples:
            self.publish(
                "queue",
                {
                    "name": sample.name,
                    "broker": sample.broker,
                    "depth": sample.depth,
                    "reserved": sample.reserved,
                    "consumers": sample.consumers,
                },
                key=f"{sample.broker}\0{sample.name}",
            )

    def _add(
        self,
        kind: str,
        key: str | None,
        job: Job | None,
        payload: dict[str, Any] | None,
        rank: tuple[int, float],
        *,
        new: bool,
    ) -> None:
        slot = (kind, key if key is not None else next(self._unkeyed))
        pending = self._pending.get(slot)
        if pending is None:
            if not self._pending:
                self._due = max(trio.current_time(), self._closed_at + self._window)
                self._wake()  # subscribers start waiting for this window to close
            self._pending[slot] = _Pending(kind, key, job, payload, rank, new)
            return
        pending.job, pending.payload = job, payload
        # A job created and then updated within the window stays where it was created.
        pending.rank = max(pending.rank, rank)
        pending.new = pending.new or new

    def _close_if_due(self) -> None:
        if self._pending and trio.current_time() >= self._due:
            self.close_window()

    def close_window(self) -> None:
        """Close the open window now: its messages get ids and reach subscribers."""
        if not self._pending:
            return
        messages = []
        for pending in sorted(self._pending.values(), key=lambda p: p.rank):
            messages.append(
                LiveMessage(
                    self._next_id, pending.kind, pending.key, pending.job, pending.payload,
                    pending.new,
                )
            )
            self._next_id += 1
        self._pending.clear()
        if self._recent:
            self._recent[-1].views.clear()  # only the newest window's views are ever read
        self._recent.append(Batch(messages))
        self._kept += len(messages)
        while self._kept > self._history and len(self._recent) > 1:
            self._kept -= len(self._recent.popleft().messages)
        self._closed_at = trio.current_time()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def next_batch(self, after: int) -> Batch:
        """The messages after id ``after`` (at most ``last_id``), as soon as there are
        some: at once when they are kept already, else when the open window closes.
        Raises :class:`Gap` when some of them are no longer kept."""
        while after >= self.last_id:
            if self._pending:
                # Until it is due, or closed sooner (close_window) or skipped.
                with trio.move_on_at(self._due):
                    await self._changed.wait()
                self._close_if_due()
            else:
                await self._changed.wait()
        return self._batch_after(after)

    def _batch_after(self, after: int) -> Batch:
        newest = self._recent[-1] if self._recent else None
        if newest is not None and newest.first_id == after + 1:
            return newest  # an up-to-date subscriber: shares the window with the others
        if not self._recent or self._recent[0].first_id > after + 1:
            raise Gap
        latest: dict[tuple[str, str | int], LiveMessage] = {}
        for batch in self._recent:
            if batch.last_id <= after:
                continue
            for message in batch.messages:
                if message.id <= after:
                    continue
                slot = (message.kind, message.key if message.key is not None else message.id)
                earlier = latest.pop(slot, None)  # re-inserted: the dict stays in id order
                if earlier is not None and earlier.new and not message.new:
                    message = attrs.evolve(message, new=True)
                latest[slot] = message
        return Batch(list(latest.values()))

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

    def missed(self) -> None:
        """Messages were missed, how many is unknown (a replica's change feed was cut off):
        every subscriber, up to date or not, resyncs (``Gap``)."""
        self.skip(1)

    def skip(self, count: int) -> None:
        """Account for ``count`` messages nobody was listening to, without building them.

        The ids advance (the open window's too) and the history forgets, so a
        client that comes back with an older ``Last-Event-ID`` is told to resync
        rather than miss them.
        """
        self._next_id += count + len(self._pending)
        self._pending.clear()
        self._recent.clear()
        self._kept = 0
        self._wake()

    @contextmanager
    def subscribe(self) -> Iterator[None]:
        """Count a subscriber while it reads (see :attr:`wanted`)."""
        self._subscribers += 1
        try:
            yield
        finally:
            self._subscribers -= 1
            if not self._subscribers:
                self._interest_at = trio.current_time()

    @property
    def subscriber_count(self) -> int:
        return self._subscribers

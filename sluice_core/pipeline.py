"""The ingest pipeline: raw batches -> normalizers -> batched storage writes -> live bus.

    sources --put_raw--> [raw buffer in memory] -(full)-> [spool on disk]
                                 |                               |
                                 +------------> normalize <------+
            --put_events---------------------------------------+
    the reader process's Feed (sluice_core/reader.py) ---------+
                                                               v
                          [normalized, a few batches] --> gate --> write (one transaction) --> bus
                                                            |
                  standing by (HA pair, not the leader) ----+-> [replay ring: the last REPLAY_S]
                                        |  or, for a backend that takes several transactions
                                        +- at once (PostgreSQL): split by job id, one writer
                                           per part, each with its own few batches

Sources never wait. The raw buffer in memory is small (``--buffer-mb``); past
it, batches go to a spool file (``--spool-mb``), so a burst that storage
cannot keep up with costs disk, not memory; past that too, sources drop and
the drop is counted (``sluice_events_dropped_total``). The normalizer waits
for the writer, so storage that cannot keep up fills the buffers, not memory
without bound. The writer takes everything that is waiting (up to
``batch_events``) into one transaction, so a slow database gets bigger,
cheaper batches. A failing database is retried with backoff, holding the batch:
nothing read is lost while the buffers last. A batch the database refuses for its
own values (:class:`~sluice_core.storage.RejectedData`: an integer past a column, a
character it does not keep) is split instead, until the events at fault are alone:
they go to the dead-letter table, the rest is stored. Stopping waits for the
buffers to be written, but no longer than the engine allows (:meth:`Pipeline.abandon`):
what is left then is counted in the log.

Several writers (``writers``, the backend's ``ingest_writers``) overlap one
batch's round trips to the database with the next one's fold in Python. Each
writer has its own share of the job ids, so no two transactions in flight
hold the same job: neither waits on the other's locks, and each job's events
are still written in the order they were read.

An HA pair (two agents on one database, docs/deploy.md) is active-passive: both read
and normalize every event, but only the leader writes what its sources read. The
other stands by (:meth:`Pipeline.stand_by`): its gate keeps the last ``REPLAY_S``
seconds of normalized batches in a ring instead, and writes the whole ring first when
it starts writing (ingest is idempotent: what the old leader stored changes nothing).
It starts writing when it leads (:meth:`Pipeline.lead`), or when the leader's own
listening marks (``<source>@leader``, written by :meth:`Pipeline.watch_leader`) say
it has not heard a source this process hears for ``DEAF_S``. Events pushed to this
process (the ingest endpoint, reconciliation) reach no other process: they are
always written.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from sluice_core.bus import Bus
from sluice_core.config import BATCH_EVENTS, BUFFER_MB
from sluice_core.metrics import Metrics
from sluice_core.model import Job, JobEvent, Normalized, RawBatch, WorkerEvent
from sluice_core.serialize import job_event_to_json, worker_event_to_json
from sluice_core.spool import Spool
from sluice_core.storage import DeadLetter, IngestResult, RejectedData, WritesRefused
from sluice_core.validate import UNCLAIMED, cut

log = logging.getLogger(__name__)

DROP_LOG_INTERVAL_S = 10.0
DEAD_LETTER_MAX = 1024 * 1024  # characters of an event's JSON kept in the dead-letter table
# Normalized batches waiting for a writer (see Pipeline.__init__).
NORMALIZED_BATCHES = 24
# A standby's ring: at least the takeover's bound (15 s from the leader's death) with
# margin, and at most this many events (a normalized event takes about 900 bytes).
REPLAY_S = 30.0
REPLAY_EVENTS = 500_000
# The leader marks each source it hears as "<name>@leader" in the listening table; a
# standby that hears a source the leader has not marked for DEAF_S writes too.
LEADER_MARK = "@leader"
DEAF_S = 5.0
WATCH_S = 1.0


@attrs.define(eq=False)
class _Stored:
    """Call ``done`` once each of a batch's ``parts`` is written (the ingest endpoint
    acks then, an AMQP source acknowledges its messages); a batch is split into a part
    per writer."""

    done: Callable[[], None]
    parts: int = 1

    def part_written(self) -> None:
        self.parts -= 1
        if self.parts == 0:
            self.done()


@attrs.define
class _Normalized:
    job_events: list[JobEvent]
    worker_events: list[WorkerEvent]
    read_at: float  # when the oldest message of this batch was read
    stored: _Stored | None = None
    pushed: bool = False  # from Pipeline.offer, not a source: no other process has it


@attrs.define
class SourceStatus:
    up: bool
    detail: str
    since: float
    # Up again, and the broker kept what was published while the source was not
    # reading (a RabbitMQ queue that outlived the stop): nothing was missed.
    kept: bool = False


@attrs.define
class WriteHealth:
    """How the writers fare, for ``/healthz``: when a write last succeeded, since when
    writes have failed (None once one succeeds), and when the events of each batch a
    writer holds were read. The channels before the writers are first in, first out,
    so the oldest of those is the oldest event read and not yet stored."""

    last_ok: float | None = None
    failing_since: float | None = None
    error: str = ""  # the last failure's type (its message may name hosts or paths)
    refused: str = ""  # WritesRefused.reason of the last failure: disk full, read-only...
    _writing: Counter[float] = attrs.field(factory=Counter)

    def writing(self, read_at: float) -> None:
        self._writing[read_at] += 1

    def written(self, read_at: float) -> None:
        self._writing[read_at] -= 1
        if self._writing[read_at] <= 0:
            del self._writing[read_at]

    def succeeded(self, now: float) -> None:
        self.last_ok, self.failing_since, self.error, self.refused = now, None, "", ""

    def failed(self, exc: Exception, now: float) -> None:
        if self.failing_since is None:
            self.failing_since = now
        self.error = type(exc).__name__
        self.refused = exc.reason if isinstance(exc, WritesRefused) else ""

    @property
    def oldest_unstored(self) -> float | None:
        """When the oldest event a writer holds was read; None when they hold none."""
        return min(self._writing, default=None)


class Feed:
    """Normalized batches from the reader process (see :mod:`sluice_core.reader`).

    Unlike :meth:`Pipeline.offer`, :meth:`send` waits for the writers and never
    drops: the reader holds the backlog in its own buffers and spool. The
    pipeline's writers stop only once every feed is closed.
    """

    def __init__(self, send: trio.MemorySendChannel[_Normalized]) -> None:
        self._send = send

    async def send(
        self, job_events: list[JobEvent], worker_events: list[WorkerEvent], read_at: float
    ) -> None:
        await self._send.send(_Normalized(job_events, worker_events, read_at))

    async def aclose(self) -> None:
        await self._send.aclose()


class EventWriter(Protocol):
    """The pipeline's last stage: :class:`Storage` in the engine; in a remote agent
    (``sluice agent --server``), the uplink that forwards batches to the server."""

    async def ingest(
        self, job_events: list[JobEvent], worker_events: list[WorkerEvent]
    ) -> IngestResult: ...


class DeadLetters(Protocol):
    """Where events the writer refused (:class:`RejectedData`) are kept: :class:`Storage`."""

    async def dead_letter(self, letters: list[DeadLetter]) -> None: ...


class ListeningMarks(Protocol):
    """The listening table (:class:`Storage`), where an HA pair's leader says what it hears."""

    async def mark_listening(self, marks: dict[str, float]) -> None: ...

    async def listening_marks(self) -> dict[str, float]: ...


class Pipeline:
    """The engine's :class:`~sluice_core.sources.Sink`, and the tasks behind it."""

    def __init__(
        self,
        *,
        normalize: Callable[[RawBatch], Normalized | None],
        storage: EventWriter,
        metrics: Metrics,
        bus: Bus,
        on_stored: Callable[[IngestResult], None],
        buffer_messages: int = 1_000_000,
        buffer_bytes: int = BUFFER_MB.default * 2**20,
        spool: Spool | None = None,
        batch_events: int = BATCH_EVENTS.default,
        writers: int = 1,
        normalized_batches: int = NORMALIZED_BATCHES,
        dead_letters: DeadLetters | None = None,
    ) -> None:
        self._normalize = normalize
        self._storage = storage
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._bus = bus
        self._on_stored = on_stored
        self._buffer_limit = buffer_messages
        # Messages range from a heartbeat to a task.multi of 24 events: a count
        # alone does not bound memory, so the raw bytes held are bounded too.
        self._bytes_limit = buffer_bytes
        self._spool = spool if spool is not None else Spool(0)
        self._batch_events = batch_events
        self._buffered = 0
        self._buffered_bytes = 0
        self._drop_logged_at = float("-inf")
        self._dropped_unlogged = 0
        # Unbounded as a channel, bounded in messages by put_raw: a batch can
        # hold one message or thousands, so a count of batches would not bound memory.
        self._raw_send, self._raw_receive = trio.open_memory_channel[RawBatch | _Normalized](
            math.inf
        )
        # The normalizer (and the reader's feed) hands each batch to the gate, which
        # passes it on to the writers' channel (run) or keeps it (a standby): a hand-over,
        # so the engine holds no more than the writers' channel.
        self._norm_send, self._norm_receive = trio.open_memory_channel[_Normalized](0)
        # The normalizer waits there for the writer. A source's batch is one socket
        # read (up to about a thousand events): the writer's transaction takes all
        # that waited, so that channel holds a transaction's worth (measured: 4 batches
        # gave 12k events/s, 64 several times that). No more: a normalized event
        # takes 900 bytes of memory, half again its raw message.
        self._normalized_batches = normalized_batches
        self._writers = writers
        # What the reader process holds in its buffers: messages, spooled bytes.
        self._reader_held = (0, 0)
        self.sources: dict[str, SourceStatus] = {}
        self.stored_batches = 0
        self.writes = WriteHealth()
        self._closed = False
        self._abandon = trio.CancelScope()  # see abandon()
        self._unwritten = 0  # events an abandoned writer held
        # An HA pair's standby (stand_by): the gate keeps source batches in the ring
        # unless this process leads or covers for a leader that does not hear.
        self._standby = False
        self._leading = False
        self._covering = False
        # When each batch was kept (monotonic: a batch's read_at is another clock's), and it.
        self._ring: deque[tuple[float, _Normalized]] = deque()
        self._ring_events = 0
        self._gate_wait: trio.CancelScope | None = None  # the gate's wait for a batch
        self._metrics.writing_sources.set(1)

    # -- Sink --------------------------------------------------------------

    def put_raw(self, batch: RawBatch) -> None:
        n = len(batch.messages)
        nbytes = _size(batch)
        self._metrics.messages_received.labels(batch.source).inc(n)
        # Spool only while memory holds something: the normalizer is then busy and
        # comes back to the spool; an empty memory buffer may have it waiting on it.
        if self._buffered and (
            self._spool.batches  # first in, first out: once spooling, spool until drained
            or self._buffered + n > self._buffer_limit
            or self._buffered_bytes + nbytes > self._bytes_limit
        ):
            if self._spool.has_room(nbytes) and not self._closed:
                try:
                    self._spool.put(batch)
                except OSError as exc:  # the spool's disk full: as if it had no room
                    log.error("cannot spool %d messages from %s: %s", n, batch.source, exc)
                else:
                    self._report_buffered()
                    return
            self._drop(batch.source, n)
            _settle(batch)
            return
        try:
            self._raw_send.send_nowait(batch)
        except trio.ClosedResourceError:
            self._metrics.events_dropped.labels(batch.source).inc(n)
            _settle(batch)
            return
        self._buffered += n
        self._buffered_bytes += nbytes
        self._report_buffered()

    def put_events(self, job_events: list[JobEvent], worker_events: list[WorkerEvent]) -> None:
        self.offer(job_events, worker_events)

    def offer(
        self,
        job_events: list[JobEvent],
        worker_events: list[WorkerEvent],
        stored: trio.Event | None = None,
    ) -> bool:
        """:meth:`put_events` for a sender that must know (the ingest endpoint acks only
        what is safe): whether the events were taken (False: dropped and counted), and
        ``stored`` is set once they are written."""
        n = len(job_events) + len(worker_events)
        if self._buffered + n > self._buffer_limit:
            self._drop("ingest", n)
            return False
        try:
            self._raw_send.send_nowait(
                _Normalized(
                    job_events, worker_events, time.time(),
                    None if stored is None else _Stored(stored.set), pushed=True,
                )
            )
        except trio.ClosedResourceError:
            self._metrics.events_dropped.labels("ingest").inc(n)
            return False
        self._buffered += n
        return True

    def open_feed(self) -> Feed:
        """A feed of normalized batches from the reader process; close it when done."""
        return Feed(self._norm_send.clone())

    def held(self) -> tuple[int, int]:
        """Messages held in the buffers and the spool, and the spool's bytes."""
        return self._buffered + self._spool.messages, self._spool.size

    def reader_status(
        self, sources: dict[str, SourceStatus], held: tuple[int, int]
    ) -> None:
        """Show the reader process's sources and buffers as this pipeline's own
        (the reader logs the changes)."""
        for name, status in sources.items():
            self.sources[name] = status
            self._metrics.source_up.labels(name).set(1 if status.up else 0)
        self._reader_held = held
        self._report_buffered()

    def backlog(self) -> tuple[int, int]:
        """What :meth:`held` says, plus what the reader process holds: the backlog gauges."""
        messages, spooled = self.held()
        return messages + self._reader_held[0], spooled + self._reader_held[1]

    def _report_buffered(self) -> None:
        messages, spooled = self.backlog()
        self._metrics.buffered.set(messages)
        self._metrics.spooled_bytes.set(spooled)

    def _drop(self, source: str, n: int) -> None:
        self._metrics.events_dropped.labels(source).inc(n)
        self._dropped_unlogged += n
        now = time.monotonic()
        # Overload lasts: one line per interval, not one per batch.
        if now - self._drop_logged_at >= DROP_LOG_INTERVAL_S:
            log.warning(
                "ingest buffers full (%d messages or %d MiB in memory, %d MiB spooled): "
                "dropped %d since the last report; storage is not keeping up "
                "(see sluice_events_dropped_total)",
                self._buffer_limit,
                self._bytes_limit >> 20,
                self._spool.limit_bytes >> 20,
                self._dropped_unlogged,
            )
            self._drop_logged_at, self._dropped_unlogged = now, 0

    def source_status(self, name: str, up: bool, detail: str = "", kept: bool = False) -> None:
        previous = self.sources.get(name)
        if previous is None or previous.up != up:
            (log.info if up else log.warning)(
                "source %s is %s%s", name, "up" if up else "down", f": {detail}" if detail else ""
            )
            self.sources[name] = SourceStatus(up, detail, time.time(), kept)
        self._metrics.source_up.labels(name).set(1 if up else 0)

    # -- an HA pair ----------------------------------------------------------

    def stand_by(self) -> None:
        """Write what the sources read only while :meth:`lead` says so (or the leader
        does not hear): one of processes sharing a database, before :meth:`run`."""
        self._standby = True
        self._metrics.writing_sources.set(0)

    @property
    def writing_sources(self) -> bool:
        return not self._standby or self._leading or self._covering

    def lead(self, leading: bool) -> None:
        """This process leads (writes what its sources read, the ring first) or not."""
        self._leading = leading
        self._gate_changed()

    def _cover(self, covering: bool, why: str) -> None:
        if covering != self._covering:
            (log.warning if covering else log.info)(
                "%s: %s", why,
                "this process writes what it reads too" if covering else "standing by again",
            )
            self._covering = covering
            self._gate_changed()

    def _gate_changed(self) -> None:
        self._metrics.writing_sources.set(int(self.writing_sources))
        if self.writing_sources and self._gate_wait is not None:
            self._gate_wait.cancel()  # the gate writes its ring now, not at the next batch

    async def watch_leader(self, marks: ListeningMarks, leading: Callable[[], bool]) -> None:
        """Every WATCH_S: as the leader, mark the sources it hears ("<name>@leader");
        standing by, write too while the leader has not marked, for DEAF_S, a source this
        process hears (the leader is deaf to it, or dead and its lock not yet free)."""
        while True:
            now = time.time()
            heard = [name for name, status in self.sources.items() if status.up]
            try:
                if leading():
                    self._cover(False, "this process leads")
                    await marks.mark_listening({name + LEADER_MARK: now for name in heard})
                else:
                    marked = await marks.listening_marks()
                    deaf = [
                        name for name in heard
                        if now - marked.get(name + LEADER_MARK, -math.inf) > DEAF_S
                    ]
                    self._cover(
                        bool(deaf),
                        f"the leader has not heard {', '.join(deaf)} for {DEAF_S:g} s"
                        if deaf else "the leader hears every source again",
                    )
            except Exception as exc:  # the database away: as before until it answers
                log.warning("watching the leader: %s", exc)
            await trio.sleep(WATCH_S)

    async def _gate_loop(self, send: trio.MemorySendChannel[_Normalized]) -> None:
        """Pass batches to the writers; standing by, keep source batches in the ring,
        and write the ring first once this process writes."""
        async with send:
            while True:
                if self._ring and self.writing_sources:
                    _, kept = self._ring.popleft()
                    n = len(kept.job_events) + len(kept.worker_events)
                    self._ring_events -= n
                    self._metrics.standby_events.set(self._ring_events)
                    self._metrics.standby_replayed.inc(n)
                    await send.send(kept)
                    continue
                received: list[_Normalized] = []  # none when _gate_changed woke the gate
                with trio.CancelScope() as self._gate_wait:
                    try:
                        received.append(await self._norm_receive.receive())
                    except trio.EndOfChannel:
                        return  # a standby's ring is the leader's to write: let go
                self._gate_wait = None
                for item in received:
                    if item.pushed or self.writing_sources:
                        await send.send(item)
                    else:
                        self._keep(item)

    def _keep(self, item: _Normalized) -> None:
        """Into the ring; out of it what is older than REPLAY_S or past REPLAY_EVENTS."""
        now = time.monotonic()
        self._ring.append((now, item))
        self._ring_events += len(item.job_events) + len(item.worker_events)
        while self._ring and (
            self._ring[0][0] < now - REPLAY_S or self._ring_events > REPLAY_EVENTS
        ):
            _, old = self._ring.popleft()
            n = len(old.job_events) + len(old.worker_events)
            self._ring_events -= n
            self._metrics.standby_expired.inc(n)
            if old.stored is not None:
                old.stored.part_written()  # the leader's to store: this process is done
        self._metrics.standby_events.set(self._ring_events)

    # -- tasks -------------------------------------------------------------

    def close(self) -> None:
        """No more input: the tasks drain what is buffered, write it, and return."""
        self._closed = True
        self._raw_send.close()

    def abandon(self) -> None:
        """Stop writing now, whatever is left (a stop that may not wait any longer, the
        database away): :meth:`run` returns once a write in progress has ended, and logs
        how much it could not store."""
        self._abandon.cancel()

    async def run(self) -> None:
        """Normalize and write until :meth:`close` and everything buffered is stored."""
        gated_send, gated = trio.open_memory_channel[_Normalized](self._normalized_batches)
        parts: list[trio.MemoryReceiveChannel[_Normalized]] = []
        try:
            with self._abandon:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._normalize_loop)
                    nursery.start_soon(self._gate_loop, gated_send)
                    if self._writers == 1:
                        nursery.start_soon(self._write_loop, gated)
                        return
                    sends = []
                    for _ in range(self._writers):
                        # Parts of batches: as many as make one writer's transaction as
                        # large as a lone writer's (measured on PostgreSQL, 50,000 events/s
                        # offered: 18,000-20,000 stored/s with half that, 21,600 with it).
                        send, receive = trio.open_memory_channel[_Normalized](
                            NORMALIZED_BATCHES * self._writers
                        )
                        sends.append(send)
                        parts.append(receive)
                        nursery.start_soon(self._write_loop, receive)
                    nursery.start_soon(self._split_loop, gated, sends)
        finally:
            if self._abandon.cancelled_caught:
                self._log_unstored([self._norm_receive, gated, *parts])
            self._spool.close()

    def _log_unstored(self, channels: list[trio.MemoryReceiveChannel[_Normalized]]) -> None:
        """What an abandoned run leaves: the writers' batches, those waiting for them,
        and the messages not normalized yet."""
        events, messages = self._unwritten, self._spool.messages
        for channel in [*channels, self._raw_receive]:
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                while True:
                    item = channel.receive_nowait()
                    if isinstance(item, _Normalized):
                        events += len(item.job_events) + len(item.worker_events)
                    else:
                        messages += len(item.messages)
        if events or messages:
            log.error(
                "stopped before storage took everything: could not store %d events%s;"
                " they are lost (is the database away? see the errors above)",
                events,
                f" nor {messages} messages read but not yet normalized" if messages else "",
            )

    async def _next_raw(self) -> RawBatch | _Normalized | None:
        """The oldest input: from memory, else from the spool; None once closed and drained."""
        try:
            item = self._raw_receive.receive_nowait()
        except trio.WouldBlock:
            spooled = self._spool.get()
            if spooled is not None:
                return spooled
            try:
                item = await self._raw_receive.receive()
            except trio.EndOfChannel:
                return self._spool.get()
        except trio.EndOfChannel:
            return self._spool.get()
        if isinstance(item, _Normalized):
            self._buffered -= len(item.job_events) + len(item.worker_events)
        else:
            self._buffered -= len(item.messages)
            self._buffered_bytes -= _size(item)
        return item

    async def _normalize_loop(self) -> None:
        async with self._norm_send:
            while (item := await self._next_raw()) is not None:
                self._report_buffered()
                if isinstance(item, _Normalized):
                    await self._norm_send.send(item)
                    continue
                result = self._normalize(item)
                if result is None:
                    self._metrics.events_malformed.labels(item.source, UNCLAIMED).inc(
                        len(item.messages)
                    )
                    log.warning("no normalizer claims %r messages from %s", item.kind, item.source)
                    _settle(item)
                    continue
                self._metrics.observe_normalized(item.source, result)
                if result.job_events or result.worker_events:
                    stored = None if item.settled is None else _Stored(item.settled)
                    await self._norm_send.send(
                        _Normalized(
                            result.job_events, result.worker_events, item.received_at, stored
                        )
                    )
                else:
                    _settle(item)

    async def _split_loop(
        self,
        receive: trio.MemoryReceiveChannel[_Normalized],
        sends: list[trio.MemorySendChannel[_Normalized]],
    ) -> None:
        """Hand each writer its share of every batch: the jobs whose id hashes to it."""
        n = len(sends)
        try:
            async for item in receive:
                parts = [
                    _Normalized([], [], item.read_at, item.stored) for _ in range(n)
                ]
                for event in item.job_events:
                    parts[hash(event.job_id) % n].job_events.append(event)
                parts[0].worker_events = item.worker_events
                # An empty batch still goes to a writer: the ingest endpoint awaits its ack.
                given = [
                    (send, part) for send, part in zip(sends, parts, strict=True)
                    if part.job_events or part.worker_events
                ] or [(sends[0], parts[0])]
                if item.stored is not None:
                    item.stored.parts = len(given)
                for send, part in given:
                    await send.send(part)
        finally:
            for send in sends:
                send.close()

    async def _write_loop(self, receive: trio.MemoryReceiveChannel[_Normalized]) -> None:
        async for first in receive:
            job_events, worker_events = list(first.job_events), list(first.worker_events)
            read_at = first.read_at
            waiting = [first.stored]
            while len(job_events) + len(worker_events) < self._batch_events:
                try:
                    more = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                job_events += more.job_events
                worker_events += more.worker_events
                read_at = min(read_at, more.read_at)
                waiting.append(more.stored)
            self.writes.writing(read_at)
            try:
                result, refused = await self._store(job_events, worker_events)
            except trio.Cancelled:  # abandoned: these are not known to be stored
                self._unwritten += len(job_events) + len(worker_events)
                raise
            self.writes.written(read_at)
            for stored in waiting:
                if stored is not None:
                    stored.part_written()
            self.stored_batches += 1
            self._metrics.events_ingested.inc(result.events_stored)
            self._metrics.events_duplicate.inc(
                max(0, len(job_events) - result.events_stored - refused)
            )
            self._metrics.ingest_lag.set(max(0.0, time.time() - read_at))
            self._on_stored(result)

    async def _store(
        self, job_events: list[JobEvent], worker_events: list[WorkerEvent]
    ) -> tuple[IngestResult, int]:
        """Store a batch: what was stored, and how many of its job events storage refused.

        A batch refused for its values is split in halves, each stored on its own, until
        the events at fault are alone: a batch of n events with one bad event takes
        about 2 log2(n) transactions. The others are stored in the order read.
        """
        parts = [(job_events, worker_events)]
        results: list[IngestResult] = []
        refused: list[tuple[JobEvent | WorkerEvent, str]] = []
        while parts:
            jobs, workers = parts.pop()
            try:
                results.append(
                    await self._retrying(
                        functools.partial(self._storage.ingest, jobs, workers),
                        f"storage write of {len(jobs) + len(workers)} events",
                    )
                )
            except RejectedData as exc:
                if len(jobs) + len(workers) == 1:
                    refused.append(((jobs or workers)[0], str(exc)))
                    continue
                if len(jobs) + len(workers) == len(job_events) + len(worker_events):
                    log.warning(
                        "storage refused a batch of %d events for its values (%s):"
                        " storing it in parts to find the events at fault",
                        len(jobs) + len(workers), exc,
                    )
                first, second = _halves(jobs, workers)
                parts += [second, first]  # the first half next
        if refused:
            await self._dead_letter(refused)
        return _combined(results), sum(isinstance(event, JobEvent) for event, _ in refused)

    async def _retrying[T](self, write: Callable[[], Awaitable[T]], what: str) -> T:
        """``write()``'s result, however long the database is away: any error but
        :class:`RejectedData` (raised at once: retrying cannot help) is retried with
        backoff, holding what was to be written."""
        delay = 0.5
        while True:
            try:
                result = await write()
                self.writes.succeeded(time.time())
                return result
            except RejectedData:
                raise
            except Exception as exc:  # any other driver error: keep the batch, retry
                self._metrics.storage_errors.inc()
                self.writes.failed(exc, time.time())
                log.error("%s failed (%s); retrying in %.1fs", what, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _dead_letter(self, refused: list[tuple[JobEvent | WorkerEvent, str]]) -> None:
        now = time.time()
        letters = [_letter(event, reason, now) for event, reason in refused]
        self._metrics.events_dead_lettered.inc(len(letters))
        log.error(
            "storage refused %d events (%s): kept in the dead-letter table (the dashboard's"
            " diagnostics page); the rest of their batch is stored",
            len(letters), letters[0].reason,
        )
        if self._dead_letters is not None:
            await self._retrying(
                functools.partial(self._dead_letters.dead_letter, letters),
                f"keeping {len(letters)} dead letters",
            )


def _halves(
    jobs: list[JobEvent], workers: list[WorkerEvent]
) -> tuple[tuple[list[JobEvent], list[WorkerEvent]], tuple[list[JobEvent], list[WorkerEvent]]]:
    """A batch in two, job events first (the order the writer had them in)."""
    middle = (len(jobs) + len(workers)) // 2
    if middle <= len(jobs):
        return (jobs[:middle], []), (jobs[middle:], workers)
    middle -= len(jobs)
    return (jobs, workers[:middle]), ([], workers[middle:])


def _combined(results: list[IngestResult]) -> IngestResult:
    """One batch's result from its parts' (stored one after the other)."""
    if len(results) == 1:
        return results[0]
    jobs: dict[str, Job] = {}
    new: list[str] = []
    for result in results:
        for i, job in enumerate(result.jobs):
            if i < result.new_jobs and job.id not in jobs:
                new.append(job.id)
            jobs[job.id] = job  # a later part's version is the newer
    fresh = set(new)
    return IngestResult(
        jobs=[jobs[job_id] for job_id in new] + [j for i, j in jobs.items() if i not in fresh],
        workers=list({w.hostname: w for r in results for w in r.workers}.values()),
        events_stored=sum(result.events_stored for result in results),
        new_events=[event for result in results for event in result.new_events],
        new_jobs=len(new),
    )


def _letter(event: JobEvent | WorkerEvent, reason: str, now: float) -> DeadLetter:
    if isinstance(event, JobEvent):
        kind, data = "job", job_event_to_json(event)
    else:
        kind, data = "worker", worker_event_to_json(event)
    # The standard library's json, not orjson: it writes any integer, escapes to ASCII
    # (a NUL, a lone surrogate), and makes text of what is not JSON. The row always stores.
    text = json.dumps(data, ensure_ascii=True, default=repr, skipkeys=True)
    return DeadLetter(
        kind=kind,
        event=cut(text, DEAD_LETTER_MAX),
        reason=cut(json.dumps(reason, ensure_ascii=True)[1:-1], 1_000),
        created_at=now,
    )


def _settle(batch: RawBatch) -> None:
    if batch.settled is not None:
        batch.settled()


def _size(batch: RawBatch) -> int:
    return sum(len(body) for _, body in batch.messages)

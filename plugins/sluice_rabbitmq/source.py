"""Celery's events from RabbitMQ (docs/celery-protocol.md section 2).

Celery publishes events to the ``celeryev`` topic exchange; Sluice binds a queue
of its own to it with ``#`` and consumes it with acknowledgements: a message is
acknowledged once Sluice is done with it (its events stored, or dead-lettered, or
counted as malformed or dropped: :attr:`RawBatch.settled`), a batch at a time with
``multiple``, in delivery order. So nothing the broker handed over is lost when Sluice
stops or dies while the database refuses writes: what it had not stored is delivered
again (to it, or to the other agent of a pair), and stored once (event ids are
content hashes). At most ``PREFETCH`` messages are out unacknowledged: past them the
broker holds the rest in the queue, which is Sluice's buffer while storage is away.
Message bodies are raw JSON (a list for ``task.multi``); they go to the Celery
normalizer as ``celery/amqp`` batches of ``(routing_key, body)``.

The queue outlives a dropped connection and a restart on purpose: it is neither
exclusive nor auto-delete, and its name is the deployment's (see
:func:`queue_name`), so events published while Sluice reconnects or restarts
wait in it and nothing is missed. What bounds it is that it is non-durable (a
broker restart removes it), expires ``queue_ttl`` seconds after its consumer is
gone (``x-expires``), keeps a message at most as long (``x-message-ttl``: a
message outlives its wait only if the queue does too), and never holds more
messages than Sluice's own buffer (``x-max-length``, ready messages: past it the
broker drops the oldest), so that a Sluice gone for good cannot fill the broker.

A reader thread drains the socket, gathers what arrives within a few
milliseconds and crosses into trio once per batch.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import queue
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import NoReturn

import amqp
import trio

from sluice_celery.events import KIND_AMQP, SOURCE_PREFIX
from sluice_core.model import RawBatch
from sluice_core.sources import Sink
from sluice_rabbitmq.connection import (
    CHANNEL_ERRORS,
    CONNECTION_ERRORS,
    AmqpParams,
    close_quietly,
    connect,
    describe,
    tune_for_reading,
)

log = logging.getLogger(__name__)

EXCHANGE = "celeryev"
# How long the event queue waits for a Sluice that stopped: a restart, an upgrade.
DEFAULT_QUEUE_TTL = 300.0
# Seconds between AMQP heartbeats: a half-open TCP connection is noticed in two.
HEARTBEAT = 30
# An idle reader thread wakes this often to notice cancellation (and to acknowledge).
IDLE_POLL = 0.2
# Messages delivered and not yet acknowledged, at most: at 10,000 events/s, two seconds of
# them (a storage write under load takes a fraction of one); past them the broker keeps
# the rest queued. Each is at most a few KiB in Sluice's memory.
PREFETCH = 20_000
# A batch gathers messages this long (or this many) before crossing into trio:
# a crossing costs tens of microseconds, a message a few.
BATCH_WINDOW = 0.005
BATCH_MAX = 10_000
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


def queue_name(*deployment: str) -> str:
    """The event queue of one deployment: the same across its restarts, and shared by the
    agents that store into one database (an HA pair: each event is read by one of them).
    Another deployment on the same broker gets a queue of its own."""
    digest = hashlib.sha256("\x00".join(deployment).encode()).hexdigest()[:16]
    return f"sluice.celeryev.{digest}"


class AmqpEventSource:
    """Reads Celery's events from one RabbitMQ broker (``amqp://`` or ``amqps://``)."""

    def __init__(
        self,
        url: str,
        *,
        buffer_messages: int,
        queue_ttl: float = DEFAULT_QUEUE_TTL,
        queue: str | None = None,
    ) -> None:
        """``queue``: the event queue's name (:func:`queue_name`); a new one by default."""
        self.params = AmqpParams.from_url(url)
        self.name = SOURCE_PREFIX + self.params.url
        self.queue = queue or f"sluice.celeryev.{uuid.uuid4()}"
        self.queue_ttl = queue_ttl
        self.queue_arguments = {
            "x-expires": int(queue_ttl * 1000),
            "x-message-ttl": int(queue_ttl * 1000),
            "x-max-length": buffer_messages,
        }
        # One reader thread per source, outside trio's default thread pool.
        self._limiter = trio.CapacityLimiter(1)

    async def run(
        self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Read until cancelled; reconnect with exponential backoff when RabbitMQ goes away."""
        delay = BACKOFF_FIRST
        started = False
        down_since: float | None = None  # when a working connection was lost
        last_reason = ""

        def on_consuming(queue_kept: bool) -> None:
            nonlocal started, delay, down_since, last_reason
            detail = ""
            if down_since is not None:
                detail = self._gap(down_since, time.time(), queue_kept)
                (log.info if queue_kept else log.warning)("%s: %s", self.name, detail)
            sink.source_status(self.name, True, detail, kept=queue_kept)
            delay, down_since, last_reason = BACKOFF_FIRST, None, ""
            if not started:
                started = True
                task_status.started()

        while True:
            try:
                await trio.to_thread.run_sync(
                    self._consume, sink, on_consuming, limiter=self._limiter
                )
            except (*CONNECTION_ERRORS, *CHANNEL_ERRORS) as exc:
                if started and down_since is None:
                    down_since = time.time()
                reason = describe(exc)
                sink.source_status(self.name, False, reason)
                # A long outage logs once per distinct reason, not once per attempt.
                (log.warning if reason != last_reason else log.debug)(
                    "%s: %s; reconnecting in %.1fs", self.name, reason, delay
                )
                last_reason = reason
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _gap(self, since: float, until: float, queue_kept: bool) -> str:
        seconds = until - since
        if queue_kept:
            return (
                f"reconnected after {seconds:.1f}s; the queue kept the events published"
                " meanwhile: nothing missed"
            )
        return (
            f"reconnected after {seconds:.1f}s; events published between {_iso(since)} and"
            f" {_iso(until)} were missed: RabbitMQ lost Sluice's queue (broker restart, or"
            f" an outage longer than its {self.queue_ttl:.0f}s expiry)"
        )

    # -- the reader thread -------------------------------------------------------

    def _consume(self, sink: Sink, on_consuming: Callable[[bool], None]) -> NoReturn:
        conn = connect(self.params, name=f"sluice {self.name}", heartbeat=HEARTBEAT)
        try:
            batch: list[tuple[str, bytes]] = []

            acks = DeliveryAcks()  # this channel's: a tag means nothing on another

            def on_message(message: amqp.Message) -> None:
                batch.append((message.delivery_info["routing_key"], message.body))
                acks.last_delivered = message.delivery_tag

            channel, queue_kept = self._declare(conn)
            # Bodies stay bytes: py-amqp would decode each to str by its content_encoding.
            channel.auto_decode = False
            channel.basic_qos(0, PREFETCH, False)
            channel.basic_consume(self.queue, callback=on_message, no_ack=False)
            trio.from_thread.run_sync(on_consuming, queue_kept)
            self._read(conn, channel, sink, batch, acks)
        finally:
            # Stopping leaves the queue: it gathers the events of a restart, or expires.
            close_quietly(conn)

    def _declare(self, conn: amqp.Connection) -> tuple[amqp.Channel, bool]:
        """Declare and bind the queue; tell whether it survived since the last connection."""
        channel = conn.channel()
        try:
            channel.queue_declare(self.queue, passive=True)
            queue_kept = True
        except amqp.exceptions.NotFound:
            queue_kept = False  # (py-amqp reopened the channel the 404 closed)
        # As Celery declares it, so that whoever comes first, the other agrees.
        channel.exchange_declare(EXCHANGE, "topic", durable=True, auto_delete=False)
        channel.queue_declare(
            self.queue,
            durable=False,
            exclusive=False,
            auto_delete=False,
            arguments=self.queue_arguments,
        )
        channel.queue_bind(self.queue, EXCHANGE, "#")
        return channel, queue_kept

    def _read(
        self,
        conn: amqp.Connection,
        channel: amqp.Channel,
        sink: Sink,
        batch: list[tuple[str, bytes]],
        acks: DeliveryAcks,
    ) -> NoReturn:
        tune_for_reading(conn, IDLE_POLL)
        sock = conn.transport.sock
        timeout = IDLE_POLL
        first_at: float | None = None  # monotonic time of the batch's first message
        received_at = 0.0
        next_tick = time.monotonic() + 1.0
        while True:
            timed_out = False
            try:
                conn.drain_events(timeout=timeout)
            except TimeoutError:
                timed_out = True
            now = time.monotonic()
            if batch:
                if first_at is None:
                    first_at, received_at = now, time.time()
                if timed_out or len(batch) >= BATCH_MAX or now - first_at >= BATCH_WINDOW:
                    raw = RawBatch(
                        KIND_AMQP, self.name, batch.copy(), received_at, acks.handed_over()
                    )
                    trio.from_thread.run_sync(sink.put_raw, raw)
                    batch.clear()
                    first_at = None
            if (tag := acks.ready()) is not None:
                channel.basic_ack(tag, multiple=True)
            # Waiting briefly while a batch fills, long when idle; the socket keeps
            # the current timeout so that py-amqp need not set it at every frame.
            wanted = BATCH_WINDOW if batch else IDLE_POLL
            if wanted != timeout:
                timeout = wanted
                sock.settimeout(timeout)
            if now >= next_tick:
                conn.heartbeat_tick()
                next_tick = now + 1.0
            trio.from_thread.check_cancelled()


class DeliveryAcks:
    """One channel's acknowledgements, in delivery order: a batch's last delivery tag is
    acknowledged (``multiple``: with every tag before it) once that batch and every batch
    handed over before it are settled. Writers settle batches out of order (a batch is
    split among them); acknowledging a later batch first would acknowledge an earlier one
    not yet stored."""

    def __init__(self) -> None:
        self.last_delivered = 0  # the reader thread's, as messages arrive
        self._handed: deque[int] = deque()  # batches' last tags, in order (reader thread)
        self._settled: queue.SimpleQueue[int] = queue.SimpleQueue()  # from trio's thread
        self._done: set[int] = set()

    def handed_over(self) -> Callable[[], None]:
        """The ``settled`` of the batch ending at the last message delivered."""
        self._handed.append(self.last_delivered)
        return functools.partial(self._settled.put, self.last_delivered)

    def ready(self) -> int | None:
        """The tag to acknowledge now (with all before it), if any (reader thread)."""
        while True:
            try:
                self._done.add(self._settled.get_nowait())
            except queue.Empty:
                break
        last = None
        while self._handed and self._handed[0] in self._done:
            last = self._handed.popleft()
            self._done.discard(last)
        return last


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")

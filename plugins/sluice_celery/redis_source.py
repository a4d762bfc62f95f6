"""Celery events from Redis pub/sub (docs/celery-protocol.md section 1).

RESP over a plain socket with hiredis's ``Reader``, in a thread of the
source's own (see :class:`_Connection` for why). The read loop does nothing
but receive, parse and hand each receive's messages to the sink as one batch;
decoding happens behind the sink, in the trio thread.
Redis disconnects a pub/sub client whose output buffer overflows (32 MB by
default) and every event in that buffer is lost: draining the socket fast is
this module's whole job.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import trio

from sluice_celery.events import KIND_REDIS, SOURCE_PREFIX
from sluice_core.config import ConfigError, redact_url
from sluice_core.model import RawBatch
from sluice_core.sources import Sink

log = logging.getLogger(__name__)

# Linux's option number; Python's socket module does not export it.
SO_RCVBUFFORCE = 33 if sys.platform == "linux" else None

# Measured on a 400,000-event burst: 256 KiB reads drained it all; 4 MiB reads
# (each a fresh mmap'd buffer) were slow enough for Redis to drop us.
RECEIVE_BYTES = 256 * 1024
# The kernel's receive buffer is where a burst waits while the process is busy;
# past it, Redis buffers on its side and disconnects us at 32 MB. As root the
# buffer can be set beyond net.core.rmem_max (SO_RCVBUFFORCE); otherwise the
# kernel's autotuning (tcp_rmem) is left to grow it.
SOCKET_RECEIVE_BUFFER = 64 * 1024 * 1024
CONNECT_TIMEOUT = 10.0
# A quiet connection (no workers, no heartbeats) is PINGed this often; with no
# answer by the next period it is taken for dead (a half-open TCP connection
# would otherwise wait for the kernel's two-hour keepalive).
IDLE_PING_INTERVAL = 15.0
# Pub/sub keeps nothing for an absent subscriber: every second spent waiting to
# reconnect once Redis is back loses that second's events. A refused connection
# (Redis restarting, or not yet listening) costs a SYN and a RST, so the port is
# polled at REFUSED_POLL; other failures (Redis dropped or refused us) back off,
# but to no more than a second.
REFUSED_POLL = 0.1
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 1.0

_CERT_REQS = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}


class RedisError(Exception):
    """Redis refused us or the connection broke; the source reconnects."""


def event_pattern(keyprefix: str, db: int) -> str:
    """The PSUBSCRIBE pattern of Celery's event channels: kombu publishes events to
    ``{global_keyprefix}/{db}.celeryev/{routing_key}`` (channels span databases)."""
    return f"{keyprefix}/{db}.celeryev/*"


class RedisEventSource:
    """Reads Celery's events from one Redis broker (``redis://`` or ``rediss://``)."""

    # Pub/sub: every process sharing the database receives every event (an HA pair's
    # standby may leave the writing to the leader, sluice_core/pipeline.py).
    broadcast = True

    def __init__(self, url: str, *, keyprefix: str = "") -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigError(
                f"not a Redis URL: {redact_url(url)} (expected redis:// or rediss://)"
            )
        try:
            port = parts.port or 6379
            db_text = parts.path.strip("/") or "0"
            db = int(db_text)
        except ValueError:
            raise ConfigError(
                f"bad Redis URL {redact_url(url)}: expected redis://host:port/db with a numeric db"
            ) from None
        self.name = SOURCE_PREFIX + redact_url(url)
        self.host = parts.hostname or "localhost"
        self.port = port
        self.db = db
        self.pattern = event_pattern(keyprefix, db)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.ssl_context = _ssl_context(parts.query) if parts.scheme == "rediss" else None
        self._reader_thread = trio.CapacityLimiter(1)  # its own, not trio's shared pool

    async def run(
        self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Read until cancelled; reconnect when Redis goes away: at once when it listens
        again (REFUSED_POLL), with a short backoff when it fails otherwise."""
        delay = BACKOFF_FIRST
        started = False
        last_reason = ""
        while True:
            connection = _Connection(self)
            refused = False
            try:
                async with trio.open_nursery() as nursery:
                    subscribed = trio.Event()
                    nursery.start_soon(self._pump, connection, sink, subscribed)
                    await subscribed.wait()
                    sink.source_status(self.name, True)
                    log.info("%s: subscribed to %s", self.name, self.pattern)
                    delay, last_reason = BACKOFF_FIRST, ""
                    if not started:
                        started = True
                        task_status.started()
            except* (OSError, RedisError, hiredis.HiredisError) as group:
                reason = _describe(group)
                refused = group.subgroup(ConnectionRefusedError) is not None
                sink.source_status(self.name, False, reason)
                # A long outage logs once per distinct reason, not once per attempt.
                (log.warning if reason != last_reason else log.debug)(
                    "%s: %s; reconnecting in %.1fs",
                    self.name, reason, REFUSED_POLL if refused else delay,
                )
                last_reason = reason
            if refused:
                await trio.sleep(REFUSED_POLL)
            else:
                await trio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def _pump(
        self, connection: _Connection, sink: Sink, subscribed: trio.Event
    ) -> None:
        """Run one connection's reader thread; close its socket if we are cancelled."""
        token = trio.lowlevel.current_trio_token()
        name = self.name

        def deliver(messages: list[tuple[str, bytes]]) -> None:
            # Fire and forget: the reader never waits for the trio thread.
            token.run_sync_soon(sink.put_raw, RawBatch(KIND_REDIS, name, messages, time.time()))

        async def close_when_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:
                connection.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_when_cancelled)
            try:
                # Not cancellable as such: cancelling closes the socket, which ends the thread.
                await trio.to_thread.run_sync(
                    connection.run,
                    lambda: token.run_sync_soon(subscribed.set),
                    deliver,
                    limiter=self._reader_thread,
                )
            finally:
                nursery.cancel_scope.cancel()


class _Connection:
    """One connection to Redis, driven by its own thread.

    The process's trio thread decodes, folds and serves the web while a burst
    arrives; a reader scheduled among those tasks falls behind, Redis's buffer
    for us passes 32 MB, and Redis drops the connection with everything in it.
    A thread of its own blocks in ``recv`` without the GIL and wakes as soon as
    data comes, whatever the trio thread is doing, so the socket is drained at
    the rate Redis writes it.
    """

    def __init__(self, source: RedisEventSource) -> None:
        self._source = source
        self._sock: socket.socket | None = None
        self._closed = threading.Event()

    def close(self) -> None:
        """Stop the reader (callable from any thread): its blocking recv returns."""
        self._closed.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected, or already closed by Redis

    def run(
        self,
        on_subscribed: Callable[[], None],
        deliver: Callable[[list[tuple[str, bytes]]], None],
    ) -> None:
        source = self._source
        sock = socket.create_connection((source.host, source.port), timeout=CONNECT_TIMEOUT)
        try:
            _enlarge_receive_buffer(sock)
            if source.ssl_context is not None:
                sock = source.ssl_context.wrap_socket(sock, server_hostname=source.host)
            self._sock = sock
            if self._closed.is_set():
                return
            reader = hiredis.Reader()
            self._subscribe(sock, reader)
            on_subscribed()
            self._read(sock, reader, deliver)
        except OSError:
            if not self._closed.is_set():
                raise
        finally:
            sock.close()

    def _subscribe(self, sock: socket.socket, reader: hiredis.Reader) -> None:
        source = self._source
        if source.password is not None:
            auth = ["AUTH", source.password]
            if source.username:
                auth.insert(1, source.username)
            # hiredis's stub types the command as a 1-tuple.
            sock.sendall(hiredis.pack_command(tuple(auth)))  # type: ignore[arg-type]
            _reply(sock, reader)
        sock.sendall(hiredis.pack_command(("PSUBSCRIBE", source.pattern)))  # type: ignore[arg-type]
        reply = _reply(sock, reader)
        if not (isinstance(reply, list) and reply[:1] == [b"psubscribe"]):
            raise RedisError(f"unexpected reply to PSUBSCRIBE: {reply!r}")

    def _read(
        self,
        sock: socket.socket,
        reader: hiredis.Reader,
        deliver: Callable[[list[tuple[str, bytes]]], None],
    ) -> None:
        sock.settimeout(IDLE_PING_INTERVAL)
        pinged = False
        while True:
            messages: list[tuple[str, bytes]] = []
            # Replies already buffered come first (the subscribe reply's read may hold some).
            while (reply := reader.gets()) is not False:
                if isinstance(reply, list) and len(reply) == 4 and reply[0] == b"pmessage":
                    messages.append((reply[2].decode("utf-8", "replace"), reply[3]))
                elif isinstance(reply, hiredis.ReplyError):
                    raise RedisError(f"Redis error: {reply}")
                # Anything else is the answer to our idle PING.
            if messages:
                deliver(messages)
            try:
                data = sock.recv(RECEIVE_BYTES)
            except TimeoutError:
                if pinged:
                    raise RedisError(
                        f"no answer from Redis for {2 * IDLE_PING_INTERVAL:.0f}s"
                    ) from None
                sock.sendall(hiredis.pack_command(("PING",)))
                pinged = True
                continue
            if not data:
                if self._closed.is_set():
                    return
                raise RedisError("connection closed by Redis")
            pinged = False
            reader.feed(data)


def _reply(sock: socket.socket, reader: hiredis.Reader) -> Any:
    """The next reply of a command, raising Redis's error replies."""
    while (reply := reader.gets()) is False:
        data = sock.recv(RECEIVE_BYTES)
        if not data:
            raise RedisError("connection closed by Redis")
        reader.feed(data)
    if isinstance(reply, hiredis.ReplyError):
        raise RedisError(f"Redis refused: {reply}")
    return reply


def _ssl_context(query: str) -> ssl.SSLContext:
    """TLS settings for ``rediss://``, from the query options Celery's URLs use
    (``ssl_cert_reqs=required|optional|none``, ``ssl_ca_certs=/path``)."""
    options = {key: values[-1] for key, values in parse_qs(query).items()}
    try:
        context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    except OSError as exc:
        raise ConfigError(f"ssl_ca_certs: cannot load CA certificates: {exc}") from None
    reqs = options.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if reqs not in _CERT_REQS:
        raise ConfigError(f"ssl_cert_reqs={reqs!r}: expected required, optional or none")
    if _CERT_REQS[reqs] is ssl.CERT_NONE:
        context.check_hostname = False
    context.verify_mode = _CERT_REQS[reqs]
    return context


def _enlarge_receive_buffer(sock: socket.socket) -> None:
    if SO_RCVBUFFORCE is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_RECEIVE_BUFFER)
    except OSError:
        pass  # not privileged: keep the kernel's autotuned buffer


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup):  # nurseries wrap what the thread raised
        exc = exc.exceptions[0]
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:.0f}s"
    return str(exc) or type(exc).__name__

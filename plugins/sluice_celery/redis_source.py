"""Celery events from Redis pub/sub (CELERY_PROTOCOL.md section 1).

RESP over a trio stream with hiredis's sans-IO ``Reader``: no blocking client,
no thread. The read loop does nothing but receive, parse and hand each
receive's messages to the sink as one batch; decoding happens behind the sink.
Redis disconnects a pub/sub client whose output buffer overflows (32 MB by
default) and every event in that buffer is lost: draining the socket fast is
this module's whole job.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import time
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import trio

from sluice_celery.events import KIND_REDIS
from sluice_core.config import ConfigError, redact_url
from sluice_core.model import RawBatch
from sluice_core.sources import Sink

log = logging.getLogger(__name__)

# Linux's option number; Python's socket module does not export it.
SO_RCVBUFFORCE = 33 if sys.platform == "linux" else None

# One receive takes everything the kernel holds, up to this: between two turns
# of the read loop a burst can pile up megabytes.
RECEIVE_BYTES = 4 * 1024 * 1024
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
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0

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
        self.name = "celery/" + redact_url(url)
        self.host = parts.hostname or "localhost"
        self.port = port
        self.db = db
        self.pattern = event_pattern(keyprefix, db)
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._ssl_context = _ssl_context(parts.query) if parts.scheme == "rediss" else None

    async def run(
        self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Read until cancelled; reconnect with exponential backoff when Redis goes away."""
        delay = BACKOFF_FIRST
        started = False
        last_reason = ""
        while True:
            try:
                stream = await self._connect()
                async with stream:
                    reader = hiredis.Reader()
                    await self._subscribe(stream, reader)
                    sink.source_status(self.name, True)
                    log.info("%s: subscribed to %s", self.name, self.pattern)
                    delay, last_reason = BACKOFF_FIRST, ""
                    if not started:
                        started = True
                        task_status.started()
                    await self._read(stream, reader, sink)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, hiredis.HiredisError,
                    RedisError) as exc:
                reason = _describe(exc)
                sink.source_status(self.name, False, reason)
                # A long outage logs once per distinct reason, not once per attempt.
                (log.warning if reason != last_reason else log.debug)(
                    "%s: %s; reconnecting in %.1fs", self.name, reason, delay
                )
                last_reason = reason
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _connect(self) -> trio.abc.Stream:
        with trio.fail_after(CONNECT_TIMEOUT):
            tcp = await trio.open_tcp_stream(self.host, self.port)
            _enlarge_receive_buffer(tcp)
            if self._ssl_context is None:
                return tcp
            tls = trio.SSLStream(tcp, self._ssl_context, server_hostname=self.host)
            try:
                await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(tcp)
                raise
            return tls

    async def _subscribe(self, stream: trio.abc.Stream, reader: hiredis.Reader) -> None:
        with trio.fail_after(CONNECT_TIMEOUT):
            if self._password is not None:
                auth = ["AUTH", self._password]
                if self._username:
                    auth.insert(1, self._username)
                await stream.send_all(hiredis.pack_command(tuple(auth)))
                await _reply(stream, reader)
            await stream.send_all(hiredis.pack_command(("PSUBSCRIBE", self.pattern)))
            reply = await _reply(stream, reader)
            if not (isinstance(reply, list) and reply[:1] == [b"psubscribe"]):
                raise RedisError(f"unexpected reply to PSUBSCRIBE: {reply!r}")

    async def _read(self, stream: trio.abc.Stream, reader: hiredis.Reader, sink: Sink) -> None:
        name = self.name
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
                sink.put_raw(RawBatch(KIND_REDIS, name, messages, time.time()))
            with trio.move_on_after(IDLE_PING_INTERVAL) as idle:
                data = await stream.receive_some(RECEIVE_BYTES)
            if idle.cancelled_caught:
                if pinged:
                    raise RedisError(f"no answer from Redis for {2 * IDLE_PING_INTERVAL:.0f}s")
                await stream.send_all(hiredis.pack_command(("PING",)))
                pinged = True
                continue
            if not data:
                raise RedisError("connection closed by Redis")
            pinged = False
            reader.feed(data)


async def _reply(stream: trio.abc.Stream, reader: hiredis.Reader) -> Any:
    """The next reply of a command, raising Redis's error replies."""
    while (reply := reader.gets()) is False:
        data = await stream.receive_some(RECEIVE_BYTES)
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


def _enlarge_receive_buffer(tcp: trio.SocketStream) -> None:
    if SO_RCVBUFFORCE is None:
        return
    try:
        tcp.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_RECEIVE_BUFFER)
    except OSError:
        pass  # not privileged: keep the kernel's autotuned buffer


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"no answer within {CONNECT_TIMEOUT:.0f}s"
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__

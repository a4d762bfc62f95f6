"""Connections to RabbitMQ, shared by the event source, the probe and the publisher.

Library: py-amqp (``amqp``, Celery's own AMQP client) in worker threads. Measured on
this project's 2-core test machine (RabbitMQ 3.10 on the same host, 50,000 captured
``celeryev`` messages queued, then consumed): py-amqp with ``no_ack`` ~21,000
messages/s as shipped, ~29,000-35,000/s with the two read-path settings of
:func:`tune_for_reading`; acks in batches (``multiple=True`` every 500, prefetch
2,000) 13,000-17,000/s. The source acknowledges now (issue 20: nothing the broker
handed over may be lost while storage is away), once a batch, prefetch 20,000. pamqp
(the frame codec of aio-pika) only *decodes* the same frames at ~42,000/s in pure
Python, before any socket, handshake, heartbeat, TLS, channel, confirm or reconnect
code, all of which we would have to write and keep. py-amqp is within reach of that
ceiling and is already a dependency, so the source reads with py-amqp in a thread
and hands batches to trio.

py-amqp objects are not thread-safe: each :class:`AmqpClient` runs one call at
a time (a ``CapacityLimiter(1)`` is both the thread pool and the lock), and the
source owns its connection in its own thread.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import amqp
import amqp.transport
import attrs
import trio

from sluice_core.config import ConfigError, redact_url

AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
CONNECT_TIMEOUT = 10.0
# Reads and writes of short calls (probe, publish): a broker that stops answering
# fails the call instead of hanging it (and the engine's shutdown behind it).
CALL_TIMEOUT = 10.0

# Errors after which the connection is unusable: drop it, reconnect later.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    *amqp.Connection.connection_errors,
    amqp.exceptions.RecoverableConnectionError,
)
# Errors that close only the channel (404 on a passive declare, a missing exchange).
CHANNEL_ERRORS: tuple[type[BaseException], ...] = amqp.Connection.channel_errors

_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}

T = TypeVar("T")


def is_amqp_url(url: str) -> bool:
    return urlsplit(url).scheme in AMQP_SCHEMES


@attrs.frozen
class AmqpParams:
    """What py-amqp needs to connect, parsed from a Celery broker URL."""

    url: str  # redacted: safe for logs and names
    host: str
    port: int
    userid: str
    password: str = attrs.field(repr=False)
    virtual_host: str
    ssl: dict[str, Any] | None  # py-amqp's TLS options; None for plain TCP

    @classmethod
    def from_url(cls, url: str) -> AmqpParams:
        """Parse ``amqp://user:pass@host:5672/vhost`` (``amqps://`` for TLS, port 5671).

        As in Celery, the path is the vhost without its leading slash, so ``//``
        is the default vhost ``/`` and an empty path too. TLS verification takes
        Celery's query options ``ssl_cert_reqs`` (required, optional, none) and
        ``ssl_ca_certs`` (a CA bundle path).
        """
        parts = urlsplit(url)
        if parts.scheme not in AMQP_SCHEMES:
            raise ConfigError(f"not an AMQP URL: {redact_url(url)} (expected amqp:// or amqps://)")
        tls = parts.scheme == "amqps"
        try:
            port = parts.port or (5671 if tls else 5672)
        except ValueError:
            raise ConfigError(f"bad port in AMQP URL {redact_url(url)}") from None
        host = parts.hostname or "localhost"
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        return cls(
            url=redact_url(url),
            host=host,
            port=port,
            userid=unquote(parts.username) if parts.username else "guest",
            password=unquote(parts.password) if parts.password else "guest",
            virtual_host=vhost,
            ssl=_ssl_options(host, parts.query) if tls else None,
        )


def _ssl_options(host: str, query: str) -> dict[str, Any]:
    options = {key: values[-1] for key, values in parse_qs(query).items()}
    reqs = options.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if reqs not in _CERT_REQS:
        raise ConfigError(f"ssl_cert_reqs={reqs!r}: expected required, optional or none")
    out: dict[str, Any] = {"cert_reqs": _CERT_REQS[reqs]}
    if "ssl_ca_certs" in options:
        out["ca_certs"] = options["ssl_ca_certs"]
    # py-amqp checks the hostname whenever it is given, which CERT_NONE forbids.
    if _CERT_REQS[reqs] != ssl.CERT_NONE:
        out["server_hostname"] = host
    return out


def connect(params: AmqpParams, *, name: str, heartbeat: float = 0) -> amqp.Connection:
    """Open a connection (blocking: call from a worker thread).

    ``name`` shows in RabbitMQ's management UI and ``rabbitmqctl list_connections``
    (client property ``connection_name``), so an operator can tell Sluice's
    connections apart.
    """
    conn = amqp.Connection(
        host=f"{params.host}:{params.port}",
        userid=params.userid,
        password=params.password,
        virtual_host=params.virtual_host,
        ssl=params.ssl or False,
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=CALL_TIMEOUT,
        write_timeout=CALL_TIMEOUT,
        heartbeat=heartbeat,
        client_properties={"connection_name": name, "product": "sluice"},
    )
    conn.connect()
    return conn


def tune_for_reading(conn: amqp.Connection, timeout: float) -> None:
    """Make a consuming connection's reads cheaper (see the module docstring).

    py-amqp sets the socket timeout around every frame read when asked for a
    timeout different from the socket's: fixing it once saves two syscalls a
    frame (+20%). Its plain-TCP transport also asks ``recv`` for exactly the
    bytes of the next frame part (two calls a frame, six a message): letting
    each ``recv`` take up to 64 KiB, which its buffer already handles, gives
    another +20%. TLS sockets buffer on their own and are left as they are.
    """
    sock = conn.transport.sock
    sock.settimeout(timeout)
    if isinstance(conn.transport, amqp.transport.TCPTransport):
        recv = sock.recv
        conn.transport._quick_recv = lambda n: recv(max(n, 65536))


def close_quietly(conn: amqp.Connection) -> None:
    """Close a connection that may already be broken (we are leaving anyway)."""
    if conn.connected:
        try:
            conn.transport.sock.settimeout(CALL_TIMEOUT)
            conn.close()
            return
        except (*CONNECTION_ERRORS, *CHANNEL_ERRORS):
            pass
    # Broken: drop the socket without the closing handshake.
    conn.collect()


def describe(exc: BaseException) -> str:
    """A one-line reason for logs and the source status."""
    if isinstance(exc, socket.timeout):
        return "RabbitMQ did not answer in time"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, amqp.exceptions.AccessRefused):
        return f"{text} (check the user, password and vhost permissions)"
    return text


class AmqpClient:
    """A lazily opened connection and channel for short calls, one call at a time.

    A connection error drops the connection; the next call reconnects.
    """

    def __init__(self, params: AmqpParams, *, name: str) -> None:
        self.params = params
        self.name = name
        self._limiter = trio.CapacityLimiter(1)
        self._conn: amqp.Connection | None = None
        self._channel: amqp.Channel | None = None

    def channel(self) -> amqp.Channel:
        """The client's open channel (blocking; only inside :meth:`call`'s function).

        When RabbitMQ closes a channel (a 404 on a passive declare, a missing
        exchange), py-amqp raises and reopens it at once: it stays usable.
        """
        if self._conn is None:
            self._conn = connect(self.params, name=self.name)
        if self._channel is None or not self._channel.is_open:
            self._channel = self._conn.channel()
        return self._channel

    async def call(self, fn: Callable[[AmqpClient], T]) -> T:
        """Run ``fn(self)`` in a worker thread. A write must not be abandoned half
        done, so cancellation waits for it (bounded by :data:`CALL_TIMEOUT`)."""
        return await trio.to_thread.run_sync(self._call, fn, limiter=self._limiter)

    def _call(self, fn: Callable[[AmqpClient], T]) -> T:
        if self._conn is not None:
            try:
                return self._attempt(fn)
            except CONNECTION_ERRORS:
                # An idle connection is found dead only when used (RabbitMQ
                # restarted since the last call), which says nothing about the
                # broker now: try once more on a new connection. The first
                # attempt's message did not reach the broker that closed the
                # connection; a duplicate needs the connection to die between
                # RabbitMQ's accepting a message and its confirm.
                pass
        return self._attempt(fn)

    def _attempt(self, fn: Callable[[AmqpClient], T]) -> T:
        try:
            return fn(self)
        except CONNECTION_ERRORS:
            self._drop()
            raise

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.collect()
        self._conn = self._channel = None

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._close, limiter=self._limiter)

    def _close(self) -> None:
        if self._conn is not None:
            close_quietly(self._conn)
        self._conn = self._channel = None

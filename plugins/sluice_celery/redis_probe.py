"""Queue depth, reserved messages and consumers on a Redis broker.

See docs/celery-protocol.md sections 4-5.

What kombu keeps in Redis for a queue ``Q`` (every key behind the app's
``global_keyprefix``):

- the lists ``Q``, ``Q\\x06\\x163``, ``Q\\x06\\x166``, ``Q\\x06\\x169``: one per priority
  step; the depth is the sum of their lengths (celery-exporter reads ``Q`` only
  and undercounts prioritised work);
- the sets ``_kombu.binding.<exchange>``, members ``routing_key SEP pattern SEP queue``:
  how queues are discovered (a queue with no consumer keeps its binding);
- the hash ``unacked`` shared by all queues: messages a worker took but has not
  acknowledged (prefetched, or held for an ETA), values ``[message, exchange,
  routing_key]``.

The probe speaks RESP itself over a trio stream with hiredis's ``Reader``, like
the event source: redis-py's pipeline spends ~15 µs of Python per command,
which is 0.6 s for the 40,000 LLENs of 10,000 queues; packing them in one
write and parsing the replies in C takes ~50 ms.

Consumers cannot be read from Redis: they come from the workers' answers to
the ``active_queues`` control command (:class:`~sluice_celery.control.WorkerInquiry`).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
import hiredis
import orjson
import trio

from sluice_celery.control import PIDBOX_EXCHANGE, RedisClient, RedisMailbox, WorkerInquiry
from sluice_celery.events import FRAMEWORK
from sluice_celery.redis_source import CONNECT_TIMEOUT, RECEIVE_BYTES, RedisError, _ssl_context
from sluice_core.config import ConfigError, redact_url
from sluice_core.model import QueueSample
from sluice_core.probes import WorkerQueues

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 5.0
COMMAND_TIMEOUT = 10.0  # seconds for one round trip, however many commands it carries
# Bindings change when queues are declared, rarely; finding them takes a SCAN of
# the whole keyspace (result keys included), so it is not done at every poll.
DISCOVERY_INTERVAL = 60.0
SCAN_COUNT = 1_000
# Past this many unacked messages, the per-queue split is not read (see _reserved).
RESERVED_DETAIL_MAX = 1_000

SEP = "\x06\x16"
PRIORITY_SUFFIXES = ("", f"{SEP}3", f"{SEP}6", f"{SEP}9")  # kombu's default priority steps
BINDING_PREFIX = "_kombu.binding."
UNACKED = "unacked"
# Exchanges whose bindings are not job queues: events, and the control mailboxes.
_EVENT_EXCHANGE = "celeryev"
_MAILBOX_SUFFIX = ".pidbox"


@attrs.frozen
class RedisAddress:
    """Where a ``redis://`` / ``rediss://`` broker URL points, and how to log in."""

    url: str  # without the password
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls_query: str | None  # the URL's query for rediss:// (TLS options), else None

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigError(
                f"not a Redis URL: {redact_url(url)} (expected redis:// or rediss://)"
            )
        try:
            port = parts.port or 6379
            db = int(parts.path.strip("/") or "0")
        except ValueError:
            raise ConfigError(
                f"bad Redis URL {redact_url(url)}: expected redis://host:port/db with a numeric db"
            ) from None
        return cls(
            url=redact_url(url),
            host=parts.hostname or "localhost",
            port=port,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls_query=parts.query if parts.scheme == "rediss" else None,
        )


class RespConnection:
    """One Redis connection for request/reply: every call is one pipelined round trip."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._reader = hiredis.Reader()

    @classmethod
    async def connect(cls, address: RedisAddress) -> RespConnection:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)
            if address.tls_query is not None:
                tls = trio.SSLStream(
                    stream, _ssl_context(address.tls_query), server_hostname=address.host
                )
                try:
                    await tls.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
                stream = tls
        conn = cls(stream)
        try:
            login: list[tuple[Any, ...]] = []
            if address.password is not None:
                login.append(
                    ("AUTH", address.username, address.password)
                    if address.username
                    else ("AUTH", address.password)
                )
            await conn.execute([*login, ("SELECT", address.db)])
        except BaseException:
            await conn.aclose()
            raise
        return conn

    async def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send all commands in one write and return their replies; raise on an error reply."""
        replies = await self.execute_raw(commands)
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise RedisError(f"Redis refused: {reply}")
        return replies

    async def execute_raw(
        self, commands: list[tuple[Any, ...]], timeout: float = COMMAND_TIMEOUT
    ) -> list[Any]:
        """Like :meth:`execute`, error replies left in the list (a BRPOP may wait ``timeout``)."""
        payload = b"".join([hiredis.pack_command(command) for command in commands])
        replies: list[Any] = []
        with trio.fail_after(timeout):
            # Sent and read at once: Redis stops reading a client whose replies pile up.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stream.send_all, payload)
                while len(replies) < len(commands):
                    while len(replies) < len(commands):
                        reply = self._reader.gets()
                        if reply is False:
                            break
                        replies.append(reply)
                    if len(replies) < len(commands):
                        data = await self._stream.receive_some(RECEIVE_BYTES)
                        if not data:
                            raise RedisError("connection closed by Redis")
                        self._reader.feed(data)
        return replies

    async def scan(self, match: str) -> list[bytes]:
        """Every key matching the glob ``match``, SCANned in steps (never KEYS: it blocks Redis)."""
        keys: list[bytes] = []
        cursor = b"0"
        while True:
            [(cursor, found)] = await self.execute(
                [("SCAN", cursor, "MATCH", match, "COUNT", SCAN_COUNT)]
            )
            keys += found
            if cursor == b"0":
                return keys

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)


def glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@attrs.frozen
class Bindings:
    """Queues bound to exchanges, as kombu's binding sets say."""

    queues: frozenset[str]
    by_route: dict[tuple[str, str], frozenset[str]]  # (exchange, routing key) -> queues

    def route(self, exchange: str, routing_key: str) -> Iterable[str]:
        # A message published to the default exchange "" goes to the queue its key names.
        return self.by_route.get((exchange, routing_key)) or (routing_key,)


def parse_bindings(sets: dict[str, list[bytes]]) -> Bindings:
    """``sets``: exchange -> members of its binding set."""
    by_route: dict[tuple[str, str], set[str]] = defaultdict(set)
    for exchange, members in sets.items():
        if exchange == _EVENT_EXCHANGE or exchange.endswith(_MAILBOX_SUFFIX):
            continue
        for member in members:
            parts = member.decode("utf-8", "replace").split(SEP)
            if len(parts) != 3 or not parts[2]:
                continue  # not written by kombu
            routing_key, _, queue = parts
            by_route[(exchange, routing_key)].add(queue)
    return Bindings(
        queues=frozenset(q for qs in by_route.values() for q in qs),
        by_route={route: frozenset(qs) for route, qs in by_route.items()},
    )


class RedisQueueProbe:
    """Measures the queues of one Redis broker: depth, reserved, and consumers when known."""

    def __init__(
        self,
        url: str,
        *,
        keyprefix: str = "",
        queues: Iterable[str] = (),
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.address = RedisAddress.from_url(url)
        self.name = f"celery/{self.address.url} queues"
        self.interval = interval
        self.keyprefix = keyprefix
        self.configured = frozenset(queues)
        self._conn: RespConnection | None = None
        self._bindings = Bindings(frozenset(), {})
        self._discovered_at = float("-inf")  # trio clock
        self._workers = WorkerInquiry(
            RedisMailbox(RedisClient(url, keyprefix=keyprefix)), name=self.name
        )

    async def probe(self, queues: set[str]) -> list[QueueSample]:
        try:
            return await self._probe(queues)
        except BaseException:
            # A broken or half-read connection is not reused.
            await self.aclose()
            raise

    async def _probe(self, queues: set[str]) -> list[QueueSample]:
        if self._conn is None:
            self._conn = await RespConnection.connect(self.address)
        conn = self._conn
        if trio.current_time() - self._discovered_at >= DISCOVERY_INTERVAL:
            self._bindings = await self.discover(conn)
            self._discovered_at = trio.current_time()
        names = sorted(self._bindings.queues | self.configured | queues)
        prefix = self.keyprefix
        commands: list[tuple[Any, ...]] = [
            ("LLEN", f"{prefix}{name}{suffix}") for name in names for suffix in PRIORITY_SUFFIXES
        ]
        commands.append(("HLEN", prefix + UNACKED))
        # Each worker's mailbox queue is bound to the pidbox exchange: a change in
        # this set is a worker that came online (or left).
        commands.append(("SMEMBERS", f"{prefix}{BINDING_PREFIX}{PIDBOX_EXCHANGE}"))
        replies = await conn.execute(commands)
        nodes = frozenset(replies.pop())
        now = time.time()
        steps = len(PRIORITY_SUFFIXES)
        reserved = await self._reserved(conn, replies[-1], names)
        await self._workers.refresh(nodes)
        consumers = self._workers.consumers
        return [
            QueueSample(
                name=name,
                framework=FRAMEWORK,
                broker=self.address.url,
                timestamp=now,
                depth=sum(replies[i * steps : (i + 1) * steps]),
                reserved=None if reserved is None else reserved.get(name, 0),
                consumers=None if consumers is None else consumers.get(name, 0),
            )
            for i, name in enumerate(names)
        ]

    async def discover(self, conn: RespConnection) -> Bindings:
        """The queues bound in kombu's binding sets (of this key prefix only)."""
        head = self.keyprefix + BINDING_PREFIX
        keys = await conn.scan(glob_escape(head) + "*")
        if not keys:
            return Bindings(frozenset(), {})
        # A binding set holds one member per queue bound to its exchange: small, so all
        # of them are read in one round trip rather than SSCANned set by set.
        members = await conn.execute([("SMEMBERS", key) for key in keys])
        exchanges = [key.decode("utf-8", "replace")[len(head) :] for key in keys]
        return parse_bindings(dict(zip(exchanges, members, strict=True)))

    async def _reserved(
        self, conn: RespConnection, total: int, names: list[str]
    ) -> dict[str, int] | None:
        """Unacked messages per queue, or None when there are too many to split cheaply.

        The split needs every value of the hash (whole messages, arguments
        included): up to RESERVED_DETAIL_MAX that is a bounded read; past it the
        cost grows with the backlog a worker hoards, at every poll, so the probe
        reports "unknown" rather than a sampled guess that would look exact.
        """
        if total == 0:
            return {}
        if total > RESERVED_DETAIL_MAX:
            return None
        [values] = await conn.execute([("HVALS", self.keyprefix + UNACKED)])
        counts: dict[str, int] = defaultdict(int)
        for value in values:
            try:
                _, exchange, routing_key = orjson.loads(value)
            except (ValueError, TypeError):
                continue  # not kombu's [message, exchange, routing_key]
            if isinstance(exchange, str) and isinstance(routing_key, str):
                for queue in self._bindings.route(exchange, routing_key):
                    counts[queue] += 1
        return counts

    def take_worker_queues(self) -> list[WorkerQueues]:
        return self._workers.take_worker_queues()

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()


"""Celery's remote control (the "mailbox") without Celery: docs/celery-protocol.md section 5.

Workers listen on the fanout exchange ``celery.pidbox``. A *broadcast* is one
control message every listening worker gets (``revoke``); a *request* also
names a reply queue, and each worker answers there (``active_queues``,
``stats``). This module builds the messages (:func:`command`) and publishes
them on Redis (:class:`RedisMailbox`) or RabbitMQ (:class:`AmqpMailbox`).

Both mailboxes say how many workers can have heard a broadcast, where the
broker tells: a revoke that reached no worker is lost (workers keep revoked ids
in memory only), and the user must be told rather than shown "revoke sent".

A request (:class:`Request`: the message, its ticket and its reply queue
``<oid>.reply.celery.pidbox``) is sent and answered the same way on both
brokers but for how replies travel: a Redis list, or a RabbitMQ queue bound to
the ``reply.celery.pidbox`` direct exchange. :class:`WorkerInquiry` asks
workers their queues and pool size through either mailbox.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Protocol, TypeVar, cast

import attrs
import orjson
import redis
import trio

from sluice_celery.events import FRAMEWORK, decode_envelope
from sluice_core.config import ConfigError, redact_url
from sluice_core.probes import WorkerQueues
from sluice_rabbitmq.connection import CHANNEL_ERRORS, CONNECTION_ERRORS, AmqpClient
from sluice_rabbitmq.publish import AmqpPublisher, PublishError, publish_confirmed

log = logging.getLogger(__name__)

PIDBOX_EXCHANGE = "celery.pidbox"
REPLY_EXCHANGE = "reply.celery.pidbox"
# Seconds a Redis call may take before it fails (a broker that stops answering
# must fail the action, not hang the request behind it).
REDIS_TIMEOUT = 10.0
# Threads one Redis broker's calls may use at once (redis-py is blocking).
REDIS_THREADS = 4
# Seconds a request waits for workers' answers (Celery's inspect waits 1 s).
REQUEST_TIMEOUT = 1.0
# A RabbitMQ reply queue left behind (Sluice lost its connection mid-request) goes
# after this many ms unused, as kombu's own (control_queue_expires).
REPLY_QUEUE_EXPIRES_MS = 10_000
# Workers are asked which queues they consume this often, and at once when what the
# broker shows of them changes (a worker came or went).
CONSUMERS_INTERVAL = 30.0
KOMBU_SEP = "\x06\x16"  # between the parts of a kombu binding
# A control message's AMQP properties, as kombu's producer sets them.
AMQP_PROPERTIES = {
    "content_type": "application/json",
    "content_encoding": "utf-8",
    "delivery_mode": 2,
}

T = TypeVar("T")
R = TypeVar("R")

# Workers only use the clock to order commands from one sender; kombu's own
# senders start at 1 and count up, per process.
_clock = itertools.count(1)


class NoListener(Exception):
    """The broker took the control message but no worker listens on the mailbox."""


def command(
    method: str,
    arguments: dict[str, Any],
    *,
    destination: list[str] | None = None,
    ticket: str | None = None,
    reply_to: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The body of a control message. ``destination`` limits it to these worker
    nodenames (all workers when None). A request adds ``ticket`` (a uuid the
    replies repeat) and ``reply_to`` (``{"exchange": REPLY_EXCHANGE, "routing_key": oid}``)."""
    body: dict[str, Any] = {
        "method": method,
        "arguments": arguments,
        "destination": destination,
        "pattern": None,
        "matcher": None,
    }
    if ticket is not None:
        body["ticket"] = ticket
        body["reply_to"] = reply_to
    return body


def revoke_command(job_ids: list[str], *, terminate: bool, signal: str) -> dict[str, Any]:
    """One ``revoke`` for any number of jobs: workers take a list of ids."""
    return command(
        "revoke", {"task_id": job_ids, "terminate": terminate, "signal": signal}
    )


def control_headers(expires: float = 0) -> dict[str, Any]:
    """Headers of a control message; workers drop it after ``expires`` (epoch s; 0: never)."""
    return {"clock": next(_clock), "expires": expires}


@attrs.frozen
class Request:
    """One request as both brokers send it: workers answer on the reply queue,
    repeating the ticket."""

    oid: str  # the reply routing key
    ticket: str
    body: bytes
    headers: dict[str, Any]
    destination: list[str] | None

    @classmethod
    def build(
        cls,
        method: str,
        arguments: dict[str, Any] | None,
        destination: list[str] | None,
        timeout: float,
    ) -> Request:
        oid = str(uuid.uuid4())
        ticket = str(uuid.uuid4())
        body = command(
            method,
            arguments or {},
            destination=destination,
            ticket=ticket,
            reply_to={"exchange": REPLY_EXCHANGE, "routing_key": oid},
        )
        # Workers that take it after the caller stopped listening need not answer.
        headers = control_headers(time.time() + timeout)
        return cls(oid, ticket, orjson.dumps(body), headers, destination)

    @property
    def reply_queue(self) -> str:
        return f"{self.oid}.{REPLY_EXCHANGE}"

    def expected(self, heard: int | None) -> int | None:
        """How many answers end the wait: one per named worker, and no more than
        ``heard``, the workers the request reached when the broker tells (Redis).
        None: unknown (RabbitMQ, to every worker), the deadline ends it."""
        if self.destination is None:
            return heard
        if heard is None:
            return len(self.destination)
        return min(heard, len(self.destination))

    def merge(
        self, replies: Iterable[R], read: Callable[[R], tuple[Any, Any]]
    ) -> dict[str, Any]:
        """Merge the replies (each ``{nodename: result}``) to this ticket; ``read`` gives a
        reply's headers and decoded body. A reply that does not decode is skipped and
        logged: one odd worker must not hide the others' answers."""
        out: dict[str, Any] = {}
        for reply in replies:
            try:
                headers, payload = read(reply)
            except ValueError as exc:
                log.warning("skipped an undecodable control reply: %s", exc)
                continue
            if not isinstance(headers, dict) or headers.get("ticket") != self.ticket:
                continue  # an answer to an earlier request
            if isinstance(payload, dict):
                out.update(payload)
        return out


class Mailbox(Protocol):
    url: str  # redacted
    # The broker's errors: the request failed, the answers are unknown.
    errors: tuple[type[BaseException], ...]

    async def request(
        self,
        method: str,
        arguments: dict[str, Any] | None = None,
        *,
        destination: list[str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> dict[str, Any]:
        """Ask the workers (those named in ``destination``, else all) and collect
        their answers: ``{nodename: reply}``.

        Returns once every worker that should answer did, or after ``timeout``
        seconds with the answers so far (a busy worker answers late, a dead one
        never). Raises :class:`NoListener` when no worker listens.
        """
        ...

    async def aclose(self) -> None:
        """Close the broker connection."""
        ...


class WorkerInquiry:
    """Which queues each worker consumes and its pool size, asked through a mailbox
    (``active_queues``, then ``stats`` of the workers that answered), for a probe
    to report as :class:`WorkerQueues`."""

    def __init__(self, mailbox: Mailbox, *, name: str) -> None:
        self.mailbox = mailbox
        self.name = name  # the probe's, for logs
        # Consumers per queue from the workers' last answers; None until they answered.
        self.consumers: dict[str, int] | None = None
        self._asked_at = float("-inf")  # trio clock
        self._seen: Hashable = object()
        self._learnt: list[WorkerQueues] = []

    async def refresh(self, seen: Hashable) -> None:
        """Ask the workers when ``seen`` (what the broker shows of them) changed since
        the last time, or their last answers are :data:`CONSUMERS_INTERVAL` old."""
        if seen == self._seen and trio.current_time() - self._asked_at < CONSUMERS_INTERVAL:
            return
        self._seen = seen
        self._asked_at = trio.current_time()
        try:
            active = await self.mailbox.request("active_queues")
            stats = {}
            if active:
                # Only the workers that answered: the wait ends with the last of them.
                stats = await self.mailbox.request("stats", destination=sorted(active))
        except NoListener:
            active = stats = {}  # no worker at all: every queue has 0 consumers
        except self.mailbox.errors as exc:
            # What the probe measured is still worth recording; this stays as last known.
            log.warning("%s: asking workers for their queues failed: %s", self.name, exc)
            return
        consumers: dict[str, int] = defaultdict(int)
        learnt = []
        for hostname, queues in active.items():
            names = _queue_names(queues)
            for name in names:
                consumers[name] += 1
            learnt.append(
                WorkerQueues(
                    hostname=hostname,
                    framework=FRAMEWORK,
                    queues=names,
                    concurrency=_max_concurrency(stats.get(hostname)),
                )
            )
        self.consumers = dict(consumers)
        self._learnt = learnt

    def take_worker_queues(self) -> list[WorkerQueues]:
        learnt, self._learnt = self._learnt, []
        return learnt


def _queue_names(reply: Any) -> list[str]:
    """The queue names in a worker's ``active_queues`` reply (a list of queue dicts)."""
    entries = reply if isinstance(reply, list) else []
    return sorted(
        {q["name"] for q in entries if isinstance(q, dict) and isinstance(q.get("name"), str)}
    )


def _max_concurrency(stats: Any) -> int | None:
    """The pool size in a worker's ``stats`` reply (``{"pool": {"max-concurrency": n}}``)."""
    pool = stats.get("pool") if isinstance(stats, dict) else None
    value = pool.get("max-concurrency") if isinstance(pool, dict) else None
    return value if isinstance(value, int) else None


# -- Redis ------------------------------------------------------------------------


class RedisClient:
    """redis-py (blocking) in worker threads, for the plugin's writes and requests.

    redis-py parses the broker URL as Celery's Redis transport does (it is the
    client kombu uses), ``rediss://`` and its ``ssl_*`` query options included.
    ``keyprefix`` is Celery's ``global_keyprefix``: kombu puts it in front of
    every key and channel name.
    """

    def __init__(self, url: str, *, keyprefix: str = "") -> None:
        try:
            self.client = redis.Redis.from_url(
                url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
            )
        except ValueError as exc:
            raise ConfigError(f"bad Redis URL {redact_url(url)}: {exc}") from None
        self.url = redact_url(url)
        self.db = int(self.client.connection_pool.connection_kwargs.get("db", 0))
        self.keyprefix = keyprefix
        self._limiter = trio.CapacityLimiter(REDIS_THREADS)

    async def call(self, fn: Callable[[redis.Redis], T]) -> T:
        """Run ``fn(client)`` in a worker thread. Not abandoned on cancellation: a
        write half done must finish (bounded by :data:`REDIS_TIMEOUT`)."""
        return await trio.to_thread.run_sync(fn, self.client, limiter=self._limiter)

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self.client.close, limiter=self._limiter)


def redis_envelope(
    body: bytes,
    headers: dict[str, Any],
    *,
    exchange: str,
    routing_key: str,
    properties: dict[str, Any] | None = None,
) -> bytes:
    """A message as kombu stores and publishes it on Redis: JSON with a base64 ``body``."""
    return orjson.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "delivery_mode": 2,
                "delivery_info": {"exchange": exchange, "routing_key": routing_key},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
                **(properties or {}),
            },
        }
    )


class RedisMailbox:
    """Celery's mailbox on a Redis broker: a fanout exchange is a pub/sub channel."""

    errors: tuple[type[BaseException], ...] = (redis.RedisError,)

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.url = client.url
        # kombu's fanout channel: {global_keyprefix}/{db}.{exchange}
        self.channel = f"{client.keyprefix}/{client.db}.{PIDBOX_EXCHANGE}"

    async def broadcast(self, body: dict[str, Any], *, expires: float = 0) -> int:
        """Publish a control message; returns how many workers received it.
        Raises :class:`NoListener` when none did."""
        envelope = redis_envelope(
            orjson.dumps(body), control_headers(expires), exchange=PIDBOX_EXCHANGE, routing_key=""
        )
        heard: int = await self.client.call(lambda r: r.publish(self.channel, envelope))
        if not heard:
            raise NoListener(f"no worker listens for control commands on {self.client.url}")
        return heard

    async def request(
        self,
        method: str,
        arguments: dict[str, Any] | None = None,
        *,
        destination: list[str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> dict[str, Any]:
        """See :meth:`Mailbox.request`. PUBLISH says how many workers heard it: the
        wait ends with the last of them."""
        request = Request.build(method, arguments, destination, timeout)
        envelope = redis_envelope(
            request.body, request.headers, exchange=PIDBOX_EXCHANGE, routing_key=""
        )
        prefix = self.client.keyprefix
        reply_list = prefix + request.reply_queue
        binding_key = f"{prefix}_kombu.binding.{REPLY_EXCHANGE}"
        # kombu routes a direct-exchange message through the exchange's binding set:
        # this member sends replies with routing key ``oid`` to our list.
        member = f"{request.oid}{KOMBU_SEP}{KOMBU_SEP}{request.reply_queue}"

        def ask(r: redis.Redis) -> tuple[int, list[bytes]]:
            r.sadd(binding_key, member)
            try:
                heard = int(r.publish(self.channel, envelope))
                expected = request.expected(heard)
                replies: list[bytes] = []
                deadline = time.monotonic() + timeout
                while expected and len(replies) < expected:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    popped = r.brpop([reply_list], timeout=left)
                    if popped is None:
                        break
                    replies.append(cast(bytes, popped[1]))  # decode_responses is off
                return heard, replies
            finally:
                r.srem(binding_key, member)
                r.delete(reply_list)

        heard, raw = await self.client.call(ask)
        if not heard:
            raise NoListener(f"no worker listens for control commands on {self.client.url}")
        return request.merge(raw, _redis_reply)

    async def aclose(self) -> None:
        await self.client.aclose()


def _redis_reply(data: bytes) -> tuple[Any, Any]:
    """The headers and the body of a reply as kombu stores it on Redis."""
    envelope = orjson.loads(data)
    headers = envelope.get("headers") if isinstance(envelope, dict) else None
    return headers, decode_envelope(data)


# -- RabbitMQ -----------------------------------------------------------------------


class AmqpMailbox:
    """Celery's mailbox on RabbitMQ: the ``celery.pidbox`` fanout exchange. It publishes
    on the publisher's connection, which a request also consumes its replies on."""

    errors: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, *CHANNEL_ERRORS)

    def __init__(self, publisher: AmqpPublisher, url: str) -> None:
        self.publisher = publisher
        self.url = redact_url(url)

    async def broadcast(self, body: dict[str, Any], *, expires: float = 0) -> None:
        """Publish a control message, confirmed by RabbitMQ. Raises :class:`NoListener`
        when RabbitMQ routed it to no worker (none has a queue on the mailbox, or
        none ever declared it) or refused it."""
        message = orjson.dumps(body)
        headers = control_headers(expires)
        await self._call(lambda client: _publish_control(client, message, headers))

    async def request(
        self,
        method: str,
        arguments: dict[str, Any] | None = None,
        *,
        destination: list[str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> dict[str, Any]:
        """See :meth:`Mailbox.request`. RabbitMQ does not say how many workers a fanout
        reached: without ``destination`` the wait lasts ``timeout``."""
        request = Request.build(method, arguments, destination, timeout)
        replies = await self._call(lambda client: _ask_amqp(client, request, timeout))
        return request.merge(replies, _amqp_reply)

    async def aclose(self) -> None:
        await self.publisher.aclose()

    async def _call(self, fn: Callable[[AmqpClient], T]) -> T:
        try:
            return await self.publisher.client.call(fn)
        except PublishError as exc:
            raise NoListener(f"the control message reached no worker on {self.url}: {exc}") from exc


def _publish_control(client: AmqpClient, body: bytes, headers: dict[str, Any]) -> None:
    # mandatory: RabbitMQ returns a message no worker's mailbox queue receives.
    publish_confirmed(
        client, PIDBOX_EXCHANGE, "", body, headers, AMQP_PROPERTIES, mandatory=True
    )


def _ask_amqp(client: AmqpClient, request: Request, timeout: float) -> list[tuple[Any, Any]]:
    """Publish ``request`` and collect the replies as (headers, body), blocking."""
    channel = client.channel()
    # As kombu declares it (Mailbox.reply_exchange), so that whoever comes first, the
    # other agrees; workers publish their replies to it.
    channel.exchange_declare(REPLY_EXCHANGE, "direct", durable=False, auto_delete=False)
    channel.queue_declare(
        request.reply_queue,
        durable=False,
        exclusive=True,
        auto_delete=True,
        arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS},
    )
    channel.queue_bind(request.reply_queue, REPLY_EXCHANGE, request.oid)
    replies: list[tuple[Any, Any]] = []
    tag = channel.basic_consume(
        request.reply_queue,
        no_ack=True,
        callback=lambda message: replies.append((message.headers, message.body)),
    )
    try:
        _publish_control(client, request.body, request.headers)
        expected = request.expected(None)
        deadline = time.monotonic() + timeout
        while expected is None or len(replies) < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                channel.connection.drain_events(timeout=left)
            except TimeoutError:
                break
    finally:
        # The queue is auto-delete: it goes with its consumer. (RabbitMQ accepts the
        # cancel of a consumer that a channel error already removed.)
        with contextlib.suppress(*CHANNEL_ERRORS):
            channel.basic_cancel(tag)
    return replies


def _amqp_reply(reply: tuple[Any, Any]) -> tuple[Any, Any]:
    headers, body = reply
    return headers, orjson.loads(body)

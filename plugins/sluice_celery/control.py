"""Celery's remote control (the "mailbox") without Celery: CELERY_PROTOCOL.md section 5.

Workers listen on the fanout exchange ``celery.pidbox``. A *broadcast* is one
control message every listening worker gets (``revoke``); a *request* also
names a reply queue, and each worker answers there (``active_queues``,
``stats``). This module builds the messages (:func:`command`) and publishes
them on Redis (:class:`RedisMailbox`) or RabbitMQ (:class:`AmqpMailbox`).

Both mailboxes say how many workers can have heard a broadcast, where the
broker tells: a revoke that reached no worker is lost (workers keep revoked ids
in memory only), and the user must be told rather than shown "revoke sent".

Request/reply (collecting answers from ``<oid>.reply.celery.pidbox``) belongs
beside :meth:`RedisMailbox.broadcast` and :meth:`AmqpMailbox.broadcast`, on the
same connections: :func:`command` already takes the reply fields.
"""

from __future__ import annotations

import base64
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
import redis
import trio

from sluice_celery.events import decode_envelope
from sluice_core.config import ConfigError, redact_url
from sluice_rabbitmq.publish import AmqpPublisher, PublishError

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
KOMBU_SEP = "\x06\x16"  # between the parts of a kombu binding

T = TypeVar("T")

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

    def __init__(self, client: RedisClient) -> None:
        self.client = client
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
        timeout: float = REQUEST_TIMEOUT,
    ) -> dict[str, Any]:
        """Ask every worker and collect the answers: ``{nodename: reply}``.

        Returns once every worker that heard the request answered, or after
        ``timeout`` seconds with the answers so far (a busy worker answers late,
        a dead one never). Raises :class:`NoListener` when no worker listens.
        """
        oid = str(uuid.uuid4())
        ticket = str(uuid.uuid4())
        reply_queue = f"{oid}.{REPLY_EXCHANGE}"
        body = command(
            method,
            arguments or {},
            ticket=ticket,
            reply_to={"exchange": REPLY_EXCHANGE, "routing_key": oid},
        )
        envelope = redis_envelope(
            orjson.dumps(body),
            control_headers(time.time() + timeout),
            exchange=PIDBOX_EXCHANGE,
            routing_key="",
        )
        prefix = self.client.keyprefix
        binding_key = f"{prefix}_kombu.binding.{REPLY_EXCHANGE}"
        # kombu routes a direct-exchange message through the exchange's binding set:
        # this member sends replies with routing key ``oid`` to our list.
        member = f"{oid}{KOMBU_SEP}{KOMBU_SEP}{reply_queue}"

        def ask(r: redis.Redis) -> tuple[int, list[bytes]]:
            r.sadd(binding_key, member)
            try:
                heard = int(r.publish(self.channel, envelope))
                replies: list[bytes] = []
                deadline = time.monotonic() + timeout
                while heard and len(replies) < heard:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    popped = r.brpop([prefix + reply_queue], timeout=left)
                    if popped is None:
                        break
                    replies.append(popped[1])
                return heard, replies
            finally:
                r.srem(binding_key, member)
                r.delete(prefix + reply_queue)

        heard, raw = await self.client.call(ask)
        if not heard:
            raise NoListener(f"no worker listens for control commands on {self.client.url}")
        return _collect_replies(raw, ticket)


def _collect_replies(raw: list[bytes], ticket: str) -> dict[str, Any]:
    """Merge workers' reply envelopes (each ``{nodename: result}``) for this ticket.
    A reply that does not decode is skipped and logged: one odd worker must not
    hide the others' answers."""
    out: dict[str, Any] = {}
    for data in raw:
        try:
            envelope = orjson.loads(data)
            payload = decode_envelope(data)
        except ValueError as exc:
            log.warning("skipped an undecodable control reply: %s", exc)
            continue
        headers = envelope.get("headers") if isinstance(envelope, dict) else None
        if not isinstance(headers, dict) or headers.get("ticket") != ticket:
            continue  # an answer to an earlier request
        if isinstance(payload, dict):
            out.update(payload)
    return out


# -- RabbitMQ -----------------------------------------------------------------------


class AmqpMailbox:
    """Celery's mailbox on RabbitMQ: the ``celery.pidbox`` fanout exchange."""

    def __init__(self, publisher: AmqpPublisher, url: str) -> None:
        self.publisher = publisher
        self.url = redact_url(url)

    async def broadcast(self, body: dict[str, Any], *, expires: float = 0) -> None:
        """Publish a control message, confirmed by RabbitMQ. Raises :class:`NoListener`
        when RabbitMQ routed it to no worker (none has a queue on the mailbox, or
        none ever declared it) or refused it."""
        try:
            await self.publisher.publish(
                PIDBOX_EXCHANGE,
                "",
                orjson.dumps(body),
                control_headers(expires),
                {
                    "content_type": "application/json",
                    "content_encoding": "utf-8",
                    "delivery_mode": 2,
                },
                mandatory=True,
            )
        except PublishError as exc:
            raise NoListener(f"the control message reached no worker on {self.url}: {exc}") from exc

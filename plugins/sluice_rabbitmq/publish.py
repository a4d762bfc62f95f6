"""Publishing to RabbitMQ with publisher confirms, for actions (revoke, retry).

The caller builds the message (Celery's control body for a revoke on the
``celery.pidbox`` fanout exchange, a protocol-2 task message for a retry:
docs/celery-protocol.md sections 5 and 6); this module gets it to the broker and
returns only once RabbitMQ has confirmed it.
"""

from __future__ import annotations

from typing import Any

import amqp

from sluice_rabbitmq.connection import (
    CALL_TIMEOUT,
    CHANNEL_ERRORS,
    AmqpClient,
    AmqpParams,
    describe,
)


class PublishError(Exception):
    """RabbitMQ did not take the message; the message says why and what to check."""


class AmqpPublisher:
    """Publishes on one RabbitMQ broker, over a connection of its own unless given ``client``
    (a probe's, which then also carries its control requests)."""

    def __init__(self, url: str, *, client: AmqpClient | None = None) -> None:
        params = AmqpParams.from_url(url)
        self.client = client or AmqpClient(params, name=f"sluice publisher {params.url}")

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any] | None = None,
        properties: dict[str, Any] | None = None,
        *,
        mandatory: bool = False,
    ) -> None:
        """Publish ``body`` and wait for RabbitMQ's confirm.

        ``headers`` are the AMQP ``application_headers``; ``properties`` the
        basic properties (``content_type``, ``delivery_mode``, ``correlation_id``,
        ``expiration``...). With ``mandatory`` a message no queue receives (a
        task for a queue that does not exist) is an error instead of being
        silently dropped. Raises :class:`PublishError`; connection failures
        raise py-amqp's errors (:data:`~sluice_rabbitmq.connection.CONNECTION_ERRORS`).
        """
        await self.client.call(
            lambda client: publish_confirmed(
                client, exchange, routing_key, body, headers, properties, mandatory=mandatory
            )
        )

    async def aclose(self) -> None:
        await self.client.aclose()


def publish_confirmed(
    client: AmqpClient,
    exchange: str,
    routing_key: str,
    body: bytes,
    headers: dict[str, Any] | None = None,
    properties: dict[str, Any] | None = None,
    *,
    mandatory: bool = False,
) -> None:
    """:meth:`AmqpPublisher.publish` from inside :meth:`AmqpClient.call` (blocking), for
    callers that do more on the same channel in the same call (a control request
    consumes its replies there)."""
    message = amqp.Message(body, application_headers=headers or {}, **(properties or {}))
    try:
        _publish(client, message, exchange, routing_key, mandatory)
    except CHANNEL_ERRORS as exc:
        raise PublishError(
            f"RabbitMQ refused the message for exchange {exchange!r}: {describe(exc)}"
        ) from exc


def _publish(
    client: AmqpClient, message: amqp.Message, exchange: str, routing_key: str, mandatory: bool
) -> None:
    # The first confirmed publish puts the channel in confirm mode (again after
    # a channel error: py-amqp reopens the channel without it).
    channel = client.channel()
    returned: list[str] = []

    def on_return(exc: Exception, *_: Any) -> None:
        returned.append(str(exc))

    # RabbitMQ returns an unroutable mandatory message before confirming it.
    channel.events["basic_return"].add(on_return)
    try:
        channel.basic_publish_confirm(
            message, exchange, routing_key, mandatory=mandatory, confirm_timeout=CALL_TIMEOUT
        )
    except amqp.exceptions.MessageNacked:
        raise PublishError(f"RabbitMQ rejected the message for {exchange!r} (nack)") from None
    finally:
        channel.events["basic_return"].discard(on_return)
    if returned:
        raise PublishError(
            f"no queue receives routing key {routing_key!r} on exchange {exchange!r}"
            f" ({returned[0]}): is the queue declared (has a worker consumed from it)?"
        )

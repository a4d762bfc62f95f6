"""Queue depth and consumers on RabbitMQ (CELERY_PROTOCOL.md section 4).

A passive ``queue.declare`` answers ``message_count`` (ready messages, not the
unacknowledged ones a worker holds) and ``consumer_count``. It fails with 404
for a missing queue and RabbitMQ closes the channel: the probe has a connection
of its own (never the source's), and py-amqp reopens the channel; that queue
is reported with no depth.
"""

from __future__ import annotations

import time

import amqp

from sluice_celery.events import FRAMEWORK
from sluice_core.model import QueueSample
from sluice_rabbitmq.connection import AmqpClient, AmqpParams

DEFAULT_INTERVAL = 5.0


class AmqpQueueProbe:
    """Measures every queue Sluice knows of on one RabbitMQ broker."""

    def __init__(self, url: str, *, interval: float = DEFAULT_INTERVAL) -> None:
        params = AmqpParams.from_url(url)
        self.name = "rabbitmq/" + params.url
        self.interval = interval
        self._client = AmqpClient(params, name=f"sluice probe {params.url}")

    async def probe(self, queues: set[str]) -> list[QueueSample]:
        # All queues in one thread call: a crossing per queue would cost more than the declare.
        return await self._client.call(lambda client: _measure(client, sorted(queues)))

    async def aclose(self) -> None:
        await self._client.aclose()


def _measure(client: AmqpClient, queues: list[str]) -> list[QueueSample]:
    samples = []
    for queue in queues:
        now = time.time()
        try:
            ok = client.channel().queue_declare(queue, passive=True)
        except amqp.exceptions.NotFound:
            samples.append(QueueSample(queue, FRAMEWORK, client.params.url, now))
            continue
        samples.append(
            QueueSample(
                queue,
                FRAMEWORK,
                client.params.url,
                now,
                depth=ok.message_count,
                consumers=ok.consumer_count,
            )
        )
    return samples

"""Queue depth and consumers on RabbitMQ (docs/celery-protocol.md section 4), and each
worker's queues and pool size.

A passive ``queue.declare`` answers ``message_count`` (ready messages, not the
unacknowledged ones a worker holds) and ``consumer_count``: exact, unlike what
workers say. It fails with 404 for a missing queue and RabbitMQ closes the
channel: the probe has a connection of its own (never the source's), and
py-amqp reopens the channel; that queue is reported with no depth.

Workers are asked their queues and concurrency as on Redis
(:class:`~sluice_celery.control.WorkerInquiry`), on the probe's connection;
the queues they consume are measured too, before any job names them.
"""

from __future__ import annotations

import time

import amqp

from sluice_celery.control import AmqpMailbox, WorkerInquiry
from sluice_celery.events import FRAMEWORK
from sluice_core.model import QueueSample
from sluice_core.probes import WorkerQueues
from sluice_rabbitmq.connection import AmqpClient, AmqpParams
from sluice_rabbitmq.publish import AmqpPublisher

DEFAULT_INTERVAL = 5.0


class AmqpQueueProbe:
    """Measures every queue Sluice knows of on one RabbitMQ broker, and learns its workers'."""

    def __init__(self, url: str, *, interval: float = DEFAULT_INTERVAL) -> None:
        params = AmqpParams.from_url(url)
        self.name = "rabbitmq/" + params.url
        self.interval = interval
        self._client = AmqpClient(params, name=f"sluice probe {params.url}")
        mailbox = AmqpMailbox(AmqpPublisher(url, client=self._client), url)
        self._workers = WorkerInquiry(mailbox, name=self.name)

    async def probe(self, queues: set[str]) -> list[QueueSample]:
        names = sorted(queues | set(self._workers.consumers or ()))
        # All queues in one thread call: a crossing per queue would cost more than the declare.
        samples = await self._client.call(lambda client: _measure(client, names))
        # A worker that came or went changes some queue's consumers: ask them again then.
        seen = frozenset((sample.name, sample.consumers) for sample in samples if sample.consumers)
        await self._workers.refresh(seen)
        return samples

    def take_worker_queues(self) -> list[WorkerQueues]:
        return self._workers.take_worker_queues()

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

"""The ``rabbitmq`` transport: Celery's events, queue depth and consumers from RabbitMQ.

It serves every ``amqp://``, ``amqps://`` (TLS) and ``pyamqp://`` URL among the
configured brokers; its batches are normalized by the ``celery`` plugin, which
loads this one and claims those URLs (``--plugin celery`` is all a user names).
"""

from __future__ import annotations

from collections.abc import Callable

from sluice_core import hookimpl
from sluice_core.config import SERVER, Config
from sluice_core.options import SOURCES, Option, OptionParser, seconds
from sluice_core.probes import Probe
from sluice_core.sources import Source
from sluice_rabbitmq.connection import is_amqp_url
from sluice_rabbitmq.probe import DEFAULT_INTERVAL, AmqpQueueProbe
from sluice_rabbitmq.source import DEFAULT_QUEUE_TTL, AmqpEventSource, queue_name

PROBE_INTERVAL = Option(
    "rabbitmq_probe_interval",
    seconds(),
    DEFAULT_INTERVAL,
    "seconds between queue depth/consumer polls",
    commands=SOURCES,
)
QUEUE_TTL = Option(
    "rabbitmq_queue_ttl",
    seconds(),
    DEFAULT_QUEUE_TTL,
    "seconds Sluice's event queue and its messages outlive a lost connection or a stop",
    commands=SOURCES,
)


@hookimpl
def sluice_addoption(parser: OptionParser) -> None:
    parser.add(PROBE_INTERVAL, QUEUE_TTL)


@hookimpl
def sluice_sources(config: Config, register: Callable[[Source], None]) -> None:
    for url in config.brokers:
        if is_amqp_url(url):
            ttl = config.get(QUEUE_TTL)
            # Where the events go names the deployment; the queue's bounds are part of
            # its name too, as RabbitMQ refuses to redeclare a queue with others.
            bounds = f"{ttl:g}/{config.buffer_messages}"
            deployment = (config.db, config.get(SERVER) or "", bounds)
            register(
                AmqpEventSource(
                    url,
                    buffer_messages=config.buffer_messages,
                    queue_ttl=ttl,
                    queue=queue_name(*deployment),
                )
            )


@hookimpl
def sluice_probes(config: Config, register: Callable[[Probe], None]) -> None:
    for url in config.brokers:
        if is_amqp_url(url):
            register(AmqpQueueProbe(url, interval=config.get(PROBE_INTERVAL)))

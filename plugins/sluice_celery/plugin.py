"""The ``celery`` plugin: Celery's events from Redis, and the normalizer for them.

RabbitMQ brokers (``amqp://``) are read by the ``rabbitmq`` plugin, which hands
its messages to this plugin's normalizer as ``celery/amqp`` batches.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from sluice_celery.events import KINDS, normalize_batch
from sluice_celery.redis_source import RedisEventSource
from sluice_core import hookimpl
from sluice_core.config import Config
from sluice_core.model import Normalized, RawBatch
from sluice_core.sources import Source

REDIS_SCHEMES = ("redis://", "rediss://")


@hookimpl
def sluice_addoption(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-keyprefix",
        help="Celery's broker_transport_options global_keyprefix, if the app sets one"
        " (env SLUICE_REDIS_KEYPREFIX)",
    )


@hookimpl
def sluice_sources(config: Config, register: Callable[[Source], None]) -> None:
    keyprefix = str(config.get("redis_keyprefix", ""))
    for url in config.brokers:
        if url.startswith(REDIS_SCHEMES):
            register(RedisEventSource(url, keyprefix=keyprefix))


@hookimpl
def sluice_normalize(batch: RawBatch) -> Normalized | None:
    if batch.kind in KINDS:
        return normalize_batch(batch)
    return None

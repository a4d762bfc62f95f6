"""The ``celery`` plugin: Celery's events from Redis, and the normalizer for them.

RabbitMQ brokers (``amqp://``) are read by the ``rabbitmq`` plugin, which hands
its messages to this plugin's normalizer as ``celery/amqp`` batches.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from sluice_celery.actions import AmqpBroker, Broker, CeleryActions, RedisBroker
from sluice_celery.events import KINDS, normalize_batch
from sluice_celery.redis_probe import DEFAULT_INTERVAL as PROBE_INTERVAL
from sluice_celery.redis_probe import RedisQueueProbe
from sluice_celery.redis_source import RedisEventSource
from sluice_core import hookimpl
from sluice_core.actions import ActionHandler
from sluice_core.config import Config, ConfigError
from sluice_core.model import Normalized, RawBatch
from sluice_core.probes import Probe
from sluice_core.sources import Source
from sluice_rabbitmq.connection import is_amqp_url

REDIS_SCHEMES = ("redis://", "rediss://")


@hookimpl
def sluice_addoption(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-keyprefix",
        help="Celery's broker_transport_options global_keyprefix, if the app sets one"
        " (env SLUICE_REDIS_KEYPREFIX)",
    )
    parser.add_argument(
        "--queues",
        help="comma-separated queues to measure on Redis brokers even before any binding or"
        " job names them (env SLUICE_QUEUES)",
    )
    parser.add_argument(
        "--redis-probe-interval",
        type=float,
        help=f"seconds between queue depth polls on Redis (default {PROBE_INTERVAL:g};"
        " env SLUICE_REDIS_PROBE_INTERVAL)",
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


@hookimpl
def sluice_actions(config: Config, register: Callable[[ActionHandler], None]) -> None:
    keyprefix = str(config.get("redis_keyprefix", ""))
    brokers: list[Broker] = []
    for url in config.brokers:
        if url.startswith(REDIS_SCHEMES):
            brokers.append(RedisBroker(url, keyprefix=keyprefix))
        elif is_amqp_url(url):
            brokers.append(AmqpBroker(url))
    if brokers:
        register(CeleryActions(brokers))


def _probe_interval(config: Config) -> float:
    raw = config.get("redis_probe_interval", PROBE_INTERVAL)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"--redis-probe-interval: expected seconds, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"--redis-probe-interval: must be more than 0, got {raw!r}")
    return value


def _queues(config: Config) -> list[str]:
    raw = config.get("queues", "")
    parts = raw.split(",") if isinstance(raw, str) else [str(part) for part in raw]
    return [part.strip() for part in parts if part.strip()]


@hookimpl
def sluice_configure(config: Config) -> None:
    _probe_interval(config)  # a bad value fails at start, with its option's name


@hookimpl
def sluice_probes(config: Config, register: Callable[[Probe], None]) -> None:
    keyprefix = str(config.get("redis_keyprefix", ""))
    for url in config.brokers:
        if url.startswith(REDIS_SCHEMES):
            register(
                RedisQueueProbe(
                    url,
                    keyprefix=keyprefix,
                    queues=_queues(config),
                    interval=_probe_interval(config),
                )
            )

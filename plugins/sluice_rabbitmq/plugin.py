"""The ``rabbitmq`` plugin: Celery's events, queue depth and consumers from RabbitMQ.

It serves every ``amqp://``, ``amqps://`` (TLS) and ``pyamqp://`` URL among the
configured brokers; its batches are normalized by the ``celery`` plugin.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import attrs

from sluice_core import hookimpl
from sluice_core.config import Config, ConfigError
from sluice_core.probes import Probe
from sluice_core.sources import Source
from sluice_rabbitmq.connection import is_amqp_url
from sluice_rabbitmq.probe import DEFAULT_INTERVAL, AmqpQueueProbe
from sluice_rabbitmq.source import DEFAULT_QUEUE_TTL, AmqpEventSource


@attrs.frozen
class Options:
    probe_interval: float
    queue_ttl: float

    @classmethod
    def from_config(cls, config: Config) -> Options:
        def seconds(option: str, default: float) -> float:
            raw = config.get(option, default)
            flag = "--" + option.replace("_", "-")
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"{flag}: expected seconds, got {raw!r}") from None
            if value <= 0:
                raise ConfigError(f"{flag}: must be more than 0, got {raw!r}")
            return value

        return cls(
            probe_interval=seconds("rabbitmq_probe_interval", DEFAULT_INTERVAL),
            queue_ttl=seconds("rabbitmq_queue_ttl", DEFAULT_QUEUE_TTL),
        )


@hookimpl
def sluice_addoption(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rabbitmq-probe-interval",
        type=float,
        help=f"seconds between queue depth/consumer polls (default {DEFAULT_INTERVAL:.0f};"
        " env SLUICE_RABBITMQ_PROBE_INTERVAL)",
    )
    parser.add_argument(
        "--rabbitmq-queue-ttl",
        type=float,
        help="seconds Sluice's event queue and its messages outlive a lost connection"
        f" (default {DEFAULT_QUEUE_TTL:.0f}; env SLUICE_RABBITMQ_QUEUE_TTL)",
    )


@hookimpl
def sluice_configure(config: Config) -> None:
    Options.from_config(config)  # a bad value fails at start, with its option's name


@hookimpl
def sluice_sources(config: Config, register: Callable[[Source], None]) -> None:
    options = Options.from_config(config)
    for url in config.brokers:
        if is_amqp_url(url):
            register(
                AmqpEventSource(
                    url, buffer_messages=config.buffer_messages, queue_ttl=options.queue_ttl
                )
            )


@hookimpl
def sluice_probes(config: Config, register: Callable[[Probe], None]) -> None:
    options = Options.from_config(config)
    for url in config.brokers:
        if is_amqp_url(url):
            register(AmqpQueueProbe(url, interval=options.probe_interval))

"""The ``celery`` plugin: Celery's events from Redis and RabbitMQ, and the normalizer for them.

RabbitMQ brokers (``amqp://``) are read by the ``rabbitmq`` transport plugin,
which this one loads (``SLUICE_REQUIRES``) and which hands its messages to this
plugin's normalizer as ``celery/amqp`` batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from sluice_celery.actions import AmqpBroker, Broker, CeleryActions, RedisBroker
from sluice_celery.control import AmqpMailbox, Mailbox, RedisClient, RedisMailbox
from sluice_celery.events import KINDS, normalize_batch
from sluice_celery.framework import VISIBILITY_TIMEOUT, celery
from sluice_celery.reconcile import CeleryReconciler, waiting_in_redis
from sluice_celery.redis_probe import DEFAULT_INTERVAL as PROBE_INTERVAL
from sluice_celery.redis_probe import RedisQueueProbe
from sluice_celery.redis_source import RedisEventSource
from sluice_celery.result_backend import open_backend
from sluice_core import hookimpl
from sluice_core.actions import ActionHandler
from sluice_core.config import Config, redact_url
from sluice_core.frameworks import Framework
from sluice_core.model import Normalized, RawBatch
from sluice_core.options import SOURCES, Option, OptionParser, many, seconds, text
from sluice_core.probes import Probe
from sluice_core.reconcile import Reconciler
from sluice_core.sources import Source
from sluice_rabbitmq.connection import AmqpParams, is_amqp_url
from sluice_rabbitmq.publish import AmqpPublisher

# The RabbitMQ transport (sluice_rabbitmq) reads amqp:// brokers for this plugin:
# `--plugin celery` watches Celery on either broker.
SLUICE_REQUIRES = ("rabbitmq",)

REDIS_SCHEMES = ("redis://", "rediss://")

REDIS_KEYPREFIX = Option(
    "redis_keyprefix",
    text(),
    "",
    "Celery's broker_transport_options global_keyprefix, if the app sets one",
    metavar="PREFIX",
)
QUEUES = Option(
    "queues",
    many(text()),
    [],
    "queues to measure on Redis brokers even before any binding or job names them",
    commands=SOURCES,
    metavar="NAME",
)
REDIS_PROBE_INTERVAL = Option(
    "redis_probe_interval",
    seconds(),
    PROBE_INTERVAL,
    "seconds between queue depth polls on Redis",
    commands=SOURCES,
)

RESULT_BACKEND: Option[str | None] = Option(
    "result_backend",
    text(min_length=1),
    None,
    "the application's result_backend, read (never written) after a gap to learn the"
    " outcome of jobs that finished while Sluice was not listening: redis://...,"
    " db+postgresql://... or db+sqlite:///path (JSON results only)",
    metavar="URL",
    secret=True,
)
RESULT_BACKEND_KEYPREFIX = Option(
    "result_backend_keyprefix",
    text(),
    "",
    "the result backend's global_keyprefix (result_backend_transport_options), on Redis",
    metavar="PREFIX",
)


@hookimpl
def sluice_addoption(parser: OptionParser) -> None:
    parser.add(
        REDIS_KEYPREFIX,
        QUEUES,
        REDIS_PROBE_INTERVAL,
        RESULT_BACKEND,
        RESULT_BACKEND_KEYPREFIX,
        VISIBILITY_TIMEOUT,
    )


@hookimpl
def sluice_frameworks(config: Config, register: Callable[[Framework], None]) -> None:
    register(celery(config.get(VISIBILITY_TIMEOUT)))


@hookimpl
def sluice_claim_broker(url: str) -> bool | None:
    return url.startswith(REDIS_SCHEMES) or is_amqp_url(url) or None


@hookimpl
def sluice_sources(config: Config, register: Callable[[Source], None]) -> None:
    for url in config.brokers:
        if url.startswith(REDIS_SCHEMES):
            register(RedisEventSource(url, keyprefix=config.get(REDIS_KEYPREFIX)))


@hookimpl
def sluice_normalize(batch: RawBatch) -> Normalized | None:
    if batch.kind in KINDS:
        return normalize_batch(batch)
    return None


@hookimpl
def sluice_actions(config: Config, register: Callable[[ActionHandler], None]) -> None:
    keyprefix = config.get(REDIS_KEYPREFIX)
    brokers: list[Broker] = []
    for url in config.brokers:
        if url.startswith(REDIS_SCHEMES):
            brokers.append(RedisBroker(url, keyprefix=keyprefix))
        elif is_amqp_url(url):
            brokers.append(AmqpBroker(url))
    if brokers:
        register(CeleryActions(brokers))


@hookimpl
def sluice_probes(config: Config, register: Callable[[Probe], None]) -> None:
    for url in config.brokers:
        if url.startswith(REDIS_SCHEMES):
            register(
                RedisQueueProbe(
                    url,
                    keyprefix=config.get(REDIS_KEYPREFIX),
                    queues=config.get(QUEUES),
                    interval=config.get(REDIS_PROBE_INTERVAL),
                )
            )


@hookimpl
def sluice_reconcilers(config: Config, register: Callable[[Reconciler], None]) -> None:
    brokers = [url for url in config.brokers if url.startswith(REDIS_SCHEMES) or is_amqp_url(url)]
    backend_url = config.get(RESULT_BACKEND)
    for url in brokers:
        mailbox: Mailbox
        waiting = None
        if url.startswith(REDIS_SCHEMES):
            # Named as its event source names it: the gap watch matches them by name.
            broker = redact_url(url)
            client = RedisClient(url, keyprefix=config.get(REDIS_KEYPREFIX))
            mailbox = RedisMailbox(client)
            waiting = functools.partial(waiting_in_redis, client)
        else:
            broker = AmqpParams.from_url(url).url
            mailbox = AmqpMailbox(AmqpPublisher(url), url)
        backend = (
            None
            if backend_url is None
            else open_backend(backend_url, keyprefix=config.get(RESULT_BACKEND_KEYPREFIX))
        )
        register(
            CeleryReconciler(broker, mailbox, backend, sole=len(brokers) == 1, waiting=waiting)
        )

"""What the core needs to know of Celery (sluice_core/frameworks.py): its workers'
heartbeat, the fix for workers without task events, the SDK's pushed format, and
when each broker gives back a job a dead worker had taken.
"""

from __future__ import annotations

import functools
from urllib.parse import urlsplit

from sluice_celery.events import FRAMEWORK, KIND_AMQP
from sluice_core.frameworks import Framework
from sluice_core.options import SOURCES, Option, seconds
from sluice_core.serialize import iso

# Celery's worker_heartbeat default, for workers whose heartbeats do not say (freq).
HEARTBEAT_S = 2.0
# What a user does about a worker whose task events do not reach Sluice.
TASK_EVENTS_ADVICE = (
    "start the worker with -E (or set worker_send_task_events=True), or switch events on"
    " now with: celery -A <app> control enable_events"
)
SETUP_ADVICE = (
    "start your workers with -E (worker_send_task_events) and set task_send_sent_event=True"
    " in the producer"
)
# The SDK's batches are JSON lists of Celery event dicts, exactly a RabbitMQ
# task.multi body: the normalizer reads them as celery/amqp.
PUSHED_FORMATS = {"celery": KIND_AMQP}
# kombu's Redis transport: how long a message taken and not acknowledged stays
# invisible before Redis gives it to another worker (broker_transport_options).
DEFAULT_VISIBILITY_TIMEOUT = 3600.0
VISIBILITY_TIMEOUT = Option(
    "visibility_timeout",
    seconds(),
    DEFAULT_VISIBILITY_TIMEOUT,
    "Celery on Redis: broker_transport_options visibility_timeout, if the app sets it:"
    " when a dead worker's unstarted jobs come back (Sluice says so on the job)",
    commands=SOURCES,
)


def redelivery(
    broker: str | None, taken_at: float | None, *, stopped: bool, visibility_timeout: float
) -> str:
    """When the broker gives back a message that a worker took and never acknowledged.

    ``broker`` is the URL the job's events came through, ``taken_at`` when the worker
    received it, ``stopped`` whether the worker stopped cleanly (worker-offline).
    """
    scheme = urlsplit(broker).scheme if broker else ""
    if scheme in ("amqp", "amqps", "pyamqp"):
        return "RabbitMQ gives it back at once (the worker's connection closed)"
    if scheme in ("redis", "rediss"):
        if stopped:
            return "Redis has it back at once (a stopping worker puts back what it took)"
        when = ""
        if taken_at is not None:
            when = f", at {iso(taken_at + visibility_timeout)}"
        return (
            f"Redis gives it back once its visibility timeout ({visibility_timeout:g}s) has"
            f" passed since the worker took it{when}"
        )
    return "the broker gives it back when it notices the worker is gone"


def celery(visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT) -> Framework:
    return Framework(
        FRAMEWORK,
        heartbeat_s=HEARTBEAT_S,
        job_events_advice=TASK_EVENTS_ADVICE,
        setup_advice=SETUP_ADVICE,
        pushed_formats=PUSHED_FORMATS,
        redelivery=functools.partial(redelivery, visibility_timeout=visibility_timeout),
        # Events do not say whether a task acknowledges late: only a redelivery would
        # show it, and the job then resumes (sluice_core.merge).
        started_redelivered_if="its task acknowledges late (acks_late)",
    )

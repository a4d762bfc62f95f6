"""Re-running a job: Celery's protocol-2 task message, built without Celery
(docs/celery-protocol.md section 6).

A re-run is only worth doing with the job's real arguments. They come from
the SDK's capture of the message when there is one (``job.extra["message"]``:
``{"args": [...], "kwargs": {...}, "embed": {...}, "redacted": bool,
"options": {...}}``, see sdk/sluice/_celery.py; refused when ``redacted``),
else from the event's argument reprs, and only when those parse as complete
literals: Celery cuts
reprs at 1024 characters (a string then ends in ``...``, a list in ``, ...``)
and 3 levels (``[...]``, ``{...}``), and does not escape backslashes, so a repr
that parses may still not be the value. Such jobs are refused with
:class:`~sluice_core.actions.ActionRefused`, saying how to make them re-runnable.
``ast.literal_eval`` only; nothing is ever evaluated.
"""

from __future__ import annotations

import ast
import bisect
import math
import re
import socket
from typing import Any

import attrs
import orjson

from sluice_celery.control import RedisClient, redis_envelope
from sluice_core.actions import ActionRefused
from sluice_core.model import Job, JobEvent
from sluice_core.redact import REDACTED
from sluice_rabbitmq.publish import AmqpPublisher

# kombu's Redis priority queues: steps 0, 3, 6, 9; step 0 is the plain key.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"
REPR_MAXSIZE = 1024  # Celery's argsrepr_maxsize
SUMMARY_MAX = 300  # characters of arguments a retry's confirmation shows
ORIGIN = f"sluice@{socket.gethostname()}"

HOW_TO_FIX = (
    "install the Sluice SDK in the application (it records the full message), or raise "
    "app.amqp.argsrepr_maxsize / kwargsrepr_maxsize (Celery cuts argument reprs at "
    f"{REPR_MAXSIZE} characters) and app.conf.task_repr_maxlevels (3 levels)"
)

# Message options of the SDK's capture that a re-run keeps, and their JSON types.
# Others (eta, expires, group) belong to the first run only. ``headers`` are the
# caller's own message headers.
KEPT_OPTIONS: dict[str, tuple[type, ...]] = {
    "queue": (str,),
    "exchange": (str,),
    "routing_key": (str,),
    "priority": (int,),
    "timelimit": (list,),
    "shadow": (str,),
    "ignore_result": (bool,),
    "headers": (dict,),
}
EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")

# A backslash that is not saferepr's escape of a quote: saferepr writes strings
# between quotes without escaping, so "C:\temp" reads back with a tab in it.
_RAW_BACKSLASH = re.compile(r"\\(?!')")


@attrs.frozen
class Call:
    """What a job was called with, faithfully."""

    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]  # KEPT_OPTIONS found in the SDK's capture
    source: str  # "sdk" or "events"
    # What runs after the job (callbacks, chain...): known from the SDK only.
    embed: dict[str, Any] = attrs.field(factory=lambda: dict.fromkeys(EMBED_KEYS))


@attrs.frozen
class Route:
    """Where a task message goes: a queue (a Redis list) and, on RabbitMQ, the exchange
    and routing key that lead to it."""

    queue: str | None  # None: only an AMQP routing key is known
    exchange: str
    routing_key: str


def route(queue: str | None, exchange: str | None, routing_key: str | None) -> Route | None:
    """The route of a message from what is known of it, with Celery's defaults: the
    routing key is the queue's name, and the default exchange ("") routes by queue name.
    None when neither the queue nor the routing key is known."""
    exchange = exchange or ""
    routing_key = routing_key or queue
    if routing_key is None:
        return None
    if queue is None and exchange == "":
        queue = routing_key
    return Route(queue, exchange, routing_key)


@attrs.frozen
class TaskMessage:
    """A protocol-2 task message, ready for either broker."""

    id: str
    queue: str | None  # the Redis list it goes to (None: only an AMQP routing key is known)
    exchange: str
    routing_key: str
    priority: int | None
    headers: dict[str, Any]
    body: bytes  # JSON [args, kwargs, embed]

    @property
    def route(self) -> Route:
        return Route(self.queue, self.exchange, self.routing_key)


# -- the arguments -------------------------------------------------------------------


def recover_call(job: Job) -> Call:
    """The job's arguments and options, or :class:`ActionRefused` saying why not."""
    message = job.extra.get("message")
    if message is not None:
        return _from_capture(job, message)
    if job.args is None or job.kwargs is None:
        raise ActionRefused(
            f"cannot retry job {job.id}: Sluice never saw its arguments (no task-sent or "
            f"task-received event carried them). To make jobs re-runnable, {HOW_TO_FIX}."
        )
    args = _literal(job, "args", job.args)
    kwargs = _literal(job, "kwargs", job.kwargs)
    if not isinstance(args, (tuple, list)):
        raise _unfaithful(job, "args", "it is not a tuple or list of arguments")
    if not isinstance(kwargs, dict):
        raise _unfaithful(job, "kwargs", "it is not a dict of keyword arguments")
    return Call(list(args), kwargs, {}, "events")


def _from_capture(job: Job, message: Any) -> Call:
    def malformed(what: str) -> ActionRefused:
        return ActionRefused(
            f"cannot retry job {job.id}: the SDK's record of its message is malformed ({what})"
        )

    if not isinstance(message, dict):
        raise malformed("not an object")
    if message.get("redacted") is True:
        raise ActionRefused(
            f"cannot retry job {job.id} faithfully: the SDK did not record its real arguments "
            "(its redaction rules matched, send_args is off, or the caller masked argsrepr), "
            "and a re-run must not use placeholders. Send the job again from the application."
        )
    args, kwargs = message.get("args"), message.get("kwargs", {})
    options = message.get("options", {})
    embed = message.get("embed") or {}
    if not isinstance(args, list):
        raise malformed("args is not a list")
    if not isinstance(kwargs, dict):
        raise malformed("kwargs is not an object")
    if not isinstance(options, dict):
        raise malformed("options is not an object")
    if not isinstance(embed, dict):
        raise malformed("embed is not an object")
    kept = {}
    for name, types in KEPT_OPTIONS.items():
        value = options.get(name)
        if value is None:
            continue
        if type(value) not in types:
            raise malformed(f"options.{name} is a {type(value).__name__}")
        kept[name] = value
    timelimit = kept.get("timelimit")
    if timelimit is not None and not (
        len(timelimit) == 2
        and all(t is None or (type(t) in (int, float) and t >= 0) for t in timelimit)
    ):
        raise malformed("options.timelimit is not [hard, soft] seconds")
    return Call(args, kwargs, kept, "sdk", {key: embed.get(key) for key in EMBED_KEYS})


def _literal(job: Job, what: str, text: str) -> Any:
    if repr(REDACTED) in text:
        raise _unfaithful(
            job, what, "Sluice redacted a secret in it (--redact-keys, --redact-patterns)"
        )
    if _RAW_BACKSLASH.search(text):
        raise _unfaithful(
            job, what, "it contains a backslash, which Celery's repr does not escape"
        )
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        if text.rstrip(")]}'\" ,").endswith("..."):
            raise _unfaithful(job, what, "Celery truncated it") from None
        raise _unfaithful(
            job, what, "it is not made of plain literals (an object such as a date has none)"
        ) from None
    problem = _not_json(value)
    if problem is not None:
        raise _unfaithful(job, what, problem)
    return value


def _not_json(value: Any) -> str | None:
    """Why ``value`` is not exactly what the worker got (JSON), or None if it is."""
    # saferepr writes a container past its depth limit as [...], (...) or {...}: the
    # last is a set holding Ellipsis.
    if value is Ellipsis or value == {Ellipsis}:
        return "Celery elided part of it ('...')"
    if value is None or type(value) in (bool, int):
        return None
    if type(value) is float:
        return None if math.isfinite(value) else "it holds a number JSON cannot carry"
    if type(value) is str:
        # What saferepr cut short ends in "..." inside its quotes.
        return "Celery truncated a string in it ('...')" if value.endswith("...") else None
    if type(value) in (list, tuple):
        return next((p for p in map(_not_json, value) if p is not None), None)
    if type(value) is dict:
        if not all(type(key) is str for key in value):
            return "a dict in it has keys that are not strings (JSON would change them)"
        return next((p for p in map(_not_json, value.values()) if p is not None), None)
    return f"it holds a {type(value).__name__}, which Celery's JSON messages cannot carry"


def _unfaithful(job: Job, what: str, why: str) -> ActionRefused:
    return ActionRefused(
        f"cannot retry job {job.id} faithfully: its {what} are only known as the repr "
        f"Celery put in its events, and {why}. To make jobs re-runnable, {HOW_TO_FIX}."
    )


def summary(call: Call) -> str:
    """The arguments as the worker gets them (JSON), cut to fit a confirmation."""
    parts = [orjson.dumps(value).decode() for value in call.args]
    parts += [f"{key}={orjson.dumps(value).decode()}" for key, value in call.kwargs.items()]
    text = f"({', '.join(parts)})"
    return text if len(text) <= SUMMARY_MAX else text[: SUMMARY_MAX - 1] + "…"


def details(call: Call) -> tuple[str, ...]:
    """What else shapes the run, beside the job name, queue and arguments: shown before
    a retry so that nothing the capture carries is published unseen."""
    out = []
    if call.options.get("priority") is not None:
        out.append(f"priority {call.options['priority']}")
    if call.options.get("headers"):
        out.append("headers " + ", ".join(sorted(call.options["headers"])))
    if call.options.get("shadow"):
        out.append(f"shown as {call.options['shadow']}")
    then = [key for key in EMBED_KEYS if call.embed.get(key)]
    if then:
        out.append("then " + ", ".join(then))
    return tuple(out)


# -- the message ---------------------------------------------------------------------


def task_message(job: Job, call: Call, *, new_id: str) -> TaskMessage:
    """The message that re-runs ``job`` as the new job ``new_id``, on the job's original
    queue (exchange and routing key where known)."""
    if not job.name:
        raise ActionRefused(f"cannot retry job {job.id}: Sluice does not know its task name")
    options = call.options
    # One source for the whole route: a capture's queue with the events' routing key
    # would say one queue and, on RabbitMQ, publish to another.
    found = (
        route(options.get("queue"), options.get("exchange"), options.get("routing_key"))
        if any(options.get(key) for key in ("queue", "exchange", "routing_key"))
        else route(job.queue, _text(job.extra.get("exchange")), _text(job.extra.get("routing_key")))
    )
    if found is None:
        raise ActionRefused(
            f"cannot retry job {job.id}: Sluice does not know which queue it was sent to "
            "(no task-sent event): set task_send_sent_event=True in the application"
        )
    priority = options.get("priority")
    root_id = job.root_id if job.root_id not in (None, job.id) else new_id
    headers = {
        # The caller's own headers first: Celery's below are never overridden.
        **options.get("headers", {}),
        "lang": "py",
        "task": job.name,
        "id": new_id,
        "shadow": options.get("shadow"),
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": options.get("timelimit", [None, None]),
        "root_id": root_id,
        "parent_id": job.parent_id,
        # Celery's own reprs of these very arguments (the SDK records them unmasked
        # only): anything else would look masked to the SDK in the worker.
        "argsrepr": job.args,
        "kwargsrepr": job.kwargs,
        "origin": ORIGIN,
        "ignore_result": options.get("ignore_result", False),
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        # Lets the application (and the SDK) tell a re-run by Sluice from a first run.
        "sluice_retry_of": job.id,
    }
    return TaskMessage(
        id=new_id,
        queue=found.queue,
        exchange=found.exchange,
        routing_key=found.routing_key,
        priority=priority,
        headers=headers,
        body=orjson.dumps([call.args, call.kwargs, call.embed]),
    )


def event_route(event: JobEvent) -> Route | None:
    """The route an event records: a task-sent's (and a retry's) queue, exchange and
    routing key, read as :func:`task_message` reads them from the job."""
    return route(
        _text(event.fields.get("queue")),
        _text(event.extra.get("exchange")),
        _text(event.extra.get("routing_key")),
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def redis_queue_key(queue: str, priority: int | None, keyprefix: str = "") -> str:
    """The Redis list a message for ``queue`` at ``priority`` goes to, as kombu names it."""
    clamped = min(max(priority or 0, 0), 9)
    step = PRIORITY_STEPS[bisect.bisect_right(PRIORITY_STEPS, clamped) - 1]
    return f"{keyprefix}{queue}{PRIORITY_SEP}{step}" if step else f"{keyprefix}{queue}"


async def push_redis(client: RedisClient, message: TaskMessage) -> None:
    """LPUSH the message to its queue's list, where workers BRPOP it."""
    if message.queue is None:
        raise ActionRefused(
            f"cannot retry on Redis: exchange {message.exchange!r} with routing key "
            f"{message.routing_key!r} names no queue Sluice can push to"
        )
    entry = redis_envelope(
        message.body,
        message.headers,
        exchange=message.exchange,
        routing_key=message.routing_key,
        properties={"correlation_id": message.id, "priority": message.priority or 0},
    )
    key = redis_queue_key(message.queue, message.priority, client.keyprefix)
    await client.call(lambda r: r.lpush(key, entry))


async def publish_amqp(publisher: AmqpPublisher, message: TaskMessage) -> None:
    """Publish to the message's exchange and routing key; unroutable is an error
    (:class:`~sluice_rabbitmq.publish.PublishError`), not a silent drop."""
    properties: dict[str, Any] = {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
        "correlation_id": message.id,
    }
    if message.priority is not None:
        properties["priority"] = message.priority
    await publisher.publish(
        message.exchange,
        message.routing_key,
        message.body,
        message.headers,
        properties,
        mandatory=True,
    )

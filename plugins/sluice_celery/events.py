"""Celery events on the wire -> Sluice's normalized events (docs/celery-protocol.md sections 1-3).

Pure functions; Celery itself is never imported. Two wire formats come in as
:class:`~sluice_core.model.RawBatch` kinds:

- ``celery/redis``: ``(channel, envelope)``, the kombu envelope Celery PUBLISHes
  on Redis (JSON, with the event JSON base64-encoded in ``body``);
- ``celery/amqp``: ``(routing_key, body)``, the raw JSON body of a message from
  RabbitMQ's ``celeryev`` exchange.

Either body is one event (a JSON object) or, for ``task.multi``, a list of them.
This is the hot path (a burst runs at the machine's limit), so the loop does
plain ``type()`` checks and dict look-ups, no validators and no per-event logging.
It checks shapes and types; the values themselves (a timestamp in year 33658, an
integer no column holds, a NUL in a name) are checked by the core for every
plugin alike, on what this returns (:mod:`sluice_core.validate`).
"""

from __future__ import annotations

import binascii
import datetime as dt
import logging
import re
from collections.abc import Callable
from typing import Any, Final

import orjson

from sluice_core.merge import ARGS_COMPLETE
from sluice_core.model import JobEvent, JobState, Normalized, RawBatch, WorkerEvent, event_id
from sluice_core.validate import Throttle

log = logging.getLogger(__name__)

FRAMEWORK: Final = "celery"
KIND_REDIS: Final = "celery/redis"
KIND_AMQP: Final = "celery/amqp"
KINDS: Final = frozenset({KIND_REDIS, KIND_AMQP})
# A broker source's name is this and the broker's URL, password redacted.
SOURCE_PREFIX: Final = "celery/"
# The field the SDK adds to task-sent and task-received events (Celery sends none such).
SDK_MESSAGE: Final = "sluice_message"


class MalformedEvent(ValueError):
    """A message that does not decode to Celery events, or an event that is not one."""


# -- decoding ------------------------------------------------------------------


def decode_envelope(data: bytes) -> Any:
    """The event payload (a dict, or a list for ``task.multi``) of a kombu Redis envelope."""
    envelope = orjson.loads(data)
    if type(envelope) is not dict:
        raise MalformedEvent("not a kombu envelope (expected a JSON object)")
    content_type = envelope.get("content-type")
    if content_type != "application/json":
        # The event serializer is configurable; Sluice reads JSON only.
        raise MalformedEvent(
            f"content-type {content_type!r}: Sluice reads application/json events only"
            " (the workers' event_serializer must be 'json')"
        )
    body = envelope.get("body")
    if type(body) is not str:
        raise MalformedEvent("envelope has no string body")
    properties = envelope.get("properties")
    if type(properties) is dict and properties.get("body_encoding") == "base64":
        return orjson.loads(binascii.a2b_base64(body, strict_mode=True))
    return orjson.loads(body)


_DECODERS: Final[dict[str, Callable[[bytes], Any]]] = {
    KIND_REDIS: decode_envelope,
    KIND_AMQP: orjson.loads,
}


# -- normalizing -----------------------------------------------------------------

_STR = (str,)
_INT = (int,)
_NUM = (float, int)

# The JSON types each job field may have on the wire; anything else is malformed
# (storage and the UI rely on these types).
_FIELD_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "name": _STR,
    "queue": _STR,
    "args": _STR,
    "kwargs": _STR,
    "root_id": _STR,
    "parent_id": _STR,
    "eta": _STR,
    "expires": _STR,
    "result": _STR,
    "exception": _STR,
    "traceback": _STR,
    "retries": _INT,
    "runtime": _NUM,
}

# (field, the JSON types it may have), per event type.
_Fields = tuple[tuple[str, tuple[type, ...]], ...]
# Event type -> (state, job fields, framework extras).
_TaskSpec = tuple[JobState | None, _Fields, tuple[str, ...]]


def _fields(*names: str) -> _Fields:
    return tuple((name, _FIELD_TYPES[name]) for name in names)


_REQUEST = ("name", "args", "kwargs", "retries", "root_id", "parent_id", "eta", "expires")

# A state of None only adds to the timeline: a cancelled task is redelivered,
# its job goes on.
_TASK_EVENTS: Final[dict[str, _TaskSpec]] = {
    "task-sent": (JobState.QUEUED, _fields(*_REQUEST, "queue"), ("exchange", "routing_key")),
    "task-received": (JobState.RECEIVED, _fields(*_REQUEST), ()),
    "task-started": (JobState.ACTIVE, (), ()),
    "task-succeeded": (JobState.COMPLETED, _fields("result", "runtime"), ()),
    "task-failed": (JobState.FAILED, _fields("exception", "traceback"), ()),
    "task-retried": (JobState.RETRYING, _fields("exception", "traceback"), ()),
    "task-rejected": (JobState.REJECTED, (), ("requeue",)),
    "task-revoked": (JobState.REVOKED, (), ("terminated", "signum", "expired")),
    "task-cancelled": (None, (), ()),
}

_WORKER_EVENTS: Final = {
    "worker-online": "online",
    "worker-heartbeat": "heartbeat",
    "worker-offline": "offline",
}

# A failed task whose pool child died (SIGKILL, OOM): Celery 5 sends
# "ExceptionWithTraceback()" and names the error only in the traceback's last line.
_WORKER_LOST_TB = "billiard.exceptions.WorkerLostError"
_WORKER_LOST_EXC = "WorkerLostError("
# billiard's wrapper for an error raised outside the task: the real one is the
# traceback's last line, "module.Class: message".
_WRAPPED = "ExceptionWithTraceback()"
_LAST_LINE = re.compile(r"(?:[\w.]+\.)?(\w+)(?:: (.*))?\Z", re.DOTALL)
_NOT_REGISTERED = re.compile(r"""NotRegistered\((['"])(.+)\1\)\Z""")


def _worker_name(hostname: str) -> str | None:
    """The worker that sent an event; None for a producer, named ``gen<pid>@host``."""
    if hostname.startswith("gen"):
        pid, at, _ = hostname[3:].partition("@")
        if at and pid.isdigit():
            return None
    return hostname


def _last_line(traceback: str) -> str:
    return traceback.rstrip().rpartition("\n")[2]


def _worker_lost(exception: str, traceback: str) -> bool:
    return exception.startswith(_WORKER_LOST_EXC) or _last_line(traceback).startswith(
        _WORKER_LOST_TB
    )


def _headline(exception: str, traceback: str) -> str:
    """The exception as the job's headline: billiard's wrapper replaced by what it wraps,
    ``WorkerLostError('Worker exited prematurely: signal 9 (SIGKILL) Job: 6.')``."""
    if exception != _WRAPPED or (match := _LAST_LINE.match(_last_line(traceback))) is None:
        return exception
    name, message = match[1], match[2]
    return f"{name}({message!r})" if message is not None else f"{name}()"


def _epoch(iso: str) -> float | None:
    try:
        when = dt.datetime.fromisoformat(iso)
    except ValueError:
        return None
    if when.tzinfo is None:
        # Celery stamps ETAs in UTC with an offset; a naive one can only be taken as UTC.
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _sdk_message(event: dict[str, Any], fields: dict[str, Any], extra: dict[str, Any]) -> None:
    """The full message the SDK saw (real args and kwargs, routing, limits; see sdk/):
    kept as the job's ``extra["message"]``, from which the retry action re-publishes.

    When the SDK captured the real arguments whole (``redacted`` false: no redaction of
    its own, nothing masked or left out), the job's args and kwargs are their full
    reprs, which win over Celery's argsrepr/kwargsrepr (cut at 1,024 characters) from
    any other event (:data:`sluice_core.merge.ARGS_COMPLETE`). Sluice's own redaction
    comes after, on both (:meth:`sluice_core.plugins.PluginManager.admit`)."""
    message = event.get(SDK_MESSAGE)
    if type(message) is not dict:
        return
    extra["message"] = message
    args, kwargs = message.get("args"), message.get("kwargs")
    if message.get("redacted") is False and type(args) is list and type(kwargs) is dict:
        # As Celery's saferepr shows them: the positional arguments as a tuple.
        fields["args"], fields["kwargs"] = repr(tuple(args)), repr(kwargs)
        extra[ARGS_COMPLETE] = True


def _task_event(
    etype: str,
    spec: _TaskSpec,
    event: dict[str, Any],
    hostname: str,
    timestamp: float,
    out: Normalized,
    broker: str | None,
) -> None:
    uuid = event.get("uuid")
    if type(uuid) is not str or not uuid:
        raise MalformedEvent(f"{etype} without a uuid")
    state, typed_fields, extra_names = spec
    fields: dict[str, Any] = {}
    for key, types in typed_fields:
        value = event.get(key)
        if value is not None:
            if type(value) not in types:
                raise MalformedEvent(f"{etype}: {key} is a {type(value).__name__}")
            fields[key] = value
    extra = (
        {key: event[key] for key in extra_names if event.get(key) is not None}
        if extra_names
        else {}
    )

    if etype in ("task-sent", "task-received") and broker is not None:
        # Which broker carried the job: a retry must publish on that one.
        extra["broker"] = broker
    if etype == "task-sent":
        if "queue" not in fields and type(extra.get("routing_key")) is str:
            fields["queue"] = extra["routing_key"]
        _sdk_message(event, fields, extra)
    elif etype == "task-received":
        _sdk_message(event, fields, extra)
        eta = fields.get("eta")
        if eta is not None:
            eta_ts = _epoch(eta)
            if eta_ts is not None and eta_ts > timestamp:
                state = JobState.SCHEDULED
    elif etype == "task-failed":
        exception = fields.get("exception", "")
        if exception:
            fields["exception"] = _headline(exception, fields.get("traceback", ""))
        if _worker_lost(exception, fields.get("traceback", "")):
            state = JobState.LOST
        elif (match := _NOT_REGISTERED.match(exception)) is not None:
            # No task-received precedes it: the exception is the only place the name is.
            fields["name"] = match[2]

    out.job_events.append(
        JobEvent(
            id=event_id(uuid, etype, hostname, event.get("pid"), event.get("clock"), timestamp),
            job_id=uuid,
            framework=FRAMEWORK,
            type=etype,
            state=state,
            timestamp=timestamp,
            worker=_worker_name(hostname),
            fields=fields,
            extra=extra,
        )
    )


_WORKER_FIELDS: Final[_Fields] = (
    ("freq", _NUM),
    ("active", _INT),
    ("processed", _INT),
    ("loadavg", (list,)),
    ("pid", _INT),
    ("sw_ver", _STR),
)


def _worker_event(kind: str, event: dict[str, Any], hostname: str, timestamp: float) -> WorkerEvent:
    get = event.get
    for key, types in _WORKER_FIELDS:
        value = get(key)
        if value is not None and type(value) not in types:
            raise MalformedEvent(f"{event['type']}: {key} is a {type(value).__name__}")
    loadavg = get("loadavg")
    if loadavg is not None and not all(type(x) in _NUM for x in loadavg):
        raise MalformedEvent(f"{event['type']}: loadavg is not a list of numbers")
    return WorkerEvent(
        hostname=hostname,
        framework=FRAMEWORK,
        type=kind,
        timestamp=timestamp,
        freq=get("freq"),
        active=get("active"),
        processed=get("processed"),
        loadavg=loadavg,
        pid=get("pid"),
        sw_ver=get("sw_ver"),
        extra={key: event[key] for key in ("sw_ident", "sw_sys") if get(key) is not None},
    )


def _normalize_event(event: Any, out: Normalized, broker: str | None) -> None:
    if type(event) is not dict:
        raise MalformedEvent(f"an event is a JSON object, not a {type(event).__name__}")
    etype = event.get("type")
    if type(etype) is not str:
        raise MalformedEvent("event without a type")
    spec = _TASK_EVENTS.get(etype)
    worker_kind = None if spec is not None else _WORKER_EVENTS.get(etype)
    if spec is None and worker_kind is None:
        out.ignored += 1  # a custom event (app.events.send) or one from a newer Celery
        return
    hostname = event.get("hostname")
    if type(hostname) is not str:
        raise MalformedEvent(f"{etype} without a hostname")
    timestamp = event.get("timestamp")
    if type(timestamp) not in _NUM:
        raise MalformedEvent(f"{etype} without a numeric timestamp")
    assert timestamp is not None  # for mypy: a number, checked above
    if spec is not None:
        _task_event(etype, spec, event, hostname, float(timestamp), out, broker)
    elif worker_kind is not None:
        out.worker_events.append(_worker_event(worker_kind, event, hostname, float(timestamp)))


def normalize_batch(batch: RawBatch) -> Normalized:
    """Decode and normalize a ``celery/redis`` or ``celery/amqp`` batch. Never raises
    for bad input: what does not decode is logged (rate-limited) and counted."""
    decode = _DECODERS.get(batch.kind)
    if decode is None:
        raise ValueError(f"not a Celery batch: {batch.kind!r} (expected one of {sorted(KINDS)})")
    out = Normalized()
    source = batch.source
    broker = source.removeprefix(SOURCE_PREFIX) if source.startswith(SOURCE_PREFIX) else None
    for channel, data in batch.messages:
        try:
            payload = decode(data)
        except (ValueError, TypeError) as exc:  # orjson and binascii errors are ValueErrors
            out.malformed += 1
            _report_malformed(batch.source, channel, data, exc)
            continue
        for event in payload if type(payload) is list else (payload,):
            try:
                _normalize_event(event, out, broker)
            except MalformedEvent as exc:
                out.malformed += 1
                _report_malformed(batch.source, channel, data, exc)
    return out


# -- logging malformed input -------------------------------------------------------


_malformed_throttle = Throttle(10.0)


def _report_malformed(source: str, channel: str, data: bytes, exc: Exception) -> None:
    if not _malformed_throttle.allow():
        return
    suppressed, _malformed_throttle.suppressed = _malformed_throttle.suppressed, 0
    log.warning(
        "%s: skipped a malformed message on %r: %s; it starts %r%s",
        source,
        channel,
        exc,
        bytes(data[:120]),
        f" ({suppressed} more skipped since the last report)" if suppressed else "",
    )

"""Celery's signals, turned into Celery's own event dicts (what ``-E`` would send).

The server's Celery normalizer reads them as it reads events from a broker. Two
things differ from Celery's events: they need no event flags on the workers,
and ``task-sent`` / ``task-received`` carry ``sluice_message``, the real
arguments and routing of the message (for faithful retries), redacted as
configured::

    {"args": [...], "kwargs": {...}, "embed": {...}, "redacted": false,
     "options": {"exchange", "routing_key", "queue", "priority", "timelimit",
                 "eta", "expires", "group", "group_index", "shadow", "ignore_result",
                 "headers"}}

``redacted`` is true whenever the real values are not all there (redaction
rules hit, ``send_args=False``, or the caller masked ``argsrepr`` itself): a
retry must not run with placeholders.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import socket
import threading
import time
from typing import Any, Callable

from celery import signals
from celery.utils.saferepr import saferepr
from celery.utils.time import utcoffset

from sluice._redact import Redactor
from sluice._transport import Transport

log = logging.getLogger("sluice")

REPR_MAX = 1024  # Celery's argsrepr / resultrepr size
MESSAGE = "sluice_message"
# Task message headers Celery itself sets (docs/celery-protocol.md section 6); others are
# the caller's.
STANDARD_HEADERS = frozenset(
    {
        "lang",
        "task",
        "id",
        "shadow",
        "eta",
        "expires",
        "group",
        "group_index",
        "retries",
        "timelimit",
        "root_id",
        "parent_id",
        "argsrepr",
        "kwargsrepr",
        "origin",
        "ignore_result",
        "replaced_task_nesting",
        "stamped_headers",
        "stamps",
    }
)


def _iso(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.isoformat() if hasattr(value, "isoformat") else None


def _name(exchange: Any) -> str | None:
    return (
        exchange
        if isinstance(exchange, str) or exchange is None
        else getattr(exchange, "name", None)
    )


class Hooks:
    """Receivers of Celery's signals; each builds an event and hands it to the transport."""

    def __init__(self, transport: Transport, redactor: Redactor, *, send_args: bool) -> None:
        self.transport = transport
        self._redactor = redactor
        self._send_args = send_args
        self._clock = itertools.count(1)
        self._pending = threading.local()  # task-sent, built before publish, sent after it
        self._started: dict[str, float] = {}  # task id -> when it started (runtime)
        self.errors = 0
        self._receivers: list[tuple[Any, Callable[..., None]]] = []

    # -- wiring ------------------------------------------------------------------------

    def connect(self) -> None:
        for signal, receiver in (
            (signals.before_task_publish, self._before_publish),
            (signals.after_task_publish, self._after_publish),
            (signals.task_received, self._received),
            (signals.task_prerun, self._prerun),
            (signals.task_postrun, self._postrun),
            (signals.task_success, self._success),
            (signals.task_failure, self._failure),
            (signals.task_retry, self._retry),
            (signals.task_revoked, self._revoked),
            (signals.task_rejected, self._rejected),
            (signals.worker_ready, self._worker_ready),
            (signals.heartbeat_sent, self._heartbeat),
            (signals.worker_shutdown, self._worker_shutdown),
            (signals.worker_process_shutdown, self._process_shutdown),
        ):
            guarded = self._guard(receiver)
            signal.connect(guarded, weak=False)
            self._receivers.append((signal, guarded))

    def disconnect(self) -> None:
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)
        self._receivers.clear()

    def _guard(self, receiver: Callable[..., None]) -> Callable[..., None]:
        """Nothing the SDK does may raise into the application."""

        @functools.wraps(receiver)
        def guarded(*args: Any, **kwargs: Any) -> None:
            try:
                receiver(*args, **kwargs)
            except Exception:
                self.errors += 1
                log.debug("sluice: %s failed", receiver.__name__, exc_info=True)

        return guarded

    # -- building events -----------------------------------------------------------------

    def _event(self, type_: str, hostname: str | None, **fields: Any) -> dict[str, Any]:
        event = {
            "type": type_,
            "hostname": hostname or f"gen{os.getpid()}@{socket.gethostname()}",
            "utcoffset": utcoffset(),
            "pid": os.getpid(),
            "clock": next(self._clock),
            "timestamp": time.time(),
        }
        event.update((key, value) for key, value in fields.items() if value is not None)
        return event

    def _arguments(
        self, args: Any, kwargs: Any, argsrepr: str | None, kwargsrepr: str | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The event's display reprs, and the message's real arguments."""
        if not self._send_args:
            return {}, {"redacted": True}
        if args is None or kwargs is None:  # not a protocol 2 body: only the reprs are known
            return {"args": argsrepr, "kwargs": kwargsrepr}, {"redacted": True}
        safe_args, hit_args = self._redactor.apply(args)
        safe_kwargs, hit_kwargs = self._redactor.apply(kwargs)
        if hit_args or hit_kwargs:
            reprs = {
                "args": saferepr(safe_args, REPR_MAX),
                "kwargs": saferepr(safe_kwargs, REPR_MAX),
            }
            return reprs, {"args": list(safe_args), "kwargs": safe_kwargs, "redacted": True}
        if _masked(args, argsrepr) or _masked(kwargs, kwargsrepr):
            # The caller replaced the repr to hide something: the real values stay here.
            return {"args": argsrepr, "kwargs": kwargsrepr}, {"redacted": True}
        reprs = {
            "args": argsrepr if argsrepr is not None else saferepr(args, REPR_MAX),
            "kwargs": kwargsrepr if kwargsrepr is not None else saferepr(kwargs, REPR_MAX),
        }
        return reprs, {"args": list(args), "kwargs": dict(kwargs), "redacted": False}

    def _message(
        self, args: Any, kwargs: Any, embed: Any, headers: dict[str, Any], options: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        fields, message = self._arguments(
            args, kwargs, headers.get("argsrepr"), headers.get("kwargsrepr")
        )
        if "args" in message and isinstance(embed, dict):
            safe_embed, hit = self._redactor.apply(embed)
            message["embed"] = safe_embed
            message["redacted"] = message["redacted"] or hit
        custom = {k: v for k, v in headers.items() if k not in STANDARD_HEADERS}
        message["options"] = {
            **options,
            "timelimit": headers.get("timelimit"),
            "eta": _iso(headers.get("eta")),
            "expires": _iso(headers.get("expires")),
            "group": headers.get("group"),
            "group_index": headers.get("group_index"),
            "shadow": headers.get("shadow"),
            "ignore_result": headers.get("ignore_result"),
            "headers": self._redactor.apply(custom)[0],
        }
        return fields, message

    def _emit(self, event: dict[str, Any]) -> None:
        self.transport.emit(event)

    # -- producers ---------------------------------------------------------------------------

    def _before_publish(
        self,
        sender: Any = None,
        body: Any = None,
        exchange: Any = None,
        routing_key: str | None = None,
        headers: dict[str, Any] | None = None,
        properties: dict[str, Any] | None = None,
        declare: Any = None,
        **_: Any,
    ) -> None:
        headers = headers or {}
        task_id = headers.get("id")
        if not task_id:  # protocol 1 (Celery < 4 clients): not supported
            return
        args = kwargs = embed = None
        if isinstance(body, (tuple, list)) and len(body) == 3:
            args, kwargs, embed = body
        queue = next((getattr(q, "name", None) for q in declare or ()), None) or routing_key
        fields, message = self._message(
            args,
            kwargs,
            embed,
            headers,
            {
                "exchange": _name(exchange),
                "routing_key": routing_key,
                "queue": queue,
                "priority": (properties or {}).get("priority"),
            },
        )
        event = self._event(
            "task-sent",
            None,
            uuid=task_id,
            name=headers.get("task", sender),
            root_id=headers.get("root_id"),
            parent_id=headers.get("parent_id"),
            retries=headers.get("retries"),
            eta=_iso(headers.get("eta")),
            expires=_iso(headers.get("expires")),
            queue=queue,
            exchange=_name(exchange),
            routing_key=routing_key,
            **fields,
        )
        event[MESSAGE] = message
        self._pending.sent = (task_id, event)

    def _after_publish(self, headers: dict[str, Any] | None = None, **_: Any) -> None:
        pending, self._pending.sent = getattr(self._pending, "sent", None), None
        if pending is not None and headers and pending[0] == headers.get("id"):
            pending[1]["timestamp"] = time.time()  # published now, as Celery stamps it
            self._emit(pending[1])

    # -- the worker's main process ---------------------------------------------------------

    def _received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        headers = dict(request.request_dict or {})
        delivery = request.delivery_info or {}
        payload = getattr(request.message, "payload", None)
        embed = payload[2] if isinstance(payload, (tuple, list)) and len(payload) == 3 else None
        fields, message = self._message(
            request.args,
            request.kwargs,
            embed,
            headers,
            {
                "exchange": delivery.get("exchange"),
                "routing_key": delivery.get("routing_key"),
                "queue": delivery.get("routing_key"),
                "priority": delivery.get("priority"),
            },
        )
        event = self._event(
            "task-received",
            request.hostname,
            uuid=request.id,
            name=request.name,
            root_id=request.root_id,
            parent_id=request.parent_id,
            retries=headers.get("retries", 0),
            eta=_iso(request.eta),
            expires=_iso(request.expires),
            **fields,
        )
        event[MESSAGE] = message
        self._emit(event)

    def _revoked(
        self,
        sender: Any = None,
        request: Any = None,
        terminated: Any = None,
        signum: Any = None,
        expired: Any = None,
        **_: Any,
    ) -> None:
        self._emit(
            self._event(
                "task-revoked",
                getattr(request, "hostname", None),
                uuid=request.id,
                terminated=bool(terminated),
                signum=None if signum is None else str(signum),
                expired=bool(expired),
            )
        )

    def _rejected(self, sender: Any = None, message: Any = None, **_: Any) -> None:
        task_id = (getattr(message, "headers", None) or {}).get("id")
        if task_id:
            self._emit(
                self._event(
                    "task-rejected", getattr(sender, "hostname", None), uuid=task_id, requeue=False
                )
            )

    def _worker_event(self, type_: str, hostname: str | None, freq: float) -> None:
        from celery.utils.sysinfo import load_average
        from celery.worker.state import SOFTWARE_INFO, active_requests, all_total_count

        event = self._event(
            type_,
            hostname,
            freq=freq,
            active=len(active_requests),
            processed=all_total_count[0],
            loadavg=list(load_average()),
            **SOFTWARE_INFO,
        )
        self._emit(event)

    def _worker_ready(self, sender: Any = None, **_: Any) -> None:
        heart = getattr(sender, "heart", None)
        self._worker_event(
            "worker-online", getattr(sender, "hostname", None), getattr(heart, "interval", 2.0)
        )

    def _heartbeat(self, sender: Any = None, **_: Any) -> None:
        self._worker_event(
            "worker-heartbeat", getattr(sender.eventer, "hostname", None), float(sender.interval)
        )

    def _worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        self._worker_event("worker-offline", getattr(sender, "hostname", None), 2.0)
        self.transport.flush(timeout=5.0)

    # -- the pool's processes (prefork children, or the main process with solo/threads) ----

    def _prerun(self, sender: Any = None, task_id: Any = None, task: Any = None, **_: Any) -> None:
        self._started[task_id] = time.monotonic()
        self._emit(self._event("task-started", _hostname(task), uuid=task_id))

    def _postrun(self, sender: Any = None, task_id: Any = None, **_: Any) -> None:
        self._started.pop(task_id, None)

    def _success(self, sender: Any = None, result: Any = None, **_: Any) -> None:
        task_id = sender.request.id
        started = self._started.get(task_id)
        self._emit(
            self._event(
                "task-succeeded",
                _hostname(sender),
                uuid=task_id,
                # A result may hold what the arguments did (an echo, a record): redacted too.
                result=saferepr(
                    self._redactor.apply(result)[0],
                    getattr(sender, "resultrepr_maxsize", REPR_MAX),
                ),
                runtime=None if started is None else time.monotonic() - started,
            )
        )

    def _failure(
        self,
        sender: Any = None,
        task_id: str | None = None,
        exception: Any = None,
        einfo: Any = None,
        **_: Any,
    ) -> None:
        self._emit(
            self._event(
                "task-failed",
                _hostname(sender),
                uuid=task_id,
                exception=saferepr(exception),
                traceback=getattr(einfo, "traceback", None) or "",
            )
        )

    def _retry(
        self,
        sender: Any = None,
        request: Any = None,
        reason: Any = None,
        einfo: Any = None,
        **_: Any,
    ) -> None:
        self._emit(
            self._event(
                "task-retried",
                getattr(request, "hostname", None),
                uuid=request.id,
                exception=saferepr(getattr(reason, "exc", None) or reason),
                traceback=getattr(einfo, "traceback", None) or "",
            )
        )

    def _process_shutdown(self, **_: Any) -> None:
        # A pool child exits right after this (os._exit: no atexit): send what it holds.
        self.transport.flush(timeout=2.0)


def _hostname(task: Any) -> str | None:
    """The worker's node name, from the task's current request."""
    return getattr(getattr(task, "request", None), "hostname", None)


def _masked(value: Any, given: str | None) -> bool:
    """Whether a repr from the message differs from the value's own: the caller set it."""
    if given is None:
        return False
    if given == saferepr(value, REPR_MAX):
        return False
    # The worker decodes JSON lists where the producer had a tuple.
    return not (isinstance(value, list) and given == saferepr(tuple(value), REPR_MAX))

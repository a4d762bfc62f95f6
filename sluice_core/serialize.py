"""Jobs and workers as the API, the SSE stream and the dashboard show them.

Storage keeps epoch seconds; the API speaks ISO-8601 with offset (UTC).
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any

import orjson

from sluice_core.model import JOB_EVENT_FIELDS, Job, JobEvent, JobState, Worker, WorkerEvent
from sluice_core.storage import Gap, QueueStats


def iso(ts: float | None) -> str | None:
    return None if ts is None else _iso(ts)


# Replicas serve the same times over and over (dashboards poll the newest page, people
# reopen jobs): a remembered one costs a tenth of formatting it (80 ns, not 700), and
# each job has six: 16,384 of them (a page of 500 jobs holds 3,000) take 4 MB.
@functools.lru_cache(maxsize=16_384)
def _iso(ts: float) -> str | None:
    try:
        when = dt.datetime.fromtimestamp(ts, dt.UTC)
    except (ValueError, OverflowError, OSError, TypeError):
        # No date holds it (year 33658, NaN): a time stored before the door checked
        # times, or by a plugin that skipped it. Shown as unknown, never as an error.
        return None
    # The same text as .isoformat(), in half the time: a job has six times, and a
    # page of 500 jobs spent more here than in its query.
    return orjson.dumps(when)[1:-1].decode()


def job_to_dict(job: Job) -> dict[str, Any]:
    # One literal, the times in it: 8% quicker than setting them in a loop of getattr
    # after it, for every job of every page.
    return {
        "id": job.id,
        "framework": job.framework,
        "name": job.name,
        "state": str(job.state),
        "queue": job.queue,
        "worker": job.worker,
        "args": job.args,
        "kwargs": job.kwargs,
        "result": job.result,
        "exception": job.exception,
        "traceback": job.traceback,
        "retries": job.retries,
        "parent_id": job.parent_id,
        "root_id": job.root_id,
        "eta": job.eta,
        "expires": job.expires,
        "runtime": job.runtime,
        "retry_of": job.retry_of,
        "retried_as": job.retried_as,
        "extra": job.extra,
        "sent_at": iso(job.sent_at),
        "received_at": iso(job.received_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "updated_at": iso(job.updated_at),
        "created_at": iso(job.created_at),
    }


def job_timing(job: Job) -> dict[str, float | None]:
    """Seconds spent waiting, running and in all, where the events tell."""
    start = job.sent_at if job.sent_at is not None else job.received_at

    def since_start(at: float | None) -> float | None:
        # The producer stamps task-sent after it published, and a quick worker can
        # stamp task-started before that (seen on real workers): never negative.
        return None if at is None or start is None else max(0.0, at - start)

    return {
        "queued_s": since_start(job.started_at),
        "runtime_s": job.runtime,
        "total_s": since_start(job.finished_at),
    }


def event_to_dict(event: JobEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "type": event.type,
        "state": str(event.state) if event.state is not None else None,
        "timestamp": iso(event.timestamp),
        "worker": event.worker,
        "detail": {**event.fields, **event.extra},
    }


def gap_to_dict(gap: Gap) -> dict[str, Any]:
    return {
        "source": gap.source,
        "cause": gap.cause,
        "started_at": iso(gap.started_at),
        "ended_at": iso(gap.ended_at),
        "duration_s": round(gap.duration, 3),
        "reconciled_at": iso(gap.reconciled_at),
        "summary": gap.summary,
    }


def worker_to_dict(
    worker: Worker, *, task_events: bool | None = None, advice: str | None = None
) -> dict[str, Any]:
    """``task_events``: see :func:`sluice_core.monitors.sends_task_events`; ``advice``,
    shown when they are False: what to do about it (its framework's, sluice_core.frameworks)."""
    return {
        "hostname": worker.hostname,
        "framework": worker.framework,
        "status": worker.status,
        "last_heartbeat": iso(worker.last_heartbeat),
        "freq": worker.freq,
        "active": worker.active,
        "processed": worker.processed,
        "loadavg": worker.loadavg,
        "pid": worker.pid,
        "sw_ver": worker.sw_ver,
        "queues": worker.queues,
        "concurrency": worker.concurrency,
        "updated_at": iso(worker.updated_at),
        "task_events": task_events,
        "advice": advice if task_events is False else None,
    }


def queue_to_dict(queue: QueueStats) -> dict[str, Any]:
    return {
        "name": queue.name,
        "framework": queue.framework,
        "broker": queue.broker,
        "depth": queue.depth,
        "reserved": queue.reserved,
        "consumers": queue.consumers,
        "throughput_per_min": queue.throughput_per_min,
        "failure_rate": queue.failure_rate,
        "avg_wait_s": queue.avg_wait_s,
        "updated_at": iso(queue.updated_at),
    }


# -- normalized events on the wire (an agent streaming to the ingest endpoint) --------
#
# The JSON forms carry every attribute as it is (epoch timestamps, no ISO), so that
# ``*_from_json(*_to_json(e)) == e``. The server reads them from the network: the
# readers check every type storage relies on and raise ValueError saying what is wrong.

_STR_FIELDS = JOB_EVENT_FIELDS - {"retries", "runtime"}
WORKER_EVENT_TYPES = frozenset({"online", "heartbeat", "offline"})


def job_event_to_json(event: JobEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "job_id": event.job_id,
        "framework": event.framework,
        "type": event.type,
        "state": None if event.state is None else event.state.value,
        "timestamp": event.timestamp,
        "worker": event.worker,
        "fields": event.fields,
        "extra": event.extra,
    }


def worker_event_to_json(event: WorkerEvent) -> dict[str, Any]:
    return {
        "hostname": event.hostname,
        "framework": event.framework,
        "type": event.type,
        "timestamp": event.timestamp,
        "freq": event.freq,
        "active": event.active,
        "processed": event.processed,
        "loadavg": event.loadavg,
        "pid": event.pid,
        "sw_ver": event.sw_ver,
        "extra": event.extra,
    }


def _get(data: dict[str, Any], key: str, types: tuple[type, ...], *, required: bool) -> Any:
    value = data.get(key)
    if value is None:
        if required:
            raise ValueError(f"{key} is missing")
        return None
    # bool is an int to isinstance; never a valid count or time here.
    if type(value) is bool or not isinstance(value, types):
        raise ValueError(f"{key} is a {type(value).__name__}")
    return value


def _object(data: Any, what: str) -> dict[str, Any]:
    if type(data) is not dict:
        raise ValueError(f"{what} is a {type(data).__name__}, not a JSON object")
    return data


def job_event_from_json(data: Any) -> JobEvent:
    data = _object(data, "a job event")
    state = _get(data, "state", (str,), required=False)
    try:
        state = None if state is None else JobState(state)
    except ValueError:
        raise ValueError(f"state {state!r} is not one of {[s.value for s in JobState]}") from None
    fields = _object(data.get("fields", {}), "fields")
    for key in fields:
        if key in _STR_FIELDS:
            types: tuple[type, ...] = (str,)
        elif key == "retries":
            types = (int,)
        elif key == "runtime":
            types = (int, float)
        else:
            raise ValueError(f"fields: {key!r} is not a job field ({sorted(JOB_EVENT_FIELDS)})")
        _get(fields, key, types, required=False)
    return JobEvent(
        id=_get(data, "id", (str,), required=True),
        job_id=_get(data, "job_id", (str,), required=True),
        framework=_get(data, "framework", (str,), required=True),
        type=_get(data, "type", (str,), required=True),
        state=state,
        timestamp=float(_get(data, "timestamp", (int, float), required=True)),
        worker=_get(data, "worker", (str,), required=False),
        fields=fields,
        extra=_object(data.get("extra", {}), "extra"),
    )


def worker_event_from_json(data: Any) -> WorkerEvent:
    data = _object(data, "a worker event")
    loadavg = _get(data, "loadavg", (list,), required=False)
    if loadavg is not None and not all(
        type(x) is not bool and isinstance(x, (int, float)) for x in loadavg
    ):
        raise ValueError("loadavg is not a list of numbers")
    freq = _get(data, "freq", (int, float), required=False)
    kind = _get(data, "type", (str,), required=True)
    if kind not in WORKER_EVENT_TYPES:
        raise ValueError(f"type {kind!r} is not one of {sorted(WORKER_EVENT_TYPES)}")
    return WorkerEvent(
        hostname=_get(data, "hostname", (str,), required=True),
        framework=_get(data, "framework", (str,), required=True),
        type=kind,
        timestamp=float(_get(data, "timestamp", (int, float), required=True)),
        freq=None if freq is None else float(freq),
        active=_get(data, "active", (int,), required=False),
        processed=_get(data, "processed", (int,), required=False),
        loadavg=loadavg,
        pid=_get(data, "pid", (int,), required=False),
        sw_ver=_get(data, "sw_ver", (str,), required=False),
        extra=_object(data.get("extra", {}), "extra"),
    )

"""Jobs and workers as the API, the SSE stream and the dashboard show them.

Storage keeps epoch seconds; the API speaks ISO-8601 with offset (UTC).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sluice_core.model import Job, JobEvent, Worker
from sluice_core.storage import QueueStats

_JOB_TIMES = ("sent_at", "received_at", "started_at", "finished_at", "updated_at", "created_at")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def job_to_dict(job: Job) -> dict[str, Any]:
    out: dict[str, Any] = {
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
    }
    for name in _JOB_TIMES:
        out[name] = iso(getattr(job, name))
    return out


def job_timing(job: Job) -> dict[str, float | None]:
    """Seconds spent waiting, running and in all, where the events tell."""
    start = job.sent_at if job.sent_at is not None else job.received_at
    queued = job.started_at - start if job.started_at is not None and start is not None else None
    total = job.finished_at - start if job.finished_at is not None and start is not None else None
    return {"queued_s": queued, "runtime_s": job.runtime, "total_s": total}


def event_to_dict(event: JobEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "type": event.type,
        "state": str(event.state) if event.state is not None else None,
        "timestamp": iso(event.timestamp),
        "worker": event.worker,
        "detail": {**event.fields, **event.extra},
    }


def worker_to_dict(worker: Worker) -> dict[str, Any]:
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

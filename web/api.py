"""The REST API (the API in README.md), ``/healthz`` and ``/metrics``.

Views validate, call storage or an action handler, and serialize with
:mod:`sluice_core.serialize`; they hold no state of their own, so any number
of web replicas can serve the same database.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Blueprint, Response, current_app, request

from sluice_core import merge
from sluice_core.actions import (
    lives_at,
)
from sluice_core.engine import Engine
from sluice_core.model import Job
from sluice_core.monitors import workers_task_events
from sluice_core.pipeline import WriteHealth
from sluice_core.serialize import (
    event_to_dict,
    gap_to_dict,
    iso,
    job_timing,
    job_to_dict,
    queue_to_dict,
    worker_to_dict,
)
from sluice_core.storage import StorageUnavailable
from sluice_web.errors import NotFound, error_response
from sluice_web.params import encode_cursor, query_from_args

FIRST_COUNT_WAIT_S = 10.0  # a first /metrics waits this long at most for the job counts
GAPS_SHOWN = 100  # the latest gaps, on GET /api/gaps

log = logging.getLogger(__name__)

# /healthz answers within HEALTH_TIMEOUT seconds (what probes commonly allow), whatever
# the database does: its questions to it share one deadline, HEALTH_CHECK_S, and the
# rest is a margin for the answer itself.
HEALTH_TIMEOUT = 5.0
HEALTH_CHECK_S = HEALTH_TIMEOUT - 0.5
# /healthz is 503 once writes have failed this long with none succeeding: a write that
# fails once (a deadlock, a failover) is retried within a second or two, and should not
# flap the status.
WRITES_FAILING_S = 10.0
# ... or once an event read this long ago is still not stored: writes that neither fail
# nor finish (a database that hangs), or writers far behind. The dashboard is then that
# far in the past.
UNSTORED_AGE_S = 60.0

blueprint = Blueprint("api", __name__)


def _engine() -> Engine:
    engine: Engine = current_app.extensions["sluice_engine"]
    return engine


@blueprint.app_errorhandler(StorageUnavailable)
async def _unavailable(exc: StorageUnavailable) -> Response:
    # For every view, not just this blueprint's: the database being away is no bug (500),
    # and the client should come back.
    log.warning("%s %s: the database is unavailable: %s", request.method, request.path, exc)
    response = error_response(503, "unavailable", "the database is unavailable; retry later")
    response.headers["Retry-After"] = str(exc.retry_after)
    return response


# -- jobs --------------------------------------------------------------------


@blueprint.get("/api/jobs")
async def list_jobs() -> dict[str, Any]:
    page = await _engine().storage.list_jobs(query_from_args(request.args))
    return {
        "jobs": [job_to_dict(job) for job in page.jobs],
        "next_cursor": None if page.next_cursor is None else encode_cursor(page.next_cursor),
    }


async def job_or_404(job_id: str) -> Job:
    job = await _engine().storage.get_job(job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id!r}")
    return job


@blueprint.get("/api/jobs/<job_id>")
async def job_detail(job_id: str) -> dict[str, Any]:
    job = await job_or_404(job_id)
    events = merge.timeline(await _engine().storage.job_events(job_id))
    return {
        **job_to_dict(job),
        "events": [event_to_dict(event) for event in events],
        "timing": job_timing(job),
        "location": await _location(job_id),
    }


async def _location(job_id: str) -> dict[str, str | None] | None:
    """Where the job lives, which its actions go to: the broker, and the agent reading it.
    Read from the events as stored: a merged timeline's reports carry other sources'
    stamps, and would show the job behind whichever source pushed a report of it."""
    where = lives_at(await _engine().storage.job_events(job_id))
    return None if where is None else where.to_dict()


# -- queues, workers ---------------------------------------------------------


@blueprint.get("/api/queues")
async def queues() -> list[dict[str, Any]]:
    return [queue_to_dict(queue) for queue in await _engine().storage.list_queues(time.time())]


@blueprint.get("/api/workers")
async def workers() -> list[dict[str, Any]]:
    engine = _engine()
    return [
        worker_to_dict(worker, task_events=flag, advice=engine.frameworks.advice(worker))
        for worker, flag in await workers_task_events(engine.storage)
    ]


@blueprint.get("/api/gaps")
async def gaps() -> list[dict[str, Any]]:
    """The latest times Sluice did not hear a source, and what reconciling them learnt."""
    return [gap_to_dict(gap) for gap in await _engine().storage.list_gaps(GAPS_SHOWN)]


# -- health and metrics ------------------------------------------------------


@blueprint.get("/healthz")
async def healthz() -> tuple[dict[str, Any], int]:
    """200 when the database answers, writes succeed and every source is up; else 503.

    Answers within HEALTH_TIMEOUT, whatever the database does: one deadline for all
    its questions to it (HEALTH_CHECK_S). ``writes`` (:func:`writes_health`) is down
    once writes have failed for WRITES_FAILING_S, or an event read UNSTORED_AGE_S ago
    is not stored. ``sources`` has each configured source; with no broker at all,
    ``ingest`` (the SDK, remote agents), up while an API key exists: the ingest endpoint
    takes nothing else, so without one nothing can send events. A web replica has no
    sources (its agents read the brokers). The body is public (no auth on /healthz):
    error messages go to the log only.
    """
    engine = _engine()
    storage: dict[str, Any] = {"up": True, "url": engine.storage.url, "detail": ""}
    # A web replica reads no source of its own: the agents do, and answer for them.
    ingest_only = not engine.sources and not engine.config.brokers and not engine.replica
    keys: bool | None = None  # whether an active API key exists; None: not known
    with trio.move_on_after(HEALTH_CHECK_S) as deadline:
        try:
            await engine.storage.ping()
            if ingest_only:
                listed = await engine.storage.list_api_keys()
                keys = any(key.revoked_at is None for key in listed)
        except Exception as exc:
            log.warning("health check: storage ping failed: %s", exc)
            storage.update(up=False, detail=f"unreachable ({type(exc).__name__})")
    if deadline.cancelled_caught:
        log.warning("health check: the database did not answer within %gs", HEALTH_CHECK_S)
        storage.update(up=False, detail=f"no answer within {HEALTH_CHECK_S:g}s")
    sources: dict[str, dict[str, Any]] = {}
    for source in engine.sources:
        sources[source.name] = {
            "up": False,
            "detail": "not connected yet",
            "since": iso(engine.started_at),
        }
    for name, status in engine.pipeline.sources.items():
        sources[name] = {"up": status.up, "detail": status.detail, "since": iso(status.since)}
    if engine.config.brokers and not engine.sources and not engine.replica:
        # Brokers were asked for and nothing reads them: never "ok".
        sources["brokers"] = {
            "up": False,
            "detail": "no loaded plugin watches the configured brokers",
            "since": iso(engine.started_at),
        }
    if ingest_only:
        sources["ingest"] = {"up": bool(keys), "detail": _ingest_detail(keys)}
    writes = writes_health(engine.pipeline.writes, time.time())
    messages, spooled = engine.pipeline.backlog()
    healthy = storage["up"] and writes["up"] and all(status["up"] for status in sources.values())
    body = {
        "status": "ok" if healthy else "down",
        "storage": storage,
        "writes": writes,
        "backlog": {"messages": messages, "spooled_bytes": spooled},
        "sources": sources,
        # Whether this process runs the singleton duties; in an HA pair, one of two does.
        "leader": engine.leadership.leading,
    }
    return body, 200 if healthy else 503


def writes_health(writes: WriteHealth, now: float) -> dict[str, Any]:
    """The writers as /healthz shows them at ``now``: down once writes have failed for
    more than WRITES_FAILING_S, or an event a writer holds was read more than
    UNSTORED_AGE_S ago. (Behind the reader process, an event counts as read when it
    reaches the engine: its backlog is ``backlog``, and sluice_buffered_messages.)"""
    oldest = writes.oldest_unstored
    age = None if oldest is None else max(0.0, now - oldest)
    failing = None if writes.failing_since is None else now - writes.failing_since
    detail = ""
    if failing is not None and failing > WRITES_FAILING_S:
        detail = f"writes have failed for {failing:.0f}s"
    elif age is not None and age > UNSTORED_AGE_S:
        detail = f"an event read {age:.0f}s ago is not stored yet"
    return {
        "up": not detail,
        "detail": detail,
        "last_ok": iso(writes.last_ok),
        "failing_since": iso(writes.failing_since),
        "error": writes.error,
        "oldest_unstored_s": None if age is None else round(age, 3),
    }


def _ingest_detail(keys: bool | None) -> str:
    if keys:
        return "no broker configured: events come through the ingest endpoint (the SDK, agents)"
    if keys is None:
        return "no broker configured; whether an API key exists is unknown (database away)"
    return (
        "no broker configured and no API key for the ingest endpoint: nothing can send"
        " events (give --broker, or create a key: sluice keys create NAME)"
    )


@blueprint.get("/metrics")
async def metrics() -> Response:
    engine = _engine()
    m = engine.metrics
    # The gauges read from the database are counted in the background (see
    # StorageGauges); only a first scrape waits for a first count.
    engine.storage_gauges.want()
    with trio.move_on_after(FIRST_COUNT_WAIT_S):
        await engine.storage_gauges.refreshed.wait()
    # A labelled counter has no sample until a label is used; a scraper should
    # see an explicit 0 for every source rather than a missing series.
    for name in [source.name for source in engine.sources] + ["ingest"]:
        m.events_dropped.labels(name)
    return Response(m.render(), content_type=CONTENT_TYPE_LATEST)

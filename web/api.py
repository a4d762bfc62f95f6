"""The REST API (the API in README.md), ``/healthz`` and ``/metrics``.

Views validate, call storage or an action handler, and serialize with
:mod:`sluice_core.serialize`; they hold no state of their own, so any number
of web replicas can serve the same database.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from quart import Blueprint, Response, request

from sluice_core import merge
from sluice_core.actions import (
    lives_at,
)
from sluice_core.model import Job, JobEvent
from sluice_core.serialize import (
    event_to_dict,
    gap_to_dict,
    job_timing,
    job_to_dict,
    queue_to_dict,
    worker_to_dict,
)
from sluice_core.storage import StorageUnavailable
from sluice_web.context import application
from sluice_web.errors import NotFound, error_response
from sluice_web.params import encode_cursor, query_from_args

GAPS_SHOWN = 100  # the latest gaps, on GET /api/gaps

log = logging.getLogger(__name__)


blueprint = Blueprint("api", __name__)


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
    page = await application().reads.list_jobs(query_from_args(request.args))
    return {
        "jobs": [job_to_dict(job) for job in page.jobs],
        "next_cursor": None if page.next_cursor is None else encode_cursor(page.next_cursor),
    }


async def job_or_404(job_id: str) -> Job:
    job = await application().reads.get_job(job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id!r}")
    return job


@blueprint.get("/api/jobs/<job_id>")
async def job_detail(job_id: str) -> dict[str, Any]:
    job = await job_or_404(job_id)
    # Read once: the timeline and the job's location are both made from its events.
    stored = await application().reads.job_events(job_id)
    return {
        **job_to_dict(job),
        "events": [event_to_dict(event) for event in merge.timeline(stored)],
        "timing": job_timing(job),
        "location": _location(stored),
    }


def _location(stored: list[JobEvent]) -> dict[str, str | None] | None:
    """Where the job lives, which its actions go to: the broker, and the agent reading it.
    Made from the events as stored: a merged timeline's reports carry other sources'
    stamps, and would show the job behind whichever source pushed a report of it."""
    where = lives_at(stored)
    return None if where is None else where.to_dict()


# -- queues, workers ---------------------------------------------------------


@blueprint.get("/api/queues")
async def queues() -> list[dict[str, Any]]:
    return [queue_to_dict(queue) for queue in await application().reads.list_queues(time.time())]


@blueprint.get("/api/workers")
async def workers() -> list[dict[str, Any]]:
    return [
        worker_to_dict(view.worker, task_events=view.task_events, advice=view.advice)
        for view in await application().workers()
    ]


@blueprint.get("/api/gaps")
async def gaps() -> list[dict[str, Any]]:
    """The latest times Sluice did not hear a source, and what reconciling them learnt."""
    return [gap_to_dict(gap) for gap in await application().reads.list_gaps(GAPS_SHOWN)]


# -- health and metrics ------------------------------------------------------


@blueprint.get("/healthz")
async def healthz() -> tuple[dict[str, Any], int]:
    """200 when the database answers, writes succeed and every source is up; else 503
    (:func:`sluice_core.health.check`). The body is public (no auth on /healthz)."""
    body, healthy = await application().health()
    return body, 200 if healthy else 503


@blueprint.get("/metrics")
async def metrics() -> Response:
    return Response(await application().metrics(), content_type=CONTENT_TYPE_LATEST)

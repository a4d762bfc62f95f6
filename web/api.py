"""The REST API (DESIGN.md section 5), ``/healthz`` and ``/metrics``.

Views validate, call storage or an action handler, and serialize with
:mod:`sluice_core.serialize`; they hold no state of their own, so any number
of web replicas can serve the same database.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

import attrs
import orjson
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Blueprint, Response, current_app, request

from sluice_core.actions import ActionHandler, ActionRefused, ActionResult
from sluice_core.engine import Engine
from sluice_core.model import Job, JobState
from sluice_core.serialize import (
    event_to_dict,
    iso,
    job_timing,
    job_to_dict,
    queue_to_dict,
    worker_to_dict,
)
from sluice_core.storage import MAX_PAGE, JobQuery
from sluice_web.auth import CSRF_FIELD
from sluice_web.errors import ApiError, BadRequest, NotFound, error_response
from sluice_web.params import FILTERS, build_query, encode_cursor, query_from_args

log = logging.getLogger(__name__)

MAX_BULK = 1_000  # jobs one bulk request may touch: past it, narrow the filter
HEALTH_TIMEOUT = 5.0  # seconds a storage ping may take before /healthz calls it down
ACTIONS = ("retry", "revoke")
REVOKE_OPTIONS = ("terminate", "signal")

blueprint = Blueprint("api", __name__)


def _engine() -> Engine:
    engine: Engine = current_app.extensions["sluice_engine"]
    return engine


# -- request bodies ----------------------------------------------------------


async def _body() -> dict[str, Any]:
    """The JSON object sent, ``{}`` for none. A form body may only carry the CSRF token."""
    if request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        fields = set((await request.form).keys()) - {CSRF_FIELD}
        if fields:
            raise BadRequest(f"send options as a JSON body, not form fields ({sorted(fields)})")
        return {}
    data = await request.get_data()
    if not data.strip():
        return {}
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body: not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadRequest("body: expected a JSON object")
    return body


def _reject_unknown(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) or "none"
        raise BadRequest(
            f"body: unknown field {', '.join(map(repr, unknown))} (accepted: {accepted})"
        )


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{name}: expected true or false")
    return value


def _revoke_options(body: dict[str, Any]) -> dict[str, Any]:
    return {"terminate": _flag(body, "terminate"), "signal": _signal(body)}


def _signal(body: dict[str, Any]) -> str:
    """The signal name as Celery takes it ("SIGTERM"), from "SIGTERM", "TERM" or "sigterm"."""
    value = body.get("signal", "SIGTERM")
    if not isinstance(value, str):
        raise BadRequest('signal: expected a signal name such as "SIGTERM"')
    name = value.strip().upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    if name not in signal.Signals.__members__:
        raise BadRequest(f"signal: unknown signal {value!r} (e.g. SIGTERM, SIGKILL, SIGINT)")
    return name


@blueprint.errorhandler(ActionRefused)
async def _refused(exc: ActionRefused) -> Response:
    return error_response(409, "refused", str(exc))


# -- jobs --------------------------------------------------------------------


@blueprint.get("/api/jobs")
async def list_jobs() -> dict[str, Any]:
    page = await _engine().storage.list_jobs(query_from_args(request.args))
    return {
        "jobs": [job_to_dict(job) for job in page.jobs],
        "next_cursor": None if page.next_cursor is None else encode_cursor(page.next_cursor),
    }


async def _job(job_id: str) -> Job:
    job = await _engine().storage.get_job(job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id!r}")
    return job


@blueprint.get("/api/jobs/<job_id>")
async def job_detail(job_id: str) -> dict[str, Any]:
    job = await _job(job_id)
    events = await _engine().storage.job_events(job_id)
    return {
        **job_to_dict(job),
        "events": [event_to_dict(event) for event in events],
        "timing": job_timing(job),
    }


def _not_implemented(job: Job) -> ApiError:
    return ApiError(
        f"no action handler can act on {job.framework} job {job.id!r}: "
        "load the plugin for its framework and broker",
        status=501,
        code="not_implemented",
    )


def _handler(job: Job) -> ActionHandler:
    handler = _engine().action_handler(job)
    if handler is None:
        raise _not_implemented(job)
    return handler


@blueprint.post("/api/jobs/<job_id>/retry")
async def retry(job_id: str) -> tuple[dict[str, Any], int]:
    _reject_unknown(await _body(), ())
    job = await _job(job_id)
    result = await _handler(job).retry(job)
    return {"job_id": result.new_job_id, "retry_of": job.id}, 202


@blueprint.post("/api/jobs/<job_id>/revoke")
async def revoke(job_id: str) -> tuple[dict[str, Any], int]:
    body = await _body()
    _reject_unknown(body, REVOKE_OPTIONS)
    options = _revoke_options(body)
    job = await _job(job_id)
    await _handler(job).revoke(job, **options)
    return {"job_id": job.id, **options}, 202


# -- bulk actions ----------------------------------------------------------


def _bulk_ids(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(i, str) and i for i in value):
        raise BadRequest("ids: expected a list of job ids (non-empty strings)")
    if not value:
        raise BadRequest("ids: empty; give at least one job id")
    ids = list(dict.fromkeys(value))
    if len(ids) > MAX_BULK:
        raise BadRequest(f"ids: {len(ids)} jobs; a bulk action takes at most {MAX_BULK}")
    return ids


def _bulk_filter(value: Any) -> JobQuery:
    if not isinstance(value, dict):
        raise BadRequest("filter: expected an object with the job list's filters")
    if not value:
        raise BadRequest("filter: empty; it would match every job (give at least one filter)")
    return build_query(value, allowed=FILTERS)


async def _matching(query: JobQuery) -> list[Job]:
    """Every job the query matches, newest first; refused past MAX_BULK."""
    jobs: list[Job] = []
    cursor = None
    while True:
        page = await _engine().storage.list_jobs(attrs.evolve(query, limit=MAX_PAGE, cursor=cursor))
        jobs += page.jobs
        if len(jobs) > MAX_BULK:
            raise BadRequest(
                f"filter: matches more than {MAX_BULK} jobs; narrow it (state, name, since, ...) "
                "and run the action in several steps"
            )
        if page.next_cursor is None:
            return jobs
        cursor = page.next_cursor


async def _act(action: str, job: Job, options: dict[str, Any]) -> ActionResult:
    handler = _handler(job)
    if action == "retry":
        return await handler.retry(job)
    return await handler.revoke(job, **options)


def _outcome(
    job: Job, outcome: str, message: str = "", new_job_id: str | None = None
) -> dict[str, Any]:
    return {"id": job.id, "outcome": outcome, "message": message, "new_job_id": new_job_id}


@blueprint.post("/api/jobs/bulk")
async def bulk() -> dict[str, Any]:
    body = await _body()
    action = body.get("action")
    if action not in ACTIONS:
        raise BadRequest(f"action: expected one of {', '.join(map(repr, ACTIONS))}")
    revoking = action == "revoke"
    _reject_unknown(
        body, ("action", "ids", "filter", "dry_run", *(REVOKE_OPTIONS if revoking else ()))
    )
    dry_run = _flag(body, "dry_run")
    options = _revoke_options(body) if revoking else {}
    if ("ids" in body) == ("filter" in body):
        raise BadRequest("give either ids (a list of job ids) or filter (the list's filters)")
    if "ids" in body:
        ids = _bulk_ids(body["ids"])
        found = {job.id: job for job in await _matching(JobQuery(ids=frozenset(ids)))}
        missing = [i for i in ids if i not in found]
        if missing:
            shown = ", ".join(map(repr, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise NotFound(f"{len(missing)} unknown job id(s): {shown}")
        jobs = [found[i] for i in ids]
    else:
        jobs = await _matching(_bulk_filter(body["filter"]))
    if dry_run:
        return {
            "action": action,
            "dry_run": True,
            "count": len(jobs),
            "jobs": [job_to_dict(job) for job in jobs],
        }
    # Nothing at all can be done: say so once, as for a single job.
    if jobs and all(_engine().action_handler(job) is None for job in jobs):
        raise _not_implemented(jobs[0])
    results = []
    for job in jobs:
        try:
            result = await _act(action, job, options)
        except ActionRefused as exc:
            results.append(_outcome(job, "refused", str(exc)))
        except ApiError as exc:
            results.append(_outcome(job, exc.code, exc.message))
        except Exception:
            log.exception("%s of job %s failed", action, job.id)
            results.append(
                _outcome(job, "error", "the action failed; the server log has the details")
            )
        else:
            results.append(_outcome(job, "accepted", new_job_id=result.new_job_id))
    return {"action": action, "dry_run": False, "count": len(jobs), "results": results}


# -- queues, workers ---------------------------------------------------------


@blueprint.get("/api/queues")
async def queues() -> list[dict[str, Any]]:
    return [queue_to_dict(queue) for queue in await _engine().storage.list_queues(time.time())]


@blueprint.get("/api/workers")
async def workers() -> list[dict[str, Any]]:
    return [worker_to_dict(worker) for worker in await _engine().storage.list_workers()]


# -- health and metrics ------------------------------------------------------


@blueprint.get("/healthz")
async def healthz() -> tuple[dict[str, Any], int]:
    engine = _engine()
    storage: dict[str, Any] = {"up": True, "url": engine.storage.url, "detail": ""}
    try:
        with trio.fail_after(HEALTH_TIMEOUT):
            await engine.storage.ping()
    except (Exception, trio.TooSlowError) as exc:
        # The body is public (no auth on /healthz): the details go to the log only.
        log.warning("health check: storage ping failed: %s", exc)
        storage.update(up=False, detail=f"unreachable ({type(exc).__name__})")
    sources: dict[str, dict[str, Any]] = {}
    for source in engine.sources:
        sources[source.name] = {
            "up": False,
            "detail": "not connected yet",
            "since": iso(engine.started_at),
        }
    for name, status in engine.pipeline.sources.items():
        sources[name] = {"up": status.up, "detail": status.detail, "since": iso(status.since)}
    healthy = storage["up"] and all(status["up"] for status in sources.values())
    return {"status": "ok" if healthy else "down", "storage": storage, "sources": sources}, (
        200 if healthy else 503
    )


@blueprint.get("/metrics")
async def metrics() -> Response:
    engine = _engine()
    m = engine.metrics
    counts = await engine.storage.count_jobs_by_state()
    for state in JobState:
        m.jobs.labels(state.value).set(counts.get(state.value, 0))
    online = sum(worker.status == "online" for worker in await engine.storage.list_workers())
    m.workers_online.set(online)
    # A labelled counter has no sample until a label is used; a scraper should
    # see an explicit 0 for every source rather than a missing series.
    for name in [source.name for source in engine.sources] + ["ingest"]:
        m.events_dropped.labels(name)
    return Response(m.render(), content_type=CONTENT_TYPE_LATEST)

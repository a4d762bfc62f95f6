"""The action endpoints: retry and revoke, one job or many (the API in README.md).

Each action is recorded on its job's timeline (its audit) before the answer goes back.
"""

from __future__ import annotations

import logging
import signal
import time
import uuid
from typing import Any

import attrs
import orjson
import trio
from quart import Blueprint, Response, current_app, request, session

from sluice_core.actions import (
    ActionHandler,
    ActionRefused,
    ActionResult,
    PlansRetry,
    RetryPlan,
    RevokesMany,
    behind_agents,
)
from sluice_core.engine import Engine
from sluice_core.model import Job, JobEvent, JobState, event_id
from sluice_core.remote import Agents, NoAnswer
from sluice_core.serialize import iso, job_to_dict
from sluice_core.storage import MAX_PAGE, JobQuery
from sluice_web.api import job_or_404
from sluice_web.auth import CSRF_FIELD, FORM_TYPES, TOKEN_USER, posted_form
from sluice_web.errors import ApiError, BadRequest, NotFound, error_response
from sluice_web.params import FILTERS, build_query

log = logging.getLogger(__name__)

MAX_BULK = 1_000  # jobs one bulk request may touch: past it, narrow the filter
AUDIT_TIMEOUT = 10.0  # seconds an action's answer waits for its audit events to be stored
ACTIONS = ("retry", "revoke")
NO_ANSWER = "no_answer"  # the outcome of an action a remote agent did not answer
REVOKE_OPTIONS = ("terminate", "signal")

blueprint = Blueprint("actions", __name__)


def _engine() -> Engine:
    engine: Engine = current_app.extensions["sluice_engine"]
    return engine


# -- request bodies ----------------------------------------------------------

# What JSON may come labelled as, beside forms: nothing (curl), text/plain (fetch with a string).
JSON_LABELS = ("", "application/json", "text/plain")


async def _body() -> dict[str, Any]:
    """The JSON object sent, ``{}`` for none. A form body may only carry the CSRF token."""
    data = await request.get_data()
    if not data.strip():
        return {}
    try:
        # Whatever the Content-Type: ``curl -d '{...}'`` labels JSON as a form.
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if request.mimetype in FORM_TYPES:
            if not set((await posted_form()).keys()) - {CSRF_FIELD}:
                return {}
        elif request.mimetype not in JSON_LABELS and not request.mimetype.endswith("+json"):
            raise ApiError(
                f"body: {request.mimetype} is not accepted; send the options as a JSON object"
                " (Content-Type: application/json)",
                status=415,
                code="unsupported_media_type",
            ) from None
        raise BadRequest(
            f"body: not valid JSON ({exc}); send the options as a JSON object"
            " (Content-Type: application/json)"
        ) from None
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
    """The signal's full name ("SIGTERM"), from "SIGTERM", "TERM" or "sigterm"."""
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


def _not_implemented(job: Job) -> ApiError:
    return ApiError(
        f"no action handler can act on {job.framework} job {job.id!r}: "
        "load the plugin for its framework and broker",
        status=501,
        code="not_implemented",
    )


async def _route(job: Job) -> tuple[ActionHandler, list[JobEvent]]:
    """The handler that acts on ``job`` where it lives, and the job's timeline: the
    agent's connection for a job a remote agent streamed (ActionRefused when that agent
    is away: nothing is sent anywhere else), else this server's own handler."""
    timeline = await _engine().storage.job_events(job.id)
    found = behind_agents(timeline)
    if found:
        agents: Agents = current_app.extensions["sluice_agents"]
        return agents.handler(job, found), timeline
    handler = _engine().action_handler(job)
    if handler is None:
        raise _not_implemented(job)
    return handler, timeline


@blueprint.get("/api/jobs/<job_id>/retry")
async def retry_preview(job_id: str) -> dict[str, Any]:
    """What a retry would publish (job name, queue, broker, arguments), for the user to
    confirm, or 409 with the reason it would be refused. Publishes nothing. ``publish``
    is null for a handler that cannot tell beforehand."""
    job = await job_or_404(job_id)
    handler, timeline = await _route(job)
    if not isinstance(handler, PlansRetry):
        return {"job_id": job.id, "publish": None}
    try:
        plan = await handler.plan_retry(job, timeline)
    except NoAnswer as exc:
        raise ApiError(str(exc), status=504, code=NO_ANSWER) from None
    return {"job_id": job.id, "publish": plan.to_dict()}


@blueprint.post("/api/jobs/<job_id>/retry")
async def retry(job_id: str) -> tuple[dict[str, Any], int]:
    _reject_unknown(await _body(), ())
    job = await job_or_404(job_id)
    [outcome] = await _act("retry", [job], {})
    _raise_failure(outcome)
    answer = {"job_id": outcome["new_job_id"], "retry_of": job.id}
    if outcome["published"] is not None:  # the handler said what it published
        answer["published"] = outcome["published"]
    return answer, 202


@blueprint.post("/api/jobs/<job_id>/revoke")
async def revoke(job_id: str) -> tuple[dict[str, Any], int]:
    body = await _body()
    _reject_unknown(body, REVOKE_OPTIONS)
    options = _revoke_options(body)
    job = await job_or_404(job_id)
    [outcome] = await _act("revoke", [job], options)
    _raise_failure(outcome)
    heard = {"heard_by": outcome["heard_by"], "agent": outcome["agent"]}
    return {"job_id": job.id, **options, **heard}, 202


# The status and error code of a single job's action that was not accepted, by its
# outcome: a handler's own failure is the plain 500 of any unexpected error (web/errors.py).
FAILURE_STATUS = {"error": (500, "internal"), NO_ANSWER: (504, NO_ANSWER)}


def _raise_failure(outcome: dict[str, Any]) -> None:
    """A single job's action answers with its failure as an error status."""
    if outcome["outcome"] == "refused":
        raise ActionRefused(outcome["message"])
    if outcome["outcome"] != "accepted":
        status, code = FAILURE_STATUS.get(outcome["outcome"], (501, outcome["outcome"]))
        raise ApiError(outcome["message"], status=status, code=code)


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


async def _act(action: str, jobs: list[Job], options: dict[str, Any]) -> list[dict[str, Any]]:
    """Do ``action`` on each job; its outcome per job, in order, each recorded on the
    job's timeline. Revokes go in one call per handler that can revoke many."""
    # Stamped before anything is published: the worker's events come after it.
    requested_at = time.time()
    outcomes: dict[str, dict[str, Any]] = {}
    plans: dict[str, RetryPlan] = {}  # what each accepted retry published
    single: list[tuple[ActionHandler, Job, list[JobEvent]]] = []
    by_handler: dict[int, tuple[RevokesMany, list[Job]]] = {}
    for job in jobs:
        if action == "revoke" and job.state in FINISHED:
            outcomes[job.id] = _outcome(job, "refused", _already_finished(job))
            continue
        try:
            handler, timeline = await _route(job)
        except (ActionRefused, ApiError) as exc:
            outcomes[job.id] = _failed(action, job, exc)
            continue
        if action == "revoke" and isinstance(handler, RevokesMany):
            by_handler.setdefault(id(handler), (handler, []))[1].append(job)
        else:
            single.append((handler, job, timeline))
    for many, group in by_handler.values():
        try:
            results = await many.revoke_many(group, **options)
        except Exception as exc:
            outcomes.update((job.id, _failed(action, job, exc)) for job in group)
        else:
            outcomes.update((r.job_id, _outcome_of(r)) for r in results)
    for handler, job, timeline in single:
        try:
            result = await _call(handler, action, job, options, timeline)
        except Exception as exc:
            outcomes[job.id] = _failed(action, job, exc)
        else:
            outcomes[job.id] = _outcome_of(result)
            if result.published is not None:
                plans[job.id] = result.published
    ordered = [outcomes[job.id] for job in jobs]
    await _audit(action, jobs, ordered, options, requested_at, plans)
    return ordered


# A revoke cannot stop what has ended. A lost job is not among them: its worker died
# under it, and the broker may deliver it again, which a revoke does stop.
FINISHED = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.REVOKED, JobState.REJECTED})


def _already_finished(job: Job) -> str:
    when = f" at {iso(job.finished_at)}" if job.finished_at is not None else ""
    return f"job {job.id} had already finished ({job.state}{when}): there is nothing to revoke"


async def _call(
    handler: ActionHandler,
    action: str,
    job: Job,
    options: dict[str, Any],
    timeline: list[JobEvent],
) -> ActionResult:
    if action != "retry":
        return await handler.revoke(job, **options)
    if isinstance(handler, PlansRetry):
        # Checked against the job's timeline, then published as planned.
        return await handler.publish(await handler.plan_retry(job, timeline))
    return await handler.retry(job)


async def _preview(job: Job) -> dict[str, Any]:
    """A bulk dry run's answer for one retry: what it would publish (null when the
    handler cannot tell beforehand), or the reason it would be refused."""
    try:
        handler, timeline = await _route(job)
        plan = await handler.plan_retry(job, timeline) if isinstance(handler, PlansRetry) else None
    except (ActionRefused, ApiError, NoAnswer) as exc:
        return {"id": job.id, "publish": None, "refused": _failed("retry", job, exc)["message"]}
    return {"id": job.id, "publish": None if plan is None else plan.to_dict(), "refused": None}


def _failed(action: str, job: Job, exc: Exception) -> dict[str, Any]:
    if isinstance(exc, ActionRefused):
        return _outcome(job, "refused", str(exc))
    if isinstance(exc, ApiError):
        return _outcome(job, exc.code, exc.message)
    if isinstance(exc, NoAnswer):
        return _outcome(job, NO_ANSWER, str(exc))
    log.error("%s of job %s failed", action, job.id, exc_info=exc)
    return _outcome(job, "error", "the action failed; the server log has the details")


def _outcome(
    job: Job, outcome: str, message: str = "", new_job_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": job.id,
        "outcome": outcome,
        "message": message,
        "new_job_id": new_job_id,
        "published": None,
        "heard_by": None,
        "agent": None,
    }


def _outcome_of(result: ActionResult) -> dict[str, Any]:
    return {
        "id": result.job_id,
        "outcome": "accepted",
        "message": "",
        "new_job_id": result.new_job_id,
        # What a retry published: the job name, queue, broker and arguments.
        "published": None if result.published is None else result.published.to_dict(),
        # For a revoke: per broker, how many workers heard it (null: the broker won't say).
        "heard_by": result.heard_by or None,
        "agent": result.agent,  # the remote agent that did it
    }


# -- audit -------------------------------------------------------------------


def _user() -> str | None:
    """Who is acting: the API token's holder, the dashboard user, or None without auth.
    The auth guard has already checked either, in this order."""
    if not current_app.extensions["sluice_auth"].enabled:
        return None
    if request.headers.get("Authorization"):
        return TOKEN_USER
    user = session.get("user")
    return user if isinstance(user, str) else None


async def _audit(
    action: str,
    jobs: list[Job],
    outcomes: list[dict[str, Any]],
    options: dict[str, Any],
    now: float,
    plans: dict[str, RetryPlan],
) -> None:
    """Record each action on its job's timeline (a ``sluice-<action>`` event that moves
    no state), and a retry's new job as queued, linked both ways (retry_of / retried_as),
    with where it was published (``plans``). Returns once stored, so the job's page
    shows them at once."""
    user = _user()
    events: list[JobEvent] = []
    for job, outcome in zip(jobs, outcomes, strict=True):
        if outcome["outcome"] == "not_implemented":
            continue  # nothing was attempted
        new_id = outcome["new_job_id"]
        detail = {
            "action": action,
            "outcome": outcome["outcome"],
            "user": user,
            "new_job_id": new_id,
            "reason": outcome["message"] or None,
            "published": outcome["published"],
            "heard_by": outcome["heard_by"],
            "agent": outcome["agent"],
            **options,
        }
        events.append(
            _sluice_event(
                job, job.id, action, None, now, {"retried_as": new_id} if new_id else {}, detail
            )
        )
        if new_id is not None:
            plan = plans.get(job.id)
            copied = {
                "name": job.name if plan is None else plan.name,
                "queue": job.queue if plan is None else plan.queue,
                "args": job.args,
                "kwargs": job.kwargs,
                "parent_id": job.parent_id,
            }
            # Where it went, as the handler records it: Sluice's own word that the
            # broker has this job, which a retry of the new job rests on.
            extra = {
                **({} if plan is None else plan.record),
                "action": action,
                "outcome": "accepted",
                "user": user,
            }
            if "message" in job.extra:  # the SDK's capture: the new job ran with it too
                extra["message"] = job.extra["message"]
            events.append(
                _sluice_event(
                    job, new_id, action, JobState.QUEUED, now, {**copied, "retry_of": job.id}, extra
                )
            )
    if not events:
        return
    stored = trio.Event()
    if not _engine().pipeline.offer(events, [], stored):
        log.error("%s: could not record %d audit event(s): ingest buffer full", action, len(events))
        return
    with trio.move_on_after(AUDIT_TIMEOUT) as waited:
        await stored.wait()
    if waited.cancelled_caught:
        log.warning("%s: audit events not stored after %.0fs", action, AUDIT_TIMEOUT)


def _sluice_event(
    job: Job,
    job_id: str,
    action: str,
    state: JobState | None,
    now: float,
    fields: dict[str, Any],
    extra: dict[str, Any],
) -> JobEvent:
    return JobEvent(
        id=event_id("sluice", action, job_id, now, uuid.uuid4().hex),
        job_id=job_id,
        framework=job.framework,
        type=f"sluice-{action}",
        state=state,
        timestamp=now,
        fields={key: value for key, value in fields.items() if value is not None},
        extra={key: value for key, value in extra.items() if value is not None},
    )


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
        answer = {
            "action": action,
            "dry_run": True,
            "count": len(jobs),
            "jobs": [job_to_dict(job) for job in jobs],
        }
        if not revoking:  # what each retry would publish, or why it would be refused
            answer["retries"] = [await _preview(job) for job in jobs]
        return answer
    results = await _act(action, jobs, options)
    # Nothing at all could be done: say so once, as for a single job.
    if jobs and all(result["outcome"] == "not_implemented" for result in results):
        raise _not_implemented(jobs[0])
    return {"action": action, "dry_run": False, "count": len(jobs), "results": results}

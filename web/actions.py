"""The action endpoints: the actions the jobs' handlers declare, one job or many (the
API in README.md), asked of the action service (:class:`~sluice_core.actions.ActionService`).

Each action is recorded on its job's timeline (its audit) before the answer goes back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import orjson
from quart import Blueprint, Response, request

from sluice_core.actions import (
    ACCEPTED,
    ERROR,
    NO_ANSWER,
    NOT_IMPLEMENTED,
    REFUSED,
    RETRY,
    REVOKE,
    ActionRefused,
    ActionService,
    InvalidOptions,
    NotOffered,
    Outcome,
    parse_boolean,
)
from sluice_core.model import Job
from sluice_core.remote import NoAnswer
from sluice_core.serialize import job_to_dict
from sluice_core.storage import MAX_PAGE, JobQuery
from sluice_web.api import job_or_404
from sluice_web.auth import CSRF_FIELD, FORM_TYPES, acting_user, posted_form
from sluice_web.context import application
from sluice_web.errors import ApiError, BadRequest, NotFound, error_response
from sluice_web.params import FILTERS, build_query

MAX_BULK = 1_000  # jobs one bulk request may touch: past it, narrow the filter
BULK_FIELDS = ("action", "ids", "filter", "dry_run")  # a bulk body's own, beside the options

blueprint = Blueprint("actions", __name__)


def _actions() -> ActionService:
    return application().actions


# -- request bodies ----------------------------------------------------------

# What JSON may come labelled as, beside forms: nothing (curl), text/plain (fetch with a string).
JSON_LABELS = ("", "application/json", "text/plain")


async def json_body() -> dict[str, Any]:
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


def _check(action: str, options: dict[str, Any]) -> None:
    """A bulk action's options, checked by the declarations of ``action`` before any job
    is chosen (each job's handler parses them again, by its own): 400 when they refuse
    them, or when no handler declares ``action``."""
    try:
        _actions().check(action, options)
    except NotOffered as exc:
        raise BadRequest(f"action: {exc}") from None
    except InvalidOptions as exc:
        raise _bad_options(exc, BULK_FIELDS) from None


def _bad_options(exc: InvalidOptions, besides: Sequence[str] = ()) -> BadRequest:
    if not exc.unknown:
        return BadRequest(str(exc))
    accepted = ", ".join((*besides, *exc.accepted)) or "none"
    return BadRequest(
        f"body: unknown field {', '.join(map(repr, exc.unknown))} (accepted: {accepted})"
    )


def _flag(body: dict[str, Any], name: str) -> bool:
    try:
        return parse_boolean(body.get(name, False))
    except ValueError as exc:
        raise BadRequest(f"{name}: {exc}") from None


async def _act(action: str, jobs: list[Job], body: dict[str, Any]) -> list[Outcome]:
    try:
        return await _actions().act(action, jobs, body, acting_user())
    except InvalidOptions as exc:
        raise _bad_options(exc) from None


@blueprint.errorhandler(ActionRefused)
async def _refused(exc: ActionRefused) -> Response:
    return error_response(409, "refused", str(exc))


@blueprint.errorhandler(NoAnswer)
async def _no_answer(exc: NoAnswer) -> Response:
    return error_response(504, NO_ANSWER, str(exc))


def _not_implemented(message: str) -> ApiError:
    return ApiError(message, status=501, code="not_implemented")


@blueprint.get("/api/actions")
async def declared() -> dict[str, Any]:
    """The actions each framework's handler offers, with their options."""
    return {
        "frameworks": {
            framework: [spec.to_dict() for spec in specs]
            for framework, specs in _actions().declared().items()
        }
    }


@blueprint.get("/api/jobs/<job_id>/retry")
async def retry_preview(job_id: str) -> dict[str, Any]:
    """What a retry would publish (job name, queue, broker, arguments), for the user to
    confirm, or 409 with the reason it would be refused. Publishes nothing. ``publish``
    is null for a handler that cannot tell beforehand."""
    job = await job_or_404(job_id)
    try:
        plan = await _actions().plan(job)
    except NotOffered as exc:
        raise _not_implemented(str(exc)) from None
    return {"job_id": job.id, "publish": None if plan is None else plan.to_dict()}


@blueprint.post("/api/jobs/<job_id>/retry")
async def retry(job_id: str) -> tuple[dict[str, Any], int]:
    body = await json_body()
    job = await job_or_404(job_id)
    outcome = _accepted(await _act(RETRY, [job], body))
    answer: dict[str, Any] = {"job_id": outcome.new_job_id, "retry_of": job.id}
    if outcome.published is not None:  # the handler said what it published
        answer["published"] = outcome.published.to_dict()
    return answer, 202


@blueprint.post("/api/jobs/<job_id>/revoke")
async def revoke(job_id: str) -> tuple[dict[str, Any], int]:
    body = await json_body()
    job = await job_or_404(job_id)
    outcome = _accepted(await _act(REVOKE, [job], body))
    heard = {"heard_by": outcome.to_dict()["heard_by"], "agent": outcome.agent}
    return {"job_id": job.id, **outcome.options, **heard}, 202


@blueprint.post("/api/jobs/<job_id>/<action>")
async def act(job_id: str, action: str) -> tuple[dict[str, Any], int]:
    """Any other action the job's handler declares: 202 with its outcome; 404 naming
    what is offered for one it does not."""
    body = await json_body()
    job = await job_or_404(job_id)
    offered = [spec.name for spec in await _actions().offered(job)]
    if action not in offered:
        if not offered:
            raise _not_implemented(f"nothing can act on {job.framework} job {job.id!r} now")
        raise NotFound(
            f"{job.framework} job {job.id!r} has no action {action!r}"
            f" (offered: {', '.join(map(repr, offered))})"
        )
    outcome = _accepted(await _act(action, [job], body))
    return {**outcome.to_dict(), "action": action, "options": dict(outcome.options)}, 202


# The status and error code of a single job's action that was not accepted, by its
# outcome: a handler's own failure is the plain 500 of any unexpected error (web/errors.py).
FAILURE_STATUS = {ERROR: (500, "internal"), NO_ANSWER: (504, NO_ANSWER)}


def _accepted(outcomes: list[Outcome]) -> Outcome:
    """A single job's outcome, accepted; its failure as an error status."""
    [outcome] = outcomes
    if outcome.outcome == REFUSED:
        raise ActionRefused(outcome.message)
    if outcome.outcome != ACCEPTED:
        status, code = FAILURE_STATUS.get(outcome.outcome, (501, outcome.outcome))
        raise ApiError(outcome.message, status=status, code=code)
    return outcome


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
        page = await application().reads.list_jobs(
            attrs.evolve(query, limit=MAX_PAGE, cursor=cursor)
        )
        jobs += page.jobs
        if len(jobs) > MAX_BULK:
            raise BadRequest(
                f"filter: matches more than {MAX_BULK} jobs; narrow it (state, name, since, ...) "
                "and run the action in several steps"
            )
        if page.next_cursor is None:
            return jobs
        cursor = page.next_cursor


async def _preview(job: Job) -> dict[str, Any]:
    """A bulk dry run's answer for one retry: what it would publish (null when the
    handler cannot tell beforehand), or the reason it would be refused."""
    try:
        plan = await _actions().plan(job)
    except (ActionRefused, NotOffered, NoAnswer) as exc:
        return {"id": job.id, "publish": None, "refused": str(exc)}
    return {"id": job.id, "publish": None if plan is None else plan.to_dict(), "refused": None}


@blueprint.post("/api/jobs/bulk")
async def bulk() -> dict[str, Any]:
    body = await json_body()
    action = body.get("action")
    if not isinstance(action, str):
        raise BadRequest("action: expected the name of an action (GET /api/actions)")
    dry_run = _flag(body, "dry_run")
    options = {key: value for key, value in body.items() if key not in BULK_FIELDS}
    _check(action, options)
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
        if action == RETRY:  # what each retry would publish, or why it would be refused
            answer["retries"] = [await _preview(job) for job in jobs]
        return answer
    outcomes = await _act(action, jobs, options)
    # Nothing at all could be done: say so once, as for a single job.
    if jobs and all(outcome.outcome == NOT_IMPLEMENTED for outcome in outcomes):
        raise _not_implemented(outcomes[0].message)
    return {
        "action": action,
        "dry_run": False,
        "count": len(jobs),
        "results": [outcome.to_dict() for outcome in outcomes],
    }

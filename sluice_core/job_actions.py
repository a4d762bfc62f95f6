"""The action service: what the web asks of actions on jobs (:class:`JobActions`).

A job's action goes where the job lives: to the handler of its framework on this
server, or down the connection of the remote agent that streamed it
(:mod:`sluice_core.remote`). Its options are parsed by the declaration of the handler
that does it (:class:`~sluice_core.actions.ActionSpec`), and each action is recorded
on its job's timeline, stored before :meth:`JobActions.act` returns, so that the job's
page shows it at once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, Protocol

import trio

from sluice_core.actions import (
    ACCEPTED,
    ERROR,
    NO_ANSWER,
    NOT_IMPLEMENTED,
    REFUSED,
    RETRY,
    REVOKE,
    ActionHandler,
    ActionRefused,
    ActionResult,
    ActionSpec,
    InvalidOptions,
    NotOffered,
    OffersPerJob,
    Outcome,
    PerformsMany,
    PlansRetry,
    RetryPlan,
    behind_agents,
)
from sluice_core.model import Job, JobEvent, JobState, event_id
from sluice_core.pipeline import Pipeline
from sluice_core.remote import Agents, NoAnswer
from sluice_core.serialize import iso

log = logging.getLogger(__name__)

AUDIT_TIMEOUT: Final = 10.0  # seconds an action's answer waits for its audit to be stored

# A revoke cannot stop what has ended. A lost job is not among them: its worker died
# under it, and the broker may deliver it again, which a revoke does stop.
FINISHED: Final = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.REVOKED, JobState.REJECTED}
)

# Stores audit events, and returns once they are stored (or it gave up, logged).
Record = Callable[[list[JobEvent]], Awaitable[None]]


class Timelines(Protocol):
    async def job_events(self, job_id: str) -> list[JobEvent]: ...


def stored_by(pipeline: Pipeline, timeout: float = AUDIT_TIMEOUT) -> Record:
    """A :data:`Record` that offers the events to ``pipeline`` and waits until they are
    stored, ``timeout`` seconds at most."""

    async def record(events: list[JobEvent]) -> None:
        stored = trio.Event()
        if not pipeline.offer(events, [], stored):
            log.error("could not record %d audit event(s): ingest buffer full", len(events))
            return
        with trio.move_on_after(timeout) as waited:
            await stored.wait()
        if waited.cancelled_caught:
            log.warning("audit events not stored after %.0fs", timeout)

    return record


class JobActions:
    """The :class:`~sluice_core.actions.ActionService` of a Sluice server: ``handlers``
    (the plugins') act on the jobs of the brokers it reads, ``agents`` on the jobs
    remote agents streamed; ``record`` stores the audit."""

    def __init__(
        self,
        *,
        storage: Timelines,
        handlers: Sequence[ActionHandler],
        agents: Agents,
        record: Record,
    ) -> None:
        self.storage = storage
        self.handlers = handlers
        self.agents = agents
        self.record = record

    # -- what is offered ---------------------------------------------------------------

    def declared(self) -> dict[str, tuple[ActionSpec, ...]]:
        found: dict[str, tuple[ActionSpec, ...]] = {}
        for handler in self.handlers:
            found.setdefault(handler.framework, handler.actions)
        return found

    async def offered(self, job: Job) -> tuple[ActionSpec, ...]:
        try:
            handler, _ = await self._route(job)
            return await self._specs(handler, job)
        except (ActionRefused, NotOffered, NoAnswer):  # nothing can act on it now
            return ()

    def check(self, action: str, options: Mapping[str, Any]) -> None:
        specs = [
            spec
            for declared in (*self.declared().values(), *self.agents.declared().values())
            for spec in declared
            if spec.name == action
        ]
        if not specs:
            if action in (RETRY, REVOKE):
                return  # known to the core: each job's handler will judge, or its outcome say
            names = self._names()
            raise NotOffered(
                f"{action!r} is not an action any loaded handler offers"
                f" (offered: {', '.join(map(repr, names)) or 'none'})",
                names,
            )
        # Each declaration parses what it declares; a field none declares is refused.
        accepted = list(dict.fromkeys(option.name for spec in specs for option in spec.options))
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise InvalidOptions(
                f"unknown field {', '.join(map(repr, unknown))}"
                f" (accepted: {', '.join(accepted) or 'none'})",
                unknown=unknown,
                accepted=accepted,
            )
        for spec in specs:
            own = {option.name for option in spec.options}
            spec.parse({key: value for key, value in options.items() if key in own})

    def _names(self) -> list[str]:
        every = (*self.declared().values(), *self.agents.declared().values())
        return sorted({spec.name for declared in every for spec in declared})

    # -- acting ---------------------------------------------------------------------------

    async def act(
        self, action: str, jobs: Sequence[Job], options: Mapping[str, Any], actor: str | None
    ) -> list[Outcome]:
        # Stamped before anything is done: the workers' events come after it.
        requested_at = time.time()
        outcomes: dict[str, Outcome] = {}
        single: list[tuple[ActionHandler, Job, list[JobEvent], dict[str, Any]]] = []
        many: dict[int, tuple[PerformsMany, list[Job], dict[str, Any]]] = {}
        # Every job's handler and options first: options refused for one, nothing is done.
        for job in jobs:
            if action == REVOKE and job.state in FINISHED:
                outcomes[job.id] = Outcome(job.id, REFUSED, _already_finished(job))
                continue
            try:
                handler, timeline = await self._route(job)
                spec = _spec(action, job, await self._specs(handler, job))
            except Exception as exc:
                outcomes[job.id] = _failed(action, job, exc)
                continue
            parsed = spec.parse(options)
            if action != RETRY and isinstance(handler, PerformsMany):
                many.setdefault(id(handler), (handler, [], parsed))[1].append(job)
            else:
                single.append((handler, job, timeline, parsed))
        for handler_many, group, parsed in many.values():
            try:
                results = await handler_many.perform_many(action, group, parsed)
            except Exception as exc:
                outcomes.update((job.id, _failed(action, job, exc)) for job in group)
            else:
                outcomes.update((r.job_id, _accepted(r, parsed)) for r in results)
        for handler, job, timeline, parsed in single:
            try:
                result = await _perform(handler, action, job, parsed, timeline)
            except Exception as exc:
                outcomes[job.id] = _failed(action, job, exc)
            else:
                outcomes[job.id] = _accepted(result, parsed)
        ordered = [outcomes[job.id] for job in jobs]
        events = _audit(action, jobs, ordered, actor, requested_at)
        if events:
            await self.record(events)
        return ordered

    async def plan(self, job: Job) -> RetryPlan | None:
        handler, timeline = await self._route(job)
        _spec(RETRY, job, await self._specs(handler, job))
        if not isinstance(handler, PlansRetry):
            return None
        return await handler.plan_retry(job, timeline)

    # -- where a job's actions go -----------------------------------------------------

    async def _route(self, job: Job) -> tuple[ActionHandler, list[JobEvent]]:
        """The handler that acts on ``job`` where it lives, and the job's timeline: the
        agent's connection for a job a remote agent streamed (ActionRefused when that
        agent is away: nothing is sent anywhere else), else this server's own handler."""
        timeline = await self.storage.job_events(job.id)
        found = behind_agents(timeline)
        if found:
            return self.agents.handler(job, found), timeline
        handler = next((h for h in self.handlers if h.handles(job)), None)
        if handler is None:
            raise NotOffered(
                f"no action handler can act on {job.framework} job {job.id!r}: "
                "load the plugin for its framework and broker",
                (),
            )
        return handler, timeline

    async def _specs(self, handler: ActionHandler, job: Job) -> tuple[ActionSpec, ...]:
        """What ``handler`` offers for ``job``. An agent's declaration of an action this
        server's own handler of the framework declares too is read by the latter, which
        parses its options as the agent will; an agent that does not say what it offers
        (older) is taken to offer what this server's handler does."""
        if not isinstance(handler, OffersPerJob):
            return handler.actions
        local = {spec.name: spec for spec in self.declared().get(job.framework, ())}
        theirs = await handler.offered(job)
        return tuple(local.get(spec.name, spec) for spec in theirs) or tuple(local.values())


def _spec(action: str, job: Job, specs: tuple[ActionSpec, ...]) -> ActionSpec:
    spec = next((spec for spec in specs if spec.name == action), None)
    if spec is None:
        names = [spec.name for spec in specs]
        raise NotOffered(
            f"{job.framework} job {job.id!r} has no action {action!r}"
            f" (offered: {', '.join(map(repr, names)) or 'none'})",
            names,
        )
    return spec


async def _perform(
    handler: ActionHandler,
    action: str,
    job: Job,
    options: dict[str, Any],
    timeline: list[JobEvent],
) -> ActionResult:
    if action == RETRY and isinstance(handler, PlansRetry):
        # Checked against the job's timeline, then published as planned.
        return await handler.publish(await handler.plan_retry(job, timeline))
    return await handler.perform(action, job, options)


def _already_finished(job: Job) -> str:
    when = f" at {iso(job.finished_at)}" if job.finished_at is not None else ""
    return f"job {job.id} had already finished ({job.state}{when}): there is nothing to revoke"


def _accepted(result: ActionResult, options: dict[str, Any]) -> Outcome:
    return Outcome(
        result.job_id,
        ACCEPTED,
        new_job_id=result.new_job_id,
        published=result.published,
        heard_by=result.heard_by or None,
        agent=result.agent,
        options=options,
    )


def _failed(action: str, job: Job, exc: Exception) -> Outcome:
    if isinstance(exc, ActionRefused):
        return Outcome(job.id, REFUSED, str(exc))
    if isinstance(exc, NotOffered):
        return Outcome(job.id, NOT_IMPLEMENTED, str(exc))
    if isinstance(exc, NoAnswer):
        return Outcome(job.id, NO_ANSWER, str(exc))
    log.error("%s of job %s failed", action, job.id, exc_info=exc)
    return Outcome(job.id, ERROR, "the action failed; the server log has the details")


# -- the audit ------------------------------------------------------------------------


def _audit(
    action: str, jobs: Sequence[Job], outcomes: list[Outcome], actor: str | None, now: float
) -> list[JobEvent]:
    """Each action on its job's timeline (a ``sluice-<action>`` event that moves no
    state), and a retry's new job as queued, linked both ways (retry_of / retried_as),
    with where it was published."""
    events: list[JobEvent] = []
    for job, outcome in zip(jobs, outcomes, strict=True):
        if outcome.outcome == NOT_IMPLEMENTED:
            continue  # nothing was attempted
        new_id = outcome.new_job_id
        answer = outcome.to_dict()
        detail = {
            "action": action,
            "outcome": outcome.outcome,
            "user": actor,
            "new_job_id": new_id,
            "reason": outcome.message or None,
            "published": answer["published"],
            "heard_by": answer["heard_by"],
            "agent": outcome.agent,
            **outcome.options,
        }
        linked = {"retried_as": new_id} if new_id else {}
        events.append(_sluice_event(job, job.id, action, None, now, linked, detail))
        if new_id is not None:
            plan = outcome.published
            copied = {
                "name": job.name if plan is None else plan.name,
                "queue": job.queue if plan is None else plan.queue,
                "args": job.args,
                "kwargs": job.kwargs,
                "parent_id": job.parent_id,
                "retry_of": job.id,
            }
            # Where it went, as the handler records it: Sluice's own word that the
            # broker has this job, which a retry of the new job rests on.
            extra = {
                **({} if plan is None else plan.record),
                "action": action,
                "outcome": ACCEPTED,
                "user": actor,
            }
            if "message" in job.extra:  # the SDK's capture: the new job ran with it too
                extra["message"] = job.extra["message"]
            events.append(_sluice_event(job, new_id, action, JobState.QUEUED, now, copied, extra))
    return events


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

"""Actions on the jobs of remote agents: sent down the agent's own connection, done by
the agent on its broker, their real outcome brought back.

A remote agent (``sluice agent --server``, :mod:`sluice_core.agent`) reads brokers
the server cannot reach, and streams their events over the ingest WebSocket
(web/ingest.py). A job it streamed lives on its broker (:func:`~sluice_core.actions.
behind_agents`): the server must not publish it on a broker of its own, which may be
another cluster's, even under the same URL. So the action travels the other way on
the same connection, and the agent does it with its own action handlers.

The protocol, beside the event batches and their acks (web/ingest.py):

- At the handshake the agent announces itself: the header ``Sluice-Agent``,
  ``{"brokers": [its brokers' URLs, passwords redacted]}``. A server that knows
  nothing of it ignores the header; an agent that does not send it is never sent an
  action, so older agents and servers work with newer ones as before.
- server -> agent: ``{"action": {"id": ..., "kind": ..., ...}}``, the kinds:
  ``declare`` (what the agent's handlers offer: one result per framework, ``{"framework":
  ..., "actions": [ActionSpec.to_dict(), ...]}``, asked once per connection); ``plan``
  and ``retry``, with the job's timeline as the agent must judge it
  (:func:`~sluice_core.actions.as_seen_by`); ``revoke``, with the jobs (``{"id",
  "framework"}``) and its options beside them (``"terminate"``, ``"signal"`` for
  Celery: the wire of agents older than declared actions); ``perform``, any other
  declared action: ``{"action": name, "jobs": [...], "options": {...}}``.
- agent -> server: ``{"reply": id, "results": [...]}``, or ``{"reply": id,
  "refused": reason}`` (the agent's handler refused: the API's 409), or ``{"reply":
  id, "error": message}``. An older agent answers ``declare`` and ``perform`` with an
  error: it is taken to offer what the server's own handler of the job's framework
  does, and that but retry and revoke fail.

The agent takes actions only from the server it connected to, with its key, over the
connection it opened: it listens on nothing. The server sends an agent only the
actions on jobs that agent's key pushed from a broker it announced.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs
import orjson
import trio

from sluice_core.actions import (
    AGENT,
    RETRY,
    REVOKE,
    ActionHandler,
    ActionRefused,
    ActionResult,
    ActionSpec,
    Location,
    PerformsMany,
    PlansRetry,
    RetryPlan,
    as_seen_by,
)
from sluice_core.merge import rebuild
from sluice_core.model import Job, JobEvent
from sluice_core.serialize import job_event_from_json, job_event_to_json

log = logging.getLogger(__name__)

HEADER: Final = "Sluice-Agent"
# How long the server waits for an agent's answer. The agent publishes once, or
# broadcasts once, on a broker next to it: seconds at worst.
ANSWER_TIMEOUT: Final = 20.0
OUTBOX: Final = 64  # actions waiting to go down one connection


class NoAnswer(Exception):
    """The agent did not answer (in time, or before its connection closed): what it did
    is unknown. The message says so, and where to look."""


# -- the wire ------------------------------------------------------------------------


def announcement(brokers: Sequence[str]) -> bytes:
    """The ``Sluice-Agent`` header's value: the agent's brokers, as JSON in ASCII (a
    header's bytes), any other character escaped (``\\uXXXX``)."""
    return json.dumps({"brokers": list(brokers)}, ensure_ascii=True).encode("ascii")


def announced(value: str | None) -> frozenset[str] | None:
    """The brokers an agent announced in its ``Sluice-Agent`` header; None for a sender
    that did not announce (the SDK, an older agent), or announced nothing readable."""
    if not value:
        return None
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    brokers = data.get("brokers") if type(data) is dict else None
    if type(brokers) is not list or not all(type(b) is str for b in brokers):
        return None
    return frozenset(brokers)


def plan_to_json(plan: RetryPlan) -> dict[str, Any]:
    return {**plan.to_dict(), "job_id": plan.job_id, "record": plan.record}


def plan_from_json(data: Any) -> RetryPlan:
    """A plan as an agent sent it; ValueError if it is not one."""
    if type(data) is not dict:
        raise ValueError(f"a plan is a JSON object, not {type(data).__name__}")
    text = ("job_id", "name", "queue", "broker", "arguments", "arguments_from")
    if not all(type(data.get(key)) is str for key in text):
        raise ValueError(f"a plan needs {', '.join(text)} as strings")
    details, record = data.get("details", []), data.get("record", {})
    if type(details) is not list or not all(type(d) is str for d in details):
        raise ValueError("a plan's details are a list of strings")
    if type(record) is not dict:
        raise ValueError("a plan's record is a JSON object")
    return RetryPlan(
        job_id=data["job_id"],
        name=data["name"],
        queue=data["queue"],
        target=data["broker"],
        arguments=data["arguments"],
        arguments_from=data["arguments_from"],
        details=tuple(details),
        record=record,
    )


def result_to_json(result: ActionResult) -> dict[str, Any]:
    return {
        "job_id": result.job_id,
        "action": result.action,
        "new_job_id": result.new_job_id,
        "published": None if result.published is None else plan_to_json(result.published),
        "heard_by": result.heard_by,
    }


def result_from_json(data: Any, agent: str) -> ActionResult:
    """A result as ``agent`` sent it, said to be its; ValueError if it is not one."""
    if type(data) is not dict or type(data.get("job_id")) is not str:
        raise ValueError("a result is a JSON object with a job_id")
    new_id, heard = data.get("new_job_id"), data.get("heard_by", {})
    if new_id is not None and type(new_id) is not str:
        raise ValueError("a result's new_job_id is a string")
    if type(heard) is not dict or not all(
        n is None or type(n) is int for n in heard.values()
    ):
        raise ValueError("a result's heard_by maps brokers to worker counts")
    published = data.get("published")
    plan = None if published is None else _theirs(plan_from_json(published), agent)
    return ActionResult(
        data["job_id"],
        str(data.get("action")),
        new_job_id=new_id,
        published=plan,
        heard_by=heard,
        agent=agent,
    )


def _theirs(plan: RetryPlan, agent: str) -> RetryPlan:
    """A plan of ``agent``'s: published by it, and recorded so (the new job lives there)."""
    return attrs.evolve(plan, agent=agent, record={**plan.record, AGENT: agent})


# -- the server's side -----------------------------------------------------------------


@attrs.define
class _Waiting:
    done: trio.Event = attrs.field(factory=trio.Event)
    reply: dict[str, Any] | None = None  # None once done: the connection closed first


class AgentLink:
    """One connected agent, as the server holds it: what it reads, and the actions on
    their way down its connection (``outbox``, which its WebSocket session sends)."""

    def __init__(self, name: str, brokers: frozenset[str], *, timeout: float) -> None:
        self.name = name  # its API key's name
        self.brokers = brokers
        self.timeout = timeout
        self._send, self.outbox = trio.open_memory_channel[bytes](OUTBOX)
        self._waiting: dict[str, _Waiting] = {}
        self.closed = False
        self.handler = AgentActions(self)
        # What the agent's handlers offer, per framework, once it said (declare).
        self.declared: dict[str, tuple[ActionSpec, ...]] | None = None

    async def declarations(self) -> dict[str, tuple[ActionSpec, ...]]:
        """What the agent's handlers offer, per framework, asked once; {} from an agent
        that cannot say (older). ActionRefused or NoAnswer as :meth:`request`."""
        if self.declared is None:
            reply = await self.request("declare", {})
            try:
                self.declared = _declarations(reply.get("results"))
            except ValueError as exc:
                log.info("agent %r does not say what it offers (%s)", self.name, exc)
                self.declared = {}
        return self.declared

    async def request(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send an action; its reply. ActionRefused if it could not be sent, NoAnswer if
        it was and no answer came in time."""
        gone = ActionRefused(f"the agent {self.name!r} disconnected; nothing was sent")
        if self.closed:
            raise gone
        request_id = uuid.uuid4().hex
        waiting = self._waiting[request_id] = _Waiting()
        sent = False
        try:
            with trio.move_on_after(self.timeout):
                message = {"action": {"id": request_id, "kind": kind, **body}}
                await self._send.send(orjson.dumps(message))
                sent = True
                await waiting.done.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise gone from None
        finally:
            del self._waiting[request_id]
        if waiting.reply is not None:
            return waiting.reply
        if not sent:
            raise ActionRefused(
                f"the agent {self.name!r} did not take the {kind} within {self.timeout:g}s"
                f" ({OUTBOX} actions wait for its connection); nothing was sent"
            )
        why = (
            "its connection closed before it answered"
            if waiting.done.is_set() or self.closed
            else f"it did not answer within {self.timeout:g}s"
        )
        raise NoAnswer(
            f"the {kind} was sent to the agent {self.name!r}, but {why}: whether it was"
            " done is unknown (the job's timeline shows the workers' events if it was)"
        )

    def answer(self, reply: dict[str, Any]) -> None:
        """A reply came (the session's receive loop); one to nothing waiting is dropped."""
        waiting = self._waiting.get(str(reply.get("reply")))
        if waiting is not None:
            waiting.reply = reply
            waiting.done.set()

    def close(self) -> None:
        """The connection is gone: whoever waits gets a NoAnswer now."""
        self.closed = True
        self._send.close()
        for waiting in self._waiting.values():
            waiting.done.set()


class Agents:
    """The agents connected to this server, by their API key's name."""

    def __init__(self, *, timeout: float = ANSWER_TIMEOUT) -> None:
        self.timeout = timeout
        self._links: dict[str, list[AgentLink]] = {}

    def connect(self, name: str, brokers: frozenset[str]) -> AgentLink:
        link = AgentLink(name, brokers, timeout=self.timeout)
        # Newest first: a reconnection is often seen before the old session's end.
        self._links.setdefault(name, []).insert(0, link)
        log.info("agent %r connected; it reads %s", name, ", ".join(sorted(brokers)) or "nothing")
        return link

    def disconnect(self, link: AgentLink) -> None:
        link.close()
        links = self._links.get(link.name, [])
        if link in links:
            links.remove(link)
        if not links:
            self._links.pop(link.name, None)
        log.info("agent %r disconnected; actions on its jobs wait for it", link.name)

    def declared(self) -> dict[str, tuple[ActionSpec, ...]]:
        """What the connected agents said they offer, per framework (so far)."""
        found: dict[str, tuple[ActionSpec, ...]] = {}
        for links in self._links.values():
            for link in links:
                for framework, specs in (link.declared or {}).items():
                    found.setdefault(framework, specs)
        return found

    def handler(self, job: Job, found: list[Location]) -> ActionHandler:
        """The handler that acts on ``job``, which lives at ``found`` (agents' brokers,
        :func:`~sluice_core.actions.behind_agents`). ActionRefused, saying nothing was
        sent, when no agent there is connected or the locations disagree."""
        brokers = sorted({where.broker for where in found})
        if len(brokers) > 1:
            shown = "; ".join(f"agent {p.agent!r}, broker {p.broker}" for p in found)
            raise ActionRefused(
                f"cannot act on job {job.id}: the events of several agents' brokers show a"
                f" job with this id ({shown}), and Sluice does not know where it lives;"
                " nothing was sent"
            )
        [broker] = brokers
        names = [where.agent for where in found if where.agent is not None]
        for name in names:
            for link in self._links.get(name, []):
                if broker in link.brokers:
                    return link.handler
        agents = " or ".join(repr(name) for name in names)
        connected = [name for name in names if name in self._links]
        why = (
            f"is connected but does not read broker {broker} any more"
            if connected
            else f"that reads broker {broker} is not connected"
        )
        raise ActionRefused(f"the agent {agents} {why}; nothing was sent")


class AgentActions:
    """The action handler of the jobs that live behind one connected agent: every
    action goes down its connection, and the agent's answer is the outcome."""

    # Whatever the agent's own handlers serve and offer (:meth:`offered`).
    framework = "*"
    actions: tuple[ActionSpec, ...] = ()

    def __init__(self, link: AgentLink) -> None:
        self.link = link

    def handles(self, job: Job) -> bool:
        return True  # chosen by where the job lives (Agents.handler), not by its framework

    async def offered(self, job: Job) -> tuple[ActionSpec, ...]:
        return (await self.link.declarations()).get(job.framework, ())

    async def plan_retry(self, job: Job, timeline: Sequence[JobEvent]) -> RetryPlan:
        seen = as_seen_by(self.link.name, timeline)
        sent = {
            "id": job.id,
            "framework": job.framework,
            "events": [job_event_to_json(event) for event in seen],
        }
        [result] = await self._ask("plan", {"job": sent})
        if result.published is None:
            raise ActionRefused(f"the agent {self.link.name!r} cannot say what a retry publishes")
        # Told to publish, the agent plans again from the same timeline, and publishes that.
        return attrs.evolve(result.published, message=_Sent(sent))

    async def publish(self, plan: RetryPlan) -> ActionResult:
        if not isinstance(plan.message, _Sent):
            raise TypeError(f"not a plan of AgentActions: {plan!r}")
        [result] = await self._ask("retry", {"job": plan.message.job})
        return result

    async def perform(self, action: str, job: Job, options: Mapping[str, Any]) -> ActionResult:
        if action == RETRY:  # never so: Sluice retries through plan_retry and publish
            return await self.publish(await self.plan_retry(job, ()))
        [result] = await self.perform_many(action, [job], options)
        return result

    async def perform_many(
        self, action: str, jobs: list[Job], options: Mapping[str, Any]
    ) -> list[ActionResult]:
        sent = [{"id": job.id, "framework": job.framework} for job in jobs]
        if action == REVOKE:
            return await self._ask("revoke", {"jobs": sent, **options})
        return await self._ask("perform", {"action": action, "jobs": sent, "options": options})

    async def _ask(self, kind: str, body: dict[str, Any]) -> list[ActionResult]:
        reply = await self.link.request(kind, body)
        name = self.link.name
        if "refused" in reply:
            raise ActionRefused(f"the agent {name!r} refused: {reply['refused']}")
        if "error" in reply:
            raise RuntimeError(f"the agent {name!r} failed: {reply['error']}")
        results = reply.get("results")
        if type(results) is not list:
            raise ValueError(f"the agent {name!r} answered without results: {reply!r:.200}")
        return [result_from_json(result, name) for result in results]


def _declarations(results: Any) -> dict[str, tuple[ActionSpec, ...]]:
    """An agent's answer to ``declare``; ValueError if it is not one."""
    if type(results) is not list or not all(
        type(r) is dict and type(r.get("framework")) is str and type(r.get("actions")) is list
        for r in results
    ):
        raise ValueError("no declaration in its answer")
    return {
        r["framework"]: tuple(ActionSpec.from_dict(spec) for spec in r["actions"])
        for r in results
    }


@attrs.frozen
class _Sent:
    """A plan's message: the job as the agent was sent it, to be sent again to publish."""

    job: dict[str, Any]


# -- the agent's side -------------------------------------------------------------------


class ActionExecutor:
    """Does the actions the server sends an agent, with the agent's own handlers, on
    its own brokers, and says what came of them."""

    def __init__(self, handlers: list[ActionHandler]) -> None:
        self.handlers = handlers

    async def execute(self, request: Any) -> dict[str, Any]:
        """The reply (without its id) to an ``action`` message. Never raises."""
        try:
            return {"results": await self._execute(request)}
        except ActionRefused as exc:
            return {"refused": str(exc)}
        except ValueError as exc:
            log.warning("the server sent an action this agent cannot read: %s", exc)
            return {"error": f"this agent cannot read the action: {exc}"}
        except Exception as exc:
            log.exception("an action the server sent failed")
            return {"error": f"the action failed on the agent ({type(exc).__name__}: {exc})"}

    async def _execute(self, request: Any) -> list[dict[str, Any]]:
        kind = request.get("kind") if type(request) is dict else None
        if kind == "declare":
            declared: dict[str, tuple[ActionSpec, ...]] = {}
            for handler in self.handlers:
                declared.setdefault(handler.framework, handler.actions)
            return [
                {"framework": framework, "actions": [spec.to_dict() for spec in specs]}
                for framework, specs in declared.items()
            ]
        if kind in ("plan", "retry"):
            job, timeline = _read_job(request.get("job"))
            handler = self._handler(job)
            if not isinstance(handler, PlansRetry):
                if kind == "plan":
                    return [{"job_id": job.id, "action": "plan", "published": None}]
                return [result_to_json(await handler.perform(RETRY, job, {}))]
            plan = await handler.plan_retry(job, timeline)
            if kind == "plan":
                return [{"job_id": job.id, "action": "plan", "published": plan_to_json(plan)}]
            result = await handler.publish(plan)
            log.info("retry of job %s, asked by the server: published as %s", job.id,
                     result.new_job_id)
            return [result_to_json(result)]
        if kind == "revoke":
            # Its options beside its jobs (the wire of agents older than declared actions).
            options = {k: v for k, v in request.items() if k not in ("id", "kind", "jobs")}
            return await self._perform(REVOKE, request.get("jobs"), options)
        if kind == "perform":
            action, options = request.get("action"), request.get("options")
            if type(action) is not str or action == RETRY or type(options) is not dict:
                raise ValueError("a perform needs an action (not a retry) and its options")
            return await self._perform(action, request.get("jobs"), options)
        raise ValueError(f"unknown action kind {kind!r}")

    async def _perform(
        self, action: str, jobs: Any, options: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """``action`` on each job, by its handler here, the options parsed by that
        handler's declaration (InvalidOptions, a ValueError, if it refuses them)."""
        if type(jobs) is not list or not all(
            type(j) is dict and type(j.get("id")) is type(j.get("framework")) is str
            for j in jobs
        ):
            raise ValueError(f"a {action}'s jobs each need an id and a framework")
        groups: dict[int, tuple[ActionHandler, list[Job]]] = {}
        for item in jobs:
            job = Job(id=item["id"], framework=item["framework"])
            handler = self._handler(job)
            groups.setdefault(id(handler), (handler, []))[1].append(job)
        results: dict[str, ActionResult] = {}
        for handler, group in groups.values():
            spec = next((s for s in handler.actions if s.name == action), None)
            if spec is None:
                raise ActionRefused(
                    f"this agent's {handler.framework} handler offers no action {action!r}"
                )
            parsed = spec.parse(options)
            if isinstance(handler, PerformsMany):
                done = await handler.perform_many(action, group, parsed)
            else:
                done = [await handler.perform(action, job, parsed) for job in group]
            results.update((result.job_id, result) for result in done)
        log.info("%s of %d job(s), asked by the server: done", action, len(jobs))
        return [result_to_json(results[item["id"]]) for item in jobs]

    def _handler(self, job: Job) -> ActionHandler:
        handler = next((h for h in self.handlers if h.handles(job)), None)
        if handler is None:
            raise ActionRefused(
                f"this agent has no action handler for {job.framework} jobs: start it with"
                " the plugin for its brokers"
            )
        return handler


def _read_job(data: Any) -> tuple[Job, list[JobEvent]]:
    """The job of a ``plan`` or ``retry``, folded from its timeline as the server sent it."""
    if type(data) is not dict or type(data.get("id")) is not str:
        raise ValueError("the action's job needs an id")
    if type(data.get("framework")) is not str or type(data.get("events")) is not list:
        raise ValueError("the action's job needs a framework and its events")
    timeline = [job_event_from_json(event) for event in data["events"]]
    return rebuild(data["id"], data["framework"], timeline), timeline

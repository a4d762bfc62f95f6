"""Retry and revoke for Celery jobs, on Redis and RabbitMQ brokers.

One :class:`CeleryActions` handler serves every configured broker. A revoke
goes to all of them in one control message each (a job id unknown to a
broker's workers costs nothing there), so it never needs to know which broker
carried the job.

A retry publishes on the broker that carried the job, and only what that
broker showed of it (:meth:`CeleryActions.plan_retry`): the job name and the
route must be ones that this very job had in the broker's own events, as Sluice
read them from the broker (a ``task-sent`` or ``task-received`` with the name,
a ``task-sent`` with the queue, exchange and routing key) or as Sluice itself
published them (an earlier retry). Events pushed through the ingest endpoints
(the SDK, agents, anyone with an API key) may supply the arguments, never the
name or the route: an ingest key must not be able to make Sluice publish a job
of its choosing, and a broker's own events can only be forged by someone who
could publish on it anyway.
"""

from __future__ import annotations

import logging
import signal
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import attrs
import redis

from sluice_celery.control import (
    AmqpMailbox,
    NoListener,
    RedisClient,
    RedisMailbox,
    revoke_command,
)
from sluice_celery.events import FRAMEWORK
from sluice_celery.messages import (
    Call,
    Route,
    TaskMessage,
    details,
    event_route,
    publish_amqp,
    push_redis,
    recover_call,
    summary,
    task_message,
)
from sluice_core.actions import (
    BROKER,
    RETRY,
    REVOKE,
    ActionRefused,
    ActionResult,
    ActionSpec,
    RetryPlan,
    boolean_option,
    own_events,
    pushed_by,
    string_option,
)
from sluice_core.config import redact_url
from sluice_core.model import Job, JobEvent
from sluice_rabbitmq.connection import CONNECTION_ERRORS, describe
from sluice_rabbitmq.publish import AmqpPublisher, PublishError

log = logging.getLogger(__name__)

# What a message's route comes to on a broker: (exchange, queue or routing key).
Destination = tuple[str, str]

EVENTS_ADVICE = (
    "Sluice re-publishes a job only as a broker showed it. For jobs sent from now on, let "
    "the broker show them: start the workers with -E and set task_send_sent_event=True in "
    "the application."
)


class Broker(Protocol):
    url: str  # redacted: safe to show

    async def broadcast(self, body: dict[str, object]) -> int | None:
        """Publish a control message; how many workers heard it, None if the broker does
        not say. Raise NoListener if no worker can have it."""

    def destination(self, route: Route) -> Destination | None:
        """Where a message with ``route`` lands on this broker; None: nowhere known."""

    async def send_task(self, message: TaskMessage) -> None:
        """Queue a task message where its queue's workers take it."""

    async def aclose(self) -> None: ...


def where(destination: Destination) -> str:
    exchange, name = destination
    return f"queue {name}" if not exchange else f"exchange {exchange}, routing key {name}"


class RedisBroker:
    def __init__(self, url: str, *, keyprefix: str = "") -> None:
        self.client = RedisClient(url, keyprefix=keyprefix)
        self.url = self.client.url
        self.mailbox = RedisMailbox(self.client)

    async def broadcast(self, body: dict[str, object]) -> int | None:
        try:
            return await self.mailbox.broadcast(body)
        except redis.RedisError as exc:
            raise _unreachable(self.url, str(exc)) from exc

    def destination(self, route: Route) -> Destination | None:
        # The message is pushed on the queue's list; the exchange is only recorded in it.
        return None if route.queue is None else ("", route.queue)

    async def send_task(self, message: TaskMessage) -> None:
        try:
            await push_redis(self.client, message)
        except redis.RedisError as exc:
            raise _unreachable(self.url, str(exc)) from exc

    async def aclose(self) -> None:
        await self.client.aclose()


class AmqpBroker:
    def __init__(self, url: str) -> None:
        self.url = redact_url(url)
        self.publisher = AmqpPublisher(url)
        self.mailbox = AmqpMailbox(self.publisher, url)

    async def broadcast(self, body: dict[str, object]) -> int | None:
        try:
            await self.mailbox.broadcast(body)
        except CONNECTION_ERRORS as exc:
            raise _unreachable(self.url, describe(exc)) from exc
        return None  # a confirmed mandatory publish: at least one worker has it

    def destination(self, route: Route) -> Destination | None:
        # RabbitMQ routes by exchange and routing key; the queue name plays no part.
        return (route.exchange, route.routing_key)

    async def send_task(self, message: TaskMessage) -> None:
        try:
            await publish_amqp(self.publisher, message)
        except PublishError as exc:
            raise ActionRefused(f"cannot retry: {exc}") from exc
        except CONNECTION_ERRORS as exc:
            raise _unreachable(self.url, describe(exc)) from exc

    async def aclose(self) -> None:
        await self.publisher.aclose()


def _unreachable(url: str, reason: str) -> ActionRefused:
    return ActionRefused(f"the broker {url} did not take the message ({reason}); try again")


# -- what a broker showed of a job -----------------------------------------------------


@attrs.frozen
class Shown:
    """What one broker's own events showed of a job: its names, and where it was sent."""

    names: frozenset[str]
    routes: frozenset[Route]


def shown_by_brokers(timeline: Sequence[JobEvent]) -> dict[str, Shown]:
    """Per broker (its URL, redacted), what the job's own events from it showed: the
    task-sent and task-received Sluice read from that broker (the normalizer records
    which in ``extra["broker"]``) and Sluice's own publish of the job (a retry records
    the same). Pushed events count for nothing, whatever they claim."""
    names: defaultdict[str, set[str]] = defaultdict(set)
    routes: defaultdict[str, set[Route]] = defaultdict(set)
    for event in own_events(timeline):
        broker = event.extra.get(BROKER)
        if not isinstance(broker, str):
            continue
        name = event.fields.get("name")
        if isinstance(name, str):
            names[broker].add(name)
        found = event_route(event)
        if found is not None:
            routes[broker].add(found)
    return {
        broker: Shown(frozenset(names[broker]), frozenset(routes[broker]))
        for broker in names.keys() | routes.keys()
    }


@attrs.frozen
class _Planned:
    """A plan's message, and the broker it goes to."""

    broker: Broker
    message: TaskMessage


def _place(route: Route, broker: Broker | None) -> str:
    destination = None if broker is None else broker.destination(route)
    if destination is not None:
        return where(destination)
    return f"queue {route.queue}" if route.queue else f"routing key {route.routing_key}"


def _quoted(keys: list[str]) -> str:
    return ", ".join(repr(key) for key in keys)


def _arguments_from(job: Job, call: Call, timeline: Sequence[JobEvent]) -> str:
    """Where the arguments come from, said for the user who confirms: the key that
    pushed them, if Sluice has them from pushed events only."""
    if call.source == "sdk":
        what = "the SDK's capture of the message"
        carriers = [e for e in timeline if e.extra.get("message") == job.extra.get("message")]
    else:
        what = "the argument reprs in Celery's events"
        carriers = [e for e in timeline if e.fields.get("args") == job.args]
    keys = sorted({key for event in carriers if (key := pushed_by(event)) is not None})
    if keys and not own_events(carriers):
        return f"{what}, pushed with API key {_quoted(keys)}"
    return what


def signal_name(value: Any) -> str:
    """The signal's full name ("SIGTERM"), from "SIGTERM", "TERM" or "sigterm";
    ValueError for anything else."""
    if not isinstance(value, str):
        raise ValueError('expected a signal name such as "SIGTERM"')
    name = value.strip().upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    if name not in signal.Signals.__members__:
        raise ValueError(f"unknown signal {value!r} (e.g. SIGTERM, SIGKILL, SIGINT)")
    return name


RETRY_SPEC = ActionSpec(
    RETRY,
    "Retry",
    "Publish the job again, with its original arguments, as a new job on the broker"
    " that carried it.",
)
REVOKE_SPEC = ActionSpec(
    REVOKE,
    "Revoke",
    "Tell every worker to discard the job: one that has not started never runs.",
    (
        boolean_option("terminate", help="also kill the job if a worker is running it"),
        string_option(
            "signal",
            default="SIGTERM",
            help="the signal that kills it, with terminate (SIGTERM, SIGKILL, ...)",
            parse=signal_name,
        ),
    ),
)


class CeleryActions:
    """The :class:`~sluice_core.actions.ActionHandler` for Celery jobs."""

    framework = FRAMEWORK
    actions: tuple[ActionSpec, ...] = (RETRY_SPEC, REVOKE_SPEC)

    def __init__(self, brokers: list[Broker]) -> None:
        if not brokers:
            raise ValueError("CeleryActions needs at least one broker")
        self.brokers = brokers

    def handles(self, job: Job) -> bool:
        return job.framework == FRAMEWORK

    async def retry(self, job: Job) -> ActionResult:
        """Refused: without the job's timeline no broker confirms what to publish.
        Sluice retries through :meth:`plan_retry` and :meth:`publish` instead."""
        return await self.publish(await self.plan_retry(job, ()))

    async def plan_retry(self, job: Job, timeline: Sequence[JobEvent]) -> RetryPlan:
        """The message that re-runs ``job``, on the broker that carried it, once that
        broker's own events confirm its job name and route (see the module's docstring)."""
        call = recover_call(job)
        message = task_message(job, call, new_id=str(uuid.uuid4()))
        name: str = message.headers["task"]
        shown = shown_by_brokers(timeline)
        keys = sorted({key for event in timeline if (key := pushed_by(event)) is not None})
        pushed = (
            f" Events of this job were pushed with API key {_quoted(keys)}: such events may"
            " supply its arguments, never its job name or queue."
            if keys
            else ""
        )
        broker = self._carrier(job, shown, f"{name} to {_place(message.route, None)}", pushed)
        seen = shown[broker.url]
        destination = broker.destination(message.route)
        refused = f"cannot retry job {job.id}: Sluice would publish " + (
            f"{name} to {_place(message.route, broker)} on {broker.url}, but "
        )
        if name not in seen.names:
            known = ", ".join(sorted(seen.names)) or "no name"
            raise ActionRefused(
                f"{refused}that broker's own events showed this job as {known}, not {name}."
                + pushed
            )
        allowed = {broker.destination(r) for r in seen.routes} - {None}
        if destination is None or destination not in allowed:
            if not allowed:
                raise ActionRefused(
                    f"{refused}that broker's own events never said where this job was sent "
                    f"(no task-sent event).{pushed} Set task_send_sent_event=True in the "
                    "application so that they do."
                )
            shown_at = " or ".join(sorted(where(d) for d in allowed if d is not None))
            raise ActionRefused(
                f"{refused}that broker's own events showed this job sent to {shown_at}."
                + pushed
            )
        exchange, queue = destination
        return RetryPlan(
            job_id=job.id,
            name=name,
            queue=queue,
            target=broker.url,
            arguments=summary(call),
            arguments_from=_arguments_from(job, call, timeline),
            details=(*((f"exchange {exchange}",) if exchange else ()), *details(call)),
            record={
                BROKER: broker.url,
                "exchange": message.exchange,
                "routing_key": message.routing_key,
            },
            message=_Planned(broker, message),
        )

    async def publish(self, plan: RetryPlan) -> ActionResult:
        planned = plan.message
        if not isinstance(planned, _Planned):
            raise TypeError(f"not a plan of CeleryActions: {plan!r}")
        await planned.broker.send_task(planned.message)
        log.info(
            "job %s retried as %s: %s to %s on %s (arguments from %s)",
            plan.job_id, planned.message.id, plan.name, plan.queue, plan.target,
            plan.arguments_from,
        )
        return ActionResult(plan.job_id, "retry", new_job_id=planned.message.id, published=plan)

    async def perform(self, action: str, job: Job, options: Mapping[str, Any]) -> ActionResult:
        if action == RETRY:
            return await self.retry(job)
        [result] = await self.perform_many(action, [job], options)
        return result

    async def perform_many(
        self, action: str, jobs: list[Job], options: Mapping[str, Any]
    ) -> list[ActionResult]:
        if action != REVOKE:
            raise ActionRefused(f"Celery jobs have no action {action!r}")
        return await self.revoke_many(
            jobs, terminate=options["terminate"], signal=options["signal"]
        )

    async def revoke_many(
        self, jobs: list[Job], *, terminate: bool, signal: str
    ) -> list[ActionResult]:
        """One ``revoke`` control message for all ``jobs``, on every broker.

        Refused when it reached no worker at all: workers keep revoked ids in
        memory only, so one started later would run the job anyway.
        """
        body = revoke_command([job.id for job in jobs], terminate=terminate, signal=signal)
        missed: list[str] = []
        heard: dict[str, int | None] = {}
        for broker in self.brokers:
            try:
                heard[broker.url] = await broker.broadcast(body)
            except (NoListener, ActionRefused) as exc:
                missed.append(str(exc))
        if len(missed) == len(self.brokers):
            raise ActionRefused(
                "the revoke reached no worker, so it would not be applied (workers keep "
                "revoked ids in memory only): " + "; ".join(missed)
            )
        if missed:
            log.warning("revoke of %d job(s): %s", len(jobs), "; ".join(missed))
        log.info("revoke (terminate=%s) of %d job(s) sent: %s", terminate, len(jobs), heard)
        return [ActionResult(job.id, "revoke", heard_by=heard) for job in jobs]

    def _carrier(self, job: Job, shown: dict[str, Shown], what: str, pushed: str) -> Broker:
        """The broker whose own events showed the job. Never a broker named only by a
        pushed event: the job's ``extra["broker"]`` may come from one."""
        carriers = [broker for broker in self.brokers if broker.url in shown]
        if len(carriers) == 1:
            return carriers[0]
        if carriers:
            urls = ", ".join(broker.url for broker in carriers)
            raise ActionRefused(
                f"cannot retry job {job.id}: the events of several brokers ({urls}) show "
                "a job with this id, and Sluice does not know which one to publish it on"
            )
        urls = ", ".join(broker.url for broker in self.brokers)
        raise ActionRefused(
            f"cannot retry job {job.id}: Sluice would publish {what}, but no broker it "
            f"publishes to ({urls}) showed this job in its own events.{pushed} {EVENTS_ADVICE}"
        )

    async def aclose(self) -> None:
        for broker in self.brokers:
            await broker.aclose()

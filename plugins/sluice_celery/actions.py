"""Retry and revoke for Celery jobs, on Redis and RabbitMQ brokers.

One :class:`CeleryActions` handler serves every configured broker. A revoke
goes to all of them in one control message each (a job id unknown to a
broker's workers costs nothing there), so it never needs to know which broker
carried the job. A retry must publish on that broker: with one broker it is
that one; with several, the job's ``extra["broker"]`` must name it, else the
retry is refused with the list to choose from.
"""

from __future__ import annotations

import logging
import uuid
from typing import Protocol

import redis

from sluice_celery.control import (
    AmqpMailbox,
    NoListener,
    RedisClient,
    RedisMailbox,
    revoke_command,
)
from sluice_celery.events import FRAMEWORK
from sluice_celery.messages import TaskMessage, publish_amqp, push_redis, recover_call, task_message
from sluice_core.actions import ActionRefused, ActionResult
from sluice_core.config import redact_url
from sluice_core.model import Job
from sluice_rabbitmq.connection import CONNECTION_ERRORS, describe
from sluice_rabbitmq.publish import AmqpPublisher, PublishError

log = logging.getLogger(__name__)


class Broker(Protocol):
    url: str  # redacted: safe to show

    async def broadcast(self, body: dict[str, object]) -> None:
        """Publish a control message; raise NoListener if no worker can have it."""

    async def send_task(self, message: TaskMessage) -> None:
        """Queue a task message where its queue's workers take it."""

    async def aclose(self) -> None: ...


class RedisBroker:
    def __init__(self, url: str, *, keyprefix: str = "") -> None:
        self.client = RedisClient(url, keyprefix=keyprefix)
        self.url = self.client.url
        self.mailbox = RedisMailbox(self.client)

    async def broadcast(self, body: dict[str, object]) -> None:
        try:
            await self.mailbox.broadcast(body)
        except redis.RedisError as exc:
            raise _unreachable(self.url, str(exc)) from exc

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

    async def broadcast(self, body: dict[str, object]) -> None:
        try:
            await self.mailbox.broadcast(body)
        except CONNECTION_ERRORS as exc:
            raise _unreachable(self.url, describe(exc)) from exc

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


class CeleryActions:
    """The :class:`~sluice_core.actions.ActionHandler` for Celery jobs."""

    framework = FRAMEWORK

    def __init__(self, brokers: list[Broker]) -> None:
        if not brokers:
            raise ValueError("CeleryActions needs at least one broker")
        self.brokers = brokers

    def handles(self, job: Job) -> bool:
        return job.framework == FRAMEWORK

    async def retry(self, job: Job) -> ActionResult:
        broker = self._carrier(job)
        call = recover_call(job)
        message = task_message(job, call, new_id=str(uuid.uuid4()))
        await broker.send_task(message)
        log.info(
            "job %s retried as %s on %s (arguments from the %s)",
            job.id, message.id, broker.url, "SDK" if call.source == "sdk" else "events",
        )
        return ActionResult(job.id, "retry", new_job_id=message.id)

    async def revoke(self, job: Job, *, terminate: bool, signal: str) -> ActionResult:
        [result] = await self.revoke_many([job], terminate=terminate, signal=signal)
        return result

    async def revoke_many(
        self, jobs: list[Job], *, terminate: bool, signal: str
    ) -> list[ActionResult]:
        """One ``revoke`` control message for all ``jobs``, on every broker.

        Refused when it reached no worker at all: workers keep revoked ids in
        memory only, so one started later would run the job anyway.
        """
        body = revoke_command([job.id for job in jobs], terminate=terminate, signal=signal)
        missed: list[str] = []
        for broker in self.brokers:
            try:
                await broker.broadcast(body)
            except (NoListener, ActionRefused) as exc:
                missed.append(str(exc))
        if len(missed) == len(self.brokers):
            raise ActionRefused(
                "the revoke reached no worker, so it would not be applied (workers keep "
                "revoked ids in memory only): " + "; ".join(missed)
            )
        if missed:
            log.warning("revoke of %d job(s): %s", len(jobs), "; ".join(missed))
        log.info("revoke (terminate=%s) of %d job(s) sent", terminate, len(jobs))
        return [ActionResult(job.id, "revoke") for job in jobs]

    def _carrier(self, job: Job) -> Broker:
        if len(self.brokers) == 1:
            return self.brokers[0]
        named = job.extra.get("broker")
        for broker in self.brokers:
            if broker.url == named:
                return broker
        urls = ", ".join(broker.url for broker in self.brokers)
        raise ActionRefused(
            f"cannot retry job {job.id}: Sluice watches several brokers ({urls}) and does "
            "not know which one carried this job"
        )

    async def aclose(self) -> None:
        for broker in self.brokers:
            await broker.aclose()

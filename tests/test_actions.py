"""Retry and revoke, one job or in bulk, against real Celery workers on Redis and RabbitMQ.

Each test runs the whole engine (the celery and rabbitmq plugins, SQLite in
tmp_path, the web server on a free port) and acts through the HTTP API as a
user would, then watches what the real worker did through Sluice's own view of
the job. The worker fixture gives each test its own queue, key prefix and (on
RabbitMQ) vhost.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import pytest
import redis
import trio
from celery.utils.saferepr import saferepr
from playwright.sync_api import Page, expect

from sluice_celery.actions import AmqpBroker, CeleryActions, RedisBroker
from sluice_celery.messages import (
    PRIORITY_STEPS,
    details,
    recover_call,
    redis_queue_key,
    summary,
    task_message,
)
from sluice_core.actions import (
    ActionRefused,
    ActionResult,
    ActionSpec,
    Location,
    OffersPerJob,
    as_seen_by,
    behind_agents,
    boolean_option,
    lives_at,
    mark_pushed,
    own_events,
    string_option,
)
from sluice_core.agent import Agent
from sluice_core.config import Config, redact_url
from sluice_core.engine import Engine
from sluice_core.model import Job, JobEvent, JobState
from sluice_core.plugins import PluginManager
from sluice_core.remote import ActionExecutor, Agents, NoAnswer
from tests.celery_app import ENV_SDK, make_app
from tests.fixtures.celery_worker import CeleryWorker
from tests.fixtures.services import AMQP_URL, REDIS_URL
from tests.test_api import ActionsPlugin, ingest, serving
from tests.test_dashboard import browse
from tests.waiting import wait_until

TIMEOUT = 60  # absolute bound per test: worker start-up on a busy machine takes seconds
BOTH = pytest.mark.parametrize("celery_worker", ["redis", "rabbitmq"], indirect=True)
TOKEN = "test-token-0123456789abcdef"


@asynccontextmanager
async def sluice(
    tmp_path: Path,
    broker_url: str,
    keyprefix: str,
    *,
    more_brokers: Sequence[str] = (),
    **options: Any,
) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    """``sluice run --plugin celery --broker URL`` on a free port, its sources connected."""
    pm = PluginManager()
    pm.load(["celery", "rabbitmq"])
    options = {"redis_keyprefix": keyprefix, **options}
    config = Config(
        broker=[broker_url, *more_brokers],
        db=f"sqlite:///{tmp_path}/sluice.db",
        port=0,
        **options,
    )
    pm.configure(config)
    engine = Engine(config, pm)
    headers = {"Authorization": f"Bearer {TOKEN}"} if "api_token" in options else None
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        base = engine.web_addresses[0].replace("0.0.0.0", "127.0.0.1")
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:

            async def healthy() -> bool:
                return (await client.get("/healthz")).status_code == 200

            # Ready once the event source is subscribed: nothing sent from here on is missed.
            await wait_until(healthy, "/healthz to answer 200")
            yield engine, client
        for handler in engine.actions:
            if isinstance(handler, CeleryActions):
                await handler.aclose()
        engine.stop()


async def job_when(
    client: httpx.AsyncClient, job_id: str, ready: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The job as the API shows it, once ``ready(job)`` holds."""

    async def shown() -> dict[str, Any] | None:
        response = await client.get(f"/api/jobs/{job_id}")
        return job if response.status_code == 200 and ready(job := response.json()) else None

    return await wait_until(shown, f"job {job_id} to pass {ready.__qualname__}")


def in_state(*states: str) -> Callable[[dict[str, Any]], bool]:
    return lambda job: job["state"] in states


def actions(job: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """The details of the job's ``sluice-<kind>`` audit events, oldest first."""
    return [e["detail"] for e in job["events"] if e["type"] == f"sluice-{kind}"]


async def send(worker: CeleryWorker, name: str, *args: Any, **options: Any) -> str:
    kwargs = options.pop("kwargs", {})
    result = await trio.to_thread.run_sync(
        lambda: worker.app.send_task(name, args, kwargs, queue=worker.queue, **options)
    )
    return str(result.id)


# -- revoke ----------------------------------------------------------------------------


@BOTH
async def test_revoked_scheduled_job_never_runs_and_ends_revoked(
    celery_worker: CeleryWorker, tmp_path: Path
) -> None:
    worker = celery_worker
    with trio.fail_after(TIMEOUT):
        async with sluice(tmp_path, worker.broker_url, worker.keyprefix) as (_, client):
            # The worker holds a countdown job until its ETA: a revoke must reach it there.
            job_id = await send(worker, "tests.add", 2, 2, countdown=3)
            await job_when(client, job_id, in_state("scheduled"))

            response = await client.post(f"/api/jobs/{job_id}/revoke", json={})
            assert response.status_code == 202, response.text
            # Heard by the worker: Redis counts it, RabbitMQ only confirms that one has it.
            heard = 1 if worker.broker_url.startswith("redis") else None
            assert response.json() == {
                "job_id": job_id, "terminate": False, "signal": "SIGTERM",
                "heard_by": {redact_url(worker.broker_url): heard}, "agent": None,
            }
            # Until a worker confirms, the job shows the pending action, from the audit event.
            job = (await client.get(f"/api/jobs/{job_id}")).json()
            [audit] = actions(job, "revoke")
            assert audit["outcome"] == "accepted" and audit["terminate"] is False
            if job["state"] != "revoked":
                page = (await client.get(f"/jobs/{job_id}")).text
                assert "Revoke requested at" in page

            job = await job_when(client, job_id, in_state("revoked"))
            page = (await client.get(f"/jobs/{job_id}")).text
    states = [e["state"] for e in job["events"]]
    assert "active" not in states and "completed" not in states
    assert job["started_at"] is None and job["result"] is None
    assert "Revoke requested" not in page


@BOTH
async def test_terminate_kills_a_running_job(celery_worker: CeleryWorker, tmp_path: Path) -> None:
    worker = celery_worker
    with trio.fail_after(TIMEOUT):
        async with sluice(tmp_path, worker.broker_url, worker.keyprefix) as (_, client):
            job_id = await send(worker, "tests.sleep", 120)
            await job_when(client, job_id, in_state("active"))
            response = await client.post(
                f"/api/jobs/{job_id}/revoke", json={"terminate": True, "signal": "SIGKILL"}
            )
            assert response.status_code == 202, response.text
            job = await job_when(client, job_id, in_state("revoked"))
    [revoked] = [e for e in job["events"] if e["type"] == "task-revoked"]
    assert revoked["detail"]["terminated"] is True
    assert revoked["detail"]["signum"] in ("9", 9)
    [audit] = actions(job, "revoke")
    assert (audit["terminate"], audit["signal"]) == (True, "SIGKILL")


# -- retry -----------------------------------------------------------------------------


@BOTH
async def test_retry_of_a_failed_job_whose_cause_was_fixed_completes_with_its_arguments(
    celery_worker: CeleryWorker, tmp_path: Path
) -> None:
    worker = celery_worker
    path = tmp_path / "input.txt"
    with trio.fail_after(TIMEOUT):
        async with sluice(tmp_path, worker.broker_url, worker.keyprefix) as (_, client):
            failed_id = await send(worker, "tests.read_file", str(path), kwargs={"strip": True})
            failed = await job_when(client, failed_id, in_state("failed"))
            assert "FileNotFoundError" in failed["exception"]

            path.write_text("  fixed  \n")
            # What the user confirms first is what gets published.
            preview = await client.get(f"/api/jobs/{failed_id}/retry")
            assert preview.status_code == 200, preview.text
            response = await client.post(f"/api/jobs/{failed_id}/retry")
            assert response.status_code == 202, response.text
            new_id = response.json()["job_id"]
            published = preview.json()["publish"]
            assert response.json() == {
                "job_id": new_id, "retry_of": failed_id, "published": published
            }
            assert new_id != failed_id
            assert published == {
                "name": "tests.read_file",
                "queue": worker.queue,
                "broker": redact_url(worker.broker_url),
                "agent": None,
                "arguments": f'("{path}", strip=true)',
                "arguments_from": "the argument reprs in Celery's events",
                "details": [],
            }

            new = await job_when(client, new_id, in_state("completed"))
            old = (await client.get(f"/api/jobs/{failed_id}")).json()
            # A retry of the retry rests on Sluice's own record of where it published it.
            again = await client.post(f"/api/jobs/{new_id}/retry")
            assert again.status_code == 202, again.text
            assert again.json()["published"] == published
            await job_when(client, again.json()["job_id"], in_state("completed"))
    # The new run had the original arguments (strip=True included): it read and stripped.
    assert new["result"] == "'fixed'"
    assert (new["name"], new["queue"]) == ("tests.read_file", worker.queue)
    assert (new["args"], new["kwargs"]) == (failed["args"], failed["kwargs"])
    assert new["retry_of"] == failed_id and old["retried_as"] == new_id
    assert old["state"] == "failed"  # the original job's own history is unchanged
    [audit] = actions(old, "retry")
    assert (audit["outcome"], audit["new_job_id"]) == ("accepted", new_id)
    assert audit["published"] == published  # the timeline says what went out
    # The new job shows Sluice's publish first, then what the worker did.
    assert [e["type"] for e in new["events"]][:2] == ["sluice-retry", "task-received"]


async def test_with_several_brokers_a_retry_goes_to_the_one_that_carried_the_job(
    celery_worker: CeleryWorker, tmp_path: Path
) -> None:
    worker = celery_worker  # on Redis; Sluice also watches RabbitMQ
    path = tmp_path / "input.txt"
    with trio.fail_after(TIMEOUT):
        async with sluice(
            tmp_path, worker.broker_url, worker.keyprefix, more_brokers=[AMQP_URL]
        ) as (engine, client):
            assert len(engine.sources) == 2
            failed_id = await send(worker, "tests.read_file", str(path))
            failed = await job_when(client, failed_id, in_state("failed"))
            assert failed["extra"]["broker"] == redact_url(worker.broker_url)
            path.write_text("carried by Redis")
            response = await client.post(f"/api/jobs/{failed_id}/retry")
            assert response.status_code == 202, response.text
            new = await job_when(client, response.json()["job_id"], in_state("completed"))
    assert new["result"] == "'carried by Redis'"


async def test_retry_uses_the_sdks_full_arguments_where_the_repr_is_truncated(
    tmp_path: Path, keyprefix: str
) -> None:
    # A path longer than Celery's 1024-character repr: events alone could not re-run it.
    folder = tmp_path.joinpath(*["d" * 200] * 6)
    folder.mkdir(parents=True)
    path = folder / "input.txt"
    with trio.fail_after(TIMEOUT):
        async with sluice(tmp_path, REDIS_URL, keyprefix) as (engine, client):
            _, key = await engine.storage.create_api_key("tests")
            # The SDK in the worker sees the real message; the broker's own events (-E,
            # task_send_sent_event) confirm the job name and queue the retry publishes.
            worker = CeleryWorker(
                REDIS_URL, keyprefix, tmp_path / "celery-worker.log",
                env={ENV_SDK: "1", "SLUICE_URL": str(client.base_url), "SLUICE_API_KEY": key},
            )
            try:
                await trio.to_thread.run_sync(worker.start)
                failed_id = await send(worker, "tests.read_file", str(path))

                async def broker_saw_it() -> bool:
                    # As stored: the API shows the SDK's and the broker's reports of one
                    # happening as one event.
                    stored = own_events(await engine.storage.job_events(failed_id))
                    return {"task-sent", "task-received"} <= {e.type for e in stored}

                def failed_with_capture(job: dict[str, Any]) -> bool:
                    return job["state"] == "failed" and "message" in job["extra"]

                await wait_until(broker_saw_it, "the broker's own task-sent and task-received")
                failed = await job_when(client, failed_id, failed_with_capture)
                # Celery's repr was cut at 1024 characters; the SDK's full arguments win.
                assert str(path) in failed["args"]
                path.write_text("full path")
                response = await client.post(f"/api/jobs/{failed_id}/retry")
                assert response.status_code == 202, response.text
                new = await job_when(client, response.json()["job_id"], in_state("completed"))
            finally:
                await trio.to_thread.run_sync(worker.close)
    assert new["result"] == "'full path'"
    assert new["extra"]["message"]["args"] == [str(path)]
    published = response.json()["published"]
    assert (published["name"], published["queue"]) == ("tests.read_file", worker.queue)
    assert published["arguments_from"] == (
        "the SDK's capture of the message, pushed with API key 'tests'"
    )


async def test_retry_is_refused_when_arguments_are_only_a_truncated_repr(
    celery_worker: CeleryWorker, tmp_path: Path
) -> None:
    worker = celery_worker
    with trio.fail_after(TIMEOUT):
        async with sluice(tmp_path, worker.broker_url, worker.keyprefix) as (_, client):
            long_id = await send(worker, "tests.echo", "x" * 2000)
            deep_id = await send(worker, "tests.echo", {"a": {"b": {"c": 1}}})
            for job_id in (long_id, deep_id):
                await job_when(client, job_id, in_state("completed"))
            refusals = {}
            for job_id in (long_id, deep_id):
                response = await client.post(f"/api/jobs/{job_id}/retry")
                assert response.status_code == 409, response.text
                assert response.json()["error"]["code"] == "refused"
                refusals[job_id] = response.json()["error"]["message"]
            listed = (await client.get("/api/jobs")).json()["jobs"]
            long_job = (await client.get(f"/api/jobs/{long_id}")).json()
    assert "truncated" in refusals[long_id]
    assert "elided" in refusals[deep_id]
    for message in refusals.values():
        assert "SDK" in message and "argsrepr_maxsize" in message
    assert {job["id"] for job in listed} == {long_id, deep_id}  # no new job was published
    [audit] = actions(long_job, "retry")
    assert audit["outcome"] == "refused" and "truncated" in audit["reason"]


@pytest.mark.browser
async def test_retry_button_confirms_then_links_to_the_new_job(
    celery_worker: CeleryWorker, tmp_path: Path
) -> None:
    worker = celery_worker
    path = tmp_path / "input.txt"
    with trio.fail_after(TIMEOUT):
        async with sluice(tmp_path, worker.broker_url, worker.keyprefix) as (_, client):
            job_id = await send(worker, "tests.read_file", str(path))
            await job_when(client, job_id, in_state("failed"))
            path.write_text("ok")
            base = str(client.base_url)
            dialogs: list[str] = []

            def scenario(page: Page) -> None:
                page.goto(f"{base}/jobs/{job_id}")
                page.once("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
                with page.expect_event("dialog"):  # asked once the preview answered
                    page.click("button[data-action=retry]")
                expect(page.locator("#action-result")).to_have_text("")  # dismissed: nothing sent
                page.once("dialog", lambda dialog: dialog.accept())
                with page.expect_event("dialog"):
                    page.click("button[data-action=retry]")
                link = page.locator("#action-result a")
                expect(link).to_have_text(re.compile(r"^[0-9a-f-]{36}$"))
                link.click()
                expect(page.locator("h1 .badge")).to_have_text("completed", timeout=20_000)
                expect(page.locator(".details")).to_contain_text(f"Retry of{job_id}")

            await browse(scenario)
            job = (await client.get(f"/api/jobs/{job_id}")).json()
    # The dialog says what will be published: job name, queue, broker and arguments.
    assert dialogs and "Sluice will publish" in dialogs[0]
    assert f"tests.read_file to queue {worker.queue} on {redact_url(worker.broker_url)}" in (
        dialogs[0]
    )
    assert str(path) in dialogs[0] and "Celery's events" in dialogs[0]
    assert [audit["outcome"] for audit in actions(job, "retry")] == ["accepted"]  # one retry


@pytest.mark.browser
async def test_a_refused_retry_says_why_and_asks_nothing(tmp_path: Path, keyprefix: str) -> None:
    forged_id = str(uuid.uuid4())
    with trio.fail_after(TIMEOUT):
        async with sluice(tmp_path, REDIS_URL, keyprefix) as (engine, client):
            _, key = await engine.storage.create_api_key("attacker")
            events = forged_celery_events(
                forged_id, STOLEN, "payments-critical", forged_message("payments-critical", 1)
            )
            response = await client.post(
                "/api/ingest", json={"format": "celery", "events": events},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert response.status_code == 200, response.text
            base = str(client.base_url)
            dialogs: list[str] = []

            def scenario(page: Page) -> None:
                page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
                page.goto(f"{base}/jobs/{forged_id}")
                page.click("button[data-action=retry]")
                # The reason, on the page; no question, since there is nothing to confirm.
                expect(page.locator("#action-result")).to_contain_text(
                    "no broker it publishes to"
                )
                page.goto(f"{base}/jobs?state=failed")
                page.check(f".job-select[value='{forged_id}']")
                with page.expect_event("dialog"):  # asked once the dry run answered
                    page.click("button[data-bulk=retry]")
                expect(page.locator("#bulk-result")).to_have_text("")  # dismissed: nothing sent

            await browse(scenario)
            job = (await client.get(f"/api/jobs/{forged_id}")).json()
    # Only the bulk retry asked, and its question says what would happen before anything did.
    [question] = dialogs
    assert "Retry 1 job(s)?" in question and "Refused, not published: 1" in question
    assert STOLEN in question and "API key 'attacker'" in question
    assert actions(job, "retry") == []  # a preview publishes nothing, records nothing


# -- bulk --------------------------------------------------------------------------------


@BOTH
async def test_bulk_retry_of_failed_jobs_and_bulk_revoke_of_scheduled_ones(
    celery_worker: CeleryWorker, tmp_path: Path
) -> None:
    worker = celery_worker
    paths = [tmp_path / f"input-{i}.txt" for i in range(3)]
    with trio.fail_after(TIMEOUT):
        async with sluice(tmp_path, worker.broker_url, worker.keyprefix) as (_, client):
            failed = [await send(worker, "tests.read_file", str(path)) for path in paths]
            scheduled = [await send(worker, "tests.add", i, i, countdown=3) for i in range(2)]
            for job_id in failed:
                await job_when(client, job_id, in_state("failed"))
            for job_id in scheduled:
                await job_when(client, job_id, in_state("scheduled"))

            response = await client.post(
                "/api/jobs/bulk", json={"action": "revoke", "ids": scheduled}
            )
            assert response.status_code == 200, response.text
            assert [r["outcome"] for r in response.json()["results"]] == ["accepted"] * 2

            for i, path in enumerate(paths):
                path.write_text(f"run {i}")
            retry_failed = {
                "action": "retry",
                "filter": {"state": "failed", "name": "tests.read_file"},
            }
            dry = await client.post("/api/jobs/bulk", json={**retry_failed, "dry_run": True})
            assert dry.status_code == 200, dry.text
            assert sorted(job["id"] for job in dry.json()["jobs"]) == sorted(failed)
            for job_id in failed:  # a dry run touches nothing
                assert actions((await client.get(f"/api/jobs/{job_id}")).json(), "retry") == []

            response = await client.post("/api/jobs/bulk", json=retry_failed)
            assert response.status_code == 200, response.text
            results = {r["id"]: r for r in response.json()["results"]}
            assert set(results) == set(failed)
            assert {r["outcome"] for r in results.values()} == {"accepted"}
            outcomes = {
                job_id: await job_when(client, r["new_job_id"], in_state("completed"))
                for job_id, r in results.items()
            }
            for job_id in scheduled:
                await job_when(client, job_id, in_state("revoked"))
    for job_id, path in zip(failed, paths, strict=True):
        assert outcomes[job_id]["result"] == repr(path.read_text())
        assert outcomes[job_id]["retry_of"] == job_id


# -- what an ingest key may not decide -------------------------------------------------------

STOLEN = "billing.refund_all"  # what a holder of an ingest key would like Sluice to run


def forged_message(queue: str, *args: Any) -> dict[str, Any]:
    """A "captured" message as a pushed event carries it: the sender's arguments, queue,
    top priority and a header of its own."""
    return {
        "args": list(args),
        "kwargs": {},
        "redacted": False,
        "options": {"queue": queue, "priority": 9, "headers": {"x-approved-by": "cfo"}},
    }


def forged_celery_events(job_id: str, name: str, queue: str, message: dict[str, Any]) -> list[
    dict[str, Any]
]:
    """Celery's event dicts, as the SDK pushes them: a job sent with ``message``, then failed."""
    now = time.time()
    common = {"uuid": job_id, "utcoffset": 0, "pid": 1, "args": "()", "kwargs": "{}"}
    return [
        {**common, "type": "task-sent", "hostname": "gen1@elsewhere", "clock": 1,
         "timestamp": now, "name": name, "queue": queue, "sluice_message": message},
        {**common, "type": "task-failed", "hostname": "w1@elsewhere", "clock": 2,
         "timestamp": now + 0.1, "exception": "RuntimeError('declined')", "traceback": ""},
    ]


def forged_agent_events(
    job_id: str, broker: str, queue: str, message: dict[str, Any]
) -> list[dict[str, Any]]:
    """Normalized events, as an agent pushes them, claiming all a broker's own events
    and Sluice's own publish would say: the broker, the route, no API key, another agent."""
    now = time.time()

    def event(kind: str, state: str, at: float, **fields: Any) -> dict[str, Any]:
        extra = {"broker": broker, "exchange": "", "routing_key": queue, "message": message,
                 "pushed_by": None, "agent": "agent-eu"}
        return {"id": uuid.uuid4().hex, "job_id": job_id, "framework": "celery", "type": kind,
                "state": state, "timestamp": at, "fields": fields, "extra": extra}

    return [
        event("sluice-retry", "queued", now, name=STOLEN, queue=queue),
        event("task-received", "received", now + 0.1, name=STOLEN),
        event("task-failed", "failed", now + 0.2, exception="RuntimeError('declined')"),
    ]


async def test_an_ingest_key_cannot_choose_what_a_retry_publishes(
    celery_worker: CeleryWorker, tmp_path: Path
) -> None:
    worker = celery_worker  # on Redis
    broker = redact_url(worker.broker_url)
    critical = f"payments-critical-{uuid.uuid4().hex[:8]}"  # no worker consumes it
    real = [tmp_path / f"input-{i}.txt" for i in range(2)]
    forged = {"celery": str(uuid.uuid4()), "agent": str(uuid.uuid4())}
    broker_client = redis.Redis.from_url(worker.broker_url)

    async def waiting_on(queue: str) -> int:
        """Messages on the queue's lists, every priority step: a push is there at once."""
        keys = [redis_queue_key(queue, p, worker.keyprefix) for p in PRIORITY_STEPS]
        return sum([await trio.to_thread.run_sync(broker_client.llen, key) for key in keys])

    with trio.fail_after(TIMEOUT):
        async with sluice(tmp_path, worker.broker_url, worker.keyprefix) as (engine, client):
            _, key = await engine.storage.create_api_key("attacker")
            ingest_key = {"Authorization": f"Bearer {key}"}
            legit, hijacked = [await send(worker, "tests.read_file", str(p)) for p in real]
            for job_id in (legit, hijacked):
                await job_when(client, job_id, in_state("failed"))

            async def push(body: dict[str, Any]) -> None:
                response = await client.post("/api/ingest", json=body, headers=ingest_key)
                assert response.status_code == 200, response.text

            # A job the broker never had, with its own message; one claiming, in the
            # agents' format, to be the broker's own events and Sluice's own publish on
            # the queue the worker consumes; and a real failed job whose message it replaces.
            await push({"format": "celery", "events": forged_celery_events(
                forged["celery"], STOLEN, critical, forged_message(critical, "everyone"))})
            await push({"format": "sluice", "job_events": forged_agent_events(
                forged["agent"], broker, worker.queue, forged_message(worker.queue, "everyone"))})
            await push({"format": "celery", "events": forged_celery_events(
                hijacked, "tests.read_file", critical, forged_message(critical, "/etc/shadow"))})

            reasons = {}
            for job_id in [*forged.values(), hijacked]:
                preview = await client.get(f"/api/jobs/{job_id}/retry")
                response = await client.post(f"/api/jobs/{job_id}/retry")
                assert response.status_code == preview.status_code == 409, response.text
                assert response.json()["error"]["code"] == "refused"
                reasons[job_id] = response.json()["error"]["message"]
                assert preview.json()["error"]["message"] == reasons[job_id]
                # Pushed (LPUSH) before the answer, had it been: nothing is there.
                assert await waiting_on(critical) == 0

            # A routine "retry failed": the real failure goes out, the others are refused.
            for path in real:
                path.write_text("fixed")
            retry_failed = {"action": "retry", "filter": {"state": "failed"}}
            dry = await client.post("/api/jobs/bulk", json={**retry_failed, "dry_run": True})
            assert dry.status_code == 200, dry.text
            previews = {p["id"]: p for p in dry.json()["retries"]}
            assert previews[legit]["publish"]["queue"] == worker.queue
            assert {job_id: p["refused"] for job_id, p in previews.items() if p["refused"]} == {
                job_id: reasons[job_id] for job_id in [*forged.values(), hijacked]
            }
            response = await client.post("/api/jobs/bulk", json=retry_failed)
            assert response.status_code == 200, response.text
            results = {r["id"]: r for r in response.json()["results"]}
            assert {job_id: r["outcome"] for job_id, r in results.items()} == {
                legit: "accepted", hijacked: "refused",
                forged["celery"]: "refused", forged["agent"]: "refused",
            }
            for job_id in [*forged.values(), hijacked]:
                assert results[job_id]["message"] == reasons[job_id]
            assert results[legit]["published"]["name"] == "tests.read_file"
            # The worker takes its queue in order: once the legitimate retry has run,
            # anything published before it on that queue would have been received too.
            retried = await job_when(client, results[legit]["new_job_id"], in_state("completed"))
            assert await waiting_on(critical) == 0
            received = (await client.get("/api/jobs", params={"name": STOLEN})).json()["jobs"]
            forged_job = (await client.get(f"/api/jobs/{forged['celery']}")).json()
    broker_client.close()
    assert retried["result"] == "'fixed'"
    assert {job["id"] for job in received} == set(forged.values())  # none ran
    assert [a["outcome"] for a in actions(forged_job, "retry")] == ["refused", "refused"]
    # Each refusal says what would have gone out, and why not, in words a user follows.
    never_shown = reasons[forged["celery"]]
    assert f"{STOLEN} to queue {critical}" in never_shown and broker in never_shown
    assert "no broker it publishes to" in never_shown and "API key 'attacker'" in never_shown
    assert "-E" in never_shown and "task_send_sent_event" in never_shown
    # Events in the agents' format speak for their key's brokers, never for the server's
    # own: that job lives behind an agent "attacker", which is not connected.
    assert reasons[forged["agent"]] == (
        f"the agent 'attacker' that reads broker {broker} is not connected; nothing was sent"
    )
    hijack = reasons[hijacked]
    assert f"tests.read_file to queue {critical} on {broker}" in hijack
    assert f"showed this job sent to queue {worker.queue}" in hijack


# -- actions on a remote agent's jobs ----------------------------------------------------


class ServerRedis:
    """What the central server could publish on its own Redis: jobs pushed on the agent's
    queue name there, and revokes on its mailbox, where another cluster's workers would
    take them."""

    def __init__(self, keyprefix: str, queue: str) -> None:
        self.client = redis.Redis.from_url(REDIS_URL)
        self.keys = [redis_queue_key(queue, p, keyprefix) for p in PRIORITY_STEPS]
        self.mailbox = f"{keyprefix}/0.celery.pidbox"
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe(self.mailbox)
        self.pubsub.get_message(timeout=5)  # the subscription's confirmation

    async def published(self) -> list[str]:
        """What was published so far: the queue's messages, and the revokes that reached
        the mailbox before a marker of ours (Redis delivers a channel's messages in order)."""

        def read() -> list[str]:
            queued = [m.decode() for key in self.keys for m in self.client.lrange(key, 0, -1)]
            self.client.publish(self.mailbox, b"marker")
            while (message := self.pubsub.get_message(timeout=5)) is not None:
                if message["type"] != "message":
                    continue
                if message["data"] == b"marker":
                    return queued
                # Sluice's own questions to its workers (reconciliation) are no action.
                body = json.loads(base64.b64decode(json.loads(message["data"])["body"]))
                if body["method"] == "revoke":
                    queued.append(f"revoke {body['arguments']}")
            raise AssertionError("our own marker never came back")

        return await trio.to_thread.run_sync(read)

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


@asynccontextmanager
async def remote_agent(central: Engine, broker_url: str, name: str) -> AsyncIterator[Agent]:
    """``sluice agent --broker URL --server ws://...`` with a key named ``name``, connected
    and reading its broker; stopped at the end."""
    pm = PluginManager()
    pm.load(["celery", "rabbitmq"])
    config = Config(broker=[broker_url])
    pm.configure(config)
    _, key = await central.storage.create_api_key(name)
    server = central.web_addresses[0].replace("0.0.0.0", "127.0.0.1")
    agent = Agent(config, pm, server=server, api_key=key)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        source = agent.sources[0].name

        def ready() -> bool:
            status = agent.pipeline.sources.get(source)
            return agent.uplink.connected and status is not None and status.up

        await wait_until(ready, "the agent to connect and read its broker")
        yield agent
        agent.stop()
        await agent.stopped.wait()


@pytest.mark.parametrize("celery_worker", ["rabbitmq"], indirect=True)
async def test_actions_on_an_agents_jobs_are_done_by_the_agent_on_its_own_broker(
    celery_worker: CeleryWorker, tmp_path: Path, keyprefix: str
) -> None:
    worker = celery_worker  # on a RabbitMQ vhost of its own, which only the agent reads
    here = {"broker": redact_url(worker.broker_url), "agent": "agent-eu"}
    path = tmp_path / "input.txt"
    # The central server reads a Redis of its own: what it published there would run
    # on another cluster.
    own = ServerRedis(keyprefix, worker.queue)
    try:
        with trio.fail_after(2 * TIMEOUT):
            async with sluice(tmp_path, REDIS_URL, keyprefix) as (central, client):
                async with remote_agent(central, worker.broker_url, "agent-eu"):
                    failed_id = await send(worker, "tests.read_file", str(path))
                    failed = await job_when(client, failed_id, in_state("failed"))
                    page = (await client.get(f"/jobs/{failed_id}")).text
                    path.write_text("fixed")

                    preview = await client.get(f"/api/jobs/{failed_id}/retry")
                    assert preview.status_code == 200, preview.text
                    retried = await client.post(f"/api/jobs/{failed_id}/retry")
                    assert retried.status_code == 202, retried.text
                    # The new attempt's events come back through the agent.
                    new = await job_when(client, retried.json()["job_id"], in_state("completed"))
                    # A retry of the retry rests on Sluice's record of the agent's publish.
                    again = await client.post(f"/api/jobs/{new['id']}/retry")
                    assert again.status_code == 202, again.text
                    await job_when(client, again.json()["job_id"], in_state("completed"))

                    eta_id = await send(worker, "tests.add", 2, 2, countdown=4)
                    await job_when(client, eta_id, in_state("scheduled"))
                    revoked = await client.post(f"/api/jobs/{eta_id}/revoke", json={})
                    assert revoked.status_code == 202, revoked.text
                    eta = await job_when(client, eta_id, in_state("revoked"))
                    held_id = await send(worker, "tests.add", 3, 3, countdown=600)
                    await job_when(client, held_id, in_state("scheduled"))

                # The agent stopped: the actions on its jobs have nowhere to go.
                async def away() -> httpx.Response | None:
                    response = await client.get(f"/api/jobs/{failed_id}/retry")
                    return response if response.status_code == 409 else None

                preview_away = await wait_until(away, "the server to see the agent gone")
                retry_away = await client.post(f"/api/jobs/{failed_id}/retry")
                revoke_away = await client.post(f"/api/jobs/{held_id}/revoke", json={})
                bulk = await client.post(
                    "/api/jobs/bulk", json={"action": "revoke", "ids": [held_id, eta_id]}
                )
                old = (await client.get(f"/api/jobs/{failed_id}")).json()
                published = await own.published()
    finally:
        own.close()
    assert failed["location"] == here and new["location"] == here
    assert "through agent <b>agent-eu</b>" in page and here["broker"] in page
    assert preview.json()["publish"]["agent"] == "agent-eu"
    assert retried.json()["published"] == preview.json()["publish"]
    assert retried.json()["published"]["broker"] == here["broker"]
    assert new["result"] == "'fixed'" and new["retry_of"] == failed_id
    # The revoke reached the agent's worker, which discarded the job before its ETA.
    assert (revoked.json()["agent"], revoked.json()["heard_by"]) == (
        "agent-eu", {here["broker"]: None}  # RabbitMQ confirms, without a count
    )
    assert not {"active", "completed"} & {e["state"] for e in eta["events"]}
    # Away: a 409 that says so, per job in bulk, recorded; nothing went anywhere else.
    message = (
        f"the agent 'agent-eu' that reads broker {here['broker']} is not connected;"
        " nothing was sent"
    )
    for response in (preview_away, retry_away, revoke_away):
        assert response.status_code == 409, response.text
        assert response.json()["error"]["message"] == message
    assert [(r["outcome"], r["message"][:40]) for r in bulk.json()["results"]] == [
        ("refused", message[:40]), ("refused", f"job {eta_id} had already finished"[:40])
    ]
    assert [a["outcome"] for a in actions(old, "retry")] == ["accepted", "refused"]
    assert published == []


# -- bad input, and a revoke no worker hears -----------------------------------------------


async def test_bad_input_and_a_revoke_that_reaches_no_worker(
    tmp_path: Path, keyprefix: str
) -> None:
    # A producer and no worker: the job is queued and nobody listens on the mailbox.
    app = make_app("redis://localhost:6379/0", keyprefix=keyprefix, queue=f"q-{keyprefix}")
    with trio.fail_after(TIMEOUT):
        async with sluice(
            tmp_path, "redis://localhost:6379/0", keyprefix, api_token=TOKEN
        ) as (_, client):
            job_id = str(
                (await trio.to_thread.run_sync(lambda: app.send_task("tests.add", (1, 2)))).id
            )
            await job_when(client, job_id, in_state("queued"))

            assert (await client.post("/api/jobs/nope/retry")).status_code == 404
            assert (await client.post("/api/jobs/nope/revoke")).status_code == 404
            bulk_unknown = {"action": "revoke", "ids": [job_id, "nope"]}
            assert (await client.post("/api/jobs/bulk", json=bulk_unknown)).status_code == 404
            for body in (b"{not json", b"[1]"):
                response = await client.post(f"/api/jobs/{job_id}/revoke", content=body)
                assert response.status_code == 400, response.text
            bad = {"terminate": "yes"}
            assert (await client.post(f"/api/jobs/{job_id}/revoke", json=bad)).status_code == 400
            bad_bulk = {"action": "retry", "ids": [job_id], "dry_run": "maybe"}
            assert (await client.post("/api/jobs/bulk", json=bad_bulk)).status_code == 400

            response = await client.post(f"/api/jobs/{job_id}/revoke")
            assert response.status_code == 409, response.text
            message = response.json()["error"]["message"]
            job = (await client.get(f"/api/jobs/{job_id}")).json()
    app.close()
    assert "reached no worker" in message and "no worker listens" in message
    [audit] = actions(job, "revoke")
    assert (audit["outcome"], audit["user"]) == ("refused", "api-token")
    assert job["state"] == "queued"


# -- arguments from event reprs: what Celery's saferepr really produces ---------------------


def repr_job(*args: Any, **kwargs: Any) -> Job:
    return Job(
        id="j1", framework="celery", name="t", queue="q",
        args=saferepr(args, 1024), kwargs=saferepr(kwargs, 1024),
    )


def test_plain_literal_reprs_are_recovered_exactly() -> None:
    args = (1, -2.5, "it's", None, True, [1, (2, 3)], {"k": ["v"]}, "")
    job = repr_job(*args, flag=False, name="ok")
    call = recover_call(job)
    assert call.source == "events"
    # What the worker gets: the JSON body of the new message (tuples become lists, as
    # they did in the original JSON message).
    message = task_message(job, call, new_id="n1")
    body_args, body_kwargs, embed = orjson.loads(message.body)
    assert body_args == [1, -2.5, "it's", None, True, [1, [2, 3]], {"k": ["v"]}, ""]
    assert body_kwargs == {"flag": False, "name": "ok"}
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert (message.headers["task"], message.headers["id"], message.routing_key) == ("t", "n1", "q")
    assert (message.headers["argsrepr"], message.headers["root_id"]) == (job.args, "n1")


@pytest.mark.parametrize(
    ("args", "kwargs", "why"),
    [
        (("x" * 2000,), {}, "truncated"),  # parses, but the string was cut
        ((list(range(600)),), {}, "truncated"),  # does not parse
        (({"a": {"b": {"c": 1}}},), {}, "elided"),  # {...} past 3 levels
        ((), {"deep": [[[["x"]]]]}, "elided"),
        ((r"C:\temp",), {}, "backslash"),  # saferepr does not escape it
        (("line 1\nline 2",), {}, "plain literals"),
        (({1, 2},), {}, "set"),
        ((b"raw",), {}, "bytes"),
        (({1: "a"},), {}, "keys"),
    ],
)
def test_reprs_that_are_not_the_real_arguments_are_refused(
    args: tuple[Any, ...], kwargs: dict[str, Any], why: str
) -> None:
    with pytest.raises(ActionRefused, match=why) as refused:
        recover_call(repr_job(*args, **kwargs))
    assert "SDK" in str(refused.value)


def test_the_sdk_capture_wins_over_reprs_and_redacted_or_bad_captures_are_refused() -> None:
    job = repr_job("x" * 2000)
    chain = [{"task": "tests.add", "args": [1], "kwargs": {}, "options": {}}]
    job.extra["message"] = {
        "args": ["x" * 2000], "kwargs": {}, "redacted": False,
        "embed": {"callbacks": None, "errbacks": None, "chain": chain, "chord": None},
        "options": {"priority": 6, "eta": "2030-01-01T00:00:00+00:00", "shadow": None,
                    "headers": {"tenant": "acme"}},
    }
    call = recover_call(job)
    assert (call.args, call.source) == (["x" * 2000], "sdk")
    assert call.options == {"priority": 6, "headers": {"tenant": "acme"}}  # no eta: runs now
    message = task_message(job, call, new_id="n1")
    assert orjson.loads(message.body)[2]["chain"] == chain  # what runs after it, too
    assert (message.headers["tenant"], message.headers["eta"], message.priority) == (
        "acme", None, 6
    )
    job.extra["message"] = {**job.extra["message"], "redacted": True}
    with pytest.raises(ActionRefused, match="placeholders"):
        recover_call(job)
    job.extra["message"] = {"args": "oops", "kwargs": {}}
    with pytest.raises(ActionRefused, match="malformed"):
        recover_call(job)


def test_redis_queue_keys_follow_kombus_priority_steps() -> None:
    assert redis_queue_key("q", None) == "q"
    assert redis_queue_key("q", 0, "p:") == "p:q"
    assert redis_queue_key("q", 4) == "q\x06\x163"
    assert redis_queue_key("q", 9) == "q\x06\x169"
    assert redis_queue_key("q", 255) == "q\x06\x169"


# -- a retry's plan: only what the broker showed of the job, wherever the rest came from -----


def timeline_event(
    kind: str, state: JobState, pushed: str | None = None, **fields: Any
) -> JobEvent:
    extra = fields.pop("extra", {})
    event = JobEvent(
        id=uuid.uuid4().hex, job_id="j1", framework="celery", type=kind, state=state,
        timestamp=1.0, fields=fields, extra=extra,
    )
    return event if pushed is None else mark_pushed([event], pushed)[0]


@pytest.mark.parametrize("broker", ["redis://localhost:6379/0", "amqp://guest:pw@localhost//"])
async def test_a_retry_plan_takes_the_job_name_and_queue_from_the_brokers_own_events(
    broker: str,
) -> None:
    handler = CeleryActions([RedisBroker(broker) if "redis" in broker else AmqpBroker(broker)])
    url = redact_url(broker)
    route = {"broker": url, "exchange": "", "routing_key": "celery"}
    sent = timeline_event("task-sent", JobState.QUEUED, name="tests.add", queue="celery",
                          extra=route)
    received = timeline_event("task-received", JobState.RECEIVED, name="tests.add",
                              extra={"broker": url})
    capture = forged_message("payments-critical", "everyone")
    pushed = timeline_event("task-sent", JobState.QUEUED, "attacker", name=STOLEN,
                            queue="payments-critical", extra={**route, "message": capture})
    job = Job(id="j1", framework="celery", name="tests.add", queue="celery", args="(1, 2)",
              kwargs="{}", extra={"exchange": "", "routing_key": "celery"})

    plan = await handler.plan_retry(job, [sent, received, pushed])
    assert (plan.name, plan.queue, plan.target, plan.arguments) == (
        "tests.add", "celery", url, "(1, 2)"
    )
    assert plan.record == route  # a retry of the new job rests on it
    # A name, or a queue, that only pushed events gave: refused, whichever broker they claim.
    for claimed, why in [
        (attrs.evolve(job, name=STOLEN), "showed this job as tests.add, not " + STOLEN),
        (attrs.evolve(job, extra={**job.extra, "message": capture}), "sent to queue celery"),
    ]:
        with pytest.raises(ActionRefused, match=why):
            await handler.plan_retry(claimed, [sent, received, pushed])
    with pytest.raises(ActionRefused, match=r"no broker it publishes to .* own events"):
        await handler.plan_retry(job, [pushed])
    with pytest.raises(ActionRefused, match=r"never said where .* task_send_sent_event"):
        await handler.plan_retry(job, [received, pushed])
    # The retry's own record: what Sluice published is what the broker has.
    queued = timeline_event("sluice-retry", JobState.QUEUED, name="tests.add", queue="celery",
                            extra=plan.record)
    assert (await handler.plan_retry(job, [queued])).to_dict() == plan.to_dict()
    # Without the timeline nothing is confirmed: nothing is published.
    with pytest.raises(ActionRefused, match="no broker"):
        await handler.retry(job)


def test_the_plan_shows_everything_a_capture_adds() -> None:
    call = recover_call(Job(id="j1", framework="celery", name="t", queue="q",
                            extra={"message": forged_message("q", "x" * 400, 2)}))
    assert summary(call) == '("' + "x" * 297 + "…"  # 300 characters at most
    assert summary(attrs.evolve(call, args=[1, "a"], kwargs={"k": None})) == '(1, "a", k=null)'
    assert details(call) == ("priority 9", "headers x-approved-by")


# -- where a job lives, and the link to its agent ----------------------------------------------


def test_a_job_lives_where_sluices_own_events_or_its_agents_say() -> None:
    same = "redis://redis:6379/0"  # two clusters often name their brokers alike
    own = timeline_event("task-sent", JobState.QUEUED, extra={"broker": same})
    far = timeline_event("task-received", JobState.RECEIVED, "agent-eu", extra={"broker": same})
    published = timeline_event("sluice-retry", JobState.QUEUED,
                               extra={"broker": same, "agent": "agent-eu"})
    claim = timeline_event("task-sent", JobState.QUEUED, "attacker",
                           extra={"broker": same, "agent": "agent-eu"})
    sdk = timeline_event("task-sent", JobState.QUEUED, "billing-app")  # names no broker
    assert behind_agents([far, own, sdk]) == []  # what Sluice reads itself wins
    assert lives_at([far, own]) == Location(same)
    assert behind_agents([far, published, sdk]) == [Location(same, "agent-eu")]
    # A pushed event speaks for its own key, whatever agent it names.
    assert behind_agents([claim]) == [Location(same, "attacker")]
    assert behind_agents([sdk]) == [] and lives_at([sdk]) is None
    # On the server, an agent's word is never its own brokers'; on the agent, what it
    # pushed and published is its broker's, and nothing else.
    assert own_events([far, published, claim, sdk, own]) == [own]
    assert own_events(as_seen_by("agent-eu", [far, published, claim, sdk])) == [
        attrs.evolve(far, extra={"broker": same}), attrs.evolve(published, extra={"broker": same})
    ]
    assert own_events(as_seen_by("agent-us", [far, published])) == []
    assert far.extra["pushed_by"] == "agent-eu"  # the stored events are left as they were


async def test_an_agent_that_does_not_answer_or_leaves_gets_a_clear_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agents = Agents(timeout=20)
    here = Location("amqp://far//", "agent-eu")
    job = Job(id="j1", framework="celery")
    link = agents.connect("agent-eu", frozenset({here.broker}))
    handler = agents.handler(job, [here])
    # Sent, and never answered.
    with pytest.raises(NoAnswer, match="did not answer within 20s: whether it was done is"):
        await handler.perform("revoke", job, {"terminate": False, "signal": "SIGTERM"})
    stale = orjson.loads(link.outbox.receive_nowait())

    async def agent(answer: bool) -> None:
        action = orjson.loads(await link.outbox.receive())["action"]
        if not answer:
            agents.disconnect(link)
            return
        link.answer({"reply": stale["action"]["id"], "refused": "too late"})  # dropped
        result = {"job_id": "j1", "action": "revoke", "heard_by": {here.broker: 2}}
        link.answer({"reply": action["id"], "results": [result]})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent, True)
        done = await handler.perform("revoke", job, {"terminate": True, "signal": "SIGKILL"})
    assert (done.agent, done.heard_by) == ("agent-eu", {here.broker: 2})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent, False)
        with pytest.raises(NoAnswer, match="its connection closed before it answered"):
            await handler.perform("revoke", job, {"terminate": False, "signal": "SIGTERM"})
    with pytest.raises(ActionRefused, match="'agent-eu' disconnected; nothing was sent"):
        await handler.perform("revoke", job, {"terminate": False, "signal": "SIGTERM"})  # chosen before it left
    with pytest.raises(ActionRefused, match="'agent-eu' that reads broker amqp://far// is not"):
        agents.handler(job, [here])
    other = agents.connect("agent-eu", frozenset({"amqp://elsewhere//"}))
    with pytest.raises(ActionRefused, match="is connected but does not read broker amqp://far//"):
        agents.handler(job, [here])
    agents.disconnect(other)


async def test_the_agent_answers_what_its_own_handlers_did_or_why_not(keyprefix: str) -> None:
    handler = CeleryActions([RedisBroker(REDIS_URL, keyprefix=keyprefix)])
    executor = ActionExecutor([handler])
    revoke = {"kind": "revoke", "jobs": [{"id": "j1", "framework": "celery"}],
              "terminate": False, "signal": "SIGTERM"}
    try:
        # No worker listens on this key prefix's mailbox.
        no_worker = await executor.execute(revoke)
        other = await executor.execute({**revoke, "jobs": [{"id": "j1", "framework": "rq"}]})
        unknown = await executor.execute({"kind": "purge"})
        bad = await executor.execute({"kind": "plan", "job": {"id": "j1", "events": "x"}})
    finally:
        await handler.aclose()
    assert "reached no worker" in no_worker["refused"]
    assert "no action handler for rq jobs" in other["refused"]
    assert unknown == {"error": "this agent cannot read the action: unknown action kind 'purge'"}
    assert "needs a framework and its events" in bad["error"]


# -- declared actions: what a handler offers, checked by the API from its declaration --------


class PausingHandler:
    """A third-party framework's handler with an action of its own, "pause", on "toy" jobs:
    what the core knows of it is only its declaration."""

    framework = "toy"
    actions: tuple[ActionSpec, ...] = (
        ActionSpec(
            "pause",
            "Pause",
            "Hold the job in its queue until resumed.",
            (
                boolean_option("hard", help="also stop it if running"),
                string_option("reason", default="", help="shown to the job's owner"),
            ),
        ),
    )

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def handles(self, job: Job) -> bool:
        return job.framework == "toy"

    async def perform(self, action: str, job: Job, options: Mapping[str, Any]) -> ActionResult:
        if job.name == "stuck":
            raise ActionRefused("the toy queue cannot pause a job it lost")
        self.calls.append((action, job.id, dict(options)))
        return ActionResult(job.id, action)


async def test_the_api_lists_celerys_declared_actions_and_checks_options_by_them(
    tmp_path: Path, keyprefix: str
) -> None:
    # A producer and no worker: the job stays queued, and nothing is ever revoked.
    app = make_app(REDIS_URL, keyprefix=keyprefix, queue=f"q-{keyprefix}")
    with trio.fail_after(TIMEOUT):
        async with sluice(tmp_path, REDIS_URL, keyprefix) as (_, client):
            declared = (await client.get("/api/actions")).json()
            job_id = str(
                (await trio.to_thread.run_sync(lambda: app.send_task("tests.add", (1, 2)))).id
            )
            await job_when(client, job_id, in_state("queued"))
            revoke = f"/api/jobs/{job_id}/revoke"
            answers = {
                "signal": await client.post(revoke, json={"signal": 9}),
                "unknown signal": await client.post(revoke, json={"signal": "SIGNOPE"}),
                "terminate": await client.post(revoke, json={"terminate": "yes"}),
                "field": await client.post(revoke, json={"force": True}),
                "job action": await client.post(f"/api/jobs/{job_id}/pause", json={}),
                "bulk action": await client.post(
                    "/api/jobs/bulk", json={"action": "pause", "ids": [job_id]}
                ),
                "bulk option": await client.post(
                    "/api/jobs/bulk", json={"action": "revoke", "ids": [job_id], "signal": []}
                ),
            }
            job = (await client.get(f"/api/jobs/{job_id}")).json()
    app.close()
    [retry, revoke_spec] = declared["frameworks"]["celery"]
    assert (retry["name"], retry["options"]) == ("retry", [])
    assert revoke_spec["name"] == "revoke"
    assert [(o["name"], o["type"], o["default"]) for o in revoke_spec["options"]] == [
        ("terminate", "boolean", False), ("signal", "string", "SIGTERM")
    ]
    messages = {what: (r.status_code, r.json()["error"]["message"]) for what, r in answers.items()}
    assert messages == {
        "signal": (400, 'signal: expected a signal name such as "SIGTERM"'),
        "unknown signal": (
            400, "signal: unknown signal 'SIGNOPE' (e.g. SIGTERM, SIGKILL, SIGINT)"
        ),
        "terminate": (400, "terminate: expected true or false"),
        "field": (400, "body: unknown field 'force' (accepted: terminate, signal)"),
        "job action": (
            404, f"celery job {job_id!r} has no action 'pause' (offered: 'retry', 'revoke')"
        ),
        "bulk action": (
            400,
            "action: 'pause' is not an action any loaded handler offers"
            " (offered: 'retry', 'revoke')",
        ),
        "bulk option": (400, 'signal: expected a signal name such as "SIGTERM"'),
    }
    assert actions(job, "revoke") == [] and job["state"] == "queued"  # nothing was sent


def toy_job(job_id: str, name: str, state: JobState = JobState.ACTIVE) -> JobEvent:
    return JobEvent(id=f"{job_id}-e", job_id=job_id, framework="toy", type="started",
                    state=state, timestamp=time.time(), fields={"name": name})


@pytest.mark.browser
async def test_a_plugins_own_action_is_offered_checked_done_and_audited(tmp_path: Path) -> None:
    handler = PausingHandler()
    async with serving(tmp_path, ActionsPlugin(handler)) as (engine, client):
        await ingest(engine, client, [toy_job("p1", "ok"), toy_job("p2", "stuck")])
        declared = (await client.get("/api/actions")).json()["frameworks"]
        bad = await client.post("/api/jobs/p1/pause", json={"hard": "very"})
        unknown = await client.post("/api/jobs/p1/pause", json={"force": True})
        not_offered = await client.post("/api/jobs/p1/revoke")
        done = await client.post("/api/jobs/p1/pause", json={"hard": True, "reason": "deploy"})
        bulk = await client.post("/api/jobs/bulk", json={"action": "pause", "ids": ["p1", "p2"]})
        base = str(client.base_url)
        dialogs: list[str] = []

        def scenario(page: Page) -> None:
            page.goto(f"{base}/jobs/p1")
            page.fill("input[data-option-of=pause][data-option=reason]", "from the page")
            page.once("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
            page.click("button[data-action=pause]")
            expect(page.locator("#action-result")).to_have_text("Pause done")

        await browse(scenario)
        job = (await client.get("/api/jobs/p1")).json()
    assert declared["toy"][0]["name"] == "pause"
    assert (bad.status_code, bad.json()["error"]["message"]) == (
        400, "hard: expected true or false"
    )
    assert unknown.json()["error"]["message"] == (
        "body: unknown field 'force' (accepted: hard, reason)"
    )
    assert not_offered.status_code == 501  # revoke: the toy handler does not offer it
    assert "has no action 'revoke' (offered: 'pause')" in not_offered.json()["error"]["message"]
    assert done.status_code == 202, done.text
    assert done.json() == {
        "id": "p1", "outcome": "accepted", "message": "", "new_job_id": None, "published": None,
        "heard_by": None, "agent": None, "action": "pause",
        "options": {"hard": True, "reason": "deploy"},
    }
    assert [(r["id"], r["outcome"]) for r in bulk.json()["results"]] == [
        ("p1", "accepted"), ("p2", "refused")
    ]
    assert dialogs == ["Pause this job?\nHold the job in its queue until resumed."]
    assert handler.calls == [
        ("pause", "p1", {"hard": True, "reason": "deploy"}),
        ("pause", "p1", {"hard": False, "reason": ""}),
        ("pause", "p1", {"hard": False, "reason": "from the page"}),
    ]
    audits = actions(job, "pause")
    assert [(a["outcome"], a["hard"], a["reason"]) for a in audits] == [
        ("accepted", True, "deploy"), ("accepted", False, ""), ("accepted", False, "from the page")
    ]


async def test_an_agent_declares_and_performs_any_action_of_its_handlers() -> None:
    handler = PausingHandler()
    executor = ActionExecutor([handler])
    declared = await executor.execute({"kind": "declare"})
    pause = {"kind": "perform", "action": "pause", "jobs": [{"id": "p1", "framework": "toy"}],
             "options": {"hard": True}}
    done = await executor.execute(pause)
    bad = await executor.execute({**pause, "options": {"hard": "x"}})
    absent = await executor.execute({**pause, "action": "resume"})
    assert declared == {"results": [
        {"framework": "toy", "actions": [spec.to_dict() for spec in PausingHandler.actions]}
    ]}
    assert done == {"results": [{"job_id": "p1", "action": "pause", "new_job_id": None,
                                 "published": None, "heard_by": {}}]}
    assert handler.calls == [("pause", "p1", {"hard": True, "reason": ""})]
    assert bad == {"error": "this agent cannot read the action: hard: expected true or false"}
    assert absent == {"refused": "this agent's toy handler offers no action 'resume'"}


async def test_the_server_offers_an_agents_jobs_what_the_agent_declared(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agents = Agents(timeout=20)
    here = Location("toy://far", "agent-eu")
    job = Job(id="p1", framework="toy")
    link = agents.connect("agent-eu", frozenset({here.broker}))
    handler = agents.handler(job, [here])
    executor = ActionExecutor([PausingHandler()])

    async def agent() -> None:
        async for message in link.outbox:
            action = orjson.loads(message)["action"]
            link.answer({"reply": action["id"], **await executor.execute(action)})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent)
        assert isinstance(handler, OffersPerJob)
        offered = await handler.offered(job)
        result = await handler.perform("pause", job, {"hard": False, "reason": "x"})
        agents.disconnect(link)
    assert offered == PausingHandler.actions  # as the agent's handler declared them
    assert agents.declared() == {}  # gone with its connection
    assert (result.job_id, result.agent) == ("p1", "agent-eu")

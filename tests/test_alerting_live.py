"""Alerting end to end (issue 19's done-means): a real Celery worker failing a real task,
a real Sluice with the Celery plugin, and real receivers on loopback: an HTTP server that
verifies Standard Webhooks signatures, and an SMTP server (aiosmtpd) over STARTTLS.

Channels and rules go through the API as a user's dashboard sends them; what arrives at
the receivers is what is checked.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from playwright.sync_api import Page, expect

from sluice_core.config import Config
from sluice_core.engine import Engine
from sluice_core.plugins import PluginManager
from tests.fixtures.celery_worker import CeleryWorker
from tests.fixtures.receivers import (
    PASSWORD,
    WHSEC,
    Mailbox,
    Receiver,
    email_config,
    free_port,
    verified_by,
)
from tests.test_dashboard import browse
from tests.waiting import wait_until

TIMEOUT = 120  # worker start-ups, heartbeat windows and evaluation rounds on a busy machine
PUBLIC_URL = "http://sluice.example:5555"


@asynccontextmanager
async def sluice(
    db: str,
    worker: CeleryWorker,
    nursery: trio.Nursery,
    *,
    port: int = 0,
    public_url: str = PUBLIC_URL,
) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    """``sluice run --plugin celery --broker URL --public-url ...`` on a free port (or
    ``port``)."""
    pm = PluginManager()
    pm.load(["celery"])
    config = Config(
        broker=[worker.broker_url],
        redis_keyprefix=worker.keyprefix,
        db=db,
        port=port,
        public_url=public_url,
    )
    pm.configure(config)
    engine = Engine(config, pm)
    await nursery.start(engine.run)
    base = engine.web_addresses[0].replace("0.0.0.0", "127.0.0.1")
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def healthy() -> bool:
            return (await client.get("/healthz")).status_code == 200

        await wait_until(healthy, "/healthz to answer 200")
        try:
            yield engine, client
        finally:
            engine.stop()
            await engine.stopped.wait()


async def _created(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(path, json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def _webhook(client: httpx.AsyncClient, receiver: Receiver) -> dict[str, Any]:
    """A signed webhook channel to ``receiver``, made through the API."""
    return await _created(
        client,
        "/api/alerts/channels",
        {"name": "ops-hook", "type": "webhook", "config": {"url": receiver.url(), "secret": WHSEC}},
    )


async def _incident(client: httpx.AsyncClient, rule_id: int, state: str) -> dict[str, Any] | None:
    listed = (await client.get("/api/alerts/incidents", params={"state": state})).json()
    return next((i for i in listed["incidents"] if i["rule"]["id"] == rule_id), None)


def _queued(detail: dict[str, Any]) -> list[str]:
    """What the incident's timeline says was queued for the channels, in order."""
    return [row["detail"] for row in detail["timeline"] if row["what"] == "queued"]


async def test_a_broken_task_notifies_once_per_channel_then_resolves_and_survives_a_restart(
    tmp_path: Path,
    celery_worker: CeleryWorker,
    receiver: Receiver,
    smtp_server: tuple[Mailbox, int],
) -> None:
    mailbox, smtp_port = smtp_server
    receiver.judge = verified_by(WHSEC)
    db = f"sqlite:///{tmp_path}/sluice.db"
    missing = tmp_path / "config.txt"  # the task fails until this file exists
    with trio.fail_after(TIMEOUT):
        async with (
            trio.open_nursery() as nursery,
            sluice(db, celery_worker, nursery) as (
                engine,
                client,
            ),
        ):
            hook = await _webhook(client, receiver)
            mail = await _created(
                client,
                "/api/alerts/channels",
                {"name": "ops-mail", "type": "email", "config": email_config(smtp_port)},
            )
            assert hook["config"]["secret"] != WHSEC  # never shown back
            rule = await _created(
                client,
                "/api/alerts/rules",
                {
                    "name": "config reader failing",
                    "kind": "failure_rate",
                    "match": {"name": "tests.read_file"},
                    "params": {"window_s": 300, "threshold": 0.5, "min_runs": 3},
                    "severity": "error",
                    "channels": [hook["id"], mail["id"]],
                    "for_s": 0,
                },
            )
            # Break it: three failures.
            for _ in range(3):
                await celery_worker.send("tests.read_file", str(missing))
            firing = await wait_until(
                functools.partial(_incident, client, rule["id"], "firing"), "the rule to fire"
            )
            await wait_until(lambda: len(receiver.requests) >= 1, "the webhook to be called")
            await wait_until(lambda: len(mailbox.messages) >= 1, "the email to arrive")
            [call] = receiver.requests
            body = call.json()
            assert body["type"] == "incident.firing"
            assert body["incident"]["id"] == firing["id"]
            assert body["incident"]["url"] == f"{PUBLIC_URL}/alerts/{firing['id']}"
            assert body["incident"]["labels"] == {"name": "tests.read_file"}
            # The link opens the incident (on this server: the public URL is its address).
            page = await client.get(f"/alerts/{firing['id']}")
            assert page.status_code == 200 and "tests.read_file" in page.text
            [email] = mailbox.messages
            assert f"{PUBLIC_URL}/alerts/{firing['id']}" in email.as_string()

            # More failures while it fires: counted on the incident, not announced again.
            for _ in range(2):
                await celery_worker.send("tests.read_file", str(missing))

            async def counted() -> dict[str, Any] | None:
                incident = await _incident(client, rule["id"], "firing")
                return incident if incident and incident["count"] >= 5 else None

            await wait_until(counted, "the later failures to be counted")
            detail = (await client.get(f"/api/alerts/incidents/{firing['id']}")).json()
            # Queued once for both channels, when it fired.
            assert _queued(detail) == ["incident.firing to 2 channel(s)"]

        # Restart Sluice while the incident fires: no second notification.
        async with (
            trio.open_nursery() as nursery,
            sluice(db, celery_worker, nursery) as (
                engine,
                client,
            ),
        ):
            evaluated = engine.evaluator.evaluated
            await evaluated.wait()  # a whole evaluation after the restart
            await engine.evaluator.evaluated.wait()
            still = await _incident(client, rule["id"], "firing")
            assert still is not None and still["id"] == firing["id"]
            detail = (await client.get(f"/api/alerts/incidents/{firing['id']}")).json()
            assert _queued(detail) == ["incident.firing to 2 channel(s)"]
            assert len(receiver.requests) == 1 and len(mailbox.messages) == 1

            # Fix it: successes bring the rate under the threshold (5 failures of 13 runs),
            # and it resolves.
            missing.write_text("ok")
            for _ in range(8):
                await celery_worker.send("tests.read_file", str(missing))
            resolved = await wait_until(
                functools.partial(_incident, client, rule["id"], "resolved"),
                "the incident to resolve",
            )
            assert resolved["id"] == firing["id"] and resolved["resolved_at"] is not None
            await wait_until(lambda: len(receiver.requests) >= 2, "the resolve on the webhook")
            await wait_until(lambda: len(mailbox.messages) >= 2, "the resolve by email")
            assert receiver.requests[1].json()["type"] == "incident.resolved"
            assert len(receiver.requests) == 2


async def test_a_killed_worker_fires_worker_offline_and_its_return_resolves_it(
    tmp_path: Path, celery_worker: CeleryWorker, receiver: Receiver
) -> None:
    receiver.judge = verified_by(WHSEC)
    with trio.fail_after(TIMEOUT):
        async with (
            trio.open_nursery() as nursery,
            sluice(f"sqlite:///{tmp_path}/sluice.db", celery_worker, nursery) as (_, client),
        ):
            hook = await _webhook(client, receiver)
            rule = await _created(
                client,
                "/api/alerts/rules",
                {
                    "name": "a worker went away",
                    "kind": "worker_offline",
                    "match": {"worker": celery_worker.hostname},
                    "severity": "critical",
                    "channels": [hook["id"]],
                },
            )

            async def beating() -> bool:
                workers = (await client.get("/api/workers")).json()
                return any(
                    w["hostname"] == celery_worker.hostname and w["last_heartbeat"] is not None
                    for w in workers
                )

            # Its heartbeats heard: a worker only known from the queue probe has no beat
            # whose silence Sluice could judge.
            await wait_until(beating, "a heartbeat of the worker to be stored")
            killed_at = time.time()
            celery_worker.kill()
            firing = await wait_until(
                functools.partial(_incident, client, rule["id"], "firing"), "worker_offline"
            )
            assert firing["labels"] == {"worker": celery_worker.hostname}
            await wait_until(lambda: len(receiver.requests) >= 1, "the webhook to be called")
            assert receiver.requests[0].json()["type"] == "incident.firing"
            assert receiver.requests[0].json()["incident"]["started_at"] >= killed_at

            celery_worker.start()
            resolved = await wait_until(
                functools.partial(_incident, client, rule["id"], "resolved"),
                "worker_offline to resolve",
            )
            assert resolved["id"] == firing["id"]
            await wait_until(lambda: len(receiver.requests) >= 2, "the resolve on the webhook")
            assert receiver.requests[1].json()["type"] == "incident.resolved"


@pytest.mark.browser
async def test_a_new_user_sets_up_alerting_in_the_dashboard_and_acknowledges_from_the_link(
    tmp_path: Path,
    celery_worker: CeleryWorker,
    receiver: Receiver,
    smtp_server: tuple[Mailbox, int],
) -> None:
    """Issue 19's done-means in a real Chromium: channels and a rule made with the
    dashboard's forms; the task broken; one notification per channel, whose link opens
    the incident with its timeline and a working Acknowledge button."""
    mailbox, smtp_port = smtp_server
    receiver.judge = verified_by(WHSEC)
    port = free_port()
    base = f"http://127.0.0.1:{port}"  # the public URL: the links must open in the browser
    missing = tmp_path / "config.txt"  # the task fails until this file exists

    def set_up(page: Page) -> None:
        page.goto(f"{base}/alerts/channels")
        form = page.locator("#add-channel")
        form.locator("[name=name]").fill("ops-hook")
        form.locator("[name=type]").select_option("webhook")
        form.locator("[name='config.url']:visible").fill(receiver.url())
        form.locator("[name='config.secret']").fill(WHSEC)
        form.get_by_role("button", name="Add channel").click()
        expect(page.locator("#channels")).to_contain_text("ops-hook")
        form.locator("[name=name]").fill("ops-mail")
        form.locator("[name=type]").select_option("email")
        form.locator("[name='config.host']").fill("127.0.0.1")
        form.locator("[name='config.port']").fill(str(smtp_port))
        form.locator("[name='config.username']").fill("alerts")
        form.locator("[name='config.password']:visible").fill(PASSWORD)
        form.locator("[name='config.from']").fill("sluice@example.com")
        form.locator("[name='config.to']").fill("oncall@example.com, lead@example.com")
        form.get_by_role("button", name="Add channel").click()
        expect(page.locator("#channels")).to_contain_text("ops-mail")

        page.goto(f"{base}/alerts/rules")
        form = page.locator("#add-rule")
        form.locator("[name=name]").fill("config reader failing")
        form.locator("[name=kind]").select_option("failure_rate")
        form.locator("[name='match.name']").fill("tests.read_file")
        form.locator("[name='params.window_s']:visible").fill("300")
        form.locator("[name='params.threshold']").fill("0.5")
        form.locator("[name='params.min_runs']").fill("3")
        form.get_by_label("ops-hook").check()
        form.get_by_label("ops-mail").check()
        form.get_by_role("button", name="Add rule").click()
        expect(page.locator("#rules")).to_contain_text("config reader failing")

    with trio.fail_after(2 * TIMEOUT):
        async with (
            trio.open_nursery() as nursery,
            sluice(
                f"sqlite:///{tmp_path}/sluice.db",
                celery_worker,
                nursery,
                port=port,
                public_url=base,
            ) as (_, client),
        ):
            await browse(set_up)
            [rule] = (await client.get("/api/alerts/rules")).json()["rules"]
            channels = (await client.get("/api/alerts/channels")).json()["channels"]
            assert sorted(rule["channels"]) == sorted(c["id"] for c in channels)
            assert (rule["kind"], rule["params"]["min_runs"]) == ("failure_rate", 3)

            # Break it.
            for _ in range(5):
                await celery_worker.send("tests.read_file", str(missing))

            async def counted() -> dict[str, Any] | None:
                incident = await _incident(client, rule["id"], "firing")
                return incident if incident and incident["count"] >= 5 else None

            firing = await wait_until(counted, "the five failures counted on a firing incident")
            await wait_until(lambda: len(receiver.requests) >= 1, "the webhook to be called")
            await wait_until(lambda: len(mailbox.messages) >= 1, "the email to arrive")
            link = f"{base}/alerts/{firing['id']}"
            [call] = receiver.requests
            assert call.json()["incident"]["url"] == link
            [email] = mailbox.messages
            assert link in email.as_string()
            detail = (await client.get(f"/api/alerts/incidents/{firing['id']}")).json()
            assert _queued(detail) == ["incident.firing to 2 channel(s)"]  # not one per failure

            def acknowledge(page: Page) -> None:
                page.on("dialog", lambda dialog: dialog.accept())
                page.goto(link)
                expect(page.locator("#incident-title")).to_contain_text("tests.read_file")
                timeline = page.locator("#incident-timeline")
                for what in ("pending", "firing", "queued", "delivered"):
                    expect(timeline).to_contain_text(what)
                expect(page.locator("#incident-acked")).to_have_text("—")
                page.get_by_role("button", name="Acknowledge").click()
                expect(page.locator("#incident-acked")).not_to_have_text("—")
                page.reload()
                expect(timeline).to_contain_text("acknowledged")

            await browse(acknowledge)
            detail = (await client.get(f"/api/alerts/incidents/{firing['id']}")).json()
            assert detail["timeline"][-1]["what"] == "acknowledged"
            assert len(receiver.requests) == 1 and len(mailbox.messages) == 1

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
import trio

from sluice_core.config import Config
from sluice_core.engine import Engine
from sluice_core.plugins import PluginManager
from tests.fixtures.celery_worker import CeleryWorker
from tests.fixtures.receivers import WHSEC, Mailbox, Receiver, email_config, verified_by
from tests.waiting import wait_until

TIMEOUT = 120  # worker start-ups, heartbeat windows and evaluation rounds on a busy machine
PUBLIC_URL = "http://sluice.example:5555"


@asynccontextmanager
async def sluice(
    db: str, worker: CeleryWorker, nursery: trio.Nursery
) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    """``sluice run --plugin celery --broker URL --public-url ...`` on a free port."""
    pm = PluginManager()
    pm.load(["celery"])
    config = Config(
        broker=[worker.broker_url],
        redis_keyprefix=worker.keyprefix,
        db=db,
        port=0,
        public_url=PUBLIC_URL,
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
            hook = await _created(
                client,
                "/api/alerts/channels",
                {
                    "name": "ops-hook",
                    "type": "webhook",
                    "config": {"url": receiver.url(), "secret": WHSEC},
                },
            )
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
            hook = await _created(
                client,
                "/api/alerts/channels",
                {
                    "name": "ops-hook",
                    "type": "webhook",
                    "config": {"url": receiver.url(), "secret": WHSEC},
                },
            )
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

"""A remote agent (``sluice agent --server``): a real Redis, a real agent, a real server.

The agent reads Celery events from Redis and streams them to the server's ingest
WebSocket; the server is stopped mid-stream and started again on the same port
and database, and every event must be stored exactly once.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import orjson
import pytest
import trio
from trio_websocket import open_websocket_url

from sluice_celery.actions import RETRY_SPEC, REVOKE_SPEC
from sluice_core.agent import Agent, ingest_url
from sluice_core.config import Config, ConfigError
from sluice_core.engine import Engine
from sluice_core.model import JobEvent, JobState
from sluice_core.plugins import PluginManager
from sluice_core.remote import HEADER, announced, announcement
from sluice_core.serialize import job_event_to_json
from tests.fixtures.services import REDIS_URL, free_port
from tests.metrics import metric
from tests.test_redis_source import publish
from tests.waiting import wait_until


def envelope(payload: object, hostname: str) -> bytes:
    """Celery events as kombu PUBLISHes them on Redis (docs/celery-protocol.md section 1)."""
    return json.dumps(
        {
            "body": base64.b64encode(json.dumps(payload).encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"hostname": hostname},
            "properties": {"body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
        }
    ).encode()


def task_events(keyprefix: str, n: int) -> list[tuple[str, bytes]]:
    """``n`` jobs, each sent, then (in one task.multi) received and succeeded."""
    out = []
    now = time.time()
    for i in range(n):
        job = str(uuid.uuid4())
        sent = {
            "type": "task-sent",
            "uuid": job,
            "hostname": "gen1@h",
            "pid": 1,
            "clock": i,
            "timestamp": now,
            "name": "tests.add",
            "args": f"({i}, 1)",
            "kwargs": "{}",
            "queue": "celery",
            "utcoffset": 0,
        }
        worker = {"hostname": "w1@h", "pid": 2, "utcoffset": 0, "uuid": job}
        multi = [
            {
                **worker,
                "type": "task-received",
                "clock": 2 * i,
                "timestamp": now + 0.1,
                "name": "tests.add",
                "args": f"({i}, 1)",
                "kwargs": "{}",
                "retries": 0,
            },
            {
                **worker,
                "type": "task-succeeded",
                "clock": 2 * i + 1,
                "timestamp": now + 0.2,
                "result": str(i + 1),
                "runtime": 0.01,
            },
        ]
        out.append((f"{keyprefix}/0.celeryev/task.sent", envelope(sent, "gen1@h")))
        out.append((f"{keyprefix}/0.celeryev/task.multi", envelope(multi, "w1@h")))
    return out


def stored(db: Path) -> tuple[int, int, int]:
    """(event rows, distinct event ids, completed jobs) in the server's database."""
    with sqlite3.connect(db) as conn:
        rows, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT id) FROM job_events"
        ).fetchone()
        (done,) = conn.execute("SELECT count(*) FROM jobs WHERE state = 'completed'").fetchone()
    return rows, distinct, done


@asynccontextmanager
async def server(db: Path, port: int, *plugins: object) -> AsyncIterator[Engine]:
    """A central Sluice on ``port`` (so that it can be started again on it) and ``db``."""
    pm = PluginManager()
    for plugin in plugins:
        pm.register(plugin)
    config = Config(db=f"sqlite:///{db}", port=port)
    pm.configure(config)
    engine = Engine(config, pm)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        yield engine
        engine.stop()
        await engine.stopped.wait()


async def test_the_agent_streams_through_a_server_restart_losing_and_doubling_nothing(
    tmp_path: Path, keyprefix: str
) -> None:
    db, port = tmp_path / "central.db", free_port()
    pm = PluginManager()
    pm.load(["celery"])
    config = Config(broker=[REDIS_URL], redis_keyprefix=keyprefix)
    pm.configure(config)
    before, during, after = (task_events(keyprefix, n) for n in (200, 300, 100))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async with server(db, port) as central:
                _, key = await central.storage.create_api_key("agent-eu")
                agent = Agent(config, pm, server=f"ws://127.0.0.1:{port}", api_key=key)
                await nursery.start(agent.run)
                await wait_until(
                    lambda: (
                        agent.uplink.connected
                        and agent.pipeline.sources.get(agent.sources[0].name) is not None
                    )
                )
                await publish(REDIS_URL, before)
                await wait_until(lambda: stored(db)[2] == 200)
                # Mid-stream: events keep coming while the server stops.
                await publish(REDIS_URL, during)
            # The server is down: the agent holds what it reads.
            await publish(REDIS_URL, after)
            await wait_until(lambda: not agent.uplink.connected)
            await wait_until(lambda: agent.uplink.unacked_events > 0)
            assert stored(db)[2] < 600
            async with server(db, port):
                await wait_until(lambda: stored(db)[2] == 600)
                await wait_until(lambda: agent.uplink.unacked_events == 0)
            agent.stop()

    rows, distinct, done = stored(db)
    assert done == 600
    assert rows == distinct == 600 * 3  # sent, received, succeeded: each stored once
    assert metric(agent.metrics, "sluice_events_dropped_total", source="uplink") == 0


async def test_a_refused_key_stores_nothing_and_the_agent_keeps_the_events(
    tmp_path: Path, keyprefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    db, port = tmp_path / "central.db", free_port()
    pm = PluginManager()
    pm.load(["celery"])
    config = Config(broker=[REDIS_URL], redis_keyprefix=keyprefix)
    pm.configure(config)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, server(db, port) as central:
            await central.storage.create_api_key("agent-eu")
            agent = Agent(config, pm, server=f"ws://127.0.0.1:{port}", api_key="sluice_wrong")
            await nursery.start(agent.run)
            source = agent.sources[0].name
            await wait_until(lambda: agent.pipeline.sources.get(source) is not None)
            await publish(REDIS_URL, task_events(keyprefix, 5))
            await wait_until(lambda: agent.uplink.unacked_events == 15)
            # Refused at the handshake, before a byte of events: then it waits 30 s.
            await wait_until(lambda: refused(caplog), "the server to refuse the agent's key")
            assert not agent.uplink.connected
            assert stored(db) == (0, 0, 0)
            nursery.cancel_scope.cancel()


def refused(caplog: pytest.LogCaptureFixture) -> bool:
    return any(
        record.name == "sluice_core.agent" and "refused the API key" in record.getMessage()
        for record in caplog.records
    )


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("wss://sluice.example.com", "wss://sluice.example.com/api/ingest/ws"),
        ("http://10.0.0.5:5580/", "ws://10.0.0.5:5580/api/ingest/ws"),
        ("https://sluice.example.com/api/ingest/ws", "wss://sluice.example.com/api/ingest/ws"),
    ],
)
def test_the_server_address_may_be_given_as_ws_or_http(given: str, url: str) -> None:
    assert ingest_url(given) == url


def test_a_server_address_that_is_not_one_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="expected the Sluice server's address"):
        ingest_url("redis://localhost:6379/0")


async def test_an_agents_refusal_and_silence_are_the_apis_answer(tmp_path: Path) -> None:
    """The wire, as an agent speaks it: announced at the handshake, a batch and its ack,
    then the server's actions, answered (a refusal: 409) or not (the connection closes:
    504, what was done unknown)."""
    db, port = tmp_path / "central.db", free_port()
    broker = "amqp://guest:***@far:5672/prod"
    job_id = str(uuid.uuid4())
    received = JobEvent(
        id="e1", job_id=job_id, framework="celery", type="task-received",
        state=JobState.RECEIVED, timestamp=time.time(), worker="w1@far",
        fields={"name": "tests.add"}, extra={"broker": broker},
    )
    batch = {"seq": 1, "format": "sluice", "job_events": [job_event_to_json(received)],
             "worker_events": []}
    with trio.fail_after(30):
        async with (
            server(db, port) as central,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
        ):
            _, key = await central.storage.create_api_key("agent-far")
            headers = [(b"Authorization", f"Bearer {key}".encode()),
                       (HEADER.encode(), announcement([broker]))]
            url = f"ws://127.0.0.1:{port}/api/ingest/ws"
            async with open_websocket_url(url, extra_headers=headers) as ws:
                await ws.send_message(orjson.dumps(batch))
                assert orjson.loads(await ws.get_message()) == {"ack": 1}
                job = (await client.get(f"/api/jobs/{job_id}")).json()

                async def agent_answers() -> None:
                    # Asked first what it offers (once): Celery's retry and revoke.
                    declare = orjson.loads(await ws.get_message())["action"]
                    offers = [{"framework": "celery",
                               "actions": [RETRY_SPEC.to_dict(), REVOKE_SPEC.to_dict()]}]
                    await ws.send_message(
                        orjson.dumps({"reply": declare["id"], "results": offers})
                    )
                    action = orjson.loads(await ws.get_message())["action"]
                    sent.append(action)
                    reply = {"reply": action["id"], "refused": "no worker heard it"}
                    await ws.send_message(orjson.dumps(reply))

                sent: list[dict[str, object]] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(agent_answers)
                    refused = await client.post(
                        f"/api/jobs/{job_id}/revoke", json={"terminate": True}
                    )

                async def agent_leaves() -> None:
                    sent.append(orjson.loads(await ws.get_message())["action"])
                    await ws.aclose()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(agent_leaves)
                    unanswered = await client.post(f"/api/jobs/{job_id}/revoke")
            after = (await client.get(f"/api/jobs/{job_id}")).json()
    assert job["location"] == {"broker": broker, "agent": "agent-far"}
    assert [(a["kind"], a["jobs"], a["terminate"]) for a in sent] == [
        ("revoke", [{"id": job_id, "framework": "celery"}], True),
        ("revoke", [{"id": job_id, "framework": "celery"}], False),
    ]
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["message"] == "the agent 'agent-far' refused: no worker heard it"
    assert unanswered.status_code == 504, unanswered.text
    assert unanswered.json()["error"]["code"] == "no_answer"
    assert "closed before it answered: whether it was done is unknown" in (
        unanswered.json()["error"]["message"]
    )
    audits = [e["detail"] for e in after["events"] if e["type"] == "sluice-revoke"]
    assert [a["outcome"] for a in audits] == ["refused", "no_answer"]


@pytest.mark.parametrize(
    "brokers", [["amqp://guest:***@rabbit:5672/prod", "redis://cache:6379/0"], ["redis://bröker/0"]]
)
def test_an_agent_announces_its_brokers_in_a_header_any_server_can_read(
    brokers: list[str],
) -> None:
    value = announcement(brokers)
    assert value.isascii()
    assert announced(value.decode("latin-1")) == frozenset(brokers)  # as a server decodes it


@pytest.mark.parametrize("value", [None, "", "not json", '{"brokers": "x"}', '["a"]'])
def test_a_sender_that_announces_nothing_readable_is_no_agent(value: str | None) -> None:
    assert announced(value) is None

"""The ingest endpoints (POST /api/ingest, WS /api/ingest/ws) on a real engine and port."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionRejected, open_websocket_url

import sluice_celery.plugin as celery_plugin
from sluice_core.engine import Engine
from sluice_core.ingest import MAX_EVENTS
from sluice_core.model import JobState, WorkerEvent
from sluice_core.serialize import job_event_to_json, worker_event_to_json
from sluice_web.ingest import TokenBucket
from tests.test_api import assert_error, job_event, serving
from tests.waiting import wait_until


def celery_events(job_id: str, *, args: str = "(2, 3)") -> list[dict[str, Any]]:
    """A job's life as Celery's own event dicts (what the SDK sends)."""
    now = time.time()
    common = {"hostname": "w1@host", "utcoffset": 0, "pid": 42}
    return [
        {
            **common,
            "hostname": "gen7@host",
            "type": "task-sent",
            "uuid": job_id,
            "clock": 1,
            "timestamp": now,
            "name": "tests.add",
            "args": args,
            "kwargs": "{}",
            "retries": 0,
            "queue": "celery",
            "sluice_message": {
                "args": [2, 3],
                "kwargs": {},
                "redacted": False,
                "options": {"queue": "celery", "priority": 5},
            },
        },
        {
            **common,
            "type": "task-received",
            "uuid": job_id,
            "clock": 2,
            "timestamp": now + 0.1,
            "name": "tests.add",
            "args": args,
            "kwargs": "{}",
            "retries": 0,
        },
        {**common, "type": "task-started", "uuid": job_id, "clock": 3, "timestamp": now + 0.2},
        {
            **common,
            "type": "task-succeeded",
            "uuid": job_id,
            "clock": 4,
            "timestamp": now + 0.3,
            "result": "5",
            "runtime": 0.1,
        },
    ]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def new_key(engine: Engine, name: str = "app") -> str:
    return (await engine.storage.create_api_key(name))[1]


def metric(text: str, name: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


async def stored_jobs(engine: Engine) -> int:
    return sum((await engine.storage.count_jobs_by_state()).values())


async def test_a_celery_batch_is_stored_before_the_answer_and_once_however_often_sent(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, celery_plugin) as (engine, client):
            key = bearer(await new_key(engine))
            job_id = str(uuid.uuid4())
            body = {"format": "celery", "events": celery_events(job_id)}
            response = await client.post("/api/ingest", json=body, headers=key)
            assert response.status_code == 200, response.text
            assert response.json() == {"accepted": 4}
            # Acked means stored: no waiting needed.
            job = (await client.get(f"/api/jobs/{job_id}")).json()
            assert job["state"] == "completed" and job["args"] == "(2, 3)"
            assert job["extra"]["message"]["args"] == [2, 3]
            assert job["extra"]["message"]["options"]["priority"] == 5

            ingested = metric((await client.get("/metrics")).text, "sluice_events_ingested_total")
            for _ in range(2):
                again = await client.post("/api/ingest", json=body, headers=key)
                assert again.status_code == 200
            job = (await client.get(f"/api/jobs/{job_id}")).json()
            assert len(job["events"]) == 4
            metrics = (await client.get("/metrics")).text
            assert metric(metrics, "sluice_events_ingested_total") == ingested
            assert metric(metrics, "sluice_events_duplicate_total") >= 8


@pytest.mark.parametrize("header", [None, "Bearer sluice_wrong", "Basic abc", "Bearer"])
async def test_a_missing_or_wrong_key_is_refused_and_nothing_stored(
    tmp_path: Path, header: str | None
) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, celery_plugin) as (engine, client):
            await new_key(engine)
            headers = {} if header is None else {"Authorization": header}
            body = {"format": "celery", "events": celery_events(str(uuid.uuid4()))}
            response = await client.post("/api/ingest", json=body, headers=headers)
            assert_error(response, 401, "unauthorized")
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert await stored_jobs(engine) == 0


async def test_a_revoked_key_is_refused_at_once(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, celery_plugin) as (engine, client):
            key = bearer(await new_key(engine))
            first = {"format": "celery", "events": celery_events(str(uuid.uuid4()))}
            assert (await client.post("/api/ingest", json=first, headers=key)).status_code == 200
            await engine.storage.revoke_api_key("app")
            second_id = str(uuid.uuid4())
            second = {"format": "celery", "events": celery_events(second_id)}
            assert_error(await client.post("/api/ingest", json=second, headers=key), 401)
            assert (await client.get(f"/api/jobs/{second_id}")).status_code == 404


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"format": "rq", "events": []}', "unknown format 'rq'"),
        (b'{"format": "celery", "events": {}}', '"events" must be a list'),
        (
            b'{"format": "celery", "events": [{"type": "task-sent", "hostname": "h",'
            b' "timestamp": 1.0}]}',
            "1 of 1 events are malformed",
        ),
        (b'{"format": "celery", "events": [7]}', "malformed"),
        (
            b'{"format": "sluice", "job_events": [{"id": "e", "job_id": "j", "framework":'
            b' "celery", "type": "t", "state": "done", "timestamp": 1}]}',
            "job_events[0]: state",
        ),
        (
            b'{"format": "sluice", "worker_events": [{"hostname": "h", "framework": "celery",'
            b' "type": "heartbeat", "timestamp": "now"}]}',
            "worker_events[0]: timestamp is a str",
        ),
    ],
)
async def test_malformed_payloads_get_400_and_are_counted(
    tmp_path: Path, body: bytes, needle: str
) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, celery_plugin) as (engine, client):
            key = bearer(await new_key(engine))
            good = celery_events(str(uuid.uuid4()))
            response = await client.post(
                "/api/ingest", content=body, headers={**key, "Content-Type": "application/json"}
            )
            assert needle in assert_error(response, 400, "bad_request")
            metrics = (await client.get("/metrics")).text
            assert metric(metrics, "sluice_events_malformed_total") >= 1
            # A batch with one bad event is refused whole.
            mixed = {"format": "celery", "events": [*good, {"type": "task-failed"}]}
            assert_error(await client.post("/api/ingest", json=mixed, headers=key), 400)
            assert await stored_jobs(engine) == 0


async def test_oversized_batches_get_413_saying_the_limit(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, celery_plugin) as (engine, client):
            key = bearer(await new_key(engine))
            event = celery_events(str(uuid.uuid4()))[2]
            many = {"format": "celery", "events": [{"type": "x"}] * (MAX_EVENTS + 1)}
            message = assert_error(
                await client.post("/api/ingest", json=many, headers=key), 413, "too_many_events"
            )
            assert str(MAX_EVENTS) in message
            huge = {"format": "celery", "events": [{**event, "pad": "x" * 2_000_000}]}
            assert_error(await client.post("/api/ingest", json=huge, headers=key), 413)
            assert await stored_jobs(engine) == 0


async def test_a_key_over_its_rate_gets_429_with_retry_after(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, celery_plugin, ingest_rate=1, ingest_burst=6) as (
            engine,
            client,
        ):
            key = bearer(await new_key(engine))
            other = bearer(await new_key(engine, "other"))

            def batch() -> dict[str, Any]:
                return {"format": "celery", "events": celery_events(str(uuid.uuid4()))}

            assert (await client.post("/api/ingest", json=batch(), headers=key)).status_code == 200
            limited = await client.post("/api/ingest", json=batch(), headers=key)
            assert "retry in" in assert_error(limited, 429, "rate_limited")
            assert int(limited.headers["Retry-After"]) >= 1
            # The limit is per key.
            assert (
                await client.post("/api/ingest", json=batch(), headers=other)
            ).status_code == 200


def test_the_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10, burst=100)
    assert bucket.take(100, now=0.0) == 0.0
    assert bucket.take(20, now=0.0) == pytest.approx(2.0)
    assert bucket.take(20, now=1.0) == pytest.approx(1.0)  # 10 tokens back after 1 s
    assert bucket.take(20, now=2.0) == 0.0
    assert bucket.take(500, now=100.0) == 0.0  # larger than a burst: waits for a full bucket


async def test_ingest_takes_api_keys_only_and_ignores_the_dashboards_origin_checks(
    tmp_path: Path,
) -> None:
    token = "t" * 32
    with trio.fail_after(30):
        async with serving(tmp_path, celery_plugin, api_token=token) as (engine, client):
            body = {"format": "celery", "events": celery_events(str(uuid.uuid4()))}
            # The dashboard's API token is not an ingest key.
            assert_error(await client.post("/api/ingest", json=body, headers=bearer(token)), 401)
            key = await new_key(engine)
            foreign = {**bearer(key), "Origin": "https://elsewhere.example"}
            assert (await client.post("/api/ingest", json=body, headers=foreign)).status_code == 200
            # ... while an ingest key opens nothing else.
            assert_error(await client.get("/api/jobs", headers=bearer(key)), 401)


async def test_normalized_events_from_an_agent_are_stored(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, celery_plugin) as (engine, client):
            key = bearer(await new_key(engine))
            job_id, now = str(uuid.uuid4()), time.time()
            events = [
                job_event(job_id, "task-received", JobState.RECEIVED, now, name="n", args="(1,)"),
                job_event(job_id, "task-started", JobState.ACTIVE, now + 1, worker="w1"),
            ]
            worker = WorkerEvent("w1", "celery", "heartbeat", time.time(), freq=2.0, active=1)
            body = {
                "format": "sluice",
                "job_events": [job_event_to_json(e) for e in events],
                "worker_events": [worker_event_to_json(worker)],
            }
            assert (await client.post("/api/ingest", json=body, headers=key)).status_code == 200
            job = (await client.get(f"/api/jobs/{job_id}")).json()
            assert job["state"] == "active" and job["args"] == "(1,)" and job["worker"] == "w1"
            assert [w.hostname for w in await engine.storage.list_workers()] == ["w1"]


def ws_url(client: httpx.AsyncClient) -> str:
    return str(client.base_url).replace("http://", "ws://").rstrip("/") + "/api/ingest/ws"


async def test_the_stream_acks_each_batch_once_stored_and_answers_errors_by_seq(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, celery_plugin) as (engine, client):
            key = await new_key(engine)
            job_id = str(uuid.uuid4())
            events = [job_event(job_id, "task-sent", JobState.QUEUED, time.time(), name="n")]
            batch = {"format": "sluice", "job_events": [job_event_to_json(e) for e in events]}
            headers = [(b"Authorization", f"Bearer {key}".encode())]
            async with open_websocket_url(ws_url(client), extra_headers=headers) as ws:
                await ws.send_message(orjson.dumps({"seq": 1, **batch}).decode())
                assert orjson.loads(await ws.get_message()) == {"ack": 1}
                assert (await client.get(f"/api/jobs/{job_id}")).json()["state"] == "queued"

                await ws.send_message(
                    orjson.dumps({"seq": 2, "format": "sluice", "job_events": [{"id": 1}]}).decode()
                )
                reply = orjson.loads(await ws.get_message())
                assert reply["seq"] == 2 and reply["error"]["code"] == "bad_request"
                await ws.send_message("{oops")
                assert orjson.loads(await ws.get_message())["error"]["code"] == "bad_request"
                # The stream goes on after bad messages.
                await ws.send_message(orjson.dumps({"seq": 3, **batch}).decode())
                assert orjson.loads(await ws.get_message()) == {"ack": 3}


async def test_the_stream_refuses_a_wrong_key_at_the_handshake(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, celery_plugin) as (engine, client):
            await new_key(engine)
            headers = [(b"Authorization", b"Bearer sluice_wrong")]
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(ws_url(client), extra_headers=headers):
                    pass
            assert rejected.value.status_code == 401


async def test_a_sender_that_disconnects_is_one_info_line_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    def disconnected() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "sender disconnected" in r.getMessage()]

    with trio.fail_after(30):
        async with serving(tmp_path, celery_plugin) as (engine, client):
            key = await new_key(engine, "agent-1")
            headers = [(b"Authorization", f"Bearer {key}".encode())]
            async with open_websocket_url(ws_url(client), extra_headers=headers) as ws:
                await ws.send_message(orjson.dumps({"seq": 1, "format": "sluice"}).decode())
                assert orjson.loads(await ws.get_message()) == {"ack": 1}
            # The server's handler logs the disconnect as it ends, then nothing more.
            await wait_until(disconnected, "the server to log the disconnect")
    [record] = disconnected()
    assert record.levelno == logging.INFO and "'agent-1'" in record.getMessage()
    assert record.exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text

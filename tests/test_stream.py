"""``GET /api/stream``: live jobs as Server-Sent Events, over a real socket."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio

from sluice_core.engine import Engine
from sluice_core.model import JobState
from tests.test_api import T0, assert_error, job_event, serving
from tests.waiting import wait_until

Event = dict[str, str]


async def sse(response: httpx.Response) -> AsyncIterator[Event]:
    """Each event as its fields; a comment as ``{"comment": text}``."""
    fields: Event = {}
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield {"comment": line[1:].strip()}
        elif line:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        elif fields:
            yield fields
            fields = {}


@asynccontextmanager
async def stream(
    client: httpx.AsyncClient, engine: Engine, params: dict[str, Any] | None = None, **headers: str
) -> AsyncIterator[AsyncIterator[Event]]:
    """An open stream whose bus subscription is in place (its opening chunk was read)."""
    async with client.stream("GET", "/api/stream", params=params, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response)
        assert "retry" in await anext(events)
        yield events


async def next_of(events: AsyncIterator[Event], kind: str) -> Event:
    async for event in events:
        if event.get("event") == kind:
            return event
    raise AssertionError(f"the stream ended before an {kind!r} event")


async def test_a_stored_job_reaches_the_stream(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path) as (engine, client), stream(client, engine) as events:
            engine.pipeline.put_events(
                [job_event("s1", "task-sent", JobState.QUEUED, T0, name="tasks.add")], []
            )
            event = await next_of(events, "job")
            job = orjson.loads(event["data"])
            assert (job["id"], job["state"], job["name"]) == ("s1", "queued", "tasks.add")
            assert int(event["id"]) == engine.bus.last_id


async def test_job_events_are_filtered_like_the_list(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path) as (engine, client):
            params = {"state": "failed", "name": "tasks.add"}
            async with stream(client, engine, params) as events:
                # In order: the first two would come first if they were not filtered out.
                for job_id, name, state in [
                    ("f0", "tasks.add", JobState.COMPLETED),
                    ("f1", "tasks.mul", JobState.FAILED),
                    ("f2", "tasks.add", JobState.FAILED),
                ]:
                    engine.pipeline.put_events([job_event(job_id, "e", state, T0, name=name)], [])
                assert orjson.loads((await next_of(events, "job"))["data"])["id"] == "f2"


async def test_last_event_id_resumes_where_the_client_left(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path) as (engine, client):
            async with stream(client, engine) as events:
                engine.pipeline.put_events([job_event("r1", "e", JobState.QUEUED, T0)], [])
                last_seen = (await next_of(events, "job"))["id"]
            # Missed while disconnected:
            engine.pipeline.put_events([job_event("r2", "e", JobState.QUEUED, T0)], [])
            await wait_until(lambda: engine.bus.last_id > int(last_seen), "r2 on the bus")
            async with stream(client, engine, **{"Last-Event-ID": last_seen}) as events:
                assert orjson.loads((await next_of(events, "job"))["data"])["id"] == "r2"
            async with stream(client, engine, {"last_event_id": last_seen}) as events:
                assert orjson.loads((await next_of(events, "job"))["data"])["id"] == "r2"
            # An id this bus never gave (the server restarted since): the client must reload.
            async with stream(client, engine, {"last_event_id": "999999"}) as events:
                await next_of(events, "resync")
                assert [e async for e in events] == []


async def test_a_client_that_falls_behind_is_told_to_resync(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path) as (engine, client), stream(client, engine) as events:
            # More than a subscriber queue holds (2,000), published while the client reads none.
            for i in range(3_000):
                engine.bus.publish("queue", {"name": f"q{i}"})
            await next_of(events, "resync")
            assert [e async for e in events] == []  # and the stream ends
        assert engine.bus.subscriber_count == 0


async def test_heartbeat_comments_keep_an_idle_stream_alive(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path, sse_heartbeat=0.1) as (engine, client):
            async with stream(client, engine) as events:
                started = time.monotonic()
                assert await anext(events) == {"comment": "ping"}
                assert await anext(events) == {"comment": "ping"}
                assert time.monotonic() - started < 5


async def test_a_disconnected_client_releases_its_subscription(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path, sse_heartbeat=0.1) as (engine, client):
            async with stream(client, engine):
                assert engine.bus.subscriber_count == 1
            # The client hung up; the server notices at the latest at its next heartbeat.
            await wait_until(lambda: engine.bus.subscriber_count == 0, "no subscriber left")


async def test_stopping_the_engine_ends_open_streams_at_once(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path) as (engine, client), stream(client, engine) as events:
            started = time.monotonic()
            engine.stop()
            assert [e async for e in events if "comment" not in e] == []
            # Well within hypercorn's 3 s grace period for open requests.
            assert time.monotonic() - started < 2


async def test_bad_stream_parameters_are_a_400(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path) as (engine, client):
            assert_error(await client.get("/api/stream", params={"stat": "failed"}), 400)
            assert_error(await client.get("/api/stream", headers={"Last-Event-ID": "-1"}), 400)
            assert engine.bus.subscriber_count == 0

"""``GET /api/stream``: live jobs as Server-Sent Events, over a real socket; and many
streams of one bus in-process, under more events than a person could read."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import trio

from sluice_core.bus import Bus
from sluice_core.engine import Engine
from sluice_core.model import Job, JobState
from sluice_core.storage import JobQuery
from sluice_web.stream import OPENING, Streams, View, _events
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
            # More than the bus keeps (10,000 messages), in windows the stream never got
            # to read: where it was is forgotten.
            for i in range(10_001):
                engine.bus.publish("queue", {"name": f"q{i}"})
                engine.bus.close_window()
            await next_of(events, "resync")
            assert [e async for e in events] == []  # and the stream ends
        assert engine.bus.subscriber_count == 0


async def test_heartbeat_comments_keep_an_idle_stream_alive(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with (
            serving(tmp_path, sse_heartbeat=0.1) as (engine, client),
            stream(client, engine) as events,
        ):
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


def jobs(first: int, count: int, state: JobState = JobState.QUEUED) -> list[Job]:
    """Jobs ``first`` to ``first + count - 1``, created in that order."""
    return [
        Job(id=f"j{n:06}", framework="celery", state=state, queue=f"q{n % 4}", created_at=T0 + n)
        for n in range(first, first + count)
    ]


async def test_a_page_sized_stream_sends_the_newest_rows_and_counts_the_rest(
    tmp_path: Path,
) -> None:
    with trio.fail_after(20):
        async with (
            serving(tmp_path) as (engine, client),
            stream(client, engine, {"limit": 3}) as events,
        ):
            engine.bus.publish_jobs(jobs(0, 10), new=10)
            sent = [orjson.loads((await next_of(events, "job"))["data"])["id"] for _ in range(3)]
            assert sent == ["j000007", "j000008", "j000009"]  # oldest first: the newest on top
            skipped = await next_of(events, "skipped")
            assert orjson.loads(skipped["data"]) == {"jobs": 7, "new": 7}
            assert int(skipped["id"]) == engine.bus.last_id


async def test_without_a_limit_a_stream_sends_every_job_in_its_latest_state(
    tmp_path: Path,
) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path) as (engine, client), stream(client, engine) as events:
            engine.bus.publish_jobs(jobs(0, 600), new=600)
            engine.bus.publish_jobs(jobs(0, 600, JobState.ACTIVE))
            engine.bus.publish_jobs(jobs(0, 600, JobState.COMPLETED))
            states: dict[str, str] = {}
            async for event in events:
                assert event.get("event") == "job", event  # nothing skipped, no resync
                job = orjson.loads(event["data"])
                states[job["id"]] = job["state"]
                if len(states) == 600 and set(states.values()) == {"completed"}:
                    break


def frames(chunk: bytes) -> list[dict[str, str]]:
    return [
        dict(line.split(": ", 1) for line in frame.split("\n"))
        for frame in chunk.decode().split("\n\n")
        if frame
    ]


@attrs.define
class Viewer:
    """A dashboard's job list, as sluice.js keeps it: a row that is on the page is
    updated in place, another goes on top, and the page keeps ``limit`` rows."""

    limit: int
    page: list[str] = attrs.Factory(list)  # ids, top first
    states: dict[str, str] = attrs.Factory(dict)
    most_rows: int = 0  # the most job rows one window brought
    done: bool = False

    def take(self, chunk: bytes) -> None:
        rows = 0
        for frame in frames(chunk):
            assert frame["event"] in ("job", "skipped", "queue"), frame
            data = orjson.loads(frame["data"])
            if frame["event"] == "queue":
                self.done = data["name"] == "done"
            elif frame["event"] == "job":
                rows += 1
                if data["id"] not in self.states:
                    self.page.insert(0, data["id"])
                    for gone in self.page[self.limit :]:
                        del self.states[gone]
                    del self.page[self.limit :]
                self.states[data["id"]] = data["state"]
        self.most_rows = max(self.most_rows, rows)


async def test_fifty_viewers_of_a_fast_stream_keep_up_and_see_their_pages_fresh() -> None:
    # Bursts of 5,000 rows (what a pipeline batch stores) 10 ms apart: one burst is more
    # than a stream's queue used to hold (2,000 messages), and far more than a page shows.
    bus, streams = Bus(), Streams()
    views = [View.of(JobQuery(), 50)] * 40 + [View.of(JobQuery(queue="q1"), 20)] * 10
    viewers = [Viewer(view.limit or 0) for view in views]

    async def watch(view: View, viewer: Viewer, task_status: trio.TaskStatus[None]) -> None:
        events = _events(bus, streams, view, None, heartbeat=15.0)
        assert await anext(events) == OPENING  # subscribed
        task_status.started()
        async for chunk in events:
            viewer.take(chunk)
            if viewer.done:
                break
        await events.aclose()

    created: list[Job] = []
    latest: dict[str, str] = {}
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for view, viewer in zip(views, viewers, strict=True):
                await nursery.start(watch, view, viewer)
            running: list[Job] = []
            for burst in range(20):
                fresh = jobs(burst * 2_500, 2_500)
                finished = [
                    attrs.evolve(job, state=JobState.FAILED if i % 10 == 0 else JobState.COMPLETED)
                    for i, job in enumerate(running)
                ]
                bus.publish_jobs(fresh + finished, new=len(fresh))
                created += fresh
                latest.update({job.id: str(job.state) for job in fresh + finished})
                running = fresh
                await trio.sleep(0.01)
            last = [attrs.evolve(job, state=JobState.COMPLETED) for job in running]
            bus.publish_jobs(last)
            latest.update({job.id: "completed" for job in last})
            bus.publish("queue", {"name": "done"})
    for view, viewer in zip(views, viewers, strict=True):
        assert viewer.done  # never told to resync: it read to the end
        assert viewer.most_rows <= viewer.limit
        matching = [job.id for job in created if view.passes is None or view.passes(job)]
        assert viewer.page == matching[-viewer.limit :][::-1]
        assert {i: viewer.states[i] for i in viewer.page} == {i: latest[i] for i in viewer.page}

"""The REST API (the API in README.md), served by the real engine on a real port.

Jobs get in through the engine's own pipeline and come out through HTTP, so
every test covers storage, serialization and the web layer together.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from sluice_celery.actions import RETRY_SPEC, REVOKE_SPEC
from sluice_core import hookimpl
from sluice_core.actions import ActionRefused, ActionResult, ActionSpec
from sluice_core.config import Config
from sluice_core.engine import Engine
from sluice_core.model import Job, JobEvent, JobState, WorkerEvent, event_id
from sluice_core.plugins import PluginManager
from sluice_core.serialize import iso, job_timing
from sluice_core.sources import Sink
from tests.waiting import wait_until

# -- helpers shared with test_stream and test_auth ----------------------------


def job_event(
    job_id: str,
    type_: str,
    state: JobState | None,
    ts: float,
    *,
    framework: str = "celery",
    worker: str | None = None,
    **fields: Any,
) -> JobEvent:
    return JobEvent(
        id=event_id(job_id, type_, ts),
        job_id=job_id,
        framework=framework,
        type=type_,
        state=state,
        timestamp=ts,
        worker=worker,
        fields=fields,
    )


@asynccontextmanager
async def serving(
    tmp_path: Path,
    *plugins: object,
    host: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
    **options: Any,
) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    """A real engine with its web server on a free port, and a client for it (on SQLite
    in ``tmp_path`` unless ``db`` is given)."""
    pm = PluginManager()
    for plugin in plugins:
        pm.register(plugin)
    options.setdefault("db", f"sqlite:///{tmp_path}/s.db")
    config = Config(host=host, port=0, **options)
    pm.configure(config)
    engine = Engine(config, pm)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        # Bound to every address: reach it on loopback.
        base = engine.web_addresses[0].replace("0.0.0.0", "127.0.0.1")
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as client:
            yield engine, client
        engine.stop()


async def ingest(
    engine: Engine,
    client: httpx.AsyncClient,
    job_events: Iterable[JobEvent],
    worker_events: Iterable[WorkerEvent] = (),
) -> None:
    """Feed events to the pipeline and wait until the API shows all of them."""
    job_events, worker_events = list(job_events), list(worker_events)
    engine.pipeline.put_events(job_events, worker_events)

    async def shown(job_id: str, count: int) -> bool:
        response = await client.get(f"/api/jobs/{job_id}")
        return response.status_code == 200 and len(response.json()["events"]) >= count

    async def workers_shown() -> bool:
        listed = {w["hostname"] for w in (await client.get("/api/workers")).json()}
        return not {w.hostname for w in worker_events} - listed

    for job_id, count in Counter(e.job_id for e in job_events).items():
        await wait_until(functools.partial(shown, job_id, count), f"{count} events of {job_id}")
    await wait_until(workers_shown, "every worker in /api/workers")


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> str:
    """The response is the API's JSON error, with no stack trace in it; returns the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message"} and error["message"]
    if code is not None:
        assert error["code"] == code
    assert "Traceback" not in response.text and 'File "' not in response.text
    return str(error["message"])


def ids(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, response.text
    return {job["id"] for job in response.json()["jobs"]}


# -- test plugins: the hooks a real framework plugin uses ---------------------


class RecordingHandler:
    """Acts on jobs of the "test" framework; refuses jobs named "refuse", crashes on "crash"."""

    framework = "test"
    # Celery's declarations, reused: any handler may.
    actions: tuple[ActionSpec, ...] = (RETRY_SPEC, REVOKE_SPEC)

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def handles(self, job: Job) -> bool:
        return job.framework == "test"

    async def perform(self, action: str, job: Job, options: Mapping[str, Any]) -> ActionResult:
        if action == "retry":
            return await self.retry(job)
        return await self.revoke(job, **options)

    async def retry(self, job: Job) -> ActionResult:
        if job.name == "refuse":
            raise ActionRefused("arguments are only known as a truncated repr")
        if job.name == "crash":
            raise RuntimeError("broker exploded")
        self.calls.append(("retry", job.id))
        return ActionResult(job.id, "retry", new_job_id=f"{job.id}-again")

    async def revoke(self, job: Job, *, terminate: bool, signal: str) -> ActionResult:
        self.calls.append(("revoke", job.id, terminate, signal))
        return ActionResult(job.id, "revoke")


class ActionsPlugin:
    def __init__(self, handler: RecordingHandler) -> None:
        self.handler = handler

    @hookimpl
    def sluice_actions(self, config: Config, register: Any) -> None:
        register(self.handler)


class StatusSource:
    """A source that only reports whether it is connected."""

    def __init__(self, name: str, up: bool) -> None:
        self.name, self.up = name, up

    async def run(self, sink: Sink, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        sink.source_status(self.name, self.up, "" if self.up else "broker unreachable")
        task_status.started()
        await trio.sleep_forever()


class SourcesPlugin:
    def __init__(self, *sources: StatusSource) -> None:
        self.sources = sources

    @hookimpl
    def sluice_sources(self, config: Config, register: Any) -> None:
        for source in self.sources:
            register(source)


# -- the job list ------------------------------------------------------------

T0 = time.time() - 3600  # an hour ago: "since" and "until" have room either side


def dataset() -> list[JobEvent]:
    return [
        job_event(
            "a1", "task-sent", JobState.QUEUED, T0, name="tasks.add", queue="default", args="(1, 2)"
        ),
        job_event("a1", "task-started", JobState.ACTIVE, T0 + 1, worker="w1"),
        job_event("a1", "task-succeeded", JobState.COMPLETED, T0 + 2, worker="w1", result="3"),
        job_event("a2", "task-sent", JobState.QUEUED, T0 + 10, name="tasks.add", queue="default"),
        job_event(
            "a2",
            "task-failed",
            JobState.FAILED,
            T0 + 11,
            worker="w2",
            exception="ValueError('boom')",
        ),
        job_event("m1", "task-sent", JobState.QUEUED, T0 + 20, name="tasks.mul", queue="math"),
        job_event("m1", "task-started", JobState.ACTIVE, T0 + 21, worker="w1"),
        job_event(
            "r1", "sent", JobState.QUEUED, T0 + 30, framework="rq", name="jobs.email", queue="mail"
        ),
    ]


@given(st.floats(min_value=0, max_value=4e9))
def test_times_read_as_python_writes_iso_8601_in_utc(ts: float) -> None:
    assert iso(ts) == dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


async def test_each_filter_selects_exactly_its_jobs(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({}, {"a1", "a2", "m1", "r1"}),
        ({"q": "boom"}, {"a2"}),  # text in the exception
        ({"q": "(1, 2)"}, {"a1"}),  # text in the arguments
        ({"q": "m1"}, {"m1"}),  # id prefix
        ({"q": "EMAIL"}, {"r1"}),  # name, whatever the case
        ({"name": "tasks.add"}, {"a1", "a2"}),
        ({"state": "failed"}, {"a2"}),
        ({"state": "completed,failed"}, {"a1", "a2"}),
        ({"state": ["active", "queued"]}, {"m1", "r1"}),  # repeated parameter
        ({"queue": "math"}, {"m1"}),
        ({"worker": "w1"}, {"a1", "m1"}),
        ({"framework": "rq"}, {"r1"}),
        ({"since": iso(T0 + 15)}, {"m1", "r1"}),
        ({"until": str(T0 + 15)}, {"a1", "a2"}),  # epoch seconds
        ({"since": str(T0 + 5), "until": iso(T0 + 25)}, {"a2", "m1"}),
        # A naive time is UTC.
        ({"since": iso(T0 + 15).removesuffix("+00:00")}, {"m1", "r1"}),  # type: ignore[union-attr]
        ({"name": "tasks.add", "state": "failed"}, {"a2"}),
        ({"name": "", "queue": ""}, {"a1", "a2", "m1", "r1"}),  # blank form fields
    ]
    async with serving(tmp_path) as (engine, client):
        await ingest(engine, client, dataset())
        for params, expected in cases:
            assert ids(await client.get("/api/jobs", params=params)) == expected, params


async def test_list_is_newest_first_and_shows_the_job_fields(tmp_path: Path) -> None:
    async with serving(tmp_path) as (engine, client):
        await ingest(engine, client, dataset()[:3])
        await ingest(engine, client, dataset()[3:5])
        body = (await client.get("/api/jobs")).json()
        assert [job["id"] for job in body["jobs"]] == ["a2", "a1"]
        assert body["next_cursor"] is None
        a1 = body["jobs"][1]
        assert (a1["state"], a1["worker"], a1["result"], a1["args"]) == (
            "completed",
            "w1",
            "3",
            "(1, 2)",
        )
        assert a1["sent_at"] == iso(T0) and a1["finished_at"] == iso(T0 + 2)


async def test_cursor_pagination_walks_every_job_once(tmp_path: Path) -> None:
    events = [
        job_event(f"p{i}", "task-sent", JobState.QUEUED, T0 + i, name="tasks.page", queue="default")
        for i in range(7)
    ]
    async with serving(tmp_path) as (engine, client):
        await ingest(engine, client, events)
        await ingest(
            engine, client, [job_event("other", "task-sent", JobState.QUEUED, T0, name="x")]
        )
        seen: list[str] = []
        sizes = []
        cursor = None
        while True:
            params = {"name": "tasks.page", "limit": "3", **({"cursor": cursor} if cursor else {})}
            body = (await client.get("/api/jobs", params=params)).json()
            sizes.append(len(body["jobs"]))
            seen += [job["id"] for job in body["jobs"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
            assert isinstance(cursor, str) and not cursor.isdigit()  # opaque
        assert sizes == [3, 3, 1]
        assert sorted(seen) == sorted(e.job_id for e in events) and len(set(seen)) == 7


async def test_job_detail_has_its_timeline_and_timing(tmp_path: Path) -> None:
    events = [
        job_event("d1", "task-sent", JobState.QUEUED, T0, name="tasks.add", queue="default"),
        job_event("d1", "task-received", JobState.RECEIVED, T0 + 0.5, worker="w1"),
        job_event("d1", "task-started", JobState.ACTIVE, T0 + 2, worker="w1"),
        job_event("d1", "task-succeeded", JobState.COMPLETED, T0 + 5, worker="w1", runtime=3.0),
    ]
    async with serving(tmp_path) as (engine, client):
        await ingest(engine, client, events)
        body = (await client.get("/api/jobs/d1")).json()
        assert body["id"] == "d1" and body["state"] == "completed"
        assert [e["state"] for e in body["events"]] == ["queued", "received", "active", "completed"]
        assert [e["type"] for e in body["events"]][-1] == "task-succeeded"
        assert body["events"][2]["worker"] == "w1" and body["events"][0]["timestamp"] == iso(T0)
        assert body["timing"] == {"queued_s": 2.0, "runtime_s": 3.0, "total_s": 5.0}
        assert_error(await client.get("/api/jobs/nope"), 404, "not_found")


def test_timing_is_never_negative_when_the_worker_stamps_before_the_producer() -> None:
    # Seen on a real worker: task-started stamped 0.4 ms before the producer's task-sent.
    job = Job(id="j", framework="celery", sent_at=100.0004, started_at=100.0, finished_at=100.0005,
              runtime=0.0005)
    assert job_timing(job) == {"queued_s": 0.0, "runtime_s": 0.0005,
                               "total_s": pytest.approx(0.0001)}


async def test_queues_and_workers(tmp_path: Path) -> None:
    now = time.time()
    worker = WorkerEvent(
        "w1@host",
        "celery",
        "online",
        now,
        freq=3600.0,
        active=1,
        processed=7,
        pid=42,
        sw_ver="5.7.0",
    )
    async with serving(tmp_path) as (engine, client):
        await ingest(engine, client, dataset(), [worker])
        workers = (await client.get("/api/workers")).json()
        assert [w["hostname"] for w in workers] == ["w1@host"]
        assert {
            "hostname",
            "framework",
            "status",
            "last_heartbeat",
            "active",
            "processed",
            "loadavg",
            "pid",
            "sw_ver",
            "queues",
            "concurrency",
        } <= set(workers[0])
        assert (workers[0]["status"], workers[0]["processed"], workers[0]["pid"]) == (
            "online",
            7,
            42,
        )
        queues = (await client.get("/api/queues")).json()
        assert {q["name"] for q in queues} == {"default", "math", "mail"}
        assert set(queues[0]) == {
            "name",
            "framework",
            "broker",
            "depth",
            "reserved",
            "consumers",
            "throughput_per_min",
            "failure_rate",
            "avg_wait_s",
            "updated_at",
        }


# -- bad input ---------------------------------------------------------------


async def test_every_kind_of_bad_input_is_a_json_4xx(tmp_path: Path) -> None:
    gets: list[tuple[str, dict[str, Any], int, str]] = [
        ("/api/jobs", {"stat": "failed"}, 400, "'stat'"),
        ("/api/jobs", {"state": "bogus"}, 400, "'bogus'"),
        ("/api/jobs", {"limit": "0"}, 400, "limit"),
        ("/api/jobs", {"limit": "501"}, 400, "limit"),
        ("/api/jobs", {"limit": "ten"}, 400, "limit"),
        ("/api/jobs", {"since": "yesterday"}, 400, "since"),
        ("/api/jobs", {"since": "2024-13-01"}, 400, "since"),
        ("/api/jobs", {"until": "1e400"}, 400, "until"),
        ("/api/jobs", {"until": "99999999999999"}, 400, "until"),
        ("/api/jobs", {"since": "2024-02-01", "until": "2024-01-01"}, 400, "since"),
        ("/api/jobs", {"cursor": "!!!"}, 400, "cursor"),
        ("/api/jobs", {"name": ["a", "b"]}, 400, "name"),
        ("/api/jobs", {"q": "x" * 1001}, 400, "q"),
        ("/api/jobs/unknown-id", {}, 404, "unknown-id"),
        ("/no/such/page", {}, 404, ""),
        ("/api/stream", {"limit": "501"}, 400, "limit"),
        ("/api/stream", {"cursor": "czE"}, 400, "cursor"),
        ("/api/stream", {"last_event_id": "abc"}, 400, "last_event_id"),
    ]
    bulk_bodies: list[tuple[bytes | dict[str, Any], int, str]] = [
        (b"{bad json", 400, "JSON"),
        (b"[1, 2]", 400, "object"),
        ({"action": "explode", "ids": ["a1"]}, 400, "action"),
        ({"action": "retry"}, 400, "either"),
        ({"action": "retry", "ids": ["a1"], "filter": {"state": "failed"}}, 400, "either"),
        ({"action": "retry", "ids": "a1"}, 400, "ids"),
        ({"action": "retry", "ids": []}, 400, "ids"),
        ({"action": "retry", "ids": [1]}, 400, "ids"),
        ({"action": "retry", "ids": [f"x{i}" for i in range(1001)]}, 400, "1000"),
        ({"action": "retry", "ids": ["a1"], "dry_run": "yes"}, 400, "dry_run"),
        ({"action": "retry", "ids": ["a1"], "terminate": True}, 400, "'terminate'"),
        ({"action": "retry", "filter": {"stat": "failed"}}, 400, "'stat'"),
        ({"action": "retry", "filter": {}}, 400, "filter"),
        ({"action": "retry", "filter": {"limit": 5}}, 400, "'limit'"),
        ({"action": "retry", "filter": {"state": 3}}, 400, "state"),
        ({"action": "revoke", "ids": ["a1"], "signal": "SIGFOO"}, 400, "SIGFOO"),
        ({"action": "revoke", "ids": ["a1"], "terminate": "yes"}, 400, "terminate"),
        ({"action": "retry", "ids": ["a1", "ghost"]}, 404, "'ghost'"),
    ]
    # Its revoke declares Celery's options: the API checks them by it.
    async with serving(tmp_path, ActionsPlugin(RecordingHandler())) as (engine, client):
        await ingest(engine, client, [*dataset(), *action_jobs(), running_job()])
        for path, params, status, mentioned in gets:
            assert mentioned in assert_error(await client.get(path, params=params), status), path

        cursor_body = (await client.get("/api/jobs", params={"limit": "1"})).json()
        cursor = cursor_body["next_cursor"]
        tampered = ("A" if cursor[0] != "A" else "B") + cursor[1:]
        assert_error(await client.get("/api/jobs", params={"cursor": tampered}), 400, "bad_request")

        for body, status, mentioned in bulk_bodies:
            if isinstance(body, bytes):
                response = await client.post("/api/jobs/bulk", content=body)
            else:
                response = await client.post("/api/jobs/bulk", json=body)
            assert mentioned in assert_error(response, status), body

        assert "'x'" in assert_error(await client.post("/api/jobs/t1/retry", json={"x": 1}), 400)
        assert_error(await client.post("/api/jobs/t4/revoke", json={"terminate": 1}), 400)
        assert_error(await client.post("/api/jobs/a1/revoke", content=b"nope"), 400)
        assert_error(await client.post("/api/jobs/ghost/retry"), 404, "not_found")
        assert_error(await client.post("/api/jobs/a1/retry", data={"a": "b"}), 400)
        assert_error(await client.post("/api/jobs/bulk", content=b"x" * (2 * 1024 * 1024)), 413)
        response = await client.post("/api/jobs")
        assert_error(response, 405, "method_not_allowed")
        assert "GET" in response.headers["allow"]
        assert_error(await client.delete("/api/jobs/a1"), 405)


async def test_a_filter_matching_too_many_jobs_is_refused_not_cut(tmp_path: Path) -> None:
    events = [
        job_event(f"n{i}", "task-sent", JobState.QUEUED, T0 + i, name="tasks.many")
        for i in range(1001)
    ]
    async with serving(tmp_path) as (engine, client):
        await ingest(engine, client, events[-1:])
        await ingest(engine, client, events[:-1])
        body = {"action": "revoke", "filter": {"name": "tasks.many"}, "dry_run": True}
        assert "more than 1000" in assert_error(await client.post("/api/jobs/bulk", json=body), 400)
        body["filter"] = {"name": "tasks.many", "since": str(T0 + 1)}  # 1,000: at the cap
        assert (await client.post("/api/jobs/bulk", json=body)).json()["count"] == 1000


# -- actions -----------------------------------------------------------------


async def test_actions_answer_501_until_a_plugin_handles_the_job(tmp_path: Path) -> None:
    async with serving(tmp_path) as (engine, client):
        await ingest(engine, client, dataset())
        assert_error(await client.post("/api/jobs/a1/retry"), 501, "not_implemented")
        assert_error(await client.post("/api/jobs/m1/revoke", json={"terminate": True}), 501)
        response = await client.post(
            "/api/jobs/bulk", json={"action": "retry", "ids": ["a1", "a2"]}
        )
        assert_error(response, 501, "not_implemented")


def action_jobs() -> list[JobEvent]:
    return [
        job_event(job_id, "sent", JobState.FAILED, T0 + i, framework="test", name=name, args="()")
        for i, (job_id, name) in enumerate([("t1", "ok"), ("t2", "refuse"), ("t3", "crash")])
    ]


def running_job() -> JobEvent:
    return job_event("t4", "started", JobState.ACTIVE, T0 + 5, framework="test", name="ok")


async def test_retry_and_revoke_go_to_the_plugins_handler(tmp_path: Path) -> None:
    handler = RecordingHandler()
    async with serving(tmp_path, ActionsPlugin(handler)) as (engine, client):
        await ingest(engine, client, [*action_jobs(), running_job()])
        response = await client.post("/api/jobs/t1/retry")
        assert (response.status_code, response.json()) == (
            202,
            {"job_id": "t1-again", "retry_of": "t1"},
        )
        response = await client.post(
            "/api/jobs/t4/revoke", json={"terminate": True, "signal": "kill"}
        )
        assert response.status_code == 202
        # A handler that does not count the workers that heard, on the server itself.
        assert response.json() == {
            "job_id": "t4", "terminate": True, "signal": "SIGKILL", "heard_by": None, "agent": None
        }
        assert (await client.post("/api/jobs/t4/revoke")).status_code == 202  # body optional
        # A finished job: nothing to revoke, and the answer says so.
        message = assert_error(await client.post("/api/jobs/t1/revoke"), 409, "refused")
        assert "had already finished (failed at " in message
        assert handler.calls == [
            ("retry", "t1"),
            ("revoke", "t4", True, "SIGKILL"),
            ("revoke", "t4", False, "SIGTERM"),
        ]
        message = assert_error(await client.post("/api/jobs/t2/retry"), 409, "refused")
        assert "truncated repr" in message
        # A handler's own bug: logged, and a plain 500 without its traceback.
        message = assert_error(await client.post("/api/jobs/t3/retry"), 500, "internal")
        assert "broker exploded" not in message


async def test_json_sent_as_curl_sends_it_is_read_whatever_its_content_type(
    tmp_path: Path,
) -> None:
    # ``curl -d '{...}'`` labels its body application/x-www-form-urlencoded.
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    handler = RecordingHandler()
    async with serving(tmp_path, ActionsPlugin(handler)) as (engine, client):
        await ingest(engine, client, [*action_jobs(), running_job()])
        response = await client.post(
            "/api/jobs/t4/revoke", content=b'{"terminate": true}', headers=form
        )
        assert response.status_code == 202, response.text
        response = await client.post(
            "/api/jobs/bulk", content=b'{"action":"retry","ids":["t1"]}', headers=form
        )
        assert response.status_code == 200, response.text
        assert [r["outcome"] for r in response.json()["results"]] == ["accepted"]
        text = {"Content-Type": "text/plain"}
        response = await client.post(
            "/api/jobs/t4/revoke", content=b'{"signal": "KILL"}', headers=text
        )
        assert response.status_code == 202, response.text
        assert handler.calls == [
            ("revoke", "t4", True, "SIGTERM"), ("retry", "t1"), ("revoke", "t4", False, "SIGKILL")
        ]
        # Form fields (other than the dashboard's CSRF token) are neither: say to send JSON.
        for content in (b"terminate=true", b"{not json"):
            response = await client.post("/api/jobs/t4/revoke", content=content, headers=form)
            assert "JSON" in assert_error(response, 400, "bad_request"), content
        assert len(handler.calls) == 3


async def test_bulk_reports_each_jobs_outcome_and_dry_run_touches_nothing(tmp_path: Path) -> None:
    handler = RecordingHandler()
    async with serving(tmp_path, ActionsPlugin(handler)) as (engine, client):
        await ingest(engine, client, action_jobs() + dataset())
        dry = await client.post(
            "/api/jobs/bulk",
            json={"action": "retry", "filter": {"framework": "test"}, "dry_run": True},
        )
        assert dry.status_code == 200 and dry.json()["dry_run"] is True
        assert [job["id"] for job in dry.json()["jobs"]] == ["t3", "t2", "t1"]
        assert handler.calls == []

        body = {"action": "retry", "ids": ["t1", "t2", "t3", "a1", "t1"]}
        response = await client.post("/api/jobs/bulk", json=body)
        assert response.status_code == 200
        outcomes = {r["id"]: (r["outcome"], r["new_job_id"]) for r in response.json()["results"]}
        assert outcomes == {
            "t1": ("accepted", "t1-again"),
            "t2": ("refused", None),
            "t3": ("error", None),
            "a1": ("not_implemented", None),  # a celery job: no handler loaded for it
        }
        response = await client.post(
            "/api/jobs/bulk",
            json={
                "action": "revoke",
                "filter": {"name": "ok"},
                "terminate": True,
                "signal": "SIGINT",
            },
        )
        # t1's retry is a job too (queued by Sluice, same name): newest first. t1 itself
        # had failed: nothing to revoke.
        assert [(r["id"], r["outcome"]) for r in response.json()["results"]] == [
            ("t1-again", "accepted"), ("t1", "refused")
        ]
        assert handler.calls[-1] == ("revoke", "t1-again", True, "SIGINT")


# -- health and metrics ------------------------------------------------------


@pytest.mark.parametrize("down", [False, True])
async def test_healthz_is_503_when_a_source_is_down(tmp_path: Path, down: bool) -> None:
    sources = SourcesPlugin(StatusSource("test/up", True), StatusSource("test/down", not down))
    async with serving(tmp_path, sources) as (engine, client):
        await wait_until(lambda: len(engine.pipeline.sources) == 2, "both sources' status")
        response = await client.get("/healthz")
        body = response.json()
        assert response.status_code == (503 if down else 200)
        assert body["status"] == ("down" if down else "ok")
        assert body["storage"]["up"] is True
        assert body["sources"]["test/up"]["up"] is True
        assert body["sources"]["test/down"]["up"] is (not down)
        assert body["sources"]["test/down"]["detail"] == ("broker unreachable" if down else "")


@pytest.mark.parametrize("down", [False, True])
async def test_the_engine_listens_since_its_sources_last_came_up(tmp_path: Path, down: bool) -> None:
    sources = SourcesPlugin(StatusSource("test/up", True), StatusSource("test/down", not down))
    async with serving(tmp_path, sources) as (engine, _):
        await wait_until(lambda: len(engine.pipeline.sources) == 2)
        if down:  # the worker monitor then concludes nothing
            assert engine.listening_since() is None
        else:
            since = engine.listening_since()
            assert since == max(status.since for status in engine.pipeline.sources.values())
            assert engine.started_at <= since <= time.time()


async def test_healthz_is_503_when_brokers_are_asked_for_and_no_source_reads_them(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path, broker=["redis://localhost:6379/0"]) as (_, client):
        response = await client.get("/healthz")
        assert response.status_code == 503
        assert response.json()["sources"]["brokers"]["up"] is False


async def test_metrics_export_ingestion_jobs_by_state_and_workers(tmp_path: Path) -> None:
    worker = WorkerEvent("w1@host", "celery", "online", time.time(), freq=3600.0)
    async with serving(tmp_path) as (engine, client):
        await ingest(engine, client, dataset(), [worker])
        response = await client.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/plain"
        )
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
        }
        assert samples[("sluice_events_ingested_total", ())] == len(dataset())
        assert samples[("sluice_events_dropped_total", (("source", "ingest"),))] == 0
        assert ("sluice_ingest_lag_seconds", ()) in samples
        assert samples[("sluice_jobs", (("state", "queued"),))] == 1
        assert samples[("sluice_jobs", (("state", "completed"),))] == 1
        assert samples[("sluice_jobs", (("state", "lost"),))] == 0
        assert samples[("sluice_workers_online", ())] == 1

"""The web layer against a fake application: no database, no engine, no broker.

The web depends on :class:`sluice_core.application.Application` alone (issue 18): these
tests build the app on an in-memory fake of it and check what the views make of what
it answers, in milliseconds. What the real parts do is tested where they are.
"""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from quart_trio import QuartTrio

from sluice_core import merge
from sluice_core.actions import (
    ACCEPTED,
    ActionSpec,
    NotOffered,
    Outcome,
    RetryPlan,
    boolean_option,
)
from sluice_core.application import Diagnostics, Malformed, Retention, WorkerView
from sluice_core.bus import Bus
from sluice_core.config import Config
from sluice_core.frameworks import Framework
from sluice_core.ingest import IngestRefused, Unavailable
from sluice_core.model import Job, JobEvent, JobState, Worker, WorkerEvent
from sluice_core.remote import Agents
from sluice_core.storage import ApiKey, DeadLetter, Footprint, Gap, JobQuery, Page, QueueStats
from sluice_web.app import create_app
from sluice_web.auth import Auth
from tests.fake_alerts import FakeAlerts

T0 = 1_780_000_000.0


def _event(job_id: str, state: JobState, at: float, **fields: Any) -> JobEvent:
    return JobEvent(
        id=f"{job_id}-{state}",
        job_id=job_id,
        framework="toy",
        type=f"toy-{state}",
        state=state,
        timestamp=at,
        worker="w1" if state is not JobState.QUEUED else None,
        fields=fields,
        extra={"broker": "toy://local"},
    )


class FakeReads:
    """Jobs folded from their events, as storage would."""

    def __init__(self, events: Sequence[JobEvent]) -> None:
        self.events: dict[str, list[JobEvent]] = {}
        for event in events:
            self.events.setdefault(event.job_id, []).append(event)
        self.jobs = {
            job_id: merge.fold(Job(job_id, "toy"), merge.timeline(timeline))
            for job_id, timeline in self.events.items()
        }

    async def get_job(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    async def job_events(self, job_id: str) -> list[JobEvent]:
        return list(self.events.get(job_id, []))

    async def list_jobs(self, query: JobQuery) -> Page:
        jobs = [
            job
            for job in self.jobs.values()
            if (not query.states or job.state in query.states)
            and (not query.ids or job.id in query.ids)
        ]
        jobs.sort(key=lambda job: job.updated_at or 0, reverse=True)
        return Page(jobs[: query.limit], None)

    async def count_jobs(self, query: JobQuery, at_most: int) -> int:
        return min(at_most, len((await self.list_jobs(query)).jobs))

    async def count_jobs_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self.jobs.values():
            counts[job.state] = counts.get(job.state, 0) + 1
        return counts

    async def list_workers(self) -> list[Worker]:
        return [Worker("w1", "toy", last_heartbeat=T0, freq=2.0)]

    async def list_queues(self, now: float) -> list[QueueStats]:
        return []

    async def queue_depth_history(
        self, name: str, broker: str, since: float
    ) -> list[tuple[float, int]]:
        return []

    async def job_throughput(self, since: float, bucket_s: float) -> list[tuple[float, int, int]]:
        return []

    async def top_failing_names(self, since: float, limit: int) -> list[tuple[str, int]]:
        return []

    async def list_gaps(self, limit: int) -> list[Gap]:
        return []

    async def list_dead_letters(self, limit: int) -> list[DeadLetter]:
        return []


class FakeIngest:
    """Takes any batch under the one key "k", as Sluice's own format; keeps what it got."""

    def __init__(self) -> None:
        self.stored: list[JobEvent] = []
        self.down = False

    async def authenticate(self, token: str) -> ApiKey | None:
        return ApiKey(1, "k", T0) if token == "secret" else None

    def parse(self, key: ApiKey, data: str | bytes) -> Any:
        return orjson.loads(data)

    def decode(self, key: ApiKey, body: Any) -> tuple[list[JobEvent], list[WorkerEvent]]:
        if body.get("format") != "toy":
            raise IngestRefused(f"unknown format {body.get('format')!r}")
        return [_event(i, JobState.QUEUED, T0) for i in body["ids"]], []

    async def store(
        self, key: ApiKey, job_events: list[JobEvent], worker_events: list[WorkerEvent]
    ) -> None:
        if self.down:
            raise Unavailable("the database is away: send them again later")
        self.stored += job_events


NUDGE = ActionSpec("nudge", "Nudge", options=(boolean_option("hard"),))


class FakeActions:
    """Offers one action of its own on every toy job, and does it by remembering it."""

    def __init__(self) -> None:
        self.done: list[tuple[str, list[str], dict[str, Any], str | None]] = []

    def declared(self) -> dict[str, tuple[ActionSpec, ...]]:
        return {"toy": (NUDGE,)}

    async def offered(self, job: Job) -> tuple[ActionSpec, ...]:
        return (NUDGE,) if job.framework == "toy" else ()

    def check(self, action: str, options: Mapping[str, Any]) -> None:
        if action != NUDGE.name:
            raise NotOffered(f"{action!r} is offered by no handler", [NUDGE.name])
        NUDGE.parse(options)

    async def act(
        self, action: str, jobs: Sequence[Job], options: Mapping[str, Any], actor: str | None
    ) -> list[Outcome]:
        self.check(action, options)
        parsed = NUDGE.parse(options)
        self.done.append((action, [job.id for job in jobs], parsed, actor))
        return [Outcome(job.id, ACCEPTED, options=parsed) for job in jobs]

    async def plan(self, job: Job) -> RetryPlan | None:
        raise NotOffered("toy jobs cannot be retried", [NUDGE.name])


class FakeApplication:
    def __init__(self, reads: FakeReads) -> None:
        self.config = Config()
        self.reads = reads
        self.feed = Bus()
        self.ingest = FakeIngest()
        self.actions = FakeActions()
        self.agents = Agents()
        self.alerts = FakeAlerts()
        self.healthy = True

    def frameworks(self) -> list[Framework]:
        return [Framework("toy", job_events_advice="start the toy worker with --events")]

    async def workers(self) -> list[WorkerView]:
        return [
            WorkerView(worker, False, "start the toy worker with --events")
            for worker in await self.reads.list_workers()
        ]

    async def health(self) -> tuple[dict[str, Any], bool]:
        return {"status": "ok" if self.healthy else "down"}, self.healthy

    async def metrics(self) -> bytes:
        return b"# fake\nsluice_up 1\n"

    async def diagnostics(self, dead_letters: int) -> Diagnostics:
        return Diagnostics(
            [Malformed("toy/1", "bad_time", 3, "stamped outside 2000-2100")],
            [],
            0,
            Retention(
                "keeping completed jobs 14 days",
                footprint=Footprint(42_200_000, T0, partitions=12, partitions_dropped=1_234),
            ),
        )


@pytest.fixture
def fake() -> FakeApplication:
    return FakeApplication(
        FakeReads(
            [
                _event("a", JobState.QUEUED, T0, name="toy.add", queue="default"),
                _event("a", JobState.ACTIVE, T0 + 1),
                _event("a", JobState.COMPLETED, T0 + 3, result="5"),
                _event("b", JobState.QUEUED, T0 + 2, name="toy.mul", queue="default"),
            ]
        )
    )


@pytest.fixture
async def client(fake: FakeApplication) -> AsyncIterator[Any]:
    app: QuartTrio = create_app(fake, auth=Auth(api_token=None, users={}, session_secret="s"))
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def _json(response: Any) -> Any:
    return orjson.loads(await response.get_data())


async def test_the_job_list_and_a_job_come_from_the_application(client: Any) -> None:
    listed = await _json(await client.get("/api/jobs"))
    assert [job["id"] for job in listed["jobs"]] == ["a", "b"]
    detail = await _json(await client.get("/api/jobs/a"))
    assert detail["state"] == "completed"
    assert [event["state"] for event in detail["events"]] == ["queued", "active", "completed"]
    assert detail["timing"]["runtime_s"] == 2.0
    assert detail["location"] == {"broker": "toy://local", "agent": None}
    missing = await client.get("/api/jobs/nope")
    assert missing.status_code == 404


async def test_actions_are_what_the_application_declares_and_does(
    client: Any, fake: FakeApplication
) -> None:
    declared = await _json(await client.get("/api/actions"))
    assert [spec["name"] for spec in declared["frameworks"]["toy"]] == ["nudge"]
    done = await client.post("/api/jobs/b/nudge", json={"hard": True})
    assert done.status_code == 202
    assert (await _json(done))["options"] == {"hard": True}
    assert fake.actions.done == [("nudge", ["b"], {"hard": True}, None)]
    bad = await client.post("/api/jobs/b/nudge", json={"hard": "very"})
    assert bad.status_code == 400
    unknown = await client.post("/api/jobs/b/shove", json={})
    assert unknown.status_code == 404
    assert "'nudge'" in (await _json(unknown))["error"]["message"]
    bulk = await client.post("/api/jobs/bulk", json={"action": "nudge", "ids": ["a", "b"]})
    assert [r["outcome"] for r in (await _json(bulk))["results"]] == ["accepted", "accepted"]
    assert (await client.get("/api/jobs/a/retry")).status_code == 501
    page = (await (await client.get("/jobs/b")).get_data()).decode()
    assert "Nudge" in page


async def test_workers_carry_their_frameworks_advice(client: Any) -> None:
    [worker] = await _json(await client.get("/api/workers"))
    assert worker["hostname"] == "w1"
    assert worker["task_events"] is False
    assert worker["advice"] == "start the toy worker with --events"


async def test_health_and_metrics_are_the_applications(client: Any, fake: FakeApplication) -> None:
    ok = await client.get("/healthz")
    assert (ok.status_code, await _json(ok)) == (200, {"status": "ok"})
    fake.healthy = False
    assert (await client.get("/healthz")).status_code == 503
    metrics = await client.get("/metrics")
    assert b"sluice_up 1" in await metrics.get_data()


async def test_a_pushed_batch_is_stored_then_acknowledged(
    client: Any, fake: FakeApplication
) -> None:
    auth = {"Authorization": "Bearer secret"}
    taken = await client.post("/api/ingest", data=b'{"format": "toy", "ids": ["c"]}', headers=auth)
    assert (taken.status_code, await _json(taken)) == (200, {"accepted": 1})
    assert [event.job_id for event in fake.ingest.stored] == ["c"]
    refused = await client.post("/api/ingest", data=b'{"format": "x", "ids": []}', headers=auth)
    assert refused.status_code == 400
    assert (await _json(refused))["error"]["message"] == "unknown format 'x'"
    fake.ingest.down = True
    away = await client.post("/api/ingest", data=b'{"format": "toy", "ids": ["d"]}', headers=auth)
    assert away.status_code == 503
    assert (await client.post("/api/ingest", data=b"{}")).status_code == 401


async def test_dashboard_pages_render_what_the_application_reads(client: Any) -> None:
    jobs = (await (await client.get("/jobs")).get_data()).decode()
    assert "toy.add" in jobs and "toy.mul" in jobs
    job = (await (await client.get("/jobs/a")).get_data()).decode()
    assert "toy.add" in job and "toy://local" in job
    workers = (await (await client.get("/workers")).get_data()).decode()
    assert "start the toy worker with --events" in workers
    diagnostics = (await (await client.get("/diagnostics")).get_data()).decode()
    assert "bad_time" in diagnostics and "toy/1" in diagnostics
    assert "keeping completed jobs 14 days" in diagnostics
    assert "42.2 MB on disk" in diagnostics
    assert "holds 12 day partitions; expiry has dropped\n    1,234" in diagnostics
    assert "its oldest job dates from <time datetime=\"2026-05-28T20:26:40+00:00\">" in diagnostics


# What runs Sluice, as opposed to what describes it: the web reaches none of it except
# through the application interface.
RUNNING_PARTS = {
    "sluice_core.engine",
    "sluice_core.pipeline",
    "sluice_core.plugins",
    "sluice_core.reader",
    "sluice_core.sources",
    "sluice_core.monitors",
    "sluice_core.leader",
    "sluice_core.follow",
    "sluice_core.metrics",
    "sluice_core.job_actions",
}


def test_the_web_imports_no_running_part_of_sluice() -> None:
    web = Path(__file__).parent.parent / "web"
    found = []
    for module in sorted(web.glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in RUNNING_PARTS:
                found.append(f"{module.name}: from {node.module} import ...")
            if isinstance(node, ast.Import):
                found += [
                    f"{module.name}: import {a.name}" for a in node.names if a.name in RUNNING_PARTS
                ]
            if isinstance(node, ast.ImportFrom) and node.module == "sluice_core.bus":
                # The feed's message types only: the bus itself is the application's.
                found += [f"{module.name}: bus.{a.name}" for a in node.names if a.name == "Bus"]
    assert found == []

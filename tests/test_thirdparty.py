"""A third-party framework, end to end: toyqueue (tests/thirdparty/), installed through an
entry point and run by ``sluice run --plugin toyqueue`` in a process of its own, against a
real toyqueue server in the test; seen through the REST API, the SSE stream and the
dashboard in a real Chromium. Nothing in sluice_core/, storage/ or web/ knows toyqueue:
these tests are the proof that a framework needs no change to the core (issue 18, item 4).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from playwright.sync_api import Page, expect
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.services import free_port
from tests.test_actions import in_state, job_when
from tests.test_api import serving
from tests.test_dashboard import browse
from tests.test_stream import next_of, sse
from tests.thirdparty.toyqueue_server import ToyQueueServer
from tests.waiting import wait_until

THIRDPARTY = Path(__file__).parent / "thirdparty"
TIMEOUT = 60  # a whole `sluice run` (two processes) starting on a busy machine, and its work
HEARTBEAT = 1.0  # seconds between the toy workers' heartbeats, as the plugin is told
BUMP_HELP = "Move the job to the front of its queue: the next free worker takes it first."


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The toyqueue plugin installed as a distribution with a `sluice` entry point, in a
    folder to put on PYTHONPATH (and on this process's path)."""
    site = tmp_path / "site"
    dist = site / "sluice_toyqueue-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sluice-toyqueue\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[sluice]\ntoyqueue = sluice_toyqueue\n")
    (site / "sluice_toyqueue.py").write_text((THIRDPARTY / "sluice_toyqueue.py").read_text())
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.fixture
async def toyqueue() -> AsyncIterator[ToyQueueServer]:
    server = ToyQueueServer()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def sluice_run(
    site: Path, server: ToyQueueServer, *args: str
) -> AsyncIterator[httpx.AsyncClient]:
    """``sluice run --plugin toyqueue --broker <server>`` as a user starts it (the plugin
    found through its entry point, in the engine and in the reader process), with a client
    for its web server once it is healthy and reading the server."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLUICE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    log = site.parent / "sluice.log"
    with log.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            [
                sys.executable, "-m", "sluice_core", "run", "--plugin", "toyqueue",
                "--broker", server.url, "--db", f"sqlite:///{site.parent}/sluice.db",
                "--port", str(port), "--toyqueue-heartbeat", str(HEARTBEAT), *args,
            ],
            env=env,
            stderr=stderr,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            async def healthy() -> bool:
                if proc.returncode is not None:
                    raise AssertionError(f"sluice run exited {proc.returncode}: {log.read_text()}")
                try:
                    return (await client.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(healthy, "sluice run to be healthy")
            await server.watching.wait()  # its source watches: nothing published is missed
            yield client
    finally:
        proc.terminate()
        with trio.move_on_after(20):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        print(log.read_text())  # shown by pytest when the test failed


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    """Sample ``name`` of ``/metrics``, summed over its series that have ``labels``."""
    text = (await client.get("/metrics")).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def test_sluice_plugins_lists_the_hooks_of_the_installed_plugin(installed: Path) -> None:
    out = (
        await trio.run_process(
            [sys.executable, "-m", "sluice_core", "plugins", "--plugin", "toyqueue"],
            capture_stdout=True,
            env={"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin"},
        )
    ).stdout.decode()
    toy = out.split("toyqueue (sluice_toyqueue)")[1]
    hooks = {line.strip() for line in toy.splitlines() if line.startswith("    ")}
    assert hooks == {
        "sluice_actions", "sluice_addoption", "sluice_claim_broker", "sluice_frameworks",
        "sluice_normalize", "sluice_probes", "sluice_sources",
    }


async def test_toyqueue_jobs_reach_the_api_the_stream_and_the_queues(
    installed: Path, toyqueue: ToyQueueServer
) -> None:
    server = toyqueue
    with trio.fail_after(TIMEOUT):
        async with sluice_run(installed, server, "--toyqueue-probe-interval", "0.2") as client:
            params = {"framework": "toyqueue"}  # the stream filters a plugin's jobs like any
            async with client.stream("GET", "/api/stream", params=params) as response:
                events = sse(response)
                assert "retry" in await anext(events)  # subscribed: nothing is missed now
                server.enqueue("t1", "images.resize", "images")
                live = orjson.loads((await next_of(events, "job"))["data"])

            for job_id in ("t2", "t3"):
                server.enqueue(job_id, "images.resize", "images")
            server.take("toy-1", "images")
            server.send_line(b"not json")
            server.finish("t1", "toy-1")
            server.take("toy-1", "images")
            server.finish("t2", "toy-1", error="ValueError: not an image")
            done = await job_when(client, "t1", in_state("completed"))
            failed = await job_when(client, "t2", in_state("failed"))
            listed = (await client.get("/api/jobs", params=params)).json()["jobs"]

            async def measured() -> list[dict[str, Any]]:
                queues = (await client.get("/api/queues")).json()
                return [q for q in queues if q["name"] == "images" and q["depth"] == 1]

            [queue] = await wait_until(measured, "the probe to measure 1 job left in images")
            source = f"toyqueue/{server.url}"
            malformed = await metric(client, "sluice_events_malformed_total", source=source)

    assert (live["id"], live["state"], live["framework"]) == ("t1", "queued", "toyqueue")
    assert [e["type"] for e in done["events"]] == ["waiting", "running", "done"]
    assert (done["name"], done["queue"], done["worker"]) == ("images.resize", "images", "toy-1")
    assert done["location"] == {"broker": server.url, "agent": None}
    assert failed["exception"] == "ValueError: not an image"
    assert {job["id"]: job["state"] for job in listed} == {
        "t1": "completed", "t2": "failed", "t3": "queued",
    }
    assert (queue["framework"], queue["broker"]) == ("toyqueue", server.url)
    assert malformed == 1


async def test_a_toyqueue_worker_that_stops_beating_goes_offline_and_its_job_is_lost(
    installed: Path, toyqueue: ToyQueueServer
) -> None:
    """toyqueue heartbeats do not say how often they come: the plugin's Framework does
    (--toyqueue-heartbeat), and the core's worker monitor judges by it."""
    server = toyqueue
    with trio.fail_after(TIMEOUT):
        async with sluice_run(installed, server) as client, trio.open_nursery() as nursery:
            worker = trio.CancelScope()

            async def live_worker() -> None:
                with worker:
                    await server.beat("toy-2", HEARTBEAT, active=1)

            nursery.start_soon(live_worker)
            server.enqueue("h1", "reports.build", "reports")
            server.take("toy-2", "reports")
            running = await job_when(client, "h1", in_state("active"))

            async def worker_is(status: str) -> dict[str, Any] | None:
                workers = (await client.get("/api/workers")).json()
                return next(
                    (w for w in workers if w["hostname"] == "toy-2" and w["status"] == status),
                    None,
                )

            online = await wait_until(lambda: worker_is("online"), "toy-2 online")
            worker.cancel()  # the worker dies: its heartbeats stop
            stopped_at = time.time()
            offline = await wait_until(lambda: worker_is("offline"), "toy-2 offline")
            lost = await job_when(client, "h1", in_state("lost"))
            judged_after = time.time() - stopped_at

    assert running["worker"] == "toy-2"
    assert (online["framework"], online["active"], online["freq"]) == ("toyqueue", 1, None)
    assert online["task_events"] is True  # a stored job names it
    assert offline["framework"] == "toyqueue"
    # Not before the window: 3 missed heartbeats of the interval the plugin declared.
    assert judged_after >= 2 * HEARTBEAT
    [conclusion] = [e for e in lost["events"] if e["state"] == "lost"]
    assert f"expected every {HEARTBEAT:g}s" in conclusion["detail"]["exception"]
    assert "the toyqueue server puts it back" in conclusion["detail"]["exception"]


async def test_bump_an_action_of_toyqueue_s_own_moves_the_job_on_its_server(
    installed: Path, toyqueue: ToyQueueServer
) -> None:
    server = toyqueue
    with trio.fail_after(TIMEOUT):
        async with sluice_run(installed, server) as client:
            for job_id in ("b1", "b2", "b3"):
                server.enqueue(job_id, "images.resize", "images")
            server.take("toy-5", "images")  # b1 runs
            await job_when(client, "b1", in_state("active"))
            await job_when(client, "b3", in_state("queued"))
            declared = (await client.get("/api/actions")).json()

            bumped = await client.post("/api/jobs/b3/bump", json={})
            queue = list(server.queues["images"])
            taken = server.take("toy-5", "images")  # the next free worker takes it first
            b3 = await job_when(
                client,
                "b3",
                lambda job: job["state"] == "active"
                and any(e["type"] == "bumped" for e in job["events"]),
            )
            refused = await client.post("/api/jobs/b1/bump", json={})  # running: not waiting
            bad_option = await client.post("/api/jobs/b2/bump", json={"priority": 9})
            not_offered = await client.post("/api/jobs/b2/retry", json={})

    [bump] = declared["frameworks"]["toyqueue"]
    assert (bump["name"], bump["title"], bump["options"]) == ("bump", "Bump", [])
    assert bumped.status_code == 202, bumped.text
    assert (bumped.json()["outcome"], bumped.json()["action"]) == ("accepted", "bump")
    assert (queue, taken) == (["b3", "b2"], "b3")
    # The core's record of the action, then the server's own word, on the job's timeline.
    assert [e["type"] for e in b3["events"]] == ["waiting", "sluice-bump", "bumped", "running"]
    assert b3["worker"] == "toy-5"
    assert refused.status_code == 409
    assert "b1 is not waiting" in refused.json()["error"]["message"]
    assert bad_option.status_code == 400
    assert "unknown field 'priority' (accepted: none)" in bad_option.json()["error"]["message"]
    assert not_offered.status_code == 501, not_offered.text  # toyqueue offers no retry


@pytest.mark.browser
async def test_the_dashboard_shows_a_toyqueue_job_and_worker(
    installed: Path, toyqueue: ToyQueueServer
) -> None:
    server = toyqueue
    with trio.fail_after(TIMEOUT):
        async with sluice_run(installed, server) as client, trio.open_nursery() as nursery:
            nursery.start_soon(server.beat, "toy-3", HEARTBEAT)
            for job_id in ("d1", "d2", "d3"):
                server.enqueue(job_id, "mail.send", "mail")
            server.take("toy-3", "mail")
            await job_when(client, "d1", in_state("active"))
            await job_when(client, "d3", in_state("queued"))
            base = str(client.base_url)
            dialogs: list[str] = []

            def scenario(page: Page) -> None:
                page.goto(f"{base}/jobs/d1")
                expect(page.locator("h1")).to_contain_text("mail.send")
                expect(page.locator("main")).to_contain_text("toy-3")
                page.goto(f"{base}/jobs/d3")
                page.once("dialog", lambda d: (dialogs.append(d.message), d.accept()))
                page.click("button[data-action=bump]")
                expect(page.locator("#action-result")).to_have_text("Bump done")
                page.goto(f"{base}/workers")
                expect(page.locator("main")).to_contain_text("toy-3")

            await browse(scenario)
            nursery.cancel_scope.cancel()
    assert dialogs == [f"Bump this job?\n{BUMP_HELP}"]
    assert server.queues["mail"] == ["d3", "d2"]


async def test_a_toyqueue_batch_can_be_pushed_in_its_own_format(
    installed: Path, tmp_path: Path
) -> None:
    """The format is declared by the plugin (sluice_frameworks), not known to the core."""
    import sluice_toyqueue  # installed by the fixture, as an entry point would be

    now = time.time()
    reports = [
        {"id": "p1", "name": "resize", "status": "running", "ts": now, "worker": "toy-4"},
        {"id": "p1", "status": "done", "ts": now + 1},
    ]
    with trio.fail_after(30):
        async with serving(tmp_path, sluice_toyqueue) as (engine, client):
            key = {"Authorization": f"Bearer {(await engine.storage.create_api_key('toy'))[1]}"}
            response = await client.post(
                "/api/ingest", json={"format": "toyqueue", "events": reports}, headers=key
            )
            assert (response.status_code, response.json()) == (200, {"accepted": 2})
            job = (await client.get("/api/jobs/p1")).json()
            unknown = await client.post(
                "/api/ingest", json={"format": "rq", "events": []}, headers=key
            )
    assert (job["state"], job["name"], job["framework"]) == ("completed", "resize", "toyqueue")
    assert job["location"] is None  # pushed: it lives on no server this Sluice reads
    assert unknown.status_code == 400
    assert "accepted: 'toyqueue', 'sluice'" in unknown.json()["error"]["message"]


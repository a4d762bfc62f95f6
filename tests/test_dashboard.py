"""The dashboard in a real headless Chromium, against a real engine on SQLite.

The engine runs in the test's trio loop with its web server on port 0; jobs,
workers and queue samples go in through the same paths the Celery plugin and
the probes use (the pipeline's ``put_events``, ``record_queue_samples``).
Playwright's sync API drives Chromium from a worker thread; a scenario that
must change data mid-way calls back into trio with ``trio.from_thread.run``.
Each page's screenshot lands in docs/screenshots/.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import argon2
import httpx
import pytest
import trio
from playwright.sync_api import Page, Route, expect, sync_playwright

from sluice_core.config import Config
from sluice_core.engine import Engine
from sluice_core.model import (
    JobEvent,
    JobState,
    Normalized,
    QueueSample,
    WorkerEvent,
    event_id,
)
from sluice_core.plugins import PluginManager
from sluice_core.storage import Storage
from tests.fixtures.services import REPO
from tests.metrics import metric
from tests.test_api import serving
from tests.test_hostile_events import refused_by_storage
from tests.waiting import wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# The README's screenshots are re-made only when asked (SLUICE_SCREENSHOTS=1 make test):
# a test run must not rewrite tracked files.
SCREENSHOTS = (
    REPO / "docs" / "screenshots"
    if os.environ.get("SLUICE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "sluice-screenshots"
)
BROKER = "redis://localhost:6379/0"
# A zone an hour off UTC (in November) shows that times are converted, not just printed.
VIEWER_TZ = "Europe/Paris"

FAILED_ID = "6f1c2a9e-4b7d-4e0a-9c51-3d2f8a7b1e04"
PARENT_ID = "0a7e5c31-98b2-4f6d-a1c4-52e9d07f3b18"

TRACEBACK = """Traceback (most recent call last):
  File "/app/.venv/lib/python3.12/site-packages/celery/app/trace.py", line 453, in trace_task
    R = retval = fun(*args, **kwargs)
                 ^^^^^^^^^^^^^^^^^^^^
  File "/app/.venv/lib/python3.12/site-packages/celery/app/trace.py", line 736, in __protected_call__
    return self.run(*args, **kwargs)
           ^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/app/billing/tasks.py", line 88, in charge_card
    charge = gateway.charge(customer_id, amount_cents, idempotency_key=order_id)
             ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/app/billing/gateway.py", line 41, in charge
    raise CardDeclined(body["error"]["message"])
billing.gateway.CardDeclined: Your card has insufficient funds.
"""

# name, queue, typical runtime (s), failure probability, exception
TASKS = [
    ("orders.process_order", "celery", 0.35, 0.02, "IntegrityError('duplicate key value')"),
    ("emails.send_welcome", "emails", 0.8, 0.04, "SMTPServerDisconnected('Connection unexpectedly closed')"),
    ("billing.charge_card", "billing", 1.2, 0.3, "CardDeclined('Your card has insufficient funds.')"),
    ("reports.build_daily", "reports", 14.0, 0.05, "MemoryError()"),
    ("images.make_thumbnail", "celery", 0.15, 0.01, "UnidentifiedImageError('cannot identify image file')"),
]
WORKERS = ["celery@web-1", "celery@web-2"]


def celery_events(
    job_id: str,
    name: str,
    queue: str,
    *,
    sent: float,
    worker: str | None = None,
    wait: float = 0.05,
    runtime: float | None = None,
    outcome: JobState | None = None,
    args: str = "()",
    kwargs: str = "{}",
    result: str | None = None,
    exception: str | None = None,
    traceback: str | None = None,
    parent_id: str | None = None,
) -> list[JobEvent]:
    """A job's events as the Celery plugin normalizes them: sent, received, started, then the end."""

    def event(type_: str, state: JobState, ts: float, on: str | None, **fields: object) -> JobEvent:
        return JobEvent(
            id=event_id(job_id, type_, ts), job_id=job_id, framework="celery", type=type_,
            state=state, timestamp=ts, worker=on, fields=fields,
        )

    ids = {"root_id": parent_id or job_id, "parent_id": parent_id}
    out = [
        event("task-sent", JobState.QUEUED, sent, None, name=name, queue=queue, args=args,
              kwargs=kwargs, retries=0, **ids),
    ]
    if worker is None:
        return out
    received = sent + wait * 0.8
    started = sent + wait
    out += [
        event("task-received", JobState.RECEIVED, received, worker, name=name, args=args,
              kwargs=kwargs, retries=0, **ids),
        event("task-started", JobState.ACTIVE, started, worker),
    ]
    if outcome is JobState.COMPLETED:
        assert runtime is not None
        out.append(event("task-succeeded", outcome, started + runtime, worker, result=result,
                         runtime=runtime))
    elif outcome is JobState.FAILED:
        assert runtime is not None
        out.append(event("task-failed", outcome, started + runtime, worker, exception=exception,
                         traceback=traceback))
    return out


def seed_jobs(now: float) -> list[JobEvent]:
    """An hour of a small shop's Celery traffic, reproducible, ending at ``now``."""
    rng = random.Random(20260124)
    events: list[JobEvent] = []
    for i in range(240):
        name, queue, typical, p_fail, exception = TASKS[i % len(TASKS)]
        sent = now - 3600 + i * 15 + rng.random() * 10
        # A burst of card declines twenty minutes ago gives the failure chart a shape.
        failing = rng.random() < (p_fail * 2.5 if name == "billing.charge_card" and
                                  1000 < now - sent < 1600 else p_fail)
        job_id = f"{rng.getrandbits(128):032x}"
        job_id = f"{job_id[:8]}-{job_id[8:12]}-{job_id[12:16]}-{job_id[16:20]}-{job_id[20:]}"
        events += celery_events(
            job_id, name, queue, sent=sent, worker=WORKERS[i % 2],
            wait=rng.uniform(0.005, 0.4), runtime=typical * rng.uniform(0.6, 1.6),
            outcome=JobState.FAILED if failing else JobState.COMPLETED,
            args=f"({1000 + i},)", kwargs="{'priority': 'normal'}",
            result=None if failing else "{'ok': True}",
            exception=exception if failing else None,
            traceback=TRACEBACK.replace("CardDeclined: Your card has insufficient funds.",
                                        exception) if failing else None,
        )
    events += celery_events(
        PARENT_ID, "orders.process_order", "celery", sent=now - 95, worker="celery@web-1",
        runtime=0.4, outcome=JobState.COMPLETED, args="(98231,)", result="'charged'",
    )
    events += celery_events(
        FAILED_ID, "billing.charge_card", "billing", sent=now - 90, worker="celery@web-2",
        wait=0.12, runtime=1.9, outcome=JobState.FAILED, args="('cus_Q81x', 4599)",
        kwargs="{'order_id': 98231, 'currency': 'eur'}",
        exception="CardDeclined('Your card has insufficient funds.')", traceback=TRACEBACK,
        parent_id=PARENT_ID,
    )
    # Still running, and still waiting: not everything has finished.
    events += celery_events("c3d1f0aa-7e21-4c8e-b5a2-19f0e4d6a7b3", "reports.build_daily",
                            "reports", sent=now - 40, worker="celery@web-1")
    events += celery_events("9b2e7d44-0c3f-4a1b-8e6d-5f7a2c9d0e11", "emails.send_welcome",
                            "emails", sent=now - 5)
    return events


def seed_workers(now: float) -> list[WorkerEvent]:
    out = [
        WorkerEvent(hostname=host, framework="celery", type="heartbeat", timestamp=now - 1.5,
                    freq=2.0, active=active, processed=processed, loadavg=[0.42, 0.35, 0.3],
                    pid=pid, sw_ver="5.7.0")
        for host, active, processed, pid in (
            ("celery@web-1", 1, 18342, 4242), ("celery@web-2", 0, 17990, 4317)
        )
    ]
    out.append(WorkerEvent(hostname="celery@batch-1", framework="celery", type="offline",
                           timestamp=now - 7200, pid=977, sw_ver="5.6.2"))
    return out


def seed_queue_samples(now: float) -> list[QueueSample]:
    """A probe's readings every minute for an hour: billing backs up, then drains."""
    samples = []
    for minute in range(60, -1, -1):
        ts = now - minute * 60
        backlog = max(0, 40 - abs(minute - 25) * 3)
        for name, depth, consumers in (
            ("celery", 2 + minute % 3, 8), ("emails", 5 + (minute * 7) % 6, 4),
            ("billing", backlog, 2), ("reports", 1 if minute % 15 < 3 else 0, 1),
        ):
            samples.append(QueueSample(name=name, framework="celery", broker=BROKER,
                                       timestamp=ts, depth=depth, reserved=min(depth, 4),
                                       consumers=consumers))
    return samples


async def ingest(
    engine: Engine, job_events: Iterable[JobEvent], worker_events: Iterable[WorkerEvent] = ()
) -> None:
    """Feed events through the pipeline and wait until they are stored and published."""
    before = engine.pipeline.stored_batches
    engine.pipeline.put_events(list(job_events), list(worker_events))
    await wait_until(lambda: engine.pipeline.stored_batches > before, "the events stored")


@pytest.fixture
async def empty_engine(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Engine]:
    engine = Engine(Config(db=f"sqlite:///{tmp_path / 'sluice.db'}", port=0), PluginManager())
    with trio.fail_after(20):
        await nursery.start(engine.run)
    yield engine
    engine.stop()
    with trio.fail_after(20):
        await engine.stopped.wait()


@pytest.fixture
async def engine(empty_engine: Engine) -> Engine:
    now = time.time()
    with trio.fail_after(20):
        await ingest(empty_engine, seed_jobs(now), seed_workers(now))
        await empty_engine.storage.record_queue_samples(seed_queue_samples(now))
    return empty_engine


def url(engine: Engine, path: str = "/") -> str:
    return engine.web_addresses[0].rstrip("/") + path


# What a deployment behind a careful proxy would send: no inline script or style at all.
STRICT_CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:"


def _with_strict_csp(route: Route) -> None:
    if route.request.resource_type != "document":
        route.continue_()  # never buffer the event stream
        return
    response = route.fetch()
    route.fulfill(response=response,
                  headers={**response.headers, "content-security-policy": STRICT_CSP})


async def browse(scenario: Callable[[Page], None], *, javascript: bool = True) -> None:
    """Run ``scenario`` on a fresh Chromium page under a strict Content-Security-Policy;
    any script error or CSP violation fails it."""

    def run() -> None:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                context = browser.new_context(
                    viewport={"width": 1440, "height": 900}, timezone_id=VIEWER_TZ,
                    locale="en-US", java_script_enabled=javascript,
                )
                context.route("**/*", _with_strict_csp)
                page = context.new_page()
                page.set_default_timeout(10_000)
                # expect()'s own default is 5 s: too short for a real worker on a busy CI machine.
                expect.set_options(timeout=15_000)
                problems: list[str] = []
                page.on("pageerror", lambda exc: problems.append(str(exc)))
                # A 4xx/5xx answer is logged as "Failed to load resource": expected in tests
                # of error display. Anything else on the console's error level is a bug.
                page.on("console", lambda msg: problems.append(msg.text)
                        if msg.type == "error" and "Failed to load resource" not in msg.text
                        else None)
                scenario(page)
                assert not problems, problems
            finally:
                browser.close()

    with trio.fail_after(90):
        await trio.to_thread.run_sync(run)


def screenshot(page: Page, name: str, *, full_page: bool = True) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=full_page)


# -- tests ------------------------------------------------------------------------------


@pytest.mark.browser
async def test_overview_shows_throughput_failures_and_workers(engine: Engine) -> None:
    def scenario(page: Page) -> None:
        page.goto(url(engine, "/"))
        expect(page.locator("#workers-online")).to_have_text("2 / 3")
        # Both charts drew lines from the hour of traffic.
        expect(page.locator("svg.chart polyline.series-ok")).to_have_count(1)
        expect(page.locator("svg.chart polyline.series-bad")).to_have_count(2)
        top = page.locator("table.bars tr").first
        expect(top).to_contain_text("billing.charge_card")
        page.locator(".state-counts a", has_text="failed").click()
        expect(page).to_have_url(re.compile(r"/jobs\?state=failed$"))
        page.goto(url(engine, "/"))
        screenshot(page, "overview.png")

    await browse(scenario)


@pytest.mark.browser
async def test_search_finds_a_failed_job_by_task_name(engine: Engine) -> None:
    def scenario(page: Page) -> None:
        page.goto(url(engine, "/jobs"))
        expect(page.locator("#live-status")).to_have_text("Live")
        screenshot(page, "jobs.png", full_page=False)
        page.fill("#f-q", "charge_card")
        page.press("#f-q", "Enter")
        expect(page).to_have_url(re.compile(r"q=charge_card"))
        names = page.locator("#jobs-body [data-field=name]")
        expect(names.first).to_be_visible()
        assert set(names.all_inner_texts()) == {"billing.charge_card"}
        row = page.locator(f'tr[data-job-id="{FAILED_ID}"]')
        expect(row.locator("[data-field=state]")).to_have_text("failed")
        expect(row.locator("[data-field=exception]")).to_contain_text("CardDeclined")

    await browse(scenario)


@pytest.mark.browser
async def test_state_filter_lists_only_failed_jobs(engine: Engine) -> None:
    failed = (await engine.storage.count_jobs_by_state())["failed"]
    assert 0 < failed < 50  # one page

    def scenario(page: Page) -> None:
        page.goto(url(engine, "/jobs"))
        page.select_option("select[name=state]", "failed")
        page.click("button[type=submit]")
        expect(page).to_have_url(re.compile(r"state=failed"))
        states = page.locator("#jobs-body [data-field=state]")
        expect(states).to_have_count(failed)
        assert set(states.all_inner_texts()) == {"failed"}
        # The form keeps the filter it applied.
        expect(page.locator("select[name=state]")).to_have_value("failed")

    await browse(scenario)


@pytest.mark.browser
async def test_job_detail_shows_traceback_timeline_links_and_action_errors(
    engine: Engine,
) -> None:
    def scenario(page: Page) -> None:
        page.goto(url(engine, "/jobs?state=failed&name=billing.charge_card"))
        page.click(f'tr[data-job-id="{FAILED_ID}"] a[data-field=link]')
        expect(page).to_have_url(re.compile(f"/jobs/{FAILED_ID}$"))
        expect(page.locator("h1")).to_contain_text("billing.charge_card")
        expect(page.locator("h1 .badge")).to_have_text("failed")
        expect(page.locator("#traceback")).to_contain_text(
            "billing.gateway.CardDeclined: Your card has insufficient funds."
        )
        steps = page.locator(".timeline .event-type")
        assert steps.all_inner_texts() == [
            "task-sent", "task-received", "task-started", "task-failed"
        ]
        # Times are in the viewer's zone (Paris is UTC+1 in winter), UTC kept as the tooltip.
        first = page.locator(".timeline time").first
        expect(first).to_have_text(re.compile(r"GMT\+1$"))
        expect(first).to_have_attribute("title", re.compile(r"UTC$"))
        # Steps a few ms apart are told apart: the timeline and the timing show milliseconds.
        expect(first).to_have_text(re.compile(r" \d\d:\d\d:\d\d\.\d{3} GMT\+1$"))
        expect(first).to_have_attribute("title", re.compile(r":\d\d\.\d{3} UTC$"))
        expect(page.locator("dd time").first).to_have_text(re.compile(r"\.\d{3} GMT\+1$"))
        expect(page.locator(".timing dd").nth(1)).to_have_text("1.90 s")
        expect(page.locator("pre.code").first).to_have_text("('cus_Q81x', 4599)")
        expect(page.locator("section", has_text="Recent runs").locator("tbody tr")).to_have_count(10)
        screenshot(page, "job.png")
        # No action plugin is loaded: the API answers 501 and the page says why.
        page.once("dialog", lambda dialog: dialog.accept())  # "Run this job again ...?"
        page.click("button[data-action=retry]")
        expect(page.locator("#action-result")).to_have_class(re.compile("error"))
        expect(page.locator("#action-result")).to_contain_text("no action handler")
        page.click("a[href$='" + PARENT_ID + "']")
        expect(page.locator("h1")).to_contain_text("orders.process_order")

    await browse(scenario)


@pytest.mark.browser
async def test_new_job_appears_live_and_changes_state_in_place(engine: Engine) -> None:
    job_id = "live0000-1111-4222-8333-444455556666"
    sent = time.time()
    queued = celery_events(job_id, "emails.send_welcome", "emails", sent=sent)
    finished = celery_events(job_id, "emails.send_welcome", "emails", sent=sent,
                             worker="celery@web-1", runtime=0.5, outcome=JobState.COMPLETED,
                             result="None")[1:]

    def scenario(page: Page) -> None:
        page.goto(url(engine, "/jobs"))
        expect(page.locator("#live-status")).to_have_text("Live")
        page.evaluate("window.notReloaded = true")
        trio.from_thread.run(ingest, engine, queued)
        row = page.locator(f'#jobs-body tr[data-job-id="{job_id}"]')
        expect(row.locator("[data-field=state]")).to_have_text("queued")
        assert page.locator("#jobs-body tr").first.get_attribute("data-job-id") == job_id
        trio.from_thread.run(ingest, engine, finished)
        expect(row.locator("[data-field=state]")).to_have_text("completed")
        expect(row.locator("[data-field=worker]")).to_have_text("celery@web-1")
        expect(row).to_have_count(1)
        assert page.evaluate("window.notReloaded") is True

    await browse(scenario)


@pytest.mark.browser
async def test_bulk_retry_posts_selection_and_shows_the_answer(engine: Engine) -> None:
    def scenario(page: Page) -> None:
        page.goto(url(engine, "/jobs?state=failed"))
        expect(page.locator("[data-bulk=retry]")).to_be_disabled()
        boxes = page.locator("#jobs-body .job-select")
        boxes.nth(0).check()
        boxes.nth(1).check()
        expect(page.locator("#bulk-count")).to_have_text("2 selected")
        page.once("dialog", lambda dialog: dialog.accept())  # "Retry 2 job(s)?"
        page.click("[data-bulk=retry]")
        result = page.locator("#bulk-result")
        expect(result).to_contain_text("no action handler")
        expect(result).to_have_class(re.compile("error"))

    await browse(scenario)


@pytest.mark.browser
async def test_queues_page_shows_depth_and_history(engine: Engine) -> None:
    def scenario(page: Page) -> None:
        page.goto(url(engine, "/queues"))
        billing = page.locator('tr[data-queue="billing"]')
        expect(billing.locator(".depth")).to_have_text("0")  # drained by now
        expect(page.locator('tr[data-queue="emails"] .depth')).to_have_text("5")
        expect(page.locator("svg.chart polyline")).to_have_count(4)
        expect(billing.locator("svg.sparkline polyline")).to_have_count(1)
        screenshot(page, "queues.png")

    await browse(scenario)


@pytest.mark.browser
async def test_workers_page_shows_online_and_offline_workers(engine: Engine) -> None:
    def scenario(page: Page) -> None:
        page.goto(url(engine, "/workers"))
        web1 = page.locator('tr[data-worker="celery@web-1"]')
        expect(web1.locator(".badge")).to_have_text("online")
        expect(web1.locator(".age")).to_have_text(re.compile(r"^\d s ago$"))
        expect(page.locator('tr[data-worker="celery@batch-1"] .badge')).to_have_text("offline")
        screenshot(page, "workers.png")

    await browse(scenario)


@pytest.mark.browser
async def test_pages_work_without_javascript(engine: Engine) -> None:
    def scenario(page: Page) -> None:
        page.goto(url(engine, "/jobs?state=failed"))
        expect(page.locator("#jobs-body tr").first).to_be_visible()
        expect(page.locator("#jobs-body time").first).to_have_text(re.compile(r"UTC$"))
        expect(page.locator("#bulk-bar")).to_be_hidden()
        # Cursor pagination: the next page continues where the first ended.
        page.goto(url(engine, "/jobs"))
        first_page = set(page.locator("#jobs-body tr").evaluate_all(
            "rows => rows.map(r => r.dataset.jobId)"))
        page.click("a[rel=next]")
        second_page = set(page.locator("#jobs-body tr").evaluate_all(
            "rows => rows.map(r => r.dataset.jobId)"))
        assert len(first_page) == len(second_page) == 50
        assert not first_page & second_page
        page.goto(url(engine, "/jobs?since=yesterday"))
        expect(page.locator(".alert.error")).to_contain_text("since")

    await browse(scenario, javascript=False)


@pytest.mark.browser
async def test_job_page_follows_the_job_live(engine: Engine) -> None:
    job_id = "c3d1f0aa-7e21-4c8e-b5a2-19f0e4d6a7b3"  # seeded active
    done = JobEvent(
        id=event_id(job_id, "task-succeeded"), job_id=job_id, framework="celery",
        type="task-succeeded", state=JobState.COMPLETED, timestamp=time.time(),
        worker="celery@web-1", fields={"result": "'report-2026-11-23.pdf'", "runtime": 12.5},
    )

    def scenario(page: Page) -> None:
        page.goto(url(engine, f"/jobs/{job_id}"))
        expect(page.locator("h1 .badge")).to_have_text("active")
        expect(page.locator("#live-status")).to_have_text("Live")
        page.evaluate("window.notReloaded = true")
        trio.from_thread.run(ingest, engine, [done])
        expect(page.locator("h1 .badge")).to_have_text("completed")
        expect(page.locator(".timeline .event-type").last).to_have_text("task-succeeded")
        expect(page.locator("pre.code", has_text="report-2026-11-23.pdf")).to_be_visible()
        # Still localized after the refresh.
        expect(page.locator(".timeline time").last).to_have_text(re.compile(r"GMT\+1$"))
        assert page.evaluate("window.notReloaded") is True

    await browse(scenario)


@pytest.mark.browser
async def test_empty_pages_say_what_to_do(empty_engine: Engine) -> None:
    def scenario(page: Page) -> None:
        # No framework's plugin is loaded: say to load one.
        page.goto(url(empty_engine, "/jobs"))
        expect(page.locator(".empty-state")).to_contain_text("Load your job framework's plugin")
        page.goto(url(empty_engine, "/"))
        expect(page.locator(".empty-state")).to_contain_text("No events yet")
        page.goto(url(empty_engine, "/workers"))
        expect(page.locator(".empty-state")).to_contain_text("--plugin NAME")
        page.goto(url(empty_engine, "/queues"))
        expect(page.locator(".empty-state")).to_contain_text("No queues seen yet")
        response = page.goto(url(empty_engine, "/jobs/no-such-job"))
        assert response is not None and response.status == 404
        expect(page.locator(".empty-title")).to_have_text("No such job")

    await browse(scenario)


@pytest.mark.browser
async def test_the_job_list_counts_its_matches_says_its_order_and_takes_ids_in_capitals(
    engine: Engine,
) -> None:
    now = time.time()
    by_state = await engine.storage.count_jobs_by_state()
    emails = len([j for j in range(240) if TASKS[j % len(TASKS)][0] == "emails.send_welcome"]) + 1
    # Sent long ago, first seen now (a backlog after an outage): listed first, created earlier.
    late_id = "1a7e0000-0000-4000-8000-000000000001"
    await ingest(engine, celery_events(late_id, "emails.send_welcome", "emails", sent=now - 7200))
    emails += 1
    bulk = [e for i in range(1001)
            for e in celery_events(f"bulk-{i:04}", "bulk.job", "bulk", sent=now - 60 + i / 100)]
    await ingest(engine, bulk)
    live_id = "2b7e0000-0000-4000-8000-000000000002"

    def scenario(page: Page) -> None:
        page.goto(url(engine, "/jobs?name=emails.send_welcome"))
        expect(page.locator("#live-status")).to_have_text("Live")
        expect(page.locator("#jobs-total")).to_have_text(str(emails))
        expect(page.locator(".list-caption")).to_contain_text("in the order Sluice first saw them")
        expect(page.locator("th", has_text="Created")).to_have_attribute(
            "title", re.compile("order Sluice first saw each job"))
        assert page.locator("#jobs-body tr").first.get_attribute("data-job-id") == late_id
        # A job created while the page is open adds to the total.
        trio.from_thread.run(ingest, engine, celery_events(
            live_id, "emails.send_welcome", "emails", sent=time.time()))
        expect(page.locator(f'#jobs-body tr[data-job-id="{live_id}"]')).to_have_count(1)
        expect(page.locator("#jobs-total")).to_have_text(str(emails + 1))
        # Past the cap the count stops: 1,001 jobs match.
        page.goto(url(engine, "/jobs?name=bulk.job"))
        expect(page.locator("#jobs-total")).to_have_text("1,000+")
        page.goto(url(engine, "/jobs?state=failed"))
        expect(page.locator("#jobs-total")).to_have_text(str(by_state["failed"]))
        # An id prefix copied in capitals (uuids are stored lower case).
        page.fill("#f-q", FAILED_ID[:8].upper())
        page.press("#f-q", "Enter")
        expect(page.locator("#jobs-body tr")).to_have_count(1)
        expect(page.locator(f'#jobs-body tr[data-job-id="{FAILED_ID}"]')).to_be_visible()
        expect(page.locator("#jobs-total")).to_have_text("1")
        expect(page.locator("#jobs-total-noun")).to_have_text("job")

    await browse(scenario)


@pytest.mark.browser
async def test_the_diagnostics_page_shows_what_was_refused_and_dead_lettered(
    empty_engine: Engine,
) -> None:
    empty_engine.pipeline.put_events(refused_by_storage("refused"), [])
    empty_engine.metrics.observe_normalized(
        "celery/redis://localhost:6379/0", Normalized(rejected=Counter(timestamp=2))
    )
    await wait_until(
        lambda: metric(empty_engine.metrics, "sluice_events_dead_lettered_total") >= 1,
        "the refused event dead-lettered",
    )

    def scenario(page: Page) -> None:
        page.goto(url(empty_engine, "/"))
        page.click(".topbar nav >> text=Diagnostics")
        letters = page.locator("table.dead-letters tbody tr")
        expect(letters).to_have_count(1)
        expect(letters).to_contain_text("refused-2")
        expect(letters).to_contain_text("too large")
        expect(page.locator("table.malformed")).to_contain_text("timestamp")
        expect(page.locator("table.malformed")).to_contain_text("2000")  # what it means
        screenshot(page, "diagnostics.png")

    await browse(scenario)


@pytest.mark.browser
async def test_pages_have_an_icon_and_a_404_page_like_the_rest(empty_engine: Engine) -> None:
    def scenario(page: Page) -> None:
        response = page.goto(url(empty_engine, "/no/such/page"))
        assert response is not None and response.status == 404
        assert response.headers["content-type"].startswith("text/html")
        expect(page.locator(".empty-title")).to_have_text("Page not found")
        expect(page.locator(".empty-state")).to_contain_text("/no/such/page")
        # The whole navigation, as on every page.
        expect(page.locator(".topbar nav a")).to_have_text(
            ["Overview", "Jobs", "Queues", "Workers", "Alerts", "Diagnostics"]
        )
        # The icon is our own SVG, and it draws.
        icon = page.locator("link[rel=icon]")
        expect(icon).to_have_attribute("type", "image/svg+xml")
        src = icon.evaluate("link => link.href")
        width = page.evaluate(
            "async src => { const img = new Image(); img.src = src; await img.decode();"
            " return img.naturalWidth; }", src)
        assert width > 0
        served = page.request.get(url(empty_engine, "/favicon.ico"))  # redirected to it
        assert served.ok and served.headers["content-type"].startswith("image/svg+xml")
        # The API keeps its JSON errors, even for a browser.
        response = page.goto(url(empty_engine, "/api/no/such/thing"))
        assert response is not None and response.status == 404
        assert json.loads(page.locator("body").inner_text())["error"]["code"] == "not_found"

    await browse(scenario)


TOKEN = "dashboard-token-0123456789"
PASSWORD = "correct horse battery staple"


@pytest.mark.browser
@pytest.mark.parametrize("with_users", [False, True])
async def test_the_login_page_says_what_to_type(tmp_path: Path, with_users: bool) -> None:
    users = {
        "alice": argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)
    }
    async with serving(tmp_path, api_token=TOKEN, **({"users": users} if with_users else {})) as (
        engine, _
    ):
        def scenario(page: Page) -> None:
            # (The strict-CSP route follows redirects itself: go to the login page straight.)
            page.goto(url(engine, "/login?next=%2Fjobs"))
            # Styled as the dashboard: its stylesheet, top bar and icon.
            expect(page.locator(".topbar .brand")).to_be_visible()
            expect(page.locator(".card.login h1")).to_have_text("Log in")
            expect(page.locator(".card.login")).to_have_css("border-radius", "8px")
            expect(page.locator("link[rel=icon]")).to_have_count(1)
            hint = page.locator("#login-hint")
            expect(hint).to_contain_text("API token")
            expect(hint).to_contain_text("--api-token")
            if with_users:
                expect(page.get_by_label("User name")).to_be_visible()
                expect(hint).to_contain_text("leave the user name blank")
                page.get_by_label("Password").fill("not it")
            else:
                # Nothing to type in a user name field: there is none.
                expect(page.locator("input[name=username]")).to_have_count(0)
                page.get_by_label("API token").fill("not it")
            page.click("button[type=submit]")
            expect(page.locator(".alert.error")).to_have_text(
                "Wrong user name or password." if with_users else "Wrong API token."
            )
            page.get_by_label("Password" if with_users else "API token").fill(TOKEN)
            page.click("button[type=submit]")
            expect(page.locator("h1")).to_have_text("Jobs")
            expect(page.locator(".logout span")).to_have_text("api-token")

        await browse(scenario)


# -- the history behind the charts, on every backend ---------------------------------------


async def test_chart_history_queries(storage: Storage) -> None:
    now = 1_800_000_000.0  # a bucket boundary for 60 s buckets
    events = celery_events("a", "billing.charge_card", "billing", sent=now - 130, worker="w",
                           runtime=1.0, outcome=JobState.FAILED, exception="E()")
    events += celery_events("b", "orders.process_order", "celery", sent=now - 125, worker="w",
                            runtime=1.0, outcome=JobState.COMPLETED)
    events += celery_events("c", "billing.charge_card", "billing", sent=now - 20, worker="w",
                            runtime=1.0, outcome=JobState.FAILED, exception="E()")
    events += celery_events("d", "emails.send_welcome", "emails", sent=now - 7200, worker="w",
                            runtime=1.0, outcome=JobState.FAILED, exception="E()")
    other = "amqp://guest@localhost:5672//"
    samples = [
        QueueSample("billing", "celery", BROKER, now - 120, depth=7),
        QueueSample("billing", "celery", BROKER, now - 60, depth=None),  # the probe could not tell
        QueueSample("billing", "celery", other, now - 60, depth=99),  # same name, other broker
        QueueSample("billing", "celery", BROKER, now - 7200, depth=1),  # before the window
        QueueSample("billing", "celery", BROKER, now, depth=3),
    ]
    with trio.fail_after(30):
        await storage.ingest(events, [])
        await storage.record_queue_samples(samples)
        # a and b finish at now-129 and now-124, c at now-19 (started 50 ms after sent, 1 s
        # runtime). The job that failed two hours ago is out of the window; empty buckets too.
        assert await storage.job_throughput(now - 3600, 60) == [
            (now - 180, 1, 1), (now - 60, 0, 1)
        ]
        assert await storage.top_failing_names(now - 3600, 5) == [("billing.charge_card", 2)]
        assert await storage.top_failing_names(now - 86400, 1) == [("billing.charge_card", 2)]
        assert await storage.queue_depth_history("billing", BROKER, now - 3600) == [
            (now - 120, 7), (now, 3)
        ]


async def test_empty_pages_give_the_loaded_frameworks_advice(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """What to do comes from the framework's plugin (sluice_core/frameworks.py)."""
    pm = PluginManager()
    pm.load(["celery"])
    config = Config(db=f"sqlite:///{tmp_path / 'sluice.db'}", port=0)
    pm.configure(config)
    engine = Engine(config, pm)
    with trio.fail_after(20):
        await nursery.start(engine.run)
    try:
        async with httpx.AsyncClient() as client:
            jobs = (await client.get(url(engine, "/jobs"))).text
            workers = (await client.get(url(engine, "/workers"))).text
    finally:
        engine.stop()
        with trio.fail_after(20):
            await engine.stopped.wait()
    assert "Celery: start your workers with -E (worker_send_task_events)" in jobs
    assert "Load your job framework" not in jobs
    assert "Celery: start the worker with -E" in workers
    assert "celery -A &lt;app&gt; control enable_events" in workers

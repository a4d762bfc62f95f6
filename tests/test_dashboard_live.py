"""The dashboard as a user sees it, in a real Chromium, watching a real Celery worker.

Issue 3's "done": tasks appear live, a failed one is found by searching its
name, its traceback and timeline are read, queue depth and worker health show.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio
from playwright.sync_api import Page, expect

from tests.fixtures.celery_worker import CeleryWorker
from tests.test_actions import TIMEOUT, sluice
from tests.test_dashboard import browse

LIVE = 20_000  # ms: a real worker on a busy machine, then the pipeline


@pytest.mark.browser
async def test_a_user_watches_a_real_worker_from_the_dashboard(
    celery_worker: CeleryWorker, tmp_path: Path
) -> None:
    worker = celery_worker
    idle_queue = f"{worker.queue}-idle"  # no worker consumes it: work piles up there
    with trio.fail_after(TIMEOUT * 2):
        async with sluice(
            tmp_path, worker.broker_url, worker.keyprefix,
            queues=idle_queue, redis_probe_interval=0.5,
        ) as (_, client):
            base = str(client.base_url)

            def scenario(page: Page) -> None:
                page.goto(f"{base}/jobs")
                # Sent while the page is open: the rows arrive over SSE, no reload.
                ok = worker.app.send_task("tests.add", (2, 3), queue=worker.queue)
                failed = worker.app.send_task("tests.fail", ("missing-key",), queue=worker.queue)
                expect(page.locator(f"tr[data-job-id='{ok.id}'] [data-field=state]")).to_have_text(
                    "completed", timeout=LIVE
                )
                failed_row = page.locator(f"tr[data-job-id='{failed.id}']")
                expect(failed_row.locator("[data-field=state]")).to_have_text("failed", timeout=LIVE)

                page.fill("#f-q", "tests.fail")
                page.press("#f-q", "Enter")
                expect(page.locator("#jobs-body tr")).to_have_count(1)
                expect(failed_row).to_contain_text("KeyError")
                failed_row.locator("[data-field=link]").click()

                expect(page.locator("h1 .badge")).to_have_text("failed")
                expect(page.locator("#traceback")).to_contain_text("KeyError: 'missing-key'")
                timeline = page.locator("ol.timeline")
                for event in ("task-sent", "task-received", "task-started", "task-failed"):
                    expect(timeline).to_contain_text(event)

                for i in range(3):
                    worker.app.send_task("tests.add", (i, i), queue=idle_queue)
                page.goto(f"{base}/queues")
                idle = page.locator(f"tr[data-queue='{idle_queue}']")
                # The page refreshes itself when the probe publishes a new depth.
                expect(idle.locator(".depth")).to_have_text("3", timeout=LIVE)

                page.goto(f"{base}/workers")
                expect(page.locator(f"tr[data-worker='{worker.hostname}']")).to_contain_text(
                    re.compile("online")
                )

            await browse(scenario)

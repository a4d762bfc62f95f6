"""The HTML dashboard (README.md, The dashboard): server-rendered pages, live over SSE.

Every page is complete and readable without JavaScript; sluice.js adds live
rows, local times, bulk actions and chart refreshes. Data comes from the
application's reads, through the same filters and shapes as the JSON API
(:mod:`sluice_web.params`, :mod:`sluice_core.serialize`), so the page and the
API never disagree about what a filter means.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from typing import Any
from urllib.parse import urlencode

from markupsafe import Markup
from quart import Blueprint, redirect, render_template, request, url_for
from quart.typing import ResponseReturnValue

from sluice_core import merge
from sluice_core.actions import RETRY, REVOKE, lives_at
from sluice_core.alerting.model import IncidentState
from sluice_core.model import TERMINAL_STATES, Job, JobState
from sluice_core.serialize import (
    event_to_dict,
    iso,
    job_timing,
    job_to_dict,
    queue_to_dict,
    worker_to_dict,
)
from sluice_core.storage import DEAD_LETTERS_KEPT, MAX_PAGE, JobQuery
from sluice_web import charts
from sluice_web.context import application
from sluice_web.errors import ApiError
from sluice_web.params import FILTERS, encode_cursor, query_from_args

# Styles and script are the app's own static files (web/static, under /static/,
# which stays reachable before login).
blueprint = Blueprint("dashboard", __name__, template_folder="templates")

# Chart windows offered on the overview: (label, seconds, bucket seconds).
WINDOWS = {
    "1h": ("Last hour", 3600, 60),
    "6h": ("Last 6 hours", 6 * 3600, 300),
    "24h": ("Last 24 hours", 24 * 3600, 1200),
    "7d": ("Last 7 days", 7 * 86400, 7200),
}
DEFAULT_WINDOW = "1h"
QUEUE_HISTORY_S = 3600
RECENT_RUNS = 10
TOP_FAILING = 8
GAPS_SHOWN = 5  # the latest times Sluice did not hear a source (GET /api/gaps: more)
# Quick time ranges on the job list, as links that set ``since``.
QUICK_RANGES = (("15 min", 900), ("1 h", 3600), ("24 h", 86400), ("7 d", 7 * 86400))
# The job list counts its matches exactly up to this many, then says "1,000+": counting
# stops one row past it, so a filter matching millions of jobs costs no more than that.
COUNT_AT_MOST = 1_000
DEAD_LETTERS_SHOWN = 200  # the newest; every one is also in the database's dead_letters table
FIRING_SHOWN = 10  # firing incidents on the overview; the Alerts page lists them all


# -- template helpers ---------------------------------------------------------


@blueprint.app_template_filter("utc")
def utc_time(value: str | float | None, precise: bool = False) -> Markup:
    """A ``<time>`` element in UTC; sluice.js shows it in the viewer's timezone.
    ``precise``: with milliseconds, where steps a few ms apart must be told apart (a
    job's timeline and timing)."""
    text = iso(value) if isinstance(value, int | float) else value
    if text is None or text == "":
        return Markup('<span class="muted">—</span>')
    when = dt.datetime.fromisoformat(text)
    shown = when.strftime("%Y-%m-%d %H:%M:%S")
    if precise:
        shown += f".{when.microsecond // 1000:03d}"
    return Markup('<time datetime="{}"{}>{} UTC</time>').format(
        when.isoformat(), Markup(" data-precise") if precise else "", shown
    )


@blueprint.app_template_filter("duration")
def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"


@blueprint.app_template_filter("age")
def age(seconds: float) -> str:
    """How long ago, coarse: a heartbeat's age needs no milliseconds."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h ago"
    return f"{seconds // 86400:.0f} d ago"


@blueprint.app_template_filter("loadavg")
def loadavg(values: list[float] | None) -> str:
    return " · ".join(f"{v:.2f}" for v in values) if values else "—"


@blueprint.app_template_filter("percent")
def percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{fraction * 100:.1f}%"


@blueprint.app_context_processor
async def _globals() -> dict[str, Any]:
    return {
        # The live stream resumes from what the page was rendered with.
        "live_from": application().feed.expect_subscriber(),
        "states": [str(state) for state in JobState],
        "nav": (
            ("dashboard.overview", "Overview"),
            ("dashboard.jobs", "Jobs"),
            ("dashboard.queues", "Queues"),
            ("dashboard.workers", "Workers"),
            ("alerts.incidents_page", "Alerts"),
            ("dashboard.diagnostics", "Diagnostics"),
        ),
        # What their plugins say to do where nothing shows yet (sluice_core/frameworks.py).
        "frameworks": application().frameworks(),
    }


# -- pages ----------------------------------------------------------------------


@blueprint.get("/")
async def overview() -> str:
    reads = application().reads
    window = request.args.get("window", DEFAULT_WINDOW)
    if window not in WINDOWS:
        window = DEFAULT_WINDOW
    label, span, bucket = WINDOWS[window]
    now = time.time()
    since = now - span
    buckets = _every_bucket(await reads.job_throughput(since, bucket), since, now, bucket)
    completed = [(ts, float(c)) for ts, c, _ in buckets]
    failed = [(ts, float(f)) for ts, _, f in buckets]
    failure_rate = [(ts, f / (c + f) * 100) for ts, c, f in buckets if c + f]
    per = "minute" if bucket == 60 else f"{bucket // 60} minutes"
    throughput_chart = charts.line_chart(
        [
            charts.Series("Completed", completed, "series-ok"),
            charts.Series("Failed", failed, "series-bad"),
        ],
        since=since,
        until=now,
        title=f"Jobs finished per {per}, {label.lower()}",
    )
    failure_chart = charts.line_chart(
        [charts.Series("Failure rate", failure_rate, "series-bad")],
        since=since,
        until=now,
        title=f"Failure rate, {label.lower()}",
        y_format=lambda v: f"{v:.0f}%",
        y_max=max(charts.nice_ceiling(max((v for _, v in failure_rate), default=0)), 10),
    )
    top = await reads.top_failing_names(since, TOP_FAILING)
    most = max((count for _, count in top), default=1)
    counts = await reads.count_jobs_by_state()
    workers = await reads.list_workers()
    stuck = await reads.list_jobs(JobQuery(stuck=True, limit=MAX_PAGE))
    return await render_template(
        "overview.html",
        window=window,
        windows=WINDOWS,
        throughput_chart=throughput_chart,
        failure_chart=failure_chart,
        finished=sum(c + f for _, c, f in buckets),
        failed=sum(f for _, _, f in buckets),
        top_failing=[(name, count, charts.meter(count / most, css_class="series-bad"))
                     for name, count in top],
        counts=counts,
        total_jobs=sum(counts.values()),
        stuck=len(stuck.jobs),
        stuck_max=MAX_PAGE,
        workers_online=sum(1 for w in workers if w.status == "online"),
        workers_total=len(workers),
        queues=[queue_to_dict(queue) for queue in await reads.list_queues(now)],
        gaps=await reads.list_gaps(GAPS_SHOWN),
        firing=await application().alerts.incidents(IncidentState.FIRING, FIRING_SHOWN + 1),
        firing_shown=FIRING_SHOWN,
    )


@blueprint.get("/jobs")
async def jobs() -> tuple[str, int]:
    form = {name: request.args.get(name, "") for name in FILTERS}
    paged = "cursor" in request.args
    reads = application().reads
    jobs: list[dict[str, Any]] = []
    next_url = error = total = None
    counted_at = time.time()
    try:
        query = query_from_args(request.args)
        page = await reads.list_jobs(query)
        total = await reads.count_jobs(query, COUNT_AT_MOST + 1)
    except ApiError as exc:
        error = exc.message
    else:
        jobs = [job_to_dict(job) for job in page.jobs]
        if page.next_cursor is not None:
            cursor = encode_cursor(page.next_cursor)
            next_url = "?" + urlencode({**request.args.to_dict(), "cursor": cursor})
    html = await render_template(
        "jobs.html",
        form=form,
        jobs=jobs,
        error=error,
        next_url=next_url,
        first_url="?" + urlencode({k: v for k, v in form.items() if v}),
        filtered=any(form.values()),
        paged=paged,
        total=total,
        total_text=None if total is None else _count_text(total),
        count_at_most=COUNT_AT_MOST,
        counted_at_ms=round(counted_at * 1000),
        quick_ranges=_quick_ranges(),
        # The row sluice.js clones for a job that arrives live.
        blank_job=job_to_dict(Job(id="", framework="")),
        # Live rows only on the first page: later pages are a fixed slice of history.
        live=not paged and error is None,
        # The rows a live page keeps, and so the most a window of its stream sends.
        page_size=query.limit if error is None else None,
    )
    return html, 400 if error else 200


@blueprint.get("/jobs/<job_id>")
async def job(job_id: str) -> str | tuple[str, int]:
    reads = application().reads
    found = await reads.get_job(job_id)
    if found is None:
        return await render_template(
            "not_found.html",
            title="No such job",
            message=f"Sluice has no events for a job with id {job_id}: it may not have been "
            "sent yet, its events may not have reached Sluice, or retention removed it.",
        ), 404
    stored = await reads.job_events(job_id)
    events = merge.timeline(stored)
    timing = job_timing(found)
    recent: list[dict[str, Any]] = []
    if found.name:
        page = await reads.list_jobs(JobQuery(name=found.name, limit=RECENT_RUNS + 1))
        recent = [job_to_dict(j) for j in page.jobs if j.id != job_id][:RECENT_RUNS]
    return await render_template(
        "job.html",
        job=job_to_dict(found),
        events=[event_to_dict(event) for event in events],
        timing=timing,
        timing_bar=_timing_bar(timing),
        recent=recent,
        terminal=found.state in TERMINAL_STATES,
        # From the events as stored (a merged timeline's reports carry other sources'
        # stamps): as GET /api/jobs/{id} does.
        location=lives_at(stored),
        # Its handler's own actions, beside retry and revoke (which have their dialogs).
        actions=[
            spec.to_dict()
            for spec in await application().actions.offered(found)
            if spec.name not in (RETRY, REVOKE)
        ],
    )


@blueprint.get("/queues")
async def queues() -> str:
    reads = application().reads
    now = time.time()
    since = now - QUEUE_HISTORY_S
    rows = []
    series = []
    for index, queue in enumerate(await reads.list_queues(now)):
        # A queue known only from jobs has no probe samples, hence no broker.
        history = (
            await reads.queue_depth_history(queue.name, queue.broker, since)
            if queue.broker is not None
            else []
        )
        points = [(ts, float(depth)) for ts, depth in history]
        series.append(charts.Series(queue.name, points, f"series-{index % 8}"))
        rows.append(
            (
                queue_to_dict(queue),
                charts.sparkline(points, since=since, until=now,
                                 title=f"Depth of {queue.name} over the last hour"),
            )
        )
    depth_chart = (
        charts.line_chart(
            series, since=since, until=now, title="Queue depth, last hour", width=1200, height=240
        )
        if series
        else None
    )
    return await render_template("queues.html", queues=rows, depth_chart=depth_chart)


@blueprint.get("/workers")
async def workers() -> str:
    now = time.time()
    rows = [
        {
            **worker_to_dict(view.worker, task_events=view.task_events, advice=view.advice),
            "age_s": (
                None if view.worker.last_heartbeat is None else now - view.worker.last_heartbeat
            ),
        }
        for view in await application().workers()
    ]
    rows.sort(key=lambda w: (w["status"] != "online", w["hostname"]))
    return await render_template("workers.html", workers=rows)


@blueprint.get("/diagnostics")
async def diagnostics() -> str:
    """What Sluice refused or corrected of what it was sent, and what storage refused."""
    found = await application().diagnostics(DEAD_LETTERS_SHOWN)
    return await render_template(
        "diagnostics.html",
        malformed=[(m.source, m.reason, m.count, m.meaning) for m in found.malformed],
        letters=found.dead_letters,
        kept=DEAD_LETTERS_KEPT,
        dead_lettered=found.dead_lettered,
        retention=found.retention,
    )


@blueprint.get("/favicon.ico")
async def favicon() -> ResponseReturnValue:
    # Browsers ask for it where no page links an icon: the API's JSON, /metrics.
    return redirect(url_for("static", filename="favicon.svg"))


# -- helpers --------------------------------------------------------------------


def _timing_bar(timing: dict[str, float | None]) -> Markup | None:
    parts = [
        (f"Queued {duration(timing['queued_s'])}", timing["queued_s"] or 0.0, "series-wait"),
        (f"Runtime {duration(timing['runtime_s'])}", timing["runtime_s"] or 0.0, "series-run"),
    ]
    if not any(value for _, value, _ in parts):
        return None
    return charts.stacked_bar(parts)


def _every_bucket(
    buckets: list[tuple[float, int, int]], since: float, until: float, bucket_s: float
) -> list[tuple[float, int, int]]:
    """Storage leaves out empty buckets; a chart must show them as zeros, not bridge them."""
    counts = {round(start / bucket_s): (done, failed) for start, done, failed in buckets}
    return [
        (n * bucket_s, *counts.get(n, (0, 0)))
        for n in range(math.floor(since / bucket_s), math.floor(until / bucket_s) + 1)
    ]


def _count_text(total: int) -> str:
    return f"{COUNT_AT_MOST:,}+" if total > COUNT_AT_MOST else f"{total:,}"


def _quick_ranges() -> list[tuple[str, str]]:
    """Link targets for "last N": the current filters with ``since`` set, ``until`` cleared."""
    now = time.time()
    kept = {k: v for k, v in request.args.items() if k in FILTERS and k not in ("since", "until")}
    return [
        (label, "?" + urlencode({**kept, "since": iso(now - seconds)}))
        for label, seconds in QUICK_RANGES
    ]


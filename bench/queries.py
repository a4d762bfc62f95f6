"""Queries: the job list, its filters and free-text search over a large history.

The history is the generator's stream (pre-built, spread over the last
``SPAN_DAYS`` days), decoded by Sluice's own Celery normalizer and written
through the storage backend's ``ingest`` in large batches: the same code path
as live ingest, minus the broker. The queries then go to a real ``sluice run``
on that database, over HTTP, as the dashboard sends them.

Ten million jobs through ingest would take PostgreSQL hours here: past
``INGESTED_JOBS_MAX`` jobs, that many are ingested and the jobs table is then
copied in SQL (:func:`replicate`) into earlier months of history, until it holds
the size asked for. The list queries read jobs only; the overview's counts are
filled again from the copied jobs.
"""

from __future__ import annotations

import datetime as dt
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from bench.generator import EventStream, amqp_body
from bench.latency import percentile
from bench.services import Sluice, database, unique

SPAN_DAYS = 30
JOBS_PER_BATCH = 5_000
INGESTED_JOBS_MAX = 1_000_000  # PostgreSQL: more is copied in SQL (replicate)

# A copy's columns, in JOB_COLUMNS order: a new id and email, times moved on.
_SHIFTED = {"sent_at", "received_at", "started_at", "finished_at", "created_at", "updated_at",
            "fold_ts"}


@attrs.define
class QueryTiming:
    query: str
    params: dict[str, str]
    rows: int
    p50_ms: float
    p95_ms: float


@attrs.define
class QueriesRun:
    storage: str
    jobs: int
    fill_s: float
    fill_rate: float  # events/s written while filling
    ingested_jobs: int  # jobs written through ingest; the rest were copied in SQL
    startup_s: float  # sluice run on the filled database, to /healthz 200
    timings: list[QueryTiming]
    pages: list[QueryTiming]  # the pages a replica serves most; rows: KiB
    rest_rss_mb: float  # idle on that history, once every query was served


async def fill(
    db: str, jobs: int, progress: Callable[[int], None] | None = None, *,
    span_days: float = SPAN_DAYS, jobs_per_batch: int = JOBS_PER_BATCH,
) -> int:
    """Write ``jobs`` jobs (all their events), spread over the last ``span_days`` in
    batches of ``jobs_per_batch`` a generator tick apart, through the storage backend;
    return the events."""
    from sluice_celery.events import KIND_AMQP, normalize_batch
    from sluice_core.config import Config
    from sluice_core.model import RawBatch
    from sluice_core.plugins import PluginManager

    storage = PluginManager().storage(Config(db=db))
    await storage.open()
    span = span_days * 86400.0
    batches = max(1, -(-jobs // jobs_per_batch))
    stream = EventStream(seed=7, start=time.time() - span, tick_s=span / (batches + 1))
    events = 0
    try:
        done = 0
        while True:
            n = min(jobs_per_batch, jobs - done)
            messages = stream.tick(n) if n else stream.drain()
            done += n
            batch = RawBatch(
                kind=KIND_AMQP,
                source="bench",
                messages=[(m.routing_key, amqp_body(m)) for m in messages],
                received_at=time.time(),
            )
            normalized = normalize_batch(batch)
            if hasattr(storage, "clock") and normalized.job_events:
                # PostgreSQL: each batch stored in the day partition of its history's time.
                at = min(e.timestamp for e in normalized.job_events)
                storage.clock = lambda at=at: at
            await storage.ingest(normalized.job_events, normalized.worker_events)
            events += len(normalized.job_events)
            if progress:
                progress(done)
            if not n:
                return events
    finally:
        await storage.aclose()


def replicate(db: str, times: int) -> None:
    """PostgreSQL: copy the jobs table ``times - 1`` times, each copy a span earlier.

    Copies get new ids, new emails in their args (so a search for one finds one
    job) and earlier seqs (down to negative ones) and times, so the list order still
    follows time and the newest job is still the newest ingested: a copy in the future
    would sit in every window that reads up from a time (the overview's, the queue
    rates'), as no real job does. The
    table's indexes are dropped during the copy and built again after, as a
    bulk load does, from their own definitions.
    """
    import psycopg

    from sluice_storage.common import JOB_COLUMNS, rollups_from_jobs

    with psycopg.connect(db, autocommit=True) as conn:
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes"
            " WHERE tablename = 'jobs' AND indexname <> 'jobs_pkey'"
        ).fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        last_seq, first, last = conn.execute(
            "SELECT max(seq), min(created_at), max(created_at) FROM jobs"
        ).fetchone()
        span = last - first
        for k in range(1, times):
            picks = []
            for column in JOB_COLUMNS:
                if column == "id":
                    picks.append(f"md5(id || ':{k}')::uuid::text")
                elif column == "args":
                    picks.append(f"replace(args, '@example.com', '.c{k}@example.com')")
                elif column in _SHIFTED:
                    picks.append(f"{column} - {k} * {span!r}")
                else:
                    picks.append(column)
            # Each copy in its source's day partition (migration 0013).
            conn.execute(
                f"INSERT INTO jobs (seq, day, {', '.join(JOB_COLUMNS)})"
                f" SELECT seq - {k} * {last_seq}, day, {', '.join(picks)} FROM jobs WHERE seq > 0"
            )
        conn.execute("SET maintenance_work_mem = '1GB'")
        for _, definition in indexes:
            conn.execute(definition)
        conn.execute("SELECT setval(pg_get_serial_sequence('jobs', 'seq'), max(seq)) FROM jobs")
        # The overview's counts (migration 0009), which ingest keeps, of the copies too.
        for statement in rollups_from_jobs("day"):
            conn.execute(statement)
        conn.execute("VACUUM ANALYZE jobs")
        conn.execute("VACUUM ANALYZE job_states, job_finished, job_failures")


def _sample_values(client: httpx.Client) -> dict[str, str]:
    """Real values from the history to filter and search for."""
    jobs = client.get("/api/jobs", params={"limit": 500}).json()["jobs"]
    failed = next(j for j in jobs if j["state"] == "failed")
    newest = max(j["created_at"] for j in jobs)
    return {
        "id_prefix": jobs[-1]["id"][:8],
        "worker": jobs[0]["worker"] or "",
        "email": str(jobs[len(jobs) // 2]["args"]).split("'")[1],  # (n, 'user<n>@example.com')
        "exception_word": "payments-api" if "payments-api" in failed["exception"] else "timed out",
        "newest": newest,
        "job_id": failed["id"],
    }


def queries(values: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    # A day of history a day back: boundaries away from the newest job. And a day a
    # month back (the history spans SPAN_DAYS), behind a month of newer jobs.
    since, until = _days_before(values["newest"], 2), _days_before(values["newest"], 1)
    old_since, old_until = _days_before(values["newest"], 29), _days_before(values["newest"], 28)
    return [
        ("list newest 50", {}),
        ("list 500", {"limit": "500"}),
        ("page 2 (cursor)", {"cursor": "<next>"}),
        ("state=failed", {"state": "failed"}),
        ("state=failed,retrying", {"state": "failed,retrying"}),
        ("name=", {"name": "billing.charge_card"}),
        ("queue=", {"queue": "mail"}),
        ("worker=", {"worker": values["worker"]}),
        ("name + state", {"name": "billing.charge_card", "state": "failed"}),
        ("since/until 1 day", {"since": since, "until": until}),
        ("since/until, a month back", {"since": old_since, "until": old_until}),
        ("q=id prefix", {"q": values["id_prefix"]}),
        ("q=text in args", {"q": values["email"]}),
        ("q=text in exception", {"q": values["exception_word"]}),
        ("q=no match", {"q": "no-such-text-anywhere"}),
    ]


def _days_before(iso: str, days: int) -> str:
    return (dt.datetime.fromisoformat(iso) - dt.timedelta(days=days)).isoformat()


def pages(values: dict[str, str]) -> list[tuple[str, str, dict[str, str]]]:
    """The pages a replica serves most: ``(label, path, parameters)``."""
    return [
        ("overview, 1 h", "/", {"window": "1h"}),
        ("overview, 24 h", "/", {"window": "24h"}),
        ("overview, 7 d", "/", {"window": "7d"}),
        ("queues page", "/queues", {}),
        ("GET /api/queues", "/api/queues", {}),
        ("workers page", "/workers", {}),
        ("GET /api/workers", "/api/workers", {}),
        ("jobs page", "/jobs", {}),
        ("a job's page", f"/jobs/{values['job_id']}", {}),
        ("GET /api/jobs/{id}", f"/api/jobs/{values['job_id']}", {}),
        ("GET /metrics", "/metrics", {}),
    ]


def time_queries(base: str, repeats: int) -> tuple[list[QueryTiming], list[QueryTiming]]:
    """Each query of the job list, then each page, ``repeats`` times, in rounds of every
    one: a moment the shared machine is busy then falls on all alike, not on a few
    samples of one. A page's ``rows`` is its size in KiB."""
    with httpx.Client(base_url=base, timeout=120.0) as client:
        values = _sample_values(client)
        next_cursor = client.get("/api/jobs").json()["next_cursor"]
        planned = [
            (label, "/api/jobs",
             {"cursor": next_cursor} if params.get("cursor") == "<next>" else params)
            for label, params in queries(values)
        ]
        listed = len(planned)
        planned += pages(values)
        samples: list[list[float]] = [[] for _ in planned]
        rows = [0] * len(planned)
        for _ in range(repeats):
            for i, (_, path, params) in enumerate(planned):
                t0 = time.perf_counter()
                response = client.get(path, params=params)
                samples[i].append((time.perf_counter() - t0) * 1000)
                response.raise_for_status()
                rows[i] = (len(response.json()["jobs"]) if i < listed
                           else len(response.content) // 1024)
    timings = [
        QueryTiming(label, params, n, statistics.median(taken), percentile(taken, 95))
        for (label, _, params), n, taken in zip(planned, rows, samples, strict=True)
    ]
    for timing, (_, path, _) in zip(timings[listed:], planned[listed:], strict=True):
        timing.params = {"path": path, **timing.params}
    return timings[:listed], timings[listed:]


def postgres_history(db: str, jobs: int, log: Callable[[str], Any] = print) -> None:
    """A PostgreSQL history of ``jobs`` jobs in ``db``, as :func:`run` makes it: up to
    ``INGESTED_JOBS_MAX`` through ingest, the rest copied in SQL (:func:`replicate`)."""
    ingested = min(jobs, INGESTED_JOBS_MAX)
    trio.run(fill, db, ingested)
    if ingested < jobs:
        log(f"    copying the {ingested:,} jobs into {jobs:,} in SQL")
        replicate(db, -(-jobs // ingested))


def run(*, storage: str, jobs: int, repeats: int, broker: str, run_dir: Path,
        log: Callable[[str], Any] = print) -> QueriesRun:
    with database(storage, run_dir) as db:
        t0 = time.monotonic()
        last = [t0]

        ingested = jobs if storage == "sqlite" else min(jobs, INGESTED_JOBS_MAX)

        def progress(done: int) -> None:
            if time.monotonic() - last[0] > 30:
                last[0] = time.monotonic()
                log(f"    filling {storage}: {done:,}/{ingested:,} jobs")

        events = trio.run(fill, db, ingested, progress)
        fill_s = time.monotonic() - t0
        if ingested < jobs:
            log(f"    copying the {ingested:,} jobs into {jobs:,} in SQL")
            replicate(db, -(-jobs // ingested))
        sluice = Sluice(broker, db, run_dir, unique("bench") + ":")
        try:
            timings, page_timings = time_queries(sluice.base, repeats)
            time.sleep(1.0)  # at rest: the last request and the gauges' refresh are done
            rest_rss_mb = sluice.rss_mb()
        finally:
            sluice.stop()
    return QueriesRun(storage, jobs, fill_s, events / fill_s, ingested, sluice.startup_s,
                      timings, page_timings, rest_rss_mb)

"""Replica load: how many API requests a second one ``sluice web`` replica serves.

One replica (``sluice web --db postgresql://...``, no broker: it reads what agents
store) on a large history, then ``clients`` concurrent API clients, each an httpx
``AsyncClient`` under trio with one kept-alive connection, sending requests back to
back for a fixed time over the reads a replica serves most, in :data:`MIX`'s
proportions: the job list's first page and a filtered one, a job by id (ids the list
gave), the queues, the workers and ``/healthz`` (load balancers' probes). Requests in
the first :data:`WARM_UP_S` seconds are not counted.

The clients run in this process, on the same two cores as the replica and its
PostgreSQL: the replica's CPU (from ``/proc``) is reported beside the rate.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from bench.latency import percentile
from bench.services import Service, _sluice_argv, free_port
from bench.sse import cpu_seconds

WARM_UP_S = 2.0
ID_POOL = 500  # job ids drawn from the newest jobs, and from one page of failed ones
# (label, weight): a dashboard's list polls and job pages, API scripts, probes.
MIX = (
    ("GET /api/jobs", 30),
    ("GET /api/jobs?state=failed", 15),
    ("GET /api/jobs/{id}", 25),
    ("GET /api/queues", 10),
    ("GET /api/workers", 10),
    ("GET /healthz", 10),
)


@attrs.frozen
class Latencies:
    label: str
    requests: int
    rate: float  # a second, over the measured time
    p50_ms: float
    p95_ms: float
    p99_ms: float


@attrs.define
class LoadRun:
    clients: int
    seconds: float  # measured (after the warm-up)
    load: str  # load average (1/5/15 min) at the start
    overall: Latencies
    endpoints: list[Latencies]
    errors: int  # responses other than 200, and transport errors
    replica_cpu_pct: float  # of one core, over the measured time


class Replica(Service):
    """``sluice web`` on ``db``, as docs/deploy.md runs it (without a broker: this one
    only reads)."""

    name = "sluice-web"

    def __init__(self, db: str, run_dir: Path) -> None:
        port = free_port()
        argv = _sluice_argv("web", "", db, "", ["--port", str(port), "--log-level", "WARNING"])
        super().__init__(argv, port, run_dir / f"sluice-web-{port}.log")
        self.startup_s = self.wait_http("/healthz")


def known_ids(base: str) -> list[str]:
    """Ids of real jobs: the newest, and failed ones (whose pages people open)."""
    with httpx.Client(base_url=base, timeout=60.0) as client:
        ids = []
        pages: list[dict[str, str | int]] = [{"limit": ID_POOL},
                                             {"limit": ID_POOL, "state": "failed"}]
        for params in pages:
            response = client.get("/api/jobs", params=params)
            response.raise_for_status()
            ids += [job["id"] for job in response.json()["jobs"]]
    if not ids:
        raise RuntimeError(f"the database behind {base} has no jobs")
    return ids


def _request(label: str, ids: list[str], rng: random.Random) -> tuple[str, dict[str, str]]:
    if label == "GET /api/jobs/{id}":
        return f"/api/jobs/{rng.choice(ids)}", {}
    if label == "GET /api/jobs?state=failed":
        return "/api/jobs", {"state": "failed"}
    return label.removeprefix("GET "), {}


async def _clients(
    base: str, clients: int, duration_s: float, ids: list[str]
) -> tuple[list[tuple[str, float, float]], int]:
    """Every request's (label, end time, seconds), and the errors."""
    labels = [label for label, _ in MIX]
    weights = [weight for _, weight in MIX]
    samples: list[tuple[str, float, float]] = []
    errors = 0
    deadline = time.monotonic() + duration_s

    async def client(seed: int) -> None:
        nonlocal errors
        rng = random.Random(seed)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=base, timeout=30.0, limits=limits) as http:
            while time.monotonic() < deadline:
                label = rng.choices(labels, weights)[0]
                path, params = _request(label, ids, rng)
                t0 = time.monotonic()
                try:
                    response = await http.get(path, params=params)
                    await response.aread()
                    ok = response.status_code == 200
                except httpx.TransportError:
                    ok = False
                t1 = time.monotonic()
                if ok:
                    samples.append((label, t1, t1 - t0))
                else:
                    errors += 1

    async with trio.open_nursery() as nursery:
        for seed in range(clients):
            nursery.start_soon(client, seed)
    return samples, errors


def _latencies(label: str, taken: list[float], seconds: float) -> Latencies:
    ms = [s * 1000 for s in taken]
    return Latencies(label, len(ms), len(ms) / seconds, statistics.median(ms),
                     percentile(ms, 95), percentile(ms, 99))


def run(*, db: str, clients: int, duration_s: float, run_dir: Path) -> LoadRun:
    load = "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    replica = Replica(db, run_dir)
    try:
        ids = known_ids(replica.base)
        started = time.monotonic()
        measured_from = started + WARM_UP_S
        cpu_at: list[tuple[float, float]] = []

        async def main() -> tuple[list[tuple[str, float, float]], int]:
            async def sample_cpu() -> None:
                await trio.sleep_until(measured_from)
                cpu_at.append((time.monotonic(), cpu_seconds(replica.proc.pid)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample_cpu)
                result = await _clients(replica.base, clients, WARM_UP_S + duration_s, ids)
            cpu_at.append((time.monotonic(), cpu_seconds(replica.proc.pid)))
            return result

        samples, errors = trio.run(main)
        ended = max(t for _, t, _ in samples)
    finally:
        replica.stop()
    counted = [(label, s) for label, t, s in samples if t >= measured_from]
    seconds = ended - measured_from
    (t0, c0), (t1, c1) = cpu_at
    by_label: dict[str, list[float]] = {label: [] for label, _ in MIX}
    for label, s in counted:
        by_label[label].append(s)
    return LoadRun(
        clients=clients,
        seconds=seconds,
        load=load,
        overall=_latencies("all", [s for _, s in counted], seconds),
        endpoints=[_latencies(label, taken, seconds) for label, taken in by_label.items()
                   if taken],
        errors=errors,
        replica_cpu_pct=100 * (c1 - c0) / (t1 - t0),
    )


def medians(runs: list[LoadRun]) -> tuple[Latencies, list[Latencies]]:
    """Per endpoint and overall, the median over runs of each figure."""
    med = statistics.median

    def merged(each: list[Latencies]) -> Latencies:
        return Latencies(each[0].label, int(med(x.requests for x in each)),
                         med(x.rate for x in each), med(x.p50_ms for x in each),
                         med(x.p95_ms for x in each), med(x.p99_ms for x in each))

    return merged([r.overall for r in runs]), [
        merged([e for r in runs for e in r.endpoints if e.label == label])
        for label in [e.label for e in runs[0].endpoints]
    ]


def prepare(db: str) -> int:
    """ANALYZE the history, and count its jobs.

    This machine's PostgreSQL runs without autovacuum, and a filled history's
    job_events may never have been analyzed: a job's events were then planned as
    21,000 rows (a parallel scan, 8 ms instead of 0.4), which no production database,
    analyzed as it grows, would plan."""
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("ANALYZE")
        row: Any = conn.execute("SELECT count(*) FROM jobs").fetchone()
    return int(row[0])

"""``python -m bench`` (``make bench``): Sluice's benchmarks, Flower alongside.

Runs the chosen scenarios (all by default), prints each table as it is done
and writes them, with the machine and the command, to bench/RESULTS.md.
``--quick`` is a smoke run of a few seconds per scenario and writes nothing
unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from bench import (
    alerting,
    ha,
    ingest,
    latency,
    profile,
    queries,
    replica_load,
    report,
    retention,
    sse,
    startup,
)
from bench import storage as storage_alone
from bench.generator import Plan
from bench.services import BENCH, REDIS_URL, postgres_database, rabbitmq_vhost

SCENARIOS = ("burst", "steady", "rabbitmq", "latency", "alerting", "queries", "startup")
# Run only when named:
OPT_IN = ("profile", "storage", "sse-viewers", "sse-replica", "ha-ingest", "retention",
          "alerting-cost", "replica-load")


@attrs.frozen
class Sizes:
    burst_events: int
    steady_rates: tuple[int, ...]
    steady_s: float
    latency_rate: int
    latency_s: float
    viewers: int  # live dashboards at the latency rate (sse-viewers)
    rabbitmq_events: int
    history_jobs: dict[str, int]  # per storage
    query_repeats: int
    startup_repeats: int
    repeats: int  # of the cheap ingest runs (bursts)
    alert_s: float  # of failing-job probes per alerting latency run
    alert_cost_s: float  # of evaluation measured per alerting-cost run
    stall_s: float  # a consumer whose count has not moved this long has stopped (a PostgreSQL
    # transaction can take several seconds while the machine is loaded: 5 s once cut a run short)


FULL = Sizes(
    burst_events=400_000,
    steady_rates=(12_000, 50_000),
    steady_s=20.0,
    latency_rate=5_000,
    latency_s=20.0,
    viewers=50,
    rabbitmq_events=100_000,
    history_jobs={"sqlite": 100_000, "postgresql": 100_000},
    # A nearest-rank p95 of 20 samples is their maximum: one slow moment of the
    # shared machine. Of 100, it is the fifth slowest.
    query_repeats=100,
    startup_repeats=5,
    repeats=3,
    alert_s=60.0,
    alert_cost_s=180.0,
    stall_s=15.0,
)
QUICK = Sizes(
    burst_events=20_000,
    steady_rates=(12_000,),
    steady_s=3.0,
    latency_rate=2_000,
    latency_s=3.0,
    viewers=10,
    rabbitmq_events=5_000,
    history_jobs={"sqlite": 5_000},
    query_repeats=5,
    startup_repeats=2,
    repeats=1,
    alert_s=10.0,
    alert_cost_s=20.0,
    stall_s=3.0,
)
# The targets: a million jobs on SQLite, ten million on PostgreSQL.
FULL_HISTORY = {"sqlite": 1_000_000, "postgresql": 10_000_000}


@attrs.define
class Section:
    title: str
    text: str  # Markdown: notes and a table


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        sizes = QUICK if args.quick else FULL
        if args.full_size:
            sizes = attrs.evolve(sizes, history_jobs=FULL_HISTORY)
        if args.repeats:
            sizes = attrs.evolve(sizes, repeats=args.repeats)
        self.sizes = sizes
        self.storages = args.storage or (["sqlite"] if args.quick else ["sqlite", "postgresql"])
        self.run_dir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
        self.sections: list[Section] = []
        # The headline figures against the targets: (what, target, Sluice, Flower, met)
        self.summary: list[tuple[str, str, str, str, str]] = []

    def log(self, text: str) -> None:
        print(text, flush=True)

    def headline(self, what: str, target: str, sluice: str, flower: str, met: bool | None) -> None:
        verdict = "n/a" if met is None else ("yes" if met else "**no**")
        self.summary.append((what, target, sluice, flower, verdict))

    def add(self, title: str, notes: str, table: str) -> None:
        section = Section(title, f"{notes}\n\n{table}" if notes else table)
        self.sections.append(section)
        self.log(f"\n## {title}  (load {report.load()})\n{section.text}\n")

    # -- ingest ------------------------------------------------------------

    def _ingest_rows(
        self, label: str, runs: list[ingest.IngestRun]
    ) -> list[list[object]]:
        """One row per consumer: medians over the runs."""
        rows: list[list[object]] = []
        first = runs[0]
        consumers = list(first.outcomes)
        med = statistics.median
        for name in consumers:
            outs = [r.outcomes[name] for r in runs]
            ratio = ""
            if name == "sluice" and "flower" in first.outcomes:
                flower_taken = med(r.outcomes["flower"].taken for r in runs)
                ratio = f"{med(o.taken for o in outs) / max(flower_taken, 1):.1f}x"
            rows.append([
                label, first.storage if name == "sluice" else "(memory)", name,
                int(med(r.published for r in runs)),
                int(med(o.taken for o in outs)),
                f"{med(o.lost_pct for o in outs):.1f}%",
                med(o.rate for o in outs),
                med(o.catch_up_s for o in outs),
                med(o.peak_rss_mb for o in outs),
                ratio,
            ])
        return rows

    INGEST_HEADERS = ("scenario", "storage", "consumer", "events published", "events taken in",
                      "lost", "ingest rate (ev/s)", "catch-up (s)", "peak RSS (MB)",
                      "Sluice/Flower")

    def _ingest(
        self, plan: Plan, storage: str, repeats: int, extra: Sequence[str] = (),
        together: bool = True,
    ) -> list[ingest.IngestRun]:
        runs = []
        for i in range(repeats):
            result = ingest.run(
                plan, storage=storage, run_dir=self.run_dir, flower=not self.args.no_flower,
                together=together, stall_s=self.sizes.stall_s, sluice_extra=list(extra),
            )
            runs.append(result)
            self.log(
                f"    run {i + 1}/{repeats} ({storage}, load {report.load()}): published "
                f"{result.published:,} task events in {result.publish_s:.2f}s "
                f"({result.publish_rate:,.0f}/s); "
                + "; ".join(
                    f"{o.consumer} took {o.taken:,} (lost {o.lost_pct:.1f}%, "
                    f"{o.rate:,.0f}/s, catch-up {o.catch_up_s:.1f}s, {o.peak_rss_mb:.0f} MB)"
                    for o in result.outcomes.values()
                )
                + f"; Sluice read {result.sluice_messages:,}/{result.messages:,} messages, "
                f"dropped {result.sluice_dropped:,}"
            )
        return runs

    def _ingest_headline(
        self,
        what: str,
        target: str,
        runs: list[ingest.IngestRun],
        show: Callable[[ingest.Outcome], str],
        met: Callable[[ingest.Outcome], bool],
    ) -> None:
        """The median run (by Sluice's events taken in) against the target."""
        ordered = sorted(runs, key=lambda r: r.outcomes["sluice"].taken)
        median = ordered[len(ordered) // 2]
        sluice = median.outcomes["sluice"]
        flower = median.outcomes.get("flower")
        self.headline(what, target, show(sluice), show(flower) if flower else "not run",
                      met(sluice))

    def burst(self) -> None:
        n = self.sizes.burst_events
        rows = []
        for storage in self.storages:
            plan = Plan(broker=REDIS_URL, events=n, publishers=self.args.publishers)
            runs = self._ingest(plan, storage, self.sizes.repeats)
            rows += self._ingest_rows(f"burst {n:,}", runs)
            self._ingest_headline(f"burst of {n:,}, lost ({storage})", "0%", runs,
                                  lambda o: f"{o.lost_pct:.1f}%", lambda o: o.lost == 0)
            self._ingest_headline(f"burst of {n:,}, peak RSS ({storage})", "< 300 MB", runs,
                                  lambda o: f"{o.peak_rss_mb:,.0f} MB",
                                  lambda o: o.peak_rss_mb < 300)
        self.add(
            f"Burst: {n:,} events published as fast as possible (Redis)",
            f"Median of {self.sizes.repeats} run(s). Sluice and Flower subscribed at once to "
            "the same stream. *Ingest rate*: events taken in / (last one taken in - first "
            "publish). *Catch-up*: from the last publish to the last event taken in. "
            "Sluice's count is events persisted to its database; Flower's is task events "
            "applied to its in-memory state (`flower_events_total`). Target: zero lost for Sluice.",
            report.table(self.INGEST_HEADERS, rows),
        )

    def steady(self) -> None:
        rows = []
        for rate in self.sizes.steady_rates:
            for storage in self.storages:
                plan = Plan(broker=REDIS_URL, events=int(rate * self.sizes.steady_s), rate=rate,
                            publishers=self.args.publishers)
                runs = self._ingest(plan, storage, 1, together=False)
                rows += self._ingest_rows(f"{rate:,}/s for {self.sizes.steady_s:.0f}s", runs)
                self._ingest_headline(
                    f"{rate:,} events/s for {self.sizes.steady_s:.0f}s:"
                    f" ingest rate, lost ({storage})",
                    f">= {rate:,}/s (keeps up), 0%", runs,
                    lambda o: f"{o.rate:,.0f}/s, {o.lost_pct:.1f}%",
                    # Keeping up: within 5% of the offered rate, over publish and catch-up.
                    lambda o, rate=rate: o.lost == 0 and o.rate >= 0.95 * rate,
                )
        self.add(
            "Steady rate (Redis)",
            "One run each. Sluice and Flower each alone on the same stream (same plan and "
            "seed), one after the other: on two cores a consumer that is flat out takes the "
            "core the other would use, and the generator and Redis need theirs. Sluice keeps "
            "up with a rate when it loses nothing and its catch-up stays near zero; its ingest "
            "rate is then the offered rate. Target: >= 50,000 events/s sustained into storage.",
            report.table(self.INGEST_HEADERS, rows),
        )

    def rabbitmq(self) -> None:
        n = self.sizes.rabbitmq_events
        try:
            with rabbitmq_vhost() as broker:
                plan = Plan(broker=broker, events=n)
                runs = self._ingest(plan, "sqlite", 1, extra=["--plugin", "rabbitmq"])
        except Exception as exc:  # the RabbitMQ source may not be ready: report, go on
            self.add("RabbitMQ ingest", f"Not measured: the run failed with `{exc!r}`.", "")
            self.log(traceback.format_exc())
            return
        self._ingest_headline(f"RabbitMQ burst of {n:,}, lost (sqlite)", "0%", runs,
                              lambda o: f"{o.lost_pct:.1f}%", lambda o: o.lost == 0)
        self.add(
            f"RabbitMQ: {n:,} events published as fast as possible to the celeryev exchange",
            "One run, a fresh vhost. Raw JSON bodies as Celery publishes them on AMQP.",
            report.table(self.INGEST_HEADERS, self._ingest_rows(f"burst {n:,}", runs)),
        )

    # -- the rest ----------------------------------------------------------

    def latency(self) -> None:
        s = self.sizes
        runs = [
            latency.run(rate=s.latency_rate, duration_s=s.latency_s, broker=REDIS_URL,
                        run_dir=self.run_dir)
            for _ in range(s.repeats)
        ]
        for r in runs:
            self.log(f"    p50 {r.p50_ms:.0f} ms, p99 {r.p99_ms:.0f} ms over {r.samples:,} samples")
        med = statistics.median
        p99 = med(r.p99_ms for r in runs)
        self.headline(f"PUBLISH to SSE p99 at {s.latency_rate:,} events/s", "< 500 ms",
                      f"{p99:,.0f} ms", "no SSE", p99 < 500)
        self.add(
            f"Latency: broker PUBLISH to SSE delivery at {s.latency_rate:,} events/s",
            f"Median of {len(runs)} run(s) of {s.latency_s:.0f}s, SQLite. A sample is a job's "
            "first update (its task-sent) or its completion (its task.multi batch) on "
            "`GET /api/stream`. Target: p99 < 500 ms.",
            report.table(
                ("rate (ev/s)", "samples", "p50 (ms)", "p99 (ms)", "max (ms)", "resyncs"),
                [[s.latency_rate, int(med(r.samples for r in runs)), med(r.p50_ms for r in runs),
                  med(r.p99_ms for r in runs), med(r.max_ms for r in runs),
                  sum(r.resyncs for r in runs)]],
            ),
        )

    def sse_viewers(self) -> None:
        self._viewers(replica=False)

    def sse_replica(self) -> None:
        self._viewers(replica=True)

    def _viewers(self, *, replica: bool) -> None:
        s = self.sizes
        where = "a web replica (sluice agent + sluice web, PostgreSQL)" if replica else "SQLite"
        runs = [
            sse.run(viewers=s.viewers, rate=s.latency_rate, duration_s=s.latency_s,
                    broker=REDIS_URL, run_dir=self.run_dir, replica=replica)
            for _ in range(s.repeats)
        ]
        for r in runs:
            self.log(f"    {r.viewers} viewers: {r.resyncs} resyncs, p50 {r.p50_ms:.0f} ms, "
                     f"p99 {r.p99_ms:.0f} ms over {r.samples:,} samples, Sluice CPU "
                     f"{r.cpu_pct:.0f}%, API client saw {r.api_jobs_seen:,}/{r.jobs:,} jobs")
        med = statistics.median
        resyncs = sum(r.resyncs for r in runs)
        p99 = med(r.p99_ms for r in runs)
        on = " on a web replica" if replica else ""
        self.headline(f"{s.viewers} live viewers{on} at {s.latency_rate:,} events/s: resyncs, p99",
                      "0, < 500 ms", f"{resyncs}, {p99:,.0f} ms", "no SSE",
                      resyncs == 0 and p99 < 500)

        def row(label: object, rs: list[sse.ViewersRun]) -> list[object]:
            return [label, rs[0].viewers, rs[0].rate, med(r.published_rate for r in rs),
                    sum(r.resyncs for r in rs), med(r.rows_per_viewer_s for r in rs),
                    int(med(r.samples for r in rs)), med(r.p50_ms for r in rs),
                    med(r.p99_ms for r in rs), med(r.max_ms for r in rs),
                    f"{med(r.cpu_pct for r in rs):.0f}%",
                    f"{med(r.api_jobs_seen for r in rs):,.0f} / {med(r.jobs for r in rs):,.0f}",
                    f"{med(r.api_jobs_finished for r in rs):,.0f}"]

        self.add(
            f"Live viewers{on}: {s.viewers} dashboards at {s.latency_rate:,} events/s",
            f"{len(runs)} run(s) of {s.latency_s:.0f}s, {where}, Redis, the generator live. Each "
            f"viewer reads `GET /api/stream?limit={sse.PAGE_ROWS}` as a job list page does; one "
            "API client reads it without a limit. A delay sample is a row's first delivery to "
            "a viewer (from its task-sent's publish) or its completion (from its task.multi "
            "batch's publish), by nearest rank. *Resyncs*: streams told to reload (viewers and "
            "the API client), summed. *Sluice CPU*: its processes (the engine and its reader "
            "process; or the agent, its reader and the replica) while publishing, of one core. "
            "*API client*: jobs it saw of those published, and how "
            "many of them it saw finished. The last row is the median of the runs "
            "(resyncs: their sum).",
            report.table(
                ("run", "viewers", "offered (ev/s)", "published (ev/s)", "resyncs",
                 "rows/s per viewer", "samples", "p50 (ms)", "p99 (ms)", "max (ms)",
                 "Sluice CPU", "API client: jobs seen", "API client: seen finished"),
                [*(row(i + 1, [r]) for i, r in enumerate(runs)), row("median", runs)],
            ),
        )

    def queries(self) -> None:
        for storage in self.storages:
            jobs = self.sizes.history_jobs.get(storage)
            if not jobs:
                continue
            self.log(f"    filling a {storage} history of {jobs:,} jobs")
            r = queries.run(storage=storage, jobs=jobs, repeats=self.sizes.query_repeats,
                            broker=REDIS_URL, run_dir=self.run_dir, log=self.log)
            rows = [[t.query, " ".join(f"{k}={v}" for k, v in t.params.items()), t.rows,
                     t.p50_ms, t.p95_ms] for t in r.timings]
            worst = max(r.timings, key=lambda t: t.p95_ms)
            slowest_page = max(r.pages, key=lambda t: t.p95_ms)
            self.headline(f"pages a replica serves most, {jobs:,} jobs ({storage}): slowest p95",
                          "< 200 ms", f"{slowest_page.p95_ms:,.0f} ms ({slowest_page.query})",
                          "n/a", slowest_page.p95_ms < 200)
            self.headline(f"job list queries, {jobs:,} jobs ({storage}): slowest p95",
                          "(none set)", f"{worst.p95_ms:,.0f} ms ({worst.query})", "n/a", None)
            self.headline(f"RSS at rest, {jobs:,} jobs stored ({storage})", "< 150 MB",
                          f"{r.rest_rss_mb:,.0f} MB", "n/a", r.rest_rss_mb < 150)
            target = FULL_HISTORY[storage]
            size_note = "" if jobs >= target else (
                f" The target size is {target:,} jobs: run `python -m bench queries --full-size`."
            )
            self.add(
                f"Queries: {storage}, {jobs:,} jobs",
                f"`GET /api/jobs` over HTTP, {self.sizes.query_repeats} repeats each, in rounds of "
                "every query (p95: nearest rank). The history "
                f"({r.ingested_jobs:,} jobs, all their events, over {queries.SPAN_DAYS} days) was "
                f"written through the storage backend's ingest in {r.fill_s:.0f}s "
                f"({r.fill_rate:,.0f} events/s)"
                + ("" if r.ingested_jobs == r.jobs else
                   f", then its jobs table copied in SQL into {r.jobs:,} jobs, each copy "
                   f"{queries.SPAN_DAYS} days earlier (their events were not copied: the list "
                   "reads jobs only; the overview's counts were filled again from the jobs)")
                + f"; Sluice then started on it in {r.startup_s:.2f}s, and held "
                f"{r.rest_rss_mb:,.0f} MB resident at rest after the queries.{size_note}",
                report.table(("query", "parameters", "rows", "p50 (ms)", "p95 (ms)"), rows),
            )
            self.add(
                f"Pages: {storage}, {jobs:,} jobs",
                "The pages a replica serves most, over the same history, timed in the same "
                f"rounds as the queries above ({self.sizes.query_repeats} each, p95 nearest "
                "rank). The overview reads its windows from the counts ingest keeps "
                "(migration 0009). Target: p95 < 200 ms.",
                report.table(
                    ("page", "path and parameters", "KiB", "p50 (ms)", "p95 (ms)"),
                    [[t.query, " ".join(f"{k}={v}" for k, v in t.params.items()), t.rows,
                      t.p50_ms, t.p95_ms] for t in r.pages],
                ),
            )

    def ha_ingest(self) -> None:
        n = self.sizes.burst_events
        runs = [
            ha.run(agents=agents, events=n, broker=REDIS_URL, run_dir=self.run_dir,
                   stall_s=self.sizes.stall_s)
            for _ in range(self.sizes.repeats)
            for agents in (1, 2)
        ]
        for r in runs:
            self.log(f"    {r.agents} agent(s): stored {r.stored:,} ({r.distinct:,} distinct) of "
                     f"{r.published:,} published, {r.rate:,.0f}/s, catch-up {r.catch_up_s:.1f}s")
        med = statistics.median
        one = med(r.rate for r in runs if r.agents == 1)
        two = med(r.rate for r in runs if r.agents == 2)
        exact = all(r.stored == r.distinct == r.published for r in runs)
        self.headline("HA pair ingest on PostgreSQL: 2 agents / 1 agent; each event stored once",
                      ">= 1.0x; yes", f"{two / one:.2f}x; {'yes' if exact else 'no'}", "n/a",
                      two >= one and exact)
        self.add(
            f"HA pair: {n:,} events, one `sluice agent` then two on the same stream (PostgreSQL)",
            f"{self.sizes.repeats} run(s) of each, alternating, each on a fresh database. Both "
            "agents of the pair receive and normalize every event; the leader stores it, the "
            "other stands by with the last 30 s in a replay ring (sluice_core/pipeline.py). "
            "*Rate*: "
            "job event rows stored / (last row stored - first publish). *Stored*: job event "
            "rows at the end, and how many distinct event ids they hold. Target: two agents no "
            "slower than one, every event stored once.",
            report.table(
                ("run", "agents", "published", "stored", "distinct ids", "rate (ev/s)",
                 "catch-up (s)"),
                [[i + 1, r.agents, r.published, r.stored, r.distinct, r.rate, r.catch_up_s]
                 for i, r in enumerate(runs)],
            ),
        )

    def _postgres_history(self, stack: contextlib.ExitStack, reuse_env: str, jobs: int) -> str:
        """The database the environment variable ``reuse_env`` names, else a new one
        (dropped with ``stack``) holding a history of ``jobs`` jobs."""
        reuse = os.environ.get(reuse_env)
        if reuse:
            return reuse
        db = stack.enter_context(postgres_database())
        self.log(f"    filling a PostgreSQL history of {jobs:,} jobs")
        queries.postgres_history(db, jobs, self.log)
        return db

    def replica_load(self) -> None:
        quick = self.args.quick
        jobs = 20_000 if quick else self.sizes.history_jobs.get("postgresql", 100_000)
        seconds = 3.0 if quick else 20.0
        with contextlib.ExitStack() as stack:
            db = self._postgres_history(stack, "SLUICE_BENCH_REPLICA_DB", jobs)
            history = replica_load.prepare(db)
            # Alternating client counts: a busy moment of the shared machine falls on both.
            runs = [
                replica_load.run(db=db, clients=clients, duration_s=seconds, run_dir=self.run_dir)
                for _ in range(self.sizes.repeats)
                for clients in (10, 50)
            ]
        for r in runs:
            self.log(f"    {r.clients} clients (load {r.load}): {r.overall.rate:,.0f} req/s, p95 "
                     f"{r.overall.p95_ms:,.0f} ms, {r.errors} errors, replica CPU "
                     f"{r.replica_cpu_pct:.0f}%")
        rows = []
        for clients in (10, 50):
            mine = [r for r in runs if r.clients == clients]
            overall, endpoints = replica_load.medians(mine)
            if clients == 50:
                self.headline(f"API requests/s on one web replica, {history:,} jobs "
                              "(postgresql), 50 clients: median, p95",
                              ">= 300/s", f"{overall.rate:,.0f}/s, {overall.p95_ms:,.0f} ms",
                              "n/a", overall.rate >= 300)
            rows += [[clients, e.label, e.requests, e.rate, e.p50_ms, e.p95_ms, e.p99_ms]
                     for e in [*endpoints, overall]]
        self.add(
            f"Replica load: one `sluice web`, {history:,} jobs (PostgreSQL)",
            f"{self.sizes.repeats} run(s) of {seconds:.0f}s per client count (after "
            f"{replica_load.WARM_UP_S:.0f}s of warm-up), alternating, a new replica each. Each "
            "client (httpx AsyncClient under trio, one kept-alive connection) sends requests "
            "back to back, drawn in these shares: "
            + ", ".join(f"{label} {weight}%" for label, weight in replica_load.MIX)
            + " (ids of the newest and of failed jobs). The clients run on the same two "
            "cores. Medians over the runs; p50/p95/p99 nearest rank. Load averages and the "
            "replica's CPU (of one core) per run: "
            + "; ".join(f"{r.clients} clients {r.load}, {r.replica_cpu_pct:.0f}%, "
                        f"{r.errors} errors" for r in runs)
            + ". Target: >= 300 requests/s.",
            report.table(("clients", "endpoint", "requests", "req/s", "p50 (ms)", "p95 (ms)",
                          "p99 (ms)"), rows),
        )

    def startup(self) -> None:
        runs = [startup.run(storage=s, repeats=self.sizes.startup_repeats, broker=REDIS_URL,
                            run_dir=self.run_dir) for s in self.storages]
        for r in runs:
            self.headline(f"startup to /healthz 200 ({r.storage})", "(none set)",
                          f"{r.median_s:.2f} s", "n/a", None)
        self.add(
            "Startup: process spawned to GET /healthz 200",
            f"Median of {self.sizes.startup_repeats} starts, each on a fresh empty database "
            "(migrations applied at start), Redis source subscribed.",
            report.table(("storage", "median (s)", "samples (s)"),
                         [[r.storage, r.median_s, ", ".join(f"{x:.2f}" for x in r.samples_s)]
                          for r in runs]),
        )

    def profile(self) -> None:
        n = self.sizes.burst_events
        for storage in self.storages:
            r = profile.run(storage=storage, events=n, broker=REDIS_URL, run_dir=self.run_dir)
            self.add(
                f"Profile: Sluice alone, burst of {n:,} events, {storage}",
                "py-spy (non-blocking, 100 Hz) on `sluice run` and its reader process while it"
                f" took in, in {r.seconds:.0f}s, "
                f"{r.taken:,} of {r.published:,} events. {r.samples:,} samples on CPU; per thread: "
                + ", ".join(f"{name} {count:,}" for name, count in r.threads)
                + ". Below, Sluice's own frames (call site) with the samples spent in them "
                "and what they call.",
                report.table(("frame", "samples", "share"),
                             [[f"`{frame}`", count, f"{100 * count / max(r.samples, 1):.0f}%"]
                              for frame, count in r.functions]),
            )

    def storage(self) -> None:
        n = self.sizes.burst_events
        runs = [
            storage_alone.run(storage=s, shape=shape, events=n, run_dir=self.run_dir)
            for s in self.storages
            for shape in storage_alone.SHAPES
        ]

        def maybe(value: float | None) -> object:
            return "" if value is None else value

        self.add(
            f"Storage alone: {n:,} events through the backend's ingest",
            f"Pre-normalized events in batches of {storage_alone.BATCH_EVENTS:,}, written as the "
            "pipeline writes them (the backend's writers, each its share of the job ids); no "
            "broker, reader or web server. *Whole jobs*: most jobs have all their events in one "
            "batch. *Updated once*: every job is inserted by one batch and updated by the next. "
            "Server CPU is every PostgreSQL process's; buffers and WAL are the run database's.",
            report.table(
                ("storage", "stream", "events", "events/s", "Sluice CPU (µs/event)",
                 "server CPU (µs/event)", "buffer accesses/event", "WAL bytes/event"),
                [[r.storage, r.shape, r.events, r.rate, r.sluice_us, maybe(r.server_us),
                  maybe(r.buffers), maybe(r.wal_bytes)] for r in runs],
            ),
        )

    def retention(self) -> None:
        jobs = 20_000 if self.args.quick else 100_000
        runs = [
            retention.run(storage=s, jobs=jobs, run_dir=self.run_dir, log=self.log)
            for _ in range(self.sizes.repeats)
            for s in self.storages
        ]
        first = {r.storage: r for r in reversed(runs)}
        rows = []
        for r in first.values():
            for size in r.sizes:
                if size.rows:
                    rows.append([r.storage, size.table, size.rows, size.table_bytes,
                                 size.index_bytes,
                                 (size.table_bytes + size.index_bytes) / size.rows])
            rows.append([r.storage, "**all tables**", "", sum(s.table_bytes for s in r.sizes),
                         sum(s.index_bytes for s in r.sizes),
                         f"{r.total_bytes / r.events:,.0f} an event,"
                         f" {r.total_bytes / r.jobs:,.0f} a job"])
        self.add(
            f"Retention: bytes on disk, {jobs:,} jobs over {retention.HISTORY_DAYS} days",
            "After writing the history through the backend's ingest (the generator's jobs: "
            "10% failed, 3% retried, about 4.2 events a job), each table's bytes and its "
            "indexes' apart (PostgreSQL: pg_table_size with TOAST, pg_indexes_size; SQLite: "
            "the dbstat virtual table's pages); bytes a row is both over the table's rows.",
            report.table(("storage", "table", "rows", "table bytes", "index bytes",
                          "bytes a row"), rows),
        )
        self.add(
            f"Retention: a prune of {retention.HISTORY_DAYS} days under "
            f"{retention.LIVE_RATE:,} events/s",
            f"{jobs:,} jobs over {retention.HISTORY_DAYS} days (issue 20 asks for 1,000 tasks/s: "
            "864 million jobs; this is the same shape with fewer), pruned with completed jobs "
            "kept 2 days and failed 7, while a live stream of "
            f"{retention.LIVE_RATE:,} events/s goes through Sluice's Pipeline to the same "
            f"database; *before*: the same stream {retention.BASELINE_S:.0f}s without a prune. "
            "Rates are events stored a second inside the prune's window (before: all but the "
            "first seconds); lag: the oldest event not yet stored, at its worst. Kept: the age "
            "of the oldest completed and failed history job left. On disk: the SQLite file "
            "and WAL, or pg_database_size, before the prune and after it (the live stream's "
            "events included; PostgreSQL gives pages back only by VACUUM FULL, its DELETEs "
            "leave them to reuse).",
            report.table(
                ("storage", "jobs pruned", "events pruned", "chunks", "longest chunk (ms)",
                 "prune (s)", "rate before (/s)", "rate during (/s)", "lag before (s)",
                 "lag during (s)", "offered", "lost", "kept completed (days)",
                 "kept failed (days)", "on disk before (MB)", "after (MB)",
                 "partitions dropped", "jobs dropped with them", "kept moved out",
                 "longest drop (ms)"),
                [[r.storage, r.pruned.jobs, r.pruned.events, r.pruned.chunks,
                  r.pruned.longest_chunk_s * 1000, r.prune_s, r.baseline.rate, r.during.rate,
                  r.baseline.max_lag_s, r.during.max_lag_s, r.during.offered,
                  r.during.offered - r.during.stored, r.kept_days.get("completed", 0.0),
                  r.kept_days.get("failed", 0.0), r.bytes_before / 1e6, r.bytes_after / 1e6,
                  r.pruned.partitions, r.pruned.dropped_jobs, r.pruned.moved_jobs,
                  r.pruned.longest_drop_s * 1000]
                 for r in runs],
            ),
        )
        if "postgresql" in self.storages:
            self._drop_day(100_000 if self.args.quick else 1_000_000)
        for storage in first:
            mine = [r for r in runs if r.storage == storage]
            ratio = statistics.median(r.during.rate / r.baseline.rate for r in mine)
            lost = sum(r.during.offered - r.during.stored for r in mine)
            self.headline(
                f"ingest at {retention.LIVE_RATE:,} events/s through a prune ({storage}):"
                " rate during / before, lost",
                "within 10%, 0 lost", f"{ratio:.1%}, {lost} lost", "n/a",
                abs(ratio - 1) <= 0.10 and lost == 0,
            )

    def _drop_day(self, jobs: int) -> None:
        runs = [
            retention.run_drop(jobs=jobs, run_dir=self.run_dir, log=self.log)
            for _ in range(self.sizes.repeats)
        ]
        self.add(
            f"Retention: one day of {jobs:,} jobs expired on PostgreSQL",
            f"A day {retention.DROP_AGE_DAYS} days old holding {jobs:,} jobs "
            f"({retention.DROP_FAILED:.0%} failed) and {retention.DROP_EVENTS_A_JOB} events "
            "each, written by SQL into its partitions, expired by the issue's policy (completed "
            "2 days, failed 7): the failed jobs, still kept, move to the kept partition in "
            "transactions of --prune-batch jobs, then one transaction drops the day's two "
            "partitions. *Drop*: that last transaction, from its lock on both tables to its "
            "commit.",
            report.table(
                ("jobs", "events", "day on disk (MB)", "kept moved out", "jobs dropped",
                 "prune (s)", "drop (ms)"),
                [[r.jobs, r.events, r.day_bytes / 1e6, r.pruned.moved_jobs,
                  r.pruned.dropped_jobs, r.prune_s, r.pruned.longest_drop_s * 1000]
                 for r in runs],
            ),
        )
        drop_s = statistics.median(r.pruned.longest_drop_s for r in runs)
        self.headline(
            f"expiring a day of {jobs:,} jobs on PostgreSQL: the drop",
            "under 1 s", f"{drop_s * 1000:.0f} ms", "n/a", drop_s < 1.0,
        )

    def alerting(self) -> None:
        s = self.sizes
        rate = 1_000
        runs = [
            alerting.run_latency(storage=storage, rate=rate, duration_s=s.alert_s,
                                 broker=REDIS_URL, run_dir=self.run_dir)
            for _ in range(s.repeats)
            for storage in self.storages
        ]
        for r in runs:
            self.log(f"    {r.storage}: {r.samples}/{r.probes} POSTs, p50 {r.p50_ms:.0f} ms, "
                     f"p99 {r.p99_ms:.0f} ms, max {r.max_ms:.0f} ms")
        med = statistics.median
        for storage in self.storages:
            mine = [r for r in runs if r.storage == storage]
            p99 = med(r.p99_ms for r in mine)
            arrived = all(r.samples == r.probes and not r.refused for r in mine)
            self.headline(f"failing job's PUBLISH to webhook POST p99 at {rate:,} events/s "
                          f"({storage})", "< 2 s", f"{p99:,.0f} ms", "no alerting",
                          p99 < 2000 and arrived)
        self.add(
            f"Alerting: a failing job's PUBLISH to its webhook POST at {rate:,} events/s",
            f"{len(runs)} run(s) of {s.alert_s:.0f}s, Redis. A real `sluice run` with "
            f"{alerting.CHANNELS} signed webhook channels and a `job_failed` rule each (made "
            "through the API), the generator publishing other traffic at the rate; every "
            f"{alerting.PROBE_EVERY_S:g} s a job of a new task name is sent, received and "
            f"started, and {alerting.LEAD_S:g} s later its `task-failed` is PUBLISHed: a sample "
            "runs from that PUBLISH to the `incident.firing` POST's arrival at a receiver on "
            "loopback that checks its Standard Webhooks signature (nearest-rank p99). The "
            "probes rotate over the channels so that none reaches the outbox's rate limit. "
            "*POSTs*: arrived / probes; refused: bad signatures. Target: p99 < 2 s.",
            report.table(
                ("run", "storage", "published (ev/s)", "POSTs", "refused", "p50 (ms)",
                 "p99 (ms)", "max (ms)"),
                [[i + 1, r.storage, r.published_rate, f"{r.samples}/{r.probes}", r.refused,
                  r.p50_ms, r.p99_ms, r.max_ms] for i, r in enumerate(runs)],
            ),
        )

    def alerting_cost(self) -> None:
        # --quick has no PostgreSQL history size: its smallest.
        jobs = self.sizes.history_jobs.get("postgresql", min(self.sizes.history_jobs.values()))
        with contextlib.ExitStack() as stack:
            db = self._postgres_history(stack, "SLUICE_BENCH_ALERT_DB", jobs)
            runs = [alerting.run_cost(db=db, rate=1_000, seconds=self.sizes.alert_cost_s)
                    for _ in range(self.sizes.repeats)]
        for r in runs:
            self.log(f"    {r.rules} rules over {r.jobs:,} jobs: evaluator "
                     f"{r.evaluator_cpu_pct:.1f}%, its PostgreSQL backends {r.server_cpu_pct:.1f}%")
        med = statistics.median
        total = med(r.evaluator_cpu_pct + r.server_cpu_pct for r in runs)
        self.headline(f"{runs[0].rules:,} alert rules over {runs[0].jobs:,} jobs (postgresql): "
                      "evaluation CPU, of one core", "< 5%",
                      f"{total:.1f}% ({med(r.evaluator_cpu_pct for r in runs):.1f}% + "
                      f"{med(r.server_cpu_pct for r in runs):.1f}% server)", "no alerting",
                      total < 5)
        self.add(
            f"Alerting cost: {runs[0].rules:,} rules over {runs[0].jobs:,} jobs (PostgreSQL)",
            f"{len(runs)} run(s) of {self.sizes.alert_cost_s:.0f}s measured (after "
            "15 s of warm-up). The rules (`bench/alerting.py` `rule_bodies`): 600 "
            "`failure_rate` on a task name each (windows 5 min, 15 min, 1 h), 250 "
            "`job_failed` on a name each, 50 `runtime`, 40 `queue_wait`, 30 `queue_depth`, "
            "10 `no_consumer`, 15 `worker_offline`, 4 `job_lost`, 1 `sluice_health`. One "
            "process writes 1,000 events/s over 1,000 task names (10% failing) through the "
            "storage backend's ingest; another runs only the `Evaluator` as the engine runs "
            "it, handed the finished jobs such traffic stores (the same rate, names and "
            "failures) every 0.1 s. *Evaluator*: that process's CPU; *server*: its "
            "PostgreSQL backends' (from /proc); both of one core. *Rounds*: polled (every "
            "5 s) and woken by stored jobs. Target: < 5% of one core.",
            report.table(
                ("run", "evaluator CPU", "server CPU", "total", "polled rounds",
                 "fed rounds", "firing at the end"),
                [[i + 1, f"{r.evaluator_cpu_pct:.1f}%", f"{r.server_cpu_pct:.1f}%",
                  f"{r.evaluator_cpu_pct + r.server_cpu_pct:.1f}%", r.polled_rounds,
                  r.fed_rounds, r.firing] for i, r in enumerate(runs)],
            ),
        )

    # -- output ------------------------------------------------------------

    def write(self, path: Path, machine: dict[str, str], started: float, loads: list[str]) -> None:
        command = "python -m bench " + shlex.join(sys.argv[1:])
        lines = [
            "# Sluice benchmarks",
            "",
            f"Written by `{command.strip()}` (`make bench` runs `python -m bench`) on "
            f"{dt.datetime.fromtimestamp(started, dt.UTC):%Y-%m-%d %H:%M} UTC, "
            f"in {(time.time() - started) / 60:.0f} min.",
            "",
            "## Machine",
            "",
            report.table(("", ""), list(machine.items())),
            "",
            f"Load average (1/5/15 min) at the start of each scenario: {'; '.join(loads)}. "
            "The machine has 2 cores shared with other work: figures move with the load.",
            "",
            "Reproduce: `make bench` (all scenarios), `python -m bench SCENARIO ... [--quick] "
            "[--storage sqlite|postgresql] [--full-size] [--no-flower]`; "
            "`python -m bench profile` adds a py-spy profile of Sluice, `python -m bench "
            "storage` the storage backends alone, `python -m bench sse-viewers` live "
            "dashboards on one Sluice (all three opt-in). Sluice runs "
            "with `--heartbeat-missed 1000000`: the generator's workers heartbeat in stream "
            "time, and Sluice must not add `lost` events of its own to the count.",
            "",
        ]
        if self.summary:
            lines += ["## Summary", "",
                      report.table(("figure", "target", "Sluice", "Flower 2.2", "met"),
                                   self.summary), ""]
        for section in self.sections:
            lines += [f"## {section.title}", "", section.text, ""]
        path.write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"which to run (default all): {', '.join(SCENARIOS)}"
                        "; also, only when named: profile (a py-spy profile; needs py-spy),"
                        " storage (the storage backend alone), sse-viewers (50 live"
                        " dashboards at 5,000 events/s), sse-replica (the same on a"
                        " sluice web replica beside a sluice agent, PostgreSQL), ha-ingest"
                        " (one sluice agent, then an HA pair of two, PostgreSQL), retention"
                        " (bytes on disk, and a prune under a 10,000 events/s stream),"
                        " alerting-cost (1,000 rules evaluated over a PostgreSQL history;"
                        " SLUICE_BENCH_ALERT_DB names a database to reuse), replica-load"
                        " (10 and 50 API clients on one sluice web replica;"
                        " SLUICE_BENCH_REPLICA_DB names a database to reuse)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--full-size", action="store_true",
                        help="query histories at the target sizes (1M jobs SQLite, 10M PostgreSQL)")
    parser.add_argument("--storage", action="append", choices=["sqlite", "postgresql"],
                        help="storage backends to run (default both; --quick: sqlite)")
    parser.add_argument("--repeats", type=int, help="repeats of the cheap runs (default 3)")
    parser.add_argument("--publishers", type=int, default=1, help="publishing processes")
    parser.add_argument("--no-flower", action="store_true", help="run Sluice alone")
    parser.add_argument("--out", type=Path,
                        help="where to write the results (default bench/RESULTS.md; "
                        "--quick writes nothing unless given)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.scenarios) - set(SCENARIOS) - set(OPT_IN))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}: "
                     f"choose from {', '.join(SCENARIOS + OPT_IN)}")
    out = args.out or (None if args.quick else BENCH / "RESULTS.md")
    chosen = args.scenarios or list(SCENARIOS)
    bench = Bench(args)
    started = time.time()
    machine = report.machine()
    bench.log(f"Sluice benchmarks: {', '.join(chosen)}; logs in {bench.run_dir}")
    for key, value in machine.items():
        bench.log(f"  {key}: {value}")
    loads: list[str] = []
    failed = []
    for name in chosen:
        loads.append(f"{name} {report.load()}")
        bench.log(f"\n# {name} (load {report.load()})")
        scenario: Callable[[], None] = getattr(bench, name.replace("-", "_"))
        try:
            scenario()
        except Exception as exc:
            failed.append(name)
            bench.log(traceback.format_exc())
            bench.add(name, f"Failed: `{exc!r}` (logs in the run directory).", "")
        if out:
            bench.write(out, machine, started, loads)
    if bench.summary:
        bench.log("\n## Summary\n" + report.table(
            ("figure", "target", "Sluice", "Flower 2.2", "met"), bench.summary))
    if out:
        bench.log(f"\nwrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

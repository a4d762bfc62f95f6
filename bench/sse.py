"""Live viewers: many dashboards on one Sluice while a steady stream of events comes in.

Each viewer reads ``GET /api/stream?limit=50`` as a job list page does (its
rows, the newest of each window; bench/latency.py's reader, a thread each),
and one API client reads the same stream without a limit, which must still
get every job in its latest state. The generator runs live (``Plan.live``), so
every row delivered carries the moment its events were published: a row's
first delivery is a sample of delay from its ``task-sent``, its completion one
from its ``task.multi`` batch.

Sluice's CPU (the engine and its reader process, from ``/proc``) is counted
while the events are published, as a share of one core.

With ``replica``, the deployment of docs/deploy.md instead: ``sluice agent`` reads
and stores into PostgreSQL, and the viewers watch a ``sluice web`` replica, whose
live feed is what PostgreSQL announces. The CPU is then both processes'.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import attrs

from bench.generator import Plan, publish
from bench.latency import StreamReader, percentile
from bench.services import Sluice, SluiceAgent, database, process_tree, unique

PAGE_ROWS = 50  # the job list's page, as the dashboard asks for it
DRAIN_S = 2.0  # after the last publish: the last windows in flight
TERMINAL = {"completed", "failed", "revoked", "rejected", "lost"}


@attrs.define
class ViewersRun:
    viewers: int
    rate: float  # offered, events/s
    published_rate: float  # what the publisher achieved
    resyncs: int  # streams told to resync (viewers and the API client)
    rows_per_viewer_s: float  # job rows a viewer received a second (median viewer)
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_pct: float  # Sluice, both processes, % of one core while publishing
    jobs: int  # jobs published
    api_jobs_seen: int  # of those, seen by the API client
    api_jobs_finished: int  # seen by it in a terminal state


class _Client(StreamReader):
    """A stream reader that also keeps each job's latest state and counts rows."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.rows = 0
        self.states: dict[str, str] = {}

    def _job(self, job: dict[str, object], now: float) -> None:
        self.rows += 1
        self.states[str(job["id"])] = str(job["state"])
        super()._job(job, now)


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) of ``pid`` and its children, from /proc."""
    total = 0
    for each in process_tree(pid):
        try:
            stat = Path(f"/proc/{each}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


class _CpuSampler(threading.Thread):
    """(time, CPU seconds) of process trees four times a second."""

    def __init__(self, *pids: int) -> None:
        super().__init__(daemon=True)
        self._pids = pids
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), sum(map(cpu_seconds, self._pids))))
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def share(self, start: float, end: float) -> float:
        """CPU used between the first sample at or after ``start`` and the last at or
        before ``end``, as a percentage of one core."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            raise RuntimeError("the run was too short to measure Sluice's CPU")
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return 100 * (c1 - c0) / (t1 - t0)


def run(
    *,
    viewers: int,
    rate: float,
    duration_s: float,
    broker: str,
    run_dir: Path,
    replica: bool = False,
) -> ViewersRun:
    keyprefix = unique("bench") + ":"
    with database("postgresql" if replica else "sqlite", run_dir) as db:
        agent = SluiceAgent(broker, db, run_dir, keyprefix) if replica else None
        try:
            if agent is None:
                sluice = Sluice(broker, db, run_dir, keyprefix)
            else:
                sluice = Sluice(broker, db, run_dir, keyprefix, command="web")
        except BaseException:
            if agent is not None:
                agent.stop()
            raise
        clients = [_Client(f"{sluice.base}/api/stream?limit={PAGE_ROWS}") for _ in range(viewers)]
        api = _Client(f"{sluice.base}/api/stream")
        cpu = _CpuSampler(sluice.proc.pid, *([agent.proc.pid] if agent else []))
        try:
            for client in [*clients, api]:
                client.start()
            for client in [*clients, api]:
                if not client.ready.wait(10):
                    raise RuntimeError(f"no answer from {sluice.base}/api/stream")
            cpu.start()
            report = publish(Plan(broker=broker, events=int(rate * duration_s), rate=rate,
                                  keyprefix=keyprefix, live=True))
            time.sleep(DRAIN_S)
            cpu.stop()
            for client in [*clients, api]:
                client.stop()
        finally:
            sluice.stop()
            if agent is not None:
                agent.stop()
    for client in [*clients, api]:
        client.join(5)
        client.parse()
    delays_ms = [d * 1000 for client in clients for d in client.delays]
    if not delays_ms:
        raise RuntimeError("the streams delivered no job: see the Sluice log in the run directory")
    seconds = report.finished - report.started + DRAIN_S
    return ViewersRun(
        viewers=viewers,
        rate=rate,
        published_rate=report.rate,
        resyncs=sum(client.resyncs for client in [*clients, api]),
        rows_per_viewer_s=statistics.median(client.rows for client in clients) / seconds,
        samples=len(delays_ms),
        p50_ms=statistics.median(delays_ms),
        p99_ms=percentile(delays_ms, 99),
        max_ms=max(delays_ms),
        cpu_pct=cpu.share(report.started, report.finished),
        jobs=report.stats.jobs,
        api_jobs_seen=len(api.states),
        api_jobs_finished=sum(state in TERMINAL for state in api.states.values()),
    )

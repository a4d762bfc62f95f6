"""Latency: from a broker PUBLISH to the job's update arriving on ``GET /api/stream``.

The generator runs live (``Plan.live``): ``args`` of each ``task-sent`` is the
moment it was published, ``result`` of each ``task-succeeded`` the moment its
``task.multi`` batch was. The SSE reader (httpx, streaming) takes the first
update of a job as the arrival of its ``task-sent``, and the ``completed``
update as the arrival of its success: each gives one delay sample.
"""

from __future__ import annotations

import ast
import statistics
import threading
import time
from pathlib import Path

import attrs
import httpx
import orjson

from bench.generator import Plan, publish
from bench.services import Sluice, database, unique


@attrs.define
class LatencyRun:
    rate: float
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    resyncs: int  # the stream told the reader it fell behind (a gap)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile: a sample that was really observed."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class StreamReader(threading.Thread):
    """A client of ``GET /api/stream``: the delay of each job's first update and of its
    completion (see the module's docstring), and how often it was told to resync.

    While it runs it only keeps what arrives with the moment it arrived; :meth:`parse`
    reads it afterwards. Parsing as it reads would count the parsing, and with many
    readers in one process their wait for the GIL, as the server's delay.
    """

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self._url = url
        self.delays: list[float] = []
        self.resyncs = 0
        self.ready = threading.Event()
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._chunks: list[tuple[float, bytes]] = []

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        with (
            httpx.Client(timeout=httpx.Timeout(10.0, read=None)) as client,
            client.stream("GET", self._url) as response,
        ):
            for chunk in response.iter_raw():
                self.ready.set()  # the opening chunk: subscribed
                if self._stop.is_set():
                    return
                self._chunks.append((time.time(), chunk))

    def parse(self) -> None:
        """Fill ``delays`` and ``resyncs`` from what was read (once, after the thread ended)."""
        event, rest = b"", b""
        for now, chunk in self._chunks:
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                if line.startswith(b"event: "):
                    event = line[7:]
                    self.resyncs += event == b"resync"
                elif line.startswith(b"data: ") and event == b"job":
                    self._job(orjson.loads(line[6:]), now)
        self._chunks.clear()

    def _job(self, job: dict[str, object], now: float) -> None:
        job_id = str(job["id"])
        if job_id not in self._seen:
            self._seen.add(job_id)
            sent_at = ast.literal_eval(str(job["args"]))[0]
            self.delays.append(now - float(sent_at))
        if job["state"] == "completed" and job.get("result"):
            self.delays.append(now - float(str(job["result"])))


def run(*, rate: float, duration_s: float, broker: str, run_dir: Path) -> LatencyRun:
    keyprefix = unique("bench") + ":"
    with database("sqlite", run_dir) as db:
        sluice = Sluice(broker, db, run_dir, keyprefix)
        try:
            reader = StreamReader(f"{sluice.base}/api/stream")
            reader.start()
            if not reader.ready.wait(10):
                raise RuntimeError(f"no answer from {sluice.base}/api/stream")
            publish(Plan(broker=broker, events=int(rate * duration_s), rate=rate,
                         keyprefix=keyprefix, live=True))
            time.sleep(2.0)  # the last updates in flight
            reader.stop()
        finally:
            sluice.stop()
    reader.join(5)
    reader.parse()
    delays_ms = [d * 1000 for d in reader.delays]
    if not delays_ms:
        raise RuntimeError("the stream delivered no job: see the Sluice log in the run directory")
    return LatencyRun(
        rate=rate,
        samples=len(delays_ms),
        p50_ms=statistics.median(delays_ms),
        p99_ms=percentile(delays_ms, 99),
        max_ms=max(delays_ms),
        resyncs=reader.resyncs,
    )

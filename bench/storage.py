"""Storage alone: pre-normalized events written through a backend's ``ingest``.

No broker, no reader process, no web server: what the backend itself costs, the
figure to judge a storage change by. The whole pipeline's rates move with the
shared machine's load more than most changes move them; on PostgreSQL the buffer
accesses and WAL bytes an event do not depend on the load at all.

Two shapes of stream, from the same generator as the other scenarios:
- *whole jobs*: 50,000 events/s of stream time per batch window, so most jobs
  have all their events in one batch (the steady scenario's shape);
- *updated once*: a batch per generator tick, so every job is inserted by one
  batch and updated by the next, as tasks that run longer than a batch are.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import attrs
import psycopg
import trio

from bench.generator import EVENTS_PER_JOB, TICK_S, EventStream, amqp_body
from bench.services import database
from sluice_celery.events import KIND_AMQP, normalize_batch
from sluice_core.config import Config
from sluice_core.model import JobEvent, RawBatch
from sluice_core.plugins import PluginManager
from sluice_core.storage import Storage

BATCH_EVENTS = 5_000
SHAPES = {"whole jobs": 50_000.0, "updated once": BATCH_EVENTS / TICK_S}


@attrs.define
class StorageRun:
    storage: str
    shape: str
    events: int
    seconds: float
    sluice_us: float  # this process's CPU an event (SQLite's work included)
    server_us: float | None  # PostgreSQL's processes' CPU an event (others' work included)
    buffers: float | None  # PostgreSQL: shared buffer accesses an event
    wal_bytes: float | None  # PostgreSQL: WAL written an event

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def batches(rate: float, events: int) -> list[list[JobEvent]]:
    """``events`` normalized job events of a stream at ``rate``, in ingest batches."""
    stream = EventStream(seed=5)
    per_tick = rate / EVENTS_PER_JOB * TICK_S
    out: list[JobEvent] = []
    owed = 0.0
    while len(out) < events:
        owed += per_tick
        n = int(owed)
        owed -= n
        raw = [(m.routing_key, amqp_body(m)) for m in stream.tick(n)]
        out += normalize_batch(RawBatch(KIND_AMQP, "bench", raw, time.time())).job_events
    return [out[i : i + BATCH_EVENTS] for i in range(0, len(out), BATCH_EVENTS)]


def _postgres_cpu_s() -> float:
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if "(postgres)" in stat:
            fields = stat.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def _postgres_counters(url: str) -> tuple[int, int]:
    """WAL position and shared buffer accesses of the run's database."""
    with psycopg.connect(url, autocommit=True) as conn:
        wal, buffers = conn.execute(
            "SELECT pg_current_wal_lsn() - '0/0', blks_hit + blks_read FROM pg_stat_database"
            " WHERE datname = current_database()"
        ).fetchone()
    return int(wal), int(buffers)


async def _open(url: str) -> Storage:
    storage = PluginManager().storage(Config(db=url))
    await storage.open()  # migrates
    return storage


async def _migrate(url: str) -> None:
    await (await _open(url)).aclose()


async def _ingest_all(url: str, work: list[list[JobEvent]]) -> float:
    """Write every batch as the pipeline does: each of the backend's writers its share of
    the job ids; returns the seconds taken."""
    storage = await _open(url)
    writers = getattr(storage, "ingest_writers", 1)
    try:
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            sends = []
            for _ in range(writers):
                send, receive = trio.open_memory_channel[list[JobEvent]](2)
                sends.append(send)

                async def write(
                    receive: trio.MemoryReceiveChannel[list[JobEvent]] = receive,
                ) -> None:
                    async for part in receive:
                        await storage.ingest(part, [])

                nursery.start_soon(write)
            for batch in work:
                parts: list[list[JobEvent]] = [[] for _ in sends]
                for event in batch:
                    parts[hash(event.job_id) % writers].append(event)
                for send, part in zip(sends, parts, strict=True):
                    await send.send(part)
            for send in sends:
                await send.aclose()
        return time.perf_counter() - t0
    finally:
        await storage.aclose()


def run(*, storage: str, shape: str, events: int, run_dir: Path) -> StorageRun:
    work = batches(SHAPES[shape], events)
    n = sum(map(len, work))
    with database(storage, run_dir) as url:
        postgres = storage == "postgresql"
        trio.run(_migrate, url)  # first, so that the figures are the ingest's only
        if postgres:
            wal0, buffers0 = _postgres_counters(url)
        cpu0, server0 = time.process_time(), _postgres_cpu_s()
        seconds = trio.run(_ingest_all, url, work)
        sluice_us = (time.process_time() - cpu0) / n * 1e6
        server_us = (_postgres_cpu_s() - server0) / n * 1e6
        if not postgres:
            return StorageRun(storage, shape, n, seconds, sluice_us, None, None, None)
        time.sleep(1.0)  # the writers' sessions report their buffer counts as they end
        wal1, buffers1 = _postgres_counters(url)
    return StorageRun(storage, shape, n, seconds, sluice_us, server_us,
                      (buffers1 - buffers0) / n, (wal1 - wal0) / n)

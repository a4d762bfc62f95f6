"""An HA pair's ingest: one ``sluice agent`` on PostgreSQL, then two on the same stream.

Both agents of a pair subscribe to the same Redis channels, so each receives every
event; the leader stores it and the other stands by, keeping the last 30 s to store
should it take over (ingest is idempotent: the job events' unique key keeps one row per
event). What is measured is the database's side:
the job events stored, polled while the stream is published, against the events
published, each stored once.
"""

from __future__ import annotations

import time
from pathlib import Path

import attrs

from bench.generator import Plan, publish
from bench.services import SluiceAgent, database, unique, wait_subscribers


@attrs.define
class HaRun:
    agents: int
    published: int  # task events
    stored: int  # job event rows at the end
    distinct: int  # distinct event ids among them
    rate: float  # events stored per second, first publish to the last stored
    catch_up_s: float  # from the last publish to the last event stored


def _stored(db: str) -> tuple[int, int]:
    import psycopg

    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT id) FROM job_events").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def run(*, agents: int, events: int, broker: str, run_dir: Path, stall_s: float = 15.0,
        max_wait_s: float = 600.0) -> HaRun:
    """``agents`` agents on a fresh PostgreSQL database fed a burst of ``events``."""
    plan = Plan(broker=broker, events=events, keyprefix=unique("bench") + ":")
    with database("postgresql", run_dir) as db:
        started = [SluiceAgent(broker, db, run_dir, plan.keyprefix) for _ in range(agents)]
        try:
            wait_subscribers(plan, agents)
            report = publish(plan)
            published = report.stats.task_events
            last, last_at = -1, time.time()
            deadline = time.monotonic() + max_wait_s
            while time.monotonic() < deadline:
                count, _ = _stored(db)
                if count != last:
                    last, last_at = count, time.time()
                if count >= published or time.time() - last_at > stall_s:
                    break
                time.sleep(0.25)
            stored, distinct = _stored(db)
        finally:
            for agent in started:
                agent.stop()
    return HaRun(agents, published, stored, distinct,
                 rate=stored / max(last_at - report.started, 1e-9),
                 catch_up_s=max(0.0, last_at - report.finished))

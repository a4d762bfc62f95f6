"""Ingest: Sluice and Flower fed one stream, counted afterwards.

Both subscribe at once (``together=True``: one publish, the same bytes), or
each alone on an identical stream (same plan, same seed): on two cores a
consumer that is flat out takes the core the other would use, so capacity is
measured alone, as the issue measured Flower's.

What each took in is read from its own counters: Sluice's
``sluice_events_ingested_total`` (events persisted to its database) and
Flower's ``flower_events_total`` (task events applied to its in-memory
state). Both count task events; heartbeats are left out on both sides.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from bench.generator import Plan, publish
from bench.services import (
    Flower,
    Sampler,
    Service,
    Sluice,
    database,
    unique,
    wait_bindings,
    wait_subscribers,
)


@attrs.define
class Outcome:
    """One consumer's result in one run."""

    consumer: str
    taken: int  # task events taken in
    lost: int
    catch_up_s: float  # from the last publish to the last event taken in
    rate: float  # events taken in per second, first publish to last event taken in
    peak_rss_mb: float

    @property
    def lost_pct(self) -> float:
        return 100.0 * self.lost / max(self.taken + self.lost, 1)


@attrs.define
class IngestRun:
    broker: str
    storage: str
    offered_rate: float | None  # None: flat out
    published: int  # task events
    messages: int
    publish_s: float
    publish_rate: float
    outcomes: dict[str, Outcome]
    sluice_messages: int  # raw messages Sluice read (published messages: ``messages``)
    sluice_dropped: int  # messages Sluice read but dropped (its buffer was full)


def quiesce(service: Service, still_s: float = 0.5, timeout: float = 10.0) -> float:
    """The service's counter once it has stopped moving (the probes are taken in)."""
    value, since = service.taken(), time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = service.taken()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= still_s:
            break
    return value


def run(
    plan: Plan,
    *,
    storage: str,
    run_dir: Path,
    flower: bool = True,
    together: bool = True,
    stall_s: float = 5.0,
    max_wait_s: float = 600.0,
    sluice_extra: Sequence[str] = (),
) -> IngestRun:
    """Sluice (and Flower) fed ``plan``: at once, or each alone on the same stream."""
    args = dict(storage=storage, run_dir=run_dir, stall_s=stall_s, max_wait_s=max_wait_s,
                sluice_extra=sluice_extra)
    if together or not flower:
        return _run(plan, flower=flower, sluice=True, **args)
    alone = _run(plan, flower=False, sluice=True, **args)
    flower_run = _run(plan, flower=True, sluice=False, **args)
    assert flower_run.published == alone.published, "the same plan published twice differs"
    alone.outcomes.update(flower_run.outcomes)
    return alone


def _run(
    plan: Plan,
    *,
    storage: str,
    run_dir: Path,
    flower: bool,
    sluice: bool,
    stall_s: float,
    max_wait_s: float,
    sluice_extra: Sequence[str],
) -> IngestRun:
    """Start the consumers, publish ``plan`` once, wait until all have settled."""
    keyprefix = unique("bench") + ":"
    plan = attrs.evolve(plan, keyprefix=keyprefix)
    services: list[Service] = []
    with database(storage, run_dir) as db:
        try:
            sluice_service = (
                Sluice(plan.broker, db, run_dir, keyprefix, list(sluice_extra)) if sluice else None
            )
            if sluice_service is not None:
                services.append(sluice_service)
            if flower:
                services.append(Flower(plan.broker, run_dir, keyprefix))
            if plan.broker.startswith("redis"):
                wait_subscribers(plan, len(services))
            else:
                wait_bindings(plan.broker, len(services))
            before = {s.name: quiesce(s) for s in services}
            with Sampler(services) as sampler:
                report = publish(plan)
                deadline = time.monotonic() + max_wait_s
                while time.monotonic() < deadline and not all(
                    sampler.settled(s.name, before[s.name] + report.stats.task_events, stall_s)
                    for s in services
                ):
                    time.sleep(0.2)
            published = report.stats.task_events
            outcomes = {}
            for service in services:
                taken = int(sampler.last(service.name) - before[service.name])
                done_at = sampler.reached_at(service.name) or report.finished
                outcomes[service.name] = Outcome(
                    consumer=service.name,
                    taken=taken,
                    lost=max(0, published - taken),
                    catch_up_s=max(0.0, done_at - report.finished),
                    rate=taken / max(done_at - report.started, 1e-9),
                    peak_rss_mb=service.peak_rss_mb(),
                )
            counters = (
                sluice_service.counters() if sluice_service else {"messages": 0, "dropped": 0}
            )
        finally:
            for service in services:
                service.stop()
    return IngestRun(
        broker=plan.broker.split("://")[0],
        storage=storage,
        offered_rate=plan.rate,
        published=published,
        messages=report.stats.messages,
        publish_s=report.finished - report.started,
        publish_rate=report.rate,
        outcomes=outcomes,
        sluice_messages=int(counters["messages"]),
        sluice_dropped=int(counters["dropped"]),
    )

"""What an event source is, and the sink it feeds (docs/architecture.md)."""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from sluice_core.model import JobEvent, RawBatch, WorkerEvent

log = logging.getLogger(__name__)

SOURCE_RESTART_DELAY = 5.0  # after a source crashed (a bug, not a broker outage)


class Sink(Protocol):
    """Where a source puts what it reads. Never blocks: a source must keep draining
    its socket, so a full buffer drops (and counts) instead of waiting."""

    def put_raw(self, batch: RawBatch) -> None:
        """Hand over raw messages for the normalizers."""

    def put_events(self, job_events: list[JobEvent], worker_events: list[WorkerEvent]) -> None:
        """Hand over events that are already normalized (the ingest endpoint, an agent)."""

    def source_status(self, name: str, up: bool, detail: str = "", kept: bool = False) -> None:
        """Report whether the source is connected (shown by /healthz and the logs).
        ``kept``, with ``up``: the broker kept what was published while the source was
        not reading, so nothing was missed (no gap to reconcile)."""


class Source(Protocol):
    """A long-running reader of one broker or stream."""

    name: str  # unique among the engine's sources, e.g. "celery/redis://localhost:6379/0"

    async def run(
        self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Read until cancelled, reconnecting on its own when the broker goes away.

        Call ``task_status.started()`` once really receiving (subscribed), so
        that ``await nursery.start(source.run, sink)`` means "ready".
        """


async def supervise(source: Source, sink: Sink) -> None:
    """Run a source; if it crashes (a bug: broker outages it handles itself), restart it."""
    while True:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(source.run, sink)
                log.info("source %s is ready", source.name)
        except Exception:
            log.exception("source %s crashed; restarting", source.name)
            sink.source_status(source.name, False, "crashed")
        else:
            return
        await trio.sleep(SOURCE_RESTART_DELAY)


async def run_sources(sources: list[Source], sink: Sink) -> None:
    """Run every source, each supervised, until cancelled."""
    async with trio.open_nursery() as nursery:
        for source in sources:
            nursery.start_soon(supervise, source, sink)

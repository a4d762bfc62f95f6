"""What an event source is, and the sink it feeds (DESIGN.md section 2)."""

from __future__ import annotations

from typing import Protocol

import trio

from sluice_core.model import JobEvent, RawBatch, WorkerEvent


class Sink(Protocol):
    """Where a source puts what it reads. Never blocks: a source must keep draining
    its socket, so a full buffer drops (and counts) instead of waiting."""

    def put_raw(self, batch: RawBatch) -> None:
        """Hand over raw messages for the normalizers."""

    def put_events(self, job_events: list[JobEvent], worker_events: list[WorkerEvent]) -> None:
        """Hand over events that are already normalized (the ingest endpoint, an agent)."""

    def source_status(self, name: str, up: bool, detail: str = "") -> None:
        """Report whether the source is connected (shown by /healthz and the logs)."""


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

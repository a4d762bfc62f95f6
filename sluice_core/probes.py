"""Probes: periodic measurements of what events cannot tell (queue depth, consumers)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import attrs

from sluice_core.model import QueueSample


class Probe(Protocol):
    name: str
    interval: float  # seconds between polls

    async def probe(self, queues: set[str]) -> list[QueueSample]:
        """Measure the queues Sluice knows of (from events and configuration) and any
        the probe discovers itself. Raise on a broker error; the engine logs it,
        marks the probe down and polls again at the next interval."""


@attrs.frozen
class WorkerQueues:
    """What a worker said it consumes, and how many jobs it runs at once."""

    hostname: str
    framework: str
    queues: list[str]
    concurrency: int | None


@runtime_checkable
class WorkerProbe(Probe, Protocol):
    """A probe that also learns each worker's queues (Celery: the ``active_queues``
    and ``stats`` control commands). The engine stores them after each poll."""

    def take_worker_queues(self) -> list[WorkerQueues]:
        """What the workers said since the last call (empty when nothing new)."""

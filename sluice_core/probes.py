"""Probes: periodic measurements of what events cannot tell (queue depth, consumers)."""

from __future__ import annotations

from typing import Protocol

from sluice_core.model import QueueSample


class Probe(Protocol):
    name: str
    interval: float  # seconds between polls

    async def probe(self, queues: set[str]) -> list[QueueSample]:
        """Measure the queues Sluice knows of (from events and configuration) and any
        the probe discovers itself. Raise on a broker error; the engine logs it,
        marks the probe down and polls again at the next interval."""

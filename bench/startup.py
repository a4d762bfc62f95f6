"""Startup: from ``sluice run`` being spawned to ``GET /healthz`` answering 200."""

from __future__ import annotations

import statistics
from pathlib import Path

import attrs

from bench.services import Sluice, database, unique


@attrs.define
class StartupRun:
    storage: str
    samples_s: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)


def run(*, storage: str, repeats: int, broker: str, run_dir: Path) -> StartupRun:
    """Each start on a fresh, empty database (migrations included)."""
    samples = []
    for _ in range(repeats):
        with database(storage, run_dir) as db:
            sluice = Sluice(broker, db, run_dir, unique("bench") + ":")
            sluice.stop()
            samples.append(sluice.startup_s)
    return StartupRun(storage, samples)

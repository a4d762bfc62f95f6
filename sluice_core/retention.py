"""Retention: how long finished jobs are kept, and the leader's duty that prunes the rest.

A job is pruned (its row, its events, its search entry, and its share of the overview's
counts) once its last news (``updated_at``) is older than its class's retention:
``--retain-days`` for completed jobs, ``--retain-failed-days`` for failed, lost, revoked
and rejected ones, or what the first ``--retain GLOB=DAYS[/FAILED_DAYS]`` rule matching
its name says. 0 keeps forever. A job still open (queued, scheduled, received, active,
retrying, redelivering) is never pruned, nor is an ``unknown`` one: Sluice has not seen
it end, and an operator looking for a job that went missing is who needs it most.

:meth:`sluice_core.storage.Storage.prune` does the deleting, in short transactions;
:class:`Pruner` runs it on the leader every ``--prune-interval`` seconds.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from typing import TYPE_CHECKING, Final

import attrs
import trio

from sluice_core.model import JobState
from sluice_core.options import (
    ENGINE,
    PRUNE,
    SOURCES,
    Kind,
    Option,
    integer,
    many,
    seconds,
    switch,
)

if TYPE_CHECKING:
    from sluice_core.config import Config
    from sluice_core.metrics import Metrics
    from sluice_core.storage import Pruned, Storage

log = logging.getLogger(__name__)

DAY: Final = 86_400.0
FINISHED: Final = frozenset({JobState.COMPLETED})
FAILED: Final = frozenset({JobState.FAILED, JobState.LOST, JobState.REVOKED, JobState.REJECTED})
# Jobs a prune reads (and deletes at most) in one transaction. Measured on SQLite
# (docs/architecture.md, Retention): 500 jobs of two events, 14 ms median, 30 ms at most
# on an idle machine; under a 10,000 events/s stream the same chunk held the writer
# 233-275 ms, so the prune sizes its chunks by time (PRUNE_CHUNK_S), this the most.
PRUNE_BATCH: Final = 500
# The longest a prune's transaction should hold the writer (issue 20: 50 ms); the next
# chunk is halved when one takes longer, and grows back (up to the batch) when one takes
# under a quarter of it.
PRUNE_CHUNK_S: Final = 0.05
PRUNE_CHUNK_MIN: Final = 10
# The first chunk's jobs: small, since the load is not known yet (the 500 of a first
# chunk held the writer 140 ms under the stream, before the halving could act).
PRUNE_CHUNK_FIRST: Final = 50


def next_chunk(size: int, took_s: float, most: int) -> int:
    """The jobs the next prune transaction takes after one of ``size`` took ``took_s``."""
    if took_s > PRUNE_CHUNK_S:
        return max(PRUNE_CHUNK_MIN, size // 2)
    if took_s < PRUNE_CHUNK_S / 4:
        return min(most, size * 2)
    return size


@attrs.frozen
class Rule:
    """Jobs whose name matches ``pattern`` (a shell glob, case-sensitive) are kept
    ``days`` when completed and ``failed_days`` when failed, lost, revoked or rejected."""

    pattern: str
    days: int
    failed_days: int

    @classmethod
    def parse(cls, text: str) -> Rule:
        """``GLOB=DAYS`` (both classes) or ``GLOB=DAYS/FAILED_DAYS``; raises ValueError."""
        pattern, sep, days = text.strip().rpartition("=")
        if not sep or not pattern.strip():
            raise ValueError(text)
        finished, _, failed = days.partition("/")
        kept = [int(part.strip()) for part in (finished, failed or finished)]
        if min(kept) < 0:
            raise ValueError(text)
        return cls(pattern.strip(), kept[0], kept[1])

    def __str__(self) -> str:
        same = self.days == self.failed_days
        return f"{self.pattern}={self.days}" + ("" if same else f"/{self.failed_days}")


def _rule_text(raw: object) -> str:
    if not isinstance(raw, str):
        raise TypeError
    return str(Rule.parse(raw))


# Every process with a database shows the policy (the web's diagnostics page); the
# leader prunes by it; `sluice prune` too.
RETAIN_DAYS = Option(
    "retain_days",
    integer(0),
    14,
    "days completed jobs are kept after their last event (0: forever)",
    commands=ENGINE | {PRUNE},
    metavar="DAYS",
)
RETAIN_FAILED_DAYS = Option(
    "retain_failed_days",
    integer(0),
    30,
    "days failed, lost, revoked and rejected jobs are kept after their last event (0: forever)",
    commands=ENGINE | {PRUNE},
    metavar="DAYS",
)
RETAIN = Option(
    "retain",
    many(
        Kind(
            "GLOB=DAYS or GLOB=DAYS/FAILED_DAYS (job names matching GLOB)",
            _rule_text,
            metavar="GLOB=DAYS[/FAILED_DAYS]",
        )
    ),
    [],
    "keep jobs whose name matches GLOB this many days instead (repeatable; the first match"
    " wins), e.g. 'billing.*=90' or 'health.*=1/7'",
    commands=ENGINE | {PRUNE},
)
PRUNE_INTERVAL = Option(
    "prune_interval",
    seconds(),
    600.0,
    "seconds between background prunes on the leader",
    commands=SOURCES,
)
PRUNE_BATCH_JOBS = Option(
    "prune_batch",
    integer(1, 100_000),
    PRUNE_BATCH,
    "the most jobs (with their events) a prune reads and deletes in one short transaction;"
    " fewer when a transaction takes over 50 ms",
    commands=ENGINE | {PRUNE},
    metavar="JOBS",
)
DRY_RUN = Option(
    "dry_run",
    switch(),
    False,
    "count what would be deleted, delete nothing",
    commands=frozenset({PRUNE}),
    env="SLUICE_PRUNE_DRY_RUN",
)
OPTIONS: Final = (
    RETAIN_DAYS, RETAIN_FAILED_DAYS, RETAIN, PRUNE_INTERVAL, PRUNE_BATCH_JOBS, DRY_RUN,
)


def _days(days: int) -> str:
    return "forever" if days == 0 else f"{days} day" + ("" if days == 1 else "s")


@attrs.frozen
class RetentionPolicy:
    days: int = 14
    failed_days: int = 30
    rules: tuple[Rule, ...] = ()

    @classmethod
    def from_config(cls, config: Config) -> RetentionPolicy:
        return cls(
            config.get(RETAIN_DAYS),
            config.get(RETAIN_FAILED_DAYS),
            tuple(Rule.parse(text) for text in config.get(RETAIN)),
        )

    def kept_days(self, state: JobState, name: str | None) -> int:
        """Days a job of this state and name is kept after its last event; 0: forever
        (every open or unknown job)."""
        failed = state in FAILED
        if not failed and state not in FINISHED:
            return 0
        for rule in self.rules:
            if name is not None and fnmatch.fnmatchcase(name, rule.pattern):
                return rule.failed_days if failed else rule.days
        return self.failed_days if failed else self.days

    def expired(
        self, state: JobState, name: str | None, updated_at: float | None, now: float
    ) -> bool:
        days = self.kept_days(state, name)
        return days > 0 and updated_at is not None and updated_at < now - days * DAY

    def scan(self, now: float) -> dict[JobState, float]:
        """Per prunable state, the time before which its jobs may be expired: the
        shortest retention of that class (the default or any rule), so that a scan of
        ``updated_at < cutoff`` finds every expired job; each is then judged by
        :meth:`expired`. States kept forever by every rule are not scanned."""
        out: dict[JobState, float] = {}
        for states, default, pick in (
            (FINISHED, self.days, lambda r: r.days),
            (FAILED, self.failed_days, lambda r: r.failed_days),
        ):
            days = [d for d in (default, *map(pick, self.rules)) if d > 0]
            if days:
                for state in sorted(states):
                    out[state] = now - min(days) * DAY
        return out

    def drop_before(self, now: float) -> int | None:
        """On PostgreSQL, day partitions (days since the epoch, UTC) before this one are
        past the completed jobs' retention, whole: each is dropped, once what the policy
        keeps of it has moved to the kept partition. None while completed jobs are kept
        forever."""
        if self.days == 0:
            return None
        return math.floor((now - self.days * DAY) / DAY)

    def incidents_cutoff(self, now: float) -> float | None:
        """Alert incidents resolved before this time go (with their timelines and
        notifications): they are kept as long as failed jobs. None: kept forever."""
        return None if self.failed_days == 0 else now - self.failed_days * DAY

    def longer_patterns(self) -> list[str]:
        """The globs of rules that keep completed jobs longer than the default: their
        jobs must be looked for in a partition before it is dropped."""
        return [r.pattern for r in self.rules if r.days == 0 or r.days > self.days]

    def describe(self) -> str:
        """For people: 'Keeping completed jobs 14 days, failed 30 days; billing.* 90 days'."""
        text = f"Keeping completed jobs {_days(self.days)}, failed {_days(self.failed_days)}"
        rules = [
            f"{rule.pattern} {_days(rule.days)}"
            + ("" if rule.days == rule.failed_days else f" (failed {_days(rule.failed_days)})")
            for rule in self.rules
        ]
        return text + ("; " + ", ".join(rules) if rules else "")

    @property
    def forever(self) -> bool:
        return not self.scan(0.0)


class Pruner:
    """The leader's duty: a prune every ``interval`` seconds, counted on /metrics; the
    last result for the dashboard."""

    def __init__(
        self,
        storage: Storage,
        metrics: Metrics,
        policy: RetentionPolicy,
        *,
        interval: float,
        batch: int = PRUNE_BATCH,
    ) -> None:
        self.storage = storage
        self.metrics = metrics
        self.policy = policy
        self.interval = interval
        self.batch = batch
        self.last: Pruned | None = None
        self.last_at: float | None = None  # epoch seconds

    async def run(self) -> None:
        if self.policy.forever:
            return  # nothing can expire
        while True:
            # Not at once: a start has a backlog to store and gaps to reconcile first.
            await trio.sleep(self.interval)
            try:
                await self.prune_once(time.time())
            except Exception as exc:  # the database may be away: the next round retries
                log.warning("pruning failed: %s", exc)

    async def prune_once(self, now: float) -> Pruned:
        started = trio.current_time()
        pruned = await self.storage.prune(self.policy, now, batch=self.batch)
        self.last, self.last_at = pruned, now
        self.metrics.observe_prune(pruned, now)
        if pruned.jobs:
            log.info(
                "pruned %d jobs and %d events in %d chunks (longest %.0f ms) in %.1fs",
                pruned.jobs, pruned.events, pruned.chunks, pruned.longest_chunk_s * 1000,
                trio.current_time() - started,
            )
        return pruned

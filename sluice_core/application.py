"""The application interface: all the web layer may use of the rest of Sluice.

``sluice_web`` depends on :class:`Application` alone: it reads (:class:`Reads`), follows
the live feed (:class:`Feed`), acts on jobs (:class:`~sluice_core.actions.ActionService`),
takes pushed events (:class:`Ingest`), and asks for health,
metrics and diagnostics. No view touches the pipeline, the plugin manager or the bus
itself, so that a view is the same on ``sluice run``, an agent's server and a stateless
``sluice web`` replica, and a web test can run against a fake of this interface.

:class:`EngineApplication` is the real one, over a running :class:`~sluice_core.engine.Engine`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import trio

from sluice_core import health, validate
from sluice_core.actions import ActionService
from sluice_core.alerting.model import AlertService
from sluice_core.bus import Batch
from sluice_core.config import Config
from sluice_core.frameworks import Framework
from sluice_core.model import Job, JobEvent, Worker, WorkerEvent
from sluice_core.monitors import workers_task_events
from sluice_core.remote import Agents
from sluice_core.storage import (
    ApiKey,
    DeadLetter,
    Footprint,
    Gap,
    JobQuery,
    Page,
    Pruned,
    QueueStats,
)

if TYPE_CHECKING:
    from sluice_core.engine import Engine

FIRST_COUNT_WAIT_S: Final = 10.0  # a first /metrics waits this long at most for the job counts


class Reads(Protocol):
    """What the pages and the API read: the read side of :class:`~sluice_core.storage.Storage`
    (which is one), and nothing that writes."""

    async def get_job(self, job_id: str) -> Job | None: ...

    async def job_events(self, job_id: str) -> list[JobEvent]: ...

    async def list_jobs(self, query: JobQuery) -> Page: ...

    async def count_jobs(self, query: JobQuery, at_most: int) -> int: ...

    async def count_jobs_by_state(self) -> dict[str, int]: ...

    async def list_workers(self) -> list[Worker]: ...

    async def list_queues(self, now: float) -> list[QueueStats]: ...

    async def queue_depth_history(
        self, name: str, broker: str, since: float
    ) -> list[tuple[float, int]]: ...

    async def job_throughput(
        self, since: float, bucket_s: float
    ) -> list[tuple[float, int, int]]: ...

    async def top_failing_names(self, since: float, limit: int) -> list[tuple[str, int]]: ...

    async def list_gaps(self, limit: int) -> list[Gap]: ...

    async def list_dead_letters(self, limit: int) -> list[DeadLetter]: ...


class Feed(Protocol):
    """The live feed (a :class:`~sluice_core.bus.Bus`): subscribe, then read batches
    after an id; :class:`~sluice_core.bus.Gap` when the id is too old to resume from."""

    @property
    def last_id(self) -> int: ...

    def expect_subscriber(self) -> int: ...

    def subscribe(self) -> contextlib.AbstractContextManager[None]: ...

    async def next_batch(self, after: int) -> Batch: ...


class Ingest(Protocol):
    """The door of pushed events (:class:`~sluice_core.ingest.IngestService`); each step
    raises :class:`~sluice_core.ingest.IngestRefused` for what it does not take."""

    async def authenticate(self, token: str) -> ApiKey | None: ...

    def parse(self, key: ApiKey, data: str | bytes) -> Any: ...

    def decode(self, key: ApiKey, body: Any) -> tuple[list[JobEvent], list[WorkerEvent]]: ...

    async def store(
        self, key: ApiKey, job_events: list[JobEvent], worker_events: list[WorkerEvent]
    ) -> None:
        """Returns once the events are stored."""


@attrs.frozen
class WorkerView:
    """A worker as the pages show it: whether its job events reach Sluice (None: cannot
    tell yet), and what to do when they do not (its framework's advice)."""

    worker: Worker
    task_events: bool | None
    advice: str


@attrs.frozen
class Malformed:
    """Events of one source refused or corrected for one reason, since the start."""

    source: str
    reason: str
    count: float
    meaning: str  # the reason, for a user


@attrs.frozen
class Diagnostics:
    """What Sluice refused or corrected of what it was sent, and what storage refused."""

    malformed: list[Malformed]
    dead_letters: list[DeadLetter]  # the newest
    dead_lettered: float  # every event dead-lettered since the start
    retention: Retention | None = None


@attrs.frozen
class Retention:
    """The retention policy (sluice_core/retention.py) and this process's last prune."""

    policy: str  # for people: "keeping completed jobs 14 days, failed 30 days"
    last_pruned_at: float | None = None  # None: this process has not pruned (yet)
    last: Pruned | None = None
    footprint: Footprint | None = None  # how much history the database holds now


class Application(Protocol):
    config: Config
    reads: Reads
    feed: Feed
    actions: ActionService
    ingest: Ingest
    agents: Agents  # the remote agents connected now, whose jobs' actions go to them
    alerts: AlertService

    def frameworks(self) -> list[Framework]:
        """The frameworks the loaded plugins declare."""

    async def workers(self) -> list[WorkerView]: ...

    async def health(self) -> tuple[dict[str, Any], bool]:
        """``/healthz``'s answer, and whether all is well (200) or not (503)."""

    async def metrics(self) -> bytes:
        """Every metric, in Prometheus's text exposition format."""

    async def diagnostics(self, dead_letters: int) -> Diagnostics:
        """Malformed events counted so far, and the newest ``dead_letters`` dead letters."""


class EngineApplication:
    """The application of a running :class:`~sluice_core.engine.Engine`: ``sluice run``,
    an agent's server, a ``sluice web`` replica."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.config = engine.config
        self.reads: Reads = engine.storage
        self.feed: Feed = engine.bus
        self.actions: ActionService = engine.job_actions
        self.ingest: Ingest = engine.ingest
        self.agents = engine.agents
        self.alerts: AlertService = engine.alerts

    def frameworks(self) -> list[Framework]:
        return self._engine.frameworks.declared()

    async def workers(self) -> list[WorkerView]:
        advice = self._engine.frameworks.advice
        return [
            WorkerView(worker, flag, advice(worker))
            for worker, flag in await workers_task_events(self._engine.storage)
        ]

    async def health(self) -> tuple[dict[str, Any], bool]:
        return await health.check(self._engine)

    async def metrics(self) -> bytes:
        engine = self._engine
        # The gauges read from the database are counted in the background (see
        # StorageGauges); only a first scrape waits for a first count.
        engine.storage_gauges.want()
        with trio.move_on_after(FIRST_COUNT_WAIT_S):
            await engine.storage_gauges.refreshed.wait()
        # A labelled counter has no sample until a label is used; a scraper should
        # see an explicit 0 for every source rather than a missing series.
        for name in [source.name for source in engine.sources] + ["ingest"]:
            engine.metrics.events_dropped.labels(name)
        return engine.metrics.render()

    async def diagnostics(self, dead_letters: int) -> Diagnostics:
        metrics = self._engine.metrics
        malformed = sorted(
            (
                Malformed(
                    sample.labels["source"],
                    sample.labels["reason"],
                    sample.value,
                    validate.MEANINGS.get(sample.labels["reason"], ""),
                )
                for family in metrics.events_malformed.collect()
                for sample in family.samples
                if sample.name.endswith("_total") and sample.value
            ),
            key=lambda m: (m.source, m.reason),
        )
        return Diagnostics(
            malformed=malformed,
            dead_letters=await self._engine.storage.list_dead_letters(dead_letters),
            dead_lettered=metrics.registry.get_sample_value("sluice_events_dead_lettered_total")
            or 0,
            retention=Retention(
                self._engine.pruner.policy.describe(),
                self._engine.pruner.last_at,
                self._engine.pruner.last,
                await self._engine.storage.footprint(),
            ),
        )

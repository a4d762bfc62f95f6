"""The engine: sources, pipeline, probes and the web server under one trio nursery.

``Engine.run`` is what ``sluice run`` executes. Stopping (``Engine.stop``, or
SIGINT/SIGTERM through the CLI) stops the sources first, then lets the
pipeline write everything it had read, then stops the web server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from sluice_core.actions import ActionHandler
from sluice_core.alerting.evaluate import Evaluator, default_kinds
from sluice_core.alerting.model import Invalid
from sluice_core.alerting.outbox import Outbox
from sluice_core.alerting.service import Alerts
from sluice_core.application import EngineApplication
from sluice_core.bus import Bus
from sluice_core.config import (
    ALERTS,
    HEARTBEAT_MISSED,
    PUBLIC_URL,
    STOP_TIMEOUT,
    Config,
    ConfigError,
)
from sluice_core.follow import Follower
from sluice_core.ingest import IngestService
from sluice_core.job_actions import JobActions, stored_by
from sluice_core.leader import Leadership
from sluice_core.metrics import Metrics, StorageGauges
from sluice_core.model import QueueSample
from sluice_core.monitors import WorkerMonitor
from sluice_core.pipeline import Pipeline
from sluice_core.plugins import PluginManager, close_all
from sluice_core.probes import Probe, WorkerProbe
from sluice_core.reader import ReaderProcess, totals
from sluice_core.reconcile import GapWatch
from sluice_core.remote import Agents
from sluice_core.retention import PRUNE_BATCH_JOBS, PRUNE_INTERVAL, Pruner, RetentionPolicy
from sluice_core.sources import Source, run_sources
from sluice_core.spool import Spool
from sluice_core.storage import IngestResult

log = logging.getLogger(__name__)

# The advisory lock of the processes that share a database: one of them runs the
# singleton duties (sluice_core/leader.py).
DUTIES_LOCK = "sluice/duties"

class Engine:
    """``sluice run`` (everything), ``sluice agent --db`` (no web server), or, with
    ``replica``, ``sluice web``: a web server on a database the agents write, which
    reads no broker and runs no singleton duty; its live feed is what the database
    announces (sluice_core/follow.py), its own writes (pushed events) included."""

    def __init__(self, config: Config, pm: PluginManager, *, replica: bool = False) -> None:
        self.config = config
        self.pm = pm
        self.replica = replica
        self.started_at = time.time()
        self.metrics = Metrics()
        self.bus = Bus()
        self.storage = pm.storage(config)
        self.storage_gauges = StorageGauges(self.metrics, self.storage)
        self.pipeline = Pipeline(
            normalize=pm.normalize,
            storage=self.storage,
            metrics=self.metrics,
            bus=self.bus,
            on_stored=self._publish,
            buffer_messages=config.buffer_messages,
            buffer_bytes=config.buffer_mb * 2**20,
            spool=Spool(config.spool_mb * 2**20, config.spool_dir),
            batch_events=config.batch_events,
            writers=self.storage.ingest_writers,
            dead_letters=self.storage,
        )
        self.frameworks = pm.frameworks(config)
        self.ingest = IngestService(
            storage=self.storage,
            pipeline=self.pipeline,
            metrics=self.metrics,
            frameworks=self.frameworks,
            normalize=pm.normalize,
            admit=pm.admit,
        )
        self.sources: list[Source] = [] if replica else pm.sources(config)
        feed = self.storage.change_feed()
        if replica and feed is None:
            raise ConfigError(
                f"sluice web serves a database that agents write: it needs PostgreSQL"
                f" (--db postgresql://...), not {config.db.split(':', 1)[0]}"
            )
        self.follower = Follower(self.storage, feed, self.bus) if replica and feed else None
        self.reader = (
            ReaderProcess(config, self.pipeline, self.metrics)
            if config.reader_process and self.sources
            else None
        )
        self.actions: list[ActionHandler] = pm.actions(config)
        self.agents = Agents()  # the remote agents connected to this server
        self.job_actions = JobActions(
            storage=self.storage,
            handlers=self.actions,
            agents=self.agents,
            record=stored_by(self.pipeline),
        )
        self.probes: list[Probe] = pm.probes(config)
        self.worker_monitor = WorkerMonitor(
            self.storage,
            self.pipeline,
            missed=config.get(HEARTBEAT_MISSED),
            listening_since=self.listening_since,
            frameworks=self.frameworks,
        )
        lock = self.storage.leader_lock(DUTIES_LOCK)
        # One of processes sharing the database: only the leader writes what the sources
        # read, the others keep a replay ring (sluice_core/pipeline.py); but only when each
        # source says every process receives every event (``broadcast``): a queue the
        # agents share (RabbitMQ) gives each event to one of them, which must write it.
        if (
            lock is not None
            and not replica
            and all(getattr(source, "broadcast", False) for source in self.sources)
        ):
            self.pipeline.stand_by()
        self.leadership = Leadership(lock, name="duties", on_change=self._leading)
        self.gap_watch = GapWatch(
            self.storage,
            self.pipeline,
            admit=pm.admit,
            reconcilers=pm.reconcilers(config),
            sources=lambda: self.pipeline.sources,
            dropped=self._dropped,
            backlog=lambda: self.pipeline.backlog()[0],
        )
        self.pruner = Pruner(
            self.storage,
            self.metrics,
            RetentionPolicy.from_config(config),
            interval=config.get(PRUNE_INTERVAL),
            batch=config.get(PRUNE_BATCH_JOBS),
        )
        # Alerting (docs/alerting.md): the service answers the API on any process; the
        # evaluator and the outbox are singleton duties of the leader.
        channel_types = pm.alert_channels(config)
        public_url = config.get(PUBLIC_URL)
        self.alerts = Alerts(self.storage, channel_types, public_url=public_url)
        self.outbox = Outbox(self.storage, channel_types)
        self.evaluator = Evaluator(
            self.storage,
            default_kinds(self.storage, self._health_problems),
            public_url=public_url,
            on_queued=self.outbox.wake,
        )
        # Events dropped per source at the last look, and since the look before it.
        self._dropped_seen: dict[str, float] = {}
        self._drops_new: dict[str, float] = {}
        self._drops_at = float("-inf")
        self.web_addresses: list[str] = []
        self._stop_requested = trio.Event()
        self._pipeline_done = trio.Event()
        self.stopped = trio.Event()

    def _leading(self, leading: bool) -> None:
        self.metrics.leader.set(int(leading))
        self.pipeline.lead(leading)

    def listening_since(self) -> float | None:
        """Since when every source has been up without a break; None while one is down.
        With no source (events pushed to the ingest endpoint), since the engine started."""
        if not self.sources:
            return self.started_at
        statuses = [self.pipeline.sources.get(source.name) for source in self.sources]
        if any(status is None or not status.up for status in statuses):
            return None
        return max(status.since for status in statuses if status is not None)

    def _dropped(self) -> dict[str, float]:
        """Events dropped so far, per source (the reader process's included)."""
        return {labels[0]: total for labels, total in totals(self.metrics.events_dropped).items()}

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested.is_set()

    def stop(self) -> None:
        self._stop_requested.set()

    async def run(
        self, *, web: bool = True, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self.storage.open()
        if not self.replica:
            try:
                await self.alerts.load_file(self.config.get(ALERTS))
            except Invalid as exc:
                raise ConfigError(f"{exc.field} in the config file: {exc.message}") from None
        await self.gap_watch.prepare()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_pipeline)
                reader = trio.CancelScope()
                if self.reader is not None:
                    nursery.start_soon(_run_in, reader, self.reader.run)
                feeders = trio.CancelScope()
                nursery.start_soon(self._run_feeders, feeders)
                if web:
                    from sluice_web.server import serve

                    self.web_addresses = await nursery.start(
                        serve, EngineApplication(self), self._pipeline_done.wait
                    )
                task_status.started()
                await self._stop_requested.wait()
                log.info("stopping: sources first, then flushing what was read")
                self.gap_watch.freeze()  # from now on, the sources may stop any moment
                # One deadline for the whole flush: with the database away, the reader
                # cannot hand its batches over and the writers cannot store them.
                deadline = trio.current_time() + self.config.get(STOP_TIMEOUT)
                if self.reader is not None:
                    with trio.move_on_at(deadline):
                        await self.reader.stop()
                feeders.cancel()
                self.pipeline.close()
                with trio.move_on_at(deadline):
                    await self._pipeline_done.wait()
                if not self._pipeline_done.is_set():
                    log.error(
                        "stopping: what was read is not stored after %gs; giving up on it",
                        self.config.get(STOP_TIMEOUT),
                    )
                    reader.cancel()
                    self.pipeline.abandon()  # it logs how much is lost
                    await self._pipeline_done.wait()
        finally:
            with trio.CancelScope(shield=True):
                await close_all(
                    [*self.actions, *self.probes, *self.gap_watch.reconcilers.values()]
                )
                await self.storage.aclose()
            self.stopped.set()
        log.info("stopped")

    async def _run_pipeline(self) -> None:
        try:
            await self.pipeline.run()
        finally:
            self._pipeline_done.set()

    async def _run_feeders(self, scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                if self.reader is None:
                    nursery.start_soon(run_sources, self.sources, self.pipeline)
                if self.follower is not None:
                    nursery.start_soon(self.follower.run)
                else:
                    nursery.start_soon(self.leadership.run, self._run_duties)
                    nursery.start_soon(
                        self.pipeline.watch_leader, self.storage, lambda: self.leadership.leading
                    )
                nursery.start_soon(self.storage_gauges.run)
                nursery.start_soon(self.gap_watch.run)

    async def _run_duties(self) -> None:
        """What one process of an HA pair does for both: concluding from silence, and
        probing queues (two probes would only double the samples), pruning."""
        async with trio.open_nursery() as nursery:
            for probe in self.probes:
                nursery.start_soon(self._poll, probe)
            nursery.start_soon(self.worker_monitor.run)
            nursery.start_soon(self.evaluator.run)
            nursery.start_soon(self.outbox.run)
            nursery.start_soon(self.pruner.run)

    async def _health_problems(self, max_lag_s: float, now: float) -> dict[str, str]:
        """What the sluice_health kind reports at ``now`` (epoch seconds): sources down,
        events read and not stored for more than ``max_lag_s``, events dropped since the
        last look."""
        problems: dict[str, str] = {}
        for source in self.sources:
            status = self.pipeline.sources.get(source.name)
            if status is not None and not status.up:
                problems[f"source:{source.name}"] = (
                    f"source {source.name} is down: {status.detail}"
                )
        oldest = self.pipeline.writes.oldest_unstored
        if oldest is not None and now - oldest > max_lag_s:
            problems["lag"] = (
                f"events read {now - oldest:.0f} s ago are not stored yet"
                f" (more than {max_lag_s:g} s)"
            )
        if now - self._drops_at >= 1.0:  # one look for every rule of a round
            dropped = self._dropped()
            self._drops_new = {
                source: total - self._dropped_seen.get(source, 0.0)
                for source, total in dropped.items()
                if total > self._dropped_seen.get(source, 0.0)
            }
            self._dropped_seen, self._drops_at = dropped, now
        for name, new in self._drops_new.items():
            problems[f"dropped:{name}"] = f"{new:.0f} events of {name} dropped (buffers full)"
        return problems

    async def _poll(self, probe: Probe) -> None:
        while True:
            try:
                queues = await self.storage.queue_names()
                samples = await probe.probe(queues)
                await self.storage.record_queue_samples(samples)
                if isinstance(probe, WorkerProbe):
                    await self.storage.set_worker_queues(probe.take_worker_queues())
                self.metrics.observe_queue_samples(samples)
                self._publish_samples(samples)
            except Exception as exc:
                log.warning("probe %s failed: %s", probe.name, exc)
            await trio.sleep(probe.interval)

    def _publish_samples(self, samples: list[QueueSample]) -> None:
        if not self.bus.wanted:
            self.bus.skip(len(samples))  # as for jobs: nobody to build them for
            return
        self.bus.publish_samples(samples)

    def _publish(self, result: IngestResult) -> None:
        self.metrics.observe_ingest(result)
        self.evaluator.feed(result)  # a hand-over; kept only while this process leads
        if self.follower is not None:
            return  # the follower hears these rows from the database like the agents' rows
        if not self.bus.wanted:
            # Keeping every stored row for live clients costs memory and ingest
            # time: not worth it when no dashboard is open.
            self.bus.skip(len(result.jobs) + len(result.workers))
            return
        self.bus.publish_jobs(result.jobs, new=result.new_jobs)
        self.bus.publish_workers(result.workers)


async def _run_in(scope: trio.CancelScope, fn: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await fn()

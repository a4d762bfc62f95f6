"""Sluice's own counters, exported by ``GET /metrics`` in Prometheus text format.

One registry per engine (not prometheus_client's global one), so engines in
tests do not share state.
"""

from __future__ import annotations

import logging
from collections import Counter as Counter_

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from sluice_core import validate
from sluice_core.model import JobState, Normalized, QueueSample, Worker
from sluice_core.storage import MAX_PAGE, IngestResult, JobQuery, Pruned, Storage

log = logging.getLogger(__name__)

# The *_created series double the output and no dashboard uses them.
disable_created_metrics()

UNKNOWN = "unknown"  # the label of a job whose name or queue no event told yet
# Seconds; from quick tasks to hour-long batch jobs.
RUNTIME_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages_received = Counter(
            "sluice_messages_received", "Raw messages read from sources", ["source"], registry=r
        )
        self.events_ingested = Counter(
            "sluice_events_ingested", "Events persisted to storage (new ones only)", registry=r
        )
        self.events_duplicate = Counter(
            "sluice_events_duplicate", "Events received again and not stored twice", registry=r
        )
        self.events_dropped = Counter(
            "sluice_events_dropped",
            "Messages dropped because the ingest buffer was full",
            ["source"],
            registry=r,
        )
        self.events_malformed = Counter(
            "sluice_events_malformed",
            "Messages that could not be decoded, and events from outside refused or stored"
            " with values corrected, by reason (sluice_core.validate)",
            ["source", "reason"],
            registry=r,
        )
        self.events_dead_lettered = Counter(
            "sluice_events_dead_lettered",
            "Events storage refused, set aside in the dead-letter table (the diagnostics page)",
            registry=r,
        )
        self.storage_errors = Counter(
            "sluice_storage_errors", "Failed storage writes (retried)", registry=r
        )
        self.ingest_lag = Gauge(
            "sluice_ingest_lag_seconds",
            "Time from reading a message to its events being stored (last batch)",
            registry=r,
        )
        self.buffered = Gauge(
            "sluice_buffered_messages",
            "Raw messages waiting to be normalized, in memory or spooled to disk",
            registry=r,
        )
        self.spooled_bytes = Gauge(
            "sluice_spooled_bytes", "Bytes of raw messages spooled to disk", registry=r
        )
        self.leader = Gauge(
            "sluice_leader",
            "1 while this process runs the singleton duties (worker monitor, probes), 0 while"
            " another process sharing the database does",
            registry=r,
        )
        self.writing_sources = Gauge(
            "sluice_writing_sources",
            "1 while this process stores what its sources read, 0 while it stands by (one"
            " of an HA pair, not the leader: it keeps the last seconds read to replay)",
            registry=r,
        )
        self.standby_events = Gauge(
            "sluice_standby_events",
            "Events read while standing by and held to replay if this process takes over",
            registry=r,
        )
        self.standby_expired = Counter(
            "sluice_standby_expired_events",
            "Events a standby let go unwritten: older than the replay window, or past its"
            " bound in events",
            registry=r,
        )
        self.standby_replayed = Counter(
            "sluice_standby_replayed_events",
            "Events held while standing by and written on taking over",
            registry=r,
        )
        self.jobs = Gauge("sluice_jobs", "Stored jobs by state", ["state"], registry=r)
        self.workers_online = Gauge("sluice_workers_online", "Workers online", registry=r)
        self.queue_depth = Gauge(
            "sluice_queue_depth", "Messages waiting in a queue", ["queue", "broker"], registry=r
        )
        self.queue_consumers = Gauge(
            "sluice_queue_consumers", "Consumers of a queue", ["queue", "broker"], registry=r
        )
        self.queue_reserved = Gauge(
            "sluice_queue_reserved",
            "Messages of a queue taken by a worker but not acknowledged (prefetched, or held"
            " for an ETA)",
            ["queue", "broker"],
            registry=r,
        )
        self.job_events = Counter(
            "sluice_job_events",
            "Job events stored, by the state they move the job to (e.g. completed: jobs"
            " that succeeded)",
            ["name", "queue", "state"],
            registry=r,
        )
        self.job_runtime = Histogram(
            "sluice_job_runtime_seconds",
            "Runtime of jobs that completed or failed",
            ["name", "queue"],
            buckets=RUNTIME_BUCKETS,
            registry=r,
        )
        self.jobs_stuck = Gauge(
            "sluice_jobs_stuck",
            f"Jobs queued with no taker or active far beyond their usual runtime (counted up"
            f" to {MAX_PAGE}, one page of the job list)",
            registry=r,
        )
        self.worker_up = Gauge(
            "sluice_worker_up", "1 while a worker is online, 0 once offline", ["hostname"],
            registry=r,
        )
        self.worker_active = Gauge(
            "sluice_worker_active_jobs", "Jobs a worker runs now (its last heartbeat)",
            ["hostname"], registry=r,
        )
        self.worker_heartbeat = Gauge(
            "sluice_worker_last_heartbeat_timestamp_seconds",
            "When a worker last sent a heartbeat (epoch seconds)",
            ["hostname"],
            registry=r,
        )
        self.source_up = Gauge(
            "sluice_source_up", "1 when a source is connected", ["source"], registry=r
        )
        # Retention (sluice_core/retention.py).
        self.jobs_pruned = Counter(
            "sluice_jobs_pruned", "Jobs deleted by retention, by state", ["state"], registry=r
        )
        self.events_pruned = Counter(
            "sluice_events_pruned", "Job events deleted with their jobs by retention", registry=r
        )
        self.last_prune = Gauge(
            "sluice_last_prune_timestamp_seconds",
            "When this process last pruned (epoch seconds)",
            registry=r,
        )
        self.oldest_job = Gauge(
            "sluice_oldest_job_timestamp_seconds",
            "When the oldest stored job was created (epoch seconds; 0 when none is stored)",
            registry=r,
        )
        self.database_bytes = Gauge(
            "sluice_database_bytes",
            "Bytes the database takes on disk (SQLite: the file and its WAL)",
            registry=r,
        )
        self.partitions_dropped = Counter(
            "sluice_partitions_dropped",
            "PostgreSQL day partitions (of jobs and of job_events, a pair each) dropped by"
            " retention",
            registry=r,
        )
        self.jobs_dropped = Counter(
            "sluice_jobs_dropped",
            "Jobs that went with their day's partitions (also in sluice_jobs_pruned_total)",
            registry=r,
        )
        self.day_partitions = Gauge(
            "sluice_day_partitions",
            "PostgreSQL day partitions held (of jobs; the kept partition aside)",
            registry=r,
        )

    def observe_ingest(self, result: IngestResult) -> None:
        """Count a stored batch's new events (each once: duplicates are not in it)."""
        jobs = {job.id: job for job in result.jobs}
        counts: Counter_[tuple[str, str, str]] = Counter_()
        for event in result.new_events:
            if event.state is None:
                continue
            job = jobs.get(event.job_id)
            name = (job and job.name) or UNKNOWN
            queue = (job and job.queue) or UNKNOWN
            counts[(name, queue, event.state.value)] += 1
            if event.state in (JobState.COMPLETED, JobState.FAILED):
                runtime = event.fields.get("runtime", job and job.runtime)
                if isinstance(runtime, int | float):
                    self.job_runtime.labels(name, queue).observe(runtime)
        for labels, n in counts.items():
            self.job_events.labels(*labels).inc(n)

    def observe_normalized(self, source: str, normalized: Normalized) -> None:
        """Count what a batch's normalizing and checking refused or corrected, by reason."""
        for reason, n in validate.count(normalized).items():
            self.events_malformed.labels(source, reason).inc(n)

    def observe_queue_samples(self, samples: list[QueueSample]) -> None:
        for sample in samples:
            labels = (sample.name, sample.broker)
            for gauge, value in (
                (self.queue_depth, sample.depth),
                (self.queue_reserved, sample.reserved),
                (self.queue_consumers, sample.consumers),
            ):
                if value is not None:
                    gauge.labels(*labels).set(value)

    def observe_workers(self, workers: list[Worker]) -> None:
        self.workers_online.set(sum(worker.status == "online" for worker in workers))
        for worker in workers:
            self.worker_up.labels(worker.hostname).set(worker.status == "online")
            self.worker_active.labels(worker.hostname).set(
                worker.active or 0 if worker.status == "online" else 0
            )
            if worker.last_heartbeat is not None:
                self.worker_heartbeat.labels(worker.hostname).set(worker.last_heartbeat)

    def observe_prune(self, pruned: Pruned, at: float) -> None:
        for state, n in pruned.jobs_by_state.items():
            self.jobs_pruned.labels(state).inc(n)
        self.events_pruned.inc(pruned.events)
        self.partitions_dropped.inc(pruned.partitions)
        self.jobs_dropped.inc(pruned.dropped_jobs)
        self.last_prune.set(at)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StorageGauges:
    """Keeps the gauges read from the database fresh: jobs by state, workers, stuck jobs.

    Counting reads whole indexes. Under heavy ingest on PostgreSQL the stuck
    count took 10 to 25 s (the state index holds every job's first, queued,
    version until VACUUM), so a scrape never waits for these: they are
    refreshed in the background while someone scrapes, every ``interval`` at
    most and no more than ``duty`` of the time, and a scrape shows the last
    values. Only the first scrape waits, for the first count.
    """

    def __init__(
        self,
        metrics: Metrics,
        storage: Storage,
        *,
        interval: float = 5.0,
        duty: float = 0.2,
        idle_after: float = 300.0,
    ) -> None:
        self._metrics = metrics
        self._storage = storage
        self._interval = interval
        self._duty = duty
        self._idle_after = idle_after  # no scrape this long (seconds): stop counting
        self._wanted = trio.Event()
        self._wanted_at = float("-inf")
        self.refreshed = trio.Event()  # set once the gauges hold a first count

    def want(self) -> None:
        """Someone scrapes: keep the gauges fresh (for ``idle_after`` seconds)."""
        self._wanted_at = trio.current_time()
        self._wanted.set()

    async def run(self) -> None:
        while True:
            await self._wanted.wait()
            started = trio.current_time()
            try:
                await self.refresh()
            except Exception as exc:  # the database may be away: the next round retries
                log.warning("refreshing the job and worker gauges failed: %s", exc)
            self.refreshed.set()
            took = trio.current_time() - started
            await trio.sleep(max(self._interval - took, took / self._duty - took))
            if trio.current_time() - self._wanted_at > self._idle_after:
                self._wanted = trio.Event()

    async def refresh(self) -> None:
        m, storage = self._metrics, self._storage
        counts = await storage.count_jobs_by_state()
        for state in JobState:
            m.jobs.labels(state.value).set(counts.get(state.value, 0))
        m.observe_workers(await storage.list_workers())
        stuck = await storage.list_jobs(JobQuery(stuck=True, limit=MAX_PAGE))
        m.jobs_stuck.set(len(stuck.jobs))
        footprint = await storage.footprint()
        m.database_bytes.set(footprint.bytes)
        m.oldest_job.set(footprint.oldest_job_at or 0)
        if footprint.partitions is not None:
            m.day_partitions.set(footprint.partitions)

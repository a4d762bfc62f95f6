"""Sluice's own counters, exported by ``GET /metrics`` in Prometheus text format.

One registry per engine (not prometheus_client's global one), so engines in
tests do not share state.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


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
            "sluice_events_malformed", "Messages that could not be decoded", ["source"], registry=r
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
            "sluice_buffered_messages", "Raw messages waiting to be normalized", registry=r
        )
        self.jobs = Gauge("sluice_jobs", "Stored jobs by state", ["state"], registry=r)
        self.workers_online = Gauge("sluice_workers_online", "Workers online", registry=r)
        self.queue_depth = Gauge(
            "sluice_queue_depth", "Messages waiting in a queue", ["queue", "broker"], registry=r
        )
        self.queue_consumers = Gauge(
            "sluice_queue_consumers", "Consumers of a queue", ["queue", "broker"], registry=r
        )
        self.source_up = Gauge(
            "sluice_source_up", "1 when a source is connected", ["source"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

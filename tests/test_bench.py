"""The benchmark's generator publishes what real Celery publishes.

Its events go through a real Redis and Sluice's own Celery normalizer, and must
come out like the captured traffic of real workers: same channels, envelope,
event fields and types, and the same normalized job and worker events. If the
generator drifted from the wire format, the benchmarks would measure something
Sluice never sees in production.
"""

from __future__ import annotations

import base64
import json
import time
from collections import defaultdict
from typing import Any

import redis

from bench.generator import Plan, publish_part, redis_channel
from sluice_celery.events import KIND_REDIS, normalize_batch
from sluice_core.model import RawBatch
from tests.fixtures.services import FIXTURES, REDIS_URL

EVENTS = 400  # a few hundred task events: ~100 jobs, with failures, a retry, an expiry
TypeMap = dict[str, dict[str, set[str]]]


def _captured_messages() -> list[tuple[str, bytes]]:
    lines = (FIXTURES / "redis-events.jsonl").read_text().splitlines()
    return [
        (rec["channel"], json.dumps(rec["envelope"]).encode())
        for rec in map(json.loads, lines)
    ]


def _published_messages(keyprefix: str) -> tuple[list[tuple[str, bytes]], Any]:
    """Publish a small stream to the real Redis and read it back as a subscriber would."""
    client = redis.Redis.from_url(REDIS_URL)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(redis_channel(keyprefix, 0, "*"))
    try:
        report = publish_part(Plan(broker=REDIS_URL, events=EVENTS, keyprefix=keyprefix, seed=3), 0)
        received: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + 10
        while len(received) < report.stats.messages and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1.0)
            if message is not None:
                channel = message["channel"].decode()
                # Compare channels as if the app had no global_keyprefix, like the capture.
                received.append((channel.removeprefix(keyprefix), message["data"]))
    finally:
        pubsub.close()
        client.close()
    return received, report


def _decoded(channel: str, data: bytes) -> list[dict[str, Any]]:
    """The events of one message: JSON envelope, base64 body, one event or a task.multi list."""
    envelope = json.loads(data)
    body = json.loads(base64.b64decode(envelope["body"]))
    return body if isinstance(body, list) else [body]


def _shape(value: Any) -> str:
    return type(value).__name__


def _wire_types(messages: list[tuple[str, bytes]]) -> TypeMap:
    """Per event type: each field's value types on the wire."""
    out: TypeMap = defaultdict(lambda: defaultdict(set))
    for channel, data in messages:
        for event in _decoded(channel, data):
            for key, value in event.items():
                out[event["type"]][key].add(_shape(value))
    return out


def _normalized_types(messages: list[tuple[str, bytes]]) -> TypeMap:
    """Per event type: what Sluice's normalizer makes of it, field by field."""
    result = normalize_batch(RawBatch(KIND_REDIS, "test", messages, time.time()))
    assert result.malformed == 0
    out: TypeMap = defaultdict(lambda: defaultdict(set))
    for event in result.job_events:
        shape = out[event.type]
        shape["state"].add(str(event.state))
        shape["worker"].add("producer" if event.worker is None else "worker")
        for key, value in event.fields.items():
            shape[f"fields.{key}"].add(_shape(value))
        for key, value in event.extra.items():
            shape[f"extra.{key}"].add(_shape(value))
    for worker_event in result.worker_events:
        shape = out[f"worker/{worker_event.type}"]
        for key in ("freq", "active", "processed", "loadavg", "pid", "sw_ver"):
            shape[key].add(_shape(getattr(worker_event, key)))
    return out


def _assert_like(generated: TypeMap, captured: TypeMap, *, same_fields: bool) -> None:
    """Each generated event type has the capture's fields (all, or a subset) and value types."""
    for etype, fields in generated.items():
        assert etype in captured, f"{etype}: no such event in the capture"
        if same_fields:
            assert set(fields) == set(captured[etype]), f"{etype}: fields differ from the capture"
        else:
            assert set(fields) <= set(captured[etype]), f"{etype}: fields the capture lacks"
        for key, types in fields.items():
            assert types <= captured[etype][key], (
                f"{etype}.{key} is {sorted(types)}, the capture has {sorted(captured[etype][key])}"
            )


def test_generated_events_decode_like_captured_celery_events(keyprefix: str) -> None:
    captured = _captured_messages()
    received, report = _published_messages(keyprefix)

    # Every message reached the subscriber, on Celery's channels, in kombu's envelope.
    assert len(received) == report.stats.messages
    reference = json.loads(captured[0][1])
    for channel, data in received:
        assert channel.startswith("/0.celeryev/")
        envelope = json.loads(data)
        assert list(envelope) == list(reference)
        assert list(envelope["properties"]) == list(reference["properties"])
        assert envelope["properties"]["delivery_info"]["routing_key"] == channel.rsplit("/", 1)[1]

    # The stream has what real traffic has: every kind of event the benchmark claims.
    wire = _wire_types(received)
    assert set(wire) == {
        "task-sent", "task-received", "task-started", "task-succeeded", "task-failed",
        "task-retried", "worker-online", "worker-heartbeat",
    }
    multi = [_decoded(c, d) for c, d in received if c.endswith("/task.multi")]
    assert max(map(len, multi)) <= 24
    assert all(e["type"] != "task-sent" for batch in multi for e in batch)
    sent = [e for c, d in received if c.endswith("/task.sent") for e in _decoded(c, d)]
    assert all(e["hostname"].startswith("gen") for e in sent)
    failed = [e for c, d in received for e in _decoded(c, d) if e["type"] == "task-failed"]
    assert all(e["traceback"].startswith("Traceback (most recent call last):") for e in failed)

    # Same fields, in the same order, as a captured event of the same type (some types
    # have several shapes: a NotRegistered task-failed has no traceback), and the same
    # value types.
    shapes: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for channel, data in captured:
        for event in _decoded(channel, data):
            shapes[event["type"]].add(tuple(event))
    for channel, data in received:
        for event in _decoded(channel, data):
            assert tuple(event) in shapes[event["type"]], event["type"]
    _assert_like(wire, _wire_types(captured), same_fields=True)

    # Sluice's normalizer makes the same job and worker events of both. (Some
    # captured events set fields no generated one does: the name of a
    # NotRegistered task-failed, taken from its exception.)
    _assert_like(_normalized_types(received), _normalized_types(captured), same_fields=False)
    result = normalize_batch(RawBatch(KIND_REDIS, "test", received, time.time()))
    assert len(result.job_events) == report.stats.task_events
    assert len(result.worker_events) == report.stats.worker_events
    # Distinct events: none is taken for a duplicate and dropped by ingestion.
    assert len({e.id for e in result.job_events}) == len(result.job_events)

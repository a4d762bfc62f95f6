"""Decoding and normalizing Celery events: real captured traffic, and what must not crash.

The fixture files are real Celery 5.7 traffic (docs/celery-protocol.md section 9),
made by tests/fixtures/capture.py, whose manifest names the notable jobs; the
event Celery sends but the captures lack (task-cancelled, on a lost connection)
is built the way kombu builds it.
"""

from __future__ import annotations

import base64
import json
import logging
from collections import Counter
from typing import Any

import pytest

from sluice_celery.events import KIND_AMQP, KIND_REDIS, normalize_batch
from sluice_core.merge import rebuild
from sluice_core.model import JobEvent, JobState, Normalized, RawBatch
from sluice_core.plugins import PluginManager
from tests.fixtures.services import FIXTURES, capture_manifest

REDIS = capture_manifest("redis")
WORKER = REDIS["worker"]  # the Redis capture's worker
ADD = REDIS["jobs"]["add"]  # tests.add(2, 3) -> 5
FLAKY = REDIS["jobs"]["retried"]  # failed once, retried with a countdown, succeeded
FAIL = REDIS["jobs"]["failed"]  # KeyError('k')
DIE = REDIS["jobs"]["lost"]  # its pool child was SIGKILLed
UNREGISTERED = REDIS["jobs"]["unregistered"]  # tests.does_not_exist
TERMINATED = REDIS["jobs"]["terminated"]  # revoked with terminate=True while running
EXPIRED = REDIS["jobs"]["expired"]  # revoked: expired while held for its ETA
REVOKED = REDIS["jobs"]["revoked"]  # revoked while held for its ETA
ON_ARRIVAL = REDIS["jobs"]["revoked_on_arrival"]  # revoked before the worker received it
REJECTED = REDIS["jobs"]["rejected"]  # raised Reject(requeue=False), acks_late
ETA = REDIS["jobs"]["eta"]  # held for its ETA (a countdown), then run
NO_SENT_EVENT = REDIS["jobs"]["no_sent_event"]  # its producer sends no task-sent
UNCONSUMED = REDIS["jobs"]["unconsumed"]  # on a queue no worker consumes
# Every task event Celery sends, but task-cancelled (a worker's lost connection).
CAPTURED_TASK_EVENTS = {
    "task-sent", "task-received", "task-started", "task-succeeded", "task-failed",
    "task-retried", "task-rejected", "task-revoked",
}


def load(name: str) -> list[dict[str, Any]]:
    with (FIXTURES / name).open() as lines:
        return [json.loads(line) for line in lines]


REDIS_RECORDS = load("redis-events.jsonl")
AMQP_RECORDS = load("amqp-events.jsonl")


def captured(job_id: str, type_: str) -> dict[str, Any]:
    """The one event of this type the Redis capture has for the job, as Celery sent it."""
    (event,) = [e for e in decoded(REDIS_RECORDS) if e.get("uuid") == job_id and e["type"] == type_]
    return event


def redis_batch(messages: list[tuple[str, bytes]]) -> RawBatch:
    return RawBatch(KIND_REDIS, "celery/redis://test", messages, 0.0)


def envelope(payload: Any, *, content_type: str = "application/json") -> bytes:
    """A message as kombu PUBLISHes it on Redis."""
    body = base64.b64encode(json.dumps(payload).encode()).decode()
    return json.dumps(
        {
            "body": body,
            "content-encoding": "utf-8",
            "content-type": content_type,
            "headers": {"hostname": "w1@testhost"},
            "properties": {"body_encoding": "base64", "delivery_tag": "t"},
        }
    ).encode()


def task_event(type_: str, **fields: Any) -> dict[str, Any]:
    return {
        "hostname": "w1@testhost", "utcoffset": 0.0, "pid": 6402, "clock": 7,
        "uuid": "0b0b0b0b-0000-4000-8000-000000000000", "timestamp": 1795483600.5,
        "type": type_, **fields,
    }


def normalize_one(event: dict[str, Any]) -> Normalized:
    return normalize_batch(redis_batch([("/0.celeryev/task.multi", envelope([event]))]))


@pytest.fixture(scope="module")
def redis_events() -> Normalized:
    return normalize_batch(
        redis_batch([(r["channel"], json.dumps(r["envelope"]).encode()) for r in REDIS_RECORDS])
    )


def decoded(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fixture's own decoding of each message, task.multi lists flattened."""
    out: list[dict[str, Any]] = []
    for record in records:
        event = record["event"]
        out += event if isinstance(event, list) else [event]
    return out


def by_job(normalized: Normalized) -> dict[str, list[JobEvent]]:
    jobs: dict[str, list[JobEvent]] = {}
    for event in normalized.job_events:
        jobs.setdefault(event.job_id, []).append(event)
    return jobs


def test_every_captured_redis_message_normalizes(redis_events: Normalized) -> None:
    expected = decoded(REDIS_RECORDS)
    assert (redis_events.malformed, redis_events.ignored) == (0, 0)
    assert len(redis_events.job_events) + len(redis_events.worker_events) == len(expected)
    assert any(r["channel"].endswith("task.multi") for r in REDIS_RECORDS)
    tasks = [e for e in expected if e["type"].startswith("task-")]
    assert [(e.job_id, e.type, e.timestamp) for e in redis_events.job_events] == [
        (e["uuid"], e["type"], e["timestamp"]) for e in tasks
    ]
    assert all(e.framework == "celery" for e in redis_events.job_events)
    assert {e["type"] for e in tasks} == CAPTURED_TASK_EVENTS
    types = Counter(e.type for e in redis_events.worker_events)
    on_wire = Counter(e["type"] for e in expected if e["type"].startswith("worker-"))
    assert types == {kind.removeprefix("worker-"): n for kind, n in on_wire.items()}
    assert (types["online"], types["offline"]) == (1, 1) and types["heartbeat"] > 1


def test_every_captured_amqp_event_normalizes() -> None:
    events = [r for r in AMQP_RECORDS if r["exchange"] == "celeryev"]
    messages = [(r["routing_key"], r["body"].encode()) for r in events]
    normalized = normalize_batch(RawBatch(KIND_AMQP, "celery/amqp://test", messages, 0.0))
    expected = decoded([{"event": json.loads(r["body"])} for r in events])
    assert (normalized.malformed, normalized.ignored) == (0, 0)
    assert len(normalized.job_events) + len(normalized.worker_events) == len(expected)
    assert [(e.job_id, e.type) for e in normalized.job_events] == [
        (e["uuid"], e["type"]) for e in expected if e["type"].startswith("task-")
    ]
    assert any(r["routing_key"] == "task.multi" for r in events)
    assert {e["type"] for e in expected if e["type"].startswith("task-")} == CAPTURED_TASK_EVENTS


def test_the_pidbox_commands_in_the_amqp_capture_are_not_events() -> None:
    commands = [r for r in AMQP_RECORDS if r["exchange"] == "celery.pidbox"]
    assert {json.loads(c["body"])["method"] for c in commands} == {"revoke"}
    messages = [(c["routing_key"], c["body"].encode()) for c in commands]
    normalized = normalize_batch(RawBatch(KIND_AMQP, "s", messages, 0.0))
    assert (normalized.malformed, normalized.job_events, normalized.worker_events) == (
        len(commands), [], [])


def test_states_follow_the_design_table(redis_events: Normalized) -> None:
    state_of_type = {
        "task-sent": {JobState.QUEUED},
        "task-received": {JobState.RECEIVED, JobState.SCHEDULED},
        "task-started": {JobState.ACTIVE},
        "task-succeeded": {JobState.COMPLETED},
        "task-failed": {JobState.FAILED, JobState.LOST},
        "task-retried": {JobState.RETRYING},
        "task-rejected": {JobState.REJECTED},
        "task-revoked": {JobState.REVOKED},
    }
    for event in redis_events.job_events:
        assert event.state in state_of_type[event.type], event


def test_sent_event_fields(redis_events: Normalized) -> None:
    sent = next(e for e in by_job(redis_events)[ADD] if e.type == "task-sent")
    raw = captured(ADD, "task-sent")
    assert raw["hostname"].startswith("gen")
    assert sent.worker is None  # gen<pid>@<host> is a producer, not a worker
    assert sent.fields == {
        "name": "tests.add", "args": "(2, 3)", "kwargs": "{}", "retries": 0,
        "root_id": ADD, "queue": "celery",
    }
    # The broker that carried it (the source's name): a retry publishes there.
    assert sent.extra == {"exchange": "", "routing_key": "celery", "broker": "redis://test"}
    assert sent.timestamp == raw["timestamp"]  # raw epoch, utcoffset not applied


def test_sent_event_without_queue_takes_the_routing_key() -> None:
    event = task_event("task-sent", name="t", queue=None, exchange="", routing_key="emails",
                       hostname="gen123@web1")
    (sent,) = normalize_one(event).job_events
    assert (sent.fields["queue"], sent.worker) == ("emails", None)


def test_received_is_scheduled_only_while_its_eta_is_ahead(redis_events: Normalized) -> None:
    received = [e for e in by_job(redis_events)[FLAKY] if e.type == "task-received"]
    first, retry = sorted(received, key=lambda e: e.fields["retries"])
    assert (first.state, first.worker) == (JobState.RECEIVED, WORKER)
    assert (retry.state, retry.fields["retries"]) == (JobState.SCHEDULED, 1)
    assert retry.fields["parent_id"] == FLAKY
    (held,) = [e for e in by_job(redis_events)[ETA] if e.type == "task-received"]
    assert held.state is JobState.SCHEDULED
    past_eta = task_event("task-received", name="t", eta="2026-11-24T01:26:00+00:00",
                          timestamp=1795483600.5)  # 01:26:40 UTC
    assert normalize_one(past_eta).job_events[0].state is JobState.RECEIVED


def test_outcomes_keep_result_exception_and_traceback(redis_events: Normalized) -> None:
    jobs = by_job(redis_events)
    succeeded = next(e for e in jobs[ADD] if e.state is JobState.COMPLETED)
    assert succeeded.fields["result"] == "5"
    assert succeeded.fields["runtime"] == captured(ADD, "task-succeeded")["runtime"] > 0
    failed = next(e for e in jobs[FAIL] if e.state is JobState.FAILED)
    assert failed.fields["exception"] == "KeyError('k')"
    assert "KeyError: 'k'" in failed.fields["traceback"]
    retried = next(e for e in jobs[FLAKY] if e.type == "task-retried")
    assert (retried.state, retried.fields["exception"]) == (JobState.RETRYING,
                                                           "RuntimeError('attempt 1 failed')")
    assert "Traceback" in retried.fields["traceback"]


def test_a_killed_pool_child_is_lost_not_failed(redis_events: Normalized) -> None:
    (outcome,) = [e for e in by_job(redis_events)[DIE] if e.type == "task-failed"]
    assert outcome.state is JobState.LOST
    # Celery sends "ExceptionWithTraceback()": the headline names what it wraps.
    assert outcome.fields["exception"].startswith(
        "WorkerLostError('Worker exited prematurely: signal 9 (SIGKILL) Job: "
    )
    bare = task_event("task-failed", exception="ExceptionWithTraceback()",
                      traceback="Traceback:\nbilliard.exceptions.WorkerLostError\n")
    assert normalize_one(bare).job_events[0].fields["exception"] == "WorkerLostError()"
    # Older Celery put the class in the exception itself.
    old = task_event("task-failed", exception="WorkerLostError('Worker exited prematurely')")
    assert normalize_one(old).job_events[0].state is JobState.LOST
    mention = task_event("task-failed", exception="ValueError()",
                         traceback="Traceback:\nValueError: not a WorkerLostError\n")
    assert normalize_one(mention).job_events[0].state is JobState.FAILED


def test_unregistered_task_takes_its_name_from_the_exception(redis_events: Normalized) -> None:
    (failed,) = [e for e in by_job(redis_events)[UNREGISTERED] if e.type == "task-failed"]
    assert failed.state is JobState.FAILED
    assert failed.fields == {
        "exception": "NotRegistered('tests.does_not_exist')", "name": "tests.does_not_exist",
    }


def test_revoked_rejected_and_cancelled(redis_events: Normalized) -> None:
    jobs = by_job(redis_events)
    (terminated,) = [e for e in jobs[TERMINATED] if e.type == "task-revoked"]
    assert (terminated.state, terminated.extra) == (
        JobState.REVOKED, {"terminated": True, "signum": 15, "expired": False})
    (expired,) = [e for e in jobs[EXPIRED] if e.type == "task-revoked"]
    assert expired.extra == {"terminated": False, "expired": True}
    for job_id in (REVOKED, ON_ARRIVAL):
        (revoked,) = [e for e in jobs[job_id] if e.type == "task-revoked"]
        assert (revoked.state, revoked.extra) == (
            JobState.REVOKED, {"terminated": False, "expired": False})
    # Revoked before it arrived: the worker drops it without a task-received.
    assert [e.type for e in jobs[ON_ARRIVAL]] == ["task-sent", "task-revoked"]

    # Reject(requeue=False): Celery reports a failure, then the rejection.
    rejected = [e for e in jobs[REJECTED] if e.type in ("task-failed", "task-rejected")]
    assert [(e.type, e.state) for e in rejected] == [
        ("task-failed", JobState.FAILED), ("task-rejected", JobState.REJECTED)]
    assert rejected[1].extra == {"requeue": False}
    # Cancelled on a lost connection: redelivered later, so only the timeline notes it.
    (cancelled,) = normalize_one(task_event("task-cancelled")).job_events
    assert (cancelled.type, cancelled.state) == ("task-cancelled", None)


def test_worker_events(redis_events: Normalized) -> None:
    raw = {e["type"]: e for e in decoded(REDIS_RECORDS) if e["type"] != "worker-heartbeat"}
    online = next(e for e in redis_events.worker_events if e.type == "online")
    assert (online.hostname, online.framework, online.timestamp) == (
        WORKER, "celery", raw["worker-online"]["timestamp"])
    assert (online.freq, online.active, online.processed, online.pid, online.sw_ver) == (
        2.0, 0, 0, raw["worker-online"]["pid"], "5.7.0")
    assert online.loadavg == raw["worker-online"]["loadavg"] and len(online.loadavg) == 3
    assert online.extra == {"sw_ident": "py-celery", "sw_sys": "Linux"}
    offline = next(e for e in redis_events.worker_events if e.type == "offline")
    # Every task run the worker started (both attempts of the retried one).
    started = [e for e in redis_events.job_events if e.type == "task-started"]
    assert offline.processed == raw["worker-offline"]["processed"] == len(started)


def test_captured_jobs_fold_into_the_rows_a_user_expects(redis_events: Normalized) -> None:
    jobs = by_job(redis_events)
    rows = {job_id: rebuild(job_id, "celery", events) for job_id, events in jobs.items()}
    assert (rows[ADD].state, rows[ADD].name, rows[ADD].result, rows[ADD].worker) == (
        JobState.COMPLETED, "tests.add", "5", WORKER)
    assert rows[FAIL].state is JobState.FAILED
    assert rows[DIE].state is JobState.LOST
    assert (rows[UNREGISTERED].state, rows[UNREGISTERED].name) == (
        JobState.FAILED, "tests.does_not_exist")
    for job_id in (TERMINATED, EXPIRED, REVOKED, ON_ARRIVAL):
        assert rows[job_id].state is JobState.REVOKED
    assert (rows[NO_SENT_EVENT].state, rows[NO_SENT_EVENT].name) == (
        JobState.COMPLETED, "tests.add")
    assert (rows[UNCONSUMED].state, rows[UNCONSUMED].queue) == (JobState.QUEUED, "nobody")


def test_event_ids_are_deterministic_and_distinct(redis_events: Normalized) -> None:
    ids = [e.id for e in redis_events.job_events]
    assert len(set(ids)) == len(ids)
    again = normalize_batch(
        redis_batch([(r["channel"], json.dumps(r["envelope"]).encode()) for r in REDIS_RECORDS])
    )
    assert [e.id for e in again.job_events] == ids
    # A redelivered message (or a second agent) yields the same id; a new attempt does not.
    event = task_event("task-started")
    twice = normalize_batch(redis_batch([("c", envelope(event)), ("c", envelope(event))]))
    assert twice.job_events[0].id == twice.job_events[1].id
    later = normalize_one({**event, "clock": 8, "timestamp": 1795483601.0})
    assert later.job_events[0].id != twice.job_events[0].id
    # Read from RabbitMQ instead of Redis: the same event, the same id.
    amqp = normalize_batch(RawBatch(KIND_AMQP, "s", [("task.started", json.dumps(event)
                                                      .encode())], 0.0))
    assert amqp.job_events[0].id == twice.job_events[0].id


GOOD = task_event("task-started")


@pytest.mark.parametrize(
    ("data", "malformed"),
    [
        pytest.param(b"{not json", 1, id="bad-json"),
        pytest.param(b"plain text from a stray PUBLISH", 1, id="stray-publish"),
        pytest.param(b"[1, 2]", 1, id="envelope-not-an-object"),
        pytest.param(json.dumps({"body": "!!notbase64!!", "content-type": "application/json",
                                 "properties": {"body_encoding": "base64"}}).encode(), 1,
                     id="bad-base64"),
        pytest.param(envelope(GOOD, content_type="application/x-python-serialize"), 1,
                     id="pickle-content-type"),
        pytest.param(json.dumps({"content-type": "application/json"}).encode(), 1,
                     id="no-body"),
        pytest.param(envelope([1, "x", None, []]), 4, id="list-of-garbage"),
        pytest.param(envelope("a string"), 1, id="event-not-an-object"),
        pytest.param(envelope({k: v for k, v in GOOD.items() if k != "uuid"}), 1,
                     id="missing-uuid"),
        pytest.param(envelope({k: v for k, v in GOOD.items() if k != "type"}), 1,
                     id="missing-type"),
        pytest.param(envelope({**GOOD, "hostname": None}), 1, id="missing-hostname"),
        pytest.param(envelope({**GOOD, "timestamp": "yesterday"}), 1, id="text-timestamp"),
        pytest.param(envelope(task_event("task-sent", args=[1, 2])), 1, id="args-not-repr"),
        pytest.param(envelope(task_event("task-received", retries="1")), 1,
                     id="text-retries"),
        pytest.param(envelope({**GOOD, "type": "worker-heartbeat", "loadavg": "high"}), 1,
                     id="loadavg-text"),
        pytest.param(envelope({**GOOD, "type": ["task-started"]}), 1, id="type-not-text"),
    ],
)
def test_malformed_input_is_counted_not_raised(data: bytes, malformed: int) -> None:
    good = envelope(GOOD)
    normalized = normalize_batch(redis_batch([("c", good), ("c", data), ("c", good)]))
    assert normalized.malformed == malformed
    # The good messages around it are still read.
    assert [e.type for e in normalized.job_events] == ["task-started", "task-started"]
    assert normalized.worker_events == []


def test_unknown_event_types_are_ignored() -> None:
    custom = {**GOOD, "type": "task-progress"}  # app.events.send of the app's own
    normalized = normalize_one(custom)
    assert (normalized.ignored, normalized.malformed, normalized.job_events) == (1, 0, [])


def test_a_burst_of_bad_messages_logs_a_line_not_one_per_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="sluice_celery.events"):
        normalized = normalize_batch(redis_batch([("c", b"junk %d" % i) for i in range(10_000)]))
    assert normalized.malformed == 10_000
    assert len(caplog.records) <= 1  # the throttle may already be closed by another test


def test_plugin_claims_only_celery_batches() -> None:
    pm = PluginManager()
    pm.load(["celery"])
    assert pm.normalize(RawBatch("rq/redis", "s", [("c", b"{}")], 0.0)) is None
    batch = redis_batch([("c", envelope(GOOD))])
    assert pm.normalize(batch) == normalize_batch(batch)
    amqp = RawBatch(KIND_AMQP, "s", [("task.started", json.dumps(GOOD).encode())], 0.0)
    assert pm.normalize(amqp) == normalize_batch(amqp)
    with pytest.raises(ValueError, match="not a Celery batch"):
        normalize_batch(RawBatch("rq/redis", "s", [], 0.0))

"""Property: whatever a broker or a sender hands Sluice, it survives, and stores every valid event.

Arbitrary Celery-shaped event dicts (every field optional, any JSON value in any field:
integers past 64 bits, NaN, NUL and every other control character, lone surrogates,
strings of hundreds of kilobytes) mixed with well-formed ones go through the real
engine: the Celery normalizer and the core's checks, the pipeline, storage (SQLite and
PostgreSQL), the JSON API and the SSE stream over HTTP. Each example must leave the
engine running, every event the door let in stored and streamed, every well-formed
event among them, nothing dead-lettered (the door leaves storage nothing to refuse),
and every page answering.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from typing import Any

import httpx
import orjson
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sluice_core.config import Config
from sluice_core.engine import Engine
from sluice_core.ingest import Malformed
from sluice_core.model import Normalized, RawBatch
from sluice_core.plugins import PluginManager
from sluice_core.storage import ApiKey
from tests.metrics import metric
from tests.test_agent import envelope
from tests.test_stream import sse

TASK_TYPES = [
    "task-sent", "task-received", "task-started", "task-succeeded", "task-failed",
    "task-retried", "task-rejected", "task-revoked", "task-cancelled",
]
WORKER_TYPES = ["worker-online", "worker-heartbeat", "worker-offline"]

# -- wild values ------------------------------------------------------------------------

_any_char = st.characters(exclude_categories=())  # surrogates and control characters too
wild_ints = st.one_of(
    st.integers(),
    st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, -(2**63) - 1]),
)
wild_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e12, -1e12, 253402300800.0, 1e308, 0.0]),
)
wild_text = st.one_of(
    st.text(_any_char, max_size=30),
    st.sampled_from(["\x00", "a\x00b", "\x1b[31m", "\ud800", "x" * 300_000, "é" * 70_000]),
)
# What broke Sluice before, tried first: a bounded number of examples finds them at once.
DANGEROUS = [
    2**31, 2**63, 2**64 - 1, -1, 1e12, -1e12, 1e308, float("nan"), "\x00", "a\x00b",
    "\x1b[2J", "x" * 300_000, "\ud800",
]
wild_values = st.recursive(
    st.sampled_from(DANGEROUS) | st.none() | st.booleans() | wild_ints | wild_floats | wild_text,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(_any_char, max_size=5), children, max_size=3),
    max_leaves=6,
)

# -- well-formed values -----------------------------------------------------------------

_printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
SANE: dict[str, st.SearchStrategy[Any]] = {
    "hostname": st.sampled_from(["celery@w1", "w2@host", "gen42@web"]),
    "timestamp": st.floats(1.7e9, 2.0e9),
    "name": st.sampled_from(["tasks.add", "tasks.mul", "app.jobs.report"]),
    "queue": st.sampled_from(["celery", "high", "low"]),
    "args": _printable,
    "kwargs": _printable,
    "result": _printable,
    "exception": _printable,
    "traceback": _printable,
    "retries": st.integers(0, 10),
    "runtime": st.floats(0, 3600),
    "eta": st.none(),
    "expires": st.none(),
    "root_id": st.uuids().map(str),
    "parent_id": st.uuids().map(str),
    "exchange": st.sampled_from(["", "celery"]),
    "routing_key": st.sampled_from(["celery", "high"]),
    "pid": st.integers(1, 4_000_000),
    "clock": st.integers(0, 10**6),
    "freq": st.floats(0.5, 10),
    "active": st.integers(0, 64),
    "processed": st.integers(0, 10**9),
    "loadavg": st.lists(st.floats(0, 64), min_size=3, max_size=3),
    "sw_ver": st.just("5.7.0"),
}
TASK_FIELDS = [
    "name", "queue", "args", "kwargs", "result", "exception", "traceback", "retries",
    "runtime", "eta", "expires", "root_id", "parent_id", "exchange", "routing_key", "pid",
    "clock",
]
WORKER_FIELDS = ["freq", "active", "processed", "loadavg", "pid", "sw_ver", "clock"]


def _event(types: list[str], fields: list[str], wild: bool) -> st.SearchStrategy[dict[str, Any]]:
    def value(key: str, sane: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(sane, wild_values) if wild else sane

    required = {
        "type": value("type", st.sampled_from(types)),
        "hostname": value("hostname", SANE["hostname"]),
        "timestamp": value("timestamp", SANE["timestamp"]),
    }
    if types is TASK_TYPES:
        required["uuid"] = value("uuid", st.uuids().map(str))
    optional = {key: value(key, SANE[key]) for key in fields}
    if wild:  # anything may be missing, and a broker may send keys no event has
        return st.fixed_dictionaries({}, optional={**required, **optional, "x": wild_values})
    return st.fixed_dictionaries(required, optional=optional)


_TEXT_KEYS = {
    "uuid", "type", "hostname", "name", "queue", "args", "kwargs", "result", "exception",
    "traceback", "root_id", "parent_id", "exchange", "routing_key", "sw_ver", "eta", "expires",
}
_NUMBER_KEYS = {"timestamp", "runtime", "freq"}


def _wild_like(key: str) -> st.SearchStrategy[Any]:
    """A wild value of the type the field has, mostly (the normalizer refuses a wrong type
    at once: what gets past it is what the core's checks are for), else any."""
    if key in _TEXT_KEYS:
        typed: st.SearchStrategy[Any] = wild_text
    elif key in _NUMBER_KEYS:
        typed = wild_floats | wild_ints
    elif key == "loadavg":
        typed = st.lists(wild_floats | wild_ints, max_size=20)
    else:
        typed = wild_ints
    return typed | wild_values


def _spoilt(events: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Well-formed events with one to three values made wild: the events a door must
    correct or refuse one value at a time (a wholly wild event is refused at once)."""
    keys = st.lists(
        st.sampled_from(["uuid", "hostname", "timestamp", *SANE]), min_size=1, max_size=3,
        unique=True,
    )
    spoilers = keys.flatmap(lambda ks: st.fixed_dictionaries({k: _wild_like(k) for k in ks}))
    return st.tuples(events, spoilers).map(lambda pair: {**pair[0], **pair[1]})


well_formed = st.one_of(_event(TASK_TYPES, TASK_FIELDS, False), _event(WORKER_TYPES,
                                                                     WORKER_FIELDS, False))
wild = st.one_of(
    _spoilt(well_formed),
    _spoilt(well_formed),  # twice the others' share: the events that reach the core's checks
    _event(TASK_TYPES, TASK_FIELDS, True),
    _event(WORKER_TYPES, WORKER_FIELDS, True),
    wild_values,
)
batches = st.lists(
    st.one_of(well_formed.map(lambda e: (True, e)), wild.map(lambda e: (False, e))),
    min_size=1,
    max_size=8,
)


def _known() -> list[tuple[bool, dict[str, Any]]]:
    """Every event that broke Sluice before (issue 16), each followed by a well-formed one
    that must still be stored: one batch, so that it costs one example."""
    now = time.time()
    task = {"type": "task-sent", "hostname": "gen1@h", "timestamp": now, "name": "tasks.add",
            "queue": "celery", "retries": 0}
    heartbeat = {"type": "worker-heartbeat", "hostname": "celery@w", "timestamp": now,
                 "freq": 2.0, "active": 0, "processed": 0, "pid": 42}
    hostile = [
        {"timestamp": 1e12}, {"processed": 2**63}, {"pid": 2**63}, {"active": 2**31},
        {"retries": 2**63}, {"name": "tasks.\x00add"}, {"hostname": "gen1@h\x00"},
        {"exchange": "ex\x00"}, {"args": "x" * 300_000},
    ]
    out: list[tuple[bool, dict[str, Any]]] = []
    for i, values in enumerate(hostile):
        bad = heartbeat if set(values) & {"active", "processed", "pid"} else task
        out.append((False, {**bad, "uuid": f"hostile-{i}", **values}))
        out.append((True, {**task, "uuid": f"after-{i}"}))
    return out


def _own(event: Any, suffix: str) -> Any:
    """The event with job and worker names of this example's own: examples share a
    database, and an event stored before would not be streamed again."""
    if type(event) is not dict:
        return event
    out = dict(event)
    for key in ("uuid", "hostname"):
        if type(out.get(key)) is str:
            out[key] += suffix
    return out


def _message(kind: str, event: Any) -> tuple[str, bytes]:
    # The standard library's json writes what orjson will not read (NaN, 2**70, a lone
    # surrogate): such a message is one the broker could carry, and Sluice must survive.
    if kind == "celery/redis":
        return "/0.celeryev/task.multi", envelope([event], "w@h")
    return "task.multi", json.dumps([event]).encode()


async def _through_sluice(url: str, kind: str, events: list[tuple[bool, Any]]) -> None:
    config = Config(db=url, plugin=["celery"], port=0, reader_process=False)
    pm = PluginManager()
    pm.load(config.plugins)
    pm.configure(config)
    engine = Engine(config, pm)
    batch = RawBatch(kind, "wild", [_message(kind, event) for _, event in events], time.time())
    # What the door lets in: the same pure functions the engine runs.
    let_in = pm.normalize(batch)
    assert let_in is not None
    well_formed = [event for sane, event in events if sane]
    assert let_in.malformed + sum(let_in.rejected.values()) <= len(events) - len(well_formed)
    with trio.fail_after(60):
        await _run_and_check(engine, batch, let_in, well_formed)


async def _run_and_check(
    engine: Engine, batch: RawBatch, let_in: Normalized, well_formed: list[dict[str, Any]]
) -> None:
    jobs = {event.job_id for event in let_in.job_events}
    workers = {event.hostname for event in let_in.worker_events}
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        base = engine.web_addresses[0].replace("0.0.0.0", "127.0.0.1")
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            async with client.stream("GET", "/api/stream") as response:
                events_seen = sse(response)
                assert "retry" in await anext(events_seen)  # subscribed
                engine.pipeline.put_raw(batch)
                streamed: dict[str, set[str]] = {"job": set(), "worker": set()}
                while not (jobs <= streamed["job"] and workers <= streamed["worker"]):
                    message = await anext(events_seen)
                    if message.get("event") in streamed:
                        data = orjson.loads(message["data"])
                        streamed[message["event"]].add(data.get("id") or data["hostname"])
            # Every event let in is stored, every well-formed one among them.
            for event in let_in.job_events:
                timeline = (await client.get(f"/api/jobs/{event.job_id}")).json()
                assert event.id in {e["id"] for e in timeline["events"]}
            for event in well_formed:
                if event["type"] in TASK_TYPES:
                    assert event["uuid"] in jobs
                else:
                    assert event["hostname"] in workers
            listed = {w["hostname"] for w in (await client.get("/api/workers")).json()}
            assert workers <= listed
            for path in ["/api/jobs", "/jobs", "/workers", "/", "/diagnostics"]:
                assert (await client.get(path)).status_code == 200, path
            assert metric(engine.metrics, "sluice_events_dead_lettered_total") == 0
            assert metric(engine.metrics, "sluice_storage_errors_total") == 0
        engine.stop()


async def _through_the_ingest_door(url: str, bodies: list[tuple[bool, Any]]) -> None:
    """Normalized events as an agent pushes them (POST /api/ingest's "sluice" format)."""
    config = Config(db=url, plugin=["celery"], reader_process=False)
    pm = PluginManager()
    pm.load(config.plugins)
    pm.configure(config)
    engine = Engine(config, pm)
    door = engine.ingest
    key = ApiKey(1, "wild", time.time())
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(engine.run, web=False))
        for sane, body in bodies:
            try:
                job_events, worker_events = door.decode(key, body)
            except Malformed:
                assert not sane, body
                continue  # refused whole, with a 400 saying why
            await door.store(key, job_events, worker_events)
            for event in job_events:
                assert event.id in {e.id for e in await engine.storage.job_events(event.job_id)}
        assert metric(engine.metrics, "sluice_events_dead_lettered_total") == 0
        assert metric(engine.metrics, "sluice_storage_errors_total") == 0
        engine.stop()


# One database for all examples: each example's jobs and workers have names of their own.
ONE_DB = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


def _check(url: str, kind: str, events: list[tuple[bool, Any]]) -> None:
    suffix = "-" + uuid.uuid4().hex[:8]
    owned = [(sane, _own(event, suffix)) for sane, event in events]
    trio.run(_through_sluice, url, kind, owned)


@pytest.mark.parametrize("kind", ["celery/redis", "celery/amqp"])
@settings(max_examples=12, deadline=None, suppress_health_check=ONE_DB)
@example(events=_known())
@given(events=batches)
def test_wild_broker_events_into_sqlite(
    sqlite_url: str, kind: str, events: list[tuple[bool, Any]]
) -> None:
    _check(sqlite_url, kind, events)


@settings(max_examples=8, deadline=None, suppress_health_check=ONE_DB)
@example(events=_known())
@given(events=batches)
def test_wild_broker_events_into_postgresql(
    pg_url: str, events: list[tuple[bool, Any]]
) -> None:
    _check(pg_url, "celery/redis", events)


_job_event_sane = st.fixed_dictionaries(
    {
        "id": st.uuids().map(str),
        "job_id": st.uuids().map(str),
        "framework": st.just("celery"),
        "type": st.sampled_from(TASK_TYPES),
        "state": st.sampled_from(["queued", "active", "completed"]),
        "timestamp": SANE["timestamp"],
    },
    optional={
        "fields": st.fixed_dictionaries(
            {}, optional={k: SANE[k] for k in ("name", "queue", "args", "retries", "runtime")}
        ),
        "worker": SANE["hostname"],
    },
)
_worker_event_sane = st.fixed_dictionaries(
    {
        "hostname": SANE["hostname"],
        "framework": st.just("celery"),
        "type": st.sampled_from(["online", "heartbeat", "offline"]),
        "timestamp": SANE["timestamp"],
    },
    optional={k: SANE[k] for k in ("freq", "active", "processed", "loadavg", "pid", "sw_ver")},
)


def _spoilt_json(sane: st.SearchStrategy[dict[str, Any]], keys: list[str]) -> Any:
    return st.tuples(
        sane, st.dictionaries(st.sampled_from(keys), wild_values, min_size=1, max_size=2)
    ).map(lambda pair: {**pair[0], **pair[1]})


_JOB_KEYS = ["id", "job_id", "framework", "type", "state", "timestamp", "worker", "extra"]
_WORKER_KEYS = ["hostname", "type", "timestamp", "freq", "active", "processed", "loadavg",
                "pid", "sw_ver", "extra"]
job_event_json_wild = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.uuids().map(str), wild_text),
        "job_id": st.one_of(st.uuids().map(str), wild_text),
        "framework": st.one_of(st.just("celery"), wild_text),
        "type": st.one_of(st.just("task-sent"), wild_text),
        "state": st.one_of(st.sampled_from(["queued", "active", "completed"]), wild_values),
        "timestamp": st.one_of(SANE["timestamp"], wild_floats, wild_ints),
        "worker": st.one_of(st.none(), wild_text),
        "fields": st.one_of(
            st.fixed_dictionaries({}, optional={k: wild_values for k in ("name", "retries",
                                                                        "runtime", "args")}),
            wild_values,
        ),
        "extra": st.one_of(st.dictionaries(wild_text, wild_values, max_size=3), wild_values),
    },
)
worker_event_json_wild = st.fixed_dictionaries(
    {},
    optional={
        "hostname": st.one_of(st.just("w@h"), wild_text),
        "framework": st.just("celery"),
        "type": st.one_of(st.sampled_from(["online", "heartbeat", "offline"]), wild_text),
        "timestamp": st.one_of(SANE["timestamp"], wild_floats),
        **{k: wild_values for k in ("freq", "active", "processed", "loadavg", "pid", "sw_ver")},
        "extra": st.one_of(st.dictionaries(wild_text, wild_values, max_size=3), wild_values),
    },
)
job_event_json = st.one_of(
    _job_event_sane, _spoilt_json(_job_event_sane, _JOB_KEYS), job_event_json_wild
)
worker_event_json = st.one_of(
    _worker_event_sane, _spoilt_json(_worker_event_sane, _WORKER_KEYS), worker_event_json_wild
)
def _body(jobs: Any, workers: Any) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"format": st.just("sluice")},
        optional={
            "job_events": st.lists(jobs, max_size=4),
            "worker_events": st.lists(workers, max_size=3),
        },
    )


pushed = st.lists(
    st.one_of(
        _body(_job_event_sane, _worker_event_sane).map(lambda body: (True, body)),
        _body(job_event_json, worker_event_json).map(lambda body: (False, body)),
    ),
    min_size=1,
    max_size=4,
)


def _known_pushed() -> list[tuple[bool, dict[str, Any]]]:
    """Normalized events that broke Sluice before (issue 16), as an agent could push them."""
    now = time.time()
    job = {"id": "e1", "job_id": "hostile", "framework": "celery", "type": "task-sent",
           "state": "queued", "timestamp": now}
    worker = {"hostname": "w@h", "framework": "celery", "type": "heartbeat", "timestamp": now}
    return [
        (False, {"format": "sluice", "job_events": [{**job, "timestamp": 1e12}]}),
        (False, {"format": "sluice", "job_events": [
            {**job, "fields": {"retries": 2**63, "name": "a\x00b"}, "worker": "w\x00"},
        ], "worker_events": [
            {**worker, "processed": 2**63, "active": 2**31, "hostname": "w\x00@h"},
        ]}),
        (True, {"format": "sluice", "job_events": [{**job, "id": "e2", "job_id": "after"}]}),
    ]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@settings(max_examples=15, deadline=None, suppress_health_check=ONE_DB)
@example(bodies=_known_pushed())
@given(bodies=pushed)
def test_wild_normalized_events_through_the_ingest_door(
    request: pytest.FixtureRequest, backend: str, bodies: list[tuple[bool, Any]]
) -> None:
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    # The body as the endpoint has it: parsed by orjson (which refuses NaN and 2**70).
    parsed = []
    for sane, body in bodies:
        try:
            parsed.append((sane, orjson.loads(json.dumps(body))))
        except orjson.JSONDecodeError:
            assert not sane
    trio.run(_through_the_ingest_door, url, parsed)

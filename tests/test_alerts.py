"""Alerting's core: storage on both backends, rules from outside, the evaluator (with
trio's autojump clock: no sleeps), the outbox with a fake channel type (the real
channel types are tested against real receivers in their own tests)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from sluice_core.alerting.evaluate import Evaluator, default_kinds
from sluice_core.alerting.model import (
    AlertService,
    DeliveryFailed,
    IncidentState,
    Invalid,
    Kind,
    Match,
    Message,
    NotFound,
    ReadOnly,
    Rule,
)
from sluice_core.alerting.outbox import Outbox, backoff
from sluice_core.alerting.rules import channel_by_id, parse_rule
from sluice_core.alerting.service import Alerts
from sluice_core.config import Config
from sluice_core.engine import Engine
from sluice_core.model import Job, JobEvent, JobState, QueueSample, WorkerEvent, event_id
from sluice_core.pipeline import SourceStatus
from sluice_core.plugins import PluginManager
from sluice_core.retention import DAY, RetentionPolicy
from sluice_core.storage import IngestResult, Notification, Storage, TimelineEntry
from sluice_storage.postgres import PostgresStorage
from sluice_storage.sqlite import SQLiteStorage
from tests.fixtures.storage import database_url, pg_admin

T0 = 1_800_000_000.0


# -- databases: built directly (the plugin manager loads every default plugin) --------------


@pytest.fixture
def pg_alerts_url() -> Iterator[str]:
    name = f"sluice_alerts_{uuid.uuid4().hex[:12]}"
    pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield database_url(name)
    finally:
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _backend(url: str) -> Storage:
    return SQLiteStorage(url) if url.startswith("sqlite") else PostgresStorage(url)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'alerts.db'}"
    else:
        url = request.getfixturevalue("pg_alerts_url")
    backend = _backend(url)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.aclose()


@pytest.fixture
async def lite(tmp_path: Path) -> AsyncIterator[Storage]:
    backend = SQLiteStorage(f"sqlite:///{tmp_path / 'alerts.db'}")
    await backend.open()
    try:
        yield backend
    finally:
        await backend.aclose()


# -- a fake channel type ----------------------------------------------------------------


@attrs.define
class FakeChannel:
    """Records what it is sent; ``failures`` are raised first, one per send."""

    name: str = "fake"
    secrets: tuple[str, ...] = ("token",)
    sent: list[Message] = attrs.Factory(list)
    failures: list[Exception] = attrs.Factory(list)

    def check(self, config: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(config.get("token"), str):
            raise Invalid("config.token", "required")
        return dict(config)

    async def send(self, config: Mapping[str, Any], message: Message) -> str:
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append(message)
        return "OK"


def clock() -> float:
    return T0 + trio.current_time()


def job(
    job_id: str, state: JobState, at: float, name: str = "billing.charge", **more: Any
) -> Job:
    return Job(id=job_id, framework="celery", state=state, name=name, queue="default",
               worker="w1@host", finished_at=at, updated_at=at, created_at=at - 1, **more)


def stored(*jobs: Job) -> IngestResult:
    return IngestResult(jobs=list(jobs), workers=[], events_stored=len(jobs))


async def setup(
    storage: Storage, kind: Kind, params: Mapping[str, Any] | None = None, **rule: Any
) -> tuple[Alerts, FakeChannel, Rule]:
    fake = FakeChannel()
    alerts = Alerts(storage, {"fake": fake}, public_url="https://sluice.example", clock=clock)
    channel = await alerts.add_channel({"name": "ops", "type": "fake", "config": {"token": "s3"}})
    made = await alerts.add_rule(
        {"name": f"{kind} rule", "kind": str(kind), "params": dict(params or {}),
         "channels": [channel.id], **rule}
    )
    return alerts, fake, made


def evaluator(storage: Storage) -> Evaluator:
    return Evaluator(storage, default_kinds(storage), public_url="https://sluice.example",
                     clock=clock)


async def queued(storage: Storage) -> list[Notification]:
    return await storage.due_notifications(clock() + 10**6, 1000)


# -- storage ------------------------------------------------------------------------------


async def test_storage_round_trips(store: Storage) -> None:
    alerts = Alerts(store, {"fake": FakeChannel()})
    service: AlertService = alerts  # what the web is given
    channel = await service.add_channel({"name": "ops", "type": "fake",
                                         "config": {"token": "s3cret", "room": "x"}})
    # The secret is stored in the clear, and shown masked.
    assert (await store.alert_channels())[0].config == {"token": "s3cret", "room": "x"}
    assert channel.to_dict()["config"] == {"token": "********", "room": "x"}
    with pytest.raises(Invalid) as exc:
        await service.add_channel({"name": "ops", "type": "fake", "config": {"token": "t"}})
    assert exc.value.field == "name"

    rule = await service.add_rule({
        "name": "charges", "kind": "failure_rate", "match": {"name": "billing.*"},
        "params": {"threshold": 0.5}, "severity": "critical", "channels": [channel.id],
        "for_s": 30, "repeat_s": 600,
    })
    assert (await service.rules()) == [rule]
    assert rule.params == {"window_s": 300.0, "threshold": 0.5, "min_runs": 10}
    updated = await service.update_rule(rule.id, {"name": "charges", "kind": "job_failed"})
    assert updated.kind is Kind.JOB_FAILED and updated.created_at == rule.created_at
    muted = await service.mute_rule(rule.id, T0)
    assert muted.muted_until == T0

    # File rules: upserted by name, read-only, and gone from the file means gone.
    (from_file,) = await alerts.load_file({"rules": [
        {"name": "lost", "kind": "job_lost", "channels": ["ops"]},
    ]})
    assert from_file.from_file and from_file.channels == (channel.id,)
    with pytest.raises(ReadOnly):
        await service.delete_rule(from_file.id)
    again = await store.replace_file_rules([attrs.evolve(from_file, severity="warning")])
    assert again[0].id == from_file.id and again[0].severity == "warning"
    assert await store.replace_file_rules([]) == []
    assert [r.name for r in await service.rules()] == ["charges"]

    # An incident with its timeline and a notification, stored together.
    evaluator = Evaluator(store, default_kinds(store), clock=lambda: T0)
    evaluator.feed(stored(job("j1", JobState.FAILED, T0)))  # not running: ignored
    incident = await store.save_incident(
        _incident(updated), [TimelineEntry(T0, "pending", "seen")],
        [Notification(None, channel.id, "incident.firing", {"x": 1}, T0, T0)],
    )
    assert incident.id > 0
    # A second open incident of the same rule and group: the first stands.
    assert (await store.save_incident(_incident(updated))).id == incident.id
    (row,) = await store.due_notifications(T0, 10)
    assert row.incident_id == incident.id and row.body == {"x": 1}
    await store.notification_attempted(row, TimelineEntry(T0 + 1, "failed", "HTTP 503"),
                                       retry_at=T0 + 2)
    assert await store.due_notifications(T0 + 1, 10) == []
    (row,) = await store.due_notifications(T0 + 2, 10)
    assert row.attempts == 1
    await store.notification_attempted(row, TimelineEntry(T0 + 3, "delivered", "OK"),
                                       delivered=True)
    assert await store.due_notifications(T0 + 10**6, 10) == []
    acked = await service.ack(incident.id, "ann")
    assert acked.acked_by == "ann"
    # The evaluator's copy does not undo an ack.
    await store.save_incident(attrs.evolve(incident, count=5))
    detail = await service.incident(incident.id)
    assert detail.incident.acked_by == "ann" and detail.incident.count == 5
    assert [e["what"] for e in detail.timeline] == ["pending", "failed", "delivered",
                                                    "acknowledged"]
    assert [i.id for i in await service.incidents(IncidentState.PENDING, 10)] == [incident.id]
    assert await service.incidents(IncidentState.FIRING, 10) == []
    # Deleting the rule resolves its incident and keeps it readable.
    await service.delete_rule(updated.id)
    resolved = (await service.incident(incident.id)).incident
    assert resolved.state is IncidentState.RESOLVED and resolved.resolved_at is not None
    with pytest.raises(NotFound):
        await service.incident(10**6)
    # Retention (issue 20): a resolved incident is kept as long as failed jobs, then goes
    # with its timeline and notifications.
    policy = RetentionPolicy(days=14, failed_days=30)
    kept = await store.prune(policy, resolved.resolved_at + 29 * DAY)
    assert kept.incidents == 0 and (await service.incident(incident.id)).timeline
    dry = await store.prune(policy, resolved.resolved_at + 31 * DAY, dry_run=True)
    pruned = await store.prune(policy, resolved.resolved_at + 31 * DAY)
    assert dry.incidents == pruned.incidents == 1
    with pytest.raises(NotFound):
        await service.incident(incident.id)
    assert await store.incident_timeline(incident.id) == []


def _incident(rule: Rule) -> Any:
    from sluice_core.alerting.model import Incident

    return Incident(id=0, rule_id=rule.id, rule_name=rule.name, kind=rule.kind,
                    group_key="billing.charge", labels={"name": "billing.charge"},
                    state=IncidentState.PENDING, severity=rule.severity, summary="s",
                    count=1, started_at=T0)


# -- rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "nope"}, "kind"),
        ({"kind": "schedule"}, "kind"),
        ({"kind": "job_failed", "match": {"name": "billing.[charge"}}, "match.name"),
        ({"kind": "job_failed", "match": {"colour": "x"}}, "match.colour"),
        ({"kind": "queue_depth", "match": {"exception": "x"}, "params": {"max_depth": 1}},
         "match.exception"),
        ({"kind": "job_failed", "channels": [99]}, "channels"),
        ({"kind": "job_failed", "channels": ["ops"]}, "channels"),
        ({"kind": "failure_rate", "params": {"threshold": 0.5, "window_s": -5}},
         "params.window_s"),
        ({"kind": "failure_rate", "params": {"threshold": 1.5}}, "params.threshold"),
        ({"kind": "failure_rate", "params": {}}, "params.threshold"),
        ({"kind": "runtime", "params": {"max_s": 10, "extra": 1}}, "params.extra"),
        ({"kind": "job_failed", "severity": "panic"}, "severity"),
        ({"kind": "job_failed", "for_s": -1}, "for_s"),
        ({"kind": "job_failed", "name": ""}, "name"),
    ],
)
def test_bad_rules_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(Invalid) as exc:
        parse_rule({"name": "r", **body}, channel_by_id({1}), now=T0)
    assert exc.value.field == field


def test_a_good_glob_with_sets_passes() -> None:
    rule = parse_rule({"name": "r", "kind": "job_failed", "match": {"name": "a.[!x]*[]]"},
                       "channels": [1]}, channel_by_id({1}), now=T0)
    assert rule.match == Match(name="a.[!x]*[]]") and rule.channels == (1,)


# -- the evaluator ------------------------------------------------------------------------


async def test_failures_grouped_then_resolved_by_a_success(
    lite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    _, _, rule = await setup(lite, Kind.JOB_FAILED)
    ev = evaluator(lite)
    ev.accepting = True
    for i in range(10):
        ev.feed(stored(job(f"f{i}", JobState.FAILED, clock(), exception="Boom: card")))
        ev.feed(stored(job(f"f{i}", JobState.FAILED, clock())))  # stored again: counted once
        await ev.evaluate(clock(), poll=i % 3 == 0)
        await trio.sleep(0.5)
    (incident,) = await lite.open_incidents()
    assert (incident.rule_id, incident.state, incident.count) == (
        rule.id, IncidentState.FIRING, 10
    )
    assert incident.summary == "10 runs of billing.charge failed; latest: Boom: card"
    (note,) = await queued(lite)
    assert note.body["incident"]["url"] == f"https://sluice.example/alerts/{incident.id}"
    assert ["Latest job", "https://sluice.example/jobs/f0"] in note.body["links"]
    ev.feed(stored(job("ok", JobState.COMPLETED, clock())))
    await ev.evaluate(clock(), poll=False)
    assert await lite.open_incidents() == []
    assert [n.event for n in await queued(lite)] == ["incident.firing", "incident.resolved"]


async def test_run_evaluates_what_is_fed(
    lite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    await setup(lite, Kind.JOB_FAILED)
    ev = evaluator(lite)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ev.run)
        await ev.evaluated.wait()  # the first round, at start
        ev.feed(stored(job("f1", JobState.FAILED, clock())))
        await ev.evaluated.wait()
        assert len(await lite.open_incidents()) == 1
        nursery.cancel_scope.cancel()


async def test_pending_period_repeat_and_ack(
    lite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    alerts, _, _ = await setup(lite, Kind.JOB_FAILED, {"resolve_s": 10_000}, for_s=60,
                               repeat_s=300)
    ev = evaluator(lite)
    ev.accepting = True
    ev.feed(stored(job("f1", JobState.FAILED, clock())))
    await ev.evaluate(clock())
    await trio.sleep(30)
    await ev.evaluate(clock())
    (incident,) = await lite.open_incidents()
    assert incident.state is IncidentState.PENDING and await queued(lite) == []
    await trio.sleep(35)
    await ev.evaluate(clock())
    (incident,) = await lite.open_incidents()
    assert incident.state is IncidentState.FIRING
    assert len(await queued(lite)) == 1
    await trio.sleep(300)
    await ev.evaluate(clock())
    assert len(await queued(lite)) == 2  # repeated
    await alerts.ack(incident.id, "ann")
    await trio.sleep(900)
    await ev.evaluate(clock())
    assert len(await queued(lite)) == 2  # acknowledged: no more repeats


async def test_resolves_after_quiet_time(
    lite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    await setup(lite, Kind.JOB_LOST, {"resolve_s": 120})
    ev = evaluator(lite)
    ev.accepting = True
    ev.feed(stored(job("l1", JobState.LOST, clock())))
    await ev.evaluate(clock())
    assert len(await lite.open_incidents()) == 1
    await trio.sleep(130)
    await ev.evaluate(clock())
    assert await lite.open_incidents() == []


async def test_restart_neither_renotifies_nor_forgets(
    store: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    await setup(store, Kind.JOB_FAILED)
    first = evaluator(store)
    first.accepting = True
    first.feed(stored(job("f1", JobState.FAILED, clock())))
    await first.evaluate(clock())
    assert len(await queued(store)) == 1
    # A new evaluator on the same database: the incident is still firing, once.
    second = evaluator(store)
    await second.evaluate(clock())
    await second.evaluate(clock() + 5)
    (incident,) = await store.open_incidents()
    assert incident.state is IncidentState.FIRING and len(await queued(store)) == 1
    # The task succeeded while Sluice was down: the next start resolves the incident.
    await _ingest_success(store, "billing.charge", clock() + 10)
    third = evaluator(store)
    await third.evaluate(clock() + 20)
    assert await store.open_incidents() == []
    assert [n.event for n in await queued(store)] == ["incident.firing", "incident.resolved"]


async def _ingest_success(storage: Storage, name: str, at: float) -> None:
    events = [
        JobEvent(event_id("ok", kind), "ok", "celery", kind, state, at + i, "w1@host",
                 {"name": name} if i == 0 else {})
        for i, (kind, state) in enumerate(
            [("task-received", JobState.RECEIVED), ("task-succeeded", JobState.COMPLETED)]
        )
    ]
    await storage.ingest(events, [])


async def test_failure_rate_window_and_min_runs(
    lite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    await setup(lite, Kind.FAILURE_RATE, {"window_s": 600, "threshold": 0.5, "min_runs": 4})
    ev = evaluator(lite)

    async def runs(n: int, state: JobState, start: int) -> None:
        events = []
        for i in range(start, start + n):
            outcome = "task-failed" if state is JobState.FAILED else "task-succeeded"
            at = clock()
            events += [
                JobEvent(event_id(i, "r"), f"j{i}", "celery", "task-received",
                         JobState.RECEIVED, at, "w1@host", {"name": "billing.charge"}),
                JobEvent(event_id(i, "o"), f"j{i}", "celery", outcome, state, at + 0.1,
                         "w1@host"),
            ]
        await lite.ingest(events, [])

    await runs(2, JobState.FAILED, 0)
    await ev.evaluate(clock())
    assert await lite.open_incidents() == []  # 2 runs: fewer than min_runs
    await runs(1, JobState.COMPLETED, 2)
    await runs(1, JobState.FAILED, 3)
    await ev.evaluate(clock())
    (incident,) = await lite.open_incidents()  # 3 of 4 failed
    assert incident.summary == "3 of 4 runs of billing.charge failed in the last 10 min (75%)"
    await trio.sleep(700)  # the failures leave the window
    await runs(4, JobState.COMPLETED, 10)
    await ev.evaluate(clock())
    assert await lite.open_incidents() == []


async def test_worker_offline_fires_and_resolves(
    lite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    await setup(lite, Kind.WORKER_OFFLINE)
    ev = evaluator(lite)

    async def heard(kind: str) -> None:
        await lite.ingest([], [WorkerEvent("w1@host", "celery", kind, clock(), freq=2.0)])

    await heard("online")
    await ev.evaluate(clock())
    assert await lite.open_incidents() == []
    await trio.sleep(10)
    await heard("offline")
    await ev.evaluate(clock())
    (incident,) = await lite.open_incidents()
    assert incident.labels == {"worker": "w1@host"} and incident.state is IncidentState.FIRING
    await heard("online")
    await ev.evaluate(clock())
    assert await lite.open_incidents() == []
    assert [n.event for n in await queued(lite)] == ["incident.firing", "incident.resolved"]


async def test_muted_rule_tracks_without_notifying(
    lite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    alerts, _, rule = await setup(lite, Kind.JOB_FAILED)
    await alerts.mute_rule(rule.id, clock() + 60)
    ev = evaluator(lite)
    await ev.evaluate(clock())
    ev.accepting = True
    ev.feed(stored(job("f1", JobState.FAILED, clock())))
    await ev.evaluate(clock())
    (incident,) = await lite.open_incidents()
    assert incident.state is IncidentState.FIRING and await queued(lite) == []
    await trio.sleep(61)
    await ev.evaluate(clock())  # the mute is over: it is announced now
    assert len(await queued(lite)) == 1


# -- the outbox ---------------------------------------------------------------------------


async def _queue(storage: Storage, channel_id: int, n: int) -> None:
    for i in range(n):
        incident = await storage.save_incident(
            attrs.evolve(_incident(await _any_rule(storage)), group_key=f"g{i}")
        )
        body = {"event": "incident.firing", "incident": incident.to_dict(), "text": f"t{i}",
                "links": [], "incidents": []}
        await storage.save_incident(incident, [], [
            Notification(incident.id, channel_id, "incident.firing", body, clock(), clock())
        ])


async def _any_rule(storage: Storage) -> Rule:
    return (await storage.alert_rules())[0]


async def test_outbox_retries_with_backoff_and_gives_up_on_4xx(
    lite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    alerts, fake, _ = await setup(lite, Kind.JOB_FAILED)
    channel = (await alerts.channels())[0]
    fake.failures = [DeliveryFailed("HTTP 503", retry=True), DeliveryFailed("HTTP 503", retry=True)]
    await _queue(lite, channel.id, 1)
    outbox = Outbox(lite, {"fake": fake}, clock=clock)
    await outbox.deliver_due()
    await outbox.deliver_due()
    assert fake.sent == []
    await trio.sleep(1)
    await outbox.deliver_due()  # the second try, 1 s later, fails too
    await trio.sleep(1.5)
    await outbox.deliver_due()
    assert fake.sent == []  # the third is due 2 s after the second
    await trio.sleep(0.5)
    await outbox.deliver_due()
    (message,) = fake.sent
    assert message.id.startswith("sluice-notification-")
    (incident,) = await lite.open_incidents()
    timeline = [e["what"] for e in (await alerts.incident(incident.id)).timeline]
    assert timeline == ["failed", "failed", "delivered"]
    # A 4xx is not retried.
    fake.failures = [DeliveryFailed("HTTP 400", retry=False)]
    await _queue_one_more(lite, channel.id)
    await outbox.deliver_due()
    assert await queued(lite) == [] and len(fake.sent) == 1
    assert [backoff(n) for n in (1, 2, 3, 10, 20)] == [1, 2, 4, 300, 300]


async def _queue_one_more(storage: Storage, channel_id: int) -> None:
    await storage.replace_file_rules([])
    rule = await _any_rule(storage)
    incident = await storage.save_incident(attrs.evolve(_incident(rule), group_key="other"))
    await storage.save_incident(incident, [], [Notification(
        incident.id, channel_id, "incident.firing",
        {"event": "incident.firing", "incident": incident.to_dict(), "text": "x", "links": []},
        clock(), clock())])


async def test_rate_limit_sends_one_summary(
    lite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    alerts, fake, _ = await setup(lite, Kind.JOB_FAILED)
    channel = (await alerts.channels())[0]
    outbox = Outbox(lite, {"fake": fake}, clock=clock, rate_limit=3)
    await _queue(lite, channel.id, 2)
    await outbox.deliver_due()
    assert len(fake.sent) == 2
    await _queue(lite, channel.id, 20)  # a storm
    await outbox.deliver_due()
    assert [m.event for m in fake.sent] == ["incident.firing"] * 2 + ["summary"]
    assert len(fake.sent[-1].incidents) == 20
    await outbox.deliver_due()
    assert len(fake.sent) == 3 and await queued(lite) == []


async def test_test_notification_is_sent_now(lite: Storage) -> None:
    fake = FakeChannel()
    alerts = Alerts(lite, {"fake": fake})
    channel = await alerts.add_channel({"name": "ops", "type": "fake", "config": {"token": "t"}})
    assert await alerts.test_channel(channel.id) == "OK"
    assert fake.sent[0].event == "test"
    with pytest.raises(Invalid) as exc:
        await alerts.add_channel({"name": "x", "type": "fake", "config": {}})
    assert exc.value.field == "config.token"
    with pytest.raises(Invalid) as exc:
        await alerts.add_channel({"name": "x", "type": "pigeon", "config": {}})
    assert exc.value.field == "type"



# -- the other kinds: runtime, queue_wait, queue_depth, no_consumer, sluice_health ------------


async def _events(storage: Storage, job_id: str, *steps: tuple[str, JobState, float],
                  **fields: Any) -> IngestResult:
    """Store a job's events (``steps``: type, state, when); the first carries ``fields``."""
    return await storage.ingest([
        JobEvent(event_id(job_id, kind, at), job_id, "celery", kind, state, at, "w1@host",
                 {"name": "billing.charge", **fields} if i == 0 else {})
        for i, (kind, state, at) in enumerate(steps)
    ], [])


def _started(at: float) -> tuple[tuple[str, JobState, float], ...]:
    return (("task-received", JobState.RECEIVED, at), ("task-started", JobState.ACTIVE, at))


def _done(at: float) -> tuple[str, JobState, float]:
    return ("task-succeeded", JobState.COMPLETED, at)


async def test_runtime_counts_running_and_finished_late_runs(
    lite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    await setup(lite, Kind.RUNTIME, {"max_s": 60, "resolve_s": 600})
    ev = evaluator(lite)
    ev.accepting = True
    await _events(lite, "slow", *_started(clock()))
    await ev.evaluate(clock())
    assert await lite.open_incidents() == []  # running, not for long yet
    await trio.sleep(61)
    await ev.evaluate(clock())
    (incident,) = await lite.open_incidents()
    assert incident.state is IncidentState.FIRING and incident.job_ids == ["slow"]
    assert incident.summary == "1 job of name billing.charge running for more than 1 min"
    # A quick run of the name does not clear it while the slow one still runs.
    ev.feed(await _events(lite, "quick1", *_started(clock()), _done(clock() + 1)))
    await ev.evaluate(clock() + 1, poll=False)
    assert [i.id for i in await lite.open_incidents()] == [incident.id]
    # The slow one finishes late: the same job, counted once; a poll no longer finding
    # a late run does not resolve it (a late run is news until a run is on time).
    await trio.sleep(30)
    ev.feed(await _events(lite, "slow", _done(clock())))
    await ev.evaluate(clock(), poll=False)
    await ev.evaluate(clock())
    (still,) = await lite.open_incidents()
    assert (still.id, still.count) == (incident.id, 1)
    # The next quick run resolves it.
    ev.feed(await _events(lite, "quick2", *_started(clock()), _done(clock() + 2)))
    await ev.evaluate(clock() + 2, poll=False)
    assert await lite.open_incidents() == []
    assert [n.event for n in await queued(lite)] == ["incident.firing", "incident.resolved"]

    # A run that finished late, never seen running late (between two polls, or a
    # runtime the worker reports): told by ingest, it fires at once.
    await trio.sleep(10)
    ev.feed(await _events(lite, "late", *_started(clock() - 90), _done(clock())))
    await ev.evaluate(clock(), poll=False)
    (late,) = await lite.open_incidents()
    assert late.state is IncidentState.FIRING and late.job_ids == ["late"]
    assert late.summary == "1 run of billing.charge took too long; latest: 90 s, more than 1 min"
    # With no late run for resolve_s, it resolves on its own.
    await trio.sleep(599)
    await ev.evaluate(clock())
    assert len(await lite.open_incidents()) == 1
    await trio.sleep(2)
    await ev.evaluate(clock())
    assert await lite.open_incidents() == []
    timeline = [(e.what, e.detail) for e in await lite.incident_timeline(late.id)]
    assert timeline[-2] == ("resolved", "no new occurrence for 10 min")


async def test_runtime_survives_a_restart_with_a_run_still_late(
    lite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    await setup(lite, Kind.RUNTIME, {"max_s": 60})
    first = evaluator(lite)
    await _events(lite, "slow", *_started(clock()))
    await trio.sleep(61)
    await first.evaluate(clock())
    (incident,) = await lite.open_incidents()
    # A quick run completed while Sluice was down: the slow one still runs late, so the
    # next start keeps the incident, announced once.
    await _events(lite, "quick", *_started(clock()), _done(clock() + 1))
    second = evaluator(lite)
    await second.evaluate(clock() + 5)
    assert [i.id for i in await lite.open_incidents()] == [incident.id]
    assert len(await queued(lite)) == 1


async def test_queue_wait_fires_per_queue_and_resolves_once_taken(
    lite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    await setup(lite, Kind.QUEUE_WAIT, {"max_s": 30}, match={"queue": "mail"})
    ev = evaluator(lite)
    for job_id, queue in (("m1", "mail"), ("m2", "mail"), ("o1", "other")):
        await _events(lite, job_id, ("task-sent", JobState.QUEUED, clock()), queue=queue)
    await ev.evaluate(clock())
    assert await lite.open_incidents() == []
    await trio.sleep(31)
    await ev.evaluate(clock())
    (incident,) = await lite.open_incidents()  # "other" is not matched
    assert incident.labels == {"queue": "mail"} and incident.count == 2
    assert incident.summary == "2 jobs of queue mail waiting in queue for more than 30 s"
    assert sorted(incident.job_ids) == ["m1", "m2"]
    await _events(lite, "m1", ("task-received", JobState.RECEIVED, clock()))
    await ev.evaluate(clock())
    (incident,) = await lite.open_incidents()
    assert incident.count == 1 and incident.job_ids == ["m2"]
    await _events(lite, "m2", ("task-received", JobState.RECEIVED, clock()))
    await ev.evaluate(clock())
    assert await lite.open_incidents() == []
    assert [n.event for n in await queued(lite)] == ["incident.firing", "incident.resolved"]


def _sample(depth: int | None, consumers: int | None, queue: str = "default") -> QueueSample:
    return QueueSample(queue, "celery", "redis://127.0.0.1:6379/0", clock(), depth=depth,
                       consumers=consumers)


async def test_queue_depth_fires_after_for_s_of_samples(
    lite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    await setup(lite, Kind.QUEUE_DEPTH, {"max_depth": 10}, for_s=30)
    ev = evaluator(lite)
    # Deep for less than for_s: it never fires, nothing is sent.
    await lite.record_queue_samples([_sample(50, 1)])
    await ev.evaluate(clock())
    (blip,) = await lite.open_incidents()
    assert blip.state is IncidentState.PENDING
    await trio.sleep(20)
    await lite.record_queue_samples([_sample(10, 1)])  # at the bound is not above it
    await ev.evaluate(clock())
    assert await lite.open_incidents() == [] and await queued(lite) == []
    # Deep for longer than for_s, sample after sample: fires, once.
    for depth in (40, 45, 60, 70):
        await trio.sleep(10)
        await lite.record_queue_samples([_sample(depth, 1), _sample(3, 1, "small")])
        await ev.evaluate(clock())
    (incident,) = await lite.open_incidents()
    assert incident.state is IncidentState.FIRING
    assert incident.labels == {"queue": "default", "broker": "redis://127.0.0.1:6379/0"}
    assert incident.summary == "queue default holds 70 messages (more than 10)"
    assert incident.count == 70
    await lite.record_queue_samples([_sample(2, 1)])
    await ev.evaluate(clock())
    assert await lite.open_incidents() == []
    assert [n.event for n in await queued(lite)] == ["incident.firing", "incident.resolved"]
    timeline = [e.what for e in await lite.incident_timeline(blip.id)]
    assert timeline == ["pending", "resolved"]


async def test_no_consumer_needs_messages_and_a_known_zero(
    lite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    await setup(lite, Kind.NO_CONSUMER)
    ev = evaluator(lite)
    # Empty with no consumer, or a probe that cannot count consumers: nothing to say.
    await lite.record_queue_samples([_sample(0, 0), _sample(5, None, "uncounted")])
    await ev.evaluate(clock())
    assert await lite.open_incidents() == []
    await trio.sleep(5)
    await lite.record_queue_samples([_sample(5, 0)])
    await ev.evaluate(clock())
    (incident,) = await lite.open_incidents()
    assert incident.state is IncidentState.FIRING
    assert incident.summary == "queue default holds 5 messages and has no consumer"
    await trio.sleep(5)
    await lite.record_queue_samples([_sample(6, 1)])  # a worker consumes it again
    await ev.evaluate(clock())
    assert await lite.open_incidents() == []
    assert [n.event for n in await queued(lite)] == ["incident.firing", "incident.resolved"]


async def test_sluice_health_fires_per_problem_and_resolves(
    lite: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    await setup(lite, Kind.SLUICE_HEALTH, {"max_lag_s": 30})
    now_wrong: dict[str, str] = {}
    asked: list[tuple[float, float]] = []

    async def problems(max_lag_s: float, now: float) -> dict[str, str]:
        asked.append((max_lag_s, now))
        return dict(now_wrong)

    ev = Evaluator(lite, default_kinds(lite, problems), clock=clock)
    await ev.evaluate(clock())
    assert await lite.open_incidents() == [] and asked == [(30.0, clock())]
    now_wrong.update({"source:redis": "source redis is down: refused", "lag": "late"})
    await ev.evaluate(clock())
    incidents = {i.group_key: i for i in await lite.open_incidents()}
    assert sorted(incidents) == ["lag", "source:redis"]
    assert incidents["source:redis"].labels == {"check": "source:redis"}
    assert incidents["source:redis"].summary == "source redis is down: refused"
    del now_wrong["source:redis"]
    await ev.evaluate(clock())
    assert [i.group_key for i in await lite.open_incidents()] == ["lag"]
    assert [n.event for n in await queued(lite)].count("incident.resolved") == 1


async def test_engine_reports_sources_down_lag_and_drops(tmp_path: Path) -> None:
    """Engine._health_problems, what sluice_health reads: the engine is built, not run."""
    pm = PluginManager()
    pm.load(["celery"])
    config = Config(db=f"sqlite:///{tmp_path}/s.db", broker=["redis://127.0.0.1:6379/0"])
    pm.configure(config)
    engine = Engine(config, pm)
    (source,) = engine.sources
    now = T0
    assert await engine._health_problems(60, now) == {}
    engine.pipeline.sources[source.name] = SourceStatus(False, "connection refused", now)
    engine.pipeline.writes.writing(now - 89)  # a batch read 90 s before the next look
    engine.metrics.events_dropped.labels(source.name).inc(7)
    found = await engine._health_problems(60, now + 1)
    assert found == {
        f"source:{source.name}": f"source {source.name} is down: connection refused",
        "lag": "events read 90 s ago are not stored yet (more than 60 s)",
        f"dropped:{source.name}": f"7 events of {source.name} dropped (buffers full)",
    }
    assert "lag" not in await engine._health_problems(120, now + 1)  # a looser rule
    # Up again, the batch stored, no new drop since the last look.
    engine.pipeline.sources[source.name] = SourceStatus(True, "", now + 5)
    engine.pipeline.writes.written(now - 89)
    assert await engine._health_problems(60, now + 5) == {}


# -- channels as code ([[alerts.channels]]) ---------------------------------------------------


async def test_file_channels_are_loaded_named_by_rules_and_read_only(
    store: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeChannel()
    alerts = Alerts(store, {"fake": fake}, clock=lambda: T0)
    made = await alerts.add_channel({"name": "api", "type": "fake", "config": {"token": "t"}})
    environ = {"SLUICE_HOOK_TOKEN": "s3cret-from-env"}
    table = {
        "channels": [{"name": "hook", "type": "fake",
                      "config": {"token_env": "SLUICE_HOOK_TOKEN", "room": "ops"}}],
        "rules": [{"name": "lost", "kind": "job_lost", "channels": ["hook", "api"]}],
    }
    with caplog.at_level("DEBUG"):
        (rule,) = await alerts.load_file(table, environ)
    assert "s3cret-from-env" not in caplog.text
    hook = next(c for c in await alerts.channels() if c.name == "hook")
    assert rule.channels == (hook.id, made.id)
    # The environment's value is what is stored and sent, and masked when shown.
    assert hook.from_file and hook.config == {"token": "s3cret-from-env", "room": "ops"}
    assert hook.to_dict()["config"] == {"token": "********", "room": "ops"}
    assert hook.to_dict()["read_only"] is True and made.to_dict()["read_only"] is False
    # Tested, not deleted, through the API.
    assert await alerts.test_channel(hook.id) == "OK"
    with pytest.raises(ReadOnly):
        await alerts.delete_channel(hook.id)
    # The next start: the same id (rules keep naming it), the new secret; gone from the
    # file means gone, and the API's channel stays.
    environ["SLUICE_HOOK_TOKEN"] = "rotated"
    await alerts.load_file(table, environ)
    (again,) = [c for c in await alerts.channels() if c.from_file]
    assert (again.id, again.config["token"]) == (hook.id, "rotated")
    assert await alerts.load_file({}, environ) == []
    assert [c.name for c in await alerts.channels()] == ["api"]


@pytest.mark.parametrize(
    ("channel", "field"),
    [
        ({"type": "fake", "config": {"token": "t"}}, "alerts.channels[0].name"),
        ({"name": "x", "type": "pigeon", "config": {}}, "alerts.channels[0].type"),
        ({"name": "x", "type": "fake", "config": {}}, "alerts.channels[0].config.token"),
        ({"name": "x", "type": "fake", "config": {"token_env": "UNSET_VAR"}},
         "alerts.channels[0].config.token_env"),
        ({"name": "x", "type": "fake", "config": {"token": "t", "token_env": "SET_VAR"}},
         "alerts.channels[0].config.token_env"),
        ({"name": "x", "type": "fake", "config": {"token": "t"}, "colour": "red"},
         "alerts.channels[0].colour"),
        ({"name": "api", "type": "fake", "config": {"token": "t"}}, "alerts.channels"),
    ],
)
async def test_bad_file_channels_name_the_place(
    lite: Storage, channel: dict[str, Any], field: str
) -> None:
    alerts = Alerts(lite, {"fake": FakeChannel()})
    await alerts.add_channel({"name": "api", "type": "fake", "config": {"token": "t"}})
    with pytest.raises(Invalid) as exc:
        await alerts.load_file({"channels": [channel]}, {"SET_VAR": "s3cret"})
    assert exc.value.field == field
    assert "s3cret" not in str(exc.value)


async def test_rate_limit_outlives_a_restart(
    store: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    alerts, fake, _ = await setup(store, Kind.JOB_FAILED)
    channel = (await alerts.channels())[0]
    await _queue(store, channel.id, 3)
    await Outbox(store, {"fake": fake}, clock=clock, rate_limit=3).deliver_due()
    assert len(fake.sent) == 3
    # A new process (a restart, a new leader) reads the window back from the outbox.
    await trio.sleep(30)
    again = Outbox(store, {"fake": fake}, clock=clock, rate_limit=3)
    await _queue_one_more(store, channel.id)
    await again.deliver_due()
    assert len(fake.sent) == 3 and len(await queued(store)) == 1  # held
    await trio.sleep(31)  # the three leave the window
    await again.deliver_due()
    assert len(fake.sent) == 4 and await queued(store) == []

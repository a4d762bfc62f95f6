"""An in-memory :class:`~sluice_core.alerting.model.AlertService` for web tests.

It checks bodies as issue 19's contract says the real service does, and says so the same
way: :class:`Invalid` naming the field first ("kind: unknown kind 'x' (known: ...)"),
:class:`NotFound` for an unknown id, :class:`ReadOnly` for a rule from the file. Incidents
are put in by the tests (:meth:`FakeAlerts.open`); nothing is evaluated or delivered.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

from sluice_core.alerting.model import (
    SEVERITIES,
    Channel,
    DeliveryFailed,
    Incident,
    IncidentDetail,
    IncidentState,
    Invalid,
    Kind,
    Match,
    NotFound,
    ReadOnly,
    Rule,
)

T0 = 1_780_000_000.0

# The contract's channel types: (required config keys, secret keys).
CHANNEL_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "webhook": (("url", "secret"), ("secret",)),
    "slack": (("webhook_url",), ("webhook_url",)),
    "pagerduty": (("routing_key",), ("routing_key",)),
    "email": (("host", "port", "from", "to"), ("password",)),
}
# The contract's parameters by kind, each a number >= 0 (threshold: 0-1).
PARAMS: dict[Kind, tuple[str, ...]] = {
    Kind.JOB_FAILED: ("resolve_s",),
    Kind.FAILURE_RATE: ("window_s", "threshold", "min_runs"),
    Kind.RUNTIME: ("max_s",),
    Kind.QUEUE_WAIT: ("max_s",),
    Kind.QUEUE_DEPTH: ("max_depth",),
    Kind.SLUICE_HEALTH: ("max_lag_s",),
}


def _text(body: Mapping[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value.strip():
        raise Invalid(field, "expected a non-empty string")
    return value.strip()


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise Invalid(field, f"expected a number >= 0, not {value!r}")
    return float(value)


def _glob(field: str, value: str) -> str:
    # An unclosed "[" is what fnmatch would silently take as a literal.
    if re.search(r"\[(?![^\]]*\])", value):
        raise Invalid(field, f"bad glob {value!r}: '[' is never closed")
    return value


class FakeAlerts:
    def __init__(self, public_url: str | None = None) -> None:
        self.public_url = public_url
        self._channels: dict[int, Channel] = {}
        self._rules: dict[int, Rule] = {}
        self._incidents: dict[int, Incident] = {}
        self.timelines: dict[int, list[dict[str, Any]]] = {}
        self.failing: set[int] = set()  # channels whose test delivery fails
        self._next = 1

    def _id(self) -> int:
        self._next += 1
        return self._next - 1

    # -- channels

    def channel_types(self) -> list[str]:
        return list(CHANNEL_TYPES)

    async def channels(self) -> list[Channel]:
        return list(self._channels.values())

    async def add_channel(self, body: Mapping[str, Any]) -> Channel:
        name = _text(body, "name")
        kind = body.get("type")
        if kind not in CHANNEL_TYPES:
            raise Invalid(
                "type", f"unknown channel type {kind!r} (known: {', '.join(CHANNEL_TYPES)})"
            )
        config = body.get("config")
        if not isinstance(config, dict):
            raise Invalid("config", "expected an object")
        required, secrets = CHANNEL_TYPES[kind]
        for key in required:
            if config.get(key) in (None, "", []):
                raise Invalid(f"config.{key}", "required")
        channel = Channel(self._id(), name, kind, dict(config), secrets, created_at=T0)
        self._channels[channel.id] = channel
        return channel

    async def delete_channel(self, channel_id: int) -> None:
        self._channel(channel_id)
        del self._channels[channel_id]

    async def test_channel(self, channel_id: int) -> str:
        self._channel(channel_id)
        if channel_id in self.failing:
            raise DeliveryFailed("HTTP 500 from the receiver", retry=True)
        return "HTTP 200"

    def _channel(self, channel_id: int) -> Channel:
        if channel_id not in self._channels:
            raise NotFound(f"no channel with id {channel_id}")
        return self._channels[channel_id]

    # -- rules

    async def rules(self) -> list[Rule]:
        return list(self._rules.values())

    def _parse_rule(self, rule_id: int, body: Mapping[str, Any]) -> Rule:
        name = _text(body, "name")
        try:
            kind = Kind(body.get("kind", ""))
        except ValueError:
            known = ", ".join(kind for kind in Kind)
            raise Invalid("kind", f"unknown kind {body.get('kind')!r} (known: {known})") from None
        match = body.get("match") or {}
        if not isinstance(match, dict) or set(match) - {"name", "queue", "worker", "exception"}:
            raise Invalid("match", "expected an object of name, queue, worker, exception")
        if isinstance(match.get("name"), str):
            _glob("match.name", match["name"])
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise Invalid("params", "expected an object")
        for key, value in params.items():
            if key not in PARAMS.get(kind, ()):
                raise Invalid(f"params.{key}", f"not a parameter of {kind}")
            _number(f"params.{key}", value)
        if kind is Kind.FAILURE_RATE and not 0 <= params.get("threshold", 0) <= 1:
            raise Invalid("params.threshold", "expected a fraction from 0 to 1")
        severity = body.get("severity", "error")
        if severity not in SEVERITIES:
            raise Invalid(
                "severity", f"unknown severity {severity!r} (known: {', '.join(SEVERITIES)})"
            )
        channels = body.get("channels", [])
        if not isinstance(channels, list) or not all(isinstance(c, int) for c in channels):
            raise Invalid("channels", "expected a list of channel ids")
        for channel_id in channels:
            if channel_id not in self._channels:
                raise Invalid("channels", f"no channel with id {channel_id}")
        repeat = body.get("repeat_s")
        return Rule(
            rule_id,
            name,
            kind,
            Match(**match),
            params,
            severity,
            tuple(channels),
            for_s=_number("for_s", body.get("for_s", 0)),
            repeat_s=None if repeat is None else _number("repeat_s", repeat),
            created_at=T0,
        )

    async def add_rule(self, body: Mapping[str, Any]) -> Rule:
        rule = self._parse_rule(self._next, body)
        self._id()
        self._rules[rule.id] = rule
        return rule

    def add_file_rule(self, name: str) -> Rule:
        rule = Rule(
            self._id(), name, Kind.WORKER_OFFLINE, Match(), {}, "critical", (), from_file=True
        )
        self._rules[rule.id] = rule
        return rule

    def _writable(self, rule_id: int) -> Rule:
        rule = self._rule(rule_id)
        if rule.from_file:
            raise ReadOnly(
                f"rule {rule.name!r} is declared in the configuration file: change it there"
            )
        return rule

    def _rule(self, rule_id: int) -> Rule:
        if rule_id not in self._rules:
            raise NotFound(f"no rule with id {rule_id}")
        return self._rules[rule_id]

    async def update_rule(self, rule_id: int, body: Mapping[str, Any]) -> Rule:
        self._writable(rule_id)
        self._rules[rule_id] = self._parse_rule(rule_id, body)
        return self._rules[rule_id]

    async def delete_rule(self, rule_id: int) -> None:
        self._writable(rule_id)
        del self._rules[rule_id]

    async def mute_rule(self, rule_id: int, until: float | None) -> Rule:
        self._rules[rule_id] = attrs.evolve(self._rule(rule_id), muted_until=until)
        return self._rules[rule_id]

    # -- incidents

    def open(
        self, rule: Rule, labels: dict[str, str], state: IncidentState, job_ids: list[str]
    ) -> Incident:
        """An incident of ``rule``, as the evaluator would have opened it, with its story."""
        incident = Incident(
            id=self._id(),
            rule_id=rule.id,
            rule_name=rule.name,
            kind=rule.kind,
            group_key=",".join(labels.values()),
            labels=labels,
            state=state,
            severity=rule.severity,
            summary=f"{len(job_ids)} failures of {','.join(labels.values())}",
            count=len(job_ids),
            started_at=T0,
            fired_at=None if state is IncidentState.PENDING else T0 + 60,
            resolved_at=T0 + 600 if state is IncidentState.RESOLVED else None,
            job_ids=job_ids,
        )
        self._incidents[incident.id] = incident
        self.timelines[incident.id] = [
            {"at": T0, "what": "pending", "detail": None},
            {"at": T0 + 60, "what": "firing", "detail": None},
            {"at": T0 + 61, "what": "attempt", "detail": {"channel": "ops", "outcome": "HTTP 503"}},
            {
                "at": T0 + 71,
                "what": "notified",
                "detail": {"channel": "ops", "outcome": "HTTP 200"},
            },
        ]
        return incident

    async def incidents(self, state: IncidentState | None, limit: int) -> list[Incident]:
        found = [i for i in self._incidents.values() if state is None or i.state is state]
        return sorted(found, key=lambda i: i.id, reverse=True)[:limit]

    def _incident(self, incident_id: int) -> Incident:
        if incident_id not in self._incidents:
            raise NotFound(f"no incident with id {incident_id}")
        return self._incidents[incident_id]

    async def incident(self, incident_id: int) -> IncidentDetail:
        incident = self._incident(incident_id)
        return IncidentDetail(incident, self.timelines[incident_id], incident.job_ids)

    async def ack(self, incident_id: int, actor: str | None) -> Incident:
        incident = self._incident(incident_id)
        incident.acked_at, incident.acked_by = T0 + 100, actor
        return incident

    async def silence(self, incident_id: int, until: float, actor: str | None) -> Incident:
        incident = self._incident(incident_id)
        incident.silenced_until = until
        return incident

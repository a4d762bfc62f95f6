"""Alerting's vocabulary: rules, channels, incidents, and what a channel is sent.

A :class:`Rule` watches for a condition of one ``kind`` among the jobs, queues and
workers it ``match``es; each group it finds the condition in (a task name, a queue, a
worker: the rule kind says which) is an :class:`Incident`, moving ``pending`` ->
``firing`` -> ``resolved``. A firing or resolved incident is announced on the rule's
:class:`Channel` s, each of a :class:`ChannelType` a plugin registers (hook
``sluice_alert_channels``), through a durable outbox. The API contract is issue 19's;
the shapes here are what ``to_dict`` gives it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

import attrs

SEVERITIES: Final = ("critical", "error", "warning", "info")


class Kind(enum.StrEnum):
    JOB_FAILED = "job_failed"
    FAILURE_RATE = "failure_rate"
    RUNTIME = "runtime"
    QUEUE_WAIT = "queue_wait"
    QUEUE_DEPTH = "queue_depth"
    WORKER_OFFLINE = "worker_offline"
    NO_CONSUMER = "no_consumer"
    JOB_LOST = "job_lost"
    SLUICE_HEALTH = "sluice_health"
    # Reserved for periodic-task monitoring (missed, late, failed, overrun): a later
    # issue registers its evaluator under this kind.
    SCHEDULE = "schedule"


class IncidentState(enum.StrEnum):
    PENDING = "pending"  # the condition holds, not yet for the rule's for_s
    FIRING = "firing"
    RESOLVED = "resolved"


class Invalid(ValueError):
    """Bad input for a rule or a channel: the API answers 400 naming ``field``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFound(LookupError):
    """No rule, channel or incident with that id."""


class ReadOnly(Exception):
    """The rule comes from the configuration file: change it there."""


@attrs.frozen
class Match:
    """Which jobs (queues, workers) a rule watches; None matches anything."""

    name: str | None = None  # a glob over the task (job) name: "billing.*"
    queue: str | None = None
    worker: str | None = None
    exception: str | None = None  # text in the exception, or its class name

    def to_dict(self) -> dict[str, str | None]:
        return attrs.asdict(self)


@attrs.frozen
class Rule:
    id: int
    name: str
    kind: Kind
    match: Match
    params: Mapping[str, Any]  # by kind: failure_rate {window_s, threshold, min_runs}, ...
    severity: str  # one of SEVERITIES
    channels: tuple[int, ...]  # channel ids
    for_s: float = 0.0  # the condition must hold this long before the incident fires
    repeat_s: float | None = None  # re-announce a firing incident this often; None: never
    muted_until: float | None = None  # epoch seconds: no notification before it
    from_file: bool = False  # declared in the TOML file: read-only in the API and dashboard
    created_at: float = 0.0
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "kind": str(self.kind),
            "match": self.match.to_dict(),
            "params": dict(self.params),
            "severity": self.severity,
            "channels": list(self.channels),
            "for_s": self.for_s,
            "repeat_s": self.repeat_s,
            "muted_until": self.muted_until,
            "read_only": self.from_file,
        }


@attrs.frozen
class Channel:
    """A place notifications go, as stored: ``config`` holds its secrets in the clear
    (the database is the one place they live); :meth:`to_dict` masks them."""

    id: int
    name: str
    type: str  # a registered ChannelType's name: webhook, slack, pagerduty, email, ...
    config: Mapping[str, Any]
    secrets: tuple[str, ...] = ()  # the keys of ``config`` never shown back
    created_at: float = 0.0
    from_file: bool = False  # declared in the TOML file: tested, not deleted, in the API

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "config": {
                key: (MASK if key in self.secrets and value else value)
                for key, value in self.config.items()
            },
            "read_only": self.from_file,
        }


MASK: Final = "********"


@attrs.define
class Incident:
    """One rule's condition in one group (``group_key``; ``labels`` says what it is:
    {"name": "billing.charge"}, {"queue": "default"}, {"worker": "w1@host"})."""

    id: int
    rule_id: int
    rule_name: str
    kind: Kind
    group_key: str
    labels: dict[str, str]
    state: IncidentState
    severity: str
    summary: str  # one line, for a person: what, where, how many
    count: int  # matching jobs (or checks) since it started
    started_at: float  # when the condition was first seen
    fired_at: float | None = None
    resolved_at: float | None = None
    last_notified_at: float | None = None
    acked_at: float | None = None
    acked_by: str | None = None
    silenced_until: float | None = None
    job_ids: list[str] = attrs.field(factory=list)  # the latest jobs that caused it
    last_seen_at: float | None = None  # the condition last seen (a resolve_s counts from it)

    def to_dict(self, public_url: str | None = None) -> dict[str, Any]:
        """The API's and the webhook body's shape (issue 19's contract)."""
        return {
            "id": self.id,
            "rule": {"id": self.rule_id, "name": self.rule_name, "kind": str(self.kind)},
            "state": str(self.state),
            "severity": self.severity,
            "summary": self.summary,
            "labels": dict(self.labels),
            "count": self.count,
            "started_at": self.started_at,
            "resolved_at": self.resolved_at,
            "url": incident_url(public_url, self.id),
        }


def incident_url(public_url: str | None, incident_id: int) -> str | None:
    """The incident's page on the dashboard (``--public-url``); None when not set."""
    return None if public_url is None else f"{public_url.rstrip('/')}/alerts/{incident_id}"


@attrs.frozen
class Message:
    """What a channel is asked to send: an incident that fired or resolved (``event``
    "incident.firing" / "incident.resolved"), a summary of several held back by the
    channel's rate limit ("summary"), or a test ("test")."""

    event: str
    incident: Mapping[str, Any] | None  # Incident.to_dict(); None for a test
    text: str  # the one-line summary a person reads first
    links: Sequence[tuple[str, str]] = ()  # (label, absolute URL): the incident, a failing job
    incidents: Sequence[Mapping[str, Any]] = ()  # a summary's incidents
    # Names this notification to the receiver (the webhook's webhook-id, a test's PagerDuty
    # dedup key), the same on each retry of it: so the caller (the outbox) gives it.
    id: str = attrs.field(kw_only=True)

    def body(self) -> dict[str, Any]:
        """The generic webhook's JSON body: {"type", "incident"} (and a summary's list)."""
        body: dict[str, Any] = {"type": self.event, "incident": self.incident}
        if self.incidents:
            body["incidents"] = list(self.incidents)
        return body


class DeliveryFailed(Exception):
    """A send that failed; ``retry`` says whether trying again may help (timeouts, 5xx,
    connection refused) or not (4xx: the request itself is wrong). The message is
    shown on the incident: it must never carry a secret."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class ChannelType(Protocol):
    """A kind of channel, registered by a plugin (hook ``sluice_alert_channels``)."""

    name: str  # "webhook", "slack", ...
    secrets: tuple[str, ...]  # config keys that are secrets: masked in answers and logs

    def check(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The config, validated and normalized; :class:`Invalid` naming the field
        (``config.url``) otherwise."""

    async def send(self, config: Mapping[str, Any], message: Message) -> str:
        """Deliver ``message``; returns a short receipt for the incident's log (e.g.
        "HTTP 200"). Raises :class:`DeliveryFailed`. Must return or raise within
        SEND_TIMEOUT_S."""


SEND_TIMEOUT_S: Final = 10.0


@attrs.frozen
class IncidentDetail:
    """An incident with its story: its state changes, each notification and each
    delivery attempt (``timeline``: {"at", "what", "detail"}, oldest first), and the
    jobs that caused it."""

    incident: Incident
    timeline: list[dict[str, Any]]
    job_ids: list[str]


class AlertService(Protocol):
    """Alerting as the web uses it (``Application.alerts``). Raises :class:`Invalid`
    (400, naming the field), :class:`NotFound` (404), :class:`ReadOnly` (409)."""

    public_url: str | None  # the dashboard's address for links (--public-url)

    def channel_types(self) -> list[str]: ...

    async def channels(self) -> list[Channel]: ...

    async def add_channel(self, body: Mapping[str, Any]) -> Channel:
        """From the API's body {"name", "type", "config"}."""

    async def delete_channel(self, channel_id: int) -> None: ...

    async def test_channel(self, channel_id: int) -> str:
        """Send a test notification now; the receipt, or DeliveryFailed."""

    async def rules(self) -> list[Rule]: ...

    async def add_rule(self, body: Mapping[str, Any]) -> Rule:
        """From the API's body {"name", "kind", "match", "params", "severity",
        "channels", "for_s", "repeat_s"}."""

    async def update_rule(self, rule_id: int, body: Mapping[str, Any]) -> Rule: ...

    async def delete_rule(self, rule_id: int) -> None: ...

    async def mute_rule(self, rule_id: int, until: float | None) -> Rule: ...

    async def incidents(self, state: IncidentState | None, limit: int) -> list[Incident]:
        """Newest first."""

    async def incident(self, incident_id: int) -> IncidentDetail: ...

    async def ack(self, incident_id: int, actor: str | None) -> Incident: ...

    async def silence(self, incident_id: int, until: float, actor: str | None) -> Incident: ...

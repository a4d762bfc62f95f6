"""PagerDuty, through the Events API v2
(https://developer.pagerduty.com/docs/events-api-v2/trigger-events/): an incident that
fires is a ``trigger``, one that resolves a ``resolve`` of the same ``dedup_key``, so
PagerDuty's incident follows Sluice's. The routing key is the credential."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sluice_alerts import settings, words
from sluice_alerts.http import post_json
from sluice_core.alerting.model import Message

DEFAULT_URL = "https://events.pagerduty.com/v2/enqueue"
_SUMMARY = 1024  # PagerDuty's limit on payload.summary

# Sluice's severities and PagerDuty's have the same names; the map says so, and
# anything else a plugin's rule may carry is an error.
_SEVERITY = {"critical": "critical", "error": "error", "warning": "warning", "info": "info"}


def dedup_key(message: Message) -> str:
    """An incident's key is its id, the same on the trigger and the resolve. A test and a
    summary trigger PagerDuty incidents of their own (named by the message's id), which
    nothing resolves: someone looks at them, then resolves them in PagerDuty."""
    if message.incident is not None:
        return f"sluice-incident-{message.incident['id']}"
    return f"sluice-{message.event}-{message.id}"


def event(routing_key: str, message: Message) -> dict[str, Any]:
    """The Events API v2 body for ``message``."""
    if message.event == "incident.resolved":
        return {
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": dedup_key(message),
        }
    incident = message.incident or {}
    details: dict[str, Any] = {"text": message.text}
    if incident:
        details |= {
            "labels": incident["labels"],
            "count": incident["count"],
            "rule": incident["rule"],
            "started_at": incident["started_at"],
        }
    elif message.incidents:
        details["incidents"] = [
            {key: i.get(key) for key in ("id", "state", "severity", "summary", "url")}
            for i in message.incidents
        ]
    summary = f"{words.title(message)}: {message.text}"
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key(message),
        "payload": {
            "summary": summary[:_SUMMARY],
            # Where it happens: the labels say (a task name, a queue, a worker).
            "source": words.where(incident.get("labels") or {}) or "sluice",
            "severity": _SEVERITY.get(words.severity(message), "error"),
            "component": "sluice",
            "class": incident["rule"]["kind"] if incident else message.event,
            "custom_details": details,
        },
        "links": [{"href": url, "text": label} for label, url in message.links],
        "client": "Sluice",
    }


class PagerDutyChannel:
    name: str = "pagerduty"
    secrets: tuple[str, ...] = ("routing_key",)

    def check(self, config: Mapping[str, Any]) -> dict[str, Any]:
        config = settings.mapping(config, ("routing_key", "url"))
        checked = {"routing_key": settings.text(config, "routing_key")}
        if settings.optional_text(config, "url") is not None:
            checked["url"] = settings.http_url(config, "url")
        return checked

    async def send(self, config: Mapping[str, Any], message: Message) -> str:
        key = config["routing_key"]
        return await post_json(config.get("url") or DEFAULT_URL, event(key, message), secrets=[key])

"""A message told to a person, the same way on every channel: a title, then the facts
(severity, where, how many), then the links."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from sluice_core.alerting.model import SEVERITIES, Message

_LISTED = 20
_STATES = {"incident.firing": "Firing", "incident.resolved": "Resolved"}


def title(message: Message) -> str:
    incident = message.incident
    if message.event == "test":
        return "Sluice test notification"
    if message.event == "summary" or incident is None:
        return f"Sluice: {len(message.incidents)} incidents"
    state = _STATES.get(message.event, message.event)
    return f"{state}: {incident['rule']['name']}"


def where(labels: Mapping[str, str]) -> str:
    """{"name": "billing.charge"} -> "name=billing.charge": what the incident is about."""
    return ", ".join(f"{key}={value}" for key, value in labels.items())


def severity(message: Message) -> str:
    """The incident's severity; a summary's is its most severe incident's, a test's "info"."""
    found = [message.incident] if message.incident else list(message.incidents)
    ranks = [SEVERITIES.index(i["severity"]) for i in found if i.get("severity") in SEVERITIES]
    return SEVERITIES[min(ranks)] if ranks else "info"


def facts(message: Message) -> list[tuple[str, str]]:
    """(label, value) pairs under the title: what a person scans before the links."""
    incident = message.incident
    if incident is None:  # a summary lists its incidents; a test has no facts
        return [("Incidents", _listing(message.incidents))] if message.incidents else []
    out = [("Severity", str(incident["severity"]))]
    if incident.get("labels"):
        out.append(("Where", where(incident["labels"])))
    out.append(("Count", str(incident["count"])))
    out.append(("Rule", f"{incident['rule']['name']} ({incident['rule']['kind']})"))
    out.append(("Since", _when(incident["started_at"])))
    if incident.get("resolved_at") is not None:
        out.append(("Resolved", _when(incident["resolved_at"])))
    return out


def _listing(incidents: Sequence[Mapping[str, Any]]) -> str:
    """One line per incident, the first _LISTED: a summary stands for a storm."""
    lines = [f"[{i['severity']}] {i['state']}: {i['summary']}" for i in incidents[:_LISTED]]
    if len(incidents) > _LISTED:
        lines.append(f"... and {len(incidents) - _LISTED} more")
    return "\n".join(lines)


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))

"""Alerting's endpoints and pages (issue 19's contract, the API in README.md): channels,
rules, incidents, asked of the application's alert service
(:class:`~sluice_core.alerting.model.AlertService`).

The service validates and says which field is wrong (:class:`Invalid`: 400), what it does
not know (404) and what the configuration file owns (:class:`ReadOnly`: 409); this
module parses HTTP, maps those, and renders the Alerts pages, whose forms and buttons
sluice.js sends to these same endpoints.
"""

from __future__ import annotations

import time
from typing import Any, Final

from quart import Blueprint, Response, render_template, request

from sluice_core.alerting import model
from sluice_core.alerting.model import (
    SEVERITIES,
    AlertService,
    DeliveryFailed,
    Incident,
    IncidentState,
    Invalid,
    Kind,
    ReadOnly,
)
from sluice_web.actions import json_body
from sluice_web.auth import acting_user
from sluice_web.context import application
from sluice_web.errors import BadRequest, error_response
from sluice_web.params import parse_time

blueprint = Blueprint("alerts", __name__)

INCIDENTS_SHOWN: Final = 200  # the newest, on GET /api/alerts/incidents and the Alerts page
RECENT_SHOWN: Final = 50  # the Alerts page's recent incidents, of any state

# The rule form's parameter fields by kind, as the contract names them: (key, label, hint).
RULE_PARAMS: Final[dict[Kind, tuple[tuple[str, str, str], ...]]] = {
    Kind.JOB_FAILED: (("resolve_s", "Resolve after (s)", "without a new failure; empty: never"),),
    Kind.FAILURE_RATE: (
        ("window_s", "Window (s)", "failures / finished over this window"),
        ("threshold", "Threshold (0-1)", "e.g. 0.1 for 10%"),
        ("min_runs", "Minimum runs", "in the window, before the rate counts"),
    ),
    Kind.RUNTIME: (("max_s", "Longest runtime (s)", ""),),
    Kind.QUEUE_WAIT: (("max_s", "Longest wait (s)", "queued with no taker"),),
    Kind.QUEUE_DEPTH: (("max_depth", "Deepest", "messages waiting"),),
    Kind.SLUICE_HEALTH: (("max_lag_s", "Largest ingest lag (s)", ""),),
}
# Kinds offered in the rule form: schedule is reserved for a later issue's evaluator.
FORM_KINDS: Final = tuple(kind for kind in Kind if kind is not Kind.SCHEDULE)

# The channel form's fields by type, as the contract names them: (key, label, input type);
# a type a third party registers gets a JSON textarea for its config instead.
CHANNEL_FIELDS: Final[dict[str, tuple[tuple[str, str, str], ...]]] = {
    "webhook": (("url", "URL", "url"), ("secret", "Signing secret (whsec_...)", "password")),
    "slack": (("webhook_url", "Incoming webhook URL", "password"),),
    "pagerduty": (
        ("routing_key", "Routing key", "password"),
        ("url", "Events API URL (optional)", "url"),
    ),
    "email": (
        ("host", "SMTP host", "text"),
        ("port", "Port", "number"),
        ("starttls", "STARTTLS", "boolean"),
        ("username", "User name", "text"),
        ("password", "Password", "password"),
        ("from", "From", "text"),
        ("to", "To (comma separated)", "list"),
    ),
}


def _alerts() -> AlertService:
    return application().alerts


@blueprint.errorhandler(Invalid)
async def _invalid(exc: Invalid) -> Response:
    return error_response(400, "bad_request", str(exc))  # "field: message"


@blueprint.errorhandler(model.NotFound)
async def _not_found(exc: model.NotFound) -> Response:
    return error_response(404, "not_found", str(exc))


@blueprint.errorhandler(ReadOnly)
async def _read_only(exc: ReadOnly) -> Response:
    return error_response(409, "read_only", str(exc))


def _incident(incident: Incident) -> dict[str, Any]:
    """The contract's shape, and who acknowledged or silenced it, for the pages and clients
    that show it. Links go to ``--public-url``, else to the address this request came to."""
    return {
        **incident.to_dict(_alerts().public_url or request.host_url),
        "fired_at": incident.fired_at,
        "acked_at": incident.acked_at,
        "acked_by": incident.acked_by,
        "silenced_until": incident.silenced_until,
    }


def _until(body: dict[str, Any]) -> float | None:
    """``until``: epoch seconds or ISO-8601; None for null or absent."""
    value = body.get("until")
    return None if value is None else parse_time("until", value)


def _state(value: str | None) -> IncidentState | None:
    if not value:
        return None
    try:
        return IncidentState(value)
    except ValueError:
        known = ", ".join(str(state) for state in IncidentState)
        raise BadRequest(f"state: unknown state {value!r} (known: {known})") from None


# -- channels -------------------------------------------------------------------


@blueprint.get("/api/alerts/channels")
async def list_channels() -> dict[str, Any]:
    """Every channel, secrets masked, and the channel types the plugins register."""
    return {
        "channels": [channel.to_dict() for channel in await _alerts().channels()],
        "types": _alerts().channel_types(),
    }


@blueprint.post("/api/alerts/channels")
async def add_channel() -> tuple[dict[str, Any], int]:
    channel = await _alerts().add_channel(await json_body())
    return channel.to_dict(), 201


@blueprint.delete("/api/alerts/channels/<int:channel_id>")
async def delete_channel(channel_id: int) -> tuple[str, int]:
    await _alerts().delete_channel(channel_id)
    return "", 204


@blueprint.post("/api/alerts/channels/<int:channel_id>/test")
async def send_test(channel_id: int) -> dict[str, Any] | Response:
    """Send a test notification now: 200 with the receiver's receipt, or 502 with why the
    delivery failed (a message that carries no secret: see DeliveryFailed)."""
    try:
        receipt = await _alerts().test_channel(channel_id)
    except DeliveryFailed as exc:
        return error_response(502, "delivery_failed", str(exc))
    return {"channel_id": channel_id, "receipt": receipt}


# -- rules ------------------------------------------------------------------------


@blueprint.get("/api/alerts/rules")
async def list_rules() -> dict[str, Any]:
    return {"rules": [rule.to_dict() for rule in await _alerts().rules()]}


@blueprint.post("/api/alerts/rules")
async def add_rule() -> tuple[dict[str, Any], int]:
    rule = await _alerts().add_rule(await json_body())
    return rule.to_dict(), 201


@blueprint.put("/api/alerts/rules/<int:rule_id>")
async def update_rule(rule_id: int) -> dict[str, Any]:
    return (await _alerts().update_rule(rule_id, await json_body())).to_dict()


@blueprint.delete("/api/alerts/rules/<int:rule_id>")
async def delete_rule(rule_id: int) -> tuple[str, int]:
    await _alerts().delete_rule(rule_id)
    return "", 204


@blueprint.post("/api/alerts/rules/<int:rule_id>/mute")
async def mute_rule(rule_id: int) -> dict[str, Any]:
    """``{"until": epoch seconds or ISO-8601}`` mutes the rule until then; null unmutes."""
    return (await _alerts().mute_rule(rule_id, _until(await json_body()))).to_dict()


# -- incidents ----------------------------------------------------------------------


@blueprint.get("/api/alerts/incidents")
async def list_incidents() -> dict[str, Any]:
    """The newest incidents, of one state with ``state=firing|resolved|pending``."""
    state = _state(request.args.get("state"))
    return {
        "incidents": [
            _incident(incident) for incident in await _alerts().incidents(state, INCIDENTS_SHOWN)
        ]
    }


@blueprint.get("/api/alerts/incidents/<int:incident_id>")
async def incident_detail(incident_id: int) -> dict[str, Any]:
    """The incident, its timeline (state changes, notifications, delivery attempts,
    oldest first) and the jobs that caused it."""
    detail = await _alerts().incident(incident_id)
    return {**_incident(detail.incident), "timeline": detail.timeline, "job_ids": detail.job_ids}


@blueprint.post("/api/alerts/incidents/<int:incident_id>/ack")
async def ack(incident_id: int) -> dict[str, Any]:
    await json_body()  # none expected; a form may carry the CSRF token alone
    return _incident(await _alerts().ack(incident_id, acting_user()))


@blueprint.post("/api/alerts/incidents/<int:incident_id>/silence")
async def silence(incident_id: int) -> dict[str, Any]:
    """``{"until": epoch seconds or ISO-8601}``: no notification for it before then."""
    until = _until(await json_body())
    if until is None:
        raise BadRequest("until: expected an ISO-8601 time or epoch seconds")
    return _incident(await _alerts().silence(incident_id, until, acting_user()))


# -- pages ---------------------------------------------------------------------------


@blueprint.get("/alerts")
async def incidents_page() -> str:
    alerts = _alerts()
    return await render_template(
        "alerts.html",
        firing=await alerts.incidents(IncidentState.FIRING, INCIDENTS_SHOWN),
        pending=await alerts.incidents(IncidentState.PENDING, INCIDENTS_SHOWN),
        recent=await alerts.incidents(None, RECENT_SHOWN),
        now=time.time(),
    )


@blueprint.get("/alerts/<int:incident_id>")
async def incident_page(incident_id: int) -> str | tuple[str, int]:
    try:
        detail = await _alerts().incident(incident_id)
    except model.NotFound:
        return await render_template(
            "not_found.html",
            title="No such incident",
            message=f"Sluice has no incident {incident_id}.",
        ), 404
    rules = {rule.id: rule for rule in await _alerts().rules()}
    return await render_template(
        "alerts_incident.html",
        incident=detail.incident,
        timeline=detail.timeline,
        job_ids=detail.job_ids,
        rule=rules.get(detail.incident.rule_id),
        now=time.time(),
    )


@blueprint.get("/alerts/rules")
async def rules_page() -> str:
    channels = await _alerts().channels()
    return await render_template(
        "alerts_rules.html",
        rules=await _alerts().rules(),
        channels=channels,
        channel_names={channel.id: channel.name for channel in channels},
        kinds=FORM_KINDS,
        params=RULE_PARAMS,
        severities=SEVERITIES,
        now=time.time(),
    )


@blueprint.get("/alerts/channels")
async def channels_page() -> str:
    return await render_template(
        "alerts_channels.html",
        channels=[channel.to_dict() for channel in await _alerts().channels()],
        types=_alerts().channel_types(),
        fields=CHANNEL_FIELDS,
    )

"""The built-in alert channels (plugins/sluice_alerts) against real receivers on loopback:
an HTTP server that checks Standard Webhooks signatures with the specification's own
library and the Slack and PagerDuty payloads' shapes, answering the statuses a test
scripts; aiosmtpd with STARTTLS (or implicit TLS) and AUTH LOGIN for email. Then: what a
failure says (retry or not, and never a secret), and how configs are checked and masked.
"""

from __future__ import annotations

import logging
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
import trio.testing
import trustme
from standardwebhooks import Webhook

from sluice_alerts.pagerduty import PagerDutyChannel
from sluice_alerts.slack import SlackChannel
from sluice_alerts.smtp import EmailChannel
from sluice_alerts.webhook import WebhookChannel, signing_key
from sluice_core.alerting.model import (
    MASK,
    Channel,
    ChannelType,
    DeliveryFailed,
    Incident,
    IncidentState,
    Invalid,
    Kind,
    Message,
    incident_url,
)
from sluice_core.config import Config
from sluice_core.plugins import PluginManager
from tests.fixtures.receivers import (
    PASSWORD,
    WHSEC,
    Mailbox,
    Receiver,
    Request,
    email_config,
    verified_by,
)

PUBLIC_URL = "http://sluice.test:5555"
ROUTING_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"
SLACK_PATH = "/services/T000/B000/XXXXsecretXXXX"


def incident(state: IncidentState = IncidentState.FIRING) -> Incident:
    return Incident(
        id=7,
        rule_id=3,
        rule_name="billing failures",
        kind=Kind.JOB_FAILED,
        group_key="billing.charge",
        labels={"name": "billing.charge"},
        state=state,
        severity="critical",
        summary="billing.charge failed 12 times: CardDeclined",
        count=12,
        started_at=1_700_000_000.0,
        resolved_at=1_700_000_600.0 if state is IncidentState.RESOLVED else None,
    )


def announce(state: IncidentState = IncidentState.FIRING, id: str = "n-41") -> Message:
    shown = incident(state)
    return Message(
        event=f"incident.{state}",
        incident=shown.to_dict(PUBLIC_URL),
        text=shown.summary,
        links=[
            ("Open the incident", str(incident_url(PUBLIC_URL, shown.id))),
            ("Failing job", f"{PUBLIC_URL}/jobs/3f2a-77"),
        ],
        id=id,
    )


def a_test_message(id: str = "t-1") -> Message:
    return Message(event="test", incident=None, text="A test from Sluice", id=id)


# -- an HTTP receiver -------------------------------------------------------------------


# -- the plugin -------------------------------------------------------------------------


def test_the_builtin_plugin_registers_the_four_types() -> None:
    types = PluginManager().alert_channels(Config())
    assert sorted(types) == ["email", "pagerduty", "slack", "webhook"]
    assert {name: kind.secrets for name, kind in types.items()} == {
        "webhook": ("secret",),
        "slack": ("webhook_url",),
        "pagerduty": ("routing_key",),
        "email": ("password",),
    }


# -- webhook ----------------------------------------------------------------------------


def test_a_whsec_secret_signs_as_the_specification_s_example() -> None:
    # The Standard Webhooks specification's own example: secret, id, timestamp, payload
    # and the signature it gives.
    signed = Webhook(signing_key(WHSEC)).sign(
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        datetime.fromtimestamp(1614265330, UTC),
        b'{"test": 2432232314}',
    )
    assert signed == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert signing_key("a plain passphrase") == b"a plain passphrase"


@pytest.mark.parametrize(
    ("secret", "verifier"),
    [(WHSEC, WHSEC), ("a plain passphrase", b"a plain passphrase")],
    ids=["whsec", "plain"],
)
async def test_the_webhook_is_signed_and_the_library_verifies_it(
    receiver: Receiver, secret: str, verifier: str | bytes
) -> None:
    receiver.judge = verified_by(verifier)
    channel = WebhookChannel()
    config = channel.check({"url": receiver.url(), "secret": secret})
    message = announce()

    assert await channel.send(config, message) == "HTTP 200"

    [request] = receiver.requests
    assert request.headers["webhook-id"] == "n-41"
    assert request.headers["content-type"] == "application/json"
    body = request.json()
    assert body == {"type": "incident.firing", "incident": message.incident}
    assert body["incident"]["url"] == f"{PUBLIC_URL}/alerts/7"
    assert set(body["incident"]) == {
        "id",
        "rule",
        "state",
        "severity",
        "summary",
        "labels",
        "count",
        "started_at",
        "resolved_at",
        "url",
    }


async def test_a_webhook_5xx_or_429_may_be_retried_a_4xx_not(receiver: Receiver) -> None:
    receiver.judge = verified_by(WHSEC)
    receiver.statuses = [500, 429, 200, 400]
    channel = WebhookChannel()
    config = channel.check({"url": receiver.url(), "secret": WHSEC})
    message = announce()

    with pytest.raises(DeliveryFailed, match=r"^HTTP 500 from 127\.0\.0\.1") as failed:
        await channel.send(config, message)
    assert failed.value.retry
    with pytest.raises(DeliveryFailed, match=r"^HTTP 429") as failed:
        await channel.send(config, message)
    assert failed.value.retry
    assert await channel.send(config, message) == "HTTP 200"
    # The retries of one notification carry its id, so the receiver can drop repeats.
    assert [r.headers["webhook-id"] for r in receiver.requests] == ["n-41"] * 3

    with pytest.raises(DeliveryFailed, match=r"^HTTP 400") as failed:
        await channel.send(config, announce(IncidentState.RESOLVED, id="n-42"))
    assert not failed.value.retry
    assert receiver.requests[-1].json()["type"] == "incident.resolved"


async def test_a_signature_the_receiver_refuses_is_not_retried(receiver: Receiver) -> None:
    receiver.judge = verified_by(WHSEC)
    channel = WebhookChannel()
    config = channel.check({"url": receiver.url(), "secret": "whsec_" + "QUFBQQ"})
    with pytest.raises(DeliveryFailed, match="No matching signature found") as failed:
        await channel.send(config, announce())
    assert not failed.value.retry


async def test_an_unreachable_receiver_may_be_retried() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    channel = WebhookChannel()
    config = channel.check({"url": f"http://127.0.0.1:{port}/hook", "secret": WHSEC})
    with pytest.raises(DeliveryFailed, match=r"^cannot reach 127\.0\.0\.1") as failed:
        await channel.send(config, announce())
    assert failed.value.retry


async def test_a_receiver_that_never_answers_fails_within_the_bound(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def hang(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, hang, listeners)
    channel = WebhookChannel()
    config = channel.check({"url": f"http://127.0.0.1:{port}/hook", "secret": WHSEC})
    started = trio.current_time()
    with pytest.raises(DeliveryFailed) as failed:
        await channel.send(config, announce())
    assert failed.value.retry
    assert trio.current_time() - started <= 10.0


# -- Slack ------------------------------------------------------------------------------


def slack_shape(request: Request) -> str | None:
    """What Slack's incoming webhook checks of a Block Kit payload (its 400 texts)."""
    payload = request.json()
    if not isinstance(payload.get("text"), str) or not payload["text"]:
        return "no_text"
    for block in payload.get("blocks", []):
        kind = block.get("type")
        if kind == "header":
            text = block["text"]
            if text["type"] != "plain_text" or not 0 < len(text["text"]) <= 150:
                return "invalid_blocks: header"
        elif kind == "section":
            fields = block.get("fields", [])
            if "text" not in block and not fields:
                return "invalid_blocks: empty section"
            if len(fields) > 10 or any(f["type"] not in ("mrkdwn", "plain_text") for f in fields):
                return "invalid_blocks: fields"
        elif kind == "actions":
            elements = block["elements"]
            if not 0 < len(elements) <= 25:
                return "invalid_blocks: actions"
            for button in elements:
                if button["type"] != "button" or button["text"]["type"] != "plain_text":
                    return "invalid_blocks: button"
                if not button["url"].startswith(("http://", "https://")):
                    return "invalid_blocks: button url"
        else:
            return f"invalid_blocks: {kind}"
    return None


async def test_slack_gets_block_kit_with_what_where_how_many_and_links(
    receiver: Receiver,
) -> None:
    receiver.judge = slack_shape
    channel = SlackChannel()
    config = channel.check({"webhook_url": receiver.url(SLACK_PATH)})

    assert await channel.send(config, announce()) == "HTTP 200"

    [request] = receiver.requests
    assert request.path == SLACK_PATH
    payload = request.json()
    assert payload["text"] == (
        "Firing: billing failures: billing.charge failed 12 times: CardDeclined"
    )
    header, summary, facts, actions = payload["blocks"]
    assert header["text"]["text"] == ":rotating_light: Firing: billing failures"
    assert "billing.charge failed 12 times" in summary["text"]["text"]
    shown = [field["text"] for field in facts["fields"]]
    assert "*Severity*\ncritical" in shown
    assert "*Where*\nname=billing.charge" in shown
    assert "*Count*\n12" in shown
    assert [(b["text"]["text"], b["url"]) for b in actions["elements"]] == [
        ("Open the incident", f"{PUBLIC_URL}/alerts/7"),
        ("Failing job", f"{PUBLIC_URL}/jobs/3f2a-77"),
    ]


async def test_slack_test_and_summary_messages_are_valid_block_kit(receiver: Receiver) -> None:
    receiver.judge = slack_shape
    channel = SlackChannel()
    config = channel.check({"webhook_url": receiver.url(SLACK_PATH)})
    many = [incident().to_dict(PUBLIC_URL) | {"id": n} for n in range(30)]
    summary = Message(event="summary", incident=None, text="30 incidents", incidents=many, id="s")

    assert await channel.send(config, a_test_message()) == "HTTP 200"
    assert await channel.send(config, summary) == "HTTP 200"

    listed = receiver.requests[1].json()["blocks"][2]["fields"][0]["text"]
    assert listed.count("[critical] firing") == 20
    assert listed.endswith("... and 10 more")


# -- PagerDuty --------------------------------------------------------------------------


def pagerduty_shape(request: Request) -> str | None:
    """What the Events API v2 refuses with a 400 (its documented required fields)."""
    event = request.json()
    if not isinstance(event.get("routing_key"), str):
        return "routing_key missing"
    if event.get("event_action") not in ("trigger", "acknowledge", "resolve"):
        return "event_action invalid"
    if not 0 < len(event.get("dedup_key", "")) <= 255:
        return "dedup_key invalid"
    if event["event_action"] == "trigger":
        payload = event.get("payload", {})
        if not 0 < len(payload.get("summary", "")) <= 1024 or not payload.get("source"):
            return "payload summary and source are required"
        if payload.get("severity") not in ("critical", "error", "warning", "info"):
            return "payload severity invalid"
        if any(set(link) - {"href", "text"} for link in event.get("links", [])):
            return "links invalid"
    return None


async def test_pagerduty_triggers_then_resolves_one_dedup_key(receiver: Receiver) -> None:
    receiver.judge = pagerduty_shape
    receiver.default = 202
    channel = PagerDutyChannel()
    config = channel.check({"routing_key": ROUTING_KEY, "url": receiver.url("/v2/enqueue")})

    assert await channel.send(config, announce()) == "HTTP 202"
    assert await channel.send(config, announce(IncidentState.RESOLVED, id="n-42")) == "HTTP 202"
    assert await channel.send(config, a_test_message("t-9")) == "HTTP 202"

    trigger, resolve, test = (r.json() for r in receiver.requests)
    assert trigger["routing_key"] == ROUTING_KEY
    assert trigger["event_action"] == "trigger"
    assert trigger["dedup_key"] == "sluice-incident-7"
    assert trigger["payload"]["severity"] == "critical"
    assert trigger["payload"]["source"] == "name=billing.charge"
    assert trigger["payload"]["custom_details"] == {
        "text": "billing.charge failed 12 times: CardDeclined",
        "labels": {"name": "billing.charge"},
        "count": 12,
        "rule": {"id": 3, "name": "billing failures", "kind": "job_failed"},
        "started_at": 1_700_000_000.0,
    }
    assert trigger["links"][0] == {"href": f"{PUBLIC_URL}/alerts/7", "text": "Open the incident"}
    assert resolve == {
        "routing_key": ROUTING_KEY,
        "event_action": "resolve",
        "dedup_key": "sluice-incident-7",
    }
    # A test opens a PagerDuty incident of its own, not one a real incident would resolve.
    assert test["event_action"] == "trigger"
    assert test["dedup_key"] == "sluice-test-t-9"
    assert test["payload"]["severity"] == "info"


@pytest.mark.parametrize("severity", ["critical", "error", "warning", "info"])
async def test_pagerduty_severities_map_one_to_one(receiver: Receiver, severity: str) -> None:
    receiver.judge = pagerduty_shape
    channel = PagerDutyChannel()
    config = channel.check({"routing_key": ROUTING_KEY, "url": receiver.url()})
    message = attrs.evolve(announce(), incident={**announce().incident, "severity": severity})
    await channel.send(config, message)
    assert receiver.requests[0].json()["payload"]["severity"] == severity


async def test_pagerduty_refusal_is_final_and_hides_the_routing_key(receiver: Receiver) -> None:
    # A receiver that echoes what it refused, as services do: the key must not come back.
    receiver.judge = lambda request: f"invalid routing key {request.json()['routing_key']}"
    channel = PagerDutyChannel()
    config = channel.check({"routing_key": ROUTING_KEY, "url": receiver.url()})
    with pytest.raises(DeliveryFailed) as failed:
        await channel.send(config, announce())
    assert not failed.value.retry
    assert str(failed.value) == f"HTTP 400 from 127.0.0.1: invalid routing key {MASK}"


# -- email ------------------------------------------------------------------------------


async def test_email_over_starttls_with_login_has_text_and_html_parts(
    smtp_server: tuple[Mailbox, int],
) -> None:
    mailbox, port = smtp_server
    channel = EmailChannel()
    config = channel.check(email_config(port))

    receipt = await channel.send(config, announce())

    assert receipt == "accepted by 127.0.0.1 for 2 of 2 recipients"
    assert mailbox.logins == ["alerts"]
    [mail] = mailbox.messages
    assert mailbox.envelopes[0].rcpt_tos == ["oncall@example.com", "lead@example.com"]
    assert mail["Subject"] == "[Sluice] Firing: billing failures"
    assert mail["From"] == "sluice@example.com"
    text = mail.get_body(("plain",))
    html = mail.get_body(("html",))
    assert text is not None and html is not None
    plain, rich = text.get_content(), html.get_content()
    assert "billing.charge failed 12 times" in plain
    assert "Where: name=billing.charge" in plain
    assert f"Open the incident: {PUBLIC_URL}/alerts/7" in plain
    assert f"<a href='{PUBLIC_URL}/alerts/7'>Open the incident</a>" in rich
    assert f"<a href='{PUBLIC_URL}/jobs/3f2a-77'>Failing job</a>" in rich


@pytest.mark.parametrize("smtp_server", [True], indirect=True, ids=["implicit-tls"])
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # it is TLS
async def test_email_over_implicit_tls(smtp_server: tuple[Mailbox, int]) -> None:
    mailbox, port = smtp_server
    channel = EmailChannel()
    config = channel.check(email_config(port, starttls=False, tls=True))
    assert await channel.send(config, a_test_message()) == (
        "accepted by 127.0.0.1 for 2 of 2 recipients"
    )
    assert mailbox.messages[0]["Subject"] == "[Sluice] Sluice test notification"


async def test_a_wrong_password_is_final_and_not_shown(smtp_server: tuple[Mailbox, int]) -> None:
    _, port = smtp_server
    channel = EmailChannel()
    config = channel.check(email_config(port, password="not " + PASSWORD))
    with pytest.raises(DeliveryFailed, match=r"^SMTP 127\.0\.0\.1: 535") as failed:
        await channel.send(config, announce())
    assert not failed.value.retry
    assert PASSWORD not in str(failed.value)


async def test_an_untrusted_certificate_is_refused(
    smtp_server: tuple[Mailbox, int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mailbox, port = smtp_server
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    channel = EmailChannel()
    with pytest.raises(DeliveryFailed, match="CERTIFICATE_VERIFY_FAILED") as failed:
        await channel.send(channel.check(email_config(port)), announce())
    assert not failed.value.retry
    assert mailbox.logins == []


# -- secrets ----------------------------------------------------------------------------


async def test_secrets_are_never_in_failures_or_logs(
    receiver: Receiver, smtp_server: tuple[Mailbox, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.default = 500
    _, port = smtp_server
    sends: list[tuple[ChannelType, dict[str, Any]]] = [
        (WebhookChannel(), {"url": receiver.url(), "secret": WHSEC}),
        (SlackChannel(), {"webhook_url": receiver.url(SLACK_PATH)}),
        (PagerDutyChannel(), {"routing_key": ROUTING_KEY, "url": receiver.url()}),
        (EmailChannel(), email_config(port, password="wrong " + PASSWORD)),
    ]
    failures = []
    for kind, config in sends:
        with pytest.raises(DeliveryFailed) as failed:
            await kind.send(kind.check(config), announce())
        failures.append(str(failed.value))
    assert len(receiver.requests) == 3  # they did reach the receivers

    said = "\n".join(failures + [record.getMessage() for record in caplog.records])
    for secret in (WHSEC, SLACK_PATH, ROUTING_KEY, PASSWORD):
        assert secret not in said
    assert failures[1] == "HTTP 500 from 127.0.0.1: try later"


@pytest.mark.parametrize(
    ("kind", "config", "secret"),
    [
        (WebhookChannel(), {"url": "https://example.com/hook", "secret": WHSEC}, WHSEC),
        (SlackChannel(), {"webhook_url": "https://hooks.slack.com" + SLACK_PATH}, SLACK_PATH),
        (PagerDutyChannel(), {"routing_key": ROUTING_KEY}, ROUTING_KEY),
        (EmailChannel(), email_config(587), PASSWORD),
    ],
    ids=lambda value: getattr(value, "name", None),
)
def test_a_channel_s_secrets_are_masked(
    kind: ChannelType, config: dict[str, Any], secret: str
) -> None:
    checked = kind.check(config)
    shown = Channel(id=1, name="ops", type=kind.name, config=checked, secrets=kind.secrets)
    answer = orjson.dumps(shown.to_dict()).decode()
    assert secret not in answer
    assert all(shown.to_dict()["config"][key] == MASK for key in kind.secrets)


# -- configs ----------------------------------------------------------------------------


def test_configs_are_normalized() -> None:
    assert PagerDutyChannel().check({"routing_key": " k ", "url": ""}) == {"routing_key": "k"}
    assert EmailChannel().check(
        {"host": "smtp.example.com", "port": 25, "from": "a@b.c", "to": ["d@e.f"]}
    ) == {
        "host": "smtp.example.com",
        "port": 25,
        "starttls": False,
        "tls": False,
        "from": "a@b.c",
        "to": ["d@e.f"],
    }


@pytest.mark.parametrize(
    ("kind", "config", "field"),
    [
        (WebhookChannel(), None, "config"),
        (WebhookChannel(), {"secret": "s"}, "config.url"),
        (WebhookChannel(), {"url": "ftp://example.com", "secret": "s"}, "config.url"),
        (WebhookChannel(), {"url": "https://example.com"}, "config.secret"),
        (WebhookChannel(), {"url": "https://example.com", "secret": "whsec_!!"}, "config.secret"),
        (WebhookChannel(), {"url": "https://e.com", "secret": "s", "sekret": "s"}, "config.sekret"),
        (SlackChannel(), {"webhook_url": "hooks.slack.com/services/x"}, "config.webhook_url"),
        (PagerDutyChannel(), {"routing_key": 5}, "config.routing_key"),
        (PagerDutyChannel(), {"routing_key": "k", "url": "example.com"}, "config.url"),
        (EmailChannel(), email_config(0), "config.port"),
        (EmailChannel(), email_config(True), "config.port"),
        (EmailChannel(), email_config(25, starttls="yes"), "config.starttls"),
        (EmailChannel(), email_config(465, tls=True), "config.tls"),
        (EmailChannel(), email_config(25, starttls=False), "config.starttls"),
        (EmailChannel(), email_config(587, password=""), "config.password"),
        (EmailChannel(), email_config(587, to="a@b.c"), "config.to"),
        (EmailChannel(), email_config(587, to=["a@b.c", "nobody"]), "config.to.1"),
        (EmailChannel(), email_config(587, **{"from": ""}), "config.from"),
    ],
)
def test_a_bad_config_names_its_field(kind: ChannelType, config: Any, field: str) -> None:
    with pytest.raises(Invalid) as invalid:
        kind.check(config)
    assert invalid.value.field == field
    assert "services/x" not in str(invalid.value)  # a Slack URL, even a bad one, is a secret

"""Alerting's endpoints and pages (issue 19's contract) against a fake alert service
(tests/fake_alerts.py), and once against the real one under ``sluice run``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from playwright.sync_api import Page, expect
from quart_trio import QuartTrio

from sluice_core.alerting.model import MASK, IncidentState, Kind
from sluice_core.config import Config
from sluice_web.app import create_app
from sluice_web.auth import TOKEN_USER, Auth
from sluice_web.server import serve
from tests.fake_alerts import T0
from tests.test_api import serving
from tests.test_dashboard import browse
from tests.test_web_fake import FakeApplication, FakeReads

SECRET = "whsec_MDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDA="  # 32 bytes, base64
WEBHOOK = {
    "name": "ops",
    "type": "webhook",
    "config": {"url": "http://h/x", "secret": SECRET},
}
EMAIL = {
    "name": "mail",
    "type": "email",
    "config": {
        "host": "smtp.example",
        "port": 587,
        "starttls": True,
        "username": "u",
        "password": "hunter2",
        "from": "sluice@example",
        "to": ["ops@example"],
    },
}


@pytest.fixture
def fake() -> FakeApplication:
    return FakeApplication(FakeReads([]))


@asynccontextmanager
async def _client(fake: FakeApplication, auth: Auth) -> AsyncIterator[Any]:
    app: QuartTrio = create_app(fake, auth=auth)
    async with app.test_app() as test_app:
        yield test_app.test_client()


@pytest.fixture
async def client(fake: FakeApplication) -> AsyncIterator[Any]:
    async with _client(fake, Auth(api_token=None, users={}, session_secret="s")) as client:
        yield client


async def _json(response: Any) -> Any:
    return await response.get_json()


def _rule(**fields: Any) -> dict[str, Any]:
    return {
        "name": "billing failing",
        "kind": "failure_rate",
        "match": {"name": "billing.*"},
        "params": {"window_s": 300, "threshold": 0.1, "min_runs": 10},
        "severity": "critical",
        "channels": [],
        "for_s": 60,
        "repeat_s": 3600,
        **fields,
    }


async def _error(response: Any, status: int) -> str:
    assert response.status_code == status, await response.get_data()
    message: str = (await _json(response))["error"]["message"]
    return message


async def test_channels_are_added_listed_tested_and_deleted_with_secrets_masked(
    client: Any, fake: FakeApplication
) -> None:
    added = await client.post("/api/alerts/channels", json=WEBHOOK)
    assert added.status_code == 201
    webhook = await _json(added)
    assert webhook["config"] == {"url": "http://h/x", "secret": MASK}
    email = await _json(await client.post("/api/alerts/channels", json=EMAIL))
    assert email["config"]["password"] == MASK and email["config"]["to"] == ["ops@example"]
    listed = await _json(await client.get("/api/alerts/channels"))
    assert [c["name"] for c in listed["channels"]] == ["ops", "mail"]
    assert "hunter2" not in str(listed) and "whsec_" not in str(listed)
    assert listed["types"] == ["webhook", "slack", "pagerduty", "email"]

    tested = await client.post(f"/api/alerts/channels/{webhook['id']}/test")
    assert (tested.status_code, await _json(tested)) == (
        200,
        {"channel_id": webhook["id"], "receipt": "HTTP 200"},
    )
    fake.alerts.failing.add(webhook["id"])
    failed = await client.post(f"/api/alerts/channels/{webhook['id']}/test")
    assert await _error(failed, 502) == "HTTP 500 from the receiver"
    assert (await _json(failed))["error"]["code"] == "delivery_failed"

    deleted = await client.delete(f"/api/alerts/channels/{webhook['id']}")
    assert deleted.status_code == 204 and await deleted.get_data() == b""
    await _error(await client.delete(f"/api/alerts/channels/{webhook['id']}"), 404)
    await _error(await client.post(f"/api/alerts/channels/{webhook['id']}/test"), 404)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**WEBHOOK, "type": "pigeon"}, "type"),
        ({**WEBHOOK, "config": {"url": "http://h/x"}}, "config.secret"),
        ({**WEBHOOK, "name": ""}, "name"),
    ],
)
async def test_a_bad_channel_is_a_400_naming_the_field(
    client: Any, body: dict[str, Any], field: str
) -> None:
    message = await _error(await client.post("/api/alerts/channels", json=body), 400)
    assert message.startswith(f"{field}: ")


async def test_rules_are_added_listed_changed_muted_and_deleted(client: Any) -> None:
    channel = await _json(await client.post("/api/alerts/channels", json=WEBHOOK))
    added = await client.post("/api/alerts/rules", json=_rule(channels=[channel["id"]]))
    assert added.status_code == 201
    rule = await _json(added)
    assert {k: rule[k] for k in ("name", "kind", "severity", "channels", "for_s", "repeat_s")} == {
        "name": "billing failing",
        "kind": "failure_rate",
        "severity": "critical",
        "channels": [channel["id"]],
        "for_s": 60.0,
        "repeat_s": 3600.0,
    }
    assert rule["match"]["name"] == "billing.*" and rule["read_only"] is False
    assert [r["id"] for r in (await _json(await client.get("/api/alerts/rules")))["rules"]] == [
        rule["id"]
    ]

    changed = await client.put(f"/api/alerts/rules/{rule['id']}", json=_rule(severity="warning"))
    assert (changed.status_code, (await _json(changed))["severity"]) == (200, "warning")

    muted = await client.post(f"/api/alerts/rules/{rule['id']}/mute", json={"until": T0 + 3600})
    assert (await _json(muted))["muted_until"] == T0 + 3600
    by_iso = await client.post(
        f"/api/alerts/rules/{rule['id']}/mute", json={"until": "2026-05-28T20:26:40+00:00"}
    )
    assert (await _json(by_iso))["muted_until"] == T0
    unmuted = await client.post(f"/api/alerts/rules/{rule['id']}/mute", json={"until": None})
    assert (await _json(unmuted))["muted_until"] is None
    bad_until = await client.post(f"/api/alerts/rules/{rule['id']}/mute", json={"until": "soon"})
    assert (await _error(bad_until, 400)).startswith("until: ")

    assert (await client.delete(f"/api/alerts/rules/{rule['id']}")).status_code == 204
    await _error(await client.delete(f"/api/alerts/rules/{rule['id']}"), 404)
    await _error(await client.put(f"/api/alerts/rules/{rule['id']}", json=_rule()), 404)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"kind": "x"}, "kind"),
        ({"match": {"name": "billing.["}}, "match.name"),
        ({"channels": [999]}, "channels"),
        ({"params": {"window_s": -60, "threshold": 0.1, "min_runs": 10}}, "params.window_s"),
        ({"severity": "apocalyptic"}, "severity"),
    ],
)
async def test_a_bad_rule_is_a_400_naming_the_field(
    client: Any, fields: dict[str, Any], field: str
) -> None:
    message = await _error(await client.post("/api/alerts/rules", json=_rule(**fields)), 400)
    assert message.startswith(f"{field}: ")


async def test_unknown_kind_says_which_kinds_are_known(client: Any) -> None:
    message = await _error(await client.post("/api/alerts/rules", json=_rule(kind="x")), 400)
    assert message.startswith("kind: unknown kind 'x' (known: ") and "job_failed" in message


async def test_bad_json_is_a_400_and_a_rule_from_the_file_is_read_only(
    client: Any, fake: FakeApplication
) -> None:
    bad = await client.post(
        "/api/alerts/rules", data=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert (await _error(bad, 400)).startswith("body: not valid JSON")
    listed = await client.post("/api/alerts/rules", json=[_rule()])
    assert (await _error(listed, 400)).startswith("body: ")
    from_file = fake.alerts.add_file_rule("workers")
    assert (await _json(await client.get("/api/alerts/rules")))["rules"][0]["read_only"] is True
    refused = await client.put(f"/api/alerts/rules/{from_file.id}", json=_rule())
    assert (await _json(refused))["error"]["code"] == "read_only"
    await _error(refused, 409)
    await _error(await client.delete(f"/api/alerts/rules/{from_file.id}"), 409)


def _incidents(fake: FakeApplication) -> tuple[int, int]:
    """A firing incident with two jobs, and a resolved one."""
    alerts = fake.alerts
    rule = alerts.add_file_rule("billing")
    firing = alerts.open(rule, {"name": "billing.charge"}, IncidentState.FIRING, ["a", "b"])
    resolved = alerts.open(rule, {"name": "billing.refund"}, IncidentState.RESOLVED, ["c"])
    return firing.id, resolved.id


async def test_incidents_are_listed_by_state_in_the_contracts_shape(
    client: Any, fake: FakeApplication
) -> None:
    firing_id, resolved_id = _incidents(fake)
    [rule] = await fake.alerts.rules()
    every = (await _json(await client.get("/api/alerts/incidents")))["incidents"]
    assert [i["id"] for i in every] == [resolved_id, firing_id]  # newest first
    [firing] = (await _json(await client.get("/api/alerts/incidents?state=firing")))["incidents"]
    assert {k: firing[k] for k in firing if k in CONTRACT} == {
        "id": firing_id,
        "rule": {"id": rule.id, "name": "billing", "kind": str(Kind.WORKER_OFFLINE)},
        "state": "firing",
        "severity": "critical",
        "summary": "2 failures of billing.charge",
        "labels": {"name": "billing.charge"},
        "count": 2,
        "started_at": T0,
        "resolved_at": None,
        # No --public-url: links go to the address asked.
        "url": f"http://localhost/alerts/{firing_id}",
    }
    assert set(CONTRACT) <= set(firing)
    resolved = (await _json(await client.get("/api/alerts/incidents?state=resolved")))["incidents"]
    assert [i["id"] for i in resolved] == [resolved_id]
    assert (await _json(await client.get("/api/alerts/incidents?state=pending")))["incidents"] == []
    unknown = await client.get("/api/alerts/incidents?state=burning")
    assert (await _error(unknown, 400)).startswith("state: unknown state 'burning'")

    fake.alerts.public_url = "https://sluice.example/"
    [linked] = (await _json(await client.get("/api/alerts/incidents?state=firing")))["incidents"]
    assert linked["url"] == f"https://sluice.example/alerts/{firing_id}"


CONTRACT = (
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
)


async def test_an_incident_has_its_timeline_and_jobs_and_is_acked_and_silenced(
    client: Any, fake: FakeApplication
) -> None:
    firing_id, _ = _incidents(fake)
    detail = await _json(await client.get(f"/api/alerts/incidents/{firing_id}"))
    assert detail["job_ids"] == ["a", "b"]
    assert [entry["what"] for entry in detail["timeline"]] == [
        "pending",
        "firing",
        "attempt",
        "notified",
    ]
    await _error(await client.get("/api/alerts/incidents/999"), 404)

    acked = await client.post(f"/api/alerts/incidents/{firing_id}/ack")
    assert (acked.status_code, (await _json(acked))["acked_at"]) == (200, T0 + 100)
    assert (await _json(acked))["acked_by"] is None  # no authentication: nobody in particular
    silenced = await client.post(
        f"/api/alerts/incidents/{firing_id}/silence", json={"until": T0 + 7200}
    )
    assert (await _json(silenced))["silenced_until"] == T0 + 7200
    forever = await client.post(f"/api/alerts/incidents/{firing_id}/silence", json={})
    assert (await _error(forever, 400)).startswith("until: ")
    await _error(await client.post("/api/alerts/incidents/999/ack"), 404)


@pytest.fixture
async def authed(fake: FakeApplication) -> AsyncIterator[Any]:
    auth = Auth(api_token="tok", users={"ann": "unused"}, session_secret="s")
    async with _client(fake, auth) as client:
        yield client


async def test_alert_changes_need_authentication_and_the_csrf_token_and_name_the_actor(
    authed: Any, fake: FakeApplication
) -> None:
    firing_id, _ = _incidents(fake)
    ack = f"/api/alerts/incidents/{firing_id}/ack"
    assert (await authed.post(ack)).status_code == 401
    assert (await authed.post("/api/alerts/channels", json=WEBHOOK)).status_code == 401
    by_token = await authed.post(ack, headers={"Authorization": "Bearer tok"})
    assert (await _json(by_token))["acked_by"] == TOKEN_USER

    async with authed.session_transaction() as session:
        session.update(user="ann", sid="1", csrf="c" * 32)
    assert (await _json(await authed.post(ack)))["error"]["code"] == "csrf"
    by_ann = await authed.post(ack, headers={"X-CSRF-Token": "c" * 32})
    assert (await _json(by_ann))["acked_by"] == "ann"


async def _page(client: Any, path: str, status: int = 200) -> str:
    response = await client.get(path, headers={"Accept": "text/html"})
    assert response.status_code == status, path
    text: str = (await response.get_data()).decode()
    return text


async def test_the_alerts_page_lists_firing_and_recent_incidents(
    client: Any, fake: FakeApplication
) -> None:
    assert "Nothing fires" in await _page(client, "/alerts")
    firing_id, resolved_id = _incidents(fake)
    page = await _page(client, "/alerts")
    assert 'href="/alerts"' in page and "aria-current" in page  # in the nav
    firing_table = page[page.index('id="firing-table"') : page.index('id="recent-table"')]
    assert f'href="/alerts/{firing_id}"' in firing_table
    assert f'href="/alerts/{resolved_id}"' not in firing_table
    assert f'href="/alerts/{resolved_id}"' in page
    assert "2 failures of billing.charge" in page and "severity-critical" in page


async def test_the_overview_shows_what_fires(client: Any, fake: FakeApplication) -> None:
    assert 'id="firing"' not in await _page(client, "/")
    firing_id, resolved_id = _incidents(fake)
    overview = await _page(client, "/")
    box = overview[overview.index('id="firing"') :]
    assert f'href="/alerts/{firing_id}"' in box and "2 failures of billing.charge" in box
    assert f'href="/alerts/{resolved_id}"' not in overview


async def test_the_incident_page_shows_its_timeline_jobs_and_buttons(
    client: Any, fake: FakeApplication
) -> None:
    firing_id, resolved_id = _incidents(fake)
    page = await _page(client, f"/alerts/{firing_id}")
    assert 'href="/jobs/a"' in page and 'href="/jobs/b"' in page
    for what in ("pending", "firing", "attempt", "notified"):
        assert f'<span class="event-type mono">{what}</span>' in page
    assert "HTTP 503" in page and "HTTP 200" in page  # each attempt's outcome
    assert f'data-url="/api/alerts/incidents/{firing_id}/ack"' in page
    assert f'data-url="/api/alerts/incidents/{firing_id}/silence"' in page
    resolved = await _page(client, f"/alerts/{resolved_id}")
    assert "/ack" not in resolved  # nothing left to acknowledge
    assert "No such incident" in await _page(client, "/alerts/999", 404)


async def test_the_rules_and_channels_pages_list_and_offer_forms(
    client: Any, fake: FakeApplication
) -> None:
    channel = await _json(await client.post("/api/alerts/channels", json=EMAIL))
    await client.post("/api/alerts/rules", json=_rule(channels=[channel["id"]]))
    fake.alerts.add_file_rule("from the file")

    rules = await _page(client, "/alerts/rules")
    assert "billing failing" in rules and "from the file" in rules
    assert 'name="params.window_s"' in rules and 'name="match.name"' in rules
    assert f'name="channels" value="{channel["id"]}"' in rules
    assert all(f'<option value="{kind}">' in rules for kind in ("job_failed", "queue_depth"))
    # The file's rule can be muted, not deleted.
    assert rules.count('data-method="DELETE"') == 1 and rules.count(">Mute</button>") == 2

    channels = await _page(client, "/alerts/channels")
    assert "hunter2" not in channels and MASK in channels
    assert f'data-url="/api/alerts/channels/{channel["id"]}/test"' in channels
    for field in ("config.url", "config.secret", "config.webhook_url", "config.routing_key"):
        assert f'name="{field}"' in channels
    for field in ("host", "port", "starttls", "username", "password", "from", "to"):
        assert f'name="config.{field}"' in channels


async def test_the_forms_and_buttons_work_in_a_browser(fake: FakeApplication) -> None:
    fake.config = Config(port=0)
    rule = fake.alerts.add_file_rule("billing")
    incident = fake.alerts.open(rule, {"name": "billing.charge"}, IncidentState.FIRING, ["a"])

    def scenario(page: Page) -> None:
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(f"{base}/alerts/channels")
        form = page.locator("#add-channel")
        form.locator("[name=name]").fill("ops")
        form.locator("[name=type]").select_option("webhook")
        form.locator("[name='config.url']:visible").fill("http://h/x")
        form.locator("[name='config.secret']").fill(SECRET)
        form.get_by_role("button", name="Add channel").click()
        expect(page.locator("#channels")).to_contain_text("secret=" + MASK)
        page.get_by_role("button", name="Send test notification").click()
        expect(page.locator("#channels .action-result")).to_have_text("Sent: HTTP 200")

        page.goto(f"{base}/alerts/rules")
        form = page.locator("#add-rule")
        form.locator("[name=name]").fill("slow queue")
        form.locator("[name=kind]").select_option("queue_depth")
        form.locator("[name='params.max_depth']").fill("-5")
        form.locator("[name=channels]").check()
        form.get_by_role("button", name="Add rule").click()
        expect(form.locator(".action-result")).to_contain_text("params.max_depth: ")
        form.locator("[name='params.max_depth']").fill("500")
        form.locator("[name=for_s]").fill("60")
        form.get_by_role("button", name="Add rule").click()
        expect(page.locator("#rules")).to_contain_text("max_depth=500")
        expect(page.locator("#rules")).to_contain_text("ops")

        page.goto(f"{base}/alerts/{incident.id}")
        page.get_by_role("button", name="Acknowledge").click()
        expect(page.locator("#incident-acked")).not_to_have_text("—")

    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        [base] = await nursery.start(serve, fake, stop.wait)
        await browse(scenario)
        stop.set()
    [added] = [r for r in await fake.alerts.rules() if r.name == "slow queue"]
    assert (added.kind, dict(added.params), added.for_s) == (
        Kind.QUEUE_DEPTH,
        {"max_depth": 500},
        60,
    )
    [channel] = await fake.alerts.channels()
    assert added.channels == (channel.id,)
    assert dict(channel.config) == {"url": "http://h/x", "secret": SECRET}


async def test_channels_and_rules_through_a_real_sluice(tmp_path: Path) -> None:
    """The real alert service behind ``sluice run``: what is added is read back, masked."""
    async with serving(tmp_path) as (_, client):
        added = await client.post("/api/alerts/channels", json=WEBHOOK)
        assert added.status_code == 201, added.text
        channel = added.json()
        assert channel["config"]["secret"] == MASK
        rule = await client.post("/api/alerts/rules", json=_rule(channels=[channel["id"]]))
        assert rule.status_code == 201, rule.text

        [listed] = (await client.get("/api/alerts/channels")).json()["channels"]
        assert (listed["id"], listed["name"], listed["type"]) == (channel["id"], "ops", "webhook")
        assert listed["config"]["secret"] == MASK and listed["config"]["url"] == "http://h/x"
        [read] = (await client.get("/api/alerts/rules")).json()["rules"]
        assert read == rule.json()
        assert (read["kind"], read["match"]["name"], read["channels"]) == (
            "failure_rate",
            "billing.*",
            [channel["id"]],
        )
        assert read["params"] == {"window_s": 300, "threshold": 0.1, "min_runs": 10}

        html = {"Accept": "text/html"}
        for path in ("/", "/alerts", "/alerts/channels"):
            assert (await client.get(path, headers=html)).status_code == 200, path
        rules_page = await client.get("/alerts/rules", headers=html)
        assert "billing failing" in rules_page.text and SECRET not in rules_page.text

        # Refused as the fake refuses them (the web's tests rely on it).
        for fields, start in (
            ({"kind": "x"}, "kind: unknown kind 'x' (known: "),
            ({"match": {"name": "billing.["}}, "match.name: "),
            ({"channels": [channel["id"] + 1]}, "channels: "),
            ({"params": {"window_s": -60, "threshold": 0.1, "min_runs": 10}}, "params.window_s: "),
        ):
            refused = await client.post("/api/alerts/rules", json=_rule(**fields))
            assert refused.status_code == 400, fields
            assert refused.json()["error"]["message"].startswith(start), refused.text

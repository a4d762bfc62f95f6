"""Safe by default: loopback unless authenticated, tokens, logins, CSRF and origin checks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import argon2
import httpx
import pytest
import trio

from sluice_core import config as options
from sluice_core.config import Config, ConfigError, build
from sluice_core.model import JobState
from sluice_web.auth import is_loopback, load_auth
from tests.test_api import T0, assert_error, job_event, serving
from tests.waiting import wait_until

TOKEN = "test-token-0123456789abcdef"
PASSWORD = "correct horse battery staple"
# Cheap parameters: a test needs a valid argon2 hash, not a slow one.
USERS = {"alice": argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)}
CROSS_SITE = {"Origin": "http://evil.example"}


def test_loopback_addresses() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "localhost", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.10", "sluice.example.com", ""]))


async def test_refuses_to_serve_beyond_loopback_without_authentication(tmp_path: Path) -> None:
    with trio.fail_after(20):
        with pytest.RaisesGroup(
            pytest.RaisesExc(ConfigError, match="refusing to serve on 0.0.0.0"),
            flatten_subgroups=True,
        ):
            async with serving(tmp_path, host="0.0.0.0"):
                pass  # pragma: no cover - never reached


def test_the_cli_says_why_it_refuses_instead_of_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "SLUICE_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db"}
    env.pop("SLUICE_API_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "-m", "sluice_core", "run", "--host", "0.0.0.0", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "sluice: error: refusing to serve on 0.0.0.0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_authentication_settings_fail_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--api-token: expected text of at least 16") as caught:
        build([options.API_TOKEN], {"api_token": "short-secret"}, environ={})
    assert "short-secret" not in str(caught.value)  # a secret is never echoed
    with pytest.raises(ConfigError, match=r"user 'bob'.*not an argon2 hash"):
        load_auth(Config(users={"bob": "plaintext"}))
    toml = tmp_path / "sluice.toml"
    toml.write_text('users = "bob"\n')
    with pytest.raises(ConfigError, match=r"users in .*: expected a table"):
        build([options.CONFIG, options.USERS], {"config": str(toml)}, environ={})


async def test_the_api_token_is_required_and_probes_stay_open(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path, host="0.0.0.0", api_token=TOKEN) as (engine, client):
            response = await client.get("/api/jobs")
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer")
            wrong = {"Authorization": "Bearer not-the-token-at-all"}
            assert_error(await client.get("/api/jobs", headers=wrong), 401)
            assert_error(await client.get("/api/stream"), 401)
            assert_error(await client.post("/api/jobs/bulk", json={}), 401)
            # Healthy with no broker once the SDK can send events (see /healthz).
            await engine.storage.create_api_key("sdk")
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/metrics")).status_code == 200
            page = await client.get("/jobs")
            assert page.status_code == 302
            assert page.headers["location"] == "/login?next=%2Fjobs"

            client.headers["Authorization"] = f"Bearer {TOKEN}"
            assert (await client.get("/api/jobs")).status_code == 200
            # A bearer token needs no CSRF token: browsers never send it by themselves.
            assert_error(await client.post("/api/jobs/x/retry"), 404)


async def _csrf_from_page(client: httpx.AsyncClient) -> str:
    page = await client.get("/jobs")
    assert page.status_code == 200, page.text
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text)
    assert match, "the dashboard pages carry the session's CSRF token"
    return match.group(1)


async def test_dashboard_users_log_in_and_posts_need_the_csrf_token(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, users=USERS) as (engine, client):
            engine.pipeline.put_events([job_event("j1", "e", JobState.FAILED, T0)], [])
            login = {"username": "alice", "password": "wrong", "next": "/jobs"}
            response = await client.post("/login", data=login)
            assert response.status_code == 200 and "Wrong user name or password" in response.text
            assert_error(await client.get("/api/jobs"), 401)

            response = await client.post("/login", data={**login, "password": PASSWORD})
            assert (response.status_code, response.headers["location"]) == (302, "/jobs")
            assert (await client.get("/api/jobs")).status_code == 200

            csrf = await _csrf_from_page(client)
            # Logged in by cookie: a POST without the token could be a forged one.
            assert_error(await client.post("/api/jobs/j1/retry"), 403, "csrf")
            assert_error(
                await client.post("/api/jobs/j1/retry", headers={"X-CSRF-Token": "forged"}), 403
            )

            async def stored() -> bool:
                return (await client.get("/api/jobs/j1")).status_code == 200

            await wait_until(stored, "job j1 in the API")
            # Past the guard: no action plugin is loaded, so the API says so.
            ok = await client.post("/api/jobs/j1/retry", headers={"X-CSRF-Token": csrf})
            assert_error(ok, 501, "not_implemented")
            by_form = await client.post("/api/jobs/j1/retry", data={"csrf_token": csrf})
            assert_error(by_form, 501, "not_implemented")

            assert (await client.post("/logout", headers={"X-CSRF-Token": csrf})).status_code == 302
            assert_error(await client.get("/api/jobs"), 401)


async def test_the_api_token_also_logs_a_browser_in(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path, api_token=TOKEN) as (_, client):
            response = await client.post(
                "/login", data={"password": TOKEN, "next": "//evil.example"}
            )
            # Never redirected off-site, whatever "next" says.
            assert (response.status_code, response.headers["location"]) == (302, "/")
            assert (await client.get("/api/workers")).status_code == 200


async def test_cross_origin_posts_are_refused_even_without_authentication(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path) as (_, client):
            body = {"action": "retry", "ids": ["x"]}
            assert_error(
                await client.post("/api/jobs/bulk", json=body, headers=CROSS_SITE),
                403,
                "cross_origin",
            )
            fetch_meta = {"Sec-Fetch-Site": "cross-site"}
            assert_error(await client.post("/api/jobs/bulk", json=body, headers=fetch_meta), 403)
            assert_error(await client.post("/api/jobs/x/revoke", headers={"Origin": "null"}), 403)
            origin = {"Origin": str(client.base_url).rstrip("/")}
            assert_error(await client.post("/api/jobs/bulk", json=body, headers=origin), 404)
            # Behind a reverse proxy that rewrites Host and names the public one.
            proxied = {
                "Origin": "https://sluice.example.com",
                "X-Forwarded-Host": "sluice.example.com",
            }
            assert_error(await client.post("/api/jobs/bulk", json=body, headers=proxied), 404)
            # Reading stays possible from anywhere (no data leaves without CORS headers).
            assert (await client.get("/api/jobs", headers=CROSS_SITE)).status_code == 200

"""No stranger can steer Sluice: redirects, host names, logins, sessions, bodies (issue 16).

Each test drives a real engine and web server on loopback (``serving``); where
what matters is what a browser does with an answer (a redirect, a rebound host
name), a real headless Chromium does it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import orjson
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from playwright.sync_api import Page, sync_playwright
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    open_websocket_url,
    wrap_client_stream,
)

import sluice_celery.plugin as celery_plugin
from sluice_core import config as options
from sluice_core.config import ConfigError, build
from sluice_web.auth import (
    FREE_FAILURES,
    HALF_LIFE_S,
    MAX_DELAY_S,
    MAX_TRACKED,
    LoginThrottle,
    host_allowed,
)
from sluice_web.errors import BadRequest
from sluice_web.ingest import REVALIDATE_S
from sluice_web.params import decode_cursor, encode_cursor
from tests.test_api import assert_error, serving
from tests.test_auth import PASSWORD, TOKEN, USERS
from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS
from tests.test_ingest import celery_events, new_key, ws_url

REBOUND = "rebind.evil.example"


def in_chromium(scenario: Callable[[Page], None], *args: str) -> Callable[[], None]:
    """``scenario`` on a plain Chromium page (no route: redirects are the browser's own)."""

    def run() -> None:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *args]
            )
            try:
                page = browser.new_context().new_page()
                page.set_default_timeout(10_000)
                scenario(page)
            finally:
                browser.close()

    return run


def port_of(client: httpx.AsyncClient) -> int:
    port = urlsplit(str(client.base_url)).port
    assert port is not None
    return port


# -- 4. open redirect after login ----------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/\\127.0.0.1:15599/x",  # browsers read "\" as "/": "//127.0.0.1:15599/x"
        "/\t/evil.example",  # ... and drop tabs and newlines: "//evil.example"
        "/\n/evil.example",
        "/%5C%5Cevil.example",  # the same, percent-encoded once more
        "//evil.example",
        "https://evil.example/",
        "/ /evil.example",
        "jobs",
        "",
    ],
)
async def test_login_redirects_only_to_a_path_of_this_site(tmp_path: Path, target: str) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path, api_token=TOKEN) as (_, client):
            page = await client.get("/login", params={"next": target})
            assert 'name="next" value="/"' in page.text
            response = await client.post("/login", data={"password": TOKEN, "next": target})
            assert (response.status_code, response.headers["location"]) == (302, "/")


async def test_login_keeps_a_path_of_this_site_with_its_query(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path, api_token=TOKEN) as (_, client):
            target = "/jobs?state=failed&q=a%20b"
            response = await client.post("/login", data={"password": TOKEN, "next": target})
            assert (response.status_code, response.headers["location"]) == (302, target)


@pytest.mark.browser
async def test_a_browser_lands_on_this_site_after_login_whatever_next_says(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with serving(tmp_path, api_token=TOKEN) as (_, client):
            base = str(client.base_url).rstrip("/")
            # "localhost" is the same server under another origin: where a browser that
            # followed the redirect would land, and be told nothing went wrong.
            elsewhere = f"localhost:{port_of(client)}/x"

            def scenario(page: Page) -> None:
                for target in (f"/\\{elsewhere}", f"/\t/{elsewhere}"):
                    page.goto(f"{base}/login?next={quote(target, safe='')}")
                    page.fill("input[name=password]", TOKEN)
                    with page.expect_navigation():
                        page.click("button[type=submit]")
                    assert page.url == f"{base}/", target
                    page.context.clear_cookies()

            await trio.to_thread.run_sync(in_chromium(scenario))


# -- 5. DNS rebinding: the Host allow-list -------------------------------------------


def test_which_host_names_are_allowed() -> None:
    loopback = ["localhost", "localhost:5580", "127.0.0.1:1", "[::1]:5580", "LOCALHOST"]
    assert all(host_allowed(host, [], "127.0.0.1") for host in loopback)
    assert not any(
        host_allowed(host, [], "127.0.0.1")
        for host in [f"{REBOUND}:5580", "127.0.0.1.evil.example", "", "[::1", "localhost:x"]
    )
    # The address bound, unless it is a wildcard.
    assert host_allowed("192.168.1.10:5580", [], "192.168.1.10")
    assert host_allowed("[fd00::1]:5580", [], "fd00::1")
    assert not host_allowed("0.0.0.0:5580", [], "0.0.0.0")
    assert not host_allowed("[::]:5580", [], "::")
    allowed = ["sluice.example.com", ".corp.example"]
    assert host_allowed("Sluice.Example.com:443", allowed, "0.0.0.0")
    assert host_allowed("corp.example", allowed, "0.0.0.0")
    assert host_allowed("a.b.corp.example:8080", allowed, "0.0.0.0")
    assert not host_allowed("evilcorp.example", allowed, "0.0.0.0")
    assert not host_allowed("sluice.example.com.evil.example", allowed, "0.0.0.0")
    assert host_allowed(f"{REBOUND}:1", ["*"], "127.0.0.1")


def test_allowed_hosts_and_trusted_proxies_are_options() -> None:
    environ = {
        "SLUICE_ALLOWED_HOSTS": "sluice.example.com, .corp.example",
        "SLUICE_FORWARDED_ALLOW_IPS": "10.0.0.0/8,::1",
    }
    config = build([options.ALLOWED_HOSTS, options.FORWARDED_ALLOW_IPS], {}, environ=environ)
    assert config.get(options.ALLOWED_HOSTS) == ["sluice.example.com", ".corp.example"]
    assert config.get(options.FORWARDED_ALLOW_IPS) == ["10.0.0.0/8", "::1"]
    with pytest.raises(ConfigError, match="--allowed-hosts: expected a list of host names"):
        build([options.ALLOWED_HOSTS], {"allowed_hosts": ["https://sluice.example.com/"]})
    with pytest.raises(ConfigError, match="--forwarded-allow-ips: expected a list of IP"):
        build([options.FORWARDED_ALLOW_IPS], {"forwarded_allow_ips": ["proxy.example"]})


async def test_requests_naming_another_host_are_refused(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, celery_plugin) as (engine, client):
            port = port_of(client)
            rebound = {"Host": f"{REBOUND}:{port}", "Origin": f"http://{REBOUND}:{port}"}
            for path in ("/api/jobs", "/jobs", "/healthz", "/metrics", "/nowhere"):
                message = assert_error(await client.get(path, headers=rebound), 400, "bad_host")
                assert "--allowed-hosts" in message, message
            body = {"action": "retry", "ids": ["x"]}
            refused = await client.post("/api/jobs/bulk", json=body, headers=rebound)
            assert_error(refused, 400, "bad_host")
            for name in ("localhost", "127.0.0.1", "[::1]"):
                assert (
                    await client.get("/api/jobs", headers={"Host": f"{name}:{port}"})
                ).is_success
            # The ingest WebSocket too, before its key is even looked at.
            key = [(b"Authorization", f"Bearer {await new_key(engine)}".encode())]
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            with pytest.RaisesGroup(
                pytest.RaisesExc(ConnectionRejected, check=lambda exc: exc.status_code == 400),
                flatten_subgroups=True,
            ):
                async with trio.open_nursery() as nursery:
                    await wrap_client_stream(
                        nursery, stream, rebound["Host"], "/api/ingest/ws", extra_headers=key
                    )
                    nursery.cancel_scope.cancel()  # accepted: the test fails


async def test_allowed_hosts_adds_names_and_a_star_allows_any(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, allowed_hosts=["sluice.example.com"]) as (_, client):
            named = await client.get("/api/jobs", headers={"Host": "sluice.example.com"})
            assert named.is_success
            assert_error(await client.get("/healthz", headers={"Host": REBOUND}), 400, "bad_host")
        async with serving(tmp_path, allowed_hosts=["*"]) as (_, client):
            assert (await client.get("/api/jobs", headers={"Host": REBOUND})).is_success


@pytest.mark.browser
async def test_a_page_on_a_rebound_name_can_neither_read_nor_act(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with serving(tmp_path) as (_, client):
            origin = f"http://{REBOUND}:{port_of(client)}"

            def scenario(page: Page) -> None:
                # The attacker's name now resolves to this machine: the page is theirs.
                response = page.goto(f"{origin}/api/jobs")
                assert response is not None and response.status == 400
                status = page.evaluate(
                    """async () => (await fetch("/api/jobs/bulk", {method: "POST",
                        headers: {"Content-Type": "application/json"},
                        body: JSON.stringify({action: "retry", ids: ["x"]})})).status"""
                )
                assert status == 400

            rule = f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1"
            await trio.to_thread.run_sync(in_chromium(scenario, rule))


# -- 6. malformed cursors ------------------------------------------------------------


@pytest.mark.parametrize("cursor", ["%C3%B1", "%00", "%E2%80%8B", "s1", "====", "czE%3D%3D%3D"])
async def test_a_malformed_cursor_is_a_400_never_a_500(tmp_path: Path, cursor: str) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path) as (_, client):
            message = assert_error(
                await client.get(f"/api/jobs?cursor={cursor}"), 400, "bad_request"
            )
            assert message.startswith("cursor:")
            page = await client.get(f"/jobs?cursor={cursor}", headers={"Accept": "text/html"})
            assert page.status_code == 400 and page.headers["content-type"].startswith("text/html")
            assert "not a cursor from this API" in page.text


@given(st.text())
def test_any_text_is_a_cursor_or_a_bad_request(text: str) -> None:
    try:
        decode_cursor(text)
    except BadRequest:
        pass


@given(st.integers(0, 10**18 - 1))
def test_a_cursor_decodes_to_what_was_encoded(seq: int) -> None:
    assert decode_cursor(encode_cursor(seq)) == seq


# -- 8. login throttle, Secure cookies, logout -------------------------------------


async def test_the_login_throttle_grows_caps_and_decays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    throttle = LoginThrottle()
    for _ in range(FREE_FAILURES - 1):
        throttle.failed("user:a", "addr:1")
        assert throttle.retry_after("user:a") == 0
    throttle.failed("user:a", "addr:1")
    assert throttle.retry_after("user:a") == pytest.approx(1.0)
    assert throttle.retry_after("user:b", "addr:1") == pytest.approx(1.0)  # by either key
    assert throttle.retry_after("user:b", "addr:2") == 0
    await trio.sleep(throttle.retry_after("user:a"))
    assert throttle.retry_after("user:a") == 0
    throttle.failed("user:a")
    assert throttle.retry_after("user:a") == pytest.approx(2.0, rel=0.01)  # doubles
    for _ in range(40):
        throttle.failed("user:a")
    assert throttle.retry_after("user:a") == MAX_DELAY_S
    # Quiet for a while, the failures are forgotten: a user's typos are free again.
    await trio.sleep(10 * HALF_LIFE_S)
    throttle.failed("user:a")
    assert throttle.retry_after("user:a") == 0
    throttle.succeeded("user:a")
    for i in range(MAX_TRACKED + 10):
        throttle.failed(f"addr:{i}")
    assert len(throttle) <= MAX_TRACKED


async def test_failed_logins_are_throttled_per_account_and_per_address(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with serving(
            tmp_path, users=USERS, api_token=TOKEN, forwarded_allow_ips=["127.0.0.1"]
        ) as (_, client):

            async def login(user: str, password: str, address: str) -> httpx.Response:
                form = {"username": user, "password": password, "next": "/jobs"}
                return await client.post("/login", data=form, headers={"X-Forwarded-For": address})

            for _ in range(FREE_FAILURES):
                response = await login("alice", "wrong", "10.0.0.1")
                assert response.status_code == 200 and "Wrong user name" in response.text
            for user, address in (
                ("alice", "10.0.0.1"),
                ("alice", "10.0.0.2"),
                ("bob", "10.0.0.1"),
            ):
                # Even the right password: it is not checked while the throttle holds.
                locked = await login(user, PASSWORD, address)
                assert locked.status_code == 429, (user, address)
                assert int(locked.headers["Retry-After"]) >= 1
                assert "Too many failed logins" in locked.text
            # Another account from another address is not held back by them.
            assert (await login("", TOKEN, "10.0.0.3")).status_code == 302

            client.cookies.clear()
            wrong = {"Authorization": "Bearer not-the-token-at-all", "X-Forwarded-For": "10.0.0.4"}
            for _ in range(FREE_FAILURES):
                assert_error(await client.get("/api/jobs", headers=wrong), 401)
            right = {**wrong, "Authorization": f"Bearer {TOKEN}"}
            limited = await client.get("/api/jobs", headers=right)
            assert "retry in" in assert_error(limited, 429, "rate_limited")
            assert int(limited.headers["Retry-After"]) >= 1
            right["X-Forwarded-For"] = "10.0.0.5"
            assert (await client.get("/api/jobs", headers=right)).status_code == 200


async def test_x_forwarded_headers_count_only_from_trusted_proxies(tmp_path: Path) -> None:
    https = {"X-Forwarded-Proto": "https"}
    with trio.fail_after(30):
        async with serving(tmp_path, api_token=TOKEN) as (_, client):
            response = await client.post("/login", data={"password": TOKEN}, headers=https)
            assert not secure(response)
            # Anyone may send X-Forwarded-For: untrusted, it cannot dodge the throttle
            # (each try names another account: only the address holds them back).
            for i in range(FREE_FAILURES):
                spoofed = {"X-Forwarded-For": f"10.1.0.{i}"}
                form = {"username": f"u{i}", "password": "wrong"}
                assert (await client.post("/login", data=form, headers=spoofed)).status_code == 200
            form = {"username": "u9", "password": TOKEN}
            refused = await client.post(
                "/login", data=form, headers={"X-Forwarded-For": "10.1.1.1"}
            )
            assert refused.status_code == 429
        async with serving(tmp_path, api_token=TOKEN, forwarded_allow_ips=["127.0.0.0/8"]) as (
            _,
            client,
        ):
            assert not secure(await client.post("/login", data={"password": TOKEN}))
            response = await client.post("/login", data={"password": TOKEN}, headers=https)
            assert secure(response)
            assert {"httponly", "samesite=lax"} <= cookie_attributes(response)


def cookie_attributes(response: httpx.Response) -> set[str]:
    _, *attributes = response.headers["set-cookie"].lower().split(";")
    return {attribute.strip() for attribute in attributes}


def secure(response: httpx.Response) -> bool:
    return "secure" in cookie_attributes(response)


async def test_a_copied_session_cookie_is_dead_after_logout(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, users=USERS) as (_, client):
            form = {"username": "alice", "password": PASSWORD}
            assert (await client.post("/login", data=form)).status_code == 302
            copied = client.cookies["sluice_session"]
            page = await client.get("/jobs")
            match = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text)
            assert match
            logout = await client.post("/logout", headers={"X-CSRF-Token": match.group(1)})
            assert logout.status_code == 302
            async with httpx.AsyncClient(base_url=client.base_url, timeout=10) as other:
                other.cookies.set("sluice_session", copied)
                assert_error(await other.get("/api/jobs"), 401, "unauthorized")
                assert (await other.get("/jobs")).status_code == 302  # to the login page
            # A new login works, and is a new session.
            assert (await client.post("/login", data=form)).status_code == 302
            assert client.cookies["sluice_session"] != copied
            assert (await client.get("/api/jobs")).status_code == 200


# -- 10. ingest stream revocation, bodies, OPTIONS ------------------------------------


async def test_a_revoked_key_stops_an_open_stream_within_a_second(tmp_path: Path) -> None:
    assert REVALIDATE_S <= 1.0
    with trio.fail_after(30):
        async with serving(tmp_path, celery_plugin) as (engine, client):
            key = await new_key(engine)
            headers = [(b"Authorization", f"Bearer {key}".encode())]
            batch = {"seq": 1, "format": "celery", "events": celery_events(str(uuid.uuid4()))}
            async with open_websocket_url(ws_url(client), extra_headers=headers) as ws:
                await ws.send_message(orjson.dumps(batch).decode())
                assert orjson.loads(await ws.get_message()) == {"ack": 1}
                await engine.storage.revoke_api_key("app")
                # Closed by the server, idle as the stream is, one check period later
                # (plus a margin for a loaded machine).
                with trio.fail_after(REVALIDATE_S + 1.0), pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason is not None
                assert (closed.value.reason.code, closed.value.reason.reason) == (
                    1008,
                    "API key revoked",
                )


MULTIPART = "multipart/form-data; boundary=b"


def multipart(*fields: tuple[str, str]) -> bytes:
    parts = [
        f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields
    ]
    return ("".join(parts) + "--b--\r\n").encode()


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("multipart/form-data", multipart(("terminate", "true")), 400),  # no boundary
        (MULTIPART, multipart(("terminate", "true")), 400),  # a form is not the options
        (MULTIPART, b"--b\r\nnot a form", 400),
        ("application/x-www-form-urlencoded", b"terminate=true", 400),
        ("application/xml", b"<revoke terminate='true'/>", 415),
        ("text/plain", b"terminate", 400),  # fetch's label for a string body
    ],
)
async def test_a_body_that_is_not_json_options_is_refused_in_the_error_shape(
    tmp_path: Path, content_type: str, body: bytes, status: int
) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path) as (_, client):
            response = await client.post(
                "/api/jobs/x/revoke", content=body, headers={"Content-Type": content_type}
            )
            assert "JSON" in assert_error(response, status)


async def test_a_form_carrying_only_the_csrf_token_is_no_options(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path) as (_, client):
            for content_type, body in (
                (MULTIPART, multipart(("csrf_token", "t"))),
                ("application/x-www-form-urlencoded", b"csrf_token=t"),
            ):
                response = await client.post(
                    "/api/jobs/x/revoke", content=body, headers={"Content-Type": content_type}
                )
                assert_error(response, 404, "not_found")  # past the body: job x is unknown


async def test_options_says_which_methods_a_path_takes(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serving(tmp_path) as (_, client):
            for path, methods in (("/api/jobs", {"GET", "HEAD"}), ("/api/jobs/x/retry", {"POST"})):
                response = await client.options(path)
                assert response.status_code == 204, response.text
                assert response.content == b""
                assert "content-type" not in response.headers
                assert {m.strip() for m in response.headers["Allow"].split(",")} >= methods
            assert_error(await client.options("/api/nowhere"), 404, "not_found")
        async with serving(tmp_path, api_token=TOKEN) as (_, client):
            # Authentication first, as for a GET.
            assert_error(await client.options("/api/jobs"), 401, "unauthorized")

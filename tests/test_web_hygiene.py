"""No stranger can steer Sluice: redirects, host names, logins, sessions, bodies (issue 16).

Each test drives a real engine and web server on loopback (``serving``); where
what matters is what a browser does with an answer (a redirect, a rebound host
name), a real headless Chromium does it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, open_websocket_url

import sluice_celery.plugin as celery_plugin
from sluice_web.errors import BadRequest
from sluice_web.ingest import REVALIDATE_S
from sluice_web.params import decode_cursor, encode_cursor
from tests.test_api import assert_error, serving
from tests.test_ingest import celery_events, new_key, ws_url

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


# -- 10. ingest stream revocation ----------------------------------------------------

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



"""The ingest endpoints: events pushed to Sluice by the SDK and by remote agents.

The door itself (keys, formats, checks, storing) is the application's
:class:`~sluice_core.ingest.IngestService`; here are HTTP, WebSocket and each replica's
rate limits.

- ``POST /api/ingest``: one batch, JSON. ``{"format": "celery", "events": [...]}``
  carries Celery's own event dicts (docs/celery-protocol.md section 3, what the SDK
  sends); ``{"format": "sluice", "job_events": [...], "worker_events": [...]}``
  carries normalized events (:mod:`sluice_core.serialize`, what an agent sends).
  The answer, ``200 {"accepted": n}``, comes once the events are stored.
- ``WS /api/ingest/ws``: a stream of such batches, each with a ``seq``; the server
  answers ``{"ack": seq}`` once a batch is stored, or ``{"seq": seq, "error": ...}``
  for a batch it will never take (resending it cannot help). A remote agent that
  announces its brokers at the handshake is also sent the actions on its jobs on
  this connection, and answers them there (:mod:`sluice_core.remote`); while it is
  connected it is in the app's :class:`~sluice_core.remote.Agents`.

Both take only API keys (``Authorization: Bearer <key>``, ``sluice keys create``),
never the dashboard's login or API token, and use no cookies, so the dashboard's
CSRF and Origin checks do not apply (web/auth.py exempts these paths).

Acks wait for storage, not just for the pipeline's buffer: a sender drops what
is acked, so an ack must mean "safe". Ingest is idempotent by event id, so a
batch sent again after a lost ack changes nothing.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import attrs
import orjson
import trio
from quart import Blueprint, Response, current_app, request, websocket
from quart.wrappers import ClientDisconnectedError
from werkzeug.datastructures import Headers

from sluice_core.config import INGEST_BURST, INGEST_RATE
from sluice_core.ingest import IngestRefused
from sluice_core.remote import HEADER, AgentLink, announced
from sluice_core.storage import ApiKey
from sluice_web.context import application
from sluice_web.errors import ApiError, BadRequest, error_response, rate_limited

log = logging.getLogger(__name__)

INGEST_PATHS = frozenset({"/api/ingest", "/api/ingest/ws"})
# Bodies are capped by the app's MAX_CONTENT_LENGTH (1 MiB, 413 past it); WebSocket
# messages get the same cap here. The SDK and the agent send well below it.
MAX_MESSAGE_BYTES = 1024 * 1024
# An open stream re-checks its key this often, busy or idle: a revoked key stops within
# it. One indexed lookup a second per stream costs little beside the batches it carries.
REVALIDATE_S = 1.0

blueprint = Blueprint("ingest", __name__)


# -- limits -------------------------------------------------------------------


@attrs.define
class TokenBucket:
    """``rate`` events per second on average, bursts of up to ``burst``."""

    rate: float
    burst: float
    tokens: float = attrs.field(default=math.nan)
    at: float = 0.0

    def take(self, n: float, now: float) -> float:
        """Take ``n`` tokens if there are; else take none and return the seconds to wait."""
        if math.isnan(self.tokens):
            self.tokens = self.burst
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        n = min(n, self.burst)  # a request larger than a burst waits for a full bucket
        if n <= self.tokens:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


class Limits:
    """A token bucket per API key: the rate each sender may push at, in this replica."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[int, TokenBucket] = {}

    def wait_for(self, key: ApiKey, events: int) -> float:
        """Seconds this key must wait before sending ``events`` more; 0 takes them now."""
        bucket = self._buckets.setdefault(key.id, TokenBucket(self.rate, self.burst))
        return bucket.take(max(events, 1), time.monotonic())


# The status of each refusal the ingest service raises, by its code.
STATUS = {"bad_request": 400, "too_many_events": 413, "unavailable": 503}


def _api_error(exc: IngestRefused) -> ApiError:
    return ApiError(exc.message, status=STATUS[exc.code], code=exc.code)


async def _authenticate(headers: Headers) -> ApiKey | None:
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    try:
        return await application().ingest.authenticate(token.strip())
    except IngestRefused as exc:
        raise _api_error(exc) from None


def _limits() -> Limits:
    limits: Limits = current_app.extensions["sluice_ingest_limits"]
    return limits


@blueprint.record
def _setup(state: Any) -> None:
    config = state.app.extensions["sluice_application"].config
    state.app.extensions["sluice_ingest_limits"] = Limits(
        config.get(INGEST_RATE), config.get(INGEST_BURST)
    )


def _unauthorized() -> Response:
    response = error_response(
        401,
        "unauthorized",
        "send a valid API key: 'Authorization: Bearer <key>' (sluice keys create)",
    )
    response.headers["WWW-Authenticate"] = 'Bearer realm="sluice-ingest"'
    return response


# -- HTTP ---------------------------------------------------------------------


@blueprint.post("/api/ingest")
async def ingest_batch() -> Response | tuple[dict[str, Any], int]:
    ingest = application().ingest
    key = await _authenticate(request.headers)
    if key is None:
        return _unauthorized()
    try:
        job_events, worker_events = ingest.decode(key, ingest.parse(key, await request.get_data()))
        wait = _limits().wait_for(key, len(job_events) + len(worker_events))
        if wait:
            return rate_limited("too many events for this API key", wait)
        await ingest.store(key, job_events, worker_events)
    except IngestRefused as exc:
        raise _api_error(exc) from None
    return {"accepted": len(job_events) + len(worker_events)}, 200


# -- WebSocket -------------------------------------------------------------------

# Close codes (RFC 6455 section 7.4): the key is refused / the server is going away.
CLOSE_POLICY = 1008
CLOSE_RESTART = 1012


@blueprint.websocket("/api/ingest/ws")
async def ingest_stream() -> Response | None:
    key = await _authenticate(websocket.headers)
    if key is None:
        return _unauthorized()  # sent as the handshake's answer: the client sees a 401
    await websocket.accept()
    brokers = announced(websocket.headers.get(HEADER))
    agents = application().agents
    link = None if brokers is None else agents.connect(key.name, brokers)
    try:
        await _serve_stream(key, link)
    except* ClientDisconnectedError:
        # An agent that stops, restarts or loses its network: routine, and it resends
        # whatever was not acked. Raised inside the nursery, it would reach the app's
        # error handler as an exception group and be logged as a crash.
        log.info("ingest stream from key %r: the sender disconnected", key.name)
    finally:
        if link is not None:
            agents.disconnect(link)
    return None


async def _serve_stream(key: ApiKey, link: AgentLink | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_revalidate, nursery)
        if link is not None:
            nursery.start_soon(_send_actions, link)
        while True:
            data = await websocket.receive()
            reply = await _stream_message(key, data, nursery, link)
            if reply is not None:
                await websocket.send(orjson.dumps(reply).decode())


async def _send_actions(link: AgentLink) -> None:
    """Send the agent the actions on its jobs (web/actions.py puts them in its outbox)."""
    async for message in link.outbox:
        await websocket.send(message.decode())


async def _revalidate(nursery: trio.Nursery) -> None:
    """Close the stream once its key is revoked, or cannot be checked."""
    while True:
        await trio.sleep(REVALIDATE_S)
        try:
            still = await _authenticate(websocket.headers)
        except ApiError as exc:
            await _close(nursery, CLOSE_RESTART, exc.message)
            return
        if still is None:
            await _close(nursery, CLOSE_POLICY, "API key revoked")
            return


async def _close(nursery: trio.Nursery, code: int, reason: str) -> None:
    """End the stream: acks still pending are not sent (the sender resends those batches)."""
    nursery.cancel_scope.cancel()
    with trio.CancelScope(shield=True):
        await websocket.close(code, reason)


async def _stream_message(
    key: ApiKey,
    data: str | bytes,
    nursery: trio.Nursery,
    link: AgentLink | None,
) -> dict[str, Any] | None:
    """Take one streamed batch; the ack is sent once it is stored, by a task of its own
    (so the next batches are read meanwhile). Returns an immediate reply, if any.
    An agent's answer to an action goes to whoever waits for it."""
    ingest = application().ingest
    seq = None
    try:
        if len(data) > MAX_MESSAGE_BYTES:
            raise ApiError(
                f"message of {len(data)} bytes: the limit is {MAX_MESSAGE_BYTES}",
                status=413,
                code="too_large",
            )
        body = ingest.parse(key, data)
        if link is not None and type(body) is dict and "reply" in body:
            link.answer(body)
            return None
        seq = body.get("seq") if type(body) is dict else None
        if type(seq) is not int:
            raise BadRequest('every message needs an integer "seq"')
        job_events, worker_events = ingest.decode(key, body)
    except (ApiError, IngestRefused) as exc:
        return {"seq": seq, "error": {"code": exc.code, "message": exc.message}}
    # A stream is not refused when over the rate: it is read more slowly.
    wait = _limits().wait_for(key, len(job_events) + len(worker_events))
    while wait:
        await trio.sleep(wait)
        wait = _limits().wait_for(key, len(job_events) + len(worker_events))

    async def store_then_ack() -> None:
        try:
            await ingest.store(key, job_events, worker_events)
        except IngestRefused as exc:
            # Stopping, or storage away: the sender keeps the batch and resends on reconnect.
            log.warning("ingest stream from key %r: %s", key.name, exc.message)
            await _close(nursery, CLOSE_RESTART, exc.message)
            return
        await websocket.send(orjson.dumps({"ack": seq}).decode())

    nursery.start_soon(store_then_ack)
    return None

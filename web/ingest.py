"""The ingest endpoints: events pushed to Sluice by the SDK and by remote agents.

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
from collections.abc import Callable
from typing import Any

import attrs
import orjson
import trio
from quart import Blueprint, Response, current_app, request, websocket
from quart.wrappers import ClientDisconnectedError
from werkzeug.datastructures import Headers

from sluice_core.actions import mark_pushed
from sluice_core.config import INGEST_BURST, INGEST_RATE
from sluice_core.engine import Engine
from sluice_core.model import JobEvent, Normalized, RawBatch, WorkerEvent
from sluice_core.remote import HEADER, AgentLink, Agents, announced
from sluice_core.serialize import job_event_from_json, worker_event_from_json
from sluice_core.storage import ApiKey
from sluice_core.validate import MALFORMED
from sluice_web.errors import ApiError, BadRequest, error_response, rate_limited

log = logging.getLogger(__name__)

INGEST_PATHS = frozenset({"/api/ingest", "/api/ingest/ws"})
# Bodies are capped by the app's MAX_CONTENT_LENGTH (1 MiB, 413 past it); WebSocket
# messages get the same cap here. The SDK and the agent send well below it.
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_EVENTS = 10_000  # per request or message
STORE_TIMEOUT = 30.0  # seconds to wait for storage before telling the sender to resend
# An open stream re-checks its key this often, busy or idle: a revoked key stops within
# it. One indexed lookup a second per stream costs little beside the batches it carries.
REVALIDATE_S = 1.0

# Besides the formats frameworks declare (Framework.pushed_formats, e.g. the SDK's
# "celery"), Sluice's own: normalized events, as an agent sends them.
NORMALIZED_FORMAT = "sluice"

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


class Malformed(BadRequest):
    """A batch Sluice cannot read or refuses; ``count`` is what it adds to
    sluice_events_malformed_total when raised before the batch's events were counted."""

    def __init__(self, message: str, *, count: int = 1) -> None:
        super().__init__(message)
        self.count = count


class Ingest:
    """The endpoints' state in one app: a token bucket per API key."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rate = engine.config.get(INGEST_RATE)
        self.burst = engine.config.get(INGEST_BURST)
        self._buckets: dict[int, TokenBucket] = {}

    def wait_for(self, key: ApiKey, events: int) -> float:
        """Seconds this key must wait before sending ``events`` more; 0 takes them now."""
        bucket = self._buckets.setdefault(key.id, TokenBucket(self.rate, self.burst))
        return bucket.take(max(events, 1), time.monotonic())

    async def authenticate(self, headers: Headers) -> ApiKey | None:
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        try:
            return await self.engine.storage.check_api_key(token.strip())
        except Exception as exc:  # any driver error: the sender keeps its events, retries
            log.warning("cannot check an API key: %s", exc)
            raise ApiError(
                "cannot check the API key now (the database is unreachable): retry later",
                status=503,
                code="unavailable",
            ) from None

    def parse(self, key: ApiKey, data: str | bytes) -> Any:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            self.engine.metrics.events_malformed.labels(_source(key), MALFORMED).inc()
            raise Malformed(f"not valid JSON ({exc})") from None

    def decode(self, key: ApiKey, body: Any) -> tuple[list[JobEvent], list[WorkerEvent]]:
        """The events of one batch (a parsed JSON body), their values checked
        (:mod:`sluice_core.validate`: some may be corrected), or :class:`Malformed` if any
        is not an event or is refused: then none of them is taken. Either way what was
        wrong is counted in sluice_events_malformed_total, by reason.
        Each job event is stamped with the key, over anything the sender claimed: an
        action never takes a pushed event for a broker's word (sluice_core.actions)."""
        try:
            normalized, sent = self._decode(key, body)
        except Malformed as exc:
            self.engine.metrics.events_malformed.labels(_source(key), MALFORMED).inc(exc.count)
            raise
        self.engine.metrics.observe_normalized(_source(key), normalized)
        if normalized.malformed:
            # The normalizer logged why (rate-limited); the sender's bug is in the count.
            raise Malformed(
                f"{normalized.malformed} of {sent} events are malformed (not events of"
                f" format {body.get('format')!r} as its plugin reads them; Sluice's log says"
                " why); nothing was stored"
            )
        if normalized.rejected:
            raise Malformed(
                f"{sum(normalized.rejected.values())} of {sent} events refused"
                f" ({'; '.join(normalized.problems[:3])}); nothing was stored"
            )
        return mark_pushed(normalized.job_events, key.name), normalized.worker_events

    def _decode(self, key: ApiKey, body: Any) -> tuple[Normalized, int]:
        """The batch's events, checked, and how many the sender sent."""
        if type(body) is not dict:
            raise Malformed("expected a JSON object with a format and its events")
        fmt = body.get("format")
        formats = self.engine.frameworks.pushed_formats()
        if fmt in formats:
            events = body.get("events")
            if type(events) is not list:
                raise Malformed(f'format {fmt!r}: "events" must be a list of event objects')
            self._check_count(len(events))
            return self._normalize(key, formats[fmt], events), len(events)
        if fmt == NORMALIZED_FORMAT:
            job_events, worker_events = body.get("job_events", []), body.get("worker_events", [])
            if type(job_events) is not list or type(worker_events) is not list:
                raise Malformed('"job_events" and "worker_events" must be lists')
            self._check_count(len(job_events) + len(worker_events))
            # The door a framework's events pass in its normalizer (PluginManager.normalize).
            normalized = self.engine.pm.admit(
                Normalized(
                    self._parse("job_events", job_events, job_event_from_json),
                    self._parse("worker_events", worker_events, worker_event_from_json),
                )
            )
            return normalized, len(job_events) + len(worker_events)
        known = ", ".join(repr(f) for f in [*formats, NORMALIZED_FORMAT])
        raise Malformed(
            f"unknown format {fmt!r} (accepted: {known}; a framework's plugin, loaded with"
            " --plugin, adds its own)"
        )

    def _check_count(self, n: int) -> None:
        if n > MAX_EVENTS:
            raise ApiError(
                f"{n} events in one batch: the limit is {MAX_EVENTS}; send smaller batches",
                status=413,
                code="too_many_events",
            )

    def _normalize(self, key: ApiKey, kind: str, events: list[Any]) -> Normalized:
        batch = RawBatch(kind, _source(key), [("ingest", orjson.dumps(events))], time.time())
        result = self.engine.pm.normalize(batch)
        if result is None:
            raise BadRequest(
                f"this Sluice reads no {kind!r} events: start it with the plugin for them"
                " (--plugin NAME)"
            )
        return result

    def _parse[T](self, what: str, items: list[Any], parse: Callable[[Any], T]) -> list[T]:
        out = []
        for i, item in enumerate(items):
            try:
                out.append(parse(item))
            except ValueError as exc:
                raise Malformed(
                    f"{what}[{i}]: {exc}; nothing was stored", count=len(items)
                ) from None
        return out

    async def store(
        self, key: ApiKey, job_events: list[JobEvent], worker_events: list[WorkerEvent]
    ) -> None:
        """Hand the events to the pipeline and return once they are stored."""
        n = len(job_events) + len(worker_events)
        self.engine.metrics.messages_received.labels(_source(key)).inc(n)
        stored = trio.Event()
        if not self.engine.pipeline.offer(job_events, worker_events, stored):
            raise ApiError(
                "Sluice cannot take events now (its buffer is full or it is stopping):"
                " send them again later",
                status=503,
                code="unavailable",
            )
        with trio.move_on_after(STORE_TIMEOUT):
            await stored.wait()
            return
        raise ApiError(
            f"the events were not stored within {STORE_TIMEOUT:g}s (is the database slow"
            " or away?): send them again (sending twice stores nothing twice)",
            status=503,
            code="unavailable",
        )


def _source(key: ApiKey) -> str:
    """The label of this key's events in metrics and logs."""
    return f"ingest/{key.name}"


def _ingest() -> Ingest:
    state: Ingest = current_app.extensions["sluice_ingest"]
    return state


@blueprint.record
def _setup(state: Any) -> None:
    app = state.app
    app.extensions["sluice_ingest"] = Ingest(app.extensions["sluice_engine"])
    app.extensions["sluice_agents"] = Agents()


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
    ingest = _ingest()
    key = await ingest.authenticate(request.headers)
    if key is None:
        return _unauthorized()
    job_events, worker_events = ingest.decode(key, ingest.parse(key, await request.get_data()))
    wait = ingest.wait_for(key, len(job_events) + len(worker_events))
    if wait:
        return rate_limited("too many events for this API key", wait)
    await ingest.store(key, job_events, worker_events)
    return {"accepted": len(job_events) + len(worker_events)}, 200


# -- WebSocket -------------------------------------------------------------------

# Close codes (RFC 6455 section 7.4): the key is refused / the server is going away.
CLOSE_POLICY = 1008
CLOSE_RESTART = 1012


@blueprint.websocket("/api/ingest/ws")
async def ingest_stream() -> Response | None:
    ingest = _ingest()
    key = await ingest.authenticate(websocket.headers)
    if key is None:
        return _unauthorized()  # sent as the handshake's answer: the client sees a 401
    await websocket.accept()
    brokers = announced(websocket.headers.get(HEADER))
    agents: Agents = current_app.extensions["sluice_agents"]
    link = None if brokers is None else agents.connect(key.name, brokers)
    try:
        await _serve_stream(ingest, key, link)
    except* ClientDisconnectedError:
        # An agent that stops, restarts or loses its network: routine, and it resends
        # whatever was not acked. Raised inside the nursery, it would reach the app's
        # error handler as an exception group and be logged as a crash.
        log.info("ingest stream from key %r: the sender disconnected", key.name)
    finally:
        if link is not None:
            agents.disconnect(link)
    return None


async def _serve_stream(ingest: Ingest, key: ApiKey, link: AgentLink | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_revalidate, ingest, nursery)
        if link is not None:
            nursery.start_soon(_send_actions, link)
        while True:
            data = await websocket.receive()
            reply = await _stream_message(ingest, key, data, nursery, link)
            if reply is not None:
                await websocket.send(orjson.dumps(reply).decode())


async def _send_actions(link: AgentLink) -> None:
    """Send the agent the actions on its jobs (web/actions.py puts them in its outbox)."""
    async for message in link.outbox:
        await websocket.send(message.decode())


async def _revalidate(ingest: Ingest, nursery: trio.Nursery) -> None:
    """Close the stream once its key is revoked, or cannot be checked."""
    while True:
        await trio.sleep(REVALIDATE_S)
        try:
            still = await ingest.authenticate(websocket.headers)
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
    ingest: Ingest,
    key: ApiKey,
    data: str | bytes,
    nursery: trio.Nursery,
    link: AgentLink | None,
) -> dict[str, Any] | None:
    """Take one streamed batch; the ack is sent once it is stored, by a task of its own
    (so the next batches are read meanwhile). Returns an immediate reply, if any.
    An agent's answer to an action goes to whoever waits for it."""
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
    except ApiError as exc:
        return {"seq": seq, "error": {"code": exc.code, "message": exc.message}}
    # A stream is not refused when over the rate: it is read more slowly.
    wait = ingest.wait_for(key, len(job_events) + len(worker_events))
    while wait:
        await trio.sleep(wait)
        wait = ingest.wait_for(key, len(job_events) + len(worker_events))

    async def store_then_ack() -> None:
        try:
            await ingest.store(key, job_events, worker_events)
        except ApiError as exc:
            # Stopping, or storage away: the sender keeps the batch and resends on reconnect.
            log.warning("ingest stream from key %r: %s", key.name, exc.message)
            await _close(nursery, CLOSE_RESTART, exc.message)
            return
        await websocket.send(orjson.dumps({"ack": seq}).decode())

    nursery.start_soon(store_then_ack)
    return None

"""``GET /api/stream``: the live bus as Server-Sent Events.

Each message goes out as ``event: job|worker|queue``, ``id: <bus id>`` and one
line of JSON (the shapes of :mod:`sluice_core.serialize`). Job events are
filtered like the job list; worker and queue events always pass.

A client that comes back with ``Last-Event-ID`` (or ``?last_event_id=``) gets
what it missed from the bus's recent history first. When that history no
longer reaches back far enough, when the client's id is from before a restart,
or when the client read too slowly and its bounded queue overflowed, the
stream sends ``event: resync`` and ends: the client reloads its view instead
of silently missing jobs.

hypercorn's trio worker may never tell the app that a client went away
(hypercorn issue 210): the ``: ping`` comment written at least every
``heartbeat`` seconds is what fails on a dead socket, ending the response and
releasing the bus subscription.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import orjson
import trio
from quart import Blueprint, Response, current_app, request

from sluice_core.bus import Bus, LiveMessage, Subscription
from sluice_core.storage import JobQuery
from sluice_web.errors import BadRequest
from sluice_web.params import query_from_args

RESYNC = "event: resync\ndata: {}\n\n"
# Sent first: how long a browser waits before reconnecting, and a first chunk
# that tells the client the subscription is in place.
OPENING = "retry: 3000\n\n"
PING = ": ping\n\n"

blueprint = Blueprint("stream", __name__)


class Streams:
    """The open streams' waits, so that a shutdown ends them at once.

    Without this, hypercorn would wait its whole grace period for streams
    that never end by themselves.
    """

    def __init__(self) -> None:
        self.stopping = False
        self._waits: set[trio.CancelScope] = set()

    def stop(self) -> None:
        self.stopping = True
        for scope in self._waits:
            scope.cancel()

    async def receive(self, sub: Subscription, deadline: float) -> LiveMessage | None:
        """The next message, or None at ``deadline`` or shutdown."""
        with trio.CancelScope(deadline=deadline) as scope:
            self._waits.add(scope)
            try:
                return await sub.receive.receive()
            finally:
                self._waits.discard(scope)
        return None


def matches(query: JobQuery, job: dict[str, Any]) -> bool:
    """Whether a job (as serialized) passes the list's filters."""
    if query.stuck:
        return False  # a job that just moved is not stuck: stuck jobs are the silent ones
    if query.states and job["state"] not in query.states:
        return False
    for field in ("name", "queue", "worker", "framework"):
        wanted = getattr(query, field)
        if wanted is not None and job.get(field) != wanted:
            return False
    if query.q is not None:
        needle = query.q.casefold()
        in_text = any(
            needle in (job.get(field) or "").casefold()
            for field in ("name", "args", "kwargs", "exception")
        )
        if not (job["id"].startswith(query.q) or in_text):
            return False
    if query.since is not None or query.until is not None:
        created = job.get("created_at")
        if created is None:
            return False
        ts = dt.datetime.fromisoformat(created).timestamp()
        if query.since is not None and ts < query.since:
            return False
        if query.until is not None and ts > query.until:
            return False
    return True


def _format(message: LiveMessage) -> str:
    # orjson escapes newlines inside strings: the data is always one SSE line.
    return (
        f"event: {message.kind}\nid: {message.id}\ndata: {orjson.dumps(message.data).decode()}\n\n"
    )


def _passes(query: JobQuery, message: LiveMessage) -> bool:
    return message.kind != "job" or matches(query, message.data)


def _last_event_id() -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    if raw is None or raw == "":
        return None
    if not raw.strip().isdigit():
        raise BadRequest("last_event_id: expected the id of an event this stream sent")
    return int(raw)


async def _events(
    bus: Bus, streams: Streams, query: JobQuery, last_id: int | None, heartbeat: float
) -> AsyncIterator[str]:
    # Runs after the view returned, outside the request and app contexts: it gets
    # everything it needs as arguments.
    with bus.subscribe() as sub:
        # Subscribed first, then the backlog, with no await between: nothing
        # published in between can fall into a gap (or arrive twice).
        if last_id is None:
            backlog: list[LiveMessage] | None = []
        elif last_id > bus.last_id:
            backlog = None  # an id from before a restart: everything since is unknown
        else:
            backlog = bus.since(last_id)
        yield OPENING
        if backlog is None:
            yield RESYNC
            return
        for message in backlog:
            if _passes(query, message):
                yield _format(message)
        next_ping = trio.current_time() + heartbeat
        while not streams.stopping:
            if sub.overflowed:
                yield RESYNC
                return
            received = await streams.receive(sub, next_ping)
            if received is None:
                if trio.current_time() >= next_ping:
                    yield PING
                    next_ping = trio.current_time() + heartbeat
            elif _passes(query, received):
                yield _format(received)
                next_ping = trio.current_time() + heartbeat


@blueprint.get("/api/stream")
async def stream() -> Response:
    query = query_from_args(request.args, paging=False, extra=("last_event_id",))
    last_id = _last_event_id()
    body = _events(
        current_app.extensions["sluice_engine"].bus,
        current_app.extensions["sluice_streams"],
        query,
        last_id,
        current_app.config["SLUICE_SSE_HEARTBEAT"],
    )
    response = Response(
        body,
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    # An event stream never finishes: Quart's response timeout would cut it silently.
    response.timeout = None
    return response

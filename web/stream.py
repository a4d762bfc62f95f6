"""``GET /api/stream``: the live bus as Server-Sent Events.

Each message goes out as ``event: job|worker|queue``, ``id: <bus id>`` and one
line of JSON (the shapes of :mod:`sluice_core.serialize`). Job events are
filtered like the job list; worker and queue events always pass.

The bus hands over a window at a time (a few a second), holding the latest
state of each job that changed in it. A stream sends each matching job once
per window; with ``limit`` (a page's size: the dashboard passes the rows it
shows) only the newest ``limit`` of them, the rows of a list page, followed by
``event: skipped`` with how many matching jobs it left out (``new``: how many
of those were stored for the first time). So what a stream writes is bounded
by what its page can show, not by the event rate, and one that keeps up with
one window keeps up with all.

A client that comes back with ``Last-Event-ID`` (or ``?last_event_id=``) gets
what it missed from the bus's recent history first, coalesced the same way.
When that history no longer reaches back far enough (the client read too
slowly for too long) or the client's id is from before a restart, the stream
sends ``event: resync`` and ends: the client reloads its view instead of
silently missing jobs.

hypercorn's trio worker may never tell the app that a client went away
(hypercorn issue 210): the ``: ping`` comment written at least every
``heartbeat`` seconds is what fails on a dead socket, ending the response and
releasing the bus subscription.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import AsyncIterator, Callable

import attrs
import orjson
import trio
from quart import Blueprint, Response, current_app, request

from sluice_core.application import Feed
from sluice_core.bus import Batch, Gap, LiveMessage
from sluice_core.model import Job
from sluice_core.storage import JobQuery
from sluice_web.context import application
from sluice_web.errors import BadRequest
from sluice_web.params import query_from_args

RESYNC = b"event: resync\ndata: {}\n\n"
# Sent first: how long a browser waits before reconnecting, and a first chunk
# that tells the client the subscription is in place.
OPENING = b"retry: 3000\n\n"
PING = b": ping\n\n"

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

    async def next_batch(self, bus: Feed, after: int, deadline: float) -> Batch | None:
        """The bus's next batch after id ``after``, or None at ``deadline`` or shutdown.
        Raises :class:`~sluice_core.bus.Gap` as the bus does."""
        with trio.CancelScope(deadline=deadline) as scope:
            self._waits.add(scope)
            try:
                return await bus.next_batch(after)
            finally:
                self._waits.discard(scope)
        return None


JobFilter = Callable[[Job], bool]
_TEXT_FIELDS = ("name", "args", "kwargs", "exception")


def job_filter(query: JobQuery) -> JobFilter | None:
    """The list's filters as a test of a job row, made once per stream; None when
    every job passes. It reads the row's attributes: no dict, no parsing."""
    if query.stuck:
        # A job that just moved is not stuck: stuck jobs are the silent ones.
        return lambda job: False
    tests: list[JobFilter] = []
    if query.states:
        states = query.states
        tests.append(lambda job: job.state in states)
    for field in ("name", "queue", "worker", "framework"):
        wanted = getattr(query, field)
        if wanted is not None:
            tests.append(_field_is(field, wanted))
    if query.q is not None:
        # As the list searches: an id prefix (uuids are stored lower case: one typed
        # in capitals is tried lower-cased too), or text in any case.
        prefixes = (query.q, query.q.lower())
        needle = query.q.casefold()
        tests.append(
            lambda job: job.id.startswith(prefixes)
            or any(needle in (getattr(job, f) or "").casefold() for f in _TEXT_FIELDS)
        )
    if query.since is not None or query.until is not None:
        since = query.since if query.since is not None else float("-inf")
        until = query.until if query.until is not None else float("inf")
        tests.append(lambda job: job.created_at is not None and since <= job.created_at <= until)
    if not tests:
        return None
    if len(tests) == 1:
        return tests[0]
    return lambda job: all(test(job) for test in tests)


def _field_is(field: str, wanted: str) -> JobFilter:
    get = operator.attrgetter(field)
    return lambda job: bool(get(job) == wanted)


@attrs.frozen
class View:
    """What a stream shows of each batch: the list's filters and, for a page, the
    most job rows it can show (None: every job that changed).

    Streams with equal views render a window once between them (``Batch.views``).
    """

    query: JobQuery
    limit: int | None
    passes: JobFilter | None = attrs.field(eq=False)

    @classmethod
    def of(cls, query: JobQuery, limit: int | None) -> View:
        return cls(query, limit, job_filter(query))

    def render(self, batch: Batch) -> bytes:
        """The batch as this view sends it: every worker and queue message, the
        matching jobs' latest rows (a page's newest ``limit`` of them), and when
        some were left out ``event: skipped`` with their count."""
        cached = batch.views.get(self)
        if cached is None:
            cached = batch.views[self] = self._render(batch)
        return cached

    def _render(self, batch: Batch) -> bytes:
        others: list[LiveMessage] = []
        matched: list[LiveMessage] = []
        passes = self.passes
        for message in batch.messages:
            if message.job is None:
                others.append(message)
            elif passes is None or passes(message.job):
                matched.append(message)
        # Jobs come in the list's order, oldest first: a page's rows are the last ones.
        cut = max(0, len(matched) - self.limit) if self.limit is not None else 0
        frames = [_frame(m) for m in heapq.merge(others, matched[cut:], key=_message_id)]
        if cut:
            left_out = {"jobs": cut, "new": sum(m.new for m in matched[:cut])}
            # Its id is the batch's last: a client that reconnects resumes after all of it.
            frames.append(b"event: skipped\nid: %d\ndata: %s\n\n"
                          % (batch.last_id, orjson.dumps(left_out)))
        return b"".join(frames)


def _message_id(message: LiveMessage) -> int:
    return message.id


def _frame(message: LiveMessage) -> bytes:
    # orjson escapes newlines inside strings: the data is always one SSE line.
    return b"event: %s\nid: %d\ndata: %s\n\n" % (message.kind.encode(), message.id, message.json)


def _last_event_id() -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    if raw is None or raw == "":
        return None
    if not raw.strip().isdigit():
        raise BadRequest("last_event_id: expected the id of an event this stream sent")
    return int(raw)


async def _events(
    bus: Feed, streams: Streams, view: View, last_id: int | None, heartbeat: float
) -> AsyncIterator[bytes]:
    # Runs after the view returned, outside the request and app contexts: it gets
    # everything it needs as arguments.
    with bus.subscribe():
        # Where the stream starts, before the opening tells the client it is
        # subscribed: what was missed since ``last_id`` comes as the first batch.
        position = bus.last_id if last_id is None else last_id
        yield OPENING
        if position > bus.last_id:
            yield RESYNC  # an id from before a restart: everything since is unknown
            return
        next_ping = trio.current_time() + heartbeat
        while not streams.stopping:
            try:
                batch = await streams.next_batch(bus, position, next_ping)
            except Gap:
                yield RESYNC
                return
            if batch is None:
                if trio.current_time() >= next_ping:
                    yield PING
                    next_ping = trio.current_time() + heartbeat
                continue
            position = batch.last_id
            chunk = view.render(batch)
            if chunk:
                yield chunk  # one write per window, whatever it holds
                next_ping = trio.current_time() + heartbeat


@blueprint.get("/api/stream")
async def stream() -> Response:
    if "cursor" in request.args:
        raise BadRequest("cursor: a stream follows the newest jobs; it takes no cursor")
    query = query_from_args(request.args, extra=("last_event_id",))
    # A page's size: at most this many job rows a window. Without it, every job that changed.
    limit = query.limit if "limit" in request.args else None
    last_id = _last_event_id()
    body = _events(
        application().feed,
        current_app.extensions["sluice_streams"],
        View.of(query, limit),
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

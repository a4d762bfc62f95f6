"""A remote agent: ``sluice agent --broker URL --server wss://... --api-key K``.

It runs next to a broker that the central Sluice cannot reach: the same sources,
normalizers and :class:`~sluice_core.pipeline.Pipeline` as the engine, with the
pipeline's last stage an :class:`Uplink` that streams the normalized batches to
the server's ingest WebSocket (web/ingest.py) instead of a database.

Nothing is lost across disconnects or server restarts: the uplink keeps every
batch until the server acknowledges it (which it does once the batch is stored)
and, on each new connection, sends again everything not acknowledged. A batch
stored but whose ack was lost is sent twice; ingest is idempotent by event id,
so that stores nothing twice. While the server is away the batches wait in the
uplink; when it holds ``buffer_messages`` events, the pipeline waits, its own
buffer fills, and only then do the sources drop (and count) what they read.

Actions on the jobs it streamed (retry, revoke) come back down the same connection,
and the agent does them with its own action handlers on its brokers, then says
what came of them (:mod:`sluice_core.remote`). It announces its brokers at the
handshake so that the server knows which jobs live here. It takes actions from
nowhere else: only from the server it connected to, with its key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from sluice_core.bus import Bus
from sluice_core.config import Config, ConfigError, redact_url
from sluice_core.metrics import Metrics
from sluice_core.model import JobEvent, WorkerEvent
from sluice_core.pipeline import Pipeline
from sluice_core.plugins import PluginManager, close_all
from sluice_core.remote import HEADER, ActionExecutor, announcement
from sluice_core.serialize import job_event_to_json, worker_event_to_json
from sluice_core.sources import Source, run_sources
from sluice_core.spool import Spool
from sluice_core.storage import IngestResult

log = logging.getLogger(__name__)

INGEST_PATH = "/api/ingest/ws"
# Per message, well under the server's limits (1 MiB, 10,000 events), so that a
# message with a few long tracebacks still passes.
MESSAGE_BYTES = 512 * 1024
MESSAGE_EVENTS = 5_000
CONNECT_TIMEOUT = 10.0
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0
REFUSED_BACKOFF = 30.0  # the key was refused: retrying fast cannot help
DRAIN_TIMEOUT = 10.0  # at stop, how long to wait for the server to ack what is held
# The largest message the agent takes: an action on a job carries the job's whole
# timeline, which a job retried many times, with long tracebacks, makes large.
ACTION_BYTES = 64 * 2**20
UPLINK = "uplink"  # the label of what the uplink drops, in sluice_events_dropped_total


def ingest_url(server: str) -> str:
    """The ingest WebSocket URL of a server given as ws(s):// or http(s)://, path or not."""
    parts = urlsplit(server)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError(
            f"--server {redact_url(server)!r}: expected the Sluice server's address,"
            " e.g. wss://sluice.example.com or ws://10.0.0.5:5580"
        )
    path = parts.path if parts.path not in ("", "/") else INGEST_PATH
    return urlunsplit(parts._replace(scheme=scheme, path=path))


class _Pulse:
    """Wakes everyone waiting, each time it fires."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class Uplink:
    """The agent pipeline's last stage: batches go out over WebSocket, kept until acked."""

    def __init__(
        self,
        server: str,
        api_key: str,
        *,
        metrics: Metrics,
        max_events: int,
        brokers: list[str] | None = None,
        executor: ActionExecutor | None = None,
    ) -> None:
        """``brokers`` (redacted URLs) are announced, and the server's actions on their
        jobs done by ``executor``; without them the server sends no action."""
        self.url = ingest_url(server)
        self._headers = [(b"Authorization", f"Bearer {api_key}".encode())]
        self._executor = executor
        if executor is not None and brokers is not None:
            self._headers.append((HEADER.encode(), announcement(brokers)))
        self._metrics = metrics
        self._max_events = max_events
        # seq -> (the message, its event count); insertion order is seq order.
        self._unacked: dict[int, tuple[bytes, int]] = {}
        self.unacked_events = 0
        self._seq = 0
        self._added = _Pulse()
        self._acked = _Pulse()
        self.connected = False
        self.acked_batches = 0

    # -- the pipeline's writer --------------------------------------------------

    async def ingest(
        self, job_events: list[JobEvent], worker_events: list[WorkerEvent]
    ) -> IngestResult:
        """Queue the batch for the server; waits while the uplink is full."""
        for n, message in self._messages(job_events, worker_events):
            while self._unacked and self.unacked_events + n > self._max_events:
                await self._acked.wait()
            self._seq += 1
            seq = str(self._seq).encode()
            self._unacked[self._seq] = (b'{"seq":' + seq + b"," + message, n)
            self.unacked_events += n
            self._added.fire()
        return IngestResult(jobs=[], workers=[], events_stored=len(job_events))

    def _messages(
        self, job_events: list[JobEvent], worker_events: list[WorkerEvent]
    ) -> Iterator[tuple[int, bytes]]:
        """The batch as message bodies (without their seq), each within the size limits."""
        jobs: list[bytes] = []
        workers: list[bytes] = []
        size = 0

        def body() -> bytes:
            return (
                b'"format":"sluice","job_events":['
                + b",".join(jobs)
                + b'],"worker_events":['
                + b",".join(workers)
                + b"]}"
            )

        encoded = [(jobs, orjson.dumps(job_event_to_json(e))) for e in job_events]
        encoded += [(workers, orjson.dumps(worker_event_to_json(e))) for e in worker_events]
        for into, item in encoded:
            if len(item) > MESSAGE_BYTES:
                self._metrics.events_dropped.labels(UPLINK).inc()
                log.error("dropped an event of %d bytes: too large to send", len(item))
                continue
            if size + len(item) > MESSAGE_BYTES or len(jobs) + len(workers) >= MESSAGE_EVENTS:
                yield len(jobs) + len(workers), body()
                jobs.clear()
                workers.clear()
                size = 0
            into.append(item)
            size += len(item) + 1
        if jobs or workers:
            yield len(jobs) + len(workers), body()

    async def drain(self) -> None:
        """Return once the server has acknowledged everything queued so far."""
        while self._unacked:
            await self._acked.wait()

    # -- the connection ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected (reconnecting with backoff) and stream until cancelled."""
        task_status.started()
        # Actions outlive the session they came in: one cut short by a lost connection
        # would leave its outcome unknown to the agent too.
        async with trio.open_nursery() as actions:
            await self._connect_loop(actions)

    async def _connect_loop(self, actions: trio.Nursery) -> None:
        where = redact_url(self.url)
        delay = BACKOFF_FIRST
        while True:
            try:
                async with open_websocket_url(
                    self.url,
                    extra_headers=self._headers,
                    max_message_size=ACTION_BYTES,
                    connect_timeout=CONNECT_TIMEOUT,
                    disconnect_timeout=CONNECT_TIMEOUT,
                ) as ws:
                    self.connected = True
                    delay = BACKOFF_FIRST
                    log.info("connected to %s; sending %d held events", where, self.unacked_events)
                    await self._session(ws, actions)
            except ConnectionRejected as exc:
                if exc.status_code in (401, 403):
                    delay = REFUSED_BACKOFF
                    log.error(
                        "%s refused the API key (HTTP %d): create one on the server with"
                        " `sluice keys create NAME` and pass it with --api-key",
                        where,
                        exc.status_code,
                    )
                else:
                    log.warning("%s refused the connection (HTTP %d)", where, exc.status_code)
            except (OSError, HandshakeError) as exc:
                log.warning(
                    "cannot connect to %s (%s); holding %d events",
                    where,
                    str(exc) or type(exc).__name__,  # trio-websocket's errors may say nothing
                    self.unacked_events,
                )
            finally:
                self.connected = False
            await trio.sleep(delay)
            delay = min(delay * 2, max(delay, BACKOFF_MAX))

    async def _session(self, ws: WebSocketConnection, actions: trio.Nursery) -> None:
        """Stream until the connection closes; the next one resends what is not acked."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_loop, ws)
            try:
                await self._receive_loop(ws, actions)
            except ConnectionClosed as exc:
                log.warning(
                    "%s closed the connection (%s); holding %d events",
                    redact_url(self.url),
                    exc.reason,
                    self.unacked_events,
                )
            nursery.cancel_scope.cancel()

    async def _send_loop(self, ws: WebSocketConnection) -> None:
        sent = 0  # a new connection sends everything not acked, oldest first
        while True:
            latest = self._seq
            if latest <= sent:
                await self._added.wait()
                continue
            for seq in [seq for seq in self._unacked if sent < seq <= latest]:
                held = self._unacked.get(seq)
                if held is None:
                    continue  # acked while the previous ones were sent
                try:
                    await ws.send_message(held[0])
                except ConnectionClosed:
                    return  # the receive loop sees the close too, and ends the session
            sent = latest

    async def _receive_loop(self, ws: WebSocketConnection, actions: trio.Nursery) -> None:
        while True:
            message = await ws.get_message()
            try:
                reply = orjson.loads(message)
            except orjson.JSONDecodeError:
                reply = None
            if type(reply) is not dict:
                log.warning("ignored a reply that is not a JSON object: %r", message[:120])
                continue
            if "action" in reply and self._executor is not None:
                actions.start_soon(self._act, ws, self._executor, reply["action"])
                continue
            seq = reply.get("ack")
            if seq is not None:
                self._settle(seq)
                self.acked_batches += 1
                continue
            seq, error = reply.get("seq"), reply.get("error", {})
            # Refused for what it is (malformed, too large): sending it again cannot help.
            held = self._settle(seq)
            self._metrics.events_dropped.labels(UPLINK).inc(held)
            log.error(
                "the server refused a batch of %d events: %s (%s)",
                held,
                error.get("message"),
                error.get("code"),
            )

    async def _act(self, ws: WebSocketConnection, executor: ActionExecutor, action: Any) -> None:
        """Do an action the server sent, and answer it on the connection it came on."""
        answer = await executor.execute(action)
        request_id = action.get("id") if type(action) is dict else None
        try:
            await ws.send_message(orjson.dumps({"reply": request_id, **answer}))
        except ConnectionClosed:
            log.warning(
                "the connection closed before this agent could answer an action (%s)",
                "done" if "results" in answer else answer,
            )

    def _settle(self, seq: object) -> int:
        held = self._unacked.pop(seq, None) if type(seq) is int else None
        if held is None:
            return 0
        self.unacked_events -= held[1]
        self._acked.fire()
        return held[1]


class Agent:
    """Sources and normalizers next to a broker, streaming to a central Sluice."""

    def __init__(self, config: Config, pm: PluginManager, *, server: str, api_key: str) -> None:
        self.config = config
        self.metrics = Metrics()
        self.actions = pm.actions(config)
        self.uplink = Uplink(
            server,
            api_key,
            metrics=self.metrics,
            max_events=config.buffer_messages,
            brokers=[redact_url(url) for url in config.brokers],
            executor=ActionExecutor(self.actions),
        )
        self.pipeline = Pipeline(
            normalize=pm.normalize,
            storage=self.uplink,
            metrics=self.metrics,
            bus=Bus(),
            on_stored=lambda result: None,  # no one to tell: the server publishes
            buffer_messages=config.buffer_messages,
            buffer_bytes=config.buffer_mb * 2**20,
            spool=Spool(config.spool_mb * 2**20, config.spool_dir),
            batch_events=config.batch_events,
        )
        self.sources: list[Source] = pm.sources(config)
        self._stop_requested = trio.Event()
        self.stopped = trio.Event()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested.is_set()

    def stop(self) -> None:
        self._stop_requested.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stream until :meth:`stop`: then stop the sources, forward what was read, and
        wait (a while) for the server to acknowledge it."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.uplink.run)
                pipeline_done = trio.Event()
                nursery.start_soon(self._run_pipeline, pipeline_done)
                sources = trio.CancelScope()
                nursery.start_soon(self._run_sources, sources)
                task_status.started()
                await self._stop_requested.wait()
                log.info("stopping: sources first, then sending what was read")
                sources.cancel()
                self.pipeline.close()
                await pipeline_done.wait()
                with trio.move_on_after(DRAIN_TIMEOUT):
                    await self.uplink.drain()
                if self.uplink.unacked_events:
                    log.warning(
                        "stopped with %d events the server has not acknowledged: they are lost",
                        self.uplink.unacked_events,
                    )
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await close_all(self.actions)
            self.stopped.set()

    async def _run_pipeline(self, done: trio.Event) -> None:
        try:
            await self.pipeline.run()
        finally:
            done.set()

    async def _run_sources(self, scope: trio.CancelScope) -> None:
        with scope:
            await run_sources(self.sources, self.pipeline)

"""A third-party framework adapter, as an outside package would write it (docs/plugins.md).

"toyqueue" is an imaginary job framework. Its server (the test suite runs one:
``tests/thirdparty/toyqueue_server.py``) holds the queues and speaks lines over
TCP: after ``WATCH`` it streams one JSON object per job change or worker
heartbeat; ``DEPTH <queue> ...`` gets the queues' depths as one JSON line, and
``BUMP <id>`` (move a waiting job to the front of its queue) ``OK`` or why not.

This module is a complete framework plugin using only Sluice's public plugin
API: a source, a normalizer (jobs and worker heartbeats), the framework's
declaration (its heartbeat interval, advice, pushed format), an action of its
own (bump), a queue-depth probe. It is installed through an entry point: it proves that a new framework
needs no change to the core.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson
import trio

from sluice_core import hookimpl
from sluice_core.actions import BROKER, ActionHandler, ActionRefused, ActionResult, ActionSpec
from sluice_core.config import Config, redact_url
from sluice_core.frameworks import Framework
from sluice_core.model import (
    Job,
    JobEvent,
    JobState,
    Normalized,
    QueueSample,
    RawBatch,
    WorkerEvent,
    event_id,
)
from sluice_core.options import SOURCES, Option, OptionParser, seconds
from sluice_core.probes import Probe
from sluice_core.sources import Sink, Source

FRAMEWORK = "toyqueue"
KIND = "toyqueue/json"  # the wire format of this plugin's raw batches
SCHEME = "toyqueue"
DEFAULT_PORT = 7400
# A source's name is this and its server's URL (password redacted): the normalizer reads
# where a job lives from it, never from the message, which anyone pushing could write.
SOURCE_PREFIX = f"{FRAMEWORK}/"

HEARTBEAT = Option(
    "toyqueue_heartbeat",
    seconds(),
    5.0,
    "seconds between toyqueue workers' heartbeats (the workers' --heartbeat)",
)
PROBE_INTERVAL = Option(
    "toyqueue_probe_interval",
    seconds(),
    10.0,
    "seconds between queue depth polls on toyqueue servers",
    commands=SOURCES,
)

STATES: dict[str, JobState | None] = {
    "waiting": JobState.QUEUED,
    "running": JobState.ACTIVE,
    "done": JobState.COMPLETED,
    "error": JobState.FAILED,
    "bumped": None,  # moved to the front of its queue: a row of the timeline, no new state
}


@hookimpl
def sluice_addoption(parser: OptionParser) -> None:
    parser.add(HEARTBEAT, PROBE_INTERVAL)


@hookimpl
def sluice_claim_broker(url: str) -> bool | None:
    return True if urlsplit(url).scheme == SCHEME else None


def _servers(config: Config) -> list[str]:
    return [url for url in config.brokers if urlsplit(url).scheme == SCHEME]


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "localhost", parts.port or DEFAULT_PORT


async def _ask(url: str, line: str) -> bytes:
    """One request, one reply line. Raises OSError or trio.TooSlowError."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(*_address(url))
        async with stream:
            await stream.send_all(line.encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = await stream.receive_some()
                if not chunk:
                    raise OSError(f"{url} closed the connection")
                reply += chunk
    return reply.strip()


# -- what the core must know of toyqueue ---------------------------------------------


def _redelivery(broker: str | None, taken_at: float | None, *, stopped: bool) -> str:
    return "the toyqueue server puts it back at the front of its queue at once"


@hookimpl
def sluice_frameworks(config: Config, register: Callable[[Framework], None]) -> None:
    register(
        Framework(
            FRAMEWORK,
            # toyqueue heartbeats do not say how often they come: the workers' setting does.
            heartbeat_s=config.get(HEARTBEAT),
            job_events_advice="start the worker with --report-jobs",
            setup_advice="add --broker toyqueue://HOST:PORT for each toyqueue server",
            # Pushed to POST /api/ingest as {"format": "toyqueue", "events": [...]}: the
            # normalizer gets the list as one message.
            pushed_formats={"toyqueue": KIND},
            redelivery=_redelivery,
            # What a started job's fate hangs on, said beside "it is lost".
            started_redelivered_if="the server noticed its worker go before the job ended",
        )
    )


# -- reading events --------------------------------------------------------------------


class ToyQueueSource:
    def __init__(self, url: str) -> None:
        self.url = url
        self.name = SOURCE_PREFIX + redact_url(url)  # unique among the engine's sources

    async def run(
        self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        delay, started = 0.1, False
        while True:
            try:
                stream = await trio.open_tcp_stream(*_address(self.url))
                async with stream:
                    await stream.send_all(b"WATCH\n")
                    sink.source_status(self.name, True)
                    if not started:
                        started = True
                        task_status.started()
                    delay = 0.1
                    buffer = b""
                    async for chunk in stream:
                        buffer += chunk
                        *lines, buffer = buffer.split(b"\n")
                        if lines:  # one batch per read, never one call per message
                            messages = [("", line) for line in lines]
                            sink.put_raw(RawBatch(KIND, self.name, messages, time.time()))
                sink.source_status(self.name, False, "connection closed by the server")
            except OSError as exc:
                sink.source_status(self.name, False, str(exc))
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)


@hookimpl
def sluice_sources(config: Config, register: Callable[[Source], None]) -> None:
    for url in _servers(config):
        register(ToyQueueSource(url))


@hookimpl
def sluice_normalize(batch: RawBatch) -> Normalized | None:
    if batch.kind != KIND:
        return None  # another plugin's batch
    out = Normalized()
    # Pushed batches (POST /api/ingest) come from an API key, not from a server.
    server = batch.source.removeprefix(SOURCE_PREFIX) if batch.source.startswith(SOURCE_PREFIX) else None
    for _, body in batch.messages:
        try:
            decoded = orjson.loads(body)
        except orjson.JSONDecodeError:
            out.malformed += 1
            continue
        for msg in decoded if isinstance(decoded, list) else [decoded]:
            try:
                _event(msg, server, out)
            except (KeyError, TypeError, ValueError):
                out.malformed += 1
    return out


def _event(msg: Any, server: str | None, out: Normalized) -> None:
    """One line of a server: a heartbeat ``{"heartbeat": worker, "ts", "active"}``
    or a job change ``{"id", "status", "ts", "name", "queue", "worker", "error"}``."""
    if not isinstance(msg, dict):
        raise TypeError(f"a message is a JSON object, not a {type(msg).__name__}")
    if "heartbeat" in msg:
        out.worker_events.append(
            WorkerEvent(
                hostname=str(msg["heartbeat"]),
                framework=FRAMEWORK,
                type="heartbeat",
                timestamp=float(msg["ts"]),
                active=msg.get("active"),
                processed=msg.get("processed"),
            )
        )
        return
    status = msg["status"]
    fields = {"name": msg.get("name"), "queue": msg.get("queue"), "exception": msg.get("error")}
    out.job_events.append(
        JobEvent(
            id=event_id(msg["id"], status, msg["ts"]),
            job_id=str(msg["id"]),
            framework=FRAMEWORK,
            type=status,
            state=STATES[status],
            timestamp=float(msg["ts"]),
            worker=msg.get("worker"),
            fields={key: value for key, value in fields.items() if value is not None},
            # Where the job lives: its actions go there.
            extra={} if server is None else {BROKER: server},
        )
    )


# -- acting on jobs ---------------------------------------------------------------------

BUMP = ActionSpec(
    "bump",
    "Bump",
    "Move the job to the front of its queue: the next free worker takes it first.",
)


class ToyQueueActions:
    framework = FRAMEWORK
    actions: tuple[ActionSpec, ...] = (BUMP,)

    def __init__(self, servers: list[str]) -> None:
        self.servers = {redact_url(url): url for url in servers}  # as jobs name them

    def handles(self, job: Job) -> bool:
        return job.framework == FRAMEWORK and job.extra.get(BROKER) in self.servers

    async def perform(self, action: str, job: Job, options: Mapping[str, Any]) -> ActionResult:
        broker = job.extra[BROKER]
        if any(char.isspace() for char in job.id):  # it would end the line, or split it
            raise ActionRefused(f"toyqueue cannot name job {job.id!r} in a command")
        try:
            reply = (await _ask(self.servers[broker], f"BUMP {job.id}")).decode(errors="replace")
        except (OSError, trio.TooSlowError) as exc:
            raise ActionRefused(
                f"toyqueue server {broker} did not answer ({exc or 'too slow'}); try again"
            ) from exc
        if reply != "OK":
            raise ActionRefused(f"toyqueue did not bump {job.id}: {reply}")
        return ActionResult(job.id, action)


@hookimpl
def sluice_actions(config: Config, register: Callable[[ActionHandler], None]) -> None:
    if _servers(config):
        register(ToyQueueActions(_servers(config)))


# -- measuring queues ------------------------------------------------------------------


class ToyQueueProbe:
    def __init__(self, url: str, *, interval: float) -> None:
        self.url = url
        self.broker = redact_url(url)
        self.name = SOURCE_PREFIX + self.broker
        self.interval = interval

    async def probe(self, queues: set[str]) -> list[QueueSample]:
        if not queues:
            return []
        depths = orjson.loads(await _ask(self.url, "DEPTH " + " ".join(sorted(queues))))
        now = time.time()
        # Every framework's queue names come in: keep the ones this server knows.
        return [
            QueueSample(name, FRAMEWORK, self.broker, now, depth=depth)
            for name, depth in depths.items()
            if name in queues
        ]


@hookimpl
def sluice_probes(config: Config, register: Callable[[Probe], None]) -> None:
    for url in _servers(config):
        register(ToyQueueProbe(url, interval=config.get(PROBE_INTERVAL)))

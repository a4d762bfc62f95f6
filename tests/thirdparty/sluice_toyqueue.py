"""A third-party framework adapter, as an outside package would write it.

"toyqueue" is an imaginary job framework whose workers report each job change
as one JSON line over TCP: {"id", "name", "status", "ts", "worker"}. This
module uses only Sluice's public plugin API (hookimpl, the model, the Source
and Sink protocols) and is loaded through an entry point: it proves that a new
framework needs no change to the core.
"""

from __future__ import annotations

import time

import orjson
import trio

from sluice_core import hookimpl
from sluice_core.config import Config
from sluice_core.frameworks import Framework
from sluice_core.model import JobEvent, JobState, Normalized, RawBatch, event_id
from sluice_core.options import Option, OptionParser, integer
from sluice_core.sources import Sink

STATES = {
    "waiting": JobState.QUEUED,
    "running": JobState.ACTIVE,
    "done": JobState.COMPLETED,
    "error": JobState.FAILED,
}


class ToyQueueSource:
    def __init__(self, port: int) -> None:
        self.name = f"toyqueue/tcp:{port}"
        self.port = port

    async def run(
        self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        sink.source_status(self.name, True)
        task_status.started()

        async def handle(stream: trio.SocketStream) -> None:
            buffer = b""
            async for chunk in stream:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if lines:
                    messages = [("", line) for line in lines]
                    sink.put_raw(RawBatch("toyqueue/json", self.name, messages, time.time()))

        await trio.serve_listeners(handle, listeners)


PORT = Option("toyqueue_port", integer(0, 65535), None, "port the toyqueue workers report to")


@hookimpl
def sluice_addoption(parser: OptionParser) -> None:
    parser.add(PORT)


@hookimpl
def sluice_sources(config: Config, register) -> None:  # type: ignore[no-untyped-def]
    port = config.get(PORT)
    if port is not None:
        register(ToyQueueSource(port))


@hookimpl
def sluice_frameworks(config: Config, register) -> None:  # type: ignore[no-untyped-def]
    register(
        Framework(
            "toyqueue",
            heartbeat_s=10.0,
            job_events_advice="start the worker with --report-jobs",
            setup_advice="point the workers' --report-to at Sluice's --toyqueue-port",
            # Pushed to POST /api/ingest as {"format": "toyqueue", "events": [...]}: the
            # normalizer gets the list as one message.
            pushed_formats={"toyqueue": "toyqueue/json"},
        )
    )


@hookimpl
def sluice_normalize(batch: RawBatch) -> Normalized | None:
    if batch.kind != "toyqueue/json":
        return None
    out = Normalized()
    for _, body in batch.messages:
        try:
            decoded = orjson.loads(body)
        except orjson.JSONDecodeError:
            out.malformed += 1
            continue
        for msg in decoded if isinstance(decoded, list) else [decoded]:
            _event(msg, out)
    return out


def _event(msg: object, out: Normalized) -> None:
    """One worker report, ``{"id", "name", "status", "ts", "worker"}``, as a job event."""
    if not isinstance(msg, dict) or msg.get("status") not in STATES:
        out.malformed += 1
        return
    try:
        out.job_events.append(
            JobEvent(
                id=event_id(msg["id"], msg["status"], msg["ts"]),
                job_id=msg["id"],
                framework="toyqueue",
                type=msg["status"],
                state=STATES[msg["status"]],
                timestamp=float(msg["ts"]),
                worker=msg.get("worker"),
                fields={"name": msg.get("name")},
            )
        )
    except (KeyError, TypeError, ValueError):
        out.malformed += 1

"""A toyqueue server, the imaginary framework's broker: what the toyqueue plugin reads.

It holds queues of job ids and speaks the plugin's line protocol over TCP on a
free port of 127.0.0.1: ``WATCH`` streams one JSON line per job change or worker
heartbeat, ``DEPTH <queue> ...`` answers the depths and ``BUMP <id>`` moves a
waiting job to the front of its queue. The test plays its workers and producers
through the methods (``enqueue``, ``take``, ``finish``, ``heartbeat``), all in
the test's trio loop.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

import orjson
import trio


class ToyQueueServer:
    def __init__(self) -> None:
        self.port = 0
        self.queues: dict[str, list[str]] = defaultdict(list)  # waiting job ids, next first
        self.names: dict[str, str] = {}  # job id -> job name
        self._watchers: set[trio.MemorySendChannel[bytes]] = set()
        self.watching = trio.Event()  # set once a watcher (Sluice's source) is connected

    @property
    def url(self) -> str:
        return f"toyqueue://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    # -- what its producers and workers do ------------------------------------------------

    def enqueue(self, job_id: str, name: str, queue: str) -> None:
        self.queues[queue].append(job_id)
        self.names[job_id] = name
        self.publish({"id": job_id, "name": name, "queue": queue, "status": "waiting"})

    def take(self, worker: str, queue: str) -> str:
        job_id = self.queues[queue].pop(0)
        self.publish({"id": job_id, "status": "running", "worker": worker})
        return job_id

    def finish(self, job_id: str, worker: str, error: str | None = None) -> None:
        status = {"status": "done"} if error is None else {"status": "error", "error": error}
        self.publish({"id": job_id, "worker": worker, **status})

    def heartbeat(self, worker: str, active: int) -> None:
        self.publish({"heartbeat": worker, "active": active})

    async def beat(self, worker: str, every: float, active: int = 0) -> None:
        """A live worker: a heartbeat every ``every`` seconds until cancelled (it dies)."""
        while True:
            self.heartbeat(worker, active)
            await trio.sleep(every)

    def publish(self, message: dict[str, Any]) -> None:
        self.send_line(orjson.dumps({**message, "ts": time.time()}))

    def send_line(self, line: bytes) -> None:
        for watcher in self._watchers:
            watcher.send_nowait(line + b"\n")

    # -- the protocol ----------------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            line = b""
            while not line.endswith(b"\n"):
                chunk = await stream.receive_some()
                if not chunk:
                    return
                line += chunk
            command, *words = line.decode().split()
            if command == "WATCH":
                await self._watch(stream)
                return
            if command == "DEPTH":
                reply = orjson.dumps({q: len(self.queues[q]) for q in words if q in self.queues})
            elif command == "BUMP":
                reply = self._bump(words[0]).encode()
            else:
                reply = f"ERR unknown command {command}".encode()
            await stream.send_all(reply + b"\n")

    async def _watch(self, stream: trio.SocketStream) -> None:
        send, receive = trio.open_memory_channel[bytes](math.inf)
        self._watchers.add(send)
        self.watching.set()
        try:
            async for line in receive:
                await stream.send_all(line)
        except trio.BrokenResourceError:
            pass  # the watcher hung up
        finally:
            self._watchers.discard(send)

    def _bump(self, job_id: str) -> str:
        for queue in self.queues.values():
            if job_id in queue:
                queue.remove(job_id)
                queue.insert(0, job_id)
                self.publish({"id": job_id, "status": "bumped"})
                return "OK"
        return f"NO {job_id} is not waiting in any queue"

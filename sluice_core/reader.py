"""The reader process: ``sluice run``'s sources and normalizers, in a child process.

A Python process runs Python on one core at a time (the GIL). Reading the
broker, decoding and normalizing cost about as much CPU as folding and storing,
so with both in one process ingest was held to one core of two: at 50,000
events/s offered, Sluice used 100% of one core while the other was 80% idle.

So ``sluice run`` (``--reader-process on``, the default) runs the sources in a
child: there a :class:`~sluice_core.pipeline.Pipeline`, as in a remote agent,
buffers, spools and normalizes, and its last stage, :class:`PipeWriter`, sends
each normalized batch over a pipe. :class:`ReaderProcess`, in the engine, feeds
them to the engine's pipeline, which folds, stores and publishes them::

    reader:  sources -> buffer / spool -> normalize -> PipeWriter ==pipe==+
    engine:  ReaderProcess -> Feed -> writers -> storage -> bus    <=====+

Backpressure runs back along the same path: a slow database holds up the feed,
the pipe fills, the reader's writer waits, and the reader's buffers and spool
take the backlog, as they would in one process. The reader reports its counters,
buffers and sources before each batch, and ten times a second on a pipe of their
own, which the engine always reads: while the data pipe is full (a database
outage) the reports still get through, so the backlog piling up in the reader
shows in ``sluice_buffered_messages`` and a source going down in ``/healthz``.
The engine shows them as its own. (Its ingest lag counts from when a batch
reached the engine: a backlog in the reader shows as ``sluice_buffered_messages``.)

Stopping: the engine closes the control pipe; the reader stops its sources,
sends what it holds and says so; then the engine writes it. A reader that
exits otherwise is restarted; what it held in memory is lost, as in a crash of
a single process. The reader ignores SIGINT and SIGTERM (a terminal's Ctrl-C
reaches the whole process group): the engine decides when it stops, and a
reader whose engine is gone sees its control pipe close.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import trio
from prometheus_client import Counter

from sluice_core.bus import Bus
from sluice_core.config import LOG_FORMAT, Config
from sluice_core.metrics import Metrics
from sluice_core.model import JobEvent, WorkerEvent
from sluice_core.pipeline import Pipeline, SourceStatus
from sluice_core.plugins import PluginManager
from sluice_core.sources import run_sources
from sluice_core.spool import Spool
from sluice_core.storage import IngestResult

log = logging.getLogger("sluice_core.reader")  # also when run as __main__

# Events per batch sent to the engine: about one source read, as the engine's
# pipeline expects (its channel holds a few dozen batches).
BATCH_EVENTS = 1_000
# Often enough that /healthz sees a source up soon after it is (a status is a few
# hundred bytes).
STATUS_INTERVAL_S = 0.1
RESTART_DELAY_S = 2.0
STOP_TIMEOUT_S = 60.0  # for the reader to send what it holds
EXIT_WAIT_S = 5.0  # for a reader that said it is done, or closed its pipe, to exit

# The reader's counters the engine adds to its own, by source.
_COUNTERS = ("messages_received", "events_malformed", "events_dropped")

# Messages on the data pipe, each pickled: ("batch", job event tuples, worker
# events), ("status", number, counters, sources, held), ("done",). A status comes
# before every batch, so the engine never shows fewer messages read than it has
# stored. The status pipe carries statuses only. Statuses are numbered: one that
# waited in the full data pipe is older than those read since from the status pipe.
Message = tuple[Any, ...]


def _event_row(event: JobEvent) -> tuple[Any, ...]:
    # Plain tuples: pickled, unpickled and rebuilt in half the time the attrs
    # instances take to pickle and unpickle (4.5 against 8.2 us an event).
    return (
        event.id, event.job_id, event.framework, event.type, event.state, event.timestamp,
        event.worker, event.fields, event.extra,
    )


class ReaderProcess:
    """The engine's side: runs the reader, restarts it, feeds its batches on."""

    def __init__(self, config: Config, pipeline: Pipeline, metrics: Metrics) -> None:
        self._config = config
        self._pipeline = pipeline
        self._metrics = metrics
        # Opened now: the pipeline's writers stop only once it is closed (by run).
        self._feed = pipeline.open_feed()
        self._control: Connection | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._stopped = trio.Event()
        # Counter totals already added: (counter, its label values) -> total.
        self._seen: dict[tuple[str, tuple[str, ...]], float] = {}
        self._status_number = -1  # of the newest status applied

    async def run(self) -> None:
        """Until :meth:`stop`: run the reader, and a new one whenever it exits."""
        try:
            while not await self._run_once() and not self._stopping:
                log.error("reader process exited; starting another in %.0fs", RESTART_DELAY_S)
                down = {
                    name: SourceStatus(False, "reader process restarting", time.time())
                    for name in self._pipeline.sources
                }
                self._pipeline.reader_status(down, (0, 0))
                await trio.sleep(RESTART_DELAY_S)
        finally:
            await self._feed.aclose()
            self._stopped.set()

    @property
    def pid(self) -> int | None:
        """The running reader's process id."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    async def stop(self) -> None:
        """Have the reader stop its sources and send what it holds; wait for it."""
        self._stopping = True
        if self._control is not None:
            self._control.close()  # the reader waits for this end to close
        with trio.move_on_after(STOP_TIMEOUT_S) as timeout:
            await self._stopped.wait()
        if timeout.cancelled_caught:
            log.warning("reader process did not finish within %.0fs", STOP_TIMEOUT_S)

    async def _run_once(self) -> bool:
        """One reader, until it has sent everything (True) or has exited (False)."""
        # A new interpreter (not a fork, which would copy trio's threads), given
        # the two pipes' ends by number and the config on stdin. Not
        # multiprocessing's spawn: that starts a resource tracker process as well.
        data_read, data_write = os.pipe()
        status_read, status_write = os.pipe()
        control_read, control_write = os.pipe()
        ends = (data_write, status_write, control_read)
        # Started once; Popen returns at once (trio's process API cannot pass these fds).
        process = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "sluice_core.reader", *map(str, ends)],
            stdin=subprocess.PIPE,
            pass_fds=ends,
        )
        self._process = process
        # The reader's ends: closed here so that each side sees the other exit.
        for fd in ends:
            os.close(fd)
        receive = Connection(data_read, writable=False)
        statuses = Connection(status_read, writable=False)
        control = self._control = Connection(control_write, readable=False)
        assert process.stdin is not None
        process.stdin.write(pickle.dumps(self._config))
        process.stdin.close()
        if self._stopping:
            control.close()
        self._seen, self._status_number = {}, -1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._apply_statuses, statuses)
                done = await self._receive_batches(receive)
                nursery.cancel_scope.cancel()
            return done
        finally:
            control.close()
            receive.close()
            statuses.close()
            try:
                await trio.to_thread.run_sync(process.wait, EXIT_WAIT_S, abandon_on_cancel=True)
            except subprocess.TimeoutExpired:
                pass
            finally:
                # Also when cancelled (a stop out of time): never leave a reader behind.
                if process.poll() is None:
                    process.kill()
                    process.wait()

    async def _receive_batches(self, receive: Connection) -> bool:
        """Feed the batches on: True once the reader is done, False if it exited."""
        while True:
            try:
                message = await trio.to_thread.run_sync(_receive, receive, abandon_on_cancel=True)
            except EOFError:
                return False
            kind = message[0]
            if kind == "batch":
                await self._feed.send(message[1], message[2], time.time())
            elif kind == "status":
                self._apply_status(*message[1:])
            elif kind == "done":
                return True

    async def _apply_statuses(self, statuses: Connection) -> None:
        """Apply the status pipe's reports, however full the data pipe is."""
        while True:
            try:
                message = await trio.to_thread.run_sync(_receive, statuses, abandon_on_cancel=True)
            except EOFError:
                return
            self._apply_status(*message[1:])

    def _apply_status(
        self,
        number: int,
        counters: dict[str, dict[tuple[str, ...], float]],
        sources: dict[str, SourceStatus],
        held: tuple[int, int],
    ) -> None:
        # Counters only grow: the larger total wins, whichever pipe brought it.
        for name, totals in counters.items():
            counter: Counter = getattr(self._metrics, name)
            for labels, total in totals.items():
                added = self._seen.get((name, labels), 0.0)
                if total > added:
                    counter.labels(*labels).inc(total - added)
                    self._seen[(name, labels)] = total
        if number > self._status_number:
            self._status_number = number
            self._pipeline.reader_status(sources, held)


def _receive(conn: Connection) -> Message:
    """The next message, with its job events rebuilt (in a thread: a batch takes ms)."""
    message: Message = pickle.loads(conn.recv_bytes())
    if message[0] == "batch":
        return ("batch", [JobEvent(*row) for row in message[1]], message[2])
    return message


# -- the reader process ---------------------------------------------------------------


def reader_main(argv: list[str]) -> None:
    """The reader process: ``python -m sluice_core.reader DATA_FD STATUS_FD CONTROL_FD``,
    the config pickled on stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config: Config = pickle.load(sys.stdin.buffer)
    send = Connection(int(argv[0]), readable=False)
    statuses = Connection(int(argv[1]), readable=False)
    control = Connection(int(argv[2]), writable=False)
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT, stream=sys.stderr)
    pm = PluginManager(builtins=False)
    pm.load(config.plugins)
    pm.configure(config)
    trio.run(_Reader(config, pm, send, statuses).run, control)


class PipeSender:
    """Messages, pickled, down a pipe to the engine."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = trio.Lock()  # one message at a time on the pipe

    async def send(self, message: Message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        async with self._lock:
            try:
                # Blocks while the pipe is full, that is, while the engine is behind.
                await trio.to_thread.run_sync(self._conn.send_bytes, data)
            except OSError as exc:
                # The engine is gone: no one is left to send to (and the pipeline
                # would retry the batch for ever).
                log.error("reader: the engine closed the pipe (%s); exiting", exc)
                os._exit(1)


class PipeWriter(PipeSender):
    """The reader's pipeline's last stage: each batch, pickled, down the data pipe."""

    def __init__(self, conn: Connection, status: Callable[[], Message]) -> None:
        super().__init__(conn)
        self._status = status

    async def ingest(
        self, job_events: list[JobEvent], worker_events: list[WorkerEvent]
    ) -> IngestResult:
        # The counters first: they already count this batch's messages.
        await self.send(self._status())
        await self.send(("batch", [_event_row(event) for event in job_events], worker_events))
        return IngestResult(jobs=[], workers=[], events_stored=len(job_events), new_events=[])


class _Reader:
    def __init__(
        self, config: Config, pm: PluginManager, send: Connection, statuses: Connection
    ) -> None:
        self.metrics = Metrics()
        self.writer = PipeWriter(send, self._status)
        self.reports = PipeSender(statuses)
        self._status_number = 0
        self.pipeline = Pipeline(
            normalize=pm.normalize,
            storage=self.writer,
            metrics=self.metrics,
            bus=Bus(),
            on_stored=lambda result: None,  # the engine publishes what it stores
            buffer_messages=config.buffer_messages,
            buffer_bytes=config.buffer_mb * 2**20,
            spool=Spool(config.spool_mb * 2**20, config.spool_dir),
            batch_events=BATCH_EVENTS,
            # The pipe holds the backlog's front, and the engine's pipeline its
            # batches: a few here keep the pipe busy (the buffer and the spool
            # hold the rest, in their compact raw form).
            normalized_batches=4,
        )
        self.sources = pm.sources(config)

    async def run(self, control: Connection) -> None:
        async with trio.open_nursery() as nursery:
            pipeline_done = trio.Event()
            nursery.start_soon(_set_when_done, self.pipeline.run, pipeline_done)
            sources = trio.CancelScope()
            nursery.start_soon(self._run_sources, sources)
            nursery.start_soon(self._report)
            await trio.to_thread.run_sync(_wait_closed, control, abandon_on_cancel=True)
            log.info("reader: stopping the sources, then sending what was read")
            sources.cancel()
            self.pipeline.close()
            await pipeline_done.wait()
            await self.writer.send(self._status())
            await self.writer.send(("done",))
            nursery.cancel_scope.cancel()

    async def _run_sources(self, scope: trio.CancelScope) -> None:
        with scope:
            await run_sources(self.sources, self.pipeline)

    async def _report(self) -> None:
        while True:
            await self.reports.send(self._status())
            await trio.sleep(STATUS_INTERVAL_S)

    def _status(self) -> Message:
        self._status_number += 1
        counters = {name: totals(getattr(self.metrics, name)) for name in _COUNTERS}
        return (
            "status", self._status_number, counters, dict(self.pipeline.sources),
            self.pipeline.held(),
        )


def totals(counter: Counter) -> dict[tuple[str, ...], float]:
    """A counter's value per combination of its label values (source, and reason)."""
    names = counter._labelnames
    return {
        tuple(sample.labels[name] for name in names): sample.value
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def _wait_closed(conn: Connection) -> None:
    try:
        while True:
            conn.recv_bytes()
    except EOFError:
        return


async def _set_when_done(fn: Callable[[], Any], done: trio.Event) -> None:
    try:
        await fn()
    finally:
        done.set()


if __name__ == "__main__":
    reader_main(sys.argv[1:])

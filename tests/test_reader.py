"""The reader process (``sluice run``'s default, sluice_core/reader.py): the sources and
normalizers in a child process, the engine folding and storing what it sends.

A real Redis, a real child process, real-format Celery events.
"""

from __future__ import annotations

import functools
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from sluice_core.config import Config
from sluice_core.engine import Engine
from sluice_core.plugins import PluginManager
from tests.fixtures.services import REDIS_URL, free_port
from tests.metrics import metric
from tests.test_agent import stored, task_events
from tests.test_redis_source import publish
from tests.waiting import wait_until


@asynccontextmanager
async def engine_with_reader(
    db: Path | str, keyprefix: str, **options: Any
) -> AsyncIterator[Engine]:
    """An engine reading the test's Redis channels; ``db`` a SQLite file or a database URL."""
    config = Config(
        broker=[REDIS_URL],
        db=db if isinstance(db, str) else f"sqlite:///{db}",
        plugin=["celery"],
        reader_process=True,
        redis_keyprefix=keyprefix,
        **options,
    )
    pm = PluginManager()
    pm.load(config.plugins)
    pm.configure(config)
    engine = Engine(config, pm)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(engine.run, web=False))
        yield engine
        engine.stop()
        await engine.stopped.wait()


def source_up(engine: Engine) -> bool:
    status = engine.pipeline.sources.get(engine.sources[0].name)
    return status is not None and status.up


def received(engine: Engine) -> float:
    return metric(engine.metrics, "sluice_messages_received_total", source=engine.sources[0].name)


def ingested(engine: Engine) -> float:
    return metric(engine.metrics, "sluice_events_ingested_total")


async def messages_read(client: httpx.AsyncClient) -> float:
    """``sluice_messages_received_total`` of a running ``sluice run``, every source summed."""
    text = (await client.get("/metrics")).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "sluice_messages_received"
        for sample in family.samples
        if sample.name == "sluice_messages_received_total"
    )


async def test_the_reader_process_reads_and_the_engine_stores_and_counts(
    tmp_path: Path, keyprefix: str
) -> None:
    db = tmp_path / "sluice.db"
    messages = task_events(keyprefix, 300)  # 300 jobs: 900 events in 600 messages
    with trio.fail_after(60):
        async with engine_with_reader(db, keyprefix) as engine:
            assert engine.reader is not None
            # The reader's source status reaches the engine (/healthz, the API).
            await wait_until(lambda: source_up(engine))
            reader_pid = engine.reader.pid
            assert reader_pid is not None and reader_pid != os.getpid()
            await publish(REDIS_URL, messages)
            # Counted once committed (the rows are in a moment before).
            await wait_until(lambda: ingested(engine) >= 900)
            assert ingested(engine) == 900
            # So do its counters (/metrics), ahead of what they count: every
            # message, each once, is counted by the time its events are stored.
            assert received(engine) == len(messages)
        # Stopped: the reader has exited, and been waited for.
        assert not running(reader_pid)
    rows, distinct, done = stored(db)
    assert (rows, distinct, done) == (900, 900, 300)


async def test_stopping_stores_everything_the_reader_had_read(
    tmp_path: Path, keyprefix: str
) -> None:
    db = tmp_path / "sluice.db"
    messages = task_events(keyprefix, 3_000)
    with trio.fail_after(60):
        async with engine_with_reader(db, keyprefix) as engine:
            await wait_until(lambda: source_up(engine))
            await publish(REDIS_URL, messages)
            await wait_until(lambda: received(engine) == len(messages))
            # Stopped at once: what the reader still buffers goes to the engine first.
    assert stored(db) == (9_000, 9_000, 3_000)


async def test_a_reader_that_dies_is_replaced(tmp_path: Path, keyprefix: str) -> None:
    db = tmp_path / "sluice.db"
    with trio.fail_after(60):
        async with engine_with_reader(db, keyprefix) as engine:
            assert engine.reader is not None
            await wait_until(lambda: source_up(engine))
            first = engine.reader.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            # Its source is shown down, then up again once a new reader is subscribed.
            await wait_until(lambda: not source_up(engine))
            status = engine.pipeline.sources[engine.sources[0].name]
            assert status.detail == "reader process restarting"
            await wait_until(lambda: source_up(engine) and engine.reader.pid not in (None, first))
            await publish(REDIS_URL, task_events(keyprefix, 100))
            await wait_until(lambda: stored(db)[2] == 100)


async def test_the_backlog_gauges_count_what_the_reader_holds_while_storage_is_down(
    tmp_path: Path, keyprefix: str
) -> None:
    """While the database takes no writes the engine holds a few batches, the pipe
    fills, and the backlog piles up in the reader process: sluice_buffered_messages
    and sluice_spooled_bytes must show it, and the counters must go on counting what
    the reader reads, also after the pipe is full."""
    db = tmp_path / "sluice.db"
    before = task_events(keyprefix, 15_000)  # 30,000 messages, 45,000 events
    during = task_events(keyprefix, 5_000)
    with trio.fail_after(120):
        async with engine_with_reader(db, keyprefix, buffer_mb=1) as engine:
            assert engine.reader is not None
            await wait_until(lambda: source_up(engine))
            # Another writer holds SQLite's write lock: the engine's writes wait, then fail.
            lock = sqlite3.connect(db, isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")
            try:
                await publish(REDIS_URL, before)
                # More than the engine and the pipe take: the engine stops reading the
                # pipe, and the reader ends up blocked writing a batch into it.
                reader = engine.reader.pid
                assert reader is not None
                await wait_until(
                    lambda: feed_blocked(engine) and writing_a_full_pipe(reader),
                    "the pipe to fill",
                )
                await publish(REDIS_URL, during)
                await wait_until(lambda: received(engine) == len(before) + len(during))
                # The engine holds at most 26 batches of up to 1,000 events (its
                # writers' channel, the writer's batch, the one being fed), the reader
                # 5 more it normalized and one in the pipe: 32,000 events, 21,400
                # messages. The rest (18,600 messages at least) waits in the reader's
                # memory and, past its 1 MiB, in its spool.
                await wait_until(
                    lambda: metric(engine.metrics, "sluice_buffered_messages") >= 18_000
                )
                assert metric(engine.metrics, "sluice_spooled_bytes") > 0
            finally:
                lock.rollback()
                lock.close()
            # Once stored, the gauges come back to nothing.
            await wait_until(lambda: ingested(engine) == 60_000)
            await wait_until(lambda: metric(engine.metrics, "sluice_buffered_messages") == 0)
            assert metric(engine.metrics, "sluice_spooled_bytes") == 0


def feed_blocked(engine: Engine) -> bool:
    """Whether the engine waits for its writers to take a batch from the reader: until
    they do, it reads nothing more from the pipe."""
    return engine.pipeline._norm_send.statistics().tasks_waiting_send > 0


def writing_a_full_pipe(pid: int) -> bool:
    """Whether a thread of process ``pid`` is blocked writing into a full pipe (while
    nothing reads the pipe, it stays so)."""
    return any(
        "pipe_write" in Path(f"/proc/{pid}/task/{task}/wchan").read_text()
        for task in os.listdir(f"/proc/{pid}/task")
    )


def running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def child_processes(pid: int) -> list[int]:
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            children += Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return [int(child) for child in children]


async def healthy(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/healthz")).status_code == 200
    except httpx.TransportError:  # not listening yet
        return False


async def sluice_run(log: Path, env: dict[str, str], keyprefix: str) -> trio.Process:
    """``sluice run --plugin celery`` on the test's Redis channels, in a process of its
    own, its stderr written to ``log``."""
    stderr = os.open(log, os.O_WRONLY | os.O_CREAT)
    try:
        return await trio.lowlevel.open_process(
            [sys.executable, "-m", "sluice_core", "run", "--plugin", "celery",
             "--broker", REDIS_URL, "--redis-keyprefix", keyprefix],
            env=env,
            stderr=stderr,
        )
    finally:
        os.close(stderr)


async def test_sigterm_stops_the_reader_too_after_it_has_sent_what_it_read(
    tmp_path: Path, keyprefix: str
) -> None:
    port, db = free_port(), tmp_path / "run.db"
    env = {**os.environ, "SLUICE_DATABASE_URL": f"sqlite:///{db}", "SLUICE_PORT": str(port)}
    log = tmp_path / "stderr.log"
    proc = await sluice_run(log, env, keyprefix)
    messages = task_events(keyprefix, 200)
    try:
        with trio.fail_after(60):
            # The reader is started with the engine.
            children = await wait_until(lambda: child_processes(proc.pid), "the reader process")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                # Healthy once the reader's source is subscribed.
                await wait_until(lambda: healthy(client), "/healthz to answer 200")
                await publish(REDIS_URL, messages)

                # Signalled once the reader has read them: what Redis has not sent yet is
                # not Sluice's to flush.
                async def all_read() -> bool:
                    return await messages_read(client) >= len(messages)

                await wait_until(all_read)
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == 0, err
    assert "reader: stopping the sources, then sending what was read" in err
    assert not running(children[0])
    assert stored(db)[2] == 200

"""The reader process (``sluice run``'s default, sluice_core/reader.py): the sources and
normalizers in a child process, the engine folding and storing what it sends.

A real Redis, a real child process, real-format Celery events.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from sluice_core.config import Config
from sluice_core.engine import Engine
from sluice_core.plugins import PluginManager
from tests.fixtures.services import REDIS_URL, free_port, wait_port
from tests.test_agent import stored, task_events, wait_until
from tests.test_redis_source import publish


@asynccontextmanager
async def engine_with_reader(db: Path, keyprefix: str) -> AsyncIterator[Engine]:
    config = Config(
        broker=[REDIS_URL],
        db=f"sqlite:///{db}",
        plugin=["celery"],
        reader_process=True,
        redis_keyprefix=keyprefix,
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
    return engine.metrics.messages_received.labels(engine.sources[0].name)._value.get()


def messages_read(port: int) -> float:
    """``sluice_messages_received_total`` of a running ``sluice run``, every source summed."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
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
            await wait_until(lambda: stored(db)[2] == 300)
            # So do its counters (/metrics), ahead of what they count: every
            # message, each once, is counted by the time its events are stored.
            assert received(engine) == len(messages)
            assert engine.metrics.events_ingested._value.get() == 900
        # Stopped: the reader has exited, and been waited for.
        assert not Path(f"/proc/{reader_pid}").exists()
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


def test_sigterm_stops_the_reader_too_after_it_has_sent_what_it_read(
    tmp_path: Path, keyprefix: str
) -> None:
    port, db = free_port(), tmp_path / "run.db"
    env = {**os.environ, "SLUICE_DATABASE_URL": f"sqlite:///{db}", "SLUICE_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice_core", "run", "--plugin", "celery",
         "--broker", REDIS_URL, "--redis-keyprefix", keyprefix],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_port(port)
        deadline = time.monotonic() + 20
        children: list[int] = []
        while not children:  # the reader is started with the engine
            assert time.monotonic() < deadline, "no reader process"
            time.sleep(0.05)
            children = [
                int(pid)
                for task in os.listdir(f"/proc/{proc.pid}/task")
                for pid in Path(f"/proc/{proc.pid}/task/{task}/children").read_text().split()
            ]
        # Healthy once the reader's source is subscribed.
        while httpx.get(f"http://127.0.0.1:{port}/healthz").status_code != 200:
            assert time.monotonic() < deadline, "never healthy"
            time.sleep(0.05)
        messages = task_events(keyprefix, 200)
        trio.run(publish, REDIS_URL, messages)
        # Signalled once the reader has read them: what Redis has not sent yet is not
        # Sluice's to flush.
        deadline = time.monotonic() + 20
        while messages_read(port) < len(messages):
            assert time.monotonic() < deadline, "messages never read"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "reader: stopping the sources, then sending what was read" in err
    assert not Path(f"/proc/{children[0]}").exists()
    assert stored(db)[2] == 200

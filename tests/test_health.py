"""Health during outages: /healthz, the API and the start-up, with the database away,
its disk full, or its directory unwritable. Real SQLite on a real (tmpfs) disk, a real
PostgreSQL database of the test's own, a real engine serving HTTP.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
import trio

import sluice_core.health
from sluice_celery import plugin as celery_plugin
from sluice_celery.events import KIND_AMQP, normalize_batch
from sluice_core.health import (
    HEALTH_CHECK_S,
    HEALTH_TIMEOUT,
    UNSTORED_AGE_S,
    WRITES_FAILING_S,
    writes_health,
)
from sluice_core.model import JobState, RawBatch
from sluice_core.pipeline import WriteHealth
from sluice_core.storage import StorageUnavailable
from tests.fixtures.services import PG_URL, REDIS_URL
from tests.fixtures.storage import open_storage, pg_admin
from tests.metrics import metric
from tests.test_api import assert_error, job_event, serving
from tests.test_rabbitmq import fixture_events
from tests.waiting import wait_until

NOW = 1_700_000_000.0

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (needs root)")


# -- what the writes' state means ------------------------------------------------------


def test_writes_are_down_only_past_their_bounds() -> None:
    writes = WriteHealth()
    assert writes_health(writes, NOW)["up"] is True  # nothing written yet: nothing failed

    writes.succeeded(NOW - 30)
    writes.writing(NOW - 1)
    health = writes_health(writes, NOW)
    assert health["up"] is True and health["oldest_unstored_s"] == 1.0

    # A write that fails is retried: down only once writes have failed for a while.
    writes.failed(OSError("database or disk is full"), NOW - WRITES_FAILING_S + 1)
    assert writes_health(writes, NOW)["up"] is True
    health = writes_health(writes, NOW + 2)
    assert health["up"] is False and health["error"] == "OSError"
    assert health["detail"] == f"writes have failed for {WRITES_FAILING_S + 1:.0f}s"
    writes.succeeded(NOW + 3)
    assert writes_health(writes, NOW + 3)["up"] is True

    # Writes that neither fail nor finish: down once an event waits too long.
    writes.written(NOW - 1)
    writes.writing(NOW)
    assert writes_health(writes, NOW + UNSTORED_AGE_S)["up"] is True
    health = writes_health(writes, NOW + UNSTORED_AGE_S + 1)
    assert health["up"] is False
    assert health["detail"] == f"an event read {UNSTORED_AGE_S + 1:.0f}s ago is not stored yet"
    writes.written(NOW)
    assert writes_health(writes, NOW + UNSTORED_AGE_S + 1)["oldest_unstored_s"] is None


# -- SQLite: a full disk --------------------------------------------------------------


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs of its own mounted on ``path`` (``options``: e.g. ``size=2m`` or ``ro``)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(directory: Path) -> Path:
    """Write a file until the disk is full; delete it to make room again."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(bytes(64 * 1024))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@needs_root
async def test_healthz_is_503_while_writes_fail_on_a_full_disk_and_200_once_they_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bounds a test can wait for; what they mean is test_writes_are_down_only_past_their_bounds.
    monkeypatch.setattr(sluice_core.health, "WRITES_FAILING_S", 0.5)
    with tmpfs(tmp_path / "disk", "size=2m") as disk, trio.fail_after(60):
        async with serving(tmp_path, db=f"sqlite:///{disk}/sluice.db") as (engine, client):
            await engine.storage.create_api_key("sdk")  # something can send events
            assert (await client.get("/healthz")).status_code == 200
            filler = fill(disk)
            events = [job_event(f"j{i}", "task-sent", JobState.QUEUED, NOW + i) for i in range(50)]
            engine.pipeline.put_events(events, [])

            async def answer(status: int) -> httpx.Response | None:
                response = await client.get("/healthz")
                return response if response.status_code == status else None

            # The database still answers a ping: the writes are what fail.
            down = await wait_until(lambda: answer(503), "/healthz to answer 503")
            body = down.json()
            assert body["status"] == "down" and body["storage"]["up"] is True
            writes = body["writes"]
            assert writes["up"] is False and writes["failing_since"] is not None
            assert writes["detail"].endswith("s: the database refuses writes: disk full")
            assert writes["refused"] == "disk full"  # the message stays in the log
            assert writes["error"] == "WritesRefused"
            assert writes["oldest_unstored_s"] >= 0

            filler.unlink()
            up = await wait_until(lambda: answer(200), "/healthz to answer 200 again")
            writes = up.json()["writes"]
            assert writes["up"] is True and writes["failing_since"] is None
            assert writes["last_ok"] is not None and writes["oldest_unstored_s"] is None
            # All of them, once each: none was dropped nor taken for bad data.
            assert await engine.storage.count_jobs_by_state() == {"queued": 50}
            assert await engine.storage.list_dead_letters(10) == []
            assert metric(engine.metrics, "sluice_events_dropped_total", source="ingest") == 0


# -- PostgreSQL away ------------------------------------------------------------------


class FreezingProxy:
    """A TCP proxy on loopback to PostgreSQL that a test can freeze: it then forwards
    nothing more, either way, and accepts new connections without answering them. A
    server or a network that hangs: no error, no answer, the worst case for a client."""

    def __init__(self) -> None:
        target = urlsplit(PG_URL)
        self._target = (target.hostname or "localhost", target.port or 5432)
        self._thawed = trio.Event()
        self._thawed.set()
        self.port = 0

    def url(self, pg_url: str) -> str:
        """``pg_url`` (a database on the server) reached through the proxy."""
        parts = urlsplit(pg_url)
        user = f"{parts.username}@" if parts.username else ""
        return parts._replace(netloc=f"{user}127.0.0.1:{self.port}").geturl()

    def freeze(self) -> None:
        self._thawed = trio.Event()

    def thaw(self) -> None:
        self._thawed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._forward, listeners)

    async def _forward(self, client: trio.SocketStream) -> None:
        async with (
            client,
            await trio.open_tcp_stream(*self._target) as server,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
            nursery.start_soon(self._pump, server, client, nursery.cancel_scope)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some():
                await self._thawed.wait()
                await sink.send_all(data)
        except trio.BrokenResourceError:
            pass
        both.cancel()  # one side closed: close the other


@asynccontextmanager
async def engine_on_postgresql(
    tmp_path: Path, pg_url: str
) -> AsyncIterator[tuple[FreezingProxy, httpx.AsyncClient]]:
    """An engine on ``pg_url`` through a FreezingProxy, healthy (an API key lets the SDK
    send events: with no broker, that is what makes it so)."""
    async with trio.open_nursery() as nursery:
        proxy = FreezingProxy()
        await nursery.start(proxy.run)
        async with serving(tmp_path, db=proxy.url(pg_url)) as (engine, client):
            try:
                client.timeout = httpx.Timeout(30)
                await engine.storage.create_api_key("sdk")
                assert (await client.get("/healthz")).status_code == 200
                yield proxy, client
            finally:
                proxy.thaw()  # what hangs in a thread must end for the engine to stop
        nursery.cancel_scope.cancel()


async def timed_get(client: httpx.AsyncClient, path: str) -> tuple[httpx.Response, float]:
    started = trio.current_time()
    response = await client.get(path)
    return response, trio.current_time() - started


def refuse_connections(pg_url: str, refused: bool) -> None:
    """Have the server refuse (or take again) connections to ``pg_url``'s database, and
    end those it has: an outage of this database alone (even a superuser is refused)."""
    name = urlsplit(pg_url).path.lstrip("/")
    pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"false" if refused else "true"}')
    if refused:
        pg_admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")


async def test_healthz_and_the_api_answer_503_in_time_while_postgresql_refuses_connections(
    tmp_path: Path, pg_url: str
) -> None:
    with trio.fail_after(90):
        async with engine_on_postgresql(tmp_path, pg_url) as (_, client):
            refuse_connections(pg_url, True)
            try:
                response, took = await timed_get(client, "/healthz")
                assert response.status_code == 503
                assert took < HEALTH_TIMEOUT, f"/healthz answered in {took:.2f}s"
                storage = response.json()["storage"]
                assert storage["up"] is False and storage["detail"]

                response = await client.get("/api/jobs")
                assert_error(response, 503, "unavailable")
                assert response.headers["Retry-After"] == str(StorageUnavailable.retry_after)
            finally:
                refuse_connections(pg_url, False)

            async def healthy() -> bool:
                return (await client.get("/healthz")).status_code == 200

            await wait_until(healthy, "/healthz to answer 200 once PostgreSQL takes connections")
            assert (await client.get("/api/jobs")).status_code == 200


async def test_healthz_answers_in_time_while_postgresql_hangs(
    tmp_path: Path, pg_url: str
) -> None:
    with trio.fail_after(90):
        async with engine_on_postgresql(tmp_path, pg_url) as (proxy, client):
            proxy.freeze()
            # Twice: the first check's ping is still stuck in its thread during the second.
            for _ in range(2):
                response, took = await timed_get(client, "/healthz")
                assert response.status_code == 503
                assert took < HEALTH_TIMEOUT, f"/healthz answered in {took:.2f}s"
                assert response.json()["storage"]["detail"] == (
                    f"no answer within {HEALTH_CHECK_S:g}s"
                )


def read_only(pg_url: str, on: bool) -> None:
    """Make ``pg_url``'s database read-only (as for maintenance, or as a standby is), and
    end its sessions so that Sluice's come back read-only; or writable again for new
    sessions, ending none: Sluice's own, read-only since they began, are its to replace."""
    name = urlsplit(pg_url).path.lstrip("/")
    if on:
        pg_admin(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        pg_admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
    else:
        pg_admin(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')


def stored_events(pg_url: str) -> int:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT count(*) FROM job_events").fetchone()
    assert row is not None
    return int(row[0])


async def status_is(client: httpx.AsyncClient, status: int) -> httpx.Response | None:
    response = await client.get("/healthz")
    return response if response.status_code == status else None


async def test_a_read_only_postgresql_holds_the_events_says_why_and_stores_them_once_back(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sluice_core.health, "WRITES_FAILING_S", 0.5)
    sent = [job_event(f"j{i}", "task-sent", JobState.QUEUED, NOW + i) for i in range(70)]
    done = [job_event(f"j{i}", "task-succeeded", JobState.COMPLETED, NOW + 99) for i in range(20)]
    amqp_messages = fixture_events()
    amqp_events = len(normalize_batch(RawBatch(KIND_AMQP, "x", amqp_messages, 0.0)).job_events)
    settled_with: list[int] = []

    def on_settled() -> None:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute("SELECT count(*) FROM job_events WHERE job_id NOT LIKE 'j%'")
            settled_with.append(int(row.fetchone()[0]))  # type: ignore[index]
    with trio.fail_after(90):
        async with serving(tmp_path, celery_plugin, db=pg_url) as (engine, client):
            await engine.storage.create_api_key("sdk")  # something can send events
            engine.pipeline.put_events(sent[:20], [])
            await wait_until(lambda: stored_events(pg_url) == 20, "the first 20 events stored")
            read_only(pg_url, True)
            try:
                # Jobs stored before and jobs new: both wait for the database. And a batch
                # read from RabbitMQ: settled (acknowledged to the broker) only once stored.
                engine.pipeline.put_events(done + sent[20:], [])
                engine.pipeline.put_raw(
                    RawBatch(KIND_AMQP, "celery/amqp", amqp_messages, time.time(), on_settled)
                )
                down = await wait_until(lambda: status_is(client, 503), "/healthz to say 503")
                body = down.json()
                assert body["storage"]["up"] is True  # it answers reads: writes are refused
                writes = body["writes"]
                assert writes["refused"] == "read-only" and writes["up"] is False
                assert writes["detail"].endswith("s: the database refuses writes: read-only")
                assert writes["oldest_unstored_s"] >= 0  # held by a writer, retried
                assert stored_events(pg_url) == 20
                # A refusal is the database's, not the batch's: nothing dead-lettered.
                assert await engine.storage.list_dead_letters(10) == []
            finally:
                read_only(pg_url, False)

            # By itself: its sessions, read-only since they began, are replaced.
            await wait_until(lambda: stored_events(pg_url) == 90 + amqp_events, "all stored")
            await wait_until(lambda: settled_with, "the RabbitMQ batch settled")
            assert settled_with == [amqp_events]  # once, its events all stored by then
            up = await wait_until(lambda: status_is(client, 200), "/healthz to say 200 again")
            assert up.json()["writes"]["refused"] == ""
            with psycopg.connect(pg_url) as conn:
                ours = conn.execute(
                    "SELECT state, count(*) FROM jobs WHERE id LIKE 'j%' GROUP BY state"
                ).fetchall()
            assert dict(ours) == {"completed": 20, "queued": 50}
            assert metric(engine.metrics, "sluice_events_ingested_total") == 90 + amqp_events
            assert metric(engine.metrics, "sluice_events_dropped_total") == 0
            assert metric(engine.metrics, "sluice_events_dead_lettered_total") == 0


async def test_a_read_of_a_database_that_cannot_be_opened_is_storage_unavailable(
    tmp_path: Path,
) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/gone/sluice.db")  # never created
    with pytest.raises(StorageUnavailable):
        await storage.count_jobs_by_state()


# -- which sources count --------------------------------------------------------------


async def test_healthz_without_a_broker_needs_an_api_key_for_the_ingest_endpoint(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as (engine, client):
        response = await client.get("/healthz")
        assert response.status_code == 503
        ingest = response.json()["sources"]["ingest"]
        assert ingest["up"] is False
        assert "no broker" in ingest["detail"] and "sluice keys create" in ingest["detail"]

        await engine.storage.create_api_key("billing-app")
        response = await client.get("/healthz")
        assert response.status_code == 200
        ingest = response.json()["sources"]["ingest"]
        assert ingest["up"] is True and "ingest endpoint" in ingest["detail"]


# -- starting on a database that cannot be written ------------------------------------


def start(db: Path) -> subprocess.CompletedProcess[str]:
    """``sluice run`` on ``db``, as a user starts it, until it exits."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLUICE_")}
    return subprocess.run(
        [sys.executable, "-m", "sluice_core", "run", "--plugin", "celery", "--broker", REDIS_URL,
         "--db", f"sqlite:///{db}", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_root
def test_starting_on_a_read_only_file_system_is_one_line_saying_what_to_do(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        done = start(ro / "sluice.db")
    assert done.returncode == 2
    assert done.stderr == (
        f"sluice: error: cannot write the database at {ro}/sluice.db: read-only file system;"
        " give --db a writable path\n"
    )


def test_starting_where_the_database_directory_cannot_be_made_is_one_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_text("not a directory")
    done = start(tmp_path / "file" / "data" / "sluice.db")
    assert done.returncode == 2
    assert done.stderr == (
        f"sluice: error: cannot write the database at {tmp_path}/file/data/sluice.db:"
        " not a directory; give --db a writable path\n"
    )

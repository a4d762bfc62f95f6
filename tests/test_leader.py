"""Leadership (sluice_core/leader.py) on a real PostgreSQL: one leader, and a takeover."""

from __future__ import annotations

import functools
import signal
import subprocess
import sys

import psycopg
import trio

from sluice_core.config import Config
from sluice_core.engine import Engine
from sluice_core.leader import Leadership
from sluice_core.plugins import PluginManager
from sluice_storage.postgres import AdvisoryLock
from tests.metrics import metric
from tests.waiting import wait_until

POLL = 0.05


class CountingLock(AdvisoryLock):
    """The real lock, counting the times it was found taken by someone else."""

    refused = 0

    async def hold(self) -> bool:
        held = await super().hold()
        self.refused += not held
        return held


async def _duty(runs: list[str], name: str) -> None:
    runs.append(name)
    await trio.sleep_forever()


async def test_one_of_two_processes_leads_and_the_other_takes_over_when_it_goes(
    pg_url: str,
) -> None:
    changes: list[tuple[str, bool]] = []
    runs: list[str] = []
    locks = {name: CountingLock(pg_url, "duties") for name in ("a", "b")}
    pair = {
        name: Leadership(
            locks[name],
            name=name,
            poll_interval=POLL,
            on_change=lambda leading, name=name: changes.append((name, leading)),
        )
        for name in ("a", "b")
    }
    async with trio.open_nursery() as nursery:
        scope_a = trio.CancelScope()

        async def run_a() -> None:
            with scope_a:
                await pair["a"].run(lambda: _duty(runs, "a"))

        nursery.start_soon(run_a)
        await wait_until(lambda: runs == ["a"], "a leads")
        nursery.start_soon(pair["b"].run, lambda: _duty(runs, "b"))
        # b polls the lock while a holds it: many rounds, and it never leads.
        await wait_until(lambda: locks["b"].refused >= 5, "b tried the lock several times")
        assert runs == ["a"] and not pair["b"].leading

        scope_a.cancel()  # a stops: its session ends, and with it the lock
        await wait_until(lambda: runs == ["a", "b"], "b takes over")
        assert changes == [("a", True), ("a", False), ("b", True)]
        nursery.cancel_scope.cancel()


async def test_a_leader_cut_off_from_the_database_stops_its_duties(pg_url: str) -> None:
    runs: list[str] = []
    changes: list[bool] = []
    leadership = Leadership(
        AdvisoryLock(pg_url, "duties"), name="a", poll_interval=POLL, on_change=changes.append
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(leadership.run, lambda: _duty(runs, "a"))
        await wait_until(lambda: leadership.leading, "a leads")
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name LIKE 'sluice-leader/%' AND datname = current_database()"
            )
        # It notices at its next poll, stops, then leads again on a new session
        # (no one else wanted the lock): the duties ran twice.
        await wait_until(lambda: runs == ["a", "a"], "a's duties restart on a new session")
        assert changes == [True, False, True]
        nursery.cancel_scope.cancel()


async def test_a_killed_leaders_lock_is_free_at_once(pg_url: str) -> None:
    holder = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-c",
            "import sys, trio\n"
            "from sluice_storage.postgres import AdvisoryLock\n"
            "async def main():\n"
            "    lock = AdvisoryLock(sys.argv[1], 'duties')\n"
            "    assert await lock.hold()\n"
            "    print('held', flush=True)\n"
            "    await trio.sleep_forever()\n"
            "trio.run(main)\n",
            pg_url,
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        said = b""
        with trio.fail_after(30):
            while not said.endswith(b"\n"):
                said += await holder.stdout.receive_some()
        assert said == b"held\n"
        lock = AdvisoryLock(pg_url, "duties")
        assert not await lock.hold()
        holder.send_signal(signal.SIGKILL)
        await holder.wait()
        await wait_until(lock.hold, "the lock is free once its holder was killed")
        await lock.release()
    finally:
        holder.kill()
        await holder.wait()


async def test_without_a_lock_the_process_leads_for_as_long_as_it_runs() -> None:
    runs: list[str] = []
    leadership = Leadership(None, name="sqlite")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(leadership.run, lambda: _duty(runs, "only"))
        await wait_until(lambda: runs == ["only"], "the only process leads")
        assert leadership.leading
        nursery.cancel_scope.cancel()


async def test_of_two_engines_on_one_database_one_runs_the_duties(pg_url: str) -> None:
    """An HA pair: both ingest, one runs the worker monitor and probes; when it stops,
    the other takes over."""
    engines = []
    for _ in range(2):
        pm = PluginManager()
        config = Config(db=pg_url)
        pm.configure(config)
        engines.append(Engine(config, pm))
    first, second = engines
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(first.run, web=False))
            await wait_until(lambda: first.leadership.leading, "the first engine leads")
            await nursery.start(functools.partial(second.run, web=False))
            # Both asked the database; one session holds the lock.
            await wait_until(lambda: _leader_sessions(pg_url) == (2, 1), "both engines tried")
            assert metric(first.metrics, "sluice_leader") == 1
            assert metric(second.metrics, "sluice_leader") == 0
            assert not second.leadership.leading
            first.stop()
            await first.stopped.wait()
            await wait_until(lambda: second.leadership.leading, "the second engine takes over")
            assert metric(second.metrics, "sluice_leader") == 1
            second.stop()


def _leader_sessions(pg_url: str) -> tuple[int, int]:
    """Sessions of leader locks in this database, and advisory locks they hold (not
    those of Sluices on other databases of the same server)."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*), (SELECT count(*) FROM pg_locks l WHERE l.locktype = 'advisory'"
            "   AND l.granted AND l.pid IN (SELECT pid FROM pg_stat_activity"
            "   WHERE application_name LIKE 'sluice-leader/%' AND datname = current_database()))"
            " FROM pg_stat_activity"
            " WHERE application_name LIKE 'sluice-leader/%' AND datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])

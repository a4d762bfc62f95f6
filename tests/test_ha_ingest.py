"""An HA pair's ingest (sluice_core/pipeline.py): two engines on one PostgreSQL and a real
Redis event stream. The leader writes; the standby writes nothing while the leader lives,
and when the leader dies mid-stream it replays the last seconds it read: every event
published is stored exactly once."""

from __future__ import annotations

import functools

import psycopg
import trio

from bench.generator import Plan, publish
from bench.services import wait_subscribers
from sluice_core.config import Config
from sluice_core.engine import Engine
from sluice_core.pipeline import LEADER_MARK
from sluice_core.plugins import PluginManager
from tests.fixtures.services import AMQP_URL, REDIS_URL
from tests.metrics import metric
from tests.waiting import wait_until


def _engine(pg_url: str, keyprefix: str) -> Engine:
    # Sources in the engine's own process: cancelling it is then a death without a flush.
    # The generator's workers heartbeat in stream time: no worker may be concluded lost.
    config = Config(
        db=pg_url, broker=[REDIS_URL], plugin=["celery"], redis_keyprefix=keyprefix,
        reader_process=False, heartbeat_missed=1_000_000,
    )
    pm = PluginManager()
    pm.load(config.plugins)
    pm.configure(config)
    return Engine(config, pm)


def _stored(pg_url: str) -> tuple[int, int]:
    """Job event rows, and the distinct event ids among them."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT id) FROM job_events").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _written(engine: Engine) -> float:
    """Events this engine sent to storage: new ones and those already stored."""
    return metric(engine.metrics, "sluice_events_ingested_total") + metric(
        engine.metrics, "sluice_events_duplicate_total"
    )


async def _leader_marked(engine: Engine) -> bool:
    marks = await engine.storage.listening_marks()
    return any(name.endswith(LEADER_MARK) for name in marks)


async def test_the_standby_writes_nothing_then_replays_when_the_leader_dies_mid_stream(
    pg_url: str, keyprefix: str
) -> None:
    first_plan = Plan(broker=REDIS_URL, events=2_000, keyprefix=keyprefix, seed=1)
    # Paced over about 6 s: the leader dies in the middle of it.
    second_plan = Plan(broker=REDIS_URL, events=6_000, rate=1_000, keyprefix=keyprefix, seed=2)
    leader, standby = _engine(pg_url, keyprefix), _engine(pg_url, keyprefix)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            leader_scope = trio.CancelScope()

            async def run_leader(task_status: trio.TaskStatus[None]) -> None:
                with leader_scope:
                    await leader.run(web=False, task_status=task_status)

            await nursery.start(run_leader)
            await wait_until(lambda: leader.leadership.leading, "the first engine leads")
            await wait_until(functools.partial(_leader_marked, leader), "the leader marks")
            await nursery.start(functools.partial(standby.run, web=False))
            await trio.to_thread.run_sync(wait_subscribers, first_plan, 2)

            # While the leader lives, the standby only reads and keeps.
            published = (await trio.to_thread.run_sync(publish, first_plan)).stats.task_events
            await wait_until(lambda: _stored(pg_url)[0] == published, "the leader stores all")
            await wait_until(
                lambda: metric(standby.metrics, "sluice_standby_events") >= published,
                "the standby holds what it read",
            )
            assert _written(standby) == 0 and standby.pipeline.stored_batches == 0
            assert metric(standby.metrics, "sluice_writing_sources") == 0
            assert metric(leader.metrics, "sluice_writing_sources") == 1

            # The leader dies mid-stream, without flushing what it read.
            async def publish_second() -> None:
                nonlocal published
                report = await trio.to_thread.run_sync(publish, second_plan)
                published += report.stats.task_events

            async with trio.open_nursery() as publishing:
                publishing.start_soon(publish_second)
                await wait_until(
                    lambda: _stored(pg_url)[0] >= published + 1_000, "the leader stores some"
                )
                leader_scope.cancel()
            assert leader.stopped.is_set()

            await wait_until(lambda: standby.leadership.leading, "the standby takes over")
            await wait_until(lambda: _stored(pg_url)[0] >= published, "every event stored")
            assert _stored(pg_url) == (published, published)  # each once
            assert metric(standby.metrics, "sluice_standby_replayed_events_total") > 0
            assert metric(standby.metrics, "sluice_writing_sources") == 1
            standby.stop()


def test_agents_sharing_a_rabbitmq_queue_do_not_stand_by(pg_url: str) -> None:
    """Each event of a shared queue reaches one agent of the pair: that one must write it."""
    config = Config(db=pg_url, broker=[AMQP_URL], plugin=["celery", "rabbitmq"])
    pm = PluginManager()
    pm.load(config.plugins)
    pm.configure(config)
    assert metric(Engine(config, pm).metrics, "sluice_writing_sources") == 1
    assert metric(_engine(pg_url, "prefix:").metrics, "sluice_writing_sources") == 0

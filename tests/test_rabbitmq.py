"""The RabbitMQ transport against the real RabbitMQ: the event source's queue, outages
and clean-up, queue probes, control requests, publishing.

What a real worker's events become is proven on both brokers by the same tests
(tests/test_celery_worker.py); these cover what only RabbitMQ has. Each test
gets a vhost of its own (``rabbitmqctl add_vhost``), so the shared broker's
other users never see its events and it never sees theirs.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import amqp
import pytest
import trio

from sluice_celery.control import AmqpMailbox, NoListener
from sluice_core.cli import parse
from sluice_core.config import ConfigError
from sluice_core.model import JobState, RawBatch
from sluice_rabbitmq.connection import AmqpParams
from sluice_rabbitmq.probe import AmqpQueueProbe
from sluice_rabbitmq.publish import AmqpPublisher, PublishError
from sluice_rabbitmq.source import AmqpEventSource, DeliveryAcks, queue_name
from tests.fixtures.celery_worker import CeleryWorker, CollectingSink, rabbitmq_vhost
from tests.fixtures.services import FIXTURES
from tests.waiting import wait_until

TIMEOUT = 60  # absolute bound per test: a worker start on a busy machine takes seconds
BUFFER = 10_000


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout


@pytest.fixture
def amqp_url() -> Iterator[str]:
    with rabbitmq_vhost() as url:
        yield url


RABBITMQ = pytest.mark.parametrize("celery_worker", ["rabbitmq"], indirect=True)


def table(rows: list[list[object]]) -> dict[object, object]:
    """An AMQP table as rabbitmqctl's JSON gives it: [name, type, value] rows."""
    return {row[0]: row[-1] for row in rows}


def vhost_of(url: str) -> str:
    return AmqpParams.from_url(url).virtual_host


def queue_names(url: str) -> set[str]:
    out = rabbitmqctl("list_queues", "-p", vhost_of(url), "name", "--formatter", "json")
    return {q["name"] for q in json.loads(out)}


def queue_exists(url: str, queue: str) -> bool:
    return queue in queue_names(url)


def connection_pid(url: str, connection_name: str) -> str:
    """The broker-side id of the connection that named itself so (client properties)."""
    out = rabbitmqctl("list_connections", "--no-table-headers", "pid", "vhost", "client_properties")
    [pid] = [
        line.split("\t")[0]
        for line in out.splitlines()
        if line.split("\t")[1] == vhost_of(url)
        and f'{{"connection_name","{connection_name}"}}' in line
    ]
    return pid


def fixture_events() -> list[tuple[str, bytes]]:
    """Real captured ``celeryev`` messages: (routing key, raw JSON body)."""
    with (FIXTURES / "amqp-events.jsonl").open() as lines:
        records = [json.loads(line) for line in lines]
    return [(r["routing_key"], r["body"].encode()) for r in records if r["exchange"] == "celeryev"]


async def publish_events(publisher: AmqpPublisher, events: list[tuple[str, bytes]]) -> None:
    for routing_key, body in events:
        await publisher.publish(
            "celeryev",
            routing_key,
            body,
            {"hostname": "w2@testhost"},
            {"content_type": "application/json", "content_encoding": "utf-8", "delivery_mode": 1},
        )


async def start_source(
    url: str, nursery: trio.Nursery, **kwargs: Any
) -> tuple[AmqpEventSource, CollectingSink]:
    source = AmqpEventSource(url, buffer_messages=BUFFER, **kwargs)
    sink = CollectingSink()
    await nursery.start(source.run, sink)
    return source, sink


# -- the source's queue, outages, clean-up ------------------------------------------------


async def test_source_is_consuming_when_start_returns_and_hands_over_raw_bodies(
    amqp_url: str, nursery: trio.Nursery
) -> None:
    events = fixture_events()
    publisher = AmqpPublisher(amqp_url)
    with trio.fail_after(20):
        source, sink = await start_source(amqp_url, nursery)
        await publish_events(publisher, events)
        await sink.wait_for(lambda: len(sink.messages) == len(events))
    await publisher.aclose()

    assert sink.messages == events  # in order, bodies untouched
    assert source.name == "celery/amqp://guest:***@localhost:5672/" + amqp_url.rsplit("/", 1)[1]
    assert sink.statuses == [(source.name, True, "")]
    assert sink.malformed == 0
    assert any(e.type == "task-succeeded" for e in sink.job_events)


async def test_the_bounded_queue_keeps_the_events_of_a_restart(amqp_url: str) -> None:
    events = fixture_events()
    publisher = AmqpPublisher(amqp_url)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            source, _ = await start_source(amqp_url, nursery, queue_ttl=30)
            out = rabbitmqctl("list_queues", "-p", vhost_of(amqp_url), "name", "durable",
                              "arguments", "--formatter", "json")
            queue = next(q for q in json.loads(out) if q["name"] == source.queue)
            nursery.cancel_scope.cancel()
        # Sluice is stopped: what is published meanwhile waits in its queue...
        await publish_events(publisher, events)
        # ...and the next Sluice of the deployment (the same queue) reads all of it.
        async with trio.open_nursery() as nursery:
            _, sink = await start_source(amqp_url, nursery, queue_ttl=30, queue=source.queue)
            await sink.wait_for(lambda: len(sink.messages) == len(events))
            nursery.cancel_scope.cancel()
    await publisher.aclose()

    assert sink.messages == events
    assert queue["durable"] is False  # a broker restart removes it
    assert table(queue["arguments"]) == {
        "x-expires": 30_000, "x-message-ttl": 30_000, "x-max-length": BUFFER,
    }


def test_a_deployment_has_one_queue_and_another_deployment_its_own() -> None:
    ours = queue_name("postgresql://db/sluice", "", "300/1000000")
    assert ours == queue_name("postgresql://db/sluice", "", "300/1000000")  # an HA pair's
    assert ours != queue_name("sqlite:///laptop.db", "", "300/1000000")
    assert ours != queue_name("postgresql://db/sluice", "", "60/1000000")  # other bounds


async def test_reconnects_after_the_broker_drops_the_connection_and_misses_nothing(
    amqp_url: str, nursery: trio.Nursery
) -> None:
    events = fixture_events()
    publisher = AmqpPublisher(amqp_url)
    with trio.fail_after(30):
        source, sink = await start_source(amqp_url, nursery)
        await publish_events(publisher, events[:10])
        await sink.wait_for(lambda: len(sink.messages) == 10)
        before = list(sink.messages)

        pid = connection_pid(amqp_url, f"sluice {source.name}")
        rabbitmqctl("close_connection", pid, "sluice test: broker-side close")
        # Published while the source is down or reconnecting: the queue keeps them.
        await publish_events(publisher, events[10:])
        await sink.wait_for(lambda: len(sink.messages) == len(events))
    await publisher.aclose()

    assert sink.messages[:10] == before
    assert sink.messages == events
    [(_, first_up, _), (_, down, why), (_, up, detail)] = sink.statuses
    assert (first_up, down, up) == (True, False, True)
    assert "sluice test: broker-side close" in why
    assert "nothing missed" in detail


async def test_a_lost_queue_is_recreated_and_the_gap_reported(
    amqp_url: str, nursery: trio.Nursery
) -> None:
    with trio.fail_after(30):
        source, sink = await start_source(amqp_url, nursery)
        # As after a broker restart: the queue is gone (RabbitMQ cancels the consumer).
        conn = amqp.Connection("localhost:5672", virtual_host=vhost_of(amqp_url))
        conn.connect()
        conn.channel().queue_delete(source.queue)
        conn.close()
        await sink.wait_for(lambda: len(sink.statuses) == 3)
        assert queue_exists(amqp_url, source.queue)

    [(_, _, _), (_, down, _), (_, up, detail)] = sink.statuses
    assert (down, up) == (False, True)
    assert "were missed" in detail and "lost Sluice's queue" in detail


@pytest.mark.services  # the machine's RabbitMQ, on its plain port
async def test_amqps_speaks_tls_and_reports_a_broker_that_does_not(
    nursery: trio.Nursery,
) -> None:
    sink = CollectingSink()
    # The plain AMQP port: the TLS handshake fails; the source says so and keeps trying.
    source = AmqpEventSource("amqps://guest:guest@localhost:5672//?ssl_cert_reqs=none",
                             buffer_messages=BUFFER)
    nursery.start_soon(source.run, sink)
    with trio.fail_after(10):
        await sink.wait_for(lambda: len(sink.statuses) >= 2)

    assert all(up is False for _, up, _ in sink.statuses)
    assert source.name == "celery/amqps://guest:***@localhost:5672//?ssl_cert_reqs=none"


# -- probe --------------------------------------------------------------------------------


@RABBITMQ
async def test_probe_reports_depth_and_consumers_and_survives_a_missing_queue(
    celery_worker: CeleryWorker,
) -> None:
    url = celery_worker.broker_url
    waiting = f"waiting-{uuid.uuid4().hex[:8]}"
    conn = amqp.Connection("localhost:5672", virtual_host=vhost_of(url))
    conn.connect()
    conn.channel().queue_declare(waiting, auto_delete=False)
    conn.close()
    publisher = AmqpPublisher(url)
    probe = AmqpQueueProbe(url, interval=2)
    with trio.fail_after(20):
        for _ in range(3):
            await publisher.publish("", waiting, b"{}", mandatory=True)
        # "absent" sorts first: the probe must go on after its 404.
        samples = {s.name: s for s in await probe.probe({waiting, "absent"})}
        # The worker told the probe which queue it consumes: measured from then on,
        # though no job named it yet.
        again = {s.name: s for s in await probe.probe({waiting})}
    await publisher.aclose()
    await probe.aclose()

    assert set(samples) == {waiting, "absent"}
    assert (samples["absent"].depth, samples["absent"].consumers) == (None, None)
    assert (samples[waiting].depth, samples[waiting].consumers) == (3, 0)
    assert set(again) == {waiting, celery_worker.queue}
    assert again[waiting].depth == 3
    worker_queue = again[celery_worker.queue]
    assert (worker_queue.depth, worker_queue.consumers) == (0, 1)
    assert {(s.framework, s.broker) for s in [*samples.values(), *again.values()]} == {
        ("celery", AmqpParams.from_url(url).url)
    }
    assert probe.name == "rabbitmq/" + AmqpParams.from_url(url).url


# -- control requests ---------------------------------------------------------------------


@RABBITMQ
async def test_control_request_ends_when_the_named_workers_answered_and_leaves_no_queue(
    celery_worker: CeleryWorker,
) -> None:
    url = celery_worker.broker_url
    mailbox = AmqpMailbox(AmqpPublisher(url), url)
    with trio.fail_after(20):
        started = trio.current_time()
        named = await mailbox.request("ping", destination=[celery_worker.hostname], timeout=10)
        answered_in = trio.current_time() - started
        # To every worker: RabbitMQ does not say how many there are, so the deadline ends it.
        everyone = await mailbox.request("active_queues", timeout=0.5)
        # Listed while the connection is open (an exclusive queue goes with it anyway).
        reply_queues = [q for q in queue_names(url) if q.endswith(".reply.celery.pidbox")]
    await mailbox.publisher.aclose()

    assert named == {celery_worker.hostname: {"ok": "pong"}}
    assert answered_in < 5  # not the 10 s deadline
    [queue] = everyone[celery_worker.hostname]
    assert queue["name"] == celery_worker.queue
    assert reply_queues == []


async def test_control_request_with_no_worker_listening_raises_no_listener(amqp_url: str) -> None:
    mailbox = AmqpMailbox(AmqpPublisher(amqp_url), amqp_url)
    with trio.fail_after(20):
        # No worker ever declared the mailbox exchange (RabbitMQ: 404)...
        with pytest.raises(NoListener, match="reached no worker"):
            await mailbox.request("active_queues")
        # ...or one did and is gone (the message is returned: no queue is bound).
        conn = amqp.Connection("localhost:5672", virtual_host=vhost_of(amqp_url))
        conn.connect()
        conn.channel().exchange_declare("celery.pidbox", "fanout", durable=False,
                                        auto_delete=False)
        conn.close()
        with pytest.raises(NoListener, match="no queue receives"):
            await mailbox.request("active_queues")
        reply_queues = [q for q in queue_names(amqp_url) if q.endswith(".reply.celery.pidbox")]
    await mailbox.publisher.aclose()

    assert reply_queues == []


# -- publishing ---------------------------------------------------------------------------


@RABBITMQ
async def test_republished_task_message_runs_on_a_real_worker(
    celery_worker: CeleryWorker, nursery: trio.Nursery
) -> None:
    """A protocol-2 task message built without Celery (docs/celery-protocol.md section 6)."""
    worker = celery_worker
    job_id = str(uuid.uuid4())
    headers = {
        "lang": "py", "task": "tests.add", "id": job_id, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": job_id, "parent_id": None,
        "argsrepr": "(20, 22)", "kwargsrepr": "{}", "origin": "sluice",
        "ignore_result": True,
    }
    body = json.dumps(
        [[20, 22], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    ).encode()
    properties = {
        "content_type": "application/json", "content_encoding": "utf-8",
        "correlation_id": job_id, "delivery_mode": 2, "priority": 0,
    }
    publisher = AmqpPublisher(worker.broker_url)
    with trio.fail_after(TIMEOUT):
        _, sink = await start_source(worker.broker_url, nursery)
        await publisher.publish("", worker.queue, body, headers, properties, mandatory=True)
        await sink.wait_for(
            lambda: any(e.job_id == job_id and e.state is JobState.COMPLETED
                        for e in sink.job_events)
        )
        with pytest.raises(PublishError, match="no queue receives"):
            await publisher.publish("", "no-such-queue", body, headers, properties,
                                    mandatory=True)
        with pytest.raises(PublishError, match="no-such-exchange"):
            await publisher.publish("no-such-exchange", "", body)
        # The publisher is still usable after both refusals.
        await publisher.publish("", worker.queue, body, {**headers, "id": "again"},
                                {**properties, "correlation_id": "again"}, mandatory=True)
    await publisher.aclose()

    completed = next(e for e in sink.job_events
                     if e.job_id == job_id and e.state is JobState.COMPLETED)
    assert completed.fields["result"] == "42"


# -- plugin and configuration ---------------------------------------------------------------


def test_plugin_registers_a_source_and_a_probe_per_amqp_broker() -> None:
    brokers = [
        "redis://localhost:6379/0",  # the celery plugin's
        "amqp://u:secret@rabbit:5672/prod",
        "amqps://rabbit.example//",
    ]
    argv = ["run", "--plugin", "celery", "--rabbitmq-probe-interval", "2.5"]
    _, config, pm = parse(argv + [f"--broker={url}" for url in brokers], {})
    # The celery plugin loads its RabbitMQ transport.
    assert any(name.startswith("rabbitmq ") for name, _ in pm.describe())
    sources = [source for source in pm.sources(config) if "amqp" in source.name]
    probes = [probe for probe in pm.probes(config) if "amqp" in probe.name]

    assert [s.name for s in sources] == [
        "celery/amqp://u:***@rabbit:5672/prod", "celery/amqps://rabbit.example//",
    ]
    assert [p.name for p in probes] == [
        "rabbitmq/amqp://u:***@rabbit:5672/prod", "rabbitmq/amqps://rabbit.example//",
    ]
    assert [p.interval for p in probes] == [2.5, 2.5]
    assert "secret" not in repr(AmqpParams.from_url(config.brokers[1]))


@pytest.mark.parametrize(
    ("option", "value"), [("--rabbitmq-probe-interval", "0"), ("--rabbitmq-queue-ttl", "-1")]
)
def test_bad_options_are_configuration_errors(option: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{option}: expected seconds above 0, got '{value}'"):
        parse(["run", "--plugin", "celery", option, value], {})


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "amqp://h:notaport//", "amqps://h//?ssl_cert_reqs=maybe"]
)
def test_bad_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        AmqpParams.from_url(url)


class HoldingSink(CollectingSink):
    """Keeps batches without settling them: as a pipeline whose database refuses writes."""

    def put_raw(self, batch: RawBatch) -> None:
        self.batches.append(batch)
        self._notify()


def queue_counts(url: str, queue: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of ``queue``."""
    out = rabbitmqctl("list_queues", "-p", vhost_of(url), "name", "messages_ready",
                      "messages_unacknowledged", "--formatter", "json")
    q = next(q for q in json.loads(out) if q["name"] == queue)
    return q["messages_ready"], q["messages_unacknowledged"]


async def wait_counts(url: str, queue: str, expected: tuple[int, int]) -> None:
    async def counts() -> bool:
        return await trio.to_thread.run_sync(queue_counts, url, queue) == expected

    await wait_until(counts, f"{queue}: {expected[0]} ready, {expected[1]} unacknowledged",
                     poll=0.2)


def test_batches_are_acknowledged_in_order_whatever_order_they_settle_in() -> None:
    acks = DeliveryAcks()
    settled = []
    for last in (3, 7, 9):  # three batches: tags 1-3, 4-7, 8-9
        acks.last_delivered = last
        settled.append(acks.handed_over())
    assert acks.ready() is None
    settled[1]()  # a later batch stored first: the first is not, nothing acknowledged
    assert acks.ready() is None
    settled[0]()
    assert acks.ready() == 7  # both, with multiple
    assert acks.ready() is None
    settled[2]()
    assert acks.ready() == 9


async def test_a_message_is_acknowledged_once_settled_and_delivered_again_if_not(
    amqp_url: str,
) -> None:
    """Issue 20: nothing the broker handed over is lost when Sluice stops before storing it."""
    events = fixture_events()
    publisher = AmqpPublisher(amqp_url)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            source = AmqpEventSource(amqp_url, buffer_messages=BUFFER, queue_ttl=30)
            held = HoldingSink()
            await nursery.start(source.run, held)
            await publish_events(publisher, events)
            await held.wait_for(lambda: len(held.messages) == len(events))
            # Handed over, none settled: all out, unacknowledged.
            await wait_counts(amqp_url, source.queue, (0, len(events)))
            # Two batches stored (the second first: writers finish out of order).
            assert len(held.batches) >= 3
            first, second = held.batches[0], held.batches[1]
            assert first.settled is not None and second.settled is not None
            second.settled()
            first.settled()
            done = len(first.messages) + len(second.messages)
            await wait_counts(amqp_url, source.queue, (0, len(events) - done))
            nursery.cancel_scope.cancel()
        # Stopped (or died) before the rest was stored: the broker has it again...
        await wait_counts(amqp_url, source.queue, (len(events) - done, 0))
        # ...and the next Sluice of the deployment gets exactly that.
        async with trio.open_nursery() as nursery:
            _, sink = await start_source(amqp_url, nursery, queue_ttl=30, queue=source.queue)
            await sink.wait_for(lambda: len(sink.messages) == len(events) - done)
            await wait_counts(amqp_url, source.queue, (0, 0))
            nursery.cancel_scope.cancel()
    await publisher.aclose()
    assert sink.messages == events[done:]

"""The Redis event source against a real Redis: subscription, isolation, bursts, outages."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import trio

from sluice_celery.events import KIND_REDIS
from sluice_celery.plugin import REDIS_KEYPREFIX
from sluice_celery.redis_source import RedisEventSource
from sluice_core.cli import parse
from sluice_core.config import ConfigError
from tests.fixtures.celery_worker import CollectingSink
from tests.fixtures.services import FIXTURES, REDIS_URL, PrivateRedis, free_port, wait_port


async def publish(url: str, messages: list[tuple[str, bytes]]) -> list[int]:
    """PUBLISH each message, pipelined, from a thread (redis-py blocks); the receiver counts."""

    def run() -> list[int]:
        with redis.Redis.from_url(url) as client:
            counts: list[int] = []
            for start in range(0, len(messages), 5000):
                pipe = client.pipeline(transaction=False)
                for channel, data in messages[start : start + 5000]:
                    pipe.publish(channel, data)
                counts += pipe.execute()
            return counts

    return await trio.to_thread.run_sync(run)


def fixture_envelopes(keyprefix: str) -> list[tuple[str, bytes]]:
    with (FIXTURES / "redis-events.jsonl").open() as lines:
        records = [json.loads(line) for line in lines]
    return [(keyprefix + r["channel"], json.dumps(r["envelope"]).encode()) for r in records]


async def test_source_is_subscribed_when_start_returns(
    keyprefix: str, nursery: trio.Nursery
) -> None:
    sink = CollectingSink()
    source = RedisEventSource(REDIS_URL, keyprefix=keyprefix)
    with trio.fail_after(10):
        await nursery.start(source.run, sink)
        channel = f"{keyprefix}/0.celeryev/worker.heartbeat"
        assert await publish(REDIS_URL, [(channel, b"first")]) == [1]
        await sink.wait_for(lambda: bool(sink.batches))

    assert sink.messages == [(channel, b"first")]
    batch = sink.batches[0]
    assert (batch.kind, batch.source) == (KIND_REDIS, "celery/redis://localhost:6379/0")
    assert sink.statuses == [(source.name, True, "")]


async def test_fixture_envelopes_arrive_intact_and_in_order(
    keyprefix: str, nursery: trio.Nursery
) -> None:
    sink = CollectingSink()
    expected = fixture_envelopes(keyprefix)
    with trio.fail_after(10):
        await nursery.start(RedisEventSource(REDIS_URL, keyprefix=keyprefix).run, sink)
        await publish(REDIS_URL, expected)
        await sink.wait_for(lambda: len(sink.messages) >= len(expected))

    assert sink.messages == expected
    assert sink.malformed == 0
    # Every event of the capture, each of a task.multi list included.
    with (FIXTURES / "redis-events.jsonl").open() as lines:
        payloads = [json.loads(line)["event"] for line in lines]
    events = sum(len(p) if isinstance(p, list) else 1 for p in payloads)
    assert events > len(expected)  # some task.multi messages carry several
    assert len(sink.job_events) + len(sink.worker_events) == events


async def test_only_its_own_db_and_keyprefix_are_read(
    keyprefix: str, nursery: trio.Nursery
) -> None:
    sink = CollectingSink()
    other_prefix = f"o{uuid.uuid4().hex[:10]}:"
    db3 = REDIS_URL.rsplit("/", 1)[0] + "/3"
    with trio.fail_after(10):
        await nursery.start(RedisEventSource(db3, keyprefix=keyprefix).run, sink)
        # Pub/sub channels are global across databases: the db is part of the name.
        await publish(
            REDIS_URL,
            [
                (f"{keyprefix}/0.celeryev/task.sent", b"db 0"),
                (f"{other_prefix}/3.celeryev/task.sent", b"other prefix"),
                (f"{keyprefix}/3.celery.pidbox", b"not an event channel"),
                (f"{keyprefix}/3.celeryev/task.sent", b"ours"),
            ],
        )
        # Redis delivers a connection's publishes in order: once "ours" is in,
        # anything else would have been too.
        await sink.wait_for(lambda: bool(sink.messages))
    assert sink.messages == [(f"{keyprefix}/3.celeryev/task.sent", b"ours")]


async def test_a_burst_is_received_in_full(keyprefix: str, nursery: trio.Nursery) -> None:
    sink = CollectingSink()
    channel, envelope = next(
        (c, e) for c, e in fixture_envelopes(keyprefix) if c.endswith("worker.heartbeat")
    )
    # 50,000 real-sized envelopes (~40 MB): more than Redis's 32 MB pub/sub output
    # buffer limit, so a reader that stalled would be disconnected and lose them.
    count = 50_000
    burst = [(channel, b"%06d" % i + envelope) for i in range(count)]
    with trio.fail_after(60):
        await nursery.start(RedisEventSource(REDIS_URL, keyprefix=keyprefix).run, sink)
        assert set(await publish(REDIS_URL, burst)) == {1}
        await sink.wait_for(lambda: sum(len(b.messages) for b in sink.batches) >= count)

    assert [int(data[:6]) for _, data in sink.messages] == list(range(count))
    assert sink.statuses == [(sink.statuses[0][0], True, "")]  # never disconnected
    assert len(sink.batches) < count / 10  # handed over in batches, not one by one


async def test_source_reconnects_when_redis_restarts(
    private_redis: PrivateRedis, nursery: trio.Nursery
) -> None:
    sink = CollectingSink()
    channel = "/0.celeryev/task.sent"
    with trio.fail_after(30):
        await nursery.start(RedisEventSource(private_redis.url).run, sink)
        await trio.to_thread.run_sync(private_redis.stop)
        await sink.wait_for(lambda: sink.up is False)
        await trio.to_thread.run_sync(private_redis.start)
        await sink.wait_for(lambda: sink.up is True)
        await publish(private_redis.url, [(channel, b"after restart")])
        await sink.wait_for(lambda: bool(sink.messages))

    assert sink.messages == [(channel, b"after restart")]
    ups = [up for _, up, _ in sink.statuses]
    assert ups[0] is True and ups[-1] is True and False in ups
    assert all(detail for _, up, detail in sink.statuses if not up)  # down says why


async def test_source_is_back_within_a_fraction_of_a_second_of_redis_after_a_long_outage(
    private_redis: PrivateRedis, nursery: trio.Nursery
) -> None:
    """Pub/sub keeps nothing for an absent subscriber: what is published before the
    source subscribes again is lost. So however long Redis was away (here long enough
    for an exponential backoff to reach seconds), the source must be reading again
    within a fraction of a second of Redis listening."""
    sink = CollectingSink()
    channel = "/0.celeryev/worker.heartbeat"
    with trio.fail_after(30):
        await nursery.start(RedisEventSource(private_redis.url).run, sink)
        await trio.to_thread.run_sync(private_redis.stop)
        # Seven failed attempts: a backoff doubling from 0.1 s would now wait 5 s.
        await sink.wait_for(lambda: sum(not up for _, up, _ in sink.statuses) >= 7)
        await trio.to_thread.run_sync(private_redis.start)
        back = trio.current_time()
        # A heartbeat every 20 ms, as a busy deployment publishes; PUBLISH answers how
        # many subscribers received it: the first one our source receives ends it.
        sent = 0
        while await publish(private_redis.url, [(channel, b"%d" % sent)]) != [1]:
            sent += 1
            await trio.sleep(0.02)
        subscribed_after = trio.current_time() - back
        await sink.wait_for(lambda: bool(sink.messages))

    assert subscribed_after < 1.0, f"read again {subscribed_after:.2f}s after Redis was back"
    assert sink.messages == [(channel, b"%d" % sent)]


async def test_source_authenticates_with_the_url_credentials(
    private_redis: PrivateRedis, nursery: trio.Nursery
) -> None:
    port = private_redis.port
    with redis.Redis(port=port) as admin:
        admin.acl_setuser("sluice", enabled=True, passwords=["+s3cret"], keys=["*"],
                          channels=["*"], commands=["+@all"])
        admin.config_set("requirepass", "default-pw")
    good_user = CollectingSink()
    good_default = CollectingSink()
    bad = CollectingSink()
    wrong_url = f"redis://sluice:wrong@127.0.0.1:{port}/0"
    wrong = RedisEventSource(wrong_url)
    with trio.fail_after(10):
        await nursery.start(RedisEventSource(f"redis://sluice:s3cret@127.0.0.1:{port}/0").run,
                            good_user)
        await nursery.start(RedisEventSource(f"redis://:default-pw@127.0.0.1:{port}/0").run,
                            good_default)
        # A refused login never becomes ready: it reports why and keeps retrying.
        nursery.start_soon(wrong.run, bad)
        await bad.wait_for(lambda: bad.up is False)

    assert wrong.name == f"celery/redis://sluice:***@127.0.0.1:{port}/0"
    assert "s3cret" not in wrong.name
    assert "WRONGPASS" in bad.statuses[-1][2]
    assert good_user.up and good_default.up


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A private redis-server speaking TLS only, with a self-signed certificate for
    localhost; yields its port and the certificate (the CA to trust)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    port = free_port()
    server = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", "0", "--tls-port", str(port),
         "--bind", "127.0.0.1", "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield port, cert
    finally:
        server.terminate()
        server.wait(10)


async def test_rediss_urls_speak_tls_and_verify_the_server(
    tls_redis: tuple[int, Path], nursery: trio.Nursery
) -> None:
    port, ca = tls_redis
    url = f"rediss://localhost:{port}/0?ssl_ca_certs={ca}"
    sink = CollectingSink()
    untrusted = CollectingSink()
    channel = "/0.celeryev/task.sent"
    with trio.fail_after(10):
        await nursery.start(RedisEventSource(url).run, sink)
        # Without the CA the self-signed certificate is refused.
        nursery.start_soon(RedisEventSource(f"rediss://localhost:{port}/0").run, untrusted)
        await publish(url, [(channel, b"over tls")])
        await sink.wait_for(lambda: bool(sink.messages))
        await untrusted.wait_for(lambda: untrusted.up is False)
    assert sink.messages == [(channel, b"over tls")]
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.statuses[-1][2]


@pytest.mark.parametrize(
    "url",
    ["amqp://localhost//", "redis://localhost:6379/zero", "rediss://h/0?ssl_cert_reqs=maybe"],
)
def test_bad_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        RedisEventSource(url)


def test_plugin_registers_one_source_per_redis_broker_with_the_keyprefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    brokers = [
        "redis://localhost:6379/0",
        "amqp://guest:guest@localhost:5672//",  # the rabbitmq plugin's
        "rediss://:pw@cache.example:6380/2",
    ]
    # The entry point, as `sluice run --plugin celery` loads it.
    argv = ["run", "--plugin", "celery", *(f"--broker={url}" for url in brokers)]
    _, config, pm = parse(argv, {"SLUICE_REDIS_KEYPREFIX": "app1:"})
    found = [source for source in pm.sources(config) if "redis" in source.name]

    assert [s.name for s in found] == [
        "celery/redis://localhost:6379/0",
        "celery/rediss://:***@cache.example:6380/2",
    ]
    assert [s.pattern for s in found if isinstance(s, RedisEventSource)] == [
        "app1:/0.celeryev/*",
        "app1:/2.celeryev/*",
    ]
    # The flag wins over the environment.
    _, flagged, _ = parse(
        [*argv, "--redis-keyprefix", "flag:"], {"SLUICE_REDIS_KEYPREFIX": "app1:"}
    )
    assert flagged.get(REDIS_KEYPREFIX) == "flag:"

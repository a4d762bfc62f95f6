"""Queue depth probe cost on Redis: 10,000 queues, every priority list, one poll.

Runnable on its own: ``python -m bench.probe_depth [--queues N] [--redis URL]``.
It declares N queues under a private key prefix (a binding each, a message in
some priority lists), then times the probe: the first poll (which also SCANs
for bindings) and steady polls (four LLENs per queue plus the unacked hash, in
one round trip). It removes its keys when done.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import redis
import trio

from sluice_celery.redis_probe import BINDING_PREFIX, PRIORITY_SUFFIXES, SEP, RedisQueueProbe

POLLS = 10


def populate(client: redis.Redis, prefix: str, queues: int) -> None:
    with client.pipeline(transaction=False) as pipe:
        for i in range(queues):
            name = f"bench-{i}"
            pipe.sadd(f"{prefix}{BINDING_PREFIX}{name}", f"{name}{SEP}{SEP}{name}")
            # Every tenth queue has work waiting at every priority.
            if i % 10 == 0:
                for suffix in PRIORITY_SUFFIXES:
                    pipe.lpush(f"{prefix}{name}{suffix}", b"{}")
        pipe.execute()


def cleanup(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=prefix + "*", count=10_000))
    for start in range(0, len(keys), 10_000):
        client.delete(*keys[start : start + 10_000])


async def measure(url: str, prefix: str, queues: int) -> None:
    probe = RedisQueueProbe(url, keyprefix=prefix)
    try:
        started = time.perf_counter()
        samples = await probe.probe(set())
        first = time.perf_counter() - started
        assert len(samples) == queues, f"found {len(samples)} queues, expected {queues}"
        assert sum(s.depth or 0 for s in samples) == len(PRIORITY_SUFFIXES) * (queues // 10)
        steady = []
        for _ in range(POLLS):
            started = time.perf_counter()
            await probe.probe(set())
            steady.append(time.perf_counter() - started)
    finally:
        await probe.aclose()
    print(f"queues probed:                {queues:,}")
    print(f"first poll (SCAN + LLENs):    {first * 1000:.0f} ms")
    print(f"steady poll, median of {POLLS}:   {statistics.median(steady) * 1000:.0f} ms")
    print(f"steady poll, worst:           {max(steady) * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queues", type=int, default=10_000)
    parser.add_argument("--redis", default="redis://localhost:6379/0")
    args = parser.parse_args()
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(args.redis)
    try:
        populate(client, prefix, args.queues)
        trio.run(measure, args.redis, prefix, args.queues)
    finally:
        cleanup(client, prefix)
        client.close()


if __name__ == "__main__":
    main()

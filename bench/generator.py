"""Celery event traffic as real producers and workers publish it, at a rate or flat out.

The shapes follow docs/celery-protocol.md sections 1-3 and the captures in
``tests/fixtures/celery-5.7/redis-events.jsonl``, field for field and in the
same key order (Celery serializes with the standard ``json`` module):

- ``task-sent`` comes alone (routing key ``task.sent``) from ``gen<pid>@<host>``
  producers; a retry's ``task-sent`` comes from the worker's pool child.
- A worker's task events come in ``task.multi`` batches of up to 24, flushed
  when full and at the end of each loop tick, one tick after the job was sent.
- About 10% of jobs fail with a traceback and 3% are retried once; one in 20
  is started by another job (``parent_id``), one in 50 has an ETA, one in 97
  an expiry.
- Each worker sends a heartbeat every 2 s (of the stream's own clock).

On Redis a message is a kombu envelope (base64 body) PUBLISHed to
``{keyprefix}/{db}.celeryev/<routing_key>``; on RabbitMQ it is the raw JSON body
published to the ``celeryev`` topic exchange.

Run on its own (``python -m bench.generator --help``) it publishes a stream to
a broker; the benchmarks call :func:`publish`, which runs the publishers as
child processes of this same command.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

HEARTBEAT_FREQ = 2.0
MULTI_MAX = 24  # Celery's event buffer size per task.multi message
TICK_S = 0.01  # a worker's event loop tick, and the rate limiter's step
FAILURE_RATE = 0.10
RETRY_RATE = 0.03
EVENTS_PER_JOB = 4 * (1 - RETRY_RATE) + 8 * RETRY_RATE  # for sizing streams by event count

TASKS: Sequence[tuple[str, str]] = (
    # (task name, queue)
    ("shop.orders.process_order", "orders"),
    ("shop.orders.send_confirmation", "mail"),
    ("mail.send_email", "mail"),
    ("billing.charge_card", "billing"),
    ("billing.refund", "billing"),
    ("reports.render_pdf", "reports"),
    ("images.resize", "media"),
    ("images.thumbnail", "media"),
    ("search.reindex_document", "celery"),
    ("tasks.add", "celery"),
    ("sync.pull_inventory", "sync"),
    ("notifications.push", "celery"),
)
EXCEPTIONS: Sequence[tuple[str, str]] = (
    # (exception repr, last traceback line)
    ("ValueError('invalid amount: -{n}')", "ValueError: invalid amount: -{n}"),
    ("KeyError('sku-{n}')", "KeyError: 'sku-{n}'"),
    (
        "TimeoutError('upstream timed out after 30s')",
        "TimeoutError: upstream timed out after 30s",
    ),
    (
        "ConnectionError('connection refused: payments-api:443')",
        "ConnectionError: connection refused: payments-api:443",
    ),
)
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/srv/app/.venv/lib/python3.12/site-packages/celery/app/trace.py", line 564, '
    "in trace_task\n"
    "    R = retval = fun(*args, **kwargs)\n"
    "                 ^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/srv/app/.venv/lib/python3.12/site-packages/celery/app/trace.py", line 883, '
    "in __protected_call__\n"
    "    return self.run(*args, **kwargs)\n"
    "           ^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/srv/app/{module}.py", line {line}, in {func}\n'
    "    raise {exc}\n"
    "{last}\n"
)
RETRY_TRACEBACK_TAIL = "celery.exceptions.Retry: Retry in 5s: {exc}"


@attrs.define
class Message:
    """One broker message: a single event (``task.sent``, heartbeats) or a ``task.multi`` list."""

    routing_key: str
    sender: str
    body: dict[str, Any] | list[dict[str, Any]]

    @property
    def task_events(self) -> int:
        if isinstance(self.body, list):
            return len(self.body)
        return 1 if self.body["type"].startswith("task-") else 0


@attrs.frozen
class _Call:
    """What a producer asked for: the same in every event of the job that repeats it."""

    id: str
    name: str
    queue: str
    args: str  # repr strings, as Celery's saferepr makes them
    kwargs: str
    eta: str | None
    expires: str | None
    parent_id: str | None
    root_id: str


def _iso(epoch: float) -> str:
    """An ETA or expiry as Celery writes it: ISO-8601 with the UTC offset."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat()


@attrs.define
class _Process:
    """A Celery process that stamps events: its hostname, pid and Lamport clock."""

    hostname: str
    pid: int
    clock: int = 0

    def header(self) -> dict[str, Any]:
        self.clock += 1
        return {"hostname": self.hostname, "utcoffset": 0.0, "pid": self.pid, "clock": self.clock}


@attrs.define
class _Worker:
    process: _Process
    child: _Process  # a pool child: publishes the task-sent of a retry as gen<pid>@host
    processed: int = 0
    next_heartbeat: float = 0.0
    buffer: list[dict[str, Any]] = attrs.field(factory=list)


@attrs.define
class StreamStats:
    jobs: int = 0
    task_events: int = 0
    worker_events: int = 0
    messages: int = 0
    bytes: int = 0

    def add(self, other: StreamStats) -> None:
        for field in attrs.fields(StreamStats):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class EventStream:
    """The events of a fleet of producers and workers, tick by tick.

    Events are stamped by a simulated clock advancing ``tick_s`` per
    :meth:`tick` from ``start``, so a pre-built stream carries the timestamps
    it would have had at its nominal rate. With ``live=True`` the stream stamps
    with the wall clock and embeds the moment each message is built (which is
    when it is published) in the job: ``args`` of ``task-sent`` is
    ``(<epoch>,)`` and ``result`` of ``task-succeeded`` is ``<epoch>`` (the
    task's return value), for latency measurements.
    """

    def __init__(
        self,
        *,
        seed: int,
        workers: int = 4,
        producers: int = 8,
        host_tag: str = "",
        live: bool = False,
        start: float | None = None,
        tick_s: float = TICK_S,
    ) -> None:
        self._rng = random.Random(seed)
        self._live = live
        self._tick_s = tick_s
        self._now = time.time() if start is None else start
        tag = host_tag or f"{seed % 1000:03d}"
        self._producers = [
            _Process(f"gen{self._pid()}@web-{tag}-{i}", self._pid()) for i in range(producers)
        ]
        self._workers = []
        for i in range(workers):
            child = self._pid()
            self._workers.append(
                _Worker(
                    _Process(f"celery@worker-{tag}-{i}", self._pid()),
                    _Process(f"gen{child}@worker-{tag}-{i}", child),
                )
            )
        self._pending: list[tuple[_Worker, list[dict[str, Any]]]] = []
        self._job_no = 0
        self._last_call: _Call | None = None

    def _pid(self) -> int:
        return self._rng.randrange(1000, 4_000_000)

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def now(self) -> float:
        return time.time() if self._live else self._now

    def online(self) -> list[Message]:
        """Every worker says ``worker-online`` (a worker's first event)."""
        return [self._worker_event(w, "worker-online") for w in self._workers]

    def tick(self, new_jobs: int) -> list[Message]:
        """One loop tick: ``new_jobs`` jobs are sent; the workers run last tick's jobs."""
        now = self.now()
        out: list[Message] = []
        for worker, events in self._pending:
            for step, event in enumerate(events):
                # A job's events a little apart, in the order the worker ran them.
                event["timestamp"] = now + step * 0.0002
                if self._live and event["type"] == "task-succeeded":
                    event["result"] = repr(now)  # as if the task returned the float
                if event["type"] == "task-sent":
                    # A retry, published by the pool child: alone, like any task-sent.
                    out.append(Message("task.sent", event["hostname"], event))
                    continue
                worker.buffer.append(event)
                if len(worker.buffer) == MULTI_MAX:
                    out.append(self._flush(worker))
        self._pending = []
        # Jobs are sent one after another through the tick, not all at one instant.
        spread = 0.0 if self._live or not new_jobs else self._tick_s / new_jobs
        for k in range(new_jobs):
            out.extend(self._job(now + k * spread))
        for worker in self._workers:
            if worker.buffer:
                out.append(self._flush(worker))
            if now >= worker.next_heartbeat:
                worker.next_heartbeat = now + HEARTBEAT_FREQ
                out.append(self._worker_event(worker, "worker-heartbeat"))
        if not self._live:
            self._now += self._tick_s
        return out

    def drain(self) -> list[Message]:
        """Run the ticks that deliver every job already sent."""
        out: list[Message] = []
        while self._pending:
            out.extend(self.tick(0))
        return out

    # -- events ------------------------------------------------------------

    def _job(self, now: float) -> list[Message]:
        rng = self._rng
        self._job_no += 1
        n = self._job_no
        job_id = self._uuid()
        name, queue = TASKS[n % len(TASKS)]
        parent = self._last_call if n % 20 == 0 else None  # a task started by a task
        call = _Call(
            id=job_id,
            name=name,
            queue=queue,
            args=(
                repr((now,))
                if self._live
                else repr((rng.randrange(1, 10**6), f"user{n}@example.com"))
            ),
            kwargs="{}" if n % 3 else repr({"priority": "high", "attempt_id": n}),
            # A countdown that has passed by the time the worker runs the job.
            eta=_iso(now + TICK_S / 2) if n % 50 == 0 else None,
            expires=_iso(now + 3600) if n % 97 == 0 else None,
            parent_id=parent.id if parent else None,
            root_id=parent.root_id if parent else job_id,
        )
        self._last_call = call
        producer = self._producers[n % len(self._producers)]
        worker = self._workers[rng.randrange(len(self._workers))]
        roll = rng.random()
        retried = roll < RETRY_RATE
        failed = RETRY_RATE <= roll < RETRY_RATE + FAILURE_RATE
        events = self._run(worker, call, 0, retried or not failed)
        if retried:
            exc, tb = self._failure(n, retry=True)
            events.append(self._task(worker, job_id, "task-retried", exception=exc, traceback=tb))
            events.append(self._sent(worker.child, call, retries=1, at=0.0))  # stamped next tick
            events.extend(self._run(worker, call, 1, not failed))
        self._pending.append((worker, events))
        sent = self._sent(producer, call, retries=0, at=now)
        return [Message("task.sent", producer.hostname, sent)]

    def _run(
        self, worker: _Worker, call: _Call, retries: int, succeeds: bool
    ) -> list[dict[str, Any]]:
        """received, started, then succeeded or failed (``retries`` counts earlier attempts)."""
        received = self._task(
            worker, call.id, "task-received", name=call.name, args=call.args,
            kwargs=call.kwargs, root_id=call.root_id, parent_id=call.parent_id, retries=retries,
            eta=call.eta, expires=call.expires,
        )
        started = self._task(worker, call.id, "task-started")
        if succeeds:
            result = repr({"ok": True, "n": self._rng.randrange(1000)})
            runtime = self._rng.expovariate(1 / 0.08)
            final = self._task(worker, call.id, "task-succeeded", result=result, runtime=runtime)
        else:
            exc, tb = self._failure(self._job_no, retry=False)
            final = self._task(worker, call.id, "task-failed", exception=exc, traceback=tb)
        worker.processed += 1
        return [received, started, final]

    def _failure(self, n: int, *, retry: bool) -> tuple[str, str]:
        exc, last = EXCEPTIONS[n % len(EXCEPTIONS)]
        exc, last = exc.format(n=n), last.format(n=n)
        if retry:
            last = RETRY_TRACEBACK_TAIL.format(exc=exc)
        func = "charge" if retry else "process"
        tb = TRACEBACK.format(module="app/tasks", line=40 + n % 60, func=func, exc=exc, last=last)
        return exc, tb

    def _sent(
        self, producer: _Process, call: _Call, *, retries: int, at: float
    ) -> dict[str, Any]:
        event = producer.header()
        event.update(
            uuid=call.id, root_id=call.root_id, parent_id=call.parent_id, name=call.name,
            args=call.args, kwargs=call.kwargs, retries=retries, eta=call.eta,
            expires=call.expires, queue=call.queue, exchange="", routing_key=call.queue,
            timestamp=at, type="task-sent",
        )
        return event

    def _task(self, worker: _Worker, job_id: str, etype: str, **fields: Any) -> dict[str, Any]:
        event = worker.process.header()
        event["uuid"] = job_id
        event.update(fields)
        event["timestamp"] = 0.0  # stamped when the worker runs it (next tick)
        event["type"] = etype
        return event

    def _flush(self, worker: _Worker) -> Message:
        batch, worker.buffer = worker.buffer, []
        return Message("task.multi", worker.process.hostname, batch)

    def _worker_event(self, worker: _Worker, etype: str) -> Message:
        event = worker.process.header()
        event.update(
            freq=HEARTBEAT_FREQ, active=0, processed=worker.processed,
            loadavg=[0.42, 0.31, 0.2], sw_ident="py-celery", sw_ver="5.7.0", sw_sys="Linux",
            timestamp=self.now(), type=etype,
        )
        return Message(etype.replace("-", "."), worker.process.hostname, event)


# -- wire formats ----------------------------------------------------------


def redis_channel(keyprefix: str, db: int, routing_key: str) -> str:
    """Where kombu publishes a fanout event on Redis (docs/celery-protocol.md section 1)."""
    return f"{keyprefix}/{db}.celeryev/{routing_key}"


def redis_envelope(message: Message) -> bytes:
    """The kombu envelope of an event message, as Celery's Redis transport publishes it."""
    body = json.dumps(message.body)
    envelope = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"hostname": message.sender},
        "properties": {
            "delivery_mode": 1,
            "delivery_info": {"exchange": "celeryev", "routing_key": message.routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope).encode()


def amqp_body(message: Message) -> bytes:
    """The raw JSON body Celery publishes to the ``celeryev`` exchange on RabbitMQ."""
    return json.dumps(message.body).encode()


def redis_db(url: str) -> int:
    """The database number of a ``redis://host:port/db`` URL (0 when absent)."""
    path = urlsplit(url).path.strip("/")
    return int(path) if path else 0


# -- publishing ------------------------------------------------------------


@attrs.frozen
class Plan:
    """What to publish: ``events`` task events in jobs, at ``rate`` events/s (None: flat out)."""

    broker: str  # redis://host:port/db or amqp://user:pass@host:port/vhost
    events: int
    rate: float | None = None
    keyprefix: str = ""  # Celery's global_keyprefix (Redis)
    seed: int = 1
    live: bool = False
    publishers: int = 1


@attrs.define
class PublishReport:
    stats: StreamStats
    started: float  # epoch of the first publish
    finished: float  # epoch when the last publish was acknowledged
    min_receivers: int | None  # Redis: fewest subscribers any message reached

    @property
    def rate(self) -> float:
        return self.stats.task_events / max(self.finished - self.started, 1e-9)


def build_ticks(plan: Plan, part: int) -> Iterator[list[Message]]:
    """The messages of one publisher's share of ``plan``, tick by tick."""
    share = plan.events // plan.publishers + (part < plan.events % plan.publishers)
    jobs_total = max(1, round(share / EVENTS_PER_JOB))
    if plan.rate is None:
        per_tick = 2000.0  # flat out: big ticks, so batches are full
    else:
        per_tick = plan.rate / plan.publishers / EVENTS_PER_JOB * TICK_S
    stream = EventStream(
        seed=plan.seed * 1000 + part, host_tag=f"{plan.seed}-{part}", live=plan.live
    )
    yield stream.online()
    sent, owed = 0, 0.0
    while sent < jobs_total:
        owed += per_tick
        n = min(int(owed), jobs_total - sent)
        owed -= n
        sent += n
        yield stream.tick(n)
    yield stream.drain()


class _Publisher:
    """Writes messages to one broker connection, a tick's worth per round trip."""

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self.min_receivers: int | None = None
        if plan.broker.startswith("redis"):
            import redis

            self._redis = redis.Redis.from_url(plan.broker)
            self._db = redis_db(plan.broker)
            self.encode = self._encode_redis
        else:
            import amqp

            parts = urlsplit(plan.broker)
            vhost = parts.path[1:] or "/"
            self._amqp = amqp.Connection(
                host=f"{parts.hostname}:{parts.port or 5672}",
                userid=parts.username or "guest",
                password=parts.password or "guest",
                virtual_host=vhost,
            )
            self._amqp.connect()
            self._channel = self._amqp.channel()
            # As Celery declares it (docs/celery-protocol.md section 2).
            self._channel.exchange_declare("celeryev", "topic", durable=True, auto_delete=False)
            self.encode = self._encode_amqp

    def _encode_redis(self, message: Message) -> tuple[str, bytes, str]:
        channel = redis_channel(self._plan.keyprefix, self._db, message.routing_key)
        return channel, redis_envelope(message), message.sender

    def _encode_amqp(self, message: Message) -> tuple[str, bytes, str]:
        return message.routing_key, amqp_body(message), message.sender

    def send(self, encoded: list[tuple[str, bytes, str]]) -> None:
        if not encoded:
            return
        if self._plan.broker.startswith("redis"):
            pipe = self._redis.pipeline(transaction=False)
            for channel, payload, _ in encoded:
                pipe.publish(channel, payload)
            reached = min(pipe.execute())
            if self.min_receivers is None or reached < self.min_receivers:
                self.min_receivers = reached
            return
        import amqp

        for routing_key, payload, sender in encoded:
            self._channel.basic_publish(
                amqp.Message(
                    payload,
                    content_type="application/json",
                    content_encoding="utf-8",
                    application_headers={"hostname": sender},
                    delivery_mode=1,
                    priority=0,
                ),
                exchange="celeryev",
                routing_key=routing_key,
            )

    def close(self) -> None:
        if self._plan.broker.startswith("redis"):
            self._redis.close()
        else:
            self._amqp.close()


def publish_part(
    plan: Plan, part: int, start_at: Callable[[], float] | None = None
) -> PublishReport:
    """Publish one publisher's share of ``plan``.

    A pre-built stream is encoded entirely before the first publish, so the
    publishing loop does nothing but write; a live stream is built as it goes
    (it is stamped with the moment of publishing). ``start_at`` waits for the
    other publishers and returns the common start time.
    """
    publisher = _Publisher(plan)
    stats = StreamStats()

    def encoded(messages: list[Message]) -> list[tuple[str, bytes, str]]:
        out = [publisher.encode(m) for m in messages]
        for message, (_, payload, _) in zip(messages, out, strict=True):
            stats.messages += 1
            stats.bytes += len(payload)
            task_events = message.task_events
            stats.task_events += task_events
            stats.worker_events += 0 if task_events else 1
            body = message.body
            if isinstance(body, dict) and body["type"] == "task-sent" and body["retries"] == 0:
                stats.jobs += 1
        return out

    ticks = build_ticks(plan, part)
    prebuilt = None if plan.live else [encoded(t) for t in ticks]
    t0 = start_at() if start_at else time.time()
    step = 0
    try:
        for tick in prebuilt if prebuilt is not None else ticks:
            batch = tick if prebuilt is not None else encoded(tick)
            if plan.rate is not None:
                delay = t0 + step * TICK_S - time.time()
                if delay > 0:
                    time.sleep(delay)
            publisher.send(batch)
            step += 1
        finished = time.time()
    finally:
        publisher.close()
    return PublishReport(stats, t0, finished, publisher.min_receivers)


def publish(plan: Plan) -> PublishReport:
    """Publish ``plan`` from ``plan.publishers`` processes started together.

    Always from child processes, so the caller's own work (samplers, readers)
    does not slow the publishers. Each child builds its share, says ``ready``,
    and publishes on ``go``.
    """
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    plan_json = json.dumps(attrs.asdict(plan))
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.generator", "--child", plan_json, "--part", str(i)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
        )
        for i in range(plan.publishers)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a publisher process failed (exit code {child.wait()})")
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        reports = []
        for child in children:
            out, _ = child.communicate()
            if child.returncode:
                raise RuntimeError(f"a publisher process failed (exit code {child.returncode})")
            reports.append(_report_from_json(out))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    total = StreamStats()
    for report in reports:
        total.add(report.stats)
    receivers = [r.min_receivers for r in reports if r.min_receivers is not None]
    return PublishReport(
        total,
        min(r.started for r in reports),
        max(r.finished for r in reports),
        min(receivers) if receivers else None,
    )


def _report_to_json(report: PublishReport) -> str:
    return json.dumps({**attrs.asdict(report), "rate": report.rate})


def _report_from_json(text: str) -> PublishReport:
    data = json.loads(text)
    return PublishReport(
        StreamStats(**data["stats"]), data["started"], data["finished"], data["min_receivers"]
    )


def _run_child(plan: Plan, part: int) -> None:
    def start_at() -> float:
        print("ready", flush=True)
        sys.stdin.readline()
        return time.time()

    print(_report_to_json(publish_part(plan, part, start_at)), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.generator",
        description="Publish genuine-format Celery events to Redis or RabbitMQ.",
    )
    parser.add_argument("--broker", default="redis://localhost:6379/0")
    parser.add_argument("--events", type=int, default=100_000, help="task events to publish")
    parser.add_argument("--rate", type=float, help="events/s (default: as fast as possible)")
    parser.add_argument("--keyprefix", default="", help="Celery's global_keyprefix (Redis)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--publishers", type=int, default=1, help="publishing processes")
    parser.add_argument(
        "--live", action="store_true",
        help="stamp events as they are published (args of task-sent = publish time)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a Plan as JSON: see publish()
    parser.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _run_child(Plan(**json.loads(args.child)), args.part)
        return
    report = publish(
        Plan(
            broker=args.broker, events=args.events, rate=args.rate, keyprefix=args.keyprefix,
            seed=args.seed, live=args.live, publishers=args.publishers,
        )
    )
    print(_report_to_json(report))


if __name__ == "__main__":
    main()

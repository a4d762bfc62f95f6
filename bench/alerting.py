"""Alerting: issue 19's two targets.

**Latency** (:func:`run_latency`): a failing job's ``task-failed`` PUBLISHed on Redis to
the signed webhook's POST arriving at a receiver on loopback, while the generator
publishes other traffic at a steady rate. A real ``sluice run`` is given, through its
API as a user's dashboard would, webhook channels to the receiver and a ``job_failed``
rule each. Each probe is a job of a name of its own (``bench.probe.<k>.<n>``): a new
incident, so a new ``incident.firing`` POST. Its ``task-sent``, ``task-received`` and
``task-started`` go ``LEAD_S`` before its ``task-failed``, whose PUBLISH is the start of
the sample; the receiver checks the Standard Webhooks signature and stamps the arrival.
Probes rotate over ``CHANNELS`` channel/rule pairs: each channel stays under the
outbox's rate limit (``RATE_LIMIT`` per minute), past which it would rightly send one
summary instead of a message per incident.

**Cost** (:func:`run_cost`): 1,000 rules of mixed kinds over a PostgreSQL history of
10 million jobs; the CPU the evaluation takes, see its docstring.
"""

from __future__ import annotations

import http.server
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import redis
from standardwebhooks import Webhook, WebhookVerificationError

from bench.generator import Message, Plan, publish, redis_channel, redis_db, redis_envelope
from bench.latency import percentile
from bench.services import Sluice, database, unique, wait_subscribers
from sluice_core.alerting.outbox import RATE_LIMIT, RATE_WINDOW_S
from sluice_core.model import Job, JobState

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the tests' (tests/fixtures/receivers.py)
CHANNELS = 20
PROBE_EVERY_S = 0.5  # CHANNELS / PROBE_EVERY_S * 60 s must stay under RATE_LIMIT per channel
LEAD_S = 0.2  # a probe's task-sent/received/started before its task-failed
SETTLE_S = 15.0  # after the last probe, for the last POSTs
assert RATE_WINDOW_S / (CHANNELS * PROBE_EVERY_S) < RATE_LIMIT


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook receiver on 127.0.0.1: each POST stamped on arrival (its head read),
    its signature checked by the Standard Webhooks library, answered 200."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, dict[str, Any]]] = []
        self.refused = 0
        self._lock = threading.Lock()
        self._verifier = Webhook(WHSEC)
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hook"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def received(self, at: float, body: bytes, headers: dict[str, str]) -> bool:
        try:
            self._verifier.verify(body, headers)
        except WebhookVerificationError:
            with self._lock:
                self.refused += 1
            return False
        with self._lock:
            self.arrivals.append((at, orjson.loads(body)))
        return True


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        at = time.time()
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        ok = self.server.received(at, body, {k.lower(): v for k, v in self.headers.items()})
        self.send_response(200 if ok else 400)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per POST on stderr otherwise


class Prober:
    """Publishes failing jobs of fresh names, as a Celery producer and worker would."""

    def __init__(self, broker: str, keyprefix: str) -> None:
        self._redis = redis.Redis.from_url(broker)
        self._prefix = keyprefix
        self._db = redis_db(broker)
        self._clock = 0
        self.published: dict[str, float] = {}  # task name -> task-failed's PUBLISH

    def _header(self, hostname: str) -> dict[str, Any]:
        self._clock += 1
        return {"hostname": hostname, "utcoffset": 0.0, "pid": 4242, "clock": self._clock}

    def _publish(self, message: Message) -> None:
        channel = redis_channel(self._prefix, self._db, message.routing_key)
        self._redis.publish(channel, redis_envelope(message))

    def probe(self, name: str) -> None:
        """One job of ``name``: sent, received and started, then ``LEAD_S`` later failed."""
        job_id, worker = str(uuid.uuid4()), "celery@bench-probe"
        now = time.time()
        sent = self._header("gen4242@bench-probe") | {
            "uuid": job_id, "root_id": job_id, "parent_id": None, "name": name, "args": "()",
            "kwargs": "{}", "retries": 0, "eta": None, "expires": None, "queue": "alerts",
            "exchange": "", "routing_key": "alerts", "timestamp": now, "type": "task-sent",
        }
        self._publish(Message("task.sent", sent["hostname"], sent))
        running = [
            self._header(worker) | {
                "uuid": job_id, "name": name, "args": "()", "kwargs": "{}", "root_id": job_id,
                "parent_id": None, "retries": 0, "eta": None, "expires": None,
                "timestamp": now, "type": "task-received",
            },
            self._header(worker) | {"uuid": job_id, "timestamp": now, "type": "task-started"},
        ]
        self._publish(Message("task.multi", worker, running))
        time.sleep(LEAD_S)
        failed = self._header(worker) | {
            "uuid": job_id, "exception": "RuntimeError('probe')",
            "traceback": "Traceback (most recent call last):\nRuntimeError: probe\n",
            "timestamp": time.time(), "type": "task-failed",
        }
        message = Message("task.multi", worker, [failed])
        self.published[name] = time.time()
        self._publish(message)

    def close(self) -> None:
        self._redis.close()


@attrs.define
class AlertLatencyRun:
    storage: str
    rate: float  # background events/s offered
    published_rate: float  # background events/s published
    probes: int
    samples: int  # probes whose POST arrived
    p50_ms: float
    p99_ms: float
    max_ms: float
    refused: int  # POSTs whose signature did not verify


def _setup(sluice: Sluice, url: str) -> None:
    """The channels and rules, through the API as the dashboard makes them."""
    with httpx.Client(base_url=sluice.base, timeout=30) as client:
        for k in range(CHANNELS):
            channel = client.post("/api/alerts/channels", json={
                "name": f"probe-hook-{k}", "type": "webhook",
                "config": {"url": url, "secret": WHSEC},
            })
            channel.raise_for_status()
            client.post("/api/alerts/rules", json={
                "name": f"probe {k} failing", "kind": "job_failed",
                "match": {"name": f"bench.probe.{k}.*"}, "params": {}, "severity": "critical",
                "channels": [channel.json()["id"]], "for_s": 0,
            }).raise_for_status()


def _wait(receiver: Receiver, names: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if names <= {body["incident"]["labels"]["name"] for _, body in receiver.arrivals}:
            return
        time.sleep(0.05)


def run_latency(
    *, storage: str, rate: float, duration_s: float, broker: str, run_dir: Path
) -> AlertLatencyRun:
    keyprefix = unique("bench") + ":"
    receiver = Receiver()
    prober = Prober(broker, keyprefix)
    background: list[Any] = []
    with database(storage, run_dir) as db:
        sluice = Sluice(broker, db, run_dir, keyprefix)
        try:
            _setup(sluice, receiver.url)
            plan = Plan(broker=broker, events=int(rate * duration_s), rate=rate,
                        keyprefix=keyprefix, live=True)
            wait_subscribers(plan, 1)
            # Warm up: the evaluator and the outbox have run once, the first POST is made.
            prober.probe("bench.probe.0.warm-up")
            _wait(receiver, {"bench.probe.0.warm-up"}, 60)
            warm = set(prober.published)
            thread = threading.Thread(target=lambda: background.append(publish(plan)))
            thread.start()
            n = 0
            t0 = time.monotonic() + 1.0  # the publisher is under way
            while time.monotonic() < t0 + duration_s - 1.0:
                due = t0 + n * PROBE_EVERY_S
                time.sleep(max(0.0, due - time.monotonic()))
                prober.probe(f"bench.probe.{n % CHANNELS}.{n}")
                n += 1
            thread.join()
            probes = set(prober.published) - warm
            _wait(receiver, probes, SETTLE_S)
        finally:
            sluice.stop()
            prober.close()
            receiver.shutdown()
    arrived: dict[str, float] = {}
    for at, body in receiver.arrivals:
        if body["type"] == "incident.firing":
            arrived.setdefault(body["incident"]["labels"]["name"], at)
    delays = [(arrived[name] - prober.published[name]) * 1000 for name in probes
              if name in arrived]
    if not delays:
        raise RuntimeError("no webhook arrived: see the Sluice log in the run directory")
    return AlertLatencyRun(
        storage=storage, rate=rate, published_rate=background[0].rate if background else 0.0,
        probes=len(probes), samples=len(delays), p50_ms=statistics.median(delays),
        p99_ms=percentile(delays, 99), max_ms=max(delays), refused=receiver.refused,
    )


# -- cost -------------------------------------------------------------------------------

NAMES = 1_000  # distinct task names in the traffic, each with its failures
QUEUES = ("orders", "mail", "billing", "reports", "media", "celery", "sync", "push")
FEED_EVERY_S = 0.1  # ingest hands the evaluator a batch this often
EVALUATOR_APP = "sluice-alert-eval"  # its PostgreSQL connections' application_name


def task_name(i: int) -> str:
    return f"app.task_{i:04d}"


def rule_bodies() -> list[dict[str, Any]]:
    """1,000 rules as a large deployment has them: most on one task name each."""
    bodies: list[dict[str, Any]] = []

    def add(kind: str, match: dict[str, str], params: dict[str, Any]) -> None:
        bodies.append({"name": f"{kind} {len(bodies)}", "kind": kind, "match": match,
                       "params": params, "severity": "error", "channels": [], "for_s": 0})

    for i in range(600):  # one name each; a few low thresholds fire
        window = 300 if i < 400 else 900 if i < 550 else 3600
        add("failure_rate", {"name": task_name(i)},
            {"window_s": window, "threshold": 0.05 if i % 20 == 0 else 0.5, "min_runs": 10})
    for i in range(600, 850):
        match = {"name": task_name(i)} | ({"exception": "payments-api"} if i % 10 == 0 else {})
        add("job_failed", match, {"resolve_s": 600})
    for i in range(50):
        add("runtime", {"name": f"app.task_{i:02d}*"}, {"max_s": 300})
    for i in range(40):
        add("queue_wait", {"queue": QUEUES[i % len(QUEUES)]}, {"max_s": 600 + i})
    for i in range(30):
        add("queue_depth", {"queue": QUEUES[i % len(QUEUES)]}, {"max_depth": 1000 + i})
    for i in range(10):
        add("no_consumer", {"queue": QUEUES[i % len(QUEUES)]}, {})
    for i in range(15):
        add("worker_offline", {"worker": f"celery@worker-*-{i % 4}"}, {})
    for _ in range(4):
        add("job_lost", {"name": "app.task_*"}, {})
    add("sluice_health", {}, {"max_lag_s": 60})
    return bodies


async def store_rules(db: str) -> int:
    """Replace the database's rules with :func:`rule_bodies` (their incidents resolve)."""
    from sluice_core.alerting.rules import parse_rule
    from sluice_core.config import Config
    from sluice_core.plugins import PluginManager

    storage = PluginManager().storage(Config(db=db))
    await storage.open()
    try:
        for rule in await storage.alert_rules():
            await storage.delete_alert_rule(rule.id)
        now = time.time()
        for body in rule_bodies():
            rule = parse_rule(body, lambda channel: int(str(channel)), now=now)
            await storage.save_alert_rule(rule)
        return len(await storage.alert_rules())
    finally:
        await storage.aclose()


async def ingest(db: str, rate: float, seconds: float) -> None:
    """The generator's traffic over NAMES task names, at ``rate`` events/s, through the
    storage backend's ingest (as ``sluice agent`` writes it, minus the broker)."""
    import trio

    from bench import generator
    from sluice_celery.events import KIND_AMQP, normalize_batch
    from sluice_core.config import Config
    from sluice_core.model import RawBatch
    from sluice_core.plugins import PluginManager

    generator.TASKS = [(task_name(i), QUEUES[i % len(QUEUES)]) for i in range(NAMES)]
    storage = PluginManager().storage(Config(db=db))
    await storage.open()
    stream = generator.EventStream(seed=19, live=True)
    per_tick = rate * FEED_EVERY_S / generator.EVENTS_PER_JOB
    owed, t0, step = 0.0, trio.current_time(), 0
    try:
        while trio.current_time() < t0 + seconds:
            owed += per_tick
            n, owed = int(owed), owed - int(owed)
            messages = stream.online() if step == 0 else stream.tick(n)
            batch = RawBatch(kind=KIND_AMQP, source="bench",
                             messages=[(m.routing_key, generator.amqp_body(m)) for m in messages],
                             received_at=time.time())
            normalized = normalize_batch(batch)
            await storage.ingest(normalized.job_events, normalized.worker_events)
            step += 1
            await trio.sleep_until(t0 + step * FEED_EVERY_S)
    finally:
        await storage.aclose()


def _jobs(rate: float, seconds: float) -> list[Job]:
    """What ingest hands the evaluator at ``rate`` events/s for ``seconds``: the finished
    jobs of the traffic :func:`ingest` writes (as many, the same names and failures)."""
    from bench.generator import EVENTS_PER_JOB, FAILURE_RATE

    out = []
    for n in range(int(rate / EVENTS_PER_JOB * seconds)):
        failed = n % round(1 / FAILURE_RATE) == 0
        out.append(Job(
            id=str(uuid.uuid4()), framework="celery",
            state=JobState.FAILED if failed else JobState.COMPLETED,
            name=task_name(n * 7 % NAMES), queue=QUEUES[n * 7 % NAMES % len(QUEUES)],
            worker=f"celery@worker-19-{n % 4}",
            exception="ConnectionError('connection refused: payments-api:443')" if failed else None,
        ))
    return out


async def evaluate(db: str, rate: float, warm_s: float, seconds: float) -> dict[str, Any]:
    """The evaluator as the engine runs it (``Evaluator.run``, the default kinds, fed
    what ingest stores), alone in this process: prints ``start`` after ``warm_s``, then
    after ``seconds`` more returns the CPU this process used meanwhile."""
    import trio

    from sluice_core.alerting.evaluate import Evaluator, default_kinds
    from sluice_core.config import Config
    from sluice_core.plugins import PluginManager
    from sluice_core.storage import IngestResult

    async def no_problems(max_lag_s: float, now: float) -> dict[str, str]:
        return {}  # the engine's view of its own health: in memory, nothing to read

    storage = PluginManager().storage(Config(db=db))
    await storage.open()
    evaluator = Evaluator(storage, default_kinds(storage, no_problems))
    rounds = {True: 0, False: 0}
    evaluate_once = evaluator.evaluate

    async def counted(now: float, *, poll: bool = True) -> None:
        rounds[poll] += 1
        await evaluate_once(now, poll=poll)

    evaluator.evaluate = counted  # type: ignore[method-assign]
    jobs = _jobs(rate, warm_s + seconds + 5)
    per_feed = max(1, round(len(jobs) / (warm_s + seconds + 5) * FEED_EVERY_S))

    async def feed() -> None:
        for start in range(0, len(jobs), per_feed):
            batch = jobs[start:start + per_feed]
            now = time.time()
            for job in batch:
                job.finished_at = job.updated_at = now
            evaluator.feed(IngestResult(jobs=batch, workers=[], events_stored=4 * len(batch)))
            await trio.sleep(FEED_EVERY_S)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(evaluator.run)
            nursery.start_soon(feed)
            await trio.sleep(warm_s)
            print("start", flush=True)
            cpu0, wall0, before = time.process_time(), time.monotonic(), dict(rounds)
            await trio.sleep(seconds)
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            nursery.cancel_scope.cancel()
        # The parent reads its connections' CPU now, while they are open.
        print("stop", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        firing = len([i for i in await storage.open_incidents() if i.state == "firing"])
    finally:
        await storage.aclose()
    return {"cpu_s": cpu, "wall_s": wall, "polled_rounds": rounds[True] - before[True],
            "fed_rounds": rounds[False] - before[False], "firing": firing}


def _backends_cpu_s(db: str, application: str) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend serving ``application`` (from /proc:
    the server runs on this machine)."""
    import os

    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        pids = [row[0] for row in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application,)
        )]
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


@attrs.define
class AlertCostRun:
    jobs: int  # in the database
    rules: int
    rate: float  # events/s ingested meanwhile
    seconds: float
    evaluator_cpu_pct: float  # of one core: the evaluating process
    server_cpu_pct: float  # of one core: the PostgreSQL backends serving it
    polled_rounds: int
    fed_rounds: int
    firing: int  # incidents firing at the end


def run_cost(*, db: str, rate: float, seconds: float, warm_s: float = 15.0) -> AlertCostRun:
    """1,000 rules (:func:`rule_bodies`) over the history in ``db``, ``rate`` events/s of
    new traffic written by one process (:func:`ingest`), evaluated by another
    (:func:`evaluate`) whose CPU is measured over ``seconds`` after ``warm_s``, and the
    CPU of the PostgreSQL backends answering it."""
    import os
    import subprocess

    import psycopg
    import trio

    from bench.services import REPO

    with psycopg.connect(db) as conn:
        jobs = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]  # type: ignore[index]
    rules = trio.run(store_rules, db)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "bench.alerting"]
    writer = subprocess.Popen(
        [*command, "ingest", db, str(rate), str(warm_s + seconds + 10)],
        env=env | {"PGAPPNAME": "sluice-alert-ingest"},
    )
    try:
        evaluator = subprocess.Popen(
            [*command, "evaluate", db, str(rate), str(warm_s), str(seconds)],
            env=env | {"PGAPPNAME": EVALUATOR_APP}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )
        assert evaluator.stdout is not None
        if evaluator.stdout.readline().strip() != "start":
            raise RuntimeError(f"the evaluator failed (exit code {evaluator.wait()})")
        before = _backends_cpu_s(db, EVALUATOR_APP)
        if evaluator.stdout.readline().strip() != "stop":
            raise RuntimeError(f"the evaluator failed (exit code {evaluator.wait()})")
        after = _backends_cpu_s(db, EVALUATOR_APP)
        result = orjson.loads(evaluator.communicate("done\n", timeout=60)[0])
    finally:
        writer.terminate()
        writer.wait(60)
    server_s = sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())
    wall = result["wall_s"]
    return AlertCostRun(
        jobs=jobs, rules=rules, rate=rate, seconds=wall,
        evaluator_cpu_pct=100 * result["cpu_s"] / wall, server_cpu_pct=100 * server_s / wall,
        polled_rounds=result["polled_rounds"], fed_rounds=result["fed_rounds"],
        firing=result["firing"],
    )


def main(argv: list[str]) -> None:
    """The child processes of :func:`run_cost`: ``ingest DB RATE SECONDS`` and
    ``evaluate DB RATE WARM_S SECONDS`` (prints ``start``, then its figures as JSON)."""
    import trio

    what, db, *numbers = argv
    values = [float(n) for n in numbers]
    if what == "ingest":
        trio.run(ingest, db, values[0], values[1])
    else:
        result = trio.run(evaluate, db, values[0], values[1], values[2])
        print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

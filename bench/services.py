"""The processes under test (Sluice, Flower) and the databases they write to.

Each benchmark starts its own ``sluice run`` and ``celery flower`` as
subprocesses, isolated from everything else on the shared Redis by a unique
Celery ``global_keyprefix``, reads their progress over HTTP and their memory
from ``/proc``. Logs go to the run directory, kept for a post-mortem.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from bench.generator import EventStream, Plan, redis_channel, redis_db, redis_envelope

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SLUICE = REPO / ".venv" / "bin" / "sluice"
FLOWER_VENV = BENCH / ".venv-flower"
FLOWER_VERSION = "2.2.0"
# Flower's own requirements miss these for a Redis broker (kombu imports packaging).
FLOWER_REQUIREMENTS = (f"flower=={FLOWER_VERSION}", "redis>=5.2", "packaging")

REDIS_URL = os.environ.get("SLUICE_BENCH_REDIS_URL", "redis://localhost:6379/0")
AMQP_URL = os.environ.get("SLUICE_BENCH_AMQP_URL", "amqp://guest:guest@localhost:5672")
PG_URL = os.environ.get("SLUICE_BENCH_PG_URL", "postgresql://postgres@localhost:5432/postgres")


class ServiceError(RuntimeError):
    """A process under test did not start or died; the message names its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/<pid>/task/*/children)."""
    found = [pid]
    for each in found:
        try:
            tasks = os.listdir(f"/proc/{each}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{each}/task/{task}/children") as f:
                    found += [int(child) for child in f.read().split()]
            except FileNotFoundError:
                pass
    return found


def proc_status_kb(pid: int, field: str) -> int | None:
    """A ``/proc/<pid>/status`` field in kB (VmRSS, VmHWM), or None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class Service:
    """A subprocess with an HTTP port, its log, and its memory."""

    name = "service"

    def __init__(self, argv: list[str], port: int, log: Path, env: dict[str, str] | None = None):
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = log.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
            start_new_session=True,
        )
        self.http = httpx.Client(base_url=self.base, timeout=10.0)
        self.peak_rss_kb = 0
        self._hwm_kb: dict[int, int] = {}  # per process of the tree

    def wait_http(self, path: str, timeout: float = 60.0) -> float:
        """Seconds from process start until ``path`` answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with {self.proc.returncode}; see {self.log}"
                )
            try:
                if self.http.get(path, timeout=1.0).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.01)
        raise ServiceError(f"{self.name} did not answer {path} within {timeout}s; see {self.log}")

    def sample_rss(self) -> None:
        """Resident memory of the process and its children (Sluice's reader process)."""
        total = 0
        for pid in process_tree(self.proc.pid):
            total += proc_status_kb(pid, "VmRSS") or 0
            hwm = proc_status_kb(pid, "VmHWM")
            if hwm is not None:
                self._hwm_kb[pid] = max(self._hwm_kb.get(pid, 0), hwm)
        self.peak_rss_kb = max(self.peak_rss_kb, total)

    def peak_rss_mb(self) -> float:
        """The peak resident memory of the process and its children: the sum of their
        kernel high-water marks (VmHWM; an upper bound, their peaks need not meet), or
        what sampling saw."""
        self.sample_rss()
        return max(sum(self._hwm_kb.values()), self.peak_rss_kb) / 1024

    def rss_mb(self) -> float:
        """Resident memory now, of the process and its children."""
        return sum(proc_status_kb(pid, "VmRSS") or 0 for pid in process_tree(self.proc.pid)) / 1024

    def metrics(self) -> dict[str, float]:
        """``/metrics`` summed per metric name (labels added up)."""
        text = self.http.get("/metrics").text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        self._log_file.close()


def _sluice_argv(
    command: str, broker: str, db: str, keyprefix: str, extra: Sequence[str]
) -> list[str]:
    argv = [str(SLUICE), command, "--plugin", "celery", "--db", db, *extra]
    if command != "web":
        # The generator's workers send heartbeats in stream time, not while Sluice
        # catches up: without this, Sluice would rightly declare them offline and
        # add "lost" events of its own to the count of events taken in.
        argv += ["--heartbeat-missed", "1000000"]
    if broker:
        argv += ["--broker", broker]
    if keyprefix:
        argv += ["--redis-keyprefix", keyprefix]
    return argv


class Sluice(Service):
    """``sluice run``, or with ``command="web"`` a web replica (beside a SluiceAgent)."""

    name = "sluice"

    def __init__(
        self,
        broker: str,
        db: str,
        run_dir: Path,
        keyprefix: str = "",
        extra: Sequence[str] = (),
        command: str = "run",
    ) -> None:
        port = free_port()
        argv = _sluice_argv(
            command, broker, db, keyprefix, ["--port", str(port), "--log-level", "WARNING", *extra]
        )
        super().__init__(argv, port, run_dir / f"sluice-{command}-{port}.log")
        self.startup_s = self.wait_http("/healthz")

    def counters(self) -> dict[str, float]:
        m = self.metrics()
        return {
            "ingested": m.get("sluice_events_ingested_total", 0.0),
            "dropped": m.get("sluice_events_dropped_total", 0.0),
            "messages": m.get("sluice_messages_received_total", 0.0),
        }

    def taken(self) -> float:
        return self.counters()["ingested"]


class SluiceAgent(Service):
    """``sluice agent --db``: reads the broker and stores, serves nothing. Ready once its
    source has subscribed (it says so in its log)."""

    name = "sluice-agent"

    def __init__(self, broker: str, db: str, run_dir: Path, keyprefix: str = "") -> None:
        argv = _sluice_argv("agent", broker, db, keyprefix, ["--log-level", "INFO"])
        super().__init__(argv, 0, run_dir / f"sluice-agent-{unique('')}.log")
        deadline = time.monotonic() + 60
        while "subscribed to" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ServiceError(f"the agent is not reading; see {self.log}")
            time.sleep(0.05)
        self.startup_s = time.monotonic() - self.started


def ensure_flower() -> Path:
    """Flower in a virtualenv of its own (its Celery and tornado stay out of Sluice's)."""
    celery = FLOWER_VENV / "bin" / "celery"
    if not celery.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(FLOWER_VENV)], check=True)
        subprocess.run(
            [str(FLOWER_VENV / "bin" / "pip"), "install", "-q", *FLOWER_REQUIREMENTS], check=True
        )
    return celery


class Flower(Service):
    """Flower as its users run it (default options), given the same broker and keyprefix."""

    name = "flower"

    def __init__(self, broker: str, run_dir: Path, keyprefix: str = ""):
        port = free_port()
        config_dir = run_dir / f"flower-{port}"
        config_dir.mkdir()
        # celery --config loads a module: the only way to give Flower transport options.
        (config_dir / "sluice_bench_celeryconfig.py").write_text(
            f"broker_transport_options = {{'global_keyprefix': {keyprefix!r}}}\n"
        )
        argv = [str(ensure_flower()), "--config", "sluice_bench_celeryconfig", "--broker", broker,
                "flower", f"--port={port}", "--address=127.0.0.1"]
        env = {**os.environ, "PYTHONPATH": str(config_dir)}
        super().__init__(argv, port, run_dir / f"flower-{port}.log", env)
        self.startup_s = self.wait_http("/metrics")

    def taken(self) -> float:
        """Task events Flower has applied to its state (its ``flower_events_total``)."""
        return self.metrics().get("flower_events_total", 0.0)


def wait_subscribers(plan: Plan, expected: int, timeout: float = 30.0) -> None:
    """Until ``expected`` subscribers receive the plan's channels.

    Probes with a real ``worker-heartbeat`` of a worker of its own: PUBLISH
    answers how many subscribers got it, and a heartbeat adds no task event.
    """
    import redis

    client = redis.Redis.from_url(plan.broker)
    stream = EventStream(seed=0, workers=1, producers=1, host_tag="probe")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = stream.online()[0]
            channel = redis_channel(plan.keyprefix, redis_db(plan.broker), message.routing_key)
            if client.publish(channel, redis_envelope(message)) >= expected:
                return
            time.sleep(0.1)
    finally:
        client.close()
    raise ServiceError(f"fewer than {expected} subscribers on {plan.keyprefix!r} after {timeout}s")


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


@contextlib.contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A broker URL on a fresh RabbitMQ vhost (nothing else publishes there), deleted afterwards."""
    vhost = unique("sluice-bench-")
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"{AMQP_URL}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def wait_bindings(broker: str, expected: int, timeout: float = 60.0) -> None:
    """Until ``expected`` queues are bound to the vhost's ``celeryev`` exchange."""
    vhost = broker.rsplit("/", 1)[1]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _rabbitmqctl("list_bindings", "-p", vhost, "source_name").split()
        if rows.count("celeryev") >= expected:
            return
        time.sleep(0.5)
    raise ServiceError(
        f"fewer than {expected} queues bound to celeryev on {vhost} after {timeout}s"
    )


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one run, dropped afterwards."""
    name = unique("sluice_bench_")
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def database(kind: str, run_dir: Path) -> Iterator[str]:
    """A fresh database URL of ``kind`` ("sqlite" or "postgresql")."""
    if kind == "postgresql":
        with postgres_database() as url:
            yield url
        return
    path = run_dir / f"{unique('sluice-')}.db"
    try:
        yield f"sqlite:///{path}"
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


class Sampler:
    """Polls each service's counter (and memory) in the background: a time series.

    Twice a second: Sluice's ``/metrics`` also counts jobs by state in the
    database, and polling it ten times a second took 6% of its CPU.
    """

    def __init__(self, services: list[Service], interval: float = 0.5) -> None:
        self.services = services
        self.series: dict[str, list[tuple[float, float]]] = {s.name: [] for s in services}
        self._interval = interval
        self._stop = threading.Event()
        # A thread each: a busy Flower answers slowly and must not delay Sluice's samples.
        self._threads = [
            threading.Thread(target=self._run, args=(s,), daemon=True) for s in services
        ]

    def __enter__(self) -> Sampler:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, service: Service) -> None:
        while not self._stop.is_set():
            service.sample_rss()
            with contextlib.suppress(httpx.HTTPError):
                taken = service.taken()
                self.series[service.name].append((time.time(), taken))
            self._stop.wait(self._interval)

    def last(self, name: str) -> float:
        series = self.series[name]
        return series[-1][1] if series else 0.0

    def settled(self, name: str, target: float, stall_s: float) -> bool:
        """The service has taken ``target`` events, or has not moved for ``stall_s``."""
        series = self.series[name]
        if not series:
            return False
        t, value = series[-1]
        if value >= target:
            return True
        moved = [p for p in series if p[1] != value]
        since = moved[-1][0] if moved else series[0][0]
        return t - since >= stall_s

    def reached_at(self, name: str) -> float | None:
        """When the service's counter first showed its final value."""
        series = self.series[name]
        if not series:
            return None
        final = series[-1][1]
        return next(t for t, value in series if value == final)

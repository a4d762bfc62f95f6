"""Where Sluice's time goes during a burst: py-spy samples, summed per function.

Opt-in (``python -m bench profile``): needs py-spy, which is no dependency of
Sluice (``.venv/bin/pip install py-spy``). Sampling is non-blocking, so the
profiled processes (the engine and its reader process) run at full speed.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import attrs

from bench.generator import Plan, publish
from bench.ingest import quiesce
from bench.services import REPO, Sluice, database, unique, wait_subscribers

# Frames from these folders are Sluice's own code; the rest is libraries and trio.
OWN_CODE = ("sluice_core/", "storage/", "sluice_storage/", "sluice_celery/", "sluice_rabbitmq/",
            "web/", "sluice_web/")


@attrs.define
class ProfileRun:
    storage: str
    published: int
    taken: int
    seconds: float  # from the first publish to the last event taken in
    samples: int
    threads: list[tuple[str, int]]  # thread name, samples
    functions: list[tuple[str, int]]  # Sluice function (file:line), samples including callees


def py_spy() -> Path | None:
    found = REPO / ".venv" / "bin" / "py-spy"
    if found.exists():
        return found
    which = shutil.which("py-spy")
    return Path(which) if which else None


def summarize(raw: str, top: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """py-spy's collapsed stacks -> (samples, per thread, per Sluice function inclusive)."""
    threads: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        # With --subprocesses a stack starts with 'process 1234:"command line"', a
        # child's with its parent's first: named after the last, the engine or its reader.
        process = ""
        while frames[0].startswith("process "):
            process = "reader: " if "sluice_core.reader" in frames[0] else "engine: "
            frames = frames[1:]
        # "thread (1234): name" -> the name (pids differ between runs)
        threads[process + frames[0].split("): ", 1)[-1]] += n
        own = {f for f in frames[1:] if any(f"({p}" in f for p in OWN_CODE)}
        for frame in own:
            inclusive[frame] += n
    return total, threads.most_common(8), inclusive.most_common(top)


def run(*, storage: str, events: int, broker: str, run_dir: Path, seconds: float = 300.0,
        top: int = 25) -> ProfileRun:
    spy = py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    keyprefix = unique("bench") + ":"
    out = run_dir / f"py-spy-{storage}.txt"
    with database(storage, run_dir) as db:
        sluice = Sluice(broker, db, run_dir, keyprefix)
        try:
            plan = Plan(broker=broker, events=events, keyprefix=keyprefix)
            wait_subscribers(plan, 1)
            before = quiesce(sluice)
            recorder = subprocess.Popen(
                [str(spy), "record", "--pid", str(sluice.proc.pid), "--duration", str(int(seconds)),
                 "--rate", "100", "--threads", "--nonblocking", "--subprocesses",
                 "--format", "raw",
                 "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            t0 = time.time()
            report = publish(plan)
            # Until Sluice has taken everything in or stopped moving (Redis dropped it). Polled
            # once a second: /metrics itself costs Sluice CPU.
            taken, moved_at = 0, time.time()
            while taken < report.stats.task_events and time.time() - moved_at < 3:
                time.sleep(1.0)
                now_taken = int(sluice.taken() - before)
                if now_taken != taken:
                    taken, moved_at = now_taken, time.time()
            elapsed = moved_at - t0
            recorder.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
            recorder.wait()
        finally:
            sluice.stop()
    total, threads, functions = summarize(out.read_text(), top)
    return ProfileRun(storage, report.stats.task_events, taken, elapsed, total, threads, functions)

"""The machine the figures come from, and Markdown tables of them."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

import psycopg
import redis

from bench.services import FLOWER_VENV, PG_URL, REDIS_URL, REPO


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unavailable"
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "unavailable"


def machine() -> dict[str, str]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        redis_version = str(client.info("server")["redis_version"])
    finally:
        client.close()
    with psycopg.connect(PG_URL) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        pg_version = str(row[0]) if row else "unknown"
    flower = FLOWER_VENV / "bin" / "python"
    return {
        "CPU": _cpu_model(),
        "cores (nproc)": str(os.cpu_count()),
        "memory": f"{_mem_total_gib():.1f} GiB",
        "kernel": platform.release(),
        "Python (Sluice)": _version([str(REPO / ".venv/bin/python"), "-VV"]),
        "Redis": redis_version,
        "PostgreSQL": pg_version,
        "RabbitMQ": _version(["rabbitmqctl", "version"]),
        "Flower": _version([str(flower), "-c",
                            "import flower, celery; print('flower', flower.__version__, "
                            "'celery', celery.__version__)"]),
    }


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; numbers formatted for reading."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            if value >= 100:
                return f"{value:,.0f}"
            return f"{value:.2f}" if value >= 1 else f"{value:.3f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)

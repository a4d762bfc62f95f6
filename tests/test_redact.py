"""Server-side redaction: a secret in a task's arguments never reaches the database."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import trio

from sluice_core.cli import main
from sluice_core.config import REDACT_KEYS, REDACT_PATTERNS, Config
from sluice_core.model import JobEvent, JobState, RawBatch
from sluice_core.plugins import PluginManager
from sluice_core.redact import REDACTED, Redactor
from sluice_core.serialize import job_event_to_json
from sluice_core.storage import DeadLetter, JobQuery
from tests.fixtures.celery_worker import CeleryWorker
from tests.fixtures.storage import open_storage
from tests.test_actions import TIMEOUT, in_state, job_when, sluice

DEFAULT = Redactor(REDACT_KEYS.default, REDACT_PATTERNS.default)
SECRET = "p4ss-SECRET"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "{'password': 'p4ss-SECRET', 'n': 1}",
            "{'password': '[redacted]', 'n': 1}",
        ),
        (  # positional: a dict inside the args tuple, names spelled otherwise
            "('bob', {'db_password': 'p4ss-SECRET', 'X-Auth-Token': 't0k'})",
            "('bob', {'db_password': '[redacted]', 'X-Auth-Token': '[redacted]'})",
        ),
        (  # a secret holding a structure: all of it goes
            "{'credentials': {'user': 'bob', 'pw': 'p4ss-SECRET'}}",
            "{'credentials': '[redacted]'}",
        ),
        (  # cut by Celery (it does not parse): the quoted pair is replaced in the text
            "{'api_key': 'p4ss-SECRET', 'blob': 'xxxxxxxx...",
            "{'api_key': '[redacted]', 'blob': 'xxxxxxxx...",
        ),
        (  # an object repr (does not parse either)
            '{"token": "p4ss-SECRET", "at": datetime.datetime(2026, 1, 1, 0, 0)}',
            "{\"token\": '[redacted]', \"at\": datetime.datetime(2026, 1, 1, 0, 0)}",
        ),
        ("{'user': 'bob', 'n': [1, 2]}", "{'user': 'bob', 'n': [1, 2]}"),  # untouched
        ("not a literal at all", "not a literal at all"),
    ],
)
def test_secrets_are_replaced_in_argument_reprs(text: str, expected: str) -> None:
    assert DEFAULT.text(text) == expected


def test_the_captured_message_and_every_repr_field_are_redacted() -> None:
    event = JobEvent(
        id="e1",
        job_id="j1",
        framework="celery",
        type="task-received",
        state=JobState.RECEIVED,
        timestamp=1_800_000_000.0,
        fields={"args": "()", "kwargs": f"{{'password': '{SECRET}'}}", "name": "tasks.login"},
        extra={"message": {"kwargs": {"password": SECRET, "user": "bob"}, "args": []}},
    )
    redacted = DEFAULT.job_event(event)
    assert SECRET not in repr(redacted)
    assert redacted.extra["message"]["kwargs"] == {"password": REDACTED, "user": "bob"}
    assert redacted.extra["message"]["redacted"] is True  # a retry refuses placeholders
    assert redacted.fields["name"] == "tasks.login"
    # Nothing to redact: the very same event, no copy.
    clean = JobEvent("e2", "j1", "celery", "task-sent", JobState.QUEUED, 1.8e9, fields={})
    assert DEFAULT.job_event(clean) is clean


def test_the_names_are_options() -> None:
    only = Redactor(["pin"], [])
    assert only.text("{'pin': 1234, 'password': 'x'}") == "{'pin': '[redacted]', 'password': 'x'}"
    assert not Redactor([], []).active


@pytest.mark.parametrize("celery_worker", ["redis"], indirect=True)
async def test_a_password_in_kwargs_never_reaches_the_database(
    celery_worker: CeleryWorker, tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        async with sluice(tmp_path, celery_worker.broker_url, celery_worker.keyprefix) as (
            _,
            client,
        ):
            job_id = await celery_worker.send("tests.echo", "bob", password=SECRET)
            job = await job_when(client, job_id, in_state("completed"))
            assert "[redacted]" in job["kwargs"] and SECRET not in str(job)
            response = await client.get("/api/jobs", params={"q": SECRET})
            assert response.json()["jobs"] == []  # not searchable either
            # A re-run would publish the placeholder: refused, saying why.
            response = await client.post(f"/api/jobs/{job_id}/retry")
            assert response.status_code == 409
            assert "Sluice redacted a secret" in response.json()["error"]["message"]
    # Neither the database nor its write-ahead log holds it anywhere (the job's result,
    # an echo of its arguments, included).
    assert_nowhere_in(tmp_path, SECRET.encode())


def assert_nowhere_in(folder: Path, secret: bytes) -> None:
    files = list(folder.glob("sluice.db*"))
    assert files
    for path in files:
        assert secret not in path.read_bytes(), path


# -- sluice redact: a database filled before redaction was configured -----------------


def _celery_events(n: int, now: float) -> list[dict[str, Any]]:
    """What the SDK and -E send for ``n`` jobs, a secret in each (kwargs, the captured
    message, the result, and for the last an exception and its traceback)."""
    events: list[dict[str, Any]] = []
    for i in range(n):
        job, at = f"job-{i}", now + i
        kwargs = {"password": SECRET, "n": i}
        events += [
            {"type": "task-sent", "uuid": job, "hostname": "gen1@host", "timestamp": at,
             "name": "tests.echo", "args": "('bob',)", "kwargs": repr(kwargs),
             "sluice_message": {"args": ["bob"], "kwargs": kwargs, "redacted": False}},
            {"type": "task-received", "uuid": job, "hostname": "w1@host", "timestamp": at + 0.1,
             "name": "tests.echo", "args": "('bob',)", "kwargs": repr(kwargs), "retries": 0},
            {"type": "task-started", "uuid": job, "hostname": "w1@host", "timestamp": at + 0.2},
        ]
        if i < n - 1:
            events.append({"type": "task-succeeded", "uuid": job, "hostname": "w1@host",
                           "timestamp": at + 0.3, "result": repr({"api_key": SECRET})})
        else:
            events.append({"type": "task-failed", "uuid": job, "hostname": "w1@host",
                           "timestamp": at + 0.3, "exception": f"KeyError({{'token': '{SECRET}'}})",
                           "traceback": f"Traceback ...\nKeyError: {{'token': '{SECRET}'}}\n"})
    return events


async def _fill_without_redaction(url: str, n: int) -> None:
    """Events as a Sluice with no redaction rules stored them (--redact-keys '' ...)."""
    pm = PluginManager()
    pm.load(["celery"])
    pm.configure(Config(redact_keys=[], redact_patterns=[]))
    batch = RawBatch("celery/amqp", "test", [("x", orjson.dumps(_celery_events(n, 1.8e9)))], 0.0)
    normalized = pm.normalize(batch)
    assert normalized is not None and len(normalized.job_events) == 4 * n
    storage = open_storage(url)
    await storage.open()
    try:
        await storage.ingest(normalized.job_events, [])
        refused = json.dumps(job_event_to_json(normalized.job_events[0]), ensure_ascii=True)
        await storage.dead_letter([DeadLetter("job", refused, "a test", 1.8e9)])
    finally:
        await storage.aclose()


async def _matches(url: str, q: str) -> list[str]:
    storage = open_storage(url)
    await storage.open()
    try:
        return [job.id for job in (await storage.list_jobs(JobQuery(q=q))).jobs]
    finally:
        await storage.aclose()


def _stored(url: str) -> list[tuple[Any, ...]]:
    """Every row that may hold a job's values, the search index's included."""
    tables = ["jobs", "job_events", "dead_letters"]
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return [
                row
                for sql in [*(f"SELECT * FROM {t}" for t in tables), "SELECT rowid, * FROM job_search"]
                for row in conn.execute(f"{sql} ORDER BY 1, 2")
            ]
    with psycopg.connect(url) as pg:
        return [row for table in tables for row in pg.execute(f"SELECT * FROM {table} ORDER BY 1")]


def _redact(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["redact", *args]) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    return out


N_JOBS = 5


def test_sluice_redact_scrubs_a_database_filled_before_redaction(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    trio.run(_fill_without_redaction, db_url, N_JOBS)
    before = _stored(db_url)
    assert SECRET in repr(before)
    assert len(trio.run(_matches, db_url, SECRET)) == N_JOBS

    # A dry run says what it would change, and changes nothing.
    out = _redact(capsys, "--db", db_url, "--redact-batch", "2")
    assert f"jobs: {N_JOBS} read, would redact {N_JOBS}" in out
    assert f"events: {4 * N_JOBS} read, would redact {3 * N_JOBS}" in out
    assert "dead letters: 1 read, would redact 1" in out
    assert "nothing was changed" in out
    assert _stored(db_url) == before

    out = _redact(capsys, "--db", db_url, "--redact-batch", "2", "--apply")
    assert f"jobs: {N_JOBS} read, redacted {N_JOBS}" in out
    assert f"events: {4 * N_JOBS} read, redacted {3 * N_JOBS}" in out
    after = _stored(db_url)
    assert SECRET not in repr(after) and REDACTED in repr(after)
    assert len(after) == len(before)
    assert trio.run(_matches, db_url, SECRET) == []  # the search index forgot it too
    assert trio.run(_matches, db_url, "bob")  # and still finds the rest
    if db_url.startswith("sqlite"):
        assert_nowhere_in(Path(db_url.removeprefix("sqlite:///")).parent, SECRET.encode())
    else:
        assert "VACUUM FULL" in out  # what only the operator can do about old versions

    # Idempotent: a second run finds nothing more.
    out = _redact(capsys, "--db", db_url, "--apply")
    assert f"jobs: {N_JOBS} read, redacted 0" in out and "events: 20 read, redacted 0" in out
    assert _stored(db_url) == after


def test_sluice_redact_needs_rules(capsys: pytest.CaptureFixture[str], sqlite_url: str) -> None:
    assert main(["redact", "--db", sqlite_url, "--redact-keys", "", "--redact-patterns", ""]) == 2
    assert "no redaction rules" in capsys.readouterr().err

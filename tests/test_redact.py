"""Server-side redaction: a secret in a task's arguments never reaches the database."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from sluice_core.config import REDACT_KEYS, REDACT_PATTERNS
from sluice_core.model import JobEvent, JobState
from sluice_core.redact import REDACTED, Redactor
from tests.fixtures.celery_worker import CeleryWorker
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

"""A small real Celery app for the integration tests.

The worker subprocess (``celery -A tests.celery_app worker``) builds ``app``
from the environment set by tests/fixtures/celery_worker.py; the tests build a
client app with :func:`make_app` and the same settings. Task names are fixed
(``tests.add`` ...) so that tests can assert on them.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from celery import Celery, Task

ENV_BROKER = "SLUICE_TEST_CELERY_BROKER"
ENV_KEYPREFIX = "SLUICE_TEST_CELERY_KEYPREFIX"
ENV_QUEUE = "SLUICE_TEST_CELERY_QUEUE"
# A result backend URL (tests/test_reconcile.py): results are kept, extended, under the
# test's key prefix.
ENV_RESULT_BACKEND = "SLUICE_TEST_CELERY_RESULT_BACKEND"
# Set (to "1") by the SDK tests: the app sends no Celery events at all, and the
# Sluice SDK (configured by SLUICE_URL / SLUICE_API_KEY) reports everything.
ENV_SDK = "SLUICE_TEST_SDK"
# Set (to "0") for a worker without task events that is not the SDK's: what `celery
# worker` without -E sends (heartbeats only).
ENV_TASK_EVENTS = "SLUICE_TEST_CELERY_TASK_EVENTS"
# Redis's visibility timeout, in seconds: how soon a dead worker's messages come back.
ENV_VISIBILITY_TIMEOUT = "SLUICE_TEST_CELERY_VISIBILITY_TIMEOUT"
SDK_REDACT_KEYS = ["password"]


def make_app(
    broker: str,
    *,
    keyprefix: str = "",
    queue: str = "celery",
    events: bool = True,
    result_backend: str | None = None,
    visibility_timeout: float | None = None,
) -> Celery:
    app = Celery("sluice-tests", broker=broker, set_as_current=False)
    transport: dict[str, Any] = {"global_keyprefix": keyprefix} if keyprefix else {}
    if visibility_timeout is not None:
        # Restore what is due every second (kombu's default looks every 100 s).
        transport.update(visibility_timeout=visibility_timeout, unacked_restore_interval=1,
                         unacked_restore_throttle=1)
    app.conf.update(
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_default_queue=queue,
        # Producers announce what they publish (task-sent), workers what they do.
        task_send_sent_event=events,
        worker_send_task_events=events,
        # The tests read events, never results.
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    if result_backend:
        app.conf.update(
            result_backend=result_backend,
            task_ignore_result=False,
            result_extended=True,
            result_backend_transport_options={"global_keyprefix": keyprefix},
        )
    _register_tasks(app)
    return app


def _register_tasks(app: Celery) -> None:
    @app.task(name="tests.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="tests.fail")
    def fail(key: str) -> None:
        raise KeyError(key)

    @app.task(name="tests.flaky", bind=True, max_retries=None)
    def flaky(self: Task, succeed_on_attempt: int, countdown: float = 0.1) -> int:
        """Retries until its ``succeed_on_attempt``-th attempt (1 = the first), then succeeds."""
        attempt = self.request.retries + 1
        if attempt < succeed_on_attempt:
            raise self.retry(exc=RuntimeError(f"attempt {attempt} failed"), countdown=countdown)
        return attempt

    @app.task(name="tests.sleep")
    def sleep(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    @app.task(name="tests.sleep_late", acks_late=True)
    def sleep_late(seconds: float) -> float:
        """Acknowledged once it ends: a worker that dies running it leaves it to the broker."""
        time.sleep(seconds)
        return seconds

    @app.task(name="tests.kill_child")
    def kill_child() -> None:
        # The prefork pool child dies: the worker reports WorkerLostError.
        os.kill(os.getpid(), signal.SIGKILL)

    @app.task(name="tests.read_file")
    def read_file(path: str, *, strip: bool = False) -> str:
        """Fails until the file exists: a failure whose cause can be fixed, then retried."""
        with open(path) as f:
            text = f.read()
        return text.strip() if strip else text

    @app.task(name="tests.echo")
    def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"args": list(args), "kwargs": kwargs}


# The worker's app; importing this module from a test without the environment
# set gives a harmless app pointed at the default local Redis.
app = make_app(
    os.environ.get(ENV_BROKER, "redis://localhost:6379/0"),
    keyprefix=os.environ.get(ENV_KEYPREFIX, ""),
    queue=os.environ.get(ENV_QUEUE, "celery"),
    events=not os.environ.get(ENV_SDK) and os.environ.get(ENV_TASK_EVENTS) != "0",
    result_backend=os.environ.get(ENV_RESULT_BACKEND),
    visibility_timeout=float(os.environ[ENV_VISIBILITY_TIMEOUT])
    if ENV_VISIBILITY_TIMEOUT in os.environ
    else None,
)
# The SDK's own redaction in the worker (a comma list; empty: none, so that only the
# server's hides a secret). Default: SDK_REDACT_KEYS.
ENV_SDK_REDACT_KEYS = "SLUICE_TEST_SDK_REDACT_KEYS"
if os.environ.get(ENV_SDK):
    import sluice

    redact = os.environ.get(ENV_SDK_REDACT_KEYS, ",".join(SDK_REDACT_KEYS))
    sluice.init(redact_keys=[key for key in redact.split(",") if key])

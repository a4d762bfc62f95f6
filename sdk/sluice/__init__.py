"""Sluice SDK: send a Celery application's task events, with full arguments, to Sluice.

In the Celery application (the module the workers and the producers import)::

    import sluice
    sluice.init(url="https://sluice.example.com", api_key="sluice_...")

or set ``SLUICE_URL`` and ``SLUICE_API_KEY`` and call ``sluice.init()``. The
workers need no ``-E`` and no ``task_send_sent_event``: the SDK hooks Celery's
signals in every process (producers, the worker, its pool children).

It never raises into the application and never blocks a task: events go to a
bounded buffer that a background thread sends in batches; when the server is
unreachable and the buffer is full, new events are dropped and counted
(:func:`stats`).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
from typing import Iterable, Pattern

from sluice._celery import Hooks
from sluice._redact import Redactor
from sluice._transport import Transport

__version__ = "0.1.0"
__all__ = ["__version__", "flush", "init", "shutdown", "stats"]

log = logging.getLogger("sluice")

_hooks: Hooks | None = None


def init(
    url: str | None = None,
    api_key: str | None = None,
    *,
    redact_keys: Iterable[str] = (),
    redact_patterns: Iterable[str | Pattern[str]] = (),
    send_args: bool = True,
    flush_interval: float = 1.0,
    max_buffer: int = 10_000,
    timeout: float = 5.0,
) -> bool:
    """Start sending events; returns False (and logs why) if not configured.

    - ``url``: the Sluice server (env ``SLUICE_URL``); ``api_key``: a key from
      ``sluice keys create NAME`` on the server (env ``SLUICE_API_KEY``).
    - ``redact_keys``: argument names (and dict keys at any depth) whose values are
      replaced by ``"[redacted]"`` before anything leaves the process, e.g.
      ``["password", "card_number"]``; ``redact_patterns``: regular expressions
      searched in those names, e.g. ``["secret|token"]``. Sluice will not retry a
      job whose arguments were redacted (it would run with the placeholders).
    - ``send_args=False`` leaves arguments out entirely.
    - ``max_buffer``: events held while the server is away; past it, new ones are
      dropped and counted. ``flush_interval``: seconds between sends;
      ``timeout``: seconds one HTTP request may take.

    Calling it again replaces the previous configuration.
    """
    global _hooks
    url = url or os.environ.get("SLUICE_URL")
    api_key = api_key or os.environ.get("SLUICE_API_KEY")
    if not url or not api_key:
        log.warning(
            "sluice: not started: give url and api_key (or set SLUICE_URL and SLUICE_API_KEY)"
        )
        return False
    try:
        redactor = Redactor(redact_keys, redact_patterns)
    except re.error as exc:
        log.warning("sluice: not started: bad redact pattern: %s", exc)
        return False
    shutdown(timeout=0)
    transport = Transport(
        url, api_key, flush_interval=flush_interval, max_buffer=max_buffer, timeout=timeout
    )
    _hooks = Hooks(transport, redactor, send_args=send_args)
    _hooks.connect()
    return True


def flush(timeout: float = 5.0) -> bool:
    """Send what is buffered now; True if everything left within ``timeout`` seconds."""
    return _hooks is not None and _hooks.transport.flush(timeout)


def shutdown(timeout: float = 5.0) -> None:
    """Stop listening to Celery and send what is buffered (up to ``timeout`` seconds)."""
    global _hooks
    hooks, _hooks = _hooks, None
    if hooks is not None:
        hooks.disconnect()
        hooks.transport.close(timeout)


def stats() -> dict[str, int]:
    """This process's counts: events sent, dropped, still buffered; failed requests;
    errors inside the SDK's signal receivers (swallowed, never raised)."""
    if _hooks is None:
        return {"sent": 0, "dropped": 0, "buffered": 0, "failed_requests": 0, "errors": 0}
    transport = _hooks.transport
    return {
        "sent": transport.sent,
        "dropped": transport.dropped,
        "buffered": transport.buffered,
        "failed_requests": transport.failed_requests,
        "errors": _hooks.errors,
    }


def _after_fork_in_child() -> None:
    if _hooks is not None:
        _hooks.transport.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(lambda: flush(timeout=2.0))

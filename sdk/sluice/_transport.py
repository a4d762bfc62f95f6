"""Batching events and posting them to Sluice's ingest endpoint, in a background thread.

The application's threads only encode an event and append it to a bounded
buffer (a lock held for an append); everything that can wait, fail or time out
happens in one daemon thread. A batch leaves the buffer only once the server
has answered for it: until then it is sent again, the same bytes, and the
server's idempotent ingest stores it once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from typing import Any

log = logging.getLogger("sluice")

USER_AGENT = "sluice-sdk/0.1"
# Each request stays well under the server's 1 MiB body and 10,000 events.
BATCH_BYTES = 512 * 1024
BATCH_EVENTS = 1_000
MAX_EVENT_BYTES = 256 * 1024
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
REFUSED_BACKOFF = 60.0  # a refused key will not become valid by retrying fast


class Transport:
    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        flush_interval: float = 1.0,
        max_buffer: int = 10_000,
        timeout: float = 5.0,
    ) -> None:
        self.endpoint = url.rstrip("/") + "/api/ingest"
        self._api_key = api_key
        self._flush_interval = flush_interval
        self._max_buffer = max_buffer
        self._timeout = timeout
        self.sent = 0
        self.dropped = 0
        self.failed_requests = 0
        self.after_fork()

    def after_fork(self) -> None:
        """Start afresh in a forked child (Celery's prefork pool): it inherits the buffer
        (the parent sends that) but not the thread, and maybe a lock that a thread which
        no longer exists was holding."""
        self._lock = threading.Lock()
        self._buffer: deque[str] = deque()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    # -- the application's side: never blocks, never raises -------------------------

    def emit(self, event: dict[str, Any]) -> None:
        text = _encode(event)
        if text is None:
            self._count_drop(1, "an event could not be encoded")
            return
        with self._lock:
            if len(self._buffer) >= self._max_buffer or self._closed.is_set():
                self.dropped += 1
                return
            self._buffer.append(text)
            full = len(self._buffer) >= BATCH_EVENTS
        if self._thread is None or self._pid != os.getpid():
            self._start()
        if full:
            self._wake.set()

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None and self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="sluice-sdk", daemon=True)
            self._thread.start()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def flush(self, timeout: float) -> bool:
        """Send what is buffered; True if it all left within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self._buffer and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._buffer

    def close(self, timeout: float) -> None:
        self.flush(timeout)
        self._closed.set()
        self._wake.set()

    def _count_drop(self, n: int, why: str) -> None:
        with self._lock:
            self.dropped += n
        log.warning("sluice: dropped %d events: %s", n, why)

    # -- the background thread -----------------------------------------------------------

    def _run(self) -> None:
        backoff: float | None = None
        while not self._closed.is_set():
            if backoff is None:
                self._wake.wait(self._flush_interval)
                self._wake.clear()
            else:
                # Only closing cuts a backoff short: a full buffer must not hammer a server
                # that is away.
                self._closed.wait(backoff)
            backoff = self._send_all(backoff)

    def _send_all(self, backoff: float | None) -> float | None:
        """Send batches until the buffer is empty (None) or the server is away (the next
        backoff)."""
        while True:
            with self._lock:
                batch = _take(self._buffer)
            if not batch:
                return None
            outcome = self._post(batch)
            if isinstance(outcome, float):
                self.failed_requests += 1
                grown = BACKOFF_FIRST if backoff is None else min(backoff * 2, BACKOFF_MAX)
                return max(outcome, grown)
            with self._lock:
                for _ in batch:
                    self._buffer.popleft()
                if outcome == "sent":
                    self.sent += len(batch)
                else:
                    self.dropped += len(batch)

    def _post(self, batch: list[str]) -> str | float:
        """``"sent"``, ``"refused"`` (the batch itself is wrong: resending cannot help),
        or the least seconds to wait before sending it again."""
        body = ('{"format":"celery","events":[' + ",".join(batch) + "]}").encode()
        request = urllib.request.Request(
            self.endpoint,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Authorization": "Bearer " + self._api_key,
                "User-Agent": USER_AGENT,
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                response.read()
            return "sent"
        except urllib.error.HTTPError as exc:
            status, detail = exc.code, _error_message(exc)
            if status in (401, 403):
                log.error(
                    "sluice: %s refused the API key (%d: %s); events are held, then dropped",
                    self.endpoint,
                    status,
                    detail,
                )
                return REFUSED_BACKOFF
            if status in (400, 413, 422):
                log.error(
                    "sluice: %s refused %d events (%d: %s)",
                    self.endpoint,
                    len(batch),
                    status,
                    detail,
                )
                return "refused"
            retry_after = exc.headers.get("Retry-After") if exc.headers else None
            try:
                return min(float(retry_after), BACKOFF_MAX) if retry_after else 0.0
            except ValueError:
                return 0.0
        except (OSError, ValueError) as exc:  # URLError, timeouts, connection resets
            log.warning("sluice: cannot reach %s (%s); events are held", self.endpoint, exc)
            return 0.0


def _take(buffer: deque[str]) -> list[str]:
    """The oldest events, as many as fit in one request."""
    batch: list[str] = []
    size = 0
    for text in buffer:
        if batch and (len(batch) >= BATCH_EVENTS or size + len(text) > BATCH_BYTES):
            break
        batch.append(text)
        size += len(text) + 1
    return batch


def _encode(event: dict[str, Any]) -> str | None:
    """JSON text of an event; the full message is left out if it is not JSON or too big
    (the server then knows the arguments only as the display repr)."""
    for attempt in (event, {k: v for k, v in event.items() if k != "sluice_message"}):
        try:
            text = json.dumps(attempt, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            continue
        if len(text) <= MAX_EVENT_BYTES:
            return text
    return None


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"]["message"])
    except Exception:
        return exc.reason if isinstance(exc.reason, str) else str(exc)

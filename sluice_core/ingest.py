"""Events pushed to Sluice (the SDK, remote agents, a framework's own format): the door.

:class:`IngestService` checks a sender's API key, decodes a batch by its ``format``
(a framework's, declared by its plugin through ``Framework.pushed_formats`` and read by
its normalizer; or Sluice's own normalized events, as an agent sends them), checks and
stamps every event, and stores it: :meth:`IngestService.store` returns once the events
are stored, because a sender drops what is acknowledged. The web's ingest endpoints
(``web/ingest.py``) are HTTP and WebSocket framing around it.

What it refuses it raises as an :class:`IngestRefused`, whose ``code`` the API answers
with; what was malformed is counted in sluice_events_malformed_total either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar, Final

import orjson
import trio

from sluice_core.actions import mark_pushed
from sluice_core.frameworks import Frameworks
from sluice_core.metrics import Metrics
from sluice_core.model import JobEvent, Normalized, RawBatch, WorkerEvent
from sluice_core.pipeline import Pipeline
from sluice_core.serialize import job_event_from_json, worker_event_from_json
from sluice_core.storage import ApiKey, Storage
from sluice_core.validate import MALFORMED

log = logging.getLogger(__name__)

MAX_EVENTS: Final = 10_000  # per batch (a request, or a streamed message)
STORE_TIMEOUT: Final = 30.0  # seconds to wait for storage before telling the sender to resend
# Besides the formats frameworks declare (Framework.pushed_formats, e.g. the SDK's
# "celery"), Sluice's own: normalized events, as an agent sends them.
NORMALIZED_FORMAT: Final = "sluice"


class IngestRefused(Exception):
    """A batch not taken, and why; ``code`` is the API's error code for it."""

    code: ClassVar[str] = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Malformed(IngestRefused):
    """A batch Sluice cannot read or refuses; ``count`` is what it adds to
    sluice_events_malformed_total when raised before the batch's events were counted."""

    def __init__(self, message: str, *, count: int = 1) -> None:
        super().__init__(message)
        self.count = count


class TooManyEvents(IngestRefused):
    code = "too_many_events"


class Unavailable(IngestRefused):
    """Not taken now (the database is away, the buffer is full, Sluice is stopping):
    the sender keeps the batch and sends it again later."""

    code = "unavailable"


def source_of(key: ApiKey) -> str:
    """The label of this key's events in metrics and logs."""
    return f"ingest/{key.name}"


class IngestService:
    def __init__(
        self,
        *,
        storage: Storage,
        pipeline: Pipeline,
        metrics: Metrics,
        frameworks: Frameworks,
        normalize: Callable[[RawBatch], Normalized | None],
        admit: Callable[[Normalized], Normalized],
    ) -> None:
        self._storage = storage
        self._pipeline = pipeline
        self._metrics = metrics
        self._frameworks = frameworks
        self._normalize_batch = normalize
        self._admit = admit

    async def authenticate(self, token: str) -> ApiKey | None:
        """The active API key ``token`` is, or None."""
        try:
            return await self._storage.check_api_key(token)
        except Exception as exc:  # any driver error: the sender keeps its events, retries
            log.warning("cannot check an API key: %s", exc)
            raise Unavailable(
                "cannot check the API key now (the database is unreachable): retry later"
            ) from None

    def parse(self, key: ApiKey, data: str | bytes) -> Any:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            self._metrics.events_malformed.labels(source_of(key), MALFORMED).inc()
            raise Malformed(f"not valid JSON ({exc})") from None

    def decode(self, key: ApiKey, body: Any) -> tuple[list[JobEvent], list[WorkerEvent]]:
        """The events of one batch (a parsed JSON body), their values checked
        (:mod:`sluice_core.validate`: some may be corrected), or :class:`Malformed` if any
        is not an event or is refused: then none of them is taken. Either way what was
        wrong is counted in sluice_events_malformed_total, by reason.
        Each job event is stamped with the key, over anything the sender claimed: an
        action never takes a pushed event for a broker's word (sluice_core.actions)."""
        try:
            normalized, sent = self._decode(key, body)
        except Malformed as exc:
            self._metrics.events_malformed.labels(source_of(key), MALFORMED).inc(exc.count)
            raise
        self._metrics.observe_normalized(source_of(key), normalized)
        if normalized.malformed:
            # The normalizer logged why (rate-limited); the sender's bug is in the count.
            raise Malformed(
                f"{normalized.malformed} of {sent} events are malformed (not events of"
                f" format {body.get('format')!r} as its plugin reads them; Sluice's log says"
                " why); nothing was stored"
            )
        if normalized.rejected:
            raise Malformed(
                f"{sum(normalized.rejected.values())} of {sent} events refused"
                f" ({'; '.join(normalized.problems[:3])}); nothing was stored"
            )
        return mark_pushed(normalized.job_events, key.name), normalized.worker_events

    def _decode(self, key: ApiKey, body: Any) -> tuple[Normalized, int]:
        """The batch's events, checked, and how many the sender sent."""
        if type(body) is not dict:
            raise Malformed("expected a JSON object with a format and its events")
        fmt = body.get("format")
        formats = self._frameworks.pushed_formats()
        if fmt in formats:
            events = body.get("events")
            if type(events) is not list:
                raise Malformed(f'format {fmt!r}: "events" must be a list of event objects')
            _check_count(len(events))
            return self._normalize(key, formats[fmt], events), len(events)
        if fmt == NORMALIZED_FORMAT:
            job_events, worker_events = body.get("job_events", []), body.get("worker_events", [])
            if type(job_events) is not list or type(worker_events) is not list:
                raise Malformed('"job_events" and "worker_events" must be lists')
            _check_count(len(job_events) + len(worker_events))
            # The door a framework's events pass in its normalizer (PluginManager.normalize).
            normalized = self._admit(
                Normalized(
                    _parse("job_events", job_events, job_event_from_json),
                    _parse("worker_events", worker_events, worker_event_from_json),
                )
            )
            return normalized, len(job_events) + len(worker_events)
        known = ", ".join(repr(f) for f in [*formats, NORMALIZED_FORMAT])
        raise Malformed(
            f"unknown format {fmt!r} (accepted: {known}; a framework's plugin, loaded with"
            " --plugin, adds its own)"
        )

    def _normalize(self, key: ApiKey, kind: str, events: list[Any]) -> Normalized:
        batch = RawBatch(kind, source_of(key), [("ingest", orjson.dumps(events))], time.time())
        result = self._normalize_batch(batch)
        if result is None:
            raise IngestRefused(
                f"this Sluice reads no {kind!r} events: start it with the plugin for them"
                " (--plugin NAME)"
            )
        return result

    async def store(
        self, key: ApiKey, job_events: list[JobEvent], worker_events: list[WorkerEvent]
    ) -> None:
        """Hand the events to the pipeline and return once they are stored."""
        n = len(job_events) + len(worker_events)
        self._metrics.messages_received.labels(source_of(key)).inc(n)
        stored = trio.Event()
        if not self._pipeline.offer(job_events, worker_events, stored):
            raise Unavailable(
                "Sluice cannot take events now (its buffer is full or it is stopping):"
                " send them again later"
            )
        with trio.move_on_after(STORE_TIMEOUT):
            await stored.wait()
            return
        raise Unavailable(
            f"the events were not stored within {STORE_TIMEOUT:g}s (is the database slow"
            " or away?): send them again (sending twice stores nothing twice)"
        )


def _check_count(n: int) -> None:
    if n > MAX_EVENTS:
        raise TooManyEvents(
            f"{n} events in one batch: the limit is {MAX_EVENTS}; send smaller batches"
        )


def _parse[T](what: str, items: list[Any], parse: Callable[[Any], T]) -> list[T]:
    out = []
    for i, item in enumerate(items):
        try:
            out.append(parse(item))
        except ValueError as exc:
            raise Malformed(f"{what}[{i}]: {exc}; nothing was stored", count=len(items)) from None
    return out

"""Health: what ``/healthz`` answers, for load balancers, probes and people.

The answer comes within HEALTH_TIMEOUT whatever the database does; a check of one
part never blocks another's.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from sluice_core.pipeline import WriteHealth
from sluice_core.serialize import iso

if TYPE_CHECKING:
    from sluice_core.engine import Engine

log = logging.getLogger(__name__)

# /healthz answers within HEALTH_TIMEOUT seconds (what probes commonly allow), whatever
# the database does: its questions to it share one deadline, HEALTH_CHECK_S, and the
# rest is a margin for the answer itself.
HEALTH_TIMEOUT = 5.0
HEALTH_CHECK_S = HEALTH_TIMEOUT - 0.5
# Writes are down once they have failed this long with none succeeding: a write that
# fails once (a deadlock, a failover) is retried within a second or two, and should not
# flap the status.
WRITES_FAILING_S = 10.0
# ... or once an event read this long ago is still not stored: writes that neither fail
# nor finish (a database that hangs), or writers far behind. The dashboard is then that
# far in the past.
UNSTORED_AGE_S = 60.0


async def check(engine: Engine) -> tuple[dict[str, Any], bool]:
    """``/healthz``'s answer, and whether all is well: the database answers, writes
    succeed and every source is up (200), or not (503).

    Answers within HEALTH_TIMEOUT, whatever the database does: one deadline for all
    its questions to it (HEALTH_CHECK_S). ``writes`` (:func:`writes_health`) is down
    once writes have failed for WRITES_FAILING_S, or an event read UNSTORED_AGE_S ago
    is not stored. ``sources`` has each configured source; with no broker at all,
    ``ingest`` (the SDK, remote agents), up while an API key exists: the ingest endpoint
    takes nothing else, so without one nothing can send events. A web replica has no
    sources (its agents read the brokers). The body is public (no auth on /healthz):
    error messages go to the log only.
    """
    storage: dict[str, Any] = {"up": True, "url": engine.storage.url, "detail": ""}
    # A web replica reads no source of its own: the agents do, and answer for them.
    ingest_only = not engine.sources and not engine.config.brokers and not engine.replica
    keys: bool | None = None  # whether an active API key exists; None: not known
    with trio.move_on_after(HEALTH_CHECK_S) as deadline:
        try:
            await engine.storage.ping()
            if ingest_only:
                listed = await engine.storage.list_api_keys()
                keys = any(key.revoked_at is None for key in listed)
        except Exception as exc:
            log.warning("health check: storage ping failed: %s", exc)
            storage.update(up=False, detail=f"unreachable ({type(exc).__name__})")
    if deadline.cancelled_caught:
        log.warning("health check: the database did not answer within %gs", HEALTH_CHECK_S)
        storage.update(up=False, detail=f"no answer within {HEALTH_CHECK_S:g}s")
    sources: dict[str, dict[str, Any]] = {}
    for source in engine.sources:
        sources[source.name] = {
            "up": False,
            "detail": "not connected yet",
            "since": iso(engine.started_at),
        }
    for name, status in engine.pipeline.sources.items():
        sources[name] = {"up": status.up, "detail": status.detail, "since": iso(status.since)}
    if engine.config.brokers and not engine.sources and not engine.replica:
        # Brokers were asked for and nothing reads them: never "ok".
        sources["brokers"] = {
            "up": False,
            "detail": "no loaded plugin watches the configured brokers",
            "since": iso(engine.started_at),
        }
    if ingest_only:
        sources["ingest"] = {"up": bool(keys), "detail": _ingest_detail(keys)}
    writes = writes_health(engine.pipeline.writes, time.time())
    messages, spooled = engine.pipeline.backlog()
    healthy = storage["up"] and writes["up"] and all(status["up"] for status in sources.values())
    body = {
        "status": "ok" if healthy else "down",
        "storage": storage,
        "writes": writes,
        "backlog": {"messages": messages, "spooled_bytes": spooled},
        "sources": sources,
        # Whether this process runs the singleton duties; in an HA pair, one of two does.
        "leader": engine.leadership.leading,
    }
    return body, healthy


def writes_health(writes: WriteHealth, now: float) -> dict[str, Any]:
    """The writers as /healthz shows them at ``now``: down once writes have failed for
    more than WRITES_FAILING_S (saying why when the database refuses every write: disk
    full, read-only, no permission; ``refused``), or an event a writer holds was read
    more than UNSTORED_AGE_S ago. (Behind the reader process, an event counts as read when it
    reaches the engine: its backlog is ``backlog``, and sluice_buffered_messages.)"""
    oldest = writes.oldest_unstored
    age = None if oldest is None else max(0.0, now - oldest)
    failing = None if writes.failing_since is None else now - writes.failing_since
    detail = ""
    if failing is not None and failing > WRITES_FAILING_S:
        detail = f"writes have failed for {failing:.0f}s" + (
            f": the database refuses writes: {writes.refused}" if writes.refused else ""
        )
    elif age is not None and age > UNSTORED_AGE_S:
        detail = f"an event read {age:.0f}s ago is not stored yet"
    return {
        "up": not detail,
        "detail": detail,
        "last_ok": iso(writes.last_ok),
        "failing_since": iso(writes.failing_since),
        "error": writes.error,
        "refused": writes.refused,
        "oldest_unstored_s": None if age is None else round(age, 3),
    }


def _ingest_detail(keys: bool | None) -> str:
    if keys:
        return "no broker configured: events come through the ingest endpoint (the SDK, agents)"
    if keys is None:
        return "no broker configured; whether an API key exists is unknown (database away)"
    return (
        "no broker configured and no API key for the ingest endpoint: nothing can send"
        " events (give --broker, or create a key: sluice keys create NAME)"
    )

"""What the core needs to know of a job framework, declared by its plugin (docs/plugins.md).

The core judges workers and jobs of any framework, but some facts belong to one:
how often its workers send heartbeats when they do not say, what a user does
about a worker whose job events do not reach Sluice, in which formats its events
may be pushed to the ingest endpoint, and when its broker gives back a job a dead
worker held. A plugin registers a :class:`Framework` for each framework it serves
(hook ``sluice_frameworks``); a framework no plugin declared gets the defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import attrs

from sluice_core.model import Worker

# A worker that does not say how often it beats, of a framework that does not say
# either: long enough not to call a live worker offline.
HEARTBEAT_S = 30.0
JOB_EVENTS_ADVICE = "configure the worker to send its job events to Sluice"
SETUP_ADVICE = "make its workers and producers send their events to a broker Sluice reads"


def unknown_redelivery(broker: str | None, taken_at: float | None, *, stopped: bool) -> str:
    return "the broker may give it back to another worker if it was not acknowledged"


@attrs.frozen
class Framework:
    name: str
    heartbeat_s: float = HEARTBEAT_S  # between a worker's heartbeats, when it does not say
    # What to do about a worker whose job events do not reach Sluice (shown with it).
    job_events_advice: str = JOB_EVENTS_ADVICE
    # What makes jobs appear at all: shown while none has.
    setup_advice: str = SETUP_ADVICE
    # An ingest batch's ``format`` -> the RawBatch kind this framework's normalizer reads.
    pushed_formats: Mapping[str, str] = attrs.field(factory=dict)
    # When the broker at ``broker`` gives back a job a dead (or ``stopped``) worker
    # had taken at ``taken_at`` and not started: said to the user, who waits for it.
    redelivery: Callable[..., str] = unknown_redelivery
    # When a job that had started on a worker that died comes back all the same
    # (Celery: "its task acknowledges late (acks_late)"); None: never, it is lost.
    started_redelivered_if: str | None = None


class Frameworks:
    """The declared frameworks, by name; any other gets the defaults."""

    def __init__(self, declared: Iterable[Framework] = ()) -> None:
        self._by_name = {framework.name: framework for framework in declared}

    def declared(self) -> list[Framework]:
        return list(self._by_name.values())

    def get(self, name: str) -> Framework:
        return self._by_name.get(name) or Framework(name)

    def advice(self, worker: Worker) -> str:
        """What to do about ``worker`` if its job events do not reach Sluice."""
        return self.get(worker.framework).job_events_advice

    def pushed_formats(self) -> dict[str, str]:
        return {
            fmt: kind
            for framework in self._by_name.values()
            for fmt, kind in framework.pushed_formats.items()
        }

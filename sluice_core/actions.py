"""Actions on jobs (retry, revoke): what a handler is, and how it reports back.

Who may decide what a retry publishes: a job's facts come from Sluice's own
sources (a broker's event stream it reads itself, its monitors, its own
actions) and from pushed sources (the ingest endpoints, where anyone holding an
API key, an *ingest-only* credential, sends whatever events it likes). The
ingest endpoints stamp every event they take with the key (:func:`mark_pushed`),
so that a handler can tell the two apart (:func:`own_events`) and re-publish
only what the target broker itself showed (see :class:`PlansRetry`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final, Protocol, runtime_checkable

import attrs

from sluice_core.model import Job, JobEvent

# The key of ``JobEvent.extra`` naming the API key an event was pushed with. The
# ingest endpoints set it on every event they take, over whatever the sender put
# there; Sluice's own events never have it.
PUSHED_BY: Final = "pushed_by"


def mark_pushed(events: Iterable[JobEvent], key_name: str) -> list[JobEvent]:
    """``events`` as taken from a pushed source, the API key ``key_name``.

    Stamped in place: the events were just decoded from the request, so their extras
    are theirs alone (or shared within the batch, which gets one stamp), and a copy
    of each event would cost as much again as decoding it.
    """
    out = list(events)
    for event in out:
        event.extra[PUSHED_BY] = key_name
    return out


def pushed_by(event: JobEvent) -> str | None:
    """The name of the API key ``event`` was pushed with; None for Sluice's own events."""
    key = event.extra.get(PUSHED_BY)
    # Any value at all means pushed: the stamp is never absent from a pushed event.
    return None if key is None else str(key)


def own_events(timeline: Iterable[JobEvent]) -> list[JobEvent]:
    """The events Sluice read or made itself: what a broker really showed of a job."""
    return [event for event in timeline if PUSHED_BY not in event.extra]


class ActionRefused(Exception):
    """The action cannot be done faithfully; the message says why and what to do.

    The API answers 409 with it (e.g. retrying a job whose arguments are only
    known as a truncated repr).
    """


@attrs.frozen
class RetryPlan:
    """What a retry will publish, checked, for the user to confirm (the job page's dialog,
    ``GET /api/jobs/{id}/retry``) and for the handler to publish as shown."""

    job_id: str  # the job re-run
    name: str  # the job name the new job runs as
    queue: str  # where it goes, in the broker's terms
    target: str  # the broker, its URL without credentials
    arguments: str  # a short summary of the arguments
    arguments_from: str  # where they come from, for a user ("the SDK's capture, pushed ...")
    details: tuple[str, ...] = ()  # anything else that shapes the run (priority, headers ...)
    # Recorded on the new job's ``queued`` event: where it was published, in the
    # framework's own terms, so that a retry of the new job is confirmed by it.
    record: dict[str, Any] = attrs.field(factory=dict)
    message: object = attrs.field(default=None, eq=False, repr=False)  # the handler's own

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "queue": self.queue,
            "broker": self.target,
            "arguments": self.arguments,
            "arguments_from": self.arguments_from,
            "details": list(self.details),
        }


@attrs.frozen
class ActionResult:
    job_id: str
    action: str  # "retry" or "revoke"
    new_job_id: str | None = None  # the new job's id, for a retry
    published: RetryPlan | None = None  # what a planned retry published


class ActionHandler(Protocol):
    framework: str

    def handles(self, job: Job) -> bool:
        """True if this handler can act on ``job`` (its framework and broker)."""

    async def retry(self, job: Job) -> ActionResult:
        """Re-run ``job`` with its original arguments as a new job. Raise ActionRefused.
        Not called for a handler that is also :class:`PlansRetry`."""

    async def revoke(self, job: Job, *, terminate: bool, signal: str) -> ActionResult:
        """Ask the workers to discard ``job`` (and kill it if ``terminate``)."""


@runtime_checkable
class RevokesMany(Protocol):
    """Optional for a handler: revoke several jobs with one broker message.

    A bulk revoke uses it, when the handler has it, for all the jobs it handles.
    """

    async def revoke_many(
        self, jobs: list[Job], *, terminate: bool, signal: str
    ) -> list[ActionResult]:
        """Like ``revoke`` for each job, at once; one result per job, in order."""


@runtime_checkable
class PlansRetry(Protocol):
    """Optional for a handler, and the way Sluice retries through one that has it: a
    retry in two steps, so that what the user confirms is what gets published, and
    so that the handler can check it against the job's timeline first.

    A handler that publishes re-runs itself (Celery's) must re-publish only what the
    target broker showed of the job in its own events (:func:`own_events`): pushed
    events (the SDK's, an agent's, anyone's with an API key) may supply arguments,
    never the job name or where it goes. Otherwise an ingest key could make Sluice
    publish a job of its choosing.
    """

    async def plan_retry(self, job: Job, timeline: Sequence[JobEvent]) -> RetryPlan:
        """What retrying ``job`` would publish; ``timeline`` is its stored events.
        Raise ActionRefused, saying what would have been published and why not."""

    async def publish(self, plan: RetryPlan) -> ActionResult:
        """Publish what ``plan_retry`` planned, as it is (with ``published=plan``)."""

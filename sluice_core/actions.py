"""Actions on jobs (retry, revoke): what a handler is, and how it reports back.

Who may decide what a retry publishes: a job's facts come from Sluice's own
sources (a broker's event stream it reads itself, its monitors, its own
actions) and from pushed sources (the ingest endpoints, where anyone holding an
API key, an *ingest-only* credential, sends whatever events it likes). The
ingest endpoints stamp every event they take with the key (:func:`mark_pushed`),
so that a handler can tell the two apart (:func:`own_events`) and re-publish
only what the target broker itself showed (see :class:`PlansRetry`).

Where a job lives (:func:`locations`): the broker whose events showed it, and, for a
job a remote agent streamed, that agent. Its actions go there and nowhere else: an
agent's job is acted on by the agent, down its own connection (:mod:`sluice_core.remote`).
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
# The key of ``JobEvent.extra`` naming the broker (its URL, password redacted) that
# carried a job, on the events that show where the job was sent or taken from (a
# normalizer sets it on what a broker source read) and on Sluice's own record of a
# retry it published.
BROKER: Final = "broker"
# The key of ``JobEvent.extra``, on Sluice's own record of a retry, naming the agent
# (its API key) that published it: the new job lives behind that agent.
AGENT: Final = "agent"


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
    """The events Sluice read or made itself about its own brokers: what a broker really
    showed of a job. Not pushed ones, nor Sluice's records of what an agent did on its."""
    return [event for event in timeline if _agent_of(event) is None]


def _agent_of(event: JobEvent) -> str | None:
    """Whose broker an event speaks for: the agent that pushed it, or that Sluice's own
    record names; None for a broker Sluice reads itself."""
    if PUSHED_BY in event.extra:
        return pushed_by(event)
    agent = event.extra.get(AGENT)
    return agent if isinstance(agent, str) else None


@attrs.frozen(order=True)
class Location:
    """Where a job lives: a broker, read by Sluice itself (``agent`` None) or by the
    remote agent whose API key is ``agent``. Two agents' brokers with the same URL are
    two locations: clusters often name their brokers alike."""

    broker: str
    agent: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"broker": self.broker, "agent": self.agent}


def locations(timeline: Iterable[JobEvent]) -> list[Location]:
    """Every location the job's events give it, sorted, Sluice's own brokers first.

    An event pushed with an API key speaks only for that key's brokers, whatever it
    claims: an ingest key cannot move a job to a broker Sluice reads, nor to another
    agent."""
    found = set()
    for event in timeline:
        broker = event.extra.get(BROKER)
        if isinstance(broker, str):
            found.add(Location(broker, _agent_of(event)))
    return sorted(found, key=lambda where: (where.agent is not None, where))


def lives_at(timeline: Iterable[JobEvent]) -> Location | None:
    """Where the job lives, as the API and the dashboard show it; None: not known."""
    return next(iter(locations(timeline)), None)


def behind_agents(timeline: Iterable[JobEvent]) -> list[Location]:
    """The agents' locations of a job that lives behind remote agents only; [] for a job
    on a broker Sluice reads itself (its own events win), or whose location is unknown."""
    found = locations(timeline)
    return [] if not found or found[0].agent is None else found


def as_seen_by(agent: str, timeline: Iterable[JobEvent]) -> list[JobEvent]:
    """The timeline as ``agent`` must judge it (:func:`own_events` on the agent): what
    it pushed, and Sluice's records of what it published, are its brokers' own word;
    what anyone else pushed or published stays theirs. Copies: the events themselves
    are left as they are."""
    return [
        attrs.evolve(
            event,
            extra={k: v for k, v in event.extra.items() if k not in (PUSHED_BY, AGENT)},
        )
        if _agent_of(event) == agent
        else event
        for event in timeline
    ]


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
    agent: str | None = None  # the remote agent that publishes it; None: Sluice itself

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "queue": self.queue,
            "broker": self.target,
            "agent": self.agent,
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
    # For a revoke: per broker it went out on, how many workers heard it (None: the
    # broker does not say; RabbitMQ only confirms that at least one did).
    heard_by: dict[str, int | None] = attrs.field(factory=dict)
    agent: str | None = None  # the remote agent that did it; None: Sluice itself


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

"""Actions on jobs: what a handler offers (its declared actions and their options),
how it reports back, and what the web asks of them (:class:`ActionService`).

A framework's plugin declares its actions on its handler (:class:`ActionSpec`, each
option an :class:`ActionOption` that parses what a user sent). The core knows two
names: ``retry`` makes a new job, linked both ways to the old one (``retry_of`` /
``retried_as``), and may be planned first (:class:`PlansRetry`); ``revoke`` is refused
on a finished job. Any other name is the plugin's own, done by
:meth:`ActionHandler.perform` like these two.

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

from collections.abc import Callable, Iterable, Mapping, Sequence
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
    action: str  # the declared action's name
    new_job_id: str | None = None  # the new job's id, for a retry
    published: RetryPlan | None = None  # what a planned retry published
    # For a revoke: per broker it went out on, how many workers heard it (None: the
    # broker does not say; RabbitMQ only confirms that at least one did).
    heard_by: dict[str, int | None] = attrs.field(factory=dict)
    agent: str | None = None  # the remote agent that did it; None: Sluice itself


# -- what a handler offers -----------------------------------------------------------

# The actions the core knows the meaning of (see the module's docstring).
RETRY: Final = "retry"
REVOKE: Final = "revoke"


class InvalidOptions(ValueError):
    """Options that an action's declaration does not accept; the message says which and
    why, for the user (the API's 400). ``unknown`` names the fields no option declares,
    ``accepted`` the ones it does."""

    def __init__(
        self, message: str, *, unknown: Sequence[str] = (), accepted: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.unknown = tuple(unknown)
        self.accepted = tuple(accepted)


def parse_boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def parse_string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def parse_integer(value: Any) -> int:
    if type(value) is not int:
        raise ValueError("expected a whole number")
    return value


def parse_number(value: Any) -> float:
    if type(value) not in (int, float):
        raise ValueError("expected a number")
    return float(value)


# An option's type, as the API lists it, and how a value of it is checked when its
# plugin says nothing more (an agent's declaration, read from the wire).
PARSERS: Final[Mapping[str, Callable[[Any], Any]]] = {
    "boolean": parse_boolean,
    "string": parse_string,
    "integer": parse_integer,
    "number": parse_number,
}


@attrs.frozen
class ActionOption:
    """One option of an action: its name in the request body, its JSON type (for the
    API's list and the dashboard's form: "boolean", "string", "integer", "number"), its
    value when not sent, and ``parse``, which turns what the user sent into what the
    handler gets, or raises ValueError saying what is wrong (the option's name is
    put before it)."""

    name: str
    type: str
    default: Any
    help: str = ""
    parse: Callable[[Any], Any] = attrs.field(
        default=attrs.Factory(lambda self: PARSERS.get(self.type, _as_sent), takes_self=True),
        eq=False,
        repr=False,
    )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "default": self.default, "help": self.help}


def _as_sent(value: Any) -> Any:
    return value


def boolean_option(name: str, *, default: bool = False, help: str = "") -> ActionOption:
    """A true/false option (``"terminate": true``)."""
    return ActionOption(name, "boolean", default, help, parse_boolean)


def string_option(
    name: str, *, default: str, help: str = "", parse: Callable[[Any], Any] | None = None
) -> ActionOption:
    """A string option; ``parse`` checks (and may normalise) it further."""
    return ActionOption(name, "string", default, help, parse or parse_string)


@attrs.frozen
class ActionSpec:
    """An action a handler offers: its ``name`` (the API's ``/api/jobs/{id}/{name}`` and
    a bulk action's ``action``), a ``title`` for its button, ``help`` saying what it does
    (the dashboard's confirmation, the API's list), and its options."""

    name: str
    title: str
    help: str = ""
    options: tuple[ActionOption, ...] = ()

    def parse(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every option's value: parsed from ``given``, or its default. InvalidOptions for
        a field no option declares, or a value its option refuses."""
        accepted = [option.name for option in self.options]
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            raise InvalidOptions(
                f"unknown field {', '.join(map(repr, unknown))}"
                f" (accepted: {', '.join(accepted) or 'none'})",
                unknown=unknown,
                accepted=accepted,
            )
        parsed = {}
        for option in self.options:
            if option.name not in given:
                parsed[option.name] = option.default
                continue
            try:
                parsed[option.name] = option.parse(given[option.name])
            except ValueError as exc:
                raise InvalidOptions(f"{option.name}: {exc}", accepted=accepted) from None
        return parsed

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "help": self.help,
            "options": [option.to_dict() for option in self.options],
        }

    @classmethod
    def from_dict(cls, data: Any) -> ActionSpec:
        """A declaration as :meth:`to_dict` wrote it (an agent's, over the wire): its
        options checked by their type only. ValueError if it is not one."""
        if type(data) is not dict or not all(
            type(data.get(key)) is str for key in ("name", "title", "help")
        ):
            raise ValueError("an action is a JSON object with a name, title and help")
        options = data.get("options", [])
        if type(options) is not list or not all(
            type(o) is dict and type(o.get("name")) is type(o.get("type")) is str
            for o in options
        ):
            raise ValueError("an action's options are objects with a name and a type")
        return cls(
            data["name"],
            data["title"],
            data["help"],
            tuple(
                ActionOption(o["name"], o["type"], o.get("default"), str(o.get("help", "")))
                for o in options
            ),
        )


class ActionHandler(Protocol):
    """What a plugin registers (hook ``sluice_actions``) to act on its framework's jobs."""

    framework: str
    # The actions it offers, and their options: the API accepts these and no other,
    # and parses the options by them before calling :meth:`perform`.
    actions: tuple[ActionSpec, ...]

    def handles(self, job: Job) -> bool:
        """True if this handler can act on ``job`` (its framework and broker)."""

    async def perform(self, action: str, job: Job, options: Mapping[str, Any]) -> ActionResult:
        """Do ``action``, one of :attr:`actions`, on ``job``; ``options`` as its declaration
        parsed them. Raise ActionRefused, saying why and what to do.

        ``retry``: re-run ``job`` with its original arguments as a new job (its id in
        the result's ``new_job_id``); not called for a handler that :class:`PlansRetry`.
        ``revoke``: ask the workers to discard ``job``; never called on a finished job.
        """


@runtime_checkable
class PerformsMany(Protocol):
    """Optional for a handler: do an action (never a retry) on several jobs at once, one
    broker message for all. A bulk action uses it, when the handler has it, for all
    the jobs it handles."""

    async def perform_many(
        self, action: str, jobs: list[Job], options: Mapping[str, Any]
    ) -> list[ActionResult]:
        """Like ``perform`` for each job, at once; one result per job, in order."""


@runtime_checkable
class OffersPerJob(Protocol):
    """Optional for a handler whose offer depends on the job (a remote agent's: what its
    own handler of the job's framework declares). Asked instead of :attr:`actions`."""

    async def offered(self, job: Job) -> tuple[ActionSpec, ...]: ...


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


# -- what the web asks -------------------------------------------------------------

# An action's outcome on one job.
ACCEPTED: Final = "accepted"  # done (for a revoke: sent, and heard)
REFUSED: Final = "refused"  # ActionRefused: not done, the message says why
NOT_IMPLEMENTED: Final = "not_implemented"  # no handler offers it for this job: not tried
NO_ANSWER: Final = "no_answer"  # sent to a remote agent, which did not answer: unknown
ERROR: Final = "error"  # the handler failed unexpectedly (logged)


@attrs.frozen
class Outcome:
    """What came of an action on one job."""

    job_id: str
    outcome: str  # ACCEPTED, REFUSED, NOT_IMPLEMENTED, NO_ANSWER or ERROR
    message: str = ""  # why, when not accepted
    new_job_id: str | None = None  # a retry's new job
    published: RetryPlan | None = None  # what a planned retry published
    heard_by: dict[str, int | None] | None = None  # a revoke's: per broker, workers
    agent: str | None = None  # the remote agent that did it
    # The options as the job's handler's declaration parsed them ({} when not tried).
    options: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def accepted(self) -> bool:
        return self.outcome == ACCEPTED

    def to_dict(self) -> dict[str, Any]:
        """The API's answer per job (a bulk action's ``results``)."""
        return {
            "id": self.job_id,
            "outcome": self.outcome,
            "message": self.message,
            "new_job_id": self.new_job_id,
            # What a retry published: the job name, queue, broker and arguments.
            "published": None if self.published is None else self.published.to_dict(),
            # For a revoke: per broker, how many workers heard it (null: it won't say).
            "heard_by": self.heard_by or None,
            "agent": self.agent,
        }


class NotOffered(Exception):
    """No handler offers this action (for this job, or at all); the message says what is
    offered instead. ``offered`` lists those names."""

    def __init__(self, message: str, offered: Sequence[str]) -> None:
        super().__init__(message)
        self.offered = tuple(offered)


class ActionService(Protocol):
    """Actions on jobs, as the web asks for them (:class:`sluice_core.job_actions.JobActions`
    is the real one). Each action is recorded on its job's timeline (its audit) before
    :meth:`act` returns."""

    def declared(self) -> dict[str, tuple[ActionSpec, ...]]:
        """Per framework, the actions its loaded handler offers."""

    async def offered(self, job: Job) -> tuple[ActionSpec, ...]:
        """The actions ``job`` can be given where it lives (its handler's, or its remote
        agent's); () when nothing can act on it."""

    def check(self, action: str, options: Mapping[str, Any]) -> None:
        """Check ``options`` by the declarations of ``action`` this server knows (a bulk
        action's, before any job is chosen; :meth:`act` parses them again by each job's
        handler). NotOffered when none declares ``action`` (retry and revoke are always
        known: each job's outcome then says whether anything acts on it); InvalidOptions
        when a declaration refuses the options."""

    async def act(
        self, action: str, jobs: Sequence[Job], options: Mapping[str, Any], actor: str | None
    ) -> list[Outcome]:
        """Do ``action`` on each job, ``options`` as sent (parsed here by each job's
        handler's declaration), on behalf of ``actor`` (None: no auth); one outcome per
        job, in order, each stored on the job's timeline before this returns.
        InvalidOptions, before anything is done, when a job's declaration refuses them."""

    async def plan(self, job: Job) -> RetryPlan | None:
        """What retrying ``job`` would publish, for the user to confirm; None when its
        handler cannot tell beforehand. Publishes nothing. NotOffered when nothing can
        retry it, ActionRefused when a retry would be refused (why),
        :class:`~sluice_core.remote.NoAnswer` when its agent did not answer."""

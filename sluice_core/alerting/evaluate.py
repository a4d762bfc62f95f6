"""The evaluator: rules into incidents, a singleton duty of the leader (docs/alerting.md).

Each rule kind has an evaluator in a registry (:func:`default_kinds`), of one of two sorts:

- an :class:`EventKind` is told of the jobs ingest just stored (``job_failed``,
  ``job_lost``): :meth:`EventKind.observe` says which hit its condition (a failure) and
  which clear it (a later success); the incident resolves on a clear, or after the
  rule's ``params.resolve_s`` without a hit;
- a :class:`PolledKind` is asked every ``interval`` where its condition holds now
  (``failure_rate``, ``worker_offline``, ``queue_wait``, ``queue_depth``,
  ``no_consumer``, ``sluice_health``; a later ``schedule`` registers one): a group it no
  longer reports resolves;
- a kind of both sorts (``runtime``: jobs running late are polled, jobs that finished
  late are told) resolves as an event kind does, never because a poll no longer
  reports the group.

An incident is one rule's condition in one group (a task name, a queue, a worker):
``pending`` while the condition has held less than the rule's ``for_s``, then
``firing``, then ``resolved``. Every change is stored with the notifications it queues
in one transaction (``Storage.save_incident``), and the open incidents are loaded at
start: a restart neither announces an incident twice nor forgets one, and what cleared
while Sluice was down resolves at the first evaluation.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol, runtime_checkable

import attrs
import trio

from sluice_core.alerting.model import (
    Incident,
    IncidentState,
    Kind,
    Match,
    Message,
    Rule,
    incident_url,
)
from sluice_core.model import Job, JobState
from sluice_core.storage import (
    MAX_PAGE,
    IngestResult,
    JobQuery,
    Notification,
    Storage,
    TimelineEntry,
)

log = logging.getLogger(__name__)

INTERVAL_S: Final = 5.0  # polled kinds are asked this often
JOB_IDS_KEPT: Final = 20  # an incident keeps its latest jobs (links, and no job counted twice)
# Jobs handed over by ingest and not evaluated yet, at most: past it (the evaluator far
# behind) the oldest are dropped, and the log says so.
PENDING_JOBS_MAX: Final = 100_000
# Active or queued jobs read per round for runtime and queue_wait, at most.
SCAN_JOBS: Final = 5 * MAX_PAGE


@attrs.frozen
class Condition:
    """Where a polled kind's condition holds: one group."""

    labels: dict[str, str]
    summary: str
    count: int = 1
    job_ids: tuple[str, ...] = ()


@attrs.frozen
class Seen:
    """A stored job an event kind's rule cares about: a hit (it failed), or a clear (a
    later run of its name completed)."""

    group: str
    labels: dict[str, str]
    job_id: str
    at: float
    hit: bool
    detail: str = ""  # a hit's exception


@runtime_checkable
class EventKind(Protocol):
    def observe(self, rule: Rule, jobs: Sequence[Job]) -> Iterable[Seen]: ...

    def summary(self, group: str, count: int, detail: str) -> str: ...


@runtime_checkable
class PolledKind(Protocol):
    async def check(self, rules: Sequence[Rule], now: float) -> dict[int, dict[str, Condition]]:
        """For each rule (by id), the groups where its condition holds at ``now``."""


KindEvaluator = EventKind | PolledKind


def glob(pattern: str | None, value: str | None) -> bool:
    return pattern is None or (value is not None and fnmatch.fnmatchcase(value, pattern))


def literal(pattern: str | None) -> bool:
    """A glob without a wildcard matches one name, itself: rules on one task name each
    (a thousand of them in bench/alerting.py) are a lookup, not a glob per candidate."""
    return pattern is not None and not any(c in pattern for c in "*?[")


def matches_job(match: Match, job: Job, *, exception: bool = True) -> bool:
    return (
        glob(match.name, job.name)
        and glob(match.queue, job.queue)
        and glob(match.worker, job.worker)
        and (not exception or match.exception is None or match.exception in (job.exception or ""))
    )


# -- event kinds ------------------------------------------------------------------------


@attrs.frozen
class JobOutcome:
    """``job_failed`` (``state`` failed) and ``job_lost`` (lost): one group per task name;
    a later completed run of the name clears it."""

    state: JobState
    verb: str

    def observe(self, rule: Rule, jobs: Sequence[Job]) -> Iterable[Seen]:
        for job in jobs:
            name = job.name or "?"
            at = job.finished_at or job.updated_at or 0.0
            if job.state is self.state and matches_job(rule.match, job):
                detail = (job.exception or "").splitlines()[0][:200] if job.exception else ""
                yield Seen(name, {"name": name}, job.id, at, True, detail)
            elif job.state is JobState.COMPLETED and matches_job(
                rule.match, job, exception=False
            ):
                yield Seen(name, {"name": name}, job.id, at, False)

    def summary(self, group: str, count: int, detail: str) -> str:
        runs = "1 run" if count == 1 else f"{count} runs"
        return f"{runs} of {group} {self.verb}" + (f"; latest: {detail}" if detail else "")


# -- polled kinds -----------------------------------------------------------------------


@attrs.frozen
class FailureRate:
    """Failures / finished runs per task name over ``window_s``. Candidates are the names
    with failures in the window, from the per-minute failure counts ingest keeps
    (migration 0009); they are then counted through their (name, seq) index, all the
    names of one window (and queue and worker) in one call a round, whatever the number
    of rules asking."""

    storage: Storage

    async def check(self, rules: Sequence[Rule], now: float) -> dict[int, dict[str, Condition]]:
        failing: dict[float, dict[str, None]] = {}  # names, most failures first
        asked: dict[int, list[str]] = {}  # rule id -> its candidates
        wanted: dict[tuple[float, str | None, str | None], dict[str, None]] = defaultdict(dict)
        for rule in rules:
            window = float(rule.params["window_s"])
            if window not in failing:
                top = await self.storage.top_failing_names(now - window, 10_000)
                failing[window] = dict.fromkeys(name for name, _ in top)
            pattern = rule.match.name
            names: Iterable[str] = failing[window]
            if pattern is not None and literal(pattern):
                names = [pattern] if pattern in failing[window] else []
            asked[rule.id] = [name for name in names if glob(pattern, name)]
            wanted[(window, rule.match.queue, rule.match.worker)].update(
                dict.fromkeys(asked[rule.id])
            )
        counted = {
            # Runs created up to a window before it count too (queued a while).
            key: await self.storage.name_outcomes(list(names), now - key[0], now - 2 * key[0],
                                                  key[1], key[2])
            for key, names in wanted.items()
            if names
        }
        out: dict[int, dict[str, Condition]] = {}
        for rule in rules:
            window = float(rule.params["window_s"])
            outcomes = counted.get((window, rule.match.queue, rule.match.worker), {})
            found = out.setdefault(rule.id, {})
            for name in asked[rule.id]:
                failed, finished = outcomes.get(name, (0, 0))
                if finished < rule.params["min_runs"] or not finished:
                    continue
                rate = failed / finished
                if failed and rate >= rule.params["threshold"]:
                    found[name] = Condition(
                        {"name": name},
                        f"{failed} of {finished} runs of {name} failed in the last"
                        f" {_duration(window)} ({rate:.0%})",
                        count=failed,
                    )
        return out


@attrs.frozen
class WorkerOffline:
    """Workers the worker monitor marked offline (it concludes only while Sluice listens:
    Sluice's own blind spots are not blamed on workers), until ``forget_s`` after their
    last heartbeat."""

    storage: Storage

    async def check(self, rules: Sequence[Rule], now: float) -> dict[int, dict[str, Condition]]:
        offline = [w for w in await self.storage.list_workers() if w.status == "offline"]
        out: dict[int, dict[str, Condition]] = {}
        for rule in rules:
            out[rule.id] = {
                w.hostname: Condition(
                    {"worker": w.hostname},
                    f"worker {w.hostname} is offline (last heartbeat {_when(w.last_heartbeat)})",
                )
                for w in offline
                if glob(rule.match.worker, w.hostname)
                and now - (w.last_heartbeat or now) < rule.params["forget_s"]
            }
        return out


@attrs.frozen
class LongJobs:
    """Jobs still active longer than ``max_s`` since they started (``runtime``'s polled
    half), or queued longer than ``max_s`` with no taker (``queue_wait``): one group per
    task name (runtime) or queue (queue_wait)."""

    storage: Storage
    state: JobState
    by: str  # "name" or "queue"

    async def check(self, rules: Sequence[Rule], now: float) -> dict[int, dict[str, Condition]]:
        if not rules:
            return {}
        # A late job was created before now - max_s: the fresh ones (most of a busy
        # system's, listed first) are not read, so the SCAN_JOBS read are candidates.
        until = now - min(float(rule.params["max_s"]) for rule in rules)
        jobs: list[Job] = []
        cursor = None
        while len(jobs) < SCAN_JOBS:
            page = await self.storage.list_jobs(
                JobQuery(
                    states=frozenset({self.state}), until=until, limit=MAX_PAGE, cursor=cursor
                )
            )
            jobs += page.jobs
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        out: dict[int, dict[str, Condition]] = {}
        for rule in rules:
            groups: dict[str, list[Job]] = defaultdict(list)
            for job in jobs:
                since = job.started_at if self.state is JobState.ACTIVE else job.sent_at
                since = since if since is not None else job.created_at
                if since is None or now - since <= rule.params["max_s"]:
                    continue
                if matches_job(rule.match, job):
                    groups[getattr(job, self.by) or "?"].append(job)
            doing = "running" if self.state is JobState.ACTIVE else "waiting in queue"
            out[rule.id] = {
                group: Condition(
                    {self.by: group},
                    f"{len(late)} {'job' if len(late) == 1 else 'jobs'} of {self.by} {group}"
                    f" {doing} for more than {_duration(rule.params['max_s'])}",
                    count=len(late),
                    job_ids=tuple(job.id for job in late[:JOB_IDS_KEPT]),
                )
                for group, late in groups.items()
            }
        return out


@attrs.define
class Runtime:
    """``runtime``: a run of a matching task took longer than ``max_s``, whether it is
    still running (polled through :class:`LongJobs`) or finished late (told by ingest,
    from its runtime at completion). One group per task name. As for ``job_failed``, it
    resolves when a later run of the name completes within ``max_s`` while none runs
    late, or after ``params.resolve_s`` without a late run."""

    running: LongJobs
    # Per rule, the names with a job running late at the last check: a quick run of
    # the name does not clear what is still late.
    _late_now: dict[int, set[str]] = attrs.field(factory=dict)

    async def check(self, rules: Sequence[Rule], now: float) -> dict[int, dict[str, Condition]]:
        found = await self.running.check(rules, now)
        self._late_now = {rule_id: set(groups) for rule_id, groups in found.items()}
        return found

    def observe(self, rule: Rule, jobs: Sequence[Job]) -> Iterable[Seen]:
        bound = float(rule.params["max_s"])
        for job in jobs:
            if job.runtime is None or job.state is JobState.LOST:
                continue
            if not matches_job(rule.match, job):
                continue
            name = job.name or "?"
            at = job.finished_at or job.updated_at or 0.0
            if job.runtime > bound:
                detail = f"{job.runtime:.0f} s, more than {_duration(bound)}"
                yield Seen(name, {"name": name}, job.id, at, True, detail)
            elif job.state is JobState.COMPLETED and name not in self._late_now.get(rule.id, ()):
                yield Seen(name, {"name": name}, job.id, at, False)

    def summary(self, group: str, count: int, detail: str) -> str:
        runs = "1 run" if count == 1 else f"{count} runs"
        return f"{runs} of {group} took too long; latest: {detail}"


@attrs.frozen
class QueueSamples:
    """``queue_depth`` (the latest sample's depth above ``max_depth``; for how long is the
    rule's ``for_s``) and ``no_consumer`` (messages waiting, no consumer)."""

    storage: Storage
    kind: Kind

    async def check(self, rules: Sequence[Rule], now: float) -> dict[int, dict[str, Condition]]:
        samples = await self.storage.latest_queue_samples()
        out: dict[int, dict[str, Condition]] = {}
        for rule in rules:
            found = out.setdefault(rule.id, {})
            for s in samples:
                if s.depth is None or not glob(rule.match.queue, s.name):
                    continue
                if self.kind is Kind.QUEUE_DEPTH and s.depth > rule.params["max_depth"]:
                    what = f"holds {s.depth} messages (more than {rule.params['max_depth']})"
                elif self.kind is Kind.NO_CONSUMER and s.depth > 0 and s.consumers == 0:
                    what = f"holds {s.depth} messages and has no consumer"
                else:
                    continue
                found[f"{s.name} on {s.broker}"] = Condition(
                    {"queue": s.name, "broker": s.broker}, f"queue {s.name} {what}", s.depth
                )
        return out


@attrs.frozen
class SluiceHealth:
    """Sluice watching itself: ``problems(max_lag_s, now)`` gives what is wrong, by what
    it is (``source:redis``, ``lag``, ``dropped:redis``) and a sentence (the engine's
    view of its sources, its ingest lag and its dropped events). Drops are news for one
    look: their incident resolves at the next round without new ones."""

    problems: Callable[[float, float], Awaitable[Mapping[str, str]]]

    async def check(self, rules: Sequence[Rule], now: float) -> dict[int, dict[str, Condition]]:
        out: dict[int, dict[str, Condition]] = {}
        for rule in rules:
            found = await self.problems(rule.params["max_lag_s"], now)
            out[rule.id] = {
                key: Condition({"check": key}, text) for key, text in found.items()
            }
        return out


def default_kinds(
    storage: Storage,
    problems: Callable[[float, float], Awaitable[Mapping[str, str]]] | None = None,
) -> dict[Kind, KindEvaluator]:
    """The registry: an evaluator for each kind Sluice has (``schedule`` plugs in here)."""
    kinds: dict[Kind, KindEvaluator] = {
        Kind.JOB_FAILED: JobOutcome(JobState.FAILED, "failed"),
        Kind.JOB_LOST: JobOutcome(JobState.LOST, "were lost"),
        Kind.FAILURE_RATE: FailureRate(storage),
        Kind.WORKER_OFFLINE: WorkerOffline(storage),
        Kind.RUNTIME: Runtime(LongJobs(storage, JobState.ACTIVE, "name")),
        Kind.QUEUE_WAIT: LongJobs(storage, JobState.QUEUED, "queue"),
        Kind.QUEUE_DEPTH: QueueSamples(storage, Kind.QUEUE_DEPTH),
        Kind.NO_CONSUMER: QueueSamples(storage, Kind.NO_CONSUMER),
    }
    if problems is not None:
        kinds[Kind.SLUICE_HEALTH] = SluiceHealth(problems)
    return kinds


# The job states event kinds look at: what ingest hands over is filtered to these.
WATCHED: Final = frozenset({JobState.FAILED, JobState.LOST, JobState.COMPLETED})


# -- the evaluator ------------------------------------------------------------------------


@attrs.define
class _Change:
    incident: Incident
    log: list[TimelineEntry] = attrs.field(factory=list)
    notify: list[Notification] = attrs.field(factory=list)


class Evaluator:
    """Runs the rules (``run``, on the leader); ``feed`` hands it what ingest stored.

    ``clock`` gives epoch seconds (tests drive it from trio's clock); ``public_url`` is
    the dashboard's address for the links in messages.
    """

    def __init__(
        self,
        storage: Storage,
        kinds: Mapping[Kind, KindEvaluator],
        *,
        public_url: str | None = None,
        clock: Callable[[], float] = time.time,
        interval: float = INTERVAL_S,
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self._storage = storage
        self._on_queued = on_queued  # notifications were queued (the outbox looks now)
        self.kinds = dict(kinds)
        self.public_url = public_url
        self._clock = clock
        self.interval = interval
        self._open: dict[tuple[int, str], Incident] = {}
        self._jobs: list[Job] = []
        # Whether fed jobs are kept: set by run() (a test driving evaluate() sets it too).
        self.accepting = False
        self._loaded = False
        self._wake = trio.Event()
        self._rules: list[Rule] = []
        self.evaluated = trio.Event()  # set after each evaluation (tests wait on it)

    def feed(self, result: IngestResult) -> None:
        """Hand over stored jobs (from ``Engine._publish``): only kept while running."""
        if not self.accepting:
            return
        self._jobs.extend(job for job in result.jobs if job.state in WATCHED)
        if len(self._jobs) > PENDING_JOBS_MAX:
            dropped = len(self._jobs) - PENDING_JOBS_MAX
            del self._jobs[:dropped]
            log.warning("alerting: %d stored jobs not evaluated (evaluator behind)", dropped)
        self._wake.set()

    async def run(self) -> None:
        self.accepting = True
        self._loaded = False
        next_poll = -math.inf
        try:
            while True:
                now = self._clock()
                poll = now >= next_poll
                try:
                    await self.evaluate(now, poll=poll)
                except Exception as exc:  # the database may be away: try again next round
                    log.warning("alerting: evaluation failed: %s", exc)
                    self._loaded = False  # what is stored is the truth: read it again
                if poll:
                    next_poll = now + self.interval
                with trio.move_on_after(max(0.0, next_poll - self._clock())):
                    await self._wake.wait()
                self._wake = trio.Event()
        finally:
            self.accepting = False
            self._jobs = []

    async def evaluate(self, now: float, *, poll: bool = True) -> None:
        """One round: the jobs handed over, then (``poll``) the polled kinds, then the
        pending periods, repeats and quiet times of every open incident."""
        if poll or not self._loaded:
            # What is stored is the truth: rules changed through the API (on any process),
            # acks and silences, another leader's incidents.
            self._rules = await self._storage.alert_rules()
            self._open = {
                (i.rule_id, i.group_key): i for i in await self._storage.open_incidents()
            }
            if not self._loaded:
                await self._cleared_while_away(now)
                self._loaded = True
            poll = True
        rules = {rule.id: rule for rule in self._rules}
        for key in [key for key in self._open if key[0] not in rules]:
            del self._open[key]  # the rule is gone (storage resolved its incidents)
        changes: dict[tuple[int, str], _Change] = {}
        jobs, self._jobs = self._jobs, []
        jobs.sort(key=lambda job: job.finished_at or job.updated_at or 0.0)
        by_name: dict[str | None, list[Job]] = defaultdict(list)
        for job in jobs:
            by_name[job.name].append(job)
        by_kind: dict[Kind, list[Rule]] = defaultdict(list)
        for rule in rules.values():
            by_kind[rule.kind].append(rule)
        for kind, kind_rules in by_kind.items():
            evaluator = self.kinds.get(kind)
            # Polled first: a kind of both sorts (runtime) observes knowing what it found.
            if isinstance(evaluator, PolledKind) and poll:
                try:
                    found = await evaluator.check(kind_rules, now)
                except Exception as exc:  # that kind is unknown this round: nothing resolves
                    log.warning("alerting: %s rules not evaluated: %s", kind, exc)
                else:
                    for rule in kind_rules:
                        await self._holds(rule, evaluator, found.get(rule.id, {}), now, changes)
            if isinstance(evaluator, EventKind):
                for rule in kind_rules:
                    # A rule on one task name is shown that name's jobs only.
                    named = by_name.get(rule.match.name, []) if literal(rule.match.name) else jobs
                    for seen in evaluator.observe(rule, named):
                        await self._seen(rule, evaluator, seen, now, changes)
        for key, incident in list(self._open.items()):
            self._advance(rules[key[0]], incident, now, changes)
        for key, change in changes.items():
            await self._save(key, change)
        self.evaluated.set()
        self.evaluated = trio.Event()

    async def _cleared_while_away(self, now: float) -> None:
        """An event kind's incident whose name completed a run since its last failure
        (while Sluice was stopped, or before it led) resolves now."""
        rules = {rule.id: rule for rule in self._rules}
        for key, incident in list(self._open.items()):
            rule = rules.get(key[0])
            if rule is None:
                continue
            kind = self.kinds.get(rule.kind)
            # A kind that is also polled (runtime) may have a run late now: its first
            # poll and the next runs tell, not any completed run.
            if not isinstance(kind, EventKind) or isinstance(kind, PolledKind):
                continue
            since = incident.last_seen_at or incident.started_at
            page = await self._storage.list_jobs(
                JobQuery(name=key[1], states=frozenset({JobState.COMPLETED}), since=since, limit=1)
            )
            if page.jobs and (page.jobs[0].finished_at or 0.0) > since:
                change = _Change(incident)
                self._resolve(rule, change, now, f"job {page.jobs[0].id} of {key[1]} completed")
                await self._save(key, change)

    async def _save(self, key: tuple[int, str], change: _Change) -> None:
        saved = await self._storage.save_incident(change.incident, change.log, change.notify)
        if change.notify:
            self._on_queued()
        if saved.state is IncidentState.RESOLVED:
            self._open.pop(key, None)
        else:
            self._open[key] = saved

    async def _opened(
        self,
        rule: Rule,
        group: str,
        labels: dict[str, str],
        now: float,
        changes: dict[tuple[int, str], _Change],
    ) -> Incident:
        """A new incident, stored pending at once: it has its id before anything is sent."""
        resolved = changes.pop((rule.id, group), None)
        if resolved is not None:  # the group's previous incident, resolved this round
            await self._save((rule.id, group), resolved)
        incident = Incident(
            id=0, rule_id=rule.id, rule_name=rule.name, kind=rule.kind, group_key=group,
            labels=labels, state=IncidentState.PENDING, severity=rule.severity, summary="",
            count=0, started_at=now, last_seen_at=now,
        )
        saved = await self._storage.save_incident(
            incident, [TimelineEntry(now, "pending", "the condition is seen")]
        )
        self._open[(rule.id, group)] = saved
        return saved

    async def _seen(
        self,
        rule: Rule,
        kind: EventKind,
        seen: Seen,
        now: float,
        changes: dict[tuple[int, str], _Change],
    ) -> None:
        key = (rule.id, seen.group)
        incident = self._open.get(key)
        if not seen.hit:
            if incident is not None and seen.at > (incident.last_seen_at or -math.inf):
                self._resolve(rule, _change(changes, key, incident), now,
                              f"job {seen.job_id} of {seen.group} completed")
                self._open.pop(key)
            return
        if incident is None:
            incident = await self._opened(rule, seen.group, seen.labels, now, changes)
        if seen.job_id in incident.job_ids:
            return  # the same failed job stored again (a late event of it)
        change = _change(changes, key, incident)
        incident.count += 1
        incident.job_ids = [*incident.job_ids, seen.job_id][-JOB_IDS_KEPT:]
        incident.last_seen_at = max(incident.last_seen_at or seen.at, seen.at)
        incident.summary = kind.summary(seen.group, incident.count, seen.detail)
        change.incident = incident

    async def _holds(
        self,
        rule: Rule,
        kind: PolledKind,
        found: dict[str, Condition],
        now: float,
        changes: dict[tuple[int, str], _Change],
    ) -> None:
        # A kind that is also an event kind counts each job once, resolves as event
        # kinds do (not when a poll no longer finds the group), and its last_seen_at
        # (whence resolve_s counts) is stored each time.
        counted = isinstance(kind, EventKind)
        for group, condition in found.items():
            key = (rule.id, group)
            incident = self._open.get(key)
            if incident is None:
                incident = await self._opened(rule, group, condition.labels, now, changes)
            incident.last_seen_at = now
            if counted:
                new = [j for j in condition.job_ids if j not in incident.job_ids]
                incident.count += len(new)
                incident.job_ids = [*incident.job_ids, *new][-JOB_IDS_KEPT:]
                incident.summary = condition.summary
                _change(changes, key, incident)
            elif (incident.summary, incident.count, incident.job_ids) != (
                condition.summary, condition.count, list(condition.job_ids)
            ):
                incident.summary = condition.summary
                incident.count = condition.count
                incident.job_ids = list(condition.job_ids)
                _change(changes, key, incident)
        if counted:
            return
        for key, incident in list(self._open.items()):
            if key[0] == rule.id and key[1] not in found:
                self._resolve(rule, _change(changes, key, incident), now, "the condition cleared")
                del self._open[key]

    def _advance(
        self, rule: Rule, incident: Incident, now: float, changes: dict[tuple[int, str], _Change]
    ) -> None:
        key = (rule.id, incident.group_key)
        kind = self.kinds.get(rule.kind)
        if isinstance(kind, EventKind):
            quiet = float(rule.params.get("resolve_s", math.inf))
            if now - (incident.last_seen_at or incident.started_at) >= quiet:
                self._resolve(rule, _change(changes, key, incident), now,
                              f"no new occurrence for {_duration(quiet)}")
                del self._open[key]
                return
        if incident.state is IncidentState.PENDING:
            if now - incident.started_at < rule.for_s:
                return
            change = _change(changes, key, incident)
            incident.state = IncidentState.FIRING
            incident.fired_at = now
            change.log.append(TimelineEntry(now, "firing", incident.summary))
            why_not = self._why_not(rule, incident, now)
            if why_not:
                change.log.append(TimelineEntry(now, "not notified", why_not))
                return
        elif incident.state is not IncidentState.FIRING:
            return
        if self._why_not(rule, incident, now):
            return
        last = incident.last_notified_at
        if last is not None and (
            rule.repeat_s is None or incident.acked_at is not None or now - last < rule.repeat_s
        ):
            return
        change = _change(changes, key, incident)
        if last is not None:
            firing_for = _duration(now - (incident.fired_at or now))
            change.log.append(TimelineEntry(now, "repeat", f"still firing after {firing_for}"))
        self._notify(rule, change, "incident.firing", now)

    def _why_not(self, rule: Rule, incident: Incident, now: float) -> str:
        """Why a firing incident is not announced now ('' when it is)."""
        if not rule.channels:
            return "the rule has no channel"
        if rule.muted_until is not None and now < rule.muted_until:
            return f"the rule is muted until {_when(rule.muted_until)}"
        if incident.silenced_until is not None and now < incident.silenced_until:
            return f"silenced until {_when(incident.silenced_until)}"
        return ""

    def _resolve(self, rule: Rule, change: _Change, now: float, why: str) -> None:
        incident = change.incident
        announced = incident.last_notified_at is not None
        was = incident.state
        incident.state = IncidentState.RESOLVED
        incident.resolved_at = now
        if was is IncidentState.PENDING:
            why += f" before {_duration(rule.for_s)} had passed: it never fired"
        change.log.append(TimelineEntry(now, "resolved", why))
        # A resolve is announced where the firing was (muted or silenced since, too:
        # whoever was paged must hear that it is over).
        if announced:
            self._notify(rule, change, "incident.resolved", now)

    def _notify(self, rule: Rule, change: _Change, event: str, now: float) -> None:
        incident = change.incident
        incident.last_notified_at = now
        body = incident_body(incident, event, self.public_url)
        for channel_id in rule.channels:
            change.notify.append(Notification(incident.id, channel_id, event, body, now, now))
        change.log.append(
            TimelineEntry(now, "queued", f"{event} to {len(rule.channels)} channel(s)")
        )


def _change(
    changes: dict[tuple[int, str], _Change], key: tuple[int, str], incident: Incident
) -> _Change:
    change = changes.get(key)
    if change is None:
        change = changes[key] = _Change(incident)
    change.incident = incident
    return change


# -- messages ---------------------------------------------------------------------------


def incident_body(incident: Incident, event: str, public_url: str | None) -> dict[str, Any]:
    """What channels are sent about an incident, as an outbox row's body (JSON): the
    contract's incident dict, a line for people, and links to the incident and its latest
    job on the dashboard. :func:`message_from_body` makes it the Message sent."""
    over = "resolved" if event == "incident.resolved" else incident.severity.upper()
    links: list[list[str]] = []
    url = incident_url(public_url, incident.id)
    if url is not None and public_url is not None:
        links.append(["Incident", url])
        if incident.job_ids:
            links.append(["Latest job", f"{public_url.rstrip('/')}/jobs/{incident.job_ids[-1]}"])
    return {
        "event": event,
        "incident": incident.to_dict(public_url),
        "text": f"[{over}] {incident.rule_name}: {incident.summary}",
        "links": links,
        "incidents": [],
    }


def message_from_body(body: Mapping[str, Any], message_id: str) -> Message:
    """The Message of an outbox row; ``message_id`` names the row, the same on each retry."""
    return Message(
        body["event"],
        body["incident"],
        body["text"],
        tuple((label, url) for label, url in body.get("links", ())),
        tuple(body.get("incidents", ())),
        id=message_id,
    )


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:.0f} s"


def _when(at: float | None) -> str:
    if at is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))

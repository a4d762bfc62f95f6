"""Reconciliation after a gap: what Sluice missed while it was not listening (docs/architecture.md).

A gap is a time a source was not heard, so its events in it may be missed: Sluice
was stopped (from the last "listening until" mark any process sharing the database
wrote, to this start), the source reconnected, or full buffers dropped its events.
:class:`GapWatch` notices each from the sources' statuses and the drop counters,
records it (:meth:`Storage.record_gap`, shown on the overview and ``GET /api/gaps``)
and, once the source is heard again, reconciles it:

- the jobs that may have moved unseen are the open ones (queued, scheduled, received,
  active, retrying) whose last event is no later than the gap's end;
- the source's :class:`Reconciler` (a plugin's, registered through the
  ``sluice_reconcilers`` hook: the core knows no framework) asks the deployment what
  it can still tell, and answers with ordinary job events;
- what stays unknowable is marked ``unknown``, with the gap's times, by an event
  stamped at the gap's end: any later event of the job wins over it in the fold
  (:mod:`sluice_core.merge`), a known outcome is never made unknown, and nothing
  calls an unknown job lost (:mod:`sluice_core.monitors`).

Every event goes through the door of events from outside (``PluginManager.admit``:
values checked, secrets redacted) and into the pipeline like any other. Their ids
are derived from what they say (:func:`~sluice_core.model.event_id`), so two agents
that reconcile the same gap record it once.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

import attrs
import trio

from sluice_core.merge import MISSED_EVENT
from sluice_core.model import Job, JobEvent, JobState, Normalized, event_id
from sluice_core.pipeline import SourceStatus
from sluice_core.sources import Sink
from sluice_core.storage import MAX_PAGE, Gap, JobQuery, Storage

log = logging.getLogger(__name__)

# States in which a job's next events may have been missed.
OPEN_STATES = frozenset(
    {JobState.QUEUED, JobState.SCHEDULED, JobState.RECEIVED, JobState.ACTIVE, JobState.RETRYING}
)
POLL_S = 0.5  # how often sources and drop counters are looked at
MARK_INTERVAL_S = 1.0  # how often "listening until" marks are written
# Shorter silences are the marks' own resolution (and a start's few seconds are not).
MIN_GAP_S = 2 * MARK_INTERVAL_S
# Before reconciling, how long to let Sluice's buffers drain: what was read just
# after the gap (a RabbitMQ queue's backlog) is then stored and counts.
SETTLE_S = 10.0
SETTLE_POLL_S = 0.1
# Jobs first seen mid-life since a gap began are looked for among this many.
MID_LIFE_SCAN = 5_000

STOPPED, RECONNECT, DROPPED = "stopped", "reconnect", "dropped"
KEPT = "the broker kept the events published meanwhile: nothing missed"


# Which of these job ids storage holds.
Known = Callable[[Sequence[str]], Awaitable[set[str]]]


@attrs.define
class Reconciled:
    """What a :class:`Reconciler` learnt: ``events`` to store, the ids of the jobs whose
    state they settle (any job left out becomes unknown), and counts of what it learnt
    for the gap's summary (``{"active": 2, "completed (result backend)": 5}``)."""

    events: list[JobEvent] = attrs.field(factory=list)
    settled: set[str] = attrs.field(factory=set)
    counts: Counter[str] = attrs.field(factory=Counter)


class Reconciler(Protocol):
    """Asks one source's deployment what happened during a gap (hook ``sluice_reconcilers``)."""

    source: str  # the name of the source whose gaps it reconciles

    def owns(self, job: Job) -> bool:
        """Whether the job's events come through this source (and so may be missed)."""

    async def reconcile(
        self, gap: Gap, open_jobs: list[Job], mid_life: list[Job], known: Known
    ) -> Reconciled:
        """What happened to ``open_jobs`` (open at the gap, owned), and who ``mid_life``
        jobs are (seen since the gap began, but not from their start: no name).
        ``known`` tells which job ids storage holds (a job finished within the gap may
        be one Sluice never saw).

        Raise on a broker error: the open jobs then become unknown, and the error is in
        the gap's summary.
        """


def explanation(gap: Gap) -> str:
    return (
        f"events missed while Sluice was not listening ({_when(gap.started_at)} –"  # noqa: RUF001
        f" {_when(gap.ended_at)}, {gap.source})"
    )


def unknown_event(job: Job, gap: Gap) -> JobEvent:
    """The job's outcome is unknowable: stamped at the gap's end, so any later event wins."""
    return JobEvent(
        id=event_id(job.id, "unknown", gap.source, gap.started_at, gap.ended_at),
        job_id=job.id,
        framework=job.framework,
        type=MISSED_EVENT,
        state=JobState.UNKNOWN,
        timestamp=max(gap.ended_at, job.updated_at or gap.ended_at),
        fields={"exception": explanation(gap)},
    )


def _when(ts: float) -> str:
    when = dt.datetime.fromtimestamp(ts, dt.UTC)
    return f"{when:%Y-%m-%d %H:%M:%S}.{when.microsecond // 1000:03d} UTC"


@attrs.define
class _Watched:
    up: bool
    since: float  # of the status last seen
    heard: float | None  # the last poll at which the source was up (epoch s)


class GapWatch:
    """Notices gaps, records them, reconciles them, and writes the listening marks.

    ``sources`` gives the sources' statuses (``Pipeline.sources``); ``dropped`` the
    total of events dropped per source; ``backlog`` the messages Sluice holds unstored.
    """

    def __init__(
        self,
        storage: Storage,
        sink: Sink,
        *,
        admit: Callable[[Normalized], Normalized],
        reconcilers: Iterable[Reconciler],
        sources: Callable[[], dict[str, SourceStatus]],
        dropped: Callable[[], dict[str, float]],
        backlog: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._storage = storage
        self._sink = sink
        self._admit = admit
        self.reconcilers = {reconciler.source: reconciler for reconciler in reconcilers}
        self._sources = sources
        self._dropped = dropped
        self._backlog = backlog
        self._clock = clock
        self._watched: dict[str, _Watched] = {}
        self._drops: dict[str, float] = {}  # totals last seen
        self._dropping: dict[str, tuple[float, float]] = {}  # a drop gap: since, last seen
        self._previous: dict[str, float] = {}  # marks of the runs before this one
        self._locks: dict[str, trio.Lock] = {}
        self._frozen = False
        self.reconciled = 0  # gaps reconciled, for tests and logs

    async def run(self) -> None:
        marked_at = float("-inf")
        failing = False  # the last round failed: the database is away
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        now = self._clock()
                        await self._look(now, nursery)
                        if now - marked_at >= MARK_INTERVAL_S:
                            await self._mark()
                            marked_at = now
                        failing = False
                    except Exception as exc:  # the database may be away: next round
                        failing = True
                        log.warning("gap watch: %s", exc)
                    await trio.sleep(POLL_S)
        finally:
            # The next start's gap begins where this run stopped hearing. With the
            # database away, asking again would only hold the stop for the pool's whole
            # connection timeout (a thread, which the deadline below cannot cut short).
            if failing:
                log.warning("gap watch: the last listening mark was not written: database away")
            else:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    try:
                        await self._mark()
                    except Exception as exc:
                        log.warning("gap watch: the last listening mark was not written: %s", exc)

    async def prepare(self) -> None:
        """Read where the runs before this one stopped hearing each source: call it once
        storage is open and before anything is stored (a heartbeat stored by this run
        would look like the last thing the one before heard)."""
        self._previous = await self._storage.listening_marks()
        if not self._previous:
            # A database from before the marks: the newest thing it holds.
            heard = await self._storage.last_heard()
            self._previous = {} if heard is None else {"": heard}

    def freeze(self) -> None:
        """Sluice is stopping: its sources may stop before the last mark is written, so
        the marks stay where they are (the next start's gap covers the stop)."""
        self._frozen = True

    async def _mark(self) -> None:
        marks = {
            name: watched.heard
            for name, watched in self._watched.items()
            if watched.heard is not None
        }
        await self._storage.mark_listening(marks)

    async def _look(self, now: float, nursery: trio.Nursery) -> None:
        for name, status in list(self._sources().items()):
            watched = self._watched.get(name)
            if status.up and (watched is None or not watched.up or watched.since != status.since):
                heard = None if watched is None else watched.heard
                start = await self._last_heard(name, heard)
                if start is not None and status.since - start >= MIN_GAP_S:
                    cause = STOPPED if heard is None else RECONNECT
                    gap = Gap(name, cause, start, status.since)
                    nursery.start_soon(self._reconcile, gap, status.kept)
            heard = watched.heard if watched is not None else None
            if status.up and not self._frozen:
                heard = now
            self._watched[name] = _Watched(status.up, status.since, heard)
        self._look_at_drops(now, nursery)

    async def _last_heard(self, name: str, heard: float | None) -> float | None:
        """When the source was last heard before it came up: by this process (``heard``),
        else by the runs before; or later by any process sharing the database (an HA
        pair's other half heard what this one did not)."""
        marks = await self._storage.listening_marks()
        previous = self._previous
        before = previous.get(name, previous.get("")) if heard is None else heard
        known = [ts for ts in (marks.get(name), before) if ts is not None]
        return max(known) if known else None

    def _look_at_drops(self, now: float, nursery: trio.Nursery) -> None:
        totals = self._dropped()
        for name in self._watched:
            total = totals.get(name, 0.0)
            before = self._drops.get(name, total)
            self._drops[name] = total
            dropping = self._dropping.get(name)
            if total > before:
                since = dropping[0] if dropping is not None else now - POLL_S
                self._dropping[name] = (since, now)
            elif dropping is not None:
                # The drops stopped: what was dropped may be told by the deployment now.
                del self._dropping[name]
                nursery.start_soon(self._reconcile, Gap(name, DROPPED, *dropping), False)

    async def _reconcile(self, gap: Gap, kept: bool) -> None:
        """Record the gap and reconcile it; ``kept``: the broker kept its events (the
        source read them since), so nothing was missed and nothing is asked."""
        lock = self._locks.setdefault(gap.source, trio.Lock())
        async with lock:  # one gap of a source at a time: each sees the one before stored
            (log.info if kept else log.warning)(
                "%s: a gap of %.1fs (%s, %s to %s): %s",
                gap.source, gap.duration, gap.cause, _when(gap.started_at), _when(gap.ended_at),
                KEPT if kept else "reconciling",
            )
            try:
                gap_id = await self._storage.record_gap(gap)
                summary = KEPT if kept else await self.reconcile(gap)
                await self._storage.gap_reconciled(gap_id, self._clock(), summary)
            except Exception as exc:  # the database away: the gap's jobs stay as they are
                log.warning("reconciling the gap of %s failed: %s", gap.source, exc)
                return
            log.info("%s: gap reconciled: %s", gap.source, summary)
            self.reconciled += 1

    async def reconcile(self, gap: Gap) -> str:
        """Reconcile one gap; return its summary."""
        for _ in range(int(SETTLE_S / SETTLE_POLL_S)):  # a count: the backlog has no event
            if not self._backlog():
                break
            await trio.sleep(SETTLE_POLL_S)
        reconciler = self.reconcilers.get(gap.source)
        if reconciler is None:
            return "no plugin reconciles this source: its jobs are shown as last seen"
        open_jobs = [
            job
            for job in await self._jobs(JobQuery(states=OPEN_STATES, limit=MAX_PAGE), None)
            if (job.updated_at or 0.0) <= gap.ended_at and reconciler.owns(job)
        ]
        since = JobQuery(since=gap.started_at, limit=MAX_PAGE)
        mid_life = [
            job
            for job in await self._jobs(since, MID_LIFE_SCAN)
            if job.name is None and reconciler.owns(job)
        ]
        error = ""
        try:
            learnt = await reconciler.reconcile(gap, open_jobs, mid_life, self._known)
        except Exception as exc:
            log.warning("%s: reconciling failed: %s", gap.source, exc)
            # Only the error's type: its message may name hosts, and the summary is shown.
            learnt = Reconciled()
            error = f"; asking the deployment failed ({type(exc).__name__}, see the log)"
        unknown = [unknown_event(job, gap) for job in open_jobs if job.id not in learnt.settled]
        admitted = self._admit(Normalized(job_events=[*learnt.events, *unknown]))
        if admitted.job_events:
            self._sink.put_events(admitted.job_events, [])
        counts = learnt.counts + Counter({"unknown": len(unknown)} if unknown else {})
        told = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
        told = told or "nothing to correct"
        return f"{len(open_jobs)} open jobs: {told}{error}"

    async def _known(self, job_ids: Sequence[str]) -> set[str]:
        known: set[str] = set()
        for i in range(0, len(job_ids), MAX_PAGE):
            query = JobQuery(ids=frozenset(job_ids[i : i + MAX_PAGE]), limit=MAX_PAGE)
            known |= {job.id for job in (await self._storage.list_jobs(query)).jobs}
        return known

    async def _jobs(self, query: JobQuery, at_most: int | None) -> list[Job]:
        jobs: list[Job] = []
        while at_most is None or len(jobs) < at_most:
            page = await self._storage.list_jobs(query)
            jobs += page.jobs
            if page.next_cursor is None:
                break
            query = attrs.evolve(query, cursor=page.next_cursor)
        return jobs

"""A web replica's live updates: what the agents store, heard through the database.

A replica (``sluice web``) reads no broker and stores (nearly) nothing, yet its
dashboards are live: the agents' writes are announced by the database
(``Storage.change_feed``: PostgreSQL's LISTEN/NOTIFY, with ids, not rows), and
:class:`Follower` reads the rows that changed and publishes them on the replica's
own bus, as ``Engine._publish`` does where the rows are written. With nobody
watching it reads nothing. Announcements are not kept for a listener that is
away: each time the feed (re)connects, every stream resyncs (``Bus.missed``).
"""

from __future__ import annotations

import logging

import trio

from sluice_core.bus import WINDOW_S, Bus
from sluice_core.model import Job
from sluice_core.storage import MAX_PAGE, Change, ChangeFeed, JobQuery, Storage

log = logging.getLogger(__name__)


class Follower:
    def __init__(self, storage: Storage, feed: ChangeFeed, bus: Bus) -> None:
        self._storage = storage
        self._feed = feed
        self._bus = bus
        self._jobs: dict[str, bool] = {}  # id -> stored for the first time; in order heard
        self._workers: set[str] = set()
        self._heard = trio.Event()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._feed.follow, self._on_change, self._on_gap)
            read_at = float("-inf")
            while True:
                await self._heard.wait()
                # At most one read a bus window (WINDOW_S), and none waits when the last
                # was longer ago: what is heard meanwhile is read together.
                await trio.sleep_until(read_at + WINDOW_S)
                self._heard = trio.Event()
                read_at = trio.current_time()
                try:
                    await self._publish()
                except Exception as exc:  # the database may be away: streams resync
                    log.warning("web replica: reading what changed failed: %s", exc)
                    self._bus.missed()

    def _on_change(self, change: Change) -> None:
        for i, job_id in enumerate(change.jobs):
            self._jobs[job_id] = self._jobs.get(job_id, False) or i < change.new_jobs
        self._workers.update(change.workers)
        if change.queues:
            if self._bus.wanted:
                self._bus.publish_samples(change.queues)
            else:
                self._bus.skip(len(change.queues))
        self._heard.set()

    def _on_gap(self) -> None:
        self._jobs.clear()
        self._workers.clear()
        self._bus.missed()

    async def _publish(self) -> None:
        jobs, self._jobs = self._jobs, {}
        hostnames, self._workers = self._workers, set()
        if not self._bus.wanted:
            self._bus.skip(len(jobs) + len(hostnames))
            return
        ids = list(jobs)
        new = [job_id for job_id in ids if jobs[job_id]]
        rows: dict[str, Job] = {}
        for start in range(0, len(ids), MAX_PAGE):
            chunk = frozenset(ids[start : start + MAX_PAGE])
            page = await self._storage.list_jobs(JobQuery(ids=chunk, limit=MAX_PAGE))
            rows.update((job.id, job) for job in page.jobs)
        # New jobs first, in the order they were stored, as Bus.publish_jobs expects.
        ordered = [rows[i] for i in new if i in rows]
        ordered += [rows[i] for i in ids if i in rows and not jobs[i]]
        self._bus.publish_jobs(ordered, new=sum(1 for i in new if i in rows))
        if hostnames:
            workers = await self._storage.list_workers()
            self._bus.publish_workers([w for w in workers if w.hostname in hostnames])
        # These reads are the replica's windows already (at most one a WINDOW_S): what
        # they read goes out now. Left open, the window would close on the bus's own
        # cadence, whose phase to the reads is any: rows waited up to another window.
        self._bus.close_window()

"""PostgreSQL's day partitions of ``jobs`` and ``job_events`` (migration 0013).

A job is stored in the partition of the UTC day it was first stored, its events beside
it, and stays there: ``day`` never changes, but for the one move below. Day 0, the kept
partition (``jobs_kept``, ``job_events_kept``), holds what was stored before the
migration and what the policy keeps past its day's drop.

Expiry (``PostgresStorage._expire_day``), once a day is past the completed jobs'
retention whole:

1. the jobs of that day the policy still keeps (open or unknown ones, failed ones inside
   their longer retention, a rule's longer one, one a late event moved) move to day 0 with
   their events and their share of the overview's counts, in short transactions that
   lock rows as ingest does;
2. one last transaction (:func:`drop`) locks both tables, moves what changed meanwhile,
   deletes the day's counts (one statement each: they are kept by day) and detaches the
   two partitions, which :func:`discard_detached` then drops in a transaction of its own.
   No expired row is deleted one by one: the drop takes them all, whatever their number.

Partitions are created ahead (:func:`ensure`) by every writer that needs today's, under an
advisory lock, so two processes never race to create one.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections import Counter
from typing import Any, Final

import psycopg

from sluice_core.model import JobState
from sluice_core.retention import DAY, RetentionPolicy
from sluice_core.storage import Pruned
from sluice_storage import common
from sluice_storage.common import JOB_COLUMNS, cols

KEPT: Final = 0  # the day of the kept partition
AHEAD: Final = 2  # days created past today
PARTITIONS_LOCK: Final = 5_811_501  # advisory lock: one creator (or dropper) at a time
# The drop's lock on both tables waits no longer than this for the reads and writes in
# flight (every new one queues behind it meanwhile); the next prune tries again.
DROP_LOCK_TIMEOUT: Final = "2s"
_BOUND = re.compile(r"FROM \((\d+)\) TO")
_ADD_COUNTS: Final = common.add_counts_sql("%s", "0")  # a move's counts: shard 0


def day_of(at: float) -> int:
    """The day (since 1970-01-01, UTC) that holds epoch second ``at``."""
    return int(at // DAY)


def names(day: int) -> tuple[str, str]:
    """The two partitions of a day: ``jobs_20261206``, ``job_events_20261206``."""
    if day == KEPT:
        return "jobs_kept", "job_events_kept"
    date = dt.datetime.fromtimestamp(day * DAY, dt.UTC).strftime("%Y%m%d")
    return f"jobs_{date}", f"job_events_{date}"


def days(conn: psycopg.Connection[Any]) -> list[int]:
    """The days ``jobs`` has partitions for, oldest first (0, the kept one, included)."""
    rows = conn.execute(
        "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'jobs'::regclass"
    ).fetchall()
    return sorted(int(m.group(1)) for (bound,) in rows if (m := _BOUND.search(bound)))


def ensure(conn: psycopg.Connection[Any], first: int, last: int) -> None:
    """Create the missing partitions of days ``first`` to ``last``, in a transaction."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITIONS_LOCK,))
    have = set(days(conn))
    for day in range(first, last + 1):
        if day in have:
            continue
        jobs, events = names(day)
        bounds = f"FOR VALUES FROM ({day}) TO ({day + 1})"
        # Unique per partition: a partitioned table's unique index would have to hold day.
        conn.execute(f"CREATE TABLE {jobs} PARTITION OF jobs {bounds}")
        conn.execute(f"CREATE UNIQUE INDEX {jobs}_id ON {jobs} (id)")
        conn.execute(f"CREATE INDEX {jobs}_seq ON {jobs} (seq)")
        conn.execute(f"CREATE TABLE {events} PARTITION OF job_events {bounds}")
        conn.execute(f"CREATE UNIQUE INDEX {events}_job_id ON {events} (job_id, id)")


def _like_prefix(glob: str) -> str | None:
    """A LIKE pattern every name ``glob`` matches starts with; None when it has no
    literal start (every name must be looked at)."""
    literal = re.split(r"[*?\[]", glob, maxsplit=1)[0]
    if not literal:
        return None
    return re.sub(r"([\\%_])", r"\\\1", literal) + "%"


# Every state but completed, spelt out: ``state = ANY`` is read from the (state, seq)
# index, ``state <> 'completed'`` would read the whole day.
_NOT_COMPLETED: Final = sorted(s.value for s in JobState if s is not JobState.COMPLETED)


def _kept_candidates(
    policy: RetentionPolicy, now: float, by_name: bool
) -> tuple[str, list[Any]]:
    """SQL over a day's jobs finding every one the policy may keep (each then judged by
    :meth:`RetentionPolicy.expired`), from indexes: anything not completed, a completed
    job inside the default retention, and (``by_name``) one a longer rule may keep, by its
    name's literal start. The drop's own look (``by_name`` False, under its lock) is for
    what changed since the jobs moved: a state, a later event; not a name."""
    where = ["state = ANY(%s)", "updated_at >= %s", "updated_at IS NULL"]
    params: list[Any] = [_NOT_COMPLETED, now - policy.days * DAY]
    for glob in policy.longer_patterns() if by_name else ():
        prefix = _like_prefix(glob)
        if prefix is None:
            return "true", []
        where.append("name LIKE %s")
        params.append(prefix)
    return " OR ".join(where), params


def move_kept(
    conn: psycopg.Connection[Any], day: int, seqs: list[int], policy: RetentionPolicy, now: float
) -> int:
    """Move to day 0 the jobs (by seq) of ``day`` the policy keeps, as they are now: step 1
    of an expiry, in transactions of their own, and again in the drop's."""
    rows = conn.execute(
        f"SELECT {cols(JOB_COLUMNS)} FROM jobs WHERE day = %s AND seq = ANY(%s)"
        " ORDER BY id FOR UPDATE",  # locked as ingest locks: in id order
        (day, seqs),
    ).fetchall()
    kept = [
        job
        for job in map(common.job_from_row, rows)
        if not policy.expired(job.state, job.name, job.updated_at, now)
    ]
    if not kept:
        return 0
    ids = [job.id for job in kept]
    conn.execute(
        "UPDATE job_events SET day = %s WHERE day = %s AND job_id = ANY(%s)", (KEPT, day, ids)
    )
    conn.execute("UPDATE jobs SET day = %s WHERE day = %s AND id = ANY(%s)", (KEPT, day, ids))
    rollup = common.Rollup()
    for job in kept:
        rollup.count(job, -1, day)
        rollup.count(job, 1, KEPT)
    common.write_counts(conn.cursor(), _ADD_COUNTS, rollup)
    return len(kept)


def kept_seqs(
    conn: psycopg.Connection[Any],
    day: int,
    policy: RetentionPolicy,
    now: float,
    by_name: bool = True,
) -> list[tuple[int, str]]:
    """The seqs and states of the jobs of ``day`` the policy keeps (a read, no lock)."""
    where, params = _kept_candidates(policy, now, by_name)
    rows = conn.execute(
        f"SELECT seq, state, name, updated_at FROM jobs WHERE day = %s AND ({where})",
        (day, *params),
    ).fetchall()
    return [
        (seq, state)
        for seq, state, name, updated_at in rows
        if not policy.expired(JobState(state), name, updated_at, now)
    ]


_DETACHED = re.compile(r"^(jobs|job_events)_\d{8}$")


def discard_detached(conn: psycopg.Connection[Any]) -> int:
    """Drop the day tables a drop detached (or left detached, stopped before this):
    tables named as day partitions that are no partitions. Returns how many."""
    tables = [
        name
        for (name,) in conn.execute(
            "SELECT relname FROM pg_class WHERE relkind = 'r' AND NOT relispartition"
            " AND relnamespace = 'public'::regnamespace"
            " AND (relname LIKE 'jobs\\_%' OR relname LIKE 'job\\_events\\_%')"
        ).fetchall()
        if _DETACHED.match(name)
    ]
    for name in tables:
        conn.execute(f"DROP TABLE {name}")
    return len(tables)


def drop(
    conn: psycopg.Connection[Any],
    day: int,
    policy: RetentionPolicy,
    now: float,
    dry_run: bool,
    moved: int = 0,
) -> Pruned:
    """Step 2 of an expiry, one transaction: what the day still holds that the policy
    keeps moves to day 0 (``moved`` had, in step 1), then the day's counts go and its
    partitions are detached (:func:`discard_detached` drops them)."""
    started = time.perf_counter()
    jobs, events = names(day)
    kept: Counter[str] = Counter()  # a dry run's jobs that would move out first, by state
    if dry_run:
        kept.update(state for _, state in kept_seqs(conn, day, policy, now))
        moved = sum(kept.values())
    else:
        conn.execute(f"SET LOCAL lock_timeout = '{DROP_LOCK_TIMEOUT}'")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITIONS_LOCK,))
        # The parents, in ingest's order: dropping a partition locks its parent, and an
        # ingest holding the parent while it waits for the partition would deadlock.
        conn.execute("LOCK TABLE jobs, job_events IN ACCESS EXCLUSIVE MODE")
        seqs = [seq for seq, _ in kept_seqs(conn, day, policy, now, by_name=False)]
        moved += move_kept(conn, day, seqs, policy, now) if seqs else 0
    # What goes with the day, by state, from its counts (kept by day); in a dry run, less
    # what would move first.
    stored = conn.execute(
        "SELECT state, sum(jobs) FROM job_states WHERE day = %s GROUP BY state", (day,)
    ).fetchall()
    by_state = {state: n for state, total in stored if (n := int(total) - kept[state])}
    size = conn.execute(
        "SELECT pg_total_relation_size(%s) + pg_total_relation_size(%s)", (jobs, events)
    ).fetchone()
    assert size is not None  # an aggregate: always one row
    if not dry_run:
        for table in ("job_states", "job_finished", "job_failures"):
            conn.execute(f"DELETE FROM {table} WHERE day = %s", (day,))
        # Detached, not dropped: a drop unlinks the files at commit (243 ms for a 300,000
        # job day here, more for larger ones), all of it under this lock. Their own
        # transaction drops them after (discard_detached), holding nothing ingest needs.
        conn.execute(f"ALTER TABLE jobs DETACH PARTITION {jobs}")
        conn.execute(f"ALTER TABLE job_events DETACH PARTITION {events}")
        conn.execute(
            "INSERT INTO dropped_partitions (day, dropped_at, jobs, kept) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (day) DO UPDATE SET dropped_at = excluded.dropped_at,"
            " jobs = excluded.jobs, kept = excluded.kept",
            (day, now, sum(by_state.values()), moved),
        )
    return Pruned(
        by_state,
        dry_run=dry_run,
        partitions=1,
        dropped_jobs=sum(by_state.values()),
        moved_jobs=moved,
        dropped_bytes=int(size[0] or 0),
        longest_drop_s=time.perf_counter() - started,
    )


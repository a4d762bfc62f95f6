"""Celery's result backend, read-only, without Celery: the outcomes of jobs Sluice missed.

``--result-backend URL`` names the application's ``result_backend``. Two kinds are read:

- Redis (``redis://``, ``rediss://``): one key per job, ``celery-task-meta-<id>``
  (after the application's ``global_keyprefix``, if it sets one), a JSON object
  ``{"status", "result", "traceback", "date_done", "task_id", ...}``;
- the database backend (``db+postgresql://...``, ``db+sqlite:///...``): the
  ``celery_taskmeta`` table, one row per job, read with psycopg or sqlite3.

Only the ``json`` result serializer is read: a pickled value is never unpickled (it
could run anything). With ``result_extended`` the backend also keeps the job's name,
arguments, worker and queue, which name a job Sluice never saw.
"""

from __future__ import annotations

import datetime as dt
import functools
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs
import orjson
import psycopg
import redis
import trio

from sluice_celery.control import RedisClient
from sluice_core.config import ConfigError, redact_url
from sluice_core.model import JobState

TASK_KEYPREFIX = "celery-task-meta-"
TABLE = "celery_taskmeta"
# Backend states that are outcomes; the others (PENDING, STARTED, RETRY) tell nothing new.
OUTCOMES = {
    "SUCCESS": JobState.COMPLETED,
    "FAILURE": JobState.FAILED,
    "REVOKED": JobState.REVOKED,
}
CHUNK = 500  # ids per MGET or SELECT
SCAN_MAX = 200_000  # keys a Redis backend's scan for a gap's outcomes looks at, at most


@attrs.frozen
class Outcome:
    """A finished job as the result backend keeps it."""

    job_id: str
    state: JobState
    finished_at: float  # the backend's date_done
    result: str | None = None  # the return value's repr
    exception: str | None = None
    traceback: str | None = None
    # With result_extended only.
    name: str | None = None
    args: str | None = None
    kwargs: str | None = None
    worker: str | None = None
    queue: str | None = None
    retries: int | None = None


class ResultBackend(Protocol):
    url: str  # without credentials

    async def outcomes(self, job_ids: Sequence[str]) -> dict[str, Outcome]:
        """The outcomes the backend holds for these jobs (those without one left out)."""

    async def finished_between(self, start: float, end: float) -> list[Outcome]:
        """Every outcome stored with a ``date_done`` in ``[start, end]``."""

    async def aclose(self) -> None: ...


def open_backend(url: str, *, keyprefix: str = "") -> ResultBackend:
    """The reader for a ``result_backend`` URL; ConfigError for a kind Sluice cannot read."""
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss"):
        return RedisResultBackend(url, keyprefix=keyprefix)
    if scheme.startswith("db+"):
        return DatabaseResultBackend(url)
    raise ConfigError(
        f"--result-backend {redact_url(url)}: Sluice reads Redis (redis://) and database"
        " (db+postgresql://, db+sqlite:///) result backends"
    )


def epoch(value: Any) -> float | None:
    """A date_done: an ISO string (Redis) or a datetime (database), UTC when naive."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, dt.datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


def _json(value: Any) -> Any:
    """A JSON-serialized value (str or bytes); None when it is not JSON (pickle)."""
    if value is None:
        return None
    try:
        return orjson.loads(value)
    except (orjson.JSONDecodeError, TypeError):
        return None


def _exception(result: Any, traceback: str | None) -> str | None:
    """The exception as Celery's events show it, ``ValueError('boom')``, from the
    backend's ``{"exc_type", "exc_message"}``; else the traceback's last line."""
    if isinstance(result, dict) and isinstance(result.get("exc_type"), str):
        message = result.get("exc_message")
        parts = message if isinstance(message, list) else [message]
        return f"{result['exc_type']}({', '.join(map(repr, parts))})"
    if traceback:
        return traceback.rstrip().rpartition("\n")[2] or None
    return None


def _repr_args(value: Any) -> str | None:
    if isinstance(value, list):
        return repr(tuple(value))
    return None if value is None else repr(value)


def outcome(meta: dict[str, Any], job_id: str | None = None) -> Outcome | None:
    """An :class:`Outcome` of a backend's meta (Redis JSON, or a table row as a dict);
    None when it is no outcome (yet) or not readable."""
    status = meta.get("status")
    state = OUTCOMES.get(status) if isinstance(status, str) else None
    finished_at = epoch(meta.get("date_done"))
    job_id = job_id or meta.get("task_id")
    if state is None or finished_at is None or not isinstance(job_id, str):
        return None
    result = meta.get("result")
    traceback = meta.get("traceback") if isinstance(meta.get("traceback"), str) else None
    retries = meta.get("retries")
    kwargs = meta.get("kwargs")
    return Outcome(
        job_id=job_id,
        state=state,
        finished_at=finished_at,
        result=repr(result) if state is JobState.COMPLETED and result is not None else None,
        exception=None if state is JobState.COMPLETED else _exception(result, traceback),
        traceback=traceback,
        name=_str(meta.get("name")),
        args=_repr_args(meta.get("args")),
        kwargs=repr(kwargs) if isinstance(kwargs, dict) else None,
        worker=_str(meta.get("worker")),
        queue=_str(meta.get("queue")),
        retries=retries if isinstance(retries, int) else None,
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# -- Redis --------------------------------------------------------------------------


class RedisResultBackend:
    def __init__(self, url: str, *, keyprefix: str = "") -> None:
        self._client = RedisClient(url, keyprefix=keyprefix)
        self.url = self._client.url
        if keyprefix and keyprefix[-1] not in ":_-.":
            keyprefix += "_"  # as Celery completes it (BaseKeyValueStoreBackend)
        self._prefix = keyprefix + TASK_KEYPREFIX

    async def outcomes(self, job_ids: Sequence[str]) -> dict[str, Outcome]:
        found: dict[str, Outcome] = {}
        for i in range(0, len(job_ids), CHUNK):
            chunk = list(job_ids[i : i + CHUNK])
            values = await self._client.call(functools.partial(_mget, self._prefix, chunk))
            for job_id, value in zip(chunk, values, strict=True):
                meta = _json(value)
                if isinstance(meta, dict) and (done := outcome(meta, job_id)) is not None:
                    found[job_id] = done
        return found

    async def finished_between(self, start: float, end: float) -> list[Outcome]:
        def scan(r: redis.Redis) -> list[Any]:
            found: list[Any] = []
            keys: list[Any] = []
            for seen, key in enumerate(r.scan_iter(match=self._prefix + "*", count=1000), 1):
                keys.append(key)
                if len(keys) == CHUNK:
                    found += r.mget(keys)
                    keys = []
                if seen >= SCAN_MAX:
                    break
            if keys:
                found += r.mget(keys)
            return found

        values = await self._client.call(scan)
        return _between(
            (done for value in values if isinstance(meta := _json(value), dict)
             if (done := outcome(meta)) is not None),
            start,
            end,
        )

    async def aclose(self) -> None:
        await self._client.aclose()


def _mget(prefix: str, job_ids: list[str], r: redis.Redis) -> list[Any]:
    return list(r.mget([prefix + job_id for job_id in job_ids]))


def _between(outcomes: Iterable[Outcome], start: float, end: float) -> list[Outcome]:
    return [done for done in outcomes if start <= done.finished_at <= end]


# -- the database backend -------------------------------------------------------------

# Extended columns (result_extended) may be missing: the basic table has the first six.
_BASIC = ("task_id", "status", "result", "date_done", "traceback")
_EXTENDED = ("name", "args", "kwargs", "worker", "retries", "queue")


class DatabaseResultBackend:
    """``celery_taskmeta`` on PostgreSQL (psycopg) or SQLite (sqlite3, read-only)."""

    def __init__(self, url: str) -> None:
        # db+postgresql+psycopg2://... -> postgresql://...; db+sqlite:///path -> the path.
        rest = url.removeprefix("db+")
        scheme, sep, tail = rest.partition("://")
        self._dialect = scheme.split("+", 1)[0]
        if not sep or self._dialect not in ("postgresql", "sqlite"):
            raise ConfigError(
                f"--result-backend {redact_url(url)}: Sluice reads database result backends"
                " on PostgreSQL (db+postgresql://) and SQLite (db+sqlite:///path)"
            )
        self._target = f"postgresql://{tail}" if self._dialect == "postgresql" else tail[1:]
        self.url = redact_url(url)
        self._columns: list[str] | None = None
        self._limiter = trio.CapacityLimiter(1)

    async def outcomes(self, job_ids: Sequence[str]) -> dict[str, Outcome]:
        found: dict[str, Outcome] = {}
        for i in range(0, len(job_ids), CHUNK):
            chunk = list(job_ids[i : i + CHUNK])
            marks = ", ".join([self._mark] * len(chunk))
            for done in await self._select(f"task_id IN ({marks})", chunk):
                found[done.job_id] = done
        return found

    async def finished_between(self, start: float, end: float) -> list[Outcome]:
        # date_done is naive UTC; compared as such (text on SQLite sorts as the time does).
        since, until = (
            dt.datetime.fromtimestamp(ts, dt.UTC).replace(tzinfo=None) for ts in (start, end)
        )
        args: list[Any] = [since, until]
        if self._dialect == "sqlite":
            args = [when.isoformat(" ") for when in (since, until)]
        rows = await self._select(f"date_done BETWEEN {self._mark} AND {self._mark}", args)
        return _between(rows, start, end)

    async def aclose(self) -> None:
        pass  # a connection per call: nothing held

    @property
    def _mark(self) -> str:
        return "%s" if self._dialect == "postgresql" else "?"

    async def _select(self, where: str, args: Sequence[Any]) -> list[Outcome]:
        return await trio.to_thread.run_sync(self._select_sync, where, args, limiter=self._limiter)

    def _select_sync(self, where: str, args: Sequence[Any]) -> list[Outcome]:
        if self._dialect == "postgresql":
            with psycopg.connect(self._target, connect_timeout=10) as conn:
                conn.read_only = True
                return self._query(conn, where, args)
        lite = sqlite3.connect(f"file:{self._target}?mode=ro", uri=True, timeout=10)
        try:
            return self._query(lite, where, args)
        finally:
            lite.close()

    def _query(self, conn: Any, where: str, args: Sequence[Any]) -> list[Outcome]:
        if self._columns is None:
            present = {
                column.lower()
                for column in _column_names(conn.execute(f"SELECT * FROM {TABLE} LIMIT 0"))
            }
            self._columns = [c for c in (*_BASIC, *_EXTENDED) if c in present]
        columns = self._columns
        rows = conn.execute(f"SELECT {', '.join(columns)} FROM {TABLE} WHERE {where}", args)
        found = []
        for row in rows.fetchall():
            meta = dict(zip(columns, row, strict=True))
            for name in ("result", "args", "kwargs"):
                meta[name] = _json(meta.get(name))
            if isinstance(meta["date_done"], str):  # SQLite keeps datetimes as text
                meta["date_done"] = meta["date_done"].replace(" ", "T")
            if (done := outcome(meta)) is not None:
                found.append(done)
        return found


def _column_names(cursor: Any) -> list[str]:
    return [str(column[0]) for column in cursor.description or ()]

"""Values from outside, made safe to store and to show before anything else sees them.

Every event that enters Sluice from outside passes :func:`check` once, in one of two
doors: what a normalizer plugin makes of a broker's messages
(:meth:`sluice_core.plugins.PluginManager.normalize`, for every plugin) and the
normalized events an agent pushes to the ingest endpoint (``web/ingest.py``). Storage,
the fold and the web layer rely on what it guarantees:

- a timestamp from 2000 to 2100 (:data:`EARLIEST`, :data:`LATEST`), else the event is
  rejected: a time that far off is a broken clock or a unit mistake (milliseconds sent as
  seconds), no date shows it, and it would win every fold of its job;
- ids (the event's, its job's) non-empty, at most :data:`NAME_MAX` characters, without
  control characters, else the event is rejected: an id is an identity, never altered;
- integers within their columns (``retries``, ``active``, ``pid``: PostgreSQL's
  ``integer``; ``processed``: ``bigint``, as it grows with a worker's life), other numbers
  finite and plausible, else the value is dropped: unknown, rather than a made-up clamp;
- names (job name, queue, worker, hostname, framework, event type, a framework's flat
  extras such as an exchange): control characters stripped, at most :data:`NAME_MAX`
  characters. They are index keys, metric labels, parts of URLs and of the page;
- free text (args, kwargs, result, exception, traceback): NUL replaced (no PostgreSQL
  text or jsonb value holds one), at most :data:`TEXT_MAX` characters, cut with a marker;
- ``extra``: JSON only, NUL replaced at any depth, each value at most
  :data:`EXTRA_VALUE_MAX` bytes of JSON.

Rejected and corrected events are counted by reason (:data:`REASONS`) in the batch's
:class:`~sluice_core.model.Normalized`; the pipeline and the ingest endpoint export them
as ``sluice_events_malformed_total{reason}``. Events Sluice makes itself (the worker
monitor's, the actions' audit events) are trusted and do not pass here.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

import attrs
import orjson

from sluice_core.model import JobEvent, JobState, Normalized, WorkerEvent

log = logging.getLogger(__name__)

EARLIEST: Final = 946_684_800.0  # 2000-01-01T00:00:00Z
LATEST: Final = 4_102_444_800.0  # 2100-01-01T00:00:00Z
INT32_MAX: Final = 2**31 - 1
INT64_MAX: Final = 2**63 - 1
# PostgreSQL's B-tree indexes take keys up to 2,704 bytes: 512 characters of up to four
# UTF-8 bytes each fit, with room for the index's other column.
NAME_MAX: Final = 512
TEXT_MAX: Final = 65_536  # characters; Celery's own reprs stop at 1,024, tracebacks at a few k
EXTRA_VALUE_MAX: Final = 256 * 1024  # bytes of JSON; an SDK's captured message is below it
LOADAVG_MAX: Final = 16  # numbers (Celery sends three)
LOAD_MAX: Final = 1e9  # each of them
FREQ_MAX: Final = 86_400.0  # seconds between heartbeats
RUNTIME_MAX: Final = 366 * 86_400.0  # seconds

# Why an event was rejected or corrected: the ``reason`` of sluice_events_malformed_total.
MALFORMED: Final = "malformed"  # not an event (undecodable, a required field missing or mistyped)
UNCLAIMED: Final = "unclaimed"  # no loaded plugin reads this kind of message
TIMESTAMP: Final = "timestamp"
ID: Final = "id"
OUT_OF_RANGE: Final = "out_of_range"
CONTROL_CHARACTERS: Final = "control_characters"
TOO_LONG: Final = "too_long"
NOT_JSON: Final = "not_json"
# What each means to an operator (the dashboard's diagnostics page).
MEANINGS: Final = {
    MALFORMED: "refused: not an event (undecodable, or a required field missing or mistyped)",
    UNCLAIMED: "refused: no loaded plugin reads this kind of message",
    TIMESTAMP: "refused: stamped before 2000 or after 2100 (a clock wrong, or in milliseconds)",
    ID: f"refused: its id or its job's is empty, longer than {NAME_MAX} characters or holds"
    " control characters",
    OUT_OF_RANGE: "corrected: a number beyond what it can be (a count past its column, a"
    " negative or infinite time) is left unknown",
    CONTROL_CHARACTERS: "corrected: control characters taken out of names, NUL replaced in text",
    TOO_LONG: f"corrected: a name cut at {NAME_MAX} characters, a text at {TEXT_MAX}, an extra"
    f" value past {EXTRA_VALUE_MAX // 1024} KiB of JSON dropped",
    NOT_JSON: "corrected: an extra value that is not JSON, stored as its text",
}
REASONS: Final = tuple(MEANINGS)

# C0, DEL and C1: nothing a name needs, and NUL is what PostgreSQL refuses outright.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NUL = re.compile("\x00")  # the one character free text loses: tabs and newlines are its own
_NAME_FIELDS = frozenset(
    {"name", "queue", "parent_id", "root_id", "eta", "expires", "retry_of", "retried_as"}
)
_TEXT_FIELDS = frozenset({"args", "kwargs", "result", "exception", "traceback"})
REPLACEMENT = "\ufffd"  # what a NUL in free text becomes: visibly something that was there


class Rejected(ValueError):
    """An event Sluice will not store; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# -- values --------------------------------------------------------------------


def cut(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    marker = f"…[truncated: {len(text) - limit} more characters]"
    keep = max(0, limit - len(marker) - 1)  # the count may take one digit more
    return text[:keep] + f"…[truncated: {len(text) - keep} more characters]"


def _clean(
    value: str, found: set[str], limit: int, control: re.Pattern[str], replacement: str
) -> str:
    if control.search(value) is not None:
        value = control.sub(replacement, value)
        found.add(CONTROL_CHARACTERS)
    if len(value) > limit:
        value = cut(value, limit)
        found.add(TOO_LONG)
    return value


def _name(value: str, found: set[str], limit: int = NAME_MAX) -> str:
    return _clean(value, found, limit, _CONTROL, "")


def _text(value: str, found: set[str]) -> str:
    return _clean(value, found, TEXT_MAX, _NUL, REPLACEMENT)


def _integer(value: object, maximum: int, found: set[str]) -> int | None:
    if type(value) is int and 0 <= value <= maximum:
        return value
    found.add(OUT_OF_RANGE)
    return None


def _number(value: object, maximum: float, found: set[str], *, positive: bool = False) -> Any:
    # Comparisons, not float(): a 400-digit integer compares, but does not convert.
    # NaN and infinities fail them too.
    if (
        isinstance(value, int | float)
        and type(value) is not bool
        and (value > 0 if positive else value >= 0)
        and value <= maximum
    ):
        return value
    found.add(OUT_OF_RANGE)
    return None


def _json(value: Any, found: set[str]) -> Any:
    """``value`` as JSON that both backends store: NUL replaced, anything else made text."""
    kind = type(value)
    if kind is str:
        if "\x00" in value:
            found.add(CONTROL_CHARACTERS)
            return value.replace("\x00", REPLACEMENT)
        return value
    if kind is dict:
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                found.add(NOT_JSON)
            out[_json(str(key), found)] = _json(item, found)
        return out
    if kind is list or kind is tuple:
        return [_json(item, found) for item in value]
    if value is None or kind is bool:
        return value
    if kind is float and math.isfinite(value):
        return value
    if kind is int and -(2**63) <= value < 2**64:  # what a JSON number carries
        return value
    found.add(NOT_JSON)
    return None if kind is float else _json(repr(value), found)


def _extra(extra: dict[str, Any], found: set[str]) -> dict[str, Any]:
    """A framework's extras: flat values are labels (a broker, an exchange, a routing key),
    nested ones data (an SDK's captured message), which keep every character but NUL."""
    if not extra:
        return extra
    if type(extra) is not dict:
        found.add(NOT_JSON)
        return {"value": _json(extra, found)}
    try:
        data: bytes | None = orjson.dumps(extra)
    except TypeError:  # orjson.JSONEncodeError: a plugin's object, an int past 64 bits...
        data = None
    out = extra
    if data is None or b"\\u0000" in data:
        # Flat strings are left for the loop below: a label loses its NUL, not gains a mark.
        out = {
            _json(str(key), found): value if type(value) is str else _json(value, found)
            for key, value in extra.items()
        }
        if any(type(key) is not str for key in extra):
            found.add(NOT_JSON)
    for key, value in list(out.items()):
        if type(value) is str:
            cleaned = _name(value, found, TEXT_MAX)
        elif data is not None and len(data) <= EXTRA_VALUE_MAX:
            continue  # the whole is small enough, so is each value
        else:
            size = len(orjson.dumps(value))
            if size <= EXTRA_VALUE_MAX:
                continue
            found.add(TOO_LONG)
            cleaned = f"[dropped by Sluice: {size} bytes of JSON, more than {EXTRA_VALUE_MAX}]"
        if cleaned is not value:
            if out is extra:
                out = dict(extra)
            out[key] = cleaned
    return out


def _id(value: object, what: str) -> None:
    if type(value) is not str or not value or len(value) > NAME_MAX or _CONTROL.search(value):
        raise Rejected(ID, f"{what} {value!r:.80} is not an id (1 to {NAME_MAX} characters,"
                           " no control characters)")


def _timestamp(value: object) -> float:
    if isinstance(value, int | float) and type(value) is not bool and EARLIEST <= value < LATEST:
        return value if type(value) is float else float(value)
    raise Rejected(TIMESTAMP, f"timestamp {value!r:.40} is not between 2000 and 2100"
                              " (epoch seconds: a clock in milliseconds?)")


# -- events --------------------------------------------------------------------


def _plain(strings: list[Any], limit: int, control: re.Pattern[str]) -> bool:
    """Whether each of ``strings`` is a string short enough, none holding ``control``.

    One search over all of them: nearly every event is plain, and a search per value
    cost as much again as normalizing the event."""
    try:
        joined = "".join(strings)
    except TypeError:  # not all strings
        return False
    if len(joined) > limit and any(len(value) > limit for value in strings):
        return False
    return control.search(joined) is None


def _names(obj: Any, attrs_: tuple[str, ...], found: set[str], changes: dict[str, Any]) -> None:
    """Clean the name attributes of an event that are not plain; None drops an optional one."""
    for attr in attrs_:
        value = getattr(obj, attr)
        if value is None and attr in _OPTIONAL_NAMES:
            continue
        if type(value) is not str:
            if attr not in _OPTIONAL_NAMES:
                raise Rejected(MALFORMED, f"{attr} is a {type(value).__name__}, not a string")
            found.add(MALFORMED)
            changes[attr] = None
            continue
        cleaned = _name(value, found)
        if cleaned is not value:
            changes[attr] = cleaned


_JOB_NAMES = ("framework", "type", "worker")
_WORKER_NAMES = ("hostname", "framework", "type", "sw_ver")
_OPTIONAL_NAMES = frozenset({"worker", "sw_ver"})


def job_event(event: JobEvent, found: set[str]) -> JobEvent:
    """The event as Sluice may store it, adding to ``found`` the reasons of what was
    corrected; :class:`Rejected` if it cannot be stored at all."""
    if event.state is not None and not isinstance(event.state, JobState):
        raise Rejected(MALFORMED, f"state {event.state!r:.40} is not a job state")
    changes: dict[str, Any] = {}
    timestamp = event.timestamp
    if not (type(timestamp) is float and EARLIEST <= timestamp < LATEST):
        changes["timestamp"] = _timestamp(timestamp)
    names = [event.id, event.job_id, event.framework, event.type]
    if event.worker is not None:
        names.append(event.worker)
    texts, numbers = [], False
    for key, value in event.fields.items():
        if key in _NAME_FIELDS:
            names.append(value)
        elif key in _TEXT_FIELDS:
            texts.append(value)
        else:
            numbers = True
    plain = bool(
        event.id and event.job_id
        and _plain(names, NAME_MAX, _CONTROL) and (not texts or _plain(texts, TEXT_MAX, _NUL))
    )
    if not plain:
        _id(event.id, "event id")
        _id(event.job_id, "job id")
        _names(event, _JOB_NAMES, found, changes)
    if numbers or not plain:
        fields = _fields(event.fields, found, strings=not plain)
        if fields is not event.fields:
            changes["fields"] = fields
    if event.extra:
        extra = _extra(event.extra, found)
        if extra is not event.extra:
            changes["extra"] = extra
    return attrs.evolve(event, **changes) if changes else event


def _fields(fields: dict[str, Any], found: set[str], *, strings: bool) -> dict[str, Any]:
    """``fields`` with each value checked; names and texts only if ``strings`` (else they
    are known plain)."""
    out = fields
    for key, value in fields.items():
        cleaned: Any
        if value is None:
            continue
        if key in _NAME_FIELDS or key in _TEXT_FIELDS:
            if not strings:
                continue
            if type(value) is not str:
                cleaned = None
                found.add(MALFORMED)
            elif key in _TEXT_FIELDS:
                cleaned = _text(value, found)
            else:
                cleaned = _name(value, found)
        elif key == "retries":
            cleaned = _integer(value, INT32_MAX, found)
        elif key == "runtime":
            cleaned = _number(value, RUNTIME_MAX, found)
        else:  # not a job field: kept as the JSON it must be
            cleaned = _json(value, found)
        if cleaned is not value:
            if out is fields:
                out = dict(fields)
            if cleaned is None:
                del out[key]
            else:
                out[key] = cleaned
    return out


def worker_event(event: WorkerEvent, found: set[str]) -> WorkerEvent:
    """As :func:`job_event`, for a worker's event."""
    changes: dict[str, Any] = {}
    timestamp = event.timestamp
    if not (type(timestamp) is float and EARLIEST <= timestamp < LATEST):
        changes["timestamp"] = _timestamp(timestamp)
    names = [event.hostname, event.framework, event.type]
    if event.sw_ver is not None:
        names.append(event.sw_ver)
    if not _plain(names, NAME_MAX, _CONTROL):
        _names(event, _WORKER_NAMES, found, changes)
    checks: tuple[tuple[str, Any], ...] = (
        ("active", lambda v: _integer(v, INT32_MAX, found)),
        ("processed", lambda v: _integer(v, INT64_MAX, found)),
        ("pid", lambda v: _integer(v, INT32_MAX, found)),
        ("freq", lambda v: _number(v, FREQ_MAX, found, positive=True)),
        ("loadavg", lambda v: _loadavg(v, found)),
    )
    for attr, check in checks:
        value = getattr(event, attr)
        if value is not None:
            cleaned = check(value)
            if cleaned is not value:
                changes[attr] = cleaned
    extra = _extra(event.extra, found)
    if extra is not event.extra:
        changes["extra"] = extra
    return attrs.evolve(event, **changes) if changes else event


def _loadavg(value: object, found: set[str]) -> list[float] | None:
    if (
        type(value) is list
        and len(value) <= LOADAVG_MAX
        and all(
            isinstance(x, int | float) and type(x) is not bool and -LOAD_MAX <= x <= LOAD_MAX
            for x in value
        )
    ):
        return value
    found.add(OUT_OF_RANGE)
    return None


# -- batches -------------------------------------------------------------------


def check(normalized: Normalized) -> Normalized:
    """Make every event of ``normalized`` safe, in place: corrected events replace theirs,
    rejected ones are left out, both counted by reason. Never raises."""
    normalized.job_events = _checked(normalized, normalized.job_events, job_event, "job_id")
    normalized.worker_events = _checked(
        normalized, normalized.worker_events, worker_event, "hostname"
    )
    return normalized


def _checked[E](
    normalized: Normalized, events: list[E], one: Callable[[E, set[str]], E], named_by: str
) -> list[E]:
    out = []
    found: set[str] = set()
    for event in events:
        try:
            out.append(one(event, found))
        except Exception as exc:  # Rejected, or a plugin's event of a shape the model forbids
            rejected = exc if isinstance(exc, Rejected) else Rejected(MALFORMED, str(exc))
            _rejected(normalized, rejected, f"{named_by} {getattr(event, named_by, None)!r:.80}")
            found.clear()
            continue
        if found:
            _corrected(normalized, found)
            found.clear()
    return out


def _corrected(normalized: Normalized, found: set[str]) -> None:
    normalized.corrected.update(found)
    if _throttle.allow():
        log.warning(
            "corrected an event from outside (%s); see sluice_events_malformed_total",
            ", ".join(sorted(found)),
        )


def _rejected(normalized: Normalized, exc: Rejected, whose: str) -> None:
    normalized.rejected[exc.reason] += 1
    normalized.problems.append(f"{whose}: {exc}")
    if _throttle.allow():
        log.warning("refused an event of %s: %s", whose, exc)


class Throttle:
    """Lets one call through per ``interval`` seconds and counts the others, so that a
    burst of bad input costs one log line, not one per message."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = float("-inf")
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.interval
        return True


_throttle = Throttle(10.0)


def count(normalized: Normalized) -> Counter[str]:
    """What the door refused or corrected in a batch, by reason (the malformed too)."""
    counts = normalized.rejected + normalized.corrected
    if normalized.malformed:
        counts[MALFORMED] += normalized.malformed
    return counts

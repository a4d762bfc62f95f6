"""The job-list filters (the API in README.md), from a query string or a JSON body, validated.

One parser serves ``GET /api/jobs``, the SSE stream and the ``filter`` of a bulk
action, so the three accept exactly the same filters with the same meaning.
Every mistake is a :class:`~sluice_web.errors.BadRequest` that names the
parameter: an unknown one too, so that ``?stat=failed`` is an error instead of
silently listing every job.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
import re
from collections.abc import Collection, Mapping
from typing import Any

from werkzeug.datastructures import MultiDict

from sluice_core.model import JobState
from sluice_core.storage import DEFAULT_PAGE, MAX_PAGE, JobQuery
from sluice_web.errors import BadRequest

TEXT_FILTERS = ("q", "name", "queue", "worker", "framework")
FILTERS = (*TEXT_FILTERS, "state", "since", "until", "stuck")
PAGING = ("limit", "cursor")
MAX_TEXT = 1_000  # longer than any name or id; bounds what a search scans for
# Year 9999: the largest instant ISO-8601 and every backend can represent.
MAX_EPOCH = 253_402_300_799.0

_EPOCH = re.compile(r"\d+(\.\d+)?")
_CURSOR = re.compile(r"s(\d{1,18})")


def encode_cursor(seq: int) -> str:
    """The storage cursor as the API shows it: opaque, so clients do not build their own."""
    return base64.urlsafe_b64encode(f"s{seq}".encode()).rstrip(b"=").decode()


def decode_cursor(value: str) -> int:
    padded = value + "=" * (-len(value) % 4)
    try:
        raw = base64.b64decode(padded, altchars=b"-_", validate=True).decode("ascii")
    except ValueError:  # not base64 (binascii.Error), not ASCII before or after decoding
        raw = ""
    match = _CURSOR.fullmatch(raw)
    if match is None:
        raise BadRequest("cursor: not a cursor from this API; use next_cursor of the last page")
    return int(match.group(1))


def _text(name: str, value: Any) -> str | None:
    if not isinstance(value, str):
        raise BadRequest(f"{name}: expected a string")
    value = value.strip()
    if len(value) > MAX_TEXT:
        raise BadRequest(f"{name}: longer than {MAX_TEXT} characters")
    # An empty field is a filter left blank (an HTML form sends those), not "match nothing".
    return value or None


def _states(value: Any) -> frozenset[JobState]:
    if isinstance(value, str):
        parts = value.split(",")
    elif isinstance(value, list) and all(isinstance(part, str) for part in value):
        parts = value
    else:
        raise BadRequest("state: expected a comma-separated string or a list of strings")
    names = [part.strip() for part in parts if part.strip()]
    unknown = sorted(set(names) - {state.value for state in JobState})
    if unknown:
        valid = ", ".join(state.value for state in JobState)
        raise BadRequest(f"state: unknown {', '.join(map(repr, unknown))} (valid: {valid})")
    return frozenset(JobState(name) for name in names)


def parse_time(name: str, value: Any) -> float | None:
    """ISO-8601 (a naive time is UTC) or epoch seconds, as epoch seconds."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRequest(f"{name}: expected an ISO-8601 time or epoch seconds")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        ts = float(text) if _EPOCH.fullmatch(text) else _iso_to_epoch(name, text)
    else:
        ts = float(value)
    if not (math.isfinite(ts) and 0 <= ts <= MAX_EPOCH):
        raise BadRequest(f"{name}: {value!r} is out of range")
    return ts


def _iso_to_epoch(name: str, text: str) -> float:
    # An unencoded "+" in a query string arrives as a space: "…T10:00:00 02:00".
    candidates = [text]
    if " " in text:
        head, _, tail = text.rpartition(" ")
        candidates.append(f"{head}+{tail}")
    for candidate in candidates:
        try:
            when = dt.datetime.fromisoformat(candidate)
        except ValueError:
            continue
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        return when.timestamp()
    raise BadRequest(
        f"{name}: {text!r} is neither ISO-8601 (2024-05-01T10:00:00+02:00) nor epoch seconds"
    )


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise BadRequest(f"{name}: expected true or false")


def _limit(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PAGE:
        raise BadRequest(f"limit: expected a whole number from 1 to {MAX_PAGE}")
    limit: int = value
    return limit


def build_query(values: Mapping[str, Any], *, allowed: Collection[str]) -> JobQuery:
    """A :class:`JobQuery` from filter values (strings, or JSON types from a body)."""
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise BadRequest(
            f"unknown parameter {', '.join(map(repr, unknown))} (accepted: {', '.join(allowed)})"
        )

    def text(key: str) -> str | None:
        return _text(key, values[key]) if key in values else None

    since = parse_time("since", values["since"]) if "since" in values else None
    until = parse_time("until", values["until"]) if "until" in values else None
    if since is not None and until is not None and since > until:
        raise BadRequest("since: later than until")
    cursor = values.get("cursor")
    return JobQuery(
        q=text("q"),
        name=text("name"),
        queue=text("queue"),
        worker=text("worker"),
        framework=text("framework"),
        states=_states(values["state"]) if "state" in values else frozenset(),
        stuck=_bool("stuck", values["stuck"]) if "stuck" in values else False,
        since=since,
        until=until,
        limit=_limit(values["limit"]) if "limit" in values else DEFAULT_PAGE,
        cursor=decode_cursor(_text("cursor", cursor) or "") if cursor else None,
    )


def query_from_args(
    args: MultiDict[str, str], *, paging: bool = True, extra: Collection[str] = ()
) -> JobQuery:
    """The filters of a query string. ``extra`` names parameters the caller reads itself."""
    values: dict[str, Any] = {}
    for key, given in args.lists():
        if key in extra:
            continue
        if len(given) > 1 and key != "state":
            raise BadRequest(f"{key}: given {len(given)} times; give it once")
        values[key] = ",".join(given) if key == "state" else given[0]
    allowed = (*FILTERS, *PAGING) if paging else FILTERS
    return build_query(values, allowed=(*allowed, *extra))

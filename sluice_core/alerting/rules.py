"""Rules and channels from outside: an API body, or a ``[[alerts.rules]]`` or
``[[alerts.channels]]`` table of the TOML file, checked field by field into a
:class:`~sluice_core.alerting.model.Rule` or a channel's (name, type, config).

Every refusal is :class:`~sluice_core.alerting.model.Invalid` naming the field
(``kind``, ``match.name``, ``params.window_s``, ``channels``...), which the API answers
with a 400. The parameters each kind takes are :data:`PARAMS`; a parameter a kind does
not take is refused rather than ignored, and so is a match field the kind cannot apply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs

from sluice_core.alerting.model import SEVERITIES, ChannelType, Invalid, Kind, Match, Rule

MATCH_FIELDS: Final = ("name", "queue", "worker", "exception")
# In a [[alerts.channels]] config, ``<key>_env = "VAR"`` gives ``<key>`` the value of the
# environment variable VAR: a secret stays out of the file.
ENV_SUFFIX: Final = "_env"


@attrs.frozen
class Param:
    """One parameter of a kind: a number within bounds, or an integer."""

    default: float | None  # None: required
    minimum: float = 0.0
    maximum: float | None = None
    above: bool = False  # the minimum itself is refused (a window of 0 s means nothing)
    integer: bool = False

    def parse(self, field: str, raw: object) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
            raise Invalid(field, "must be a number")
        if self.integer and raw != int(raw):
            raise Invalid(field, "must be a whole number")
        if raw < self.minimum or (self.above and raw == self.minimum):
            bound = "above" if self.above else "at least"
            raise Invalid(field, f"must be {bound} {self.minimum:g}")
        if self.maximum is not None and raw > self.maximum:
            raise Invalid(field, f"must be at most {self.maximum:g}")
        return int(raw) if self.integer else float(raw)


_SECONDS = Param(None, above=True)
# Quiet time after which a job_failed, job_lost or runtime incident resolves on its own.
DEFAULT_RESOLVE_S: Final = 3600.0
# An offline worker is forgotten (its incident resolves) after this long without a
# heartbeat: workers replaced by a deploy get new names, and the old ones never return.
DEFAULT_FORGET_S: Final = 86_400.0

PARAMS: Final[Mapping[Kind, Mapping[str, Param]]] = {
    Kind.JOB_FAILED: {"resolve_s": Param(DEFAULT_RESOLVE_S, above=True)},
    Kind.JOB_LOST: {"resolve_s": Param(DEFAULT_RESOLVE_S, above=True)},
    Kind.FAILURE_RATE: {
        "window_s": Param(300.0, above=True),
        "threshold": Param(None, maximum=1.0),
        "min_runs": Param(10, minimum=1, integer=True),
    },
    Kind.RUNTIME: {"max_s": _SECONDS, "resolve_s": Param(DEFAULT_RESOLVE_S, above=True)},
    Kind.QUEUE_WAIT: {"max_s": _SECONDS},
    Kind.QUEUE_DEPTH: {"max_depth": Param(None, integer=True)},
    Kind.WORKER_OFFLINE: {"forget_s": Param(DEFAULT_FORGET_S, above=True)},
    Kind.NO_CONSUMER: {},
    Kind.SLUICE_HEALTH: {"max_lag_s": Param(60.0, above=True)},
}

# The match fields each kind can apply (the others are refused: a rule that cannot
# do what it says must not look as if it did).
_JOBS = frozenset({"name", "queue", "worker"})
MATCHES: Final[Mapping[Kind, frozenset[str]]] = {
    Kind.JOB_FAILED: _JOBS | {"exception"},
    Kind.JOB_LOST: _JOBS | {"exception"},
    Kind.FAILURE_RATE: _JOBS,
    Kind.RUNTIME: _JOBS,
    Kind.QUEUE_WAIT: frozenset({"name", "queue"}),
    Kind.QUEUE_DEPTH: frozenset({"queue"}),
    Kind.NO_CONSUMER: frozenset({"queue"}),
    Kind.WORKER_OFFLINE: frozenset({"worker"}),
    Kind.SLUICE_HEALTH: frozenset(),
}


def check_glob(field: str, pattern: str) -> str:
    """A glob (fnmatch: ``*``, ``?``, ``[abc]``, ``[!abc]``) whose every ``[`` is closed.

    fnmatch itself takes an unclosed ``[`` as a plain character, silently: for a user,
    ``billing.[charge`` is a typo, and a rule that never matches is a silent alarm.
    """
    if not pattern:
        raise Invalid(field, "must not be empty")
    i = 0
    while i < len(pattern):
        if pattern[i] == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] == "!":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1  # a ']' first in a set is a member
            close = pattern.find("]", j)
            if close < 0:
                raise Invalid(field, f"unbalanced '[' in the glob {pattern!r}")
            i = close
        i += 1
    return pattern


def parse_rule(
    body: object,
    channel: Callable[[object], int],
    *,
    now: float,
    rule_id: int = 0,
    from_file: bool = False,
) -> Rule:
    """A rule from an API body (channels by id) or a file's table (channels by name):
    ``channel`` turns one entry of ``channels`` into a channel id, or raises Invalid."""
    if not isinstance(body, Mapping):
        raise Invalid("body", "must be a JSON object")
    known = {"name", "kind", "match", "params", "severity", "channels", "for_s", "repeat_s",
             "muted_until"}
    for key in body:
        if key not in known:
            raise Invalid(str(key), "is not a field of a rule")
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise Invalid("name", "must be a non-empty string")
    kind = _kind(body.get("kind"))
    severity = body.get("severity", "error")
    if severity not in SEVERITIES:
        raise Invalid("severity", f"must be one of {', '.join(SEVERITIES)}")
    channels = body.get("channels", [])
    if not isinstance(channels, list):
        raise Invalid("channels", "must be a list")
    ids = tuple(dict.fromkeys(channel(entry) for entry in channels))
    return Rule(
        id=rule_id,
        name=name.strip(),
        kind=kind,
        match=_match(kind, body.get("match", {})),
        params=_params(kind, body.get("params", {})),
        severity=severity,
        channels=ids,
        for_s=_seconds("for_s", body.get("for_s", 0.0), zero=True) or 0.0,
        repeat_s=_seconds("repeat_s", body.get("repeat_s")),
        muted_until=_seconds("muted_until", body.get("muted_until")),
        from_file=from_file,
        created_at=now,
        updated_at=now,
    )


def channel_by_id(known: set[int]) -> Callable[[object], int]:
    def resolve(entry: object) -> int:
        if isinstance(entry, bool) or not isinstance(entry, int):
            raise Invalid("channels", f"{entry!r} is not a channel id")
        if entry not in known:
            raise Invalid("channels", f"no channel {entry}")
        return entry

    return resolve


def channel_by_name(known: Mapping[str, int]) -> Callable[[object], int]:
    def resolve(entry: object) -> int:
        if not isinstance(entry, str) or entry not in known:
            raise Invalid("channels", f"no channel named {entry!r}")
        return known[entry]

    return resolve


def file_rules(
    alerts: Mapping[str, Any], channels: Mapping[str, int], now: float
) -> list[Rule]:
    """The ``[[alerts.rules]]`` of the TOML file (``alerts`` is its ``[alerts]`` table),
    channels by name; Invalid names the rule's place in the file."""
    tables = alerts.get("rules", [])
    if not isinstance(tables, list):
        raise Invalid("alerts.rules", "must be an array of tables ([[alerts.rules]])")
    rules = []
    for i, table in enumerate(tables):
        try:
            rules.append(parse_rule(table, channel_by_name(channels), now=now, from_file=True))
        except Invalid as exc:
            raise Invalid(f"alerts.rules[{i}].{exc.field}", exc.message) from None
    names = [rule.name for rule in rules]
    if len(set(names)) != len(names):
        raise Invalid("alerts.rules", "two rules have the same name")
    return rules


def parse_channel(
    body: object, types: Mapping[str, ChannelType]
) -> tuple[str, str, dict[str, Any]]:
    """A channel from an API body or a file's table: (name, type, config checked by its
    type). Invalid names the field (``name``, ``type``, ``config.url``...)."""
    if not isinstance(body, Mapping):
        raise Invalid("body", "must be a JSON object")
    for key in body:
        if key not in ("name", "type", "config"):
            raise Invalid(str(key), "is not a field of a channel")
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise Invalid("name", "must be a non-empty string")
    kind = types.get(str(body.get("type")))
    if kind is None:
        raise Invalid("type", f"unknown channel type (one of {', '.join(sorted(types))})")
    config = body.get("config")
    if not isinstance(config, Mapping):
        raise Invalid("config", "must be an object")
    return name.strip(), kind.name, kind.check(config)


def file_channels(
    alerts: Mapping[str, Any], types: Mapping[str, ChannelType], environ: Mapping[str, str]
) -> list[tuple[str, str, dict[str, Any]]]:
    """The ``[[alerts.channels]]`` of the TOML file, each config's ``<key>_env`` read
    from ``environ``; Invalid names the channel's place in the file (never a value: a
    config holds secrets)."""
    tables = alerts.get("channels", [])
    if not isinstance(tables, list):
        raise Invalid("alerts.channels", "must be an array of tables ([[alerts.channels]])")
    channels = []
    for i, table in enumerate(tables):
        try:
            if isinstance(table, Mapping) and isinstance(table.get("config"), Mapping):
                table = {**table, "config": _from_environment(table["config"], environ)}
            channels.append(parse_channel(table, types))
        except Invalid as exc:
            raise Invalid(f"alerts.channels[{i}].{exc.field}", exc.message) from None
    names = [name for name, _, _ in channels]
    if len(set(names)) != len(names):
        raise Invalid("alerts.channels", "two channels have the same name")
    return channels


def _from_environment(config: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    resolved = {key: value for key, value in config.items() if not key.endswith(ENV_SUFFIX)}
    for key, var in config.items():
        if not key.endswith(ENV_SUFFIX):
            continue
        target = key.removesuffix(ENV_SUFFIX)
        if target in config:
            raise Invalid(f"config.{key}", f"config.{target} is set too: give one of them")
        if not isinstance(var, str) or var not in environ:
            raise Invalid(f"config.{key}", f"the environment variable {var!r} is not set")
        resolved[target] = environ[var]
    return resolved


def _kind(raw: object) -> Kind:
    try:
        kind = Kind(str(raw))
    except ValueError:
        choices = ", ".join(k.value for k in PARAMS)
        raise Invalid("kind", f"unknown kind {raw!r} (known: {choices})") from None
    if kind not in PARAMS:
        raise Invalid("kind", f"{kind} is reserved and not available yet")
    return kind


def _match(kind: Kind, raw: object) -> Match:
    if raw is None:
        return Match()
    if not isinstance(raw, Mapping):
        raise Invalid("match", "must be an object")
    values: dict[str, str] = {}
    for key, value in raw.items():
        field = f"match.{key}"
        if key not in MATCH_FIELDS:
            raise Invalid(field, f"unknown (one of {', '.join(MATCH_FIELDS)})")
        if value is None:
            continue
        if not isinstance(value, str):
            raise Invalid(field, "must be a string")
        if key not in MATCHES[kind]:
            raise Invalid(field, f"a {kind} rule cannot match on {key}")
        # The exception is matched as text, not as a glob.
        values[key] = value if key == "exception" else check_glob(field, value)
    return Match(**values)


def _params(kind: Kind, raw: object) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise Invalid("params", "must be an object")
    specs = PARAMS[kind]
    for key in raw:
        if key not in specs:
            takes = ", ".join(specs) or "none"
            raise Invalid(f"params.{key}", f"not a parameter of {kind} (it takes {takes})")
    params: dict[str, Any] = {}
    for key, spec in specs.items():
        if raw.get(key) is None:
            if spec.default is None:
                raise Invalid(f"params.{key}", f"required by {kind}")
            params[key] = spec.default
        else:
            params[key] = spec.parse(f"params.{key}", raw[key])
    return params


def _seconds(field: str, raw: object, *, zero: bool = False) -> float | None:
    if raw is None:
        return None
    return Param(None, above=not zero).parse(field, raw)

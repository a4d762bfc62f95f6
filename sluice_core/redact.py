"""Secrets out of jobs before anything stores, indexes or shows them.

Every event from outside passes the redactor once, at the door where its values are
checked (:meth:`sluice_core.plugins.PluginManager.admit`): a broker's events, the SDK's
and a remote agent's alike. What a task was called with reaches Sluice in two forms:

- display reprs (Celery's ``argsrepr``/``kwargsrepr``, the result's repr), Python
  literals as text: parsed and re-written when they parse, else (cut by Celery, or
  holding objects such as ``datetime(...)``) the quoted key's value is replaced in the
  text itself;
- structured values (the SDK's captured message in ``extra["message"]``): walked.

A value is replaced when its key is one of ``keys`` (exactly, ignoring case) or a
pattern of ``patterns`` is found in it (ignoring case).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from typing import Any

import attrs

from sluice_core.model import JobEvent, Normalized

REDACTED = "[redacted]"
DEFAULT_KEYS = ("password", "secret", "token", "api_key", "authorization")
# Names that hold secrets under other spellings: db_password, X-Auth-Token, apiKey...
DEFAULT_PATTERNS = (
    r"passw(or)?d|secret|token|api[_-]?key|authori[sz]ation|credential|private[_-]?key",
)
_REPR_FIELDS = ("args", "kwargs", "result")
_MAX_DEPTH = 32  # deeper than any real argument: left as it is
# A quoted key and its value in a repr that does not parse: a quoted string, or a bare
# token up to the next separator.
_PAIR = re.compile(
    r"""(?P<key>(?P<q>['"])(?P<name>[^'"\\]{1,200})(?P=q)\s*:\s*)"""
    r"""(?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^,}\])\s]+)"""
)


class Redactor:
    def __init__(self, keys: Iterable[str] = (), patterns: Iterable[str] = ()) -> None:
        self._keys = frozenset(key.lower() for key in keys)
        self._patterns = [re.compile(p, re.IGNORECASE) for p in patterns if p]
        # A text naming no secret key has nothing to redact: one search, no parse (this
        # runs for every event, and most name none).
        anywhere = [*map(re.escape, sorted(self._keys)), *(p.pattern for p in self._patterns)]
        self._named = re.compile("|".join(anywhere), re.IGNORECASE) if anywhere else None

    @property
    def active(self) -> bool:
        return bool(self._keys or self._patterns)

    def secret(self, key: object) -> bool:
        return isinstance(key, str) and (
            key.lower() in self._keys or any(p.search(key) for p in self._patterns)
        )

    def value(self, value: Any, depth: int = 0) -> Any:
        """A structured value with every secret's value replaced, at any depth."""
        if depth > _MAX_DEPTH:
            return value
        if isinstance(value, dict):
            return {
                key: REDACTED if self.secret(key) else self.value(child, depth + 1)
                for key, child in value.items()
            }
        if type(value) in (list, tuple):
            return type(value)(self.value(child, depth + 1) for child in value)
        return value

    def text(self, text: str) -> str:
        """A Python literal's repr with every secret's value replaced."""
        if self._named is None or self._named.search(text) is None:
            return text
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            return _PAIR.sub(self._pair, text)
        redacted = self.value(parsed)
        return text if redacted == parsed else repr(redacted)

    def _pair(self, match: re.Match[str]) -> str:
        if not self.secret(match["name"]):
            return match[0]
        return f"{match['key']}{REDACTED!r}"

    def job_event(self, event: JobEvent) -> JobEvent:
        fields = event.fields
        changed = {
            name: redacted
            for name in _REPR_FIELDS
            if isinstance(value := fields.get(name), str)
            and (redacted := self.text(value)) != value
        }
        extra = self.value(event.extra) if event.extra else event.extra
        if not changed and extra == event.extra:
            return event
        message = extra.get("message")
        if isinstance(message, dict) and message != event.extra.get("message"):
            # A re-run from this capture would publish the placeholders: retry refuses it.
            extra["message"] = {**message, "redacted": True}
        return attrs.evolve(event, fields={**fields, **changed}, extra=extra)

    def apply(self, normalized: Normalized) -> Normalized:
        if self.active:
            normalized.job_events = [self.job_event(e) for e in normalized.job_events]
        return normalized

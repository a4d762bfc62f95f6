"""Secrets out of jobs before anything stores, indexes or shows them.

Every event from outside passes the redactor once, at the door where its values are
checked (:meth:`sluice_core.plugins.PluginManager.admit`): a broker's events, the SDK's
and a remote agent's alike. What a task was called with reaches Sluice in two forms:

- display reprs (Celery's ``argsrepr``/``kwargsrepr``, the result's repr), Python
  literals as text: parsed and re-written when they parse, else (cut by Celery, or
  holding objects such as ``datetime(...)``) the quoted key's value is replaced in the
  text itself;
- structured values (the SDK's captured message in ``extra["message"]``): walked.

Exceptions and tracebacks are display text too (``KeyError({'token': ...})``): a quoted
secret key's value is replaced in them the same way.

A value is replaced when its key is one of ``keys`` (exactly, ignoring case) or a
pattern of ``patterns`` is found in it (ignoring case).

What is already stored is scrubbed with the same rules by ``sluice redact --apply``
(:meth:`sluice_core.storage.Storage.redact`, using :meth:`Redactor.job` and
:meth:`Redactor.document` besides :meth:`Redactor.job_event`): the same placeholders, so
a second run, or an event redacted at the door, changes nothing.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from sluice_core.model import Job, JobEvent, Normalized

REDACTED = "[redacted]"
DEFAULT_KEYS = ("password", "secret", "token", "api_key", "authorization")
# Names that hold secrets under other spellings: db_password, X-Auth-Token, apiKey...
DEFAULT_PATTERNS = (
    r"passw(or)?d|secret|token|api[_-]?key|authori[sz]ation|credential|private[_-]?key",
)
_TEXT_FIELDS = ("args", "kwargs", "result", "exception", "traceback")
_MAX_DEPTH = 32  # deeper than any real argument: left as it is
# A quoted key and its value in a repr that does not parse: a quoted string, or a bare
# token up to the next separator.
_PAIR = re.compile(
    r"""(?P<key>(?P<q>['"])(?P<name>[^'"\\]{1,200})(?P=q)\s*:\s*)"""
    r"""(?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^,}\])\s]+)"""
)


class Redactor:
    def __init__(self, keys: Iterable[str] = (), patterns: Iterable[str] = ()) -> None:
        self._keys = frozenset(key.lower() for key in keys if key)
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

    def document(self, value: Any, depth: int = 0) -> Any:
        """A JSON value (a dead letter's event, say) with every secret replaced: secret
        keys' values, and secrets inside the display reprs its strings hold."""
        if depth > _MAX_DEPTH:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {
                key: REDACTED if self.secret(key) else self.document(child, depth + 1)
                for key, child in value.items()
            }
        if isinstance(value, list):
            return [self.document(child, depth + 1) for child in value]
        return value

    def json_text(self, text: str) -> str:
        """JSON text (written by the standard library, ASCII) with every secret replaced;
        text that does not parse (cut) has its quoted secret pairs replaced in place."""
        if self._named is None or self._named.search(text) is None:
            return text
        try:
            parsed = json.loads(text)
        except ValueError:
            return _PAIR.sub(self._pair, text)
        redacted = self.document(parsed)
        return text if redacted == parsed else json.dumps(redacted, ensure_ascii=True)

    def _texts(self, values: Mapping[str, Any]) -> dict[str, str]:
        """The display texts among ``values`` that hold a secret, redacted."""
        return {
            name: redacted
            for name in _TEXT_FIELDS
            if isinstance(value := values.get(name), str)
            and (redacted := self.text(value)) != value
        }

    def _extra(self, extra: dict[str, Any]) -> dict[str, Any]:
        """``extra`` itself if it holds no secret, else a redacted copy."""
        if not extra:
            return extra
        redacted: dict[str, Any] = self.value(extra)
        if redacted == extra:
            return extra
        message = redacted.get("message")
        if isinstance(message, dict) and message != extra.get("message"):
            # A re-run from this capture would publish the placeholders: retry refuses it.
            redacted["message"] = {**message, "redacted": True}
        return redacted

    def job_event(self, event: JobEvent) -> JobEvent:
        changed = self._texts(event.fields)
        extra = self._extra(event.extra)
        if not changed and extra is event.extra:
            return event
        return attrs.evolve(event, fields={**event.fields, **changed}, extra=extra)

    def job(self, job: Job) -> Job:
        """A stored row, as its events redacted at the door would have made it."""
        changed = self._texts({name: getattr(job, name) for name in _TEXT_FIELDS})
        extra = self._extra(job.extra)
        if not changed and extra is job.extra:
            return job
        redacted = attrs.evolve(job, extra=extra)
        for name, text in changed.items():
            setattr(redacted, name, text)
        return redacted

    def apply(self, normalized: Normalized) -> Normalized:
        if self.active:
            normalized.job_events = [self.job_event(e) for e in normalized.job_events]
        return normalized

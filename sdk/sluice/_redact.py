"""Masking secrets in task arguments before anything leaves the process."""

from __future__ import annotations

import re
from typing import Any, Iterable, Pattern

REDACTED = "[redacted]"


class Redactor:
    """Replaces the values of matching keys, at any depth of dicts, lists and tuples.

    ``keys`` match key names exactly (ignoring case); ``patterns`` are regular
    expressions searched in key names (e.g. ``"secret|token"``).
    """

    def __init__(
        self, keys: Iterable[str] = (), patterns: Iterable[str | Pattern[str]] = ()
    ) -> None:
        self._keys = frozenset(key.lower() for key in keys)
        self._patterns = [
            re.compile(p, re.IGNORECASE) if isinstance(p, str) else p for p in patterns
        ]

    @property
    def active(self) -> bool:
        return bool(self._keys or self._patterns)

    def _secret(self, key: Any) -> bool:
        if not isinstance(key, str):
            return False
        return key.lower() in self._keys or any(p.search(key) for p in self._patterns)

    def apply(self, value: Any) -> tuple[Any, bool]:
        """The value with secrets replaced, and whether anything was replaced."""
        if not self.active:
            return value, False
        found = [False]

        def walk(item: Any, depth: int) -> Any:
            if depth > 20:  # deeper than any real argument: leave it (repr cuts it anyway)
                return item
            if isinstance(item, dict):
                out = {}
                for key, child in item.items():
                    if self._secret(key):
                        found[0] = True
                        out[key] = REDACTED
                    else:
                        out[key] = walk(child, depth + 1)
                return out
            if type(item) in (list, tuple):  # not subclasses: a namedtuple has another constructor
                return type(item)(walk(child, depth + 1) for child in item)
            return item

        return walk(value, 0), found[0]

"""Reading a channel's config: each value checked, or :class:`Invalid` naming it."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import urlsplit

from sluice_core.alerting.model import Invalid


def mapping(config: object, known: Collection[str]) -> Mapping[str, Any]:
    """``config`` as an object holding only ``known`` keys: a misspelled key is refused
    rather than silently ignored (the channel would then lack what it was meant to get)."""
    if not isinstance(config, Mapping):
        raise Invalid("config", "must be an object")
    for key in config:
        if key not in known:
            raise Invalid(f"config.{key}", f"unknown setting; expected {', '.join(known)}")
    return config


def text(config: Mapping[str, Any], key: str) -> str:
    value = config.get(key)
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"config.{key}", "required, a non-empty string")
    return value.strip()


def optional_text(config: Mapping[str, Any], key: str) -> str | None:
    return None if config.get(key) in (None, "") else text(config, key)


def flag(config: Mapping[str, Any], key: str) -> bool:
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise Invalid(f"config.{key}", "must be true or false")
    return value


def port(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    # bool is an int to Python, not to a person writing "port": true.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise Invalid(f"config.{key}", "required, a port number (1-65535)")
    return value


def http_url(config: Mapping[str, Any], key: str, *, secret: bool = False) -> str:
    """An absolute http(s) URL. A ``secret`` one (Slack's: its path is the credential) is
    never quoted back in the error."""
    url = text(config, key)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        shown = "the URL" if secret else repr(url)
        raise Invalid(f"config.{key}", f"{shown} is not an absolute http:// or https:// URL")
    return url


def address(value: object, field: str) -> str:
    if not isinstance(value, str) or "@" not in value.strip():
        raise Invalid(field, "an email address (name@domain)")
    return value.strip()

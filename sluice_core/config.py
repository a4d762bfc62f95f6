"""Configuration: flags, then environment, then an optional TOML file (README.md, Configuration).

The core's options are declared here, each once (:class:`sluice_core.options.Option`);
plugins declare theirs in the ``sluice_addoption`` hook. :func:`build` merges the
three sources for one command and parses every value once: a bad one is a
:class:`ConfigError` of one line naming the option and what it accepts.

Two environment names differ for familiarity: ``SLUICE_BROKER_URL`` and
``SLUICE_DATABASE_URL`` (``--broker``, ``--db``).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from sluice_core.options import (
    AGENT,
    DATABASE,
    ENGINE,
    EVERY,
    REDACT,
    SERVING,
    SOURCES,
    Kind,
    Option,
    OptionParser,
    choice,
    integer,
    many,
    number,
    seconds,
    switch,
    table,
    text,
)
from sluice_core.redact import DEFAULT_KEYS, DEFAULT_PATTERNS
from sluice_core.retention import OPTIONS as RETENTION_OPTIONS
from sluice_core.storage import DEFAULT_STUCK_AFTER_S, REDACT_BATCH

T = TypeVar("T")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The shortest API token accepted: a guessable one would protect nothing.
MIN_TOKEN_LENGTH = 16

CONFIG: Option[str | None] = Option(
    "config", text(), None, "TOML file with options", commands=EVERY, metavar="FILE"
)
PLUGIN = Option(
    "plugin",
    many(text()),
    [],
    "load a plugin by entry-point name (repeatable), e.g. celery",
    commands=EVERY,
    metavar="NAME",
)
LOG_LEVEL = Option(
    "log_level",
    choice("DEBUG", "INFO", "WARNING", "ERROR"),
    "INFO",
    "DEBUG, INFO, WARNING or ERROR",
    commands=EVERY,
)
DB = Option(
    "db",
    text(),
    "sqlite:///sluice.db",
    "database URL: sqlite:///path.db or postgresql://user@host/db",
    commands=DATABASE,
    env="SLUICE_DATABASE_URL",
    metavar="URL",
)
BROKER = Option(
    "broker",
    many(text()),
    [],
    "broker URL to watch, e.g. redis://localhost:6379/0 (repeatable)",
    env="SLUICE_BROKER_URL",
    metavar="URL",
)
HOST = Option("host", text(), "127.0.0.1", "address to serve on", commands=SERVING)
PORT = Option("port", integer(0, 65535), 5580, "port to serve on", commands=SERVING)
BUFFER_MESSAGES = Option(
    "buffer_messages",
    integer(1),
    1_000_000,
    "raw messages held in memory, then spooled",
    commands=SOURCES,
)
# A burst's peak memory is what this bounds (the reader process spools past it).
BUFFER_MB = Option(
    "buffer_mb", integer(1), 8, "MiB of raw messages held in memory", commands=SOURCES
)
SPOOL_MB = Option(
    "spool_mb",
    integer(0),
    4096,
    "MiB of raw messages spooled to disk past --buffer-mb, before dropping (0: drop instead)",
    commands=SOURCES,
)
SPOOL_DIR: Option[str | None] = Option(
    "spool_dir",
    text(),
    None,
    "where the spool file lives (default: the temporary directory)",
    commands=SOURCES,
)
# 20,000 peaked at 330 MB with the reader process, 10,000 at 280.
BATCH_EVENTS = Option("batch_events", integer(1), 10_000, "most events per storage transaction")
READER_PROCESS = Option(
    "reader_process",
    switch(),
    True,
    "on: read and normalize broker events in a child process, off: in this one",
    commands=SOURCES,
)
STOP_TIMEOUT = Option(
    "stop_timeout",
    seconds(),
    10.0,
    "seconds a stop may wait for the database to store what was read; what is left then is"
    " logged, counted and lost (a write in progress still ends first)",
)
HEARTBEAT_MISSED = Option(
    "heartbeat_missed",
    number(above=0),
    3.0,
    "heartbeat intervals without news before a worker is offline",
    commands=SOURCES,
)
STUCK_AFTER = Option(
    "stuck_after",
    seconds(),
    DEFAULT_STUCK_AFTER_S,
    "seconds a job may wait queued with no worker taking it before it is flagged stuck;"
    " active jobs are stuck past 5x their task's mean runtime (at least 60 s)",
)
API_TOKEN: Option[str | None] = Option(
    "api_token",
    text(min_length=MIN_TOKEN_LENGTH),
    None,
    "require 'Authorization: Bearer TOKEN' on the API; also the dashboard password",
    commands=SERVING,
    metavar="TOKEN",
    secret=True,
)
SESSION_SECRET: Option[str | None] = Option(
    "session_secret",
    text(min_length=MIN_TOKEN_LENGTH),
    None,
    "key signing dashboard login cookies; share it between web replicas"
    " (default: random at each start)",
    commands=SERVING,
    secret=True,
)
USERS = Option(
    "users",
    table(),
    {},
    "dashboard users: name = argon2 hash (the TOML file's [users] table)",
    commands=SERVING,
    flag=None,
)


_HOST_NAME = re.compile(r"\.?[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def _host_pattern(raw: object) -> str:
    """A name the ``Host`` header may give, lower-cased; ``.example.com`` also covers its
    subdomains, ``*`` any name. A URL or ``host:port`` is refused: any port is allowed."""
    value = text().parse(raw).strip().lower()
    if value == "*" or _HOST_NAME.fullmatch(value):
        return value
    return ipaddress.ip_address(value.removeprefix("[").removesuffix("]")).compressed


def _proxy_addresses(raw: object) -> str:
    value = text().parse(raw).strip()
    if value != "*":
        ipaddress.ip_network(value, strict=False)
    return value


ALLOWED_HOSTS = Option(
    "allowed_hosts",
    many(
        Kind(
            "host names (sluice.example.com; .example.com: it and its subdomains; *: any)",
            _host_pattern,
            metavar="HOST",
        )
    ),
    [],
    "host names clients may reach this server by, beside localhost, 127.0.0.1, [::1] and"
    " --host (other Host headers get 400: DNS rebinding)",
    commands=SERVING,
)
FORWARDED_ALLOW_IPS = Option(
    "forwarded_allow_ips",
    many(
        Kind("IP addresses or networks (10.0.0.1, 10.0.0.0/8) or *", _proxy_addresses, metavar="IP")
    ),
    [],
    "reverse proxies whose X-Forwarded-For and X-Forwarded-Proto are believed (default: none)",
    commands=SERVING,
)
SSE_HEARTBEAT = Option(
    "sse_heartbeat", seconds(15), 15.0, "seconds between SSE heartbeat comments", commands=SERVING
)
INGEST_RATE = Option(
    "ingest_rate",
    number(above=0),
    20_000.0,
    "events per second each API key may push to the ingest endpoints",
    commands=SERVING,
)
INGEST_BURST = Option(
    "ingest_burst",
    number(1),
    100_000.0,
    "events an API key may push at once above --ingest-rate",
    commands=SERVING,
)
SERVER: Option[str | None] = Option(
    "server",
    text(),
    None,
    "stream normalized events to this Sluice (wss://host or ws://host:port)"
    " instead of a database",
    commands=frozenset({AGENT}),
    metavar="URL",
)
API_KEY: Option[str | None] = Option(
    "api_key",
    text(),
    None,
    "the server's API key, from `sluice keys create`",
    commands=frozenset({AGENT}),
    secret=True,
)

REDACT_KEYS = Option(
    "redact_keys",
    many(text()),
    list(DEFAULT_KEYS),
    "argument names whose values are replaced before anything is stored (exact, any case)",
    commands=ENGINE | {REDACT},
    metavar="NAME",
)
REDACT_PATTERNS = Option(
    "redact_patterns",
    many(text()),
    list(DEFAULT_PATTERNS),
    "regular expressions: argument names they are found in have their values replaced",
    commands=ENGINE | {REDACT},
    metavar="REGEX",
)
APPLY = Option(
    "apply",
    switch(),
    False,
    "replace the secrets found (without it, only say what would change)",
    commands=frozenset({REDACT}),
    env="SLUICE_REDACT_APPLY",
)
REDACT_BATCH_JOBS = Option(
    "redact_batch",
    integer(1),
    REDACT_BATCH,
    "jobs (with their events) scrubbed in one transaction",
    commands=frozenset({REDACT}),
    metavar="JOBS",
)


def _public_url(raw: object) -> str:
    if not isinstance(raw, str):
        raise TypeError
    url = raw.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError
    return url


PUBLIC_URL: Option[str | None] = Option(
    "public_url",
    Kind("an http:// or https:// URL", _public_url, metavar="URL"),
    None,
    "the dashboard's address as its users reach it: the links in alert notifications",
    commands=ENGINE,
)


def _alerts(raw: object) -> dict[str, Any]:
    # Checked channel by channel and rule by rule when the engine starts
    # (sluice_core/alerting/rules.py): the channel types are the plugins', and the
    # channels rules name may be in the database.
    if not isinstance(raw, dict):
        raise TypeError
    return raw


ALERTS = Option(
    "alerts",
    Kind("an [alerts] table holding [[alerts.channels]] and [[alerts.rules]]", _alerts),
    {},
    "alert channels and rules as code (the TOML file's [[alerts.channels]] and"
    " [[alerts.rules]]; read-only in the dashboard)",
    commands=ENGINE,
    flag=None,
)


CORE_OPTIONS: tuple[Option[Any], ...] = (
    CONFIG,
    PLUGIN,
    LOG_LEVEL,
    DB,
    BROKER,
    HOST,
    PORT,
    BUFFER_MESSAGES,
    BUFFER_MB,
    SPOOL_MB,
    SPOOL_DIR,
    BATCH_EVENTS,
    READER_PROCESS,
    STOP_TIMEOUT,
    HEARTBEAT_MISSED,
    STUCK_AFTER,
    API_TOKEN,
    SESSION_SECRET,
    USERS,
    ALLOWED_HOSTS,
    FORWARDED_ALLOW_IPS,
    SSE_HEARTBEAT,
    INGEST_RATE,
    INGEST_BURST,
    SERVER,
    API_KEY,
    REDACT_KEYS,
    REDACT_PATTERNS,
    APPLY,
    REDACT_BATCH_JOBS,
    *RETENTION_OPTIONS,
    PUBLIC_URL,
    ALERTS,
)


class ConfigError(Exception):
    """The configuration is invalid; the message says what to change."""


def redact_url(url: str) -> str:
    """The URL without its password, for logs, the API and the UI."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class Config:
    """The typed value of every option; one not given has its declared default.

    ``Config(db="sqlite:///x.db", redis_keyprefix="t:")`` builds one in code
    (values already typed); :func:`build` builds one from a command line.
    One built in code runs its sources in its own process unless told
    otherwise: the reader process loads plugins by entry-point name, and code
    may have registered its plugins some other way.
    """

    def __init__(self, values: Mapping[str, Any] | None = None, /, **more: Any) -> None:
        self.values: dict[str, Any] = {READER_PROCESS.name: False, **(values or {}), **more}

    def get(self, option: Option[T]) -> T:
        value: T = self.values.get(option.name, option.default)
        return value

    def __repr__(self) -> str:
        return f"Config({sorted(self.values)})"  # never the values: tokens are among them

    # The core's options, by their usual names.

    @property
    def brokers(self) -> list[str]:
        return self.get(BROKER)

    @property
    def db(self) -> str:
        return self.get(DB)

    @property
    def host(self) -> str:
        return self.get(HOST)

    @property
    def port(self) -> int:
        return self.get(PORT)

    @property
    def plugins(self) -> list[str]:
        return self.get(PLUGIN)

    @property
    def log_level(self) -> str:
        return self.get(LOG_LEVEL)

    @property
    def buffer_messages(self) -> int:
        return self.get(BUFFER_MESSAGES)

    @property
    def buffer_mb(self) -> int:
        return self.get(BUFFER_MB)

    @property
    def spool_mb(self) -> int:
        return self.get(SPOOL_MB)

    @property
    def spool_dir(self) -> str | None:
        return self.get(SPOOL_DIR)

    @property
    def batch_events(self) -> int:
        return self.get(BATCH_EVENTS)

    @property
    def reader_process(self) -> bool:
        return self.get(READER_PROCESS)


def core_options() -> OptionParser:
    parser = OptionParser()
    parser.add(*CORE_OPTIONS)
    return parser


def read_toml(path: str | None) -> dict[str, Any]:
    """The file's options (top level or a ``[sluice]`` table), keys with underscores."""
    if not path:
        return {}
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    # Options at the top level or in a [sluice] table; other tables ([users]) beside it.
    merged = {key: value for key, value in data.items() if key != "sluice"}
    merged.update(data.get("sluice", {}))
    return {key.replace("-", "_"): value for key, value in merged.items()}


def build(
    options: Iterable[Option[Any]],
    flags: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    known: Iterable[str] | None = (),
) -> Config:
    """Parse ``options`` from the flags given, the environment and the TOML file.

    ``flags`` holds the raw values argparse collected (absent or None: not
    given). ``known``: names of options other commands declare, which the file
    may hold without being wrong; None skips that check (a first look, before
    the plugins that declare the rest are loaded).
    """
    environ = os.environ if environ is None else environ
    options = list(options)
    path = flags.get(CONFIG.name) or environ.get(CONFIG.env_name)
    toml = read_toml(path)
    names = {option.name for option in options} | set(known or ())
    for key in toml:
        if known is not None and key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config file {path}: unknown option {key!r}{hint}")
    values: dict[str, Any] = {}
    for option in options:
        for raw, origin in (
            (flags.get(option.name), option.flag_name),
            (environ.get(option.env_name) or None, f"{option.env_name} ({option.flag_name})"),
            (toml.get(option.name), f"{option.name} in {path}"),
        ):
            if raw is None or raw == []:
                continue
            try:
                values[option.name] = option.kind.parse(raw)
            except (ValueError, TypeError, KeyError):
                raise ConfigError(
                    f"{origin}: expected {option.kind.accepts}, got {_shown(option, raw)}"
                ) from None
            break
        else:
            values[option.name] = option.default
    return Config(values)


def _shown(option: Option[Any], raw: object) -> str:
    return "a value that is not accepted" if option.secret else repr(raw)

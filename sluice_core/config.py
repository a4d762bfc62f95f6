"""Configuration: flags, then environment, then an optional TOML file (DESIGN.md section 9).

Every option has one name. On the command line it is ``--some-name``, in the
environment ``SLUICE_SOME_NAME``, in the TOML file ``some_name`` (top level,
or in a ``[sluice]`` table). Flags win over the environment, which wins over
the file. Plugins add options with the ``sluice_addoption`` hook and read
them with :meth:`Config.get`; the same precedence applies.

Two environment names differ for familiarity: ``SLUICE_BROKER_URL`` and
``SLUICE_DATABASE_URL`` (``--broker``, ``--db``).
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs

DEFAULT_DB = "sqlite:///sluice.db"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5580
DEFAULT_BUFFER_MB = 8
DEFAULT_BATCH_EVENTS = 10_000

_ENV_ALIASES = {"broker": "SLUICE_BROKER_URL", "db": "SLUICE_DATABASE_URL"}


class ConfigError(Exception):
    """The configuration is invalid; the message says what to change."""


def env_name(option: str) -> str:
    return _ENV_ALIASES.get(option, "SLUICE_" + option.upper())


def redact_url(url: str) -> str:
    """The URL without its password, for logs, the API and the UI."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@attrs.define
class Config:
    brokers: list[str] = attrs.field(factory=list)
    db: str = DEFAULT_DB
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    plugins: list[str] = attrs.field(factory=list)
    log_level: str = "INFO"
    # Raw messages held in memory between the sources and the normalizers...
    buffer_messages: int = 1_000_000
    # ...and at most this many MiB of them. Past either, they are spooled to disk
    # (by the reader process, off the engine's core: a burst's peak memory is
    # what this bounds).
    buffer_mb: int = DEFAULT_BUFFER_MB
    # MiB of raw messages spooled to disk (in spool_dir, default the system's
    # temporary directory). Past this, sources drop and count
    # (sluice_events_dropped_total) rather than stall.
    spool_mb: int = 4096
    spool_dir: str | None = None
    # Most events written to storage in one transaction. A burst's batches are
    # this big: 20,000 peaked at 330 MB with the reader process, 10,000 at 280.
    batch_events: int = DEFAULT_BATCH_EVENTS
    # Run the sources and normalizers in a child process (sluice_core/reader.py).
    # ``sluice run`` turns it on; an engine built in code (the tests) runs its
    # sources itself: the child loads plugins by name, from ``plugins``.
    reader_process: bool = False
    # Where unknown options come from, in precedence order (flags first).
    layers: list[dict[str, Any]] = attrs.field(factory=list)

    def get(self, option: str, default: Any = None) -> Any:
        """A plugin option by its name (``dest`` of the argparse option)."""
        for layer in self.layers:
            value = layer.get(option)
            if value is not None:
                return value
        return default


def _toml_layer(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    table = data.get("sluice", data)
    return {key.replace("-", "_"): value for key, value in table.items()}


def _env_layer(options: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for option in options:
        value = os.environ.get(env_name(option))
        if value is not None and value != "":
            out[option] = value
    return out


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(part) for part in value]


def build(args: argparse.Namespace) -> Config:
    """Merge the parsed flags with the environment and the TOML file."""
    flags = {key: value for key, value in vars(args).items() if value not in (None, [])}
    options = list(vars(args))
    toml = _toml_layer(flags.get("config") or os.environ.get("SLUICE_CONFIG"))
    layers = [flags, _env_layer(options), toml]

    def pick(option: str, default: Any) -> Any:
        for layer in layers:
            if layer.get(option) not in (None, []):
                return layer[option]
        return default

    try:
        port = int(pick("port", DEFAULT_PORT))
        buffer_messages = int(pick("buffer_messages", 1_000_000))
        buffer_mb = int(pick("buffer_mb", DEFAULT_BUFFER_MB))
        spool_mb = int(pick("spool_mb", 4096))
        batch_events = int(pick("batch_events", DEFAULT_BATCH_EVENTS))
    except ValueError as exc:
        raise ConfigError(f"expected a number: {exc}") from None
    reader_process = str(pick("reader_process", "on")).lower()
    if reader_process not in ("on", "off"):
        raise ConfigError(f"--reader-process is on or off, not {reader_process!r}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range (0-65535)")
    return Config(
        brokers=_as_list(pick("broker", [])),
        db=str(pick("db", DEFAULT_DB)),
        host=str(pick("host", DEFAULT_HOST)),
        port=port,
        plugins=_as_list(pick("plugin", [])),
        log_level=str(pick("log_level", "INFO")).upper(),
        buffer_messages=buffer_messages,
        buffer_mb=buffer_mb,
        spool_mb=spool_mb,
        spool_dir=pick("spool_dir", None),
        batch_events=batch_events,
        reader_process=reader_process == "on",
        layers=layers,
    )


def add_core_options(parser: argparse.ArgumentParser) -> None:
    """Options of every engine command; defaults are applied by :func:`build`."""
    parser.add_argument("--config", help="TOML file with options (env SLUICE_CONFIG)")
    parser.add_argument(
        "--plugin", action="append", help="load a plugin by entry-point name (repeatable)"
    )
    parser.add_argument(
        "--broker",
        action="append",
        help="broker URL to watch, e.g. redis://localhost:6379/0 (repeatable; env SLUICE_BROKER_URL)",
    )
    parser.add_argument(
        "--db", help=f"database URL (default {DEFAULT_DB}; env SLUICE_DATABASE_URL)"
    )
    parser.add_argument("--host", help=f"address to serve on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, help=f"port to serve on (default {DEFAULT_PORT})")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    parser.add_argument(
        "--buffer-messages", type=int, help="raw messages held in memory (default 1,000,000)"
    )
    parser.add_argument(
        "--buffer-mb", type=int, help="MiB of raw messages held in memory (default 8)"
    )
    parser.add_argument(
        "--spool-mb",
        type=int,
        help="MiB of raw messages spooled to disk past --buffer-mb, before dropping"
        " (default 4096; 0: drop instead)",
    )
    parser.add_argument(
        "--spool-dir", help="where the spool file lives (default: the temporary directory)"
    )
    parser.add_argument("--batch-events", type=int, help="most events per storage transaction")
    parser.add_argument(
        "--reader-process",
        help="on: read and normalize broker events in a child process, off: in this one"
        " (default on; env SLUICE_READER_PROCESS)",
    )
    parser.add_argument(
        "--api-token",
        help="require 'Authorization: Bearer TOKEN' on the API (env SLUICE_API_TOKEN)",
    )
    parser.add_argument(
        "--session-secret",
        help="key signing dashboard login cookies; share it between web replicas "
        "(env SLUICE_SESSION_SECRET; default: random at each start)",
    )
    parser.add_argument(
        "--heartbeat-missed",
        type=float,
        help="heartbeat intervals without news before a worker is offline (default 3)",
    )
    parser.add_argument(
        "--stuck-after",
        type=float,
        help="seconds a job may wait queued with no worker taking it before it is flagged"
        " stuck (default 600; env SLUICE_STUCK_AFTER); active jobs are stuck past 5x"
        " their task's mean runtime (at least 60 s)",
    )

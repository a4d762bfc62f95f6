"""Options, declared once: name, type, default, help, and the commands that take it.

Every option of the core and of plugins is an :class:`Option`. Its name gives
the three ways to set it, in order of precedence: the flag ``--some-name``, the
environment variable ``SLUICE_SOME_NAME``, the key ``some_name`` in the TOML
file (top level or in a ``[sluice]`` table). Its ``kind`` turns what was given
(a string from a flag or the environment, or a TOML value) into the typed
value, or raises ``ValueError`` naming what it accepts; the caller turns that
into one line that names the option (see :func:`sluice_core.config.build`).

A plugin declares its options in the ``sluice_addoption`` hook::

    PORT = Option("toyqueue_port", kind=integer(1, 65535), default=6400, help="...")

    @hookimpl
    def sluice_addoption(parser: OptionParser) -> None:
        parser.add(PORT)

and reads them typed with ``config.get(PORT)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import attrs

# Covariant: an Option[str] may stand where an Option[str | None] is expected. PEP 695
# syntax would infer these classes invariant (attrs' frozen fields look writable to mypy).
T_co = TypeVar("T_co", covariant=True)

# The commands an option belongs to; `sluice COMMAND --help` lists only its own.
RUN, AGENT, WEB = "run", "agent", "web"
MIGRATE, PLUGINS, KEYS = "migrate", "plugins", "keys"
REDACT = "redact"  # scrub the database with the redaction rules
PRUNE = "prune"  # delete what the retention policy expires
# Store events (from brokers, or pushed to a web replica's ingest endpoint) and act on
# the brokers (retry, revoke): the default.
ENGINE = frozenset({RUN, AGENT, WEB})
SOURCES = frozenset({RUN, AGENT})  # read the brokers: buffers, probes, monitors
SERVING = frozenset({RUN, WEB})  # the dashboard and the API
DATABASE = frozenset({RUN, AGENT, WEB, MIGRATE, KEYS, REDACT, PRUNE})
EVERY = frozenset({RUN, AGENT, WEB, MIGRATE, PLUGINS, KEYS, REDACT, PRUNE})


@attrs.frozen
class Kind(Generic[T_co]):  # noqa: UP046
    """How an option's raw value becomes a typed one."""

    accepts: str  # what a user may give, for errors and --help: "an integer from 0 to 65535"
    parse: Callable[[object], T_co]  # raises ValueError or TypeError if the value is not accepted
    many: bool = False  # a list: the flag repeats, the environment holds a comma list
    alone: str | None = None  # what the flag given without a value means (--apply: "on")
    metavar: str = "VALUE"  # in --help


@attrs.frozen
class Option(Generic[T_co]):  # noqa: UP046
    name: str
    kind: Kind[T_co]
    default: T_co
    help: str
    commands: frozenset[str] = ENGINE
    env: str = ""  # default SLUICE_<NAME>
    flag: str | None = ""  # default --<name-with-dashes>; None: only environment and file
    metavar: str | None = None
    secret: bool = False  # never echoed back, not even in an error

    @property
    def env_name(self) -> str:
        return self.env or "SLUICE_" + self.name.upper()

    @property
    def flag_name(self) -> str | None:
        if self.flag is None:
            return None
        return self.flag or "--" + self.name.replace("_", "-")


class OptionParser:
    """Every declared option, core and plugins alike (the ``sluice_addoption`` hook)."""

    def __init__(self) -> None:
        self._options: dict[str, Option[Any]] = {}

    def add(self, *options: Option[Any]) -> None:
        for option in options:
            known = self._options.get(option.name)
            if known is not None and known != option:
                raise ValueError(f"option {option.name!r} is declared twice")
            self._options[option.name] = option

    def __iter__(self) -> Iterator[Option[Any]]:
        return iter(self._options.values())

    def for_command(self, command: str) -> list[Option[Any]]:
        return [option for option in self if command in option.commands]


# -- kinds ----------------------------------------------------------------


def _text(raw: object) -> str:
    if not isinstance(raw, str):
        raise TypeError
    return raw


def text(*, min_length: int = 0) -> Kind[str]:
    def parse(raw: object) -> str:
        value = _text(raw)
        if len(value) < min_length:
            raise ValueError
        return value

    accepts = f"text of at least {min_length} characters" if min_length else "text"
    return Kind(accepts, parse, metavar="TEXT")


def _number(raw: object) -> float:
    if isinstance(raw, bool):
        raise TypeError
    if isinstance(raw, int | float):
        return float(raw)
    return float(_text(raw).strip().replace("_", ""))


def integer(minimum: int | None = None, maximum: int | None = None) -> Kind[int]:
    def parse(raw: object) -> int:
        if isinstance(raw, (bool, float)):
            raise TypeError
        value = raw if isinstance(raw, int) else int(_text(raw).strip().replace("_", ""))
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ValueError
        return value

    return Kind(_range("an integer", minimum, maximum), parse, metavar="N")


def number(
    minimum: float | None = None, maximum: float | None = None, *, above: float | None = None
) -> Kind[float]:
    """A real number; ``above`` is an exclusive lower bound (``seconds`` are above 0)."""

    def parse(raw: object) -> float:
        value = _number(raw)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError
        if above is not None and value <= above:
            raise ValueError
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ValueError
        return value

    accepts = _range("a number", minimum, maximum)
    if above is not None:
        accepts = f"a number above {above:g}" + (f" and at most {maximum:g}" if maximum else "")
    return Kind(accepts, parse, metavar="X")


def seconds(maximum: float | None = None) -> Kind[float]:
    kind = number(maximum=maximum, above=0)
    accepts = kind.accepts.replace("a number", "seconds")
    return attrs.evolve(kind, accepts=accepts, metavar="SECONDS")


def _range(what: str, minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"{what} from {minimum:g} to {maximum:g}"
    if minimum is not None:
        return f"{what} of at least {minimum:g}"
    if maximum is not None:
        return f"{what} of at most {maximum:g}"
    return what


def choice(*values: str) -> Kind[str]:
    def parse(raw: object) -> str:
        value = _text(raw).strip()
        for allowed in values:
            if value.lower() == allowed.lower():
                return allowed
        raise ValueError

    return Kind(" or ".join(values), parse, metavar="|".join(values))


_SWITCH = {"on": True, "true": True, "yes": True, "1": True}
_SWITCH |= {"off": False, "false": False, "no": False, "0": False}


def switch() -> Kind[bool]:
    def parse(raw: object) -> bool:
        if isinstance(raw, bool):
            return raw
        return _SWITCH[_text(raw).strip().lower()]

    return Kind("on or off", parse, metavar="on|off", alone="on")


def many(item: Kind[str]) -> Kind[list[str]]:
    """A list: a repeated flag, a comma list in the environment, a list in the file."""

    def parse(raw: object) -> list[str]:
        parts: Iterable[object]
        if isinstance(raw, str):
            parts = [part.strip() for part in raw.split(",") if part.strip()]
        elif isinstance(raw, list | tuple):
            parts = raw
        else:
            raise TypeError
        return [item.parse(part) for part in parts]

    return Kind(f"a list of {item.accepts}", parse, many=True, metavar=item.metavar)


def table() -> Kind[dict[str, str]]:
    """A TOML table of strings (the file only: e.g. ``[users]``)."""

    def parse(raw: object) -> dict[str, str]:
        if not isinstance(raw, dict):
            raise TypeError
        return {str(key): _text(value) for key, value in raw.items()}

    return Kind("a table of name = \"text\" entries", parse)

"""The plugin manager: a typed facade over pluggy, one method per hook."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from importlib.metadata import entry_points
from types import ModuleType

import pluggy

from sluice_core import hookspecs, validate
from sluice_core.actions import ActionHandler
from sluice_core.alerting.model import ChannelType
from sluice_core.config import REDACT_KEYS, REDACT_PATTERNS, Config, ConfigError, redact_url
from sluice_core.frameworks import Framework, Frameworks
from sluice_core.model import Normalized, RawBatch
from sluice_core.options import OptionParser
from sluice_core.probes import Probe
from sluice_core.reconcile import Reconciler
from sluice_core.redact import Redactor
from sluice_core.sources import Source
from sluice_core.storage import Storage

# Built-in behaviour is registered through the same hooks a third party uses: the
# storage backends and the alert channels.
DEFAULT_PLUGINS = ("sluice_storage.sqlite", "sluice_storage.postgres", "sluice_alerts.plugin")

ENTRY_POINT_GROUP = "sluice"

log = logging.getLogger(__name__)
_normalizer_failures = validate.Throttle(10.0)


def _installed_claimants(url: str, *, loaded: pluggy.PluginManager) -> list[str]:
    """The installed plugins, not loaded, that would watch ``url`` (for the error's advice)."""
    found = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if loaded.has_plugin(entry.name):
            continue
        probe = PluginManager(builtins=False)
        try:
            probe.load([entry.name])
        except Exception as exc:  # a broken third-party plugin must not hide the advice
            log.debug("plugin %s could not be loaded: %s", entry.name, exc)
            continue
        if probe.claims_broker(url):
            found.append(entry.name)
    return found


class PluginManager:
    def __init__(self, *, builtins: bool = True) -> None:
        """``builtins=False``: without the built-in plugins, the storage backends and the
        alert channels (the reader process has no database and sends no alert, and their
        drivers cost it 10 MB)."""
        self._pm = pluggy.PluginManager("sluice")
        self._pm.add_hookspecs(hookspecs)
        for name in DEFAULT_PLUGINS if builtins else ():
            self._pm.register(importlib.import_module(name), name=name)
        # Secrets are redacted from the start; configure() applies the chosen names.
        self._redactor = Redactor(REDACT_KEYS.default, REDACT_PATTERNS.default)

    # -- registration ----------------------------------------------------

    def load(self, names: Iterable[str]) -> None:
        """Load the named plugins from the ``sluice`` entry-point group."""
        available = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
        for name in names:
            if self._pm.has_plugin(name):
                continue
            if name not in available:
                known = ", ".join(sorted(available)) or "none"
                raise ConfigError(f"no plugin named {name!r} (installed: {known})")
            plugin = available[name].load()
            self.register(plugin, name=name)
            # A plugin may need others (the Celery plugin reads amqp:// brokers
            # through the rabbitmq plugin): it names them in SLUICE_REQUIRES.
            self.load(getattr(plugin, "SLUICE_REQUIRES", ()))

    def register(self, plugin: object, name: str | None = None) -> None:
        self._pm.register(plugin, name=name)
        # A misspelled hook implementation fails loudly here, not silently later.
        self._pm.check_pending()

    def describe(self) -> list[tuple[str, list[str]]]:
        """Each plugin's name and the hooks it implements (``sluice plugins``)."""
        out = []
        for name, plugin in sorted(self._pm.list_name_plugin(), key=lambda item: item[0]):
            hooks = sorted(caller.name for caller in self._pm.get_hookcallers(plugin) or [])
            where = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__name__
            out.append((f"{name} ({where})", hooks))
        return out

    # -- hooks -----------------------------------------------------------

    def add_options(self, parser: OptionParser) -> None:
        self._pm.hook.sluice_addoption.call_historic(kwargs={"parser": parser})

    def claims_broker(self, url: str) -> bool:
        return bool(self._pm.hook.sluice_claim_broker(url=url))

    def check_brokers(self, config: Config) -> None:
        """Every broker asked for is watched by a loaded plugin, or start-up fails
        naming the installed plugin that would watch it."""
        for url in config.brokers:
            if self.claims_broker(url):
                continue
            shown = redact_url(url)
            would = _installed_claimants(url, loaded=self._pm)
            if would:
                flags = " ".join(f"--plugin {name}" for name in would)
                raise ConfigError(f"no loaded plugin watches {shown}: add {flags}")
            raise ConfigError(
                f"no installed plugin watches {shown}: check the URL's scheme, or install"
                " a plugin for that broker and load it with --plugin NAME"
            )

    def configure(self, config: Config) -> None:
        self._redactor = Redactor(config.get(REDACT_KEYS), config.get(REDACT_PATTERNS))
        self._pm.hook.sluice_configure.call_historic(kwargs={"config": config})

    def admit(self, normalized: Normalized) -> Normalized:
        """The door every event from outside passes once: values checked
        (:func:`sluice_core.validate.check`), then secrets redacted."""
        return self._redactor.apply(validate.check(normalized))

    def storage(self, config: Config) -> Storage:
        backend: Storage | None = self._pm.hook.sluice_storage(url=config.db, config=config)
        if backend is None:
            raise ConfigError(
                f"no storage backend for {config.db!r}: use sqlite:///path.db or postgresql://..."
            )
        return backend

    def sources(self, config: Config) -> list[Source]:
        found: list[Source] = []
        self._pm.hook.sluice_sources(config=config, register=found.append)
        names = [source.name for source in found]
        if len(set(names)) != len(names):
            raise ConfigError(f"two sources share a name: {sorted(names)}")
        return found

    def normalize(self, batch: RawBatch) -> Normalized | None:
        """The first plugin's reading of ``batch`` (None: no plugin reads its kind), its
        values checked (:func:`sluice_core.validate.check`): every event a source reads
        passes here, whichever plugin made it."""
        try:
            normalized: Normalized | None = self._pm.hook.sluice_normalize(batch=batch)
        except Exception:
            # The hook must not raise, but a bug in one plugin must not stop all ingest.
            if _normalizer_failures.allow():
                log.exception(
                    "a normalizer failed on %d %r messages from %s: they are skipped",
                    len(batch.messages), batch.kind, batch.source,
                )
            return Normalized(malformed=len(batch.messages))
        return None if normalized is None else self.admit(normalized)

    def actions(self, config: Config) -> list[ActionHandler]:
        found: list[ActionHandler] = []
        self._pm.hook.sluice_actions(config=config, register=found.append)
        return found

    def frameworks(self, config: Config) -> Frameworks:
        found: list[Framework] = []
        self._pm.hook.sluice_frameworks(config=config, register=found.append)
        return Frameworks(found)

    def probes(self, config: Config) -> list[Probe]:
        found: list[Probe] = []
        self._pm.hook.sluice_probes(config=config, register=found.append)
        return found

    def alert_channels(self, config: Config) -> dict[str, ChannelType]:
        """The registered channel types, by name; two of one name are a ConfigError."""
        found: list[ChannelType] = []
        self._pm.hook.sluice_alert_channels(config=config, register=found.append)
        by_name: dict[str, ChannelType] = {}
        for kind in found:
            if kind.name in by_name:
                raise ConfigError(f"two plugins register the alert channel type {kind.name!r}")
            by_name[kind.name] = kind
        return by_name

    def reconcilers(self, config: Config) -> list[Reconciler]:
        found: list[Reconciler] = []
        self._pm.hook.sluice_reconcilers(config=config, register=found.append)
        return found


async def close_all(parts: Iterable[object]) -> None:
    """Close what plugins gave (action handlers, probes, reconcilers: they may hold broker
    connections of their own), each that has ``aclose``; one that fails is logged, and the
    others are still closed."""
    for part in parts:
        aclose = getattr(part, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception as exc:
                log.warning("closing %r: %s", part, exc)

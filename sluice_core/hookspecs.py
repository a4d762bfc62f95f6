"""Every hook a Sluice plugin can implement (docs/plugins.md).

A plugin is a module or object with functions marked ``@sluice_core.hookimpl``
and named like the specs below; it is found through the ``sluice`` entry-point
group (``sluice run --plugin NAME``) or registered by the engine itself (the
storage backends). Core code never calls ``pm.hook.*`` directly: it goes
through :class:`sluice_core.plugins.PluginManager`, one method per hook.

Registration hooks receive a ``register`` callable instead of returning lists,
so a plugin may register any number of things, and the core can check each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from sluice_core.actions import ActionHandler
    from sluice_core.alerting.model import ChannelType
    from sluice_core.config import Config
    from sluice_core.frameworks import Framework
    from sluice_core.model import Normalized, RawBatch
    from sluice_core.options import OptionParser
    from sluice_core.probes import Probe
    from sluice_core.reconcile import Reconciler
    from sluice_core.sources import Source
    from sluice_core.storage import Storage

hookspec = pluggy.HookspecMarker("sluice")


# -------------------------------------------------------------------------
# Configuration
# -------------------------------------------------------------------------


@hookspec(historic=True)
def sluice_addoption(parser: OptionParser) -> None:
    """Declare your options: ``parser.add(Option(...))``, each once.

    Called once the plugins named with ``--plugin`` are loaded, before the
    command line is parsed in full. Historic: a plugin registered later is
    still called. An option's name gives its flag (``--name``), environment
    variable (``SLUICE_NAME``) and TOML key (``name``); its kind parses and
    validates the value once. Read it typed with ``config.get(OPTION)``. See
    :mod:`sluice_core.options`.
    """


@hookspec(firstresult=True)
def sluice_claim_broker(url: str) -> bool | None:
    """Return True if your sources watch the broker at ``url``, else None.

    Called at start for each ``--broker`` URL of ``run`` and ``agent``, and
    for installed plugins that are not loaded when no loaded one claims a URL
    (to name the plugin to load). A URL no plugin claims stops the start with
    exit status 2. Stops at the first non-None result.
    """


@hookspec(historic=True)
def sluice_configure(config: Config) -> None:
    """The configuration is final: read your options from ``config``.

    Called once per engine, after flags, environment and the TOML file are
    merged. Historic. Raise :class:`sluice_core.config.ConfigError` with a
    message the user can act on if an option is invalid.
    """


# -------------------------------------------------------------------------
# Storage
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def sluice_storage(url: str, config: Config) -> Storage | None:
    """Return a storage backend for the database ``url``, or None if not yours.

    Called once at start with the configured database URL (SQLAlchemy style,
    e.g. ``sqlite:///sluice.db``, ``postgresql://user@host/db``). Stops at the
    first non-None result. The backend is opened (and migrated) by the engine.
    """


# -------------------------------------------------------------------------
# Ingestion: sources and normalizers
# -------------------------------------------------------------------------


@hookspec
def sluice_sources(config: Config, register: Callable[[Source], None]) -> None:
    """Register the event sources to run, e.g. one per broker URL you handle.

    Called once at engine start. Each registered source's ``run`` is started
    in the engine's nursery with ``nursery.start`` and must call
    ``task_status.started()`` only once it is really receiving.
    """


@hookspec(firstresult=True)
def sluice_normalize(batch: RawBatch) -> Normalized | None:
    """Turn raw messages into normalized job and worker events.

    Called for every batch a source hands over; claim batches whose
    ``batch.kind`` is yours and return None for the others. Stops at the first
    non-None result. Never raise for bad input: count undecodable messages in
    ``Normalized.malformed`` (the engine logs and exports them). The values of the
    events returned are checked by the core, for every plugin alike
    (:func:`sluice_core.validate.check`).
    """


@hookspec
def sluice_frameworks(config: Config, register: Callable[[Framework], None]) -> None:
    """Register what the core must know of each framework you serve (a
    :class:`~sluice_core.frameworks.Framework`): its workers' heartbeat interval
    when they do not say, the advice for workers whose job events do not reach
    Sluice, the formats its events may be pushed in, when its broker gives back a
    dead worker's unstarted job. Called once at start; a framework nobody declared
    gets the defaults.
    """


# -------------------------------------------------------------------------
# Acting on jobs, and looking at queues
# -------------------------------------------------------------------------


@hookspec
def sluice_actions(config: Config, register: Callable[[ActionHandler], None]) -> None:
    """Register action handlers (retry, revoke) for the frameworks you serve.

    Called once at engine start. The engine picks, for a job, the first
    handler whose ``handles(job)`` is true.
    """


@hookspec
def sluice_probes(config: Config, register: Callable[[Probe], None]) -> None:
    """Register probes: periodic measurements such as queue depth and consumers.

    Called once at engine start; each probe is polled every
    ``probe.interval`` seconds in the engine's nursery.
    """


# -------------------------------------------------------------------------
# After a gap: asking the deployment what Sluice missed
# -------------------------------------------------------------------------


@hookspec
def sluice_reconcilers(config: Config, register: Callable[[Reconciler], None]) -> None:
    """Register reconcilers: one per source whose gaps you can reconcile.

    Called once at engine start. When a source was not heard for a while (Sluice
    stopped, the source reconnected, events dropped), the engine calls the
    reconciler whose ``source`` is that source's name with the jobs that were open
    at the gap, and stores the events it returns; the open jobs it does not settle
    are marked unknown (see :mod:`sluice_core.reconcile`).
    """


# -------------------------------------------------------------------------
# Alerting
# -------------------------------------------------------------------------


@hookspec
def sluice_alert_channels(config: Config, register: Callable[[ChannelType], None]) -> None:
    """Register kinds of alert channel (a :class:`~sluice_core.alerting.model.ChannelType`:
    its name, which config keys are secrets, how its config is checked and how a
    message is sent). The built-in ones (webhook, Slack, PagerDuty, email) are a plugin
    too. Called once at start."""

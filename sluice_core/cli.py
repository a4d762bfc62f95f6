"""The ``sluice`` command: run, migrate, plugins."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from sluice_core import __version__
from sluice_core.config import Config, ConfigError, add_core_options, build
from sluice_core.engine import Engine
from sluice_core.plugins import PluginManager

log = logging.getLogger("sluice")


def _plugin_names(argv: Sequence[str]) -> list[str]:
    """The plugins to load, before the full command line can be parsed (they add options)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    config = build(argparse.Namespace(plugin=known.plugin, config=known.config))
    return config.plugins


def make_parser(pm: PluginManager) -> argparse.ArgumentParser:
    engine_options = argparse.ArgumentParser(add_help=False)
    add_core_options(engine_options)
    pm.add_options(engine_options)

    parser = argparse.ArgumentParser(
        prog="sluice", description="Sluice: a monitor for job queues (Celery first)."
    )
    parser.add_argument("--version", action="version", version=f"sluice {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "run",
        parents=[engine_options],
        help="watch the brokers, store every event, serve the dashboard and API",
    )
    commands.add_parser(
        "migrate", parents=[engine_options], help="apply pending database migrations"
    )
    commands.add_parser(
        "plugins", parents=[engine_options], help="list loaded plugins and their hooks"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pm = PluginManager()
    try:
        pm.load(_plugin_names(argv))
        args = make_parser(pm).parse_args(argv)
        config = build(args)
        logging.basicConfig(
            level=config.log_level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        pm.configure(config)
        if args.command == "plugins":
            for name, hooks in pm.describe():
                print(name)
                for hook in hooks:
                    print(f"    {hook}")
            return 0
        if args.command == "migrate":
            applied = trio.run(_migrate, config, pm)
            print(f"applied migrations: {applied}" if applied else "database is up to date")
            return 0
        return trio.run(_run, config, pm)
    except* ConfigError as group:
        # Also raised by tasks in the engine's nurseries (the web server refusing
        # its address), which wrap it in exception groups.
        for exc in _leaves(group):
            print(f"sluice: error: {exc}", file=sys.stderr)
    return 2


def _leaves(group: BaseExceptionGroup[ConfigError]) -> list[ConfigError]:
    return [
        leaf
        for exc in group.exceptions
        for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]


async def _migrate(config: Config, pm: PluginManager) -> list[int]:
    storage = pm.storage(config)
    applied = await storage.open()  # opening applies pending migrations
    await storage.aclose()
    return applied


async def _run(config: Config, pm: PluginManager) -> int:
    engine = Engine(config, pm)
    if not engine.sources:
        log.warning(
            "no event source configured: load a plugin and give a broker "
            "(sluice run --plugin celery --broker redis://localhost:6379/0)"
        )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, engine)
        await nursery.start(engine.run)
        for address in engine.web_addresses:
            log.info("Sluice %s is serving on %s (pid %d)", __version__, address, os.getpid())
        # Once the engine has stopped and flushed, the signal watcher goes too.
        await engine.stopped.wait()
        nursery.cancel_scope.cancel()
    return 0


async def _stop_on_signal(engine: Engine) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if engine.stop_requested:
                log.warning("second %s: exiting without waiting", signal.Signals(signum).name)
                os._exit(1)
            log.info("%s received", signal.Signals(signum).name)
            engine.stop()

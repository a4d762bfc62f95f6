"""The ``sluice`` command: run, agent, migrate, plugins, keys."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

import trio

from sluice_core import __version__
from sluice_core.config import LOG_FORMAT, Config, ConfigError, add_core_options, build
from sluice_core.agent import Agent
from sluice_core.engine import Engine
from sluice_core.plugins import PluginManager
from sluice_core.storage import ApiKey, ApiKeyExists

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
    agent = commands.add_parser(
        "agent",
        parents=[engine_options],
        help="watch the brokers without serving: store into --db, or stream to --server",
    )
    agent.add_argument(
        "--server",
        help="stream normalized events to this Sluice (wss://host or ws://host:port)"
        " instead of a database (env SLUICE_SERVER)",
    )
    agent.add_argument(
        "--api-key", help="the server's API key, from `sluice keys create` (env SLUICE_API_KEY)"
    )
    keys = commands.add_parser(
        "keys", help="API keys for the ingest endpoints (the SDK, remote agents)"
    )
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = key_commands.add_parser(
        "create", parents=[engine_options], help="create a key and print it (once)"
    )
    create.add_argument("name", help="what the key is for, e.g. billing-app or eu-agent")
    key_commands.add_parser("list", parents=[engine_options], help="list keys (never the keys)")
    revoke = key_commands.add_parser(
        "revoke", parents=[engine_options], help="revoke the active key of this name"
    )
    revoke.add_argument("name")
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
            format=LOG_FORMAT,
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
        if args.command == "keys":
            return trio.run(_keys, config, pm, args.keys_command, getattr(args, "name", None))
        if args.command == "agent":
            return trio.run(_agent, config, pm)
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


async def _keys(config: Config, pm: PluginManager, action: str, name: str | None) -> int:
    storage = pm.storage(config)
    await storage.open()
    try:
        if action == "create":
            assert name is not None
            try:
                key, secret = await storage.create_api_key(name)
            except ApiKeyExists as exc:
                print(
                    f"sluice: error: {exc}; revoke it first or pick another name", file=sys.stderr
                )
                return 1
            print(secret)
            print(
                f"API key {key.name!r} created. Keep it now: Sluice stores only its hash"
                " and cannot show it again.",
                file=sys.stderr,
            )
        elif action == "list":
            for key in await storage.list_api_keys():
                print(_describe_key(key))
        else:
            assert name is not None
            revoked = await storage.revoke_api_key(name)
            if revoked is None:
                print(f"sluice: error: no active API key named {name!r}", file=sys.stderr)
                return 1
            print(f"revoked {_describe_key(revoked)}")
    finally:
        await storage.aclose()
    return 0


def _describe_key(key: ApiKey) -> str:
    def when(ts: float | None) -> str:
        if ts is None:
            return "never"
        return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(" ", "seconds")

    status = "active" if key.revoked_at is None else f"revoked {when(key.revoked_at)}"
    used = when(key.last_used_at)
    return f"{key.name}\tcreated {when(key.created_at)}\tlast used {used}\t{status}"


async def _agent(config: Config, pm: PluginManager) -> int:
    server = config.get("server")
    if server is None:
        return await _run(config, pm, web=False)  # a split deployment: store into --db
    api_key = config.get("api_key")
    if not api_key:
        raise ConfigError(
            "--server needs --api-key (env SLUICE_API_KEY): create one on the server with"
            " `sluice keys create NAME`"
        )
    agent = Agent(config, pm, server=str(server), api_key=str(api_key))

    def started() -> None:
        url, pid = agent.uplink.url, os.getpid()
        log.info("Sluice agent %s is streaming to %s (pid %d)", __version__, url, pid)

    return await _until_stopped(agent, agent.run, started)


async def _run(config: Config, pm: PluginManager, *, web: bool = True) -> int:
    engine = Engine(config, pm)

    def started() -> None:
        for address in engine.web_addresses:
            log.info("Sluice %s is serving on %s (pid %d)", __version__, address, os.getpid())

    return await _until_stopped(engine, functools.partial(engine.run, web=web), started)


async def _until_stopped(
    runner: Engine | Agent, run: Callable[..., Awaitable[None]], started: Callable[[], None]
) -> int:
    if not runner.sources:
        log.warning(
            "no event source configured: load a plugin and give a broker "
            "(sluice run --plugin celery --broker redis://localhost:6379/0)"
        )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, runner)
        await nursery.start(run)
        started()
        # Once it has stopped and flushed, the signal watcher goes too.
        await runner.stopped.wait()
        nursery.cancel_scope.cancel()
    return 0


async def _stop_on_signal(engine: Engine | Agent) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if engine.stop_requested:
                log.warning("second %s: exiting without waiting", signal.Signals(signum).name)
                os._exit(1)
            log.info("%s received", signal.Signals(signum).name)
            engine.stop()

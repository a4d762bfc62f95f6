"""The ``sluice`` command: run, agent, web, migrate, plugins, keys, redact, prune."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import trio

from sluice_core import __version__
from sluice_core.agent import Agent
from sluice_core.config import (
    API_KEY,
    APPLY,
    CONFIG,
    LOG_FORMAT,
    PLUGIN,
    REDACT_BATCH_JOBS,
    REDACT_KEYS,
    REDACT_PATTERNS,
    SERVER,
    Config,
    ConfigError,
    build,
    core_options,
)
from sluice_core.engine import Engine
from sluice_core.options import (
    AGENT,
    KEYS,
    MIGRATE,
    PLUGINS,
    PRUNE,
    REDACT,
    RUN,
    WEB,
    Option,
    OptionParser,
)
from sluice_core.plugins import PluginManager
from sluice_core.redact import Redactor
from sluice_core.retention import DRY_RUN, PRUNE_BATCH_JOBS, RetentionPolicy
from sluice_core.storage import ApiKey, ApiKeyExists

log = logging.getLogger("sluice")


def _plugin_names(argv: Sequence[str], environ: Mapping[str, str] | None) -> list[str]:
    """The plugins to load, before the full command line can be parsed (they add options)."""
    pre = argparse.ArgumentParser(add_help=False)
    for option in (PLUGIN, CONFIG):
        pre.add_argument(option.flag_name or "", dest=option.name, action=_action(option))
    known, _ = pre.parse_known_args(argv)
    return build([PLUGIN, CONFIG], vars(known), environ=environ, known=None).plugins


def _action(option: Option[Any]) -> str:
    return "append" if option.kind.many else "store"


def _add_options(parser: argparse.ArgumentParser, options: OptionParser, command: str) -> None:
    for option in options.for_command(command):
        flag = option.flag_name
        if flag is None:
            continue  # set in the environment or the file only
        default = option.default
        if isinstance(default, bool):
            default = "on" if default else "off"
        shown = "" if default in (None, "", [], {}) else f"; default {default}"
        alone: dict[str, Any] = (
            {} if option.kind.alone is None else {"nargs": "?", "const": option.kind.alone}
        )
        parser.add_argument(
            flag,
            dest=option.name,
            action=_action(option),
            metavar=option.metavar or option.kind.metavar,
            help=f"{option.help} (env {option.env_name}{shown})",
            **alone,
        )


def make_parser(options: OptionParser) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice", description="Sluice: a monitor for job queues (Celery first)."
    )
    parser.add_argument("--version", action="version", version=f"sluice {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        sub: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        help: str,
        option_set: str,
    ) -> argparse.ArgumentParser:
        made = sub.add_parser(name, help=help, description=help)
        _add_options(made, options, option_set)
        return made

    command(commands, RUN, "watch the brokers, store every event, serve the dashboard and API", RUN)
    command(commands, MIGRATE, "apply pending database migrations", MIGRATE)
    command(commands, PLUGINS, "list loaded plugins and their hooks", PLUGINS)
    command(
        commands,
        AGENT,
        "watch the brokers without serving: store into --db, or stream to --server",
        AGENT,
    )
    command(
        commands,
        WEB,
        "serve the dashboard and API from a PostgreSQL that agents write (one of many replicas)",
        WEB,
    )
    command(
        commands,
        REDACT,
        "scrub the database with the redaction rules (--redact-keys, --redact-patterns):"
        " a dry run that says what would change, unless --apply",
        REDACT,
    )
    command(
        commands,
        PRUNE,
        "delete the jobs the retention policy expires (--retain-days, --retain-failed-days,"
        " --retain), with their events; --dry-run only counts them",
        PRUNE,
    )
    keys = commands.add_parser(
        KEYS, help="API keys for the ingest endpoints (the SDK, remote agents)"
    )
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = command(key_commands, "create", "create a key and print it (once)", KEYS)
    create.add_argument("name", help="what the key is for, e.g. billing-app or eu-agent")
    command(key_commands, "list", "list keys (never the keys)", KEYS)
    revoke = command(key_commands, "revoke", "revoke the active key of this name", KEYS)
    revoke.add_argument("name")
    return parser


def parse(
    argv: Sequence[str], environ: Mapping[str, str] | None = None
) -> tuple[argparse.Namespace, Config, PluginManager]:
    """A command line, with the environment and the TOML file: the command's
    arguments, its configuration, and the plugins it loaded, configured."""
    pm = PluginManager()
    pm.load(_plugin_names(argv, environ))
    options = core_options()
    pm.add_options(options)
    args = make_parser(options).parse_args(argv)
    config = build(
        options.for_command(args.command),
        vars(args),
        environ=environ,
        known=[option.name for option in options],
    )
    if args.command in (RUN, AGENT, WEB):
        pm.check_brokers(config)
    pm.configure(config)
    return args, config, pm


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, config, pm = parse(argv)
        logging.basicConfig(level=config.log_level, format=LOG_FORMAT, stream=sys.stderr)
        if args.command == PLUGINS:
            for name, hooks in pm.describe():
                print(name)
                for hook in hooks:
                    print(f"    {hook}")
            return 0
        if args.command == MIGRATE:
            applied = trio.run(_migrate, config, pm)
            print(f"applied migrations: {applied}" if applied else "database is up to date")
            return 0
        if args.command == KEYS:
            return trio.run(_keys, config, pm, args.keys_command, getattr(args, "name", None))
        if args.command == REDACT:
            return trio.run(_redact, config, pm)
        if args.command == PRUNE:
            return trio.run(_prune, config, pm)
        if args.command == AGENT:
            return trio.run(_agent, config, pm)
        if args.command == WEB:
            return trio.run(functools.partial(_run, config, pm, replica=True))
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


async def _redact(config: Config, pm: PluginManager) -> int:
    redactor = Redactor(config.get(REDACT_KEYS), config.get(REDACT_PATTERNS))
    if not redactor.active:
        raise ConfigError("no redaction rules: give --redact-keys or --redact-patterns")
    apply = config.get(APPLY)
    storage = pm.storage(config)
    await storage.open()
    try:
        found = await storage.redact(redactor, apply=apply, batch=config.get(REDACT_BATCH_JOBS))
    finally:
        await storage.aclose()
    # Counts only: never a value, which is what is being hidden.
    verb = "redacted" if apply else "would redact"
    print(f"jobs: {found.jobs} read, {verb} {found.jobs_changed}")
    print(f"events: {found.events} read, {verb} {found.events_changed}")
    print(f"dead letters: {found.dead_letters} read, {verb} {found.dead_letters_changed}")
    if not apply:
        print("dry run: nothing was changed; run again with --apply to replace them")
    elif found.note:
        print(found.note)
    return 0


async def _prune(config: Config, pm: PluginManager) -> int:
    policy = RetentionPolicy.from_config(config)
    dry_run = config.get(DRY_RUN)
    storage = pm.storage(config)
    await storage.open()
    try:
        before = await storage.footprint()
        pruned = await storage.prune(
            policy, time.time(), dry_run=dry_run, batch=config.get(PRUNE_BATCH_JOBS)
        )
        after = await storage.footprint()
    finally:
        await storage.aclose()
    print(policy.describe())
    verb = "would delete" if dry_run else "deleted"
    for state in sorted(pruned.jobs_by_state):
        print(f"{state}: {verb} {pruned.jobs_by_state[state]} jobs")
    print(f"total: {verb} {pruned.jobs} jobs and {pruned.events} events"
          f" in {pruned.chunks} transactions (longest {pruned.longest_chunk_s * 1000:.0f} ms)")
    if pruned.partitions:
        print(f"day partitions: {'would drop' if dry_run else 'dropped'} {pruned.partitions}"
              f" ({pruned.dropped_jobs} jobs; {pruned.moved_jobs} kept moved out first;"
              f" {pruned.dropped_bytes / 1e6:.1f} MB;"
              f" longest {pruned.longest_drop_s * 1000:.0f} ms)")
    if pruned.incidents:
        print(f"alert incidents resolved over {policy.failed_days} days ago: {verb}"
              f" {pruned.incidents}, with their timelines and notifications")
    print(f"database: {before.bytes} bytes before, {after.bytes} after")
    if dry_run:
        print("dry run: nothing was deleted")
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
    server = config.get(SERVER)
    if server is None:
        return await _run(config, pm, web=False)  # a split deployment: store into --db
    api_key = config.get(API_KEY)
    if not api_key:
        raise ConfigError(
            "--server needs --api-key (env SLUICE_API_KEY): create one on the server with"
            " `sluice keys create NAME`"
        )
    agent = Agent(config, pm, server=server, api_key=api_key)

    def started() -> None:
        url, pid = agent.uplink.url, os.getpid()
        log.info("Sluice agent %s is streaming to %s (pid %d)", __version__, url, pid)

    return await _until_stopped(agent, agent.run, started)


async def _run(
    config: Config, pm: PluginManager, *, web: bool = True, replica: bool = False
) -> int:
    engine = Engine(config, pm, replica=replica)

    def started() -> None:
        for address in engine.web_addresses:
            log.info("Sluice %s is serving on %s (pid %d)", __version__, address, os.getpid())

    return await _until_stopped(engine, functools.partial(engine.run, web=web), started)


async def _until_stopped(
    runner: Engine | Agent, run: Callable[..., Awaitable[None]], started: Callable[[], None]
) -> int:
    if not runner.sources and not (isinstance(runner, Engine) and runner.replica):
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


if __name__ == "__main__":
    sys.exit(main())

"""Options: declared once, set by flag, environment or TOML file, parsed and checked once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sluice_core.cli import parse
from sluice_core.config import (
    BROKER,
    INGEST_RATE,
    READER_PROCESS,
    SSE_HEARTBEAT,
    STUCK_AFTER,
    ConfigError,
    redact_url,
)
from sluice_core.options import integer, many, number, seconds, switch, text


def test_defaults_bind_loopback_and_sqlite() -> None:
    _, config, _ = parse(["run"], {})
    assert (config.host, config.port, config.db) == ("127.0.0.1", 5580, "sqlite:///sluice.db")
    assert config.brokers == []
    assert config.reader_process is True
    assert config.get(STUCK_AFTER) == 600.0


def test_flags_beat_environment_beats_file(tmp_path: Path) -> None:
    toml = tmp_path / "sluice.toml"
    toml.write_text(
        '[sluice]\nport = 7000\nhost = "0.0.0.0"\ndb = "sqlite:///file.db"\n'
        'plugin = ["celery"]\nbroker = ["redis://file:6379/0"]\nredis_keyprefix = "fromfile:"\n'
        "ingest_rate = 50\n"
    )
    env = {"SLUICE_CONFIG": str(toml), "SLUICE_PORT": "7001", "SLUICE_DATABASE_URL": "sqlite:///e.db"}
    _, config, _ = parse(["run", "--port", "7002"], env)
    assert config.port == 7002  # flag
    assert config.db == "sqlite:///e.db"  # environment over file
    assert config.host == "0.0.0.0"  # file over default
    assert config.brokers == ["redis://file:6379/0"]
    assert config.values["redis_keyprefix"] == "fromfile:"  # a plugin's option, from the file
    assert config.get(INGEST_RATE) == 50.0
    _, config, _ = parse(["run"], {**env, "SLUICE_REDIS_KEYPREFIX": "fromenv:"})
    assert config.values["redis_keyprefix"] == "fromenv:"
    _, config, _ = parse(["run", "--redis-keyprefix", "flag:"], env)
    assert config.values["redis_keyprefix"] == "flag:"


def test_every_option_is_typed_from_the_environment() -> None:
    env = {
        "SLUICE_INGEST_RATE": "250",
        "SLUICE_SSE_HEARTBEAT": "0.5",
        "SLUICE_READER_PROCESS": "off",
        "SLUICE_STUCK_AFTER": "90",
    }
    _, config, _ = parse(["run"], env)
    assert config.get(INGEST_RATE) == 250.0
    assert config.get(SSE_HEARTBEAT) == 0.5
    assert config.get(READER_PROCESS) is False
    assert config.get(STUCK_AFTER) == 90.0


def test_several_brokers_from_flags_or_a_comma_list() -> None:
    env = {"SLUICE_BROKER_URL": "redis://a:6379/0, amqp://b//", "SLUICE_PLUGIN": "celery"}
    assert parse(["run"], env)[1].brokers == ["redis://a:6379/0", "amqp://b//"]
    argv = ["run", "--plugin", "celery", "--broker", "redis://c:6379/1", "--broker", "redis://d/2"]
    assert parse(argv, {})[1].get(BROKER) == ["redis://c:6379/1", "redis://d/2"]


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"SLUICE_PORT": "eighty"}, "SLUICE_PORT (--port): expected an integer from 0 to"),
        (["--port", "70000"], {}, "--port: expected an integer from 0 to 65535, got '70000'"),
        ([], {"SLUICE_INGEST_RATE": "abc"}, "SLUICE_INGEST_RATE (--ingest-rate): expected a"),
        ([], {"SLUICE_SSE_HEARTBEAT": "60"}, "expected seconds above 0 and at most 15"),
        (["--reader-process", "maybe"], {}, "--reader-process: expected on or off"),
        (["--log-level", "loud"], {}, "--log-level: expected DEBUG or INFO or WARNING or ERROR"),
        (["--batch-events", "0"], {}, "--batch-events: expected an integer of at least 1"),
    ],
)
def test_a_bad_value_names_its_option_and_what_it_accepts(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(["run", *argv], env)


def test_bad_files_say_what_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse(["run", "--config", str(bad)], {})
    with pytest.raises(ConfigError, match="not found"):
        parse(["run", "--config", str(tmp_path / "missing.toml")], {})
    typo = tmp_path / "typo.toml"
    typo.write_text("prot = 80\n")
    with pytest.raises(ConfigError, match="unknown option 'prot' \\(did you mean 'port'\\?\\)"):
        parse(["run", "--config", str(typo)], {})
    wrong_type = tmp_path / "type.toml"
    wrong_type.write_text('port = "high"\n')
    with pytest.raises(ConfigError, match=r"port in .*type.toml: expected an integer"):
        parse(["run", "--config", str(wrong_type)], {})


def test_a_broker_no_loaded_plugin_watches_names_the_plugin_to_load() -> None:
    with pytest.raises(
        ConfigError, match="no loaded plugin watches redis://r:6379/0: add --plugin celery"
    ):
        parse(["run", "--broker", "redis://r:6379/0"], {})
    with pytest.raises(ConfigError, match="no loaded plugin watches amqp://u:\\*\\*\\*@r//"):
        parse(["agent", "--broker", "amqp://u:secret@r//"], {})
    with pytest.raises(ConfigError, match="no installed plugin watches kafka://x"):
        parse(["run", "--plugin", "celery", "--broker", "kafka://x"], {})
    # --plugin celery watches Celery on RabbitMQ too: its transport comes with it.
    _, config, pm = parse(["run", "--plugin", "celery", "--broker", "amqp://guest@r//"], {})
    assert [source.name for source in pm.sources(config)] == ["celery/amqp://guest@r//"]


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--plugin", "celery", "--broker", "kafka://x"], {}, "no installed plugin watches kafka://x"),
        ([], {"SLUICE_INGEST_RATE": "abc"}, "SLUICE_INGEST_RATE (--ingest-rate): expected"),
    ],
)
def test_the_command_exits_2_with_one_line(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sluice_core.cli", "run", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"sluice: error: {message}")
    assert proc.stderr.count("\n") == 1


def test_each_command_lists_only_its_own_options() -> None:
    def options(*command: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "sluice_core.cli", *command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "--db" in options("migrate")
    for command in (["migrate"], ["plugins"], ["keys", "create"]):
        assert "--broker" not in options(*command)
        assert "--buffer-mb" not in options(*command)
    assert "--port" in options("run")
    assert "--server" in options("agent") and "--server" not in options("run")


def test_kinds_accept_what_they_say() -> None:
    assert integer(1).parse("1_000") == 1000
    assert number(above=0).parse(2) == 2.0
    assert seconds().parse("0.25") == 0.25
    assert switch().parse("ON") is True and switch().parse(False) is False
    assert many(text()).parse("a, b,,c") == ["a", "b", "c"]
    assert many(text()).parse(["a", "b"]) == ["a", "b"]
    for kind, raw in [
        (integer(1), "1.5"),
        (integer(1), True),
        (number(above=0), "nan"),
        (seconds(), "0"),
        (switch(), "maybe"),
        (text(min_length=3), "ab"),
        (many(text()), 5),
    ]:
        with pytest.raises((ValueError, TypeError, KeyError)):
            kind.parse(raw)


def test_passwords_are_redacted_from_urls() -> None:
    assert redact_url("amqp://guest:secret@host:5672/vh") == "amqp://guest:***@host:5672/vh"
    assert redact_url("redis://:pw@localhost/0") == "redis://:***@localhost/0"
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"

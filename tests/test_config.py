"""Configuration precedence: flags, then environment, then the TOML file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sluice_core.config import ConfigError, add_core_options, build, redact_url


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_core_options(parser)
    parser.add_argument("--redis-keyprefix")  # as a plugin would add it
    return parser.parse_args(argv)


def test_defaults_bind_loopback_and_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLUICE_BROKER_URL", "SLUICE_DATABASE_URL", "SLUICE_HOST", "SLUICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    config = build(parse([]))
    assert (config.host, config.port, config.db) == ("127.0.0.1", 5580, "sqlite:///sluice.db")
    assert config.brokers == []


def test_flags_beat_environment_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "sluice.toml"
    toml.write_text(
        '[sluice]\nport = 7000\nhost = "0.0.0.0"\ndb = "sqlite:///file.db"\n'
        'broker = ["redis://file:6379/0"]\nredis_keyprefix = "fromfile:"\n'
    )
    monkeypatch.setenv("SLUICE_CONFIG", str(toml))
    monkeypatch.setenv("SLUICE_PORT", "7001")
    monkeypatch.setenv("SLUICE_DATABASE_URL", "sqlite:///env.db")
    config = build(parse(["--port", "7002"]))
    assert config.port == 7002  # flag
    assert config.db == "sqlite:///env.db"  # environment over file
    assert config.host == "0.0.0.0"  # file over default
    assert config.brokers == ["redis://file:6379/0"]
    assert config.get("redis_keyprefix") == "fromfile:"
    monkeypatch.setenv("SLUICE_REDIS_KEYPREFIX", "fromenv:")
    assert build(parse([])).get("redis_keyprefix") == "fromenv:"
    assert build(parse(["--redis-keyprefix", "flag:"])).get("redis_keyprefix") == "flag:"


def test_several_brokers_from_flags_or_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_BROKER_URL", "redis://a:6379/0, amqp://b//")
    assert build(parse([])).brokers == ["redis://a:6379/0", "amqp://b//"]
    argv = ["--broker", "redis://c:6379/1", "--broker", "redis://d:6379/2"]
    assert build(parse(argv)).brokers == ["redis://c:6379/1", "redis://d:6379/2"]


def test_invalid_values_say_what_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_PORT", "eighty")
    with pytest.raises(ConfigError, match="expected a number"):
        build(parse([]))
    monkeypatch.setenv("SLUICE_PORT", "70000")
    with pytest.raises(ConfigError, match="out of range"):
        build(parse([]))
    monkeypatch.delenv("SLUICE_PORT")
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build(parse(["--config", str(bad)]))
    with pytest.raises(ConfigError, match="not found"):
        build(parse(["--config", str(tmp_path / "missing.toml")]))


def test_passwords_are_redacted_from_urls() -> None:
    assert redact_url("amqp://guest:secret@host:5672/vh") == "amqp://guest:***@host:5672/vh"
    assert redact_url("redis://:pw@localhost/0") == "redis://:***@localhost/0"
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"

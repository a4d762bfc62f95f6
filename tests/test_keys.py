"""API keys: stored hashed, shown once, revocable; on both backends and through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from sluice_core.storage import ApiKeyExists, Storage
from sluice_storage.common import hash_api_key
from tests.fixtures.services import REPO
from tests.fixtures.storage import open_storage


async def test_a_created_key_checks_until_it_is_revoked(storage: Storage) -> None:
    key, secret = await storage.create_api_key("billing-app")
    assert key.name == "billing-app" and key.revoked_at is None
    checked = await storage.check_api_key(secret)
    assert checked is not None and checked.id == key.id
    assert await storage.check_api_key(secret + "x") is None
    assert await storage.check_api_key("") is None

    revoked = await storage.revoke_api_key("billing-app")
    assert revoked is not None and revoked.revoked_at is not None
    assert await storage.check_api_key(secret) is None
    assert await storage.revoke_api_key("billing-app") is None  # nothing active left


async def test_only_a_hash_is_stored_and_use_is_recorded(storage: Storage) -> None:
    _, secret = await storage.create_api_key("agent-eu")
    [listed] = await storage.list_api_keys()
    assert listed.last_used_at is None
    assert secret not in repr(listed)
    await storage.check_api_key(secret)
    [listed] = await storage.list_api_keys()
    assert listed.last_used_at is not None
    # The database holds the hash, never the key: read the table itself.
    if storage.url.startswith("sqlite"):
        import sqlite3

        path = storage.url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as conn:
            rows = conn.execute("SELECT * FROM api_keys").fetchall()
    else:
        import psycopg

        with psycopg.connect(storage._conninfo) as conn:  # type: ignore[attr-defined]
            rows = conn.execute("SELECT * FROM api_keys").fetchall()
    assert [row for row in rows if secret in map(str, row)] == []
    assert [row for row in rows if hash_api_key(secret) in row]


async def test_an_active_name_is_unique_and_reusable_after_revoke(storage: Storage) -> None:
    first, _ = await storage.create_api_key("app")
    with pytest.raises(ApiKeyExists):
        await storage.create_api_key("app")
    await storage.revoke_api_key("app")
    second, secret = await storage.create_api_key("app")
    assert second.id != first.id
    assert (await storage.check_api_key(secret)) == second
    assert [k.id for k in await storage.list_api_keys()] == [first.id, second.id]


def _sluice(*args: str, db: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice_core", *args, "--db", db, "--log-level", "WARNING"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_keys_cli_creates_shows_once_lists_and_revokes(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'k.db'}"
    created = _sluice("keys", "create", "billing-app", db=db)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("sluice_") and len(secret) > 40
    assert "cannot show it again" in created.stderr

    listed = _sluice("keys", "list", db=db)
    assert "billing-app" in listed.stdout and "active" in listed.stdout
    assert secret not in listed.stdout

    again = _sluice("keys", "create", "billing-app", db=db)
    assert again.returncode == 1 and "already named 'billing-app'" in again.stderr

    assert _sluice("keys", "revoke", "billing-app", db=db).returncode == 0
    assert "revoked" in _sluice("keys", "list", db=db).stdout
    missing = _sluice("keys", "revoke", "billing-app", db=db)
    assert missing.returncode == 1 and "no active API key" in missing.stderr

    async def check() -> None:
        storage = open_storage(db)
        await storage.open()
        try:
            assert await storage.check_api_key(secret) is None
        finally:
            await storage.aclose()

    trio.run(check)

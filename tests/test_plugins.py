"""The plugin system: documented hooks, entry-point discovery, a third-party framework."""

from __future__ import annotations

import functools
import inspect
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from sluice_core import hookspecs
from sluice_core.config import Config, ConfigError
from sluice_core.engine import Engine
from sluice_core.model import Job, JobState
from sluice_core.plugins import PluginManager
from sluice_core.storage import JobQuery
from tests.metrics import metric
from tests.test_api import serving
from tests.waiting import wait_until

THIRDPARTY = Path(__file__).parent / "thirdparty"


def test_every_hook_is_documented() -> None:
    specs = [f for name, f in inspect.getmembers(hookspecs) if name.startswith("sluice_")]
    assert len(specs) >= 7
    for spec in specs:
        doc = inspect.getdoc(spec) or ""
        assert len(doc) > 40, f"{spec.__name__} needs a docstring saying when it is called"
        assert "Called" in doc, f"{spec.__name__}: say when it is called"


def test_a_misspelled_hook_implementation_is_refused() -> None:
    from sluice_core import hookimpl

    class Typo:
        @hookimpl
        def sluice_normalise(self, batch):  # type: ignore[no-untyped-def]
            return None

    pm = PluginManager()
    with pytest.raises(Exception, match="unknown hook 'sluice_normalise'"):
        pm.register(Typo(), name="typo")


def test_an_unknown_plugin_name_lists_the_installed_ones() -> None:
    with pytest.raises(ConfigError, match=r"no plugin named 'nope' \(installed: .*celery"):
        PluginManager().load(["nope"])


@pytest.fixture
def toyqueue_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install the toyqueue adapter as a distribution with a `sluice` entry point."""
    dist = tmp_path / "sluice_toyqueue-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sluice-toyqueue\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[sluice]\ntoyqueue = sluice_toyqueue\n")
    (tmp_path / "sluice_toyqueue.py").write_text((THIRDPARTY / "sluice_toyqueue.py").read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_sluice_plugins_lists_hooks_of_an_entry_point_plugin(toyqueue_entry_point: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sluice_core", "plugins", "--plugin", "toyqueue", "--plugin", "celery"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(toyqueue_entry_point), "PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout
    assert "toyqueue (sluice_toyqueue)" in out
    assert "sluice_storage.sqlite" in out
    toy = out.split("toyqueue (sluice_toyqueue)")[1]
    assert "sluice_normalize" in toy and "sluice_sources" in toy


async def test_a_third_party_framework_needs_no_change_to_the_core(
    toyqueue_entry_point: Path, tmp_path: Path
) -> None:
    from tests.fixtures.services import free_port

    port = free_port()
    pm = PluginManager()
    pm.load(["toyqueue"])
    config = Config(db=f"sqlite:///{tmp_path}/toy.db", toyqueue_port=port)
    pm.configure(config)
    engine = Engine(config, pm)
    assert [s.name for s in engine.sources] == [f"toyqueue/tcp:{port}"]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(engine.run, web=False))

            # The source listens once the engine has started it; connect as a worker would.
            async def connect() -> trio.SocketStream | None:
                try:
                    return await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    return None

            stream = await wait_until(connect, f"the toyqueue source to listen on {port}")
            now = time.time()
            await stream.send_all(
                b'{"id": "j1", "name": "resize", "status": "waiting", "ts": %f}\n'
                b'{"id": "j1", "name": "resize", "status": "running", "ts": %f, "worker": "toy-1"}\n'
                b"not json\n"
                b'{"id": "j1", "status": "done", "ts": %f}\n' % (now, now + 1, now + 2)
            )

            async def completed() -> Job | None:
                job = await engine.storage.get_job("j1")
                return job if job is not None and job.state is JobState.COMPLETED else None

            job = await wait_until(completed, "job j1 completed")
            page = await engine.storage.list_jobs(JobQuery(framework="toyqueue"))
            assert [j.id for j in page.jobs] == ["j1"]
            assert (job.name, job.worker, job.framework) == ("resize", "toy-1", "toyqueue")
            source = f"toyqueue/tcp:{port}"
            assert metric(engine.metrics, "sluice_events_malformed_total", source=source) == 1
            engine.stop()


async def test_a_third_party_frameworks_events_can_be_pushed_in_its_own_format(
    toyqueue_entry_point: Path, tmp_path: Path
) -> None:
    """The format is declared by the plugin (sluice_frameworks), not known to the core."""
    import sluice_toyqueue  # installed by the fixture, as an entry point would

    now = time.time()
    reports = [
        {"id": "p1", "name": "resize", "status": "running", "ts": now, "worker": "toy-2"},
        {"id": "p1", "status": "done", "ts": now + 1},
    ]
    with trio.fail_after(30):
        async with serving(tmp_path, sluice_toyqueue) as (engine, client):
            key = {"Authorization": f"Bearer {(await engine.storage.create_api_key('toy'))[1]}"}
            response = await client.post(
                "/api/ingest", json={"format": "toyqueue", "events": reports}, headers=key
            )
            assert (response.status_code, response.json()) == (200, {"accepted": 2})
            job = (await client.get("/api/jobs/p1")).json()
            unknown = await client.post(
                "/api/ingest", json={"format": "rq", "events": []}, headers=key
            )
    assert (job["state"], job["name"], job["framework"]) == ("completed", "resize", "toyqueue")
    assert unknown.status_code == 400
    assert "accepted: 'toyqueue', 'sluice'" in unknown.json()["error"]["message"]

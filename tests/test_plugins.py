"""The plugin manager: documented hooks, refused implementations, unknown plugin names.

A third-party plugin installed through an entry point, end to end: tests/test_thirdparty.py.
"""

from __future__ import annotations

import inspect

import pytest

from sluice_core import hookspecs
from sluice_core.config import ConfigError
from sluice_core.plugins import PluginManager


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

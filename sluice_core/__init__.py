"""Sluice: a monitor for job queues. ``hookimpl`` marks a plugin's hook implementations."""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("sluice")

__all__ = ["__version__", "hookimpl"]

"""The one way a view reaches the rest of Sluice: :func:`application`."""

from __future__ import annotations

from quart import current_app

from sluice_core.application import Application


def application() -> Application:
    """The application the app was made for (``create_app``)."""
    app: Application = current_app.extensions["sluice_application"]
    return app

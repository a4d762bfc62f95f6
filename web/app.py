"""The app factory: one Quart-Trio app per application (:mod:`sluice_core.application`),
which its views reach through :func:`sluice_web.context.application` alone."""

from __future__ import annotations

from typing import Any

import orjson
from quart import Response
from quart.ctx import AppContext
from quart.json.provider import JSONProvider
from quart_trio import QuartTrio

from sluice_core.application import Application
from sluice_core.config import SSE_HEARTBEAT
from sluice_web import actions, alerts, api, dashboard, errors, ingest, stream
from sluice_web.auth import Auth, install, load_auth

MAX_BODY = 1024 * 1024  # the largest body a client needs is a bulk action's 1,000 ids


class _OrjsonProvider(JSONProvider):
    """Job lists are the API's bulk: orjson serializes them several times faster."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)


class _App(QuartTrio):
    async def make_default_options_response(self, ctx: AppContext) -> Response:
        # What the path takes, in Allow, and no body: not an empty HTML page.
        response = await super().make_default_options_response(ctx)
        response.status_code = 204
        del response.headers["Content-Type"]
        return response


def create_app(application: Application, *, auth: Auth | None = None) -> QuartTrio:
    # Root path web/: /static serves web/static, which the dashboard's pages link to.
    app = _App("sluice_web")
    app.json = _OrjsonProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["SLUICE_SSE_HEARTBEAT"] = application.config.get(SSE_HEARTBEAT)
    app.extensions["sluice_application"] = application
    app.extensions["sluice_streams"] = stream.Streams()
    errors.register(app)
    install(app, auth if auth is not None else load_auth(application.config))
    app.register_blueprint(api.blueprint)
    app.register_blueprint(actions.blueprint)
    app.register_blueprint(alerts.blueprint)
    app.register_blueprint(stream.blueprint)
    app.register_blueprint(dashboard.blueprint)
    app.register_blueprint(ingest.blueprint)
    return app

"""The web server inside the engine: hypercorn's trio worker in the engine's nursery.

The engine starts it with ``await nursery.start(serve, application, shutdown_trigger)``
and gets back the addresses it listens on (the real port when configured with 0).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from sluice_core.application import Application
from sluice_web.app import create_app
from sluice_web.auth import WILDCARD_ADDRESSES, check_exposure, is_loopback, load_auth

log = logging.getLogger(__name__)


def _bind(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(
    application: Application,
    shutdown_trigger: Callable[[], Awaitable[object]],
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns. Raises ConfigError before binding
    anything if the host is reachable from other machines without authentication."""
    config = application.config
    auth = load_auth(config)
    check_exposure(config.host, auth)
    if not is_loopback(config.host) and not auth.allowed_hosts:
        # Not an error: the address itself may be all clients use. But a name is the
        # usual way in, and its requests would each get a 400 that says why.
        bound = config.host.strip("[]")
        names = "localhost, a loopback address"
        if bound not in WILDCARD_ADDRESSES:
            names += f", {bound}"
        log.warning(
            "serving on %s, to requests naming %s only: give the host names clients and"
            " load balancers' probes use with --allowed-hosts (SLUICE_ALLOWED_HOSTS)",
            config.host,
            names,
        )
    app = create_app(application, auth=auth)
    streams = app.extensions["sluice_streams"]

    hyper = HypercornConfig()
    hyper.bind = [_bind(config.host, config.port)]
    access = logging.getLogger("sluice_web.access")
    # hypercorn builds each request's access line before the logger weighs its level:
    # at the usual WARNING that was work for every request, for nothing.
    hyper.accesslog = access if access.isEnabledFor(logging.INFO) else None
    hyper.errorlog = logging.getLogger("sluice_web.server")

    async def stop() -> None:
        await shutdown_trigger()
        # Event streams never end on their own; end them so shutdown need not wait.
        streams.stop()

    await hypercorn_serve(app, hyper, shutdown_trigger=stop, task_status=task_status, mode="asgi")

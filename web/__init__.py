"""Sluice's HTTP side (import name ``sluice_web``): the Quart-Trio app, served in-process.

- :mod:`sluice_web.server`: ``serve(application, shutdown_trigger)``, hypercorn's trio
  worker inside the engine's nursery;
- :mod:`sluice_web.app`: ``create_app(application)``, the app factory;
- :mod:`sluice_web.context`: ``application()``, all a view may reach
  (:mod:`sluice_core.application`);
- :mod:`sluice_web.api`: the REST API of the API in README.md (reads), ``/healthz``, ``/metrics``;
- :mod:`sluice_web.actions`: the action endpoints (retry, revoke, bulk);
- :mod:`sluice_web.stream`: ``/api/stream``, the live bus as Server-Sent Events;
- :mod:`sluice_web.params`: the job-list filters, parsed and validated;
- :mod:`sluice_web.auth`: API token, dashboard logins, CSRF and origin checks;
- :mod:`sluice_web.errors`: the one JSON error shape;
- :mod:`sluice_web.dashboard`: the HTML dashboard (templates/, static/).
"""

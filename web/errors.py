"""Every error the HTTP side returns has one shape: ``{"error": {"code", "message"}}``.

Bad input is the client's to fix, so its message says what was wrong; an
unexpected failure is logged with its traceback here and answered with a
plain 500 that shows none of it (the API in README.md). The one exception: a
browser asking for a page that does not exist gets the dashboard's 404 page.
"""

from __future__ import annotations

import logging
import math
import re

from quart import Quart, Response, has_request_context, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the client should see, with its HTTP status and a stable code."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class NotFound(ApiError):
    status = 404
    code = "not_found"


def error_response(status: int, code: str, message: str) -> Response:
    response: Response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    return response


def rate_limited(what: str, wait: float) -> Response:
    """429 saying ``what`` was too much, and when to retry (also in Retry-After)."""
    seconds = math.ceil(wait)
    response = error_response(429, "rate_limited", f"{what}: retry in {seconds}s")
    response.headers["Retry-After"] = str(seconds)
    return response


def _code_of(exc: HTTPException) -> str:
    """``MethodNotAllowed`` -> ``method_not_allowed``: werkzeug's names, as codes."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


async def _api_error(exc: ApiError) -> Response:
    return error_response(exc.status, exc.code, exc.message)


def _wants_page() -> bool:
    """A browser navigating to a page: not the API, nor a script, image or client (curl,
    httpx and fetch send ``*/*``, for which JSON is the better match)."""
    if not has_request_context() or request.path == "/api" or request.path.startswith("/api/"):
        return False
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


async def _http_error(exc: HTTPException) -> Response | tuple[str, int]:
    if exc.code == 404 and _wants_page():
        message = f"Sluice has no page at {request.path}."
        page = await render_template("not_found.html", title="Page not found", message=message)
        return page, 404
    response = error_response(exc.code or 500, _code_of(exc), exc.description or exc.name)
    # Keep what the status needs to be useful, e.g. ``Allow`` on a 405.
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


async def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error serving a request")
    return error_response(500, "internal", "internal error; the server log has the details")


def register(app: Quart) -> None:
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)

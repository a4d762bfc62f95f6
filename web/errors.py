"""Every error the HTTP side returns has one shape: ``{"error": {"code", "message"}}``.

Bad input is the client's to fix, so its message says what was wrong; an
unexpected failure is logged with its traceback here and answered with a
plain 500 that shows none of it (DESIGN.md section 5).
"""

from __future__ import annotations

import logging
import re

from quart import Quart, Response, jsonify
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


def _code_of(exc: HTTPException) -> str:
    """``MethodNotAllowed`` -> ``method_not_allowed``: werkzeug's names, as codes."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


async def _api_error(exc: ApiError) -> Response:
    return error_response(exc.status, exc.code, exc.message)


async def _http_error(exc: HTTPException) -> Response:
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

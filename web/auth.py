"""Who may use the API and the dashboard, and protection of what changes state.

Safe by default: Sluice binds to loopback, and refuses to serve on any other
address unless authentication is configured, as one or both of

- an API token (``--api-token``, env ``SLUICE_API_TOKEN``): API clients send
  ``Authorization: Bearer <token>``;
- dashboard users with argon2 password hashes in the TOML file
  (``[users]`` ``name = "$argon2id$..."``), who log in on ``/login`` and get a
  signed session cookie (key ``--session-secret``, else random at each start).

``/healthz`` and ``/metrics`` stay open for probes and scrapers.

Every POST is refused if it comes from another origin (the ``Origin`` header
does not name this host), with or without authentication: a web page the
operator visits must not be able to retry or revoke jobs through their browser.
With authentication, a POST made with the session cookie must also carry the
session's CSRF token (header ``X-CSRF-Token`` or form field ``csrf_token``);
a bearer token needs none, since browsers never send it on their own.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
from typing import Any
from urllib.parse import urlencode, urlsplit

import argon2
import attrs
import trio
from quart import (
    Blueprint,
    Quart,
    Response,
    current_app,
    redirect,
    render_template,
    request,
    session,
)
from quart.typing import ResponseReturnValue

from sluice_core.config import API_TOKEN, SESSION_SECRET, USERS, Config, ConfigError
from sluice_web.errors import ApiError, error_response
from sluice_web.ingest import INGEST_PATHS

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/metrics", "/login", "/favicon.ico"})
OPEN_PREFIXES = ("/static/", "/assets/")  # the dashboard's scripts and styles: public code, no data
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_USER = "api-token"  # the session's user when someone logs in with the API token
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"

_hasher = argon2.PasswordHasher()
# Password checks cost ~0.1-0.5 s of CPU each by design: a few at a time, in threads,
# so a burst of logins neither stalls the event loop nor takes every core.
_verify_limiter = trio.CapacityLimiter(2)


@attrs.frozen
class Auth:
    api_token: str | None
    users: dict[str, str]  # user name -> argon2 hash
    session_secret: str

    @property
    def enabled(self) -> bool:
        return self.api_token is not None or bool(self.users)


def load_auth(config: Config) -> Auth:
    """The authentication settings, checked: bad ones are a ConfigError at start."""
    users = config.get(USERS)
    for name, hashed in users.items():
        try:
            argon2.extract_parameters(hashed)
        except argon2.exceptions.InvalidHashError:
            raise ConfigError(
                f"user {name!r}: the password is not an argon2 hash; make one with: "
                "python -c 'import argon2; print(argon2.PasswordHasher().hash(input()))'"
            ) from None
    secret = config.get(SESSION_SECRET) or secrets.token_urlsafe(32)
    return Auth(config.get(API_TOKEN), users, secret)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything


def check_exposure(host: str, auth: Auth) -> None:
    """Refuse to serve beyond this machine without authentication."""
    if not is_loopback(host) and not auth.enabled:
        raise ConfigError(
            f"refusing to serve on {host}: anyone who can reach it could read every job "
            "and retry or revoke them. Configure authentication (--api-token or "
            "SLUICE_API_TOKEN, and/or [users] with argon2 hashes in the config file), "
            "or serve on 127.0.0.1 behind your own proxy."
        )


async def verify_password(auth: Auth, user: str, password: str) -> bool:
    hashed = auth.users.get(user)
    # An unknown user costs as much as a known one, so timing does not reveal names.
    known: list[str | None] = [*auth.users.values(), None]
    probe = hashed if hashed is not None else known[0]
    if probe is None:
        return False
    try:
        ok: bool = await trio.to_thread.run_sync(
            _hasher.verify, probe, password, limiter=_verify_limiter
        )
    except argon2.exceptions.VerificationError:
        return False
    return ok and hashed is not None


def _same_token(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _cross_origin() -> bool:
    origin = request.headers.get("Origin")
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        return True
    if origin is None:
        return False  # not a browser, or one that sends no Origin on same-origin requests
    # A reverse proxy may rewrite Host; it then names the public host in
    # X-Forwarded-Host, which a cross-site page cannot set without a CORS preflight.
    hosts = {request.host, request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()}
    # "null" (sandboxed frames, some redirects) has no host: never this site.
    return urlsplit(origin).netloc not in hosts - {""}


async def _csrf_token_sent() -> str:
    header = request.headers.get(CSRF_HEADER)
    if header is not None:
        return header
    if request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return str((await request.form).get(CSRF_FIELD, ""))
    return ""


def csrf_token() -> str:
    """The logged-in session's CSRF token, for templates (meta tag, hidden field)."""
    token = session.get("csrf")
    return str(token) if isinstance(token, str) else ""


def _auth() -> Auth:
    auth: Auth = current_app.extensions["sluice_auth"]
    return auth


async def guard() -> ResponseReturnValue | None:
    """Before every request: refuse cross-origin POSTs, then check who is asking."""
    if request.path in INGEST_PATHS:
        return None  # API keys only, checked by the endpoint; no cookies, so no CSRF
    unsafe = request.method not in SAFE_METHODS
    if unsafe and _cross_origin():
        raise ApiError("cross-origin request refused", status=403, code="cross_origin")
    auth = _auth()
    if not auth.enabled:
        return None
    path = request.path
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return None
    bearer = request.headers.get("Authorization", "")
    if bearer:
        scheme, _, token = bearer.partition(" ")
        if (
            scheme.lower() != "bearer"
            or auth.api_token is None
            or not _same_token(token.strip(), auth.api_token)
        ):
            return _unauthorized("invalid bearer token")
        return None
    if not isinstance(session.get("user"), str):
        if path.startswith("/api/"):
            return _unauthorized("authentication required: send 'Authorization: Bearer <token>'")
        return redirect("/login?" + urlencode({"next": request.full_path.rstrip("?")}))
    expected = csrf_token()
    if unsafe and not (expected and _same_token(await _csrf_token_sent(), expected)):
        raise ApiError(
            f"missing or wrong CSRF token: send the {CSRF_HEADER} header of the page",
            status=403,
            code="csrf",
        )
    return None


def _unauthorized(message: str) -> Response:
    response = error_response(401, "unauthorized", message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="sluice"'
    return response


# -- login page ------------------------------------------------------------

blueprint = Blueprint("auth", __name__)

def _safe_next(value: Any) -> str:
    # Only a path on this site: "//evil.example" or a full URL would be an open redirect.
    if isinstance(value, str) and value.startswith("/") and not value.startswith("//"):
        return value
    return "/"


async def _login_page(message: str, target: str) -> str:
    # The page says what to type: a user's password, the API token, or either.
    auth = _auth()
    return await render_template(
        "login.html",
        message=message,
        next=target,
        users=bool(auth.users),
        api_token=auth.api_token is not None,
    )


@blueprint.get("/login")
async def login_form() -> str:
    return await _login_page("", _safe_next(request.args.get("next")))


@blueprint.post("/login")
async def login() -> ResponseReturnValue:
    auth = _auth()
    form = await request.form
    user, password = form.get("username", ""), form.get("password", "")
    target = _safe_next(form.get("next"))
    if auth.api_token is not None and _same_token(password, auth.api_token):
        user = TOKEN_USER
    elif not await verify_password(auth, user, password):
        log.warning("failed login for user %r from %s", user, request.remote_addr)
        wrong = "Wrong user name or password." if auth.users else "Wrong API token."
        return await _login_page(wrong, target)
    # A fresh session at login: a cookie planted before cannot ride along (fixation).
    session.clear()
    session["user"] = user
    session["csrf"] = secrets.token_urlsafe(32)
    log.info("user %r logged in from %s", user, request.remote_addr)
    return redirect(target)


@blueprint.post("/logout")
async def logout() -> ResponseReturnValue:
    session.clear()
    return redirect("/login")


def install(app: Quart, auth: Auth) -> None:
    app.extensions["sluice_auth"] = auth
    app.secret_key = auth.session_secret
    app.config.update(
        SESSION_COOKIE_NAME="sluice_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
    )
    app.before_request(guard)
    app.context_processor(lambda: {"csrf_token": csrf_token(), "current_user": session.get("user")})
    app.register_blueprint(blueprint)

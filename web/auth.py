"""Who may use the API and the dashboard, and protection of what changes state.

Safe by default: Sluice binds to loopback, and refuses to serve on any other
address unless authentication is configured, as one or both of

- an API token (``--api-token``, env ``SLUICE_API_TOKEN``): API clients send
  ``Authorization: Bearer <token>``;
- dashboard users with argon2 password hashes in the TOML file
  (``[users]`` ``name = "$argon2id$..."``), who log in on ``/login`` and get a
  signed session cookie (key ``--session-secret``, else random at each start).

``/healthz`` and ``/metrics`` stay open for probes and scrapers.

Every request must name this server in its ``Host`` header: localhost, a
loopback address, the address bound, or a name of ``--allowed-hosts``. Else a
page on a name its owner re-points at 127.0.0.1 (DNS rebinding) would be this
site to the browser, and could read jobs and act on them without a password.
Load balancers' probes and scrapers are held to it too: their host names go in
``--allowed-hosts``.

Failed logins and bearer tokens are throttled per client address, logins also
per account (:class:`LoginThrottle`). Logging out ends the session for every
copy of its cookie (:class:`RevokedSessions`). The session cookie is
``Secure`` when the request came over HTTPS: directly, or per
``X-Forwarded-Proto`` from a proxy of ``--forwarded-allow-ips``.

Every POST is refused if it comes from another origin (the ``Origin`` header
does not name this host), with or without authentication: a web page the
operator visits must not be able to retry or revoke jobs through their browser.
With authentication, a POST made with the session cookie must also carry the
session's CSRF token (header ``X-CSRF-Token`` or form field ``csrf_token``);
a bearer token needs none, since browsers never send it on their own.
"""

from __future__ import annotations

import functools
import hmac
import io
import ipaddress
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import argon2
import attrs
import trio
from quart import (
    Blueprint,
    Quart,
    Response,
    current_app,
    has_request_context,
    redirect,
    render_template,
    request,
    session,
    websocket,
)
from quart.sessions import SecureCookieSession, SecureCookieSessionInterface, SessionMixin
from quart.typing import ResponseReturnValue
from quart.wrappers import BaseRequestWebsocket
from werkzeug.datastructures import MultiDict
from werkzeug.formparser import MultiPartParser
from werkzeug.wrappers import Response as WerkzeugResponse

from sluice_core.config import (
    ALLOWED_HOSTS,
    API_TOKEN,
    FORWARDED_ALLOW_IPS,
    SESSION_SECRET,
    USERS,
    Config,
    ConfigError,
)
from sluice_web.errors import ApiError, BadRequest, error_response, rate_limited
from sluice_web.ingest import INGEST_PATHS

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/metrics", "/login", "/favicon.ico"})
OPEN_PREFIXES = ("/static/", "/assets/")  # the dashboard's scripts and styles: public code, no data
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_USER = "api-token"  # the session's user when someone logs in with the API token
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})  # binds every interface: names none

_hasher = argon2.PasswordHasher()
# Password checks cost ~0.1-0.5 s of CPU each by design: a few at a time, in threads,
# so a burst of logins neither stalls the event loop nor takes every core.
_verify_limiter = trio.CapacityLimiter(2)


type Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen
class Auth:
    api_token: str | None
    users: dict[str, str]  # user name -> argon2 hash
    session_secret: str
    allowed_hosts: tuple[str, ...] = ()  # --allowed-hosts, beside loopback and the bound address
    bound_host: str = "127.0.0.1"
    trusted_proxies: tuple[Network, ...] = ()  # --forwarded-allow-ips

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
    proxies = [
        network
        for given in config.get(FORWARDED_ALLOW_IPS)
        for network in (["0.0.0.0/0", "::/0"] if given == "*" else [given])
    ]
    return Auth(
        config.get(API_TOKEN),
        users,
        secret,
        allowed_hosts=tuple(config.get(ALLOWED_HOSTS)),
        bound_host=config.host,
        trusted_proxies=tuple(ipaddress.ip_network(p, strict=False) for p in proxies),
    )


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything


def _host_name(header: str) -> str | None:
    """The name in a ``Host`` header, lower-cased, without its port and an IPv6 address
    without brackets (``::1``); None for a malformed header."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        name, _, port = header.partition(":")
    if not name or (port and not port.isdigit()):
        return None
    return _same_form(name.removesuffix("."))  # "localhost." is localhost, fully qualified


def _same_form(name: str) -> str:
    """An address in one spelling (``0:0::1`` is ``::1``), so that it compares equal."""
    try:
        return ipaddress.ip_address(name).compressed
    except ValueError:
        return name


def host_allowed(host: str, allowed: Iterable[str], bound: str) -> bool:
    """Whether a ``Host`` header names this server: localhost or a loopback address,
    the address bound unless a wildcard, or one of ``allowed`` (``--allowed-hosts``:
    ``*``, a name, or ``.example.com`` for it and its subdomains). Any port."""
    name = _host_name(host)
    if name is None:
        return False
    if is_loopback(name):
        return True
    bound = _same_form(bound.strip("[]").lower())
    if bound not in WILDCARD_ADDRESSES and name == bound:
        return True
    for pattern in allowed:
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith(".") and (name == pattern[1:] or name.endswith(pattern)):
            return True
    return False


# Every request is checked, and clients name the same few hosts: parsing each name as
# an address again was 1.5% of an API request. Bounded: a scanner's names come and go.
_host_allowed_cached = functools.lru_cache(maxsize=256)(host_allowed)


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


# -- throttling guesses ------------------------------------------------------

FREE_FAILURES = 5  # a user's typos cost nothing; from the fifth failure on, each waits
BASE_DELAY_S = 1.0  # after the fifth; doubles with each failure after it
MAX_DELAY_S = 300.0
HALF_LIFE_S = 900.0  # failures fade: a quarter of an hour halves their count
MAX_TRACKED = 10_000  # accounts and addresses remembered; the stalest are forgotten first


@attrs.define
class _Failures:
    count: float
    at: float  # trio time of the last one


class LoginThrottle:
    """Failed guesses of a password or token, per key (an account, a client address),
    and how long a key must wait before the next try.

    The wait grows exponentially once a key has FREE_FAILURES (BASE_DELAY_S, then
    doubling, at most MAX_DELAY_S) and the count decays with HALF_LIFE_S, so a
    guesser keeps to about one try a minute per key while a user who mistyped
    is soon free again. Time is trio's clock.

    In this process's memory: enough for one ``sluice run``; each web replica behind a
    load balancer throttles on its own (a guesser gets one allowance per replica).
    """

    def __init__(self) -> None:
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def retry_after(self, *keys: str) -> float:
        """Seconds until every one of ``keys`` may try again; 0: now."""
        now = trio.current_time()
        waits = [0.0]
        for key in keys:
            failures = self._failures.get(key)
            # Whole failures: five in a row have decayed a little by the fifth.
            count = 0 if failures is None else round(failures.count)
            if failures is not None and count >= FREE_FAILURES:
                delay = min(MAX_DELAY_S, BASE_DELAY_S * 2 ** (count - FREE_FAILURES))
                waits.append(failures.at + delay - now)
        return max(waits)

    def failed(self, *keys: str) -> None:
        now = trio.current_time()
        for key in keys:
            failures = self._failures.pop(key, None) or _Failures(0.0, now)
            failures.count = failures.count * 0.5 ** ((now - failures.at) / HALF_LIFE_S) + 1
            failures.at = now
            self._failures[key] = failures  # last in the order: the most recent
        while len(self._failures) > MAX_TRACKED:
            self._failures.popitem(last=False)

    def succeeded(self, *keys: str) -> None:
        """Take back the failure counted before the check (see :func:`login`)."""
        for key in keys:
            failures = self._failures.get(key)
            if failures is not None:
                failures.count = max(0.0, failures.count - 1)


def _throttle() -> LoginThrottle:
    throttle: LoginThrottle = current_app.extensions["sluice_login_throttle"]
    return throttle


# -- who is asking, through which proxy ----------------------------------------


def _trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return any(ip in network for network in proxies)


def client_address() -> str:
    """The client's IP address: the peer's, or behind proxies of --forwarded-allow-ips,
    the last address in X-Forwarded-For that is not one of them (the ones before it
    are whatever the client claimed)."""
    proxies = _auth().trusted_proxies
    address = request.remote_addr or ""
    if not _trusted(address, proxies):
        return address
    hops = ",".join(request.headers.getlist("X-Forwarded-For")).split(",")
    for hop in reversed([hop.strip() for hop in hops if hop.strip()]):
        address = hop
        if not _trusted(hop, proxies):
            break
    return address


def _address_key() -> str:
    """The throttle's key for the client: its address, or an IPv6 client's /64,
    which is what one subscriber holds."""
    address = client_address()
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"address:{address}"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return f"address:{ipaddress.ip_network(f'{ip}/64', strict=False)}"
    return f"address:{ip}"


def _over_https() -> bool:
    if request.scheme == "https":
        return True
    if not _trusted(request.remote_addr or "", _auth().trusted_proxies):
        return False
    # The first proxy's view, the one the browser talked to.
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0]
    return proto.strip().lower() == "https"


# -- sessions ------------------------------------------------------------------


class RevokedSessions:
    """Ids of sessions logged out, kept until their cookies would expire anyway.

    The cookie is signed, not stored: without this list a copy of it would stay
    good after logout. In this process's memory: right for one ``sluice run``; a
    restart forgets it, and web replicas behind a load balancer each keep their
    own. Those need the list in the database (a ``sessions`` table beside
    ``api_keys``) behind this same interface.
    """

    def __init__(self, lifetime_s: float) -> None:
        self.lifetime_s = lifetime_s
        self._until: dict[str, float] = {}  # in order of revocation, so of expiry

    def revoke(self, sid: str) -> None:
        now = time.time()
        while self._until and next(iter(self._until.values())) <= now:
            del self._until[next(iter(self._until))]
        self._until[sid] = now + self.lifetime_s

    def __contains__(self, sid: object) -> bool:
        return sid in self._until


class _Sessions(SecureCookieSessionInterface):
    """Signed cookies, as Quart's, less any logged out; ``Secure`` over HTTPS."""

    def __init__(self, revoked: RevokedSessions) -> None:
        self.revoked = revoked

    def get_cookie_secure(self, app: Quart) -> bool:
        return has_request_context() and _over_https()

    async def open_session(
        self, app: Quart, request: BaseRequestWebsocket
    ) -> SecureCookieSession | None:
        if self.get_cookie_name(app) not in request.cookies:
            # What Quart opens too, without first building a signing serializer: an
            # API client or probe sends no cookie, and that was 2% of its request.
            return self.session_class()
        opened = await super().open_session(app, request)
        if opened is None or "user" not in opened:
            return opened
        sid = opened.get("sid")
        if not isinstance(sid, str) or sid in self.revoked:
            return self.session_class()  # logged out, or from before sessions had ids
        return opened

    async def save_session(
        self, app: Quart, session: SessionMixin, response: Response | WerkzeugResponse | None
    ) -> None:
        # Nothing to save (an API request without a cookie): Quart would still work out
        # every cookie setting first, the Secure flag reading the peer. The response
        # varies on the cookie as Quart's does (it reads the session, so always).
        if not session and not session.modified:
            if response is not None and session.accessed:
                response.vary.add("Cookie")
            return
        await super().save_session(app, session, response)


# -- bodies --------------------------------------------------------------------


async def posted_form() -> MultiDict[str, str]:
    """The fields of a form body (urlencoded or multipart), parsed from the body's bytes,
    so that it reads the same before and after ``request.get_data()`` (Quart's
    multipart parser reads the stream once, and an unreadable form is empty to it).
    A malformed multipart body is a BadRequest."""
    data = await request.get_data(cache=True, as_text=False, parse_form_data=False)
    if request.mimetype != "multipart/form-data":
        return (await request.form).copy()
    boundary = request.mimetype_params.get("boundary", "")
    if not boundary:
        raise BadRequest("body: multipart/form-data without a boundary; send JSON instead")
    try:
        form, files = MultiPartParser(max_form_memory_size=len(data) + 1).parse(
            io.BytesIO(data), boundary.encode("latin-1"), len(data)
        )
    except ValueError as exc:  # UnicodeEncodeError too, for a boundary beyond latin-1
        raise BadRequest(
            f"body: malformed multipart/form-data ({exc}); send JSON instead"
        ) from None
    return MultiDict([*form.items(multi=True), *((name, "") for name in files)])


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
    if request.mimetype in FORM_TYPES:
        return (await posted_form()).get(CSRF_FIELD, "")
    return ""


def csrf_token() -> str:
    """The logged-in session's CSRF token, for templates (meta tag, hidden field)."""
    token = session.get("csrf")
    return str(token) if isinstance(token, str) else ""


def _auth() -> Auth:
    auth: Auth = current_app.extensions["sluice_auth"]
    return auth


MAX_HOSTS_LOGGED = 100  # distinct host names refused that are logged, past which a scan is quiet


def _refuse_host(host: str) -> Response | None:
    """A 400 for a request naming a host this server does not answer to, else None."""
    auth = _auth()
    if _host_allowed_cached(host, auth.allowed_hosts, auth.bound_host):
        return None
    shown = host[:100]
    # Once per name: a probe or a client left out of --allowed-hosts is a setup mistake
    # to see in the log, a scanner's stream of names is not.
    logged: set[str] = current_app.extensions["sluice_hosts_refused"]
    if shown not in logged and len(logged) < MAX_HOSTS_LOGGED:
        logged.add(shown)
        log.warning("refused requests for host %r: not in --allowed-hosts", shown)
    return error_response(
        400,
        "bad_host",
        f"this Sluice does not answer to the host name {shown!r} (a page under another name"
        " could steer it: DNS rebinding); if the name is yours, add it to --allowed-hosts"
        " (SLUICE_ALLOWED_HOSTS)",
    )


async def _check_request_host() -> Response | None:
    return _refuse_host(request.host)


async def _check_websocket_host() -> Response | None:
    return _refuse_host(websocket.host)


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
        address = _address_key()
        wait = _throttle().retry_after(address)
        if wait:
            return rate_limited("too many failed attempts from your address", wait)
        scheme, _, token = bearer.partition(" ")
        if (
            scheme.lower() != "bearer"
            or auth.api_token is None
            or not _same_token(token.strip(), auth.api_token)
        ):
            _throttle().failed(address)
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


def acting_user() -> str | None:
    """Who is acting (an action's or an alert's actor): the API token's holder, the
    dashboard user, or None without auth. The guard has already checked either, in
    this order."""
    if not _auth().enabled:
        return None
    if request.headers.get("Authorization"):
        return TOKEN_USER
    user = session.get("user")
    return user if isinstance(user, str) else None


def _unauthorized(message: str) -> Response:
    response = error_response(401, "unauthorized", message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="sluice"'
    return response


# -- login page ------------------------------------------------------------

blueprint = Blueprint("auth", __name__)


def _safe_next(value: Any) -> str:
    """``value`` if it is a path on this site, else "/": never an open redirect.

    Browsers read "\\" as "/" and drop tabs and newlines anywhere in a URL, so
    "/\\evil.example" and "/<tab>/evil.example" leave the site as "//evil.example"
    does. A path the guard made is percent-encoded: it has none of these, and its
    path has none even decoded once more.
    """
    if isinstance(value, str) and _plain_path(value) and _plain_path(unquote(urlsplit(value).path)):
        return value
    return "/"


def _plain_path(value: str) -> bool:
    return (
        value.startswith("/")
        and not value.startswith("//")
        and all(c.isprintable() and not c.isspace() and c != "\\" for c in value)
    )


async def _login_page(message: str, target: str, status: int = 200) -> tuple[str, int]:
    # The page says what to type: a user's password, the API token, or either.
    auth = _auth()
    page = await render_template(
        "login.html",
        message=message,
        next=target,
        users=bool(auth.users),
        api_token=auth.api_token is not None,
    )
    return page, status


@blueprint.get("/login")
async def login_form() -> tuple[str, int]:
    return await _login_page("", _safe_next(request.args.get("next")))


@blueprint.post("/login")
async def login() -> ResponseReturnValue:
    auth = _auth()
    form = await request.form
    user, password = form.get("username", ""), form.get("password", "")
    target = _safe_next(form.get("next"))
    throttle = _throttle()
    # Per address, and per account: the user name typed (blank: the API token).
    keys = (_address_key(), f"account:{user or TOKEN_USER}")
    wait = throttle.retry_after(*keys)
    if wait:
        seconds = math.ceil(wait)
        page = await _login_page(
            f"Too many failed logins: try again in {seconds} s.", target, status=429
        )
        return page[0], page[1], {"Retry-After": str(seconds)}
    # Counted as failed until proven right: tries sent at once, each waiting for its
    # password check, are held back as if they had failed one after the other.
    throttle.failed(*keys)
    if auth.api_token is not None and _same_token(password, auth.api_token):
        user = TOKEN_USER
    elif not await verify_password(auth, user, password):
        log.warning("failed login for user %r from %s", user, client_address())
        wrong = "Wrong user name or password." if auth.users else "Wrong API token."
        return await _login_page(wrong, target)
    throttle.succeeded(*keys)
    # A fresh session at login: a cookie planted before cannot ride along (fixation).
    session.clear()
    session["user"] = user
    session["sid"] = secrets.token_urlsafe(16)  # what logout revokes
    session["csrf"] = secrets.token_urlsafe(32)
    log.info("user %r logged in from %s", user, client_address())
    return redirect(target)


@blueprint.post("/logout")
async def logout() -> ResponseReturnValue:
    sid = session.get("sid")
    if isinstance(sid, str):
        revoked: RevokedSessions = current_app.extensions["sluice_revoked_sessions"]
        revoked.revoke(sid)
    session.clear()
    return redirect("/login")


def install(app: Quart, auth: Auth) -> None:
    app.extensions["sluice_auth"] = auth
    app.extensions["sluice_login_throttle"] = LoginThrottle()
    app.extensions["sluice_hosts_refused"] = set()
    app.secret_key = auth.session_secret
    app.config.update(
        SESSION_COOKIE_NAME="sluice_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
    )
    revoked = RevokedSessions(app.permanent_session_lifetime.total_seconds())
    app.extensions["sluice_revoked_sessions"] = revoked
    app.session_interface = _Sessions(revoked)
    # The host first: a request for another name is answered nothing else.
    app.before_request(_check_request_host)
    app.before_websocket(_check_websocket_host)
    app.before_request(guard)
    app.context_processor(lambda: {"csrf_token": csrf_token(), "current_user": session.get("user")})
    app.register_blueprint(blueprint)

"""Anonymous identities in a signed cookie, the CSRF token bound to each, and the origin check.

Identity: an anonymous ``web:<random>`` user id in a signed, HttpOnly, SameSite=Lax cookie. A
tampered or foreign cookie simply yields a new identity. State-changing requests are checked for
same-origin (Origin/Referer against Host); votes additionally need a JSON body and a CSRF token
derived from the identity cookie (``X-CSRF-Token``; the page carries it in a meta tag, API clients
get it from ``GET /api/session`` or the ``oogiri_csrf`` cookie).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from itsdangerous import BadSignature, URLSafeSerializer

if TYPE_CHECKING:
    from fastapi import Request
    from starlette.responses import Response

    from bot.settings import Settings

log = logging.getLogger(__name__)

USER_COOKIE = "oogiri_id"
CSRF_COOKIE = "oogiri_csrf"
CSRF_HEADER = "X-CSRF-Token"
COOKIE_MAX_AGE = 365 * 24 * 3600
SECRET_FILE = "web-cookie-secret"


def load_or_create_secret(settings: Settings) -> bytes:
    """settings.web.cookie_secret, else a random secret created once in data_dir (mode 0600)."""
    configured = settings.web.cookie_secret
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value().encode()
    path = settings.data_dir / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
            fh.flush()
            os.fsync(fh.fileno())
        log.info("web: created a new cookie secret file in the data directory")
    # Another process may have just created it: give it a moment to be written.
    for _ in range(50):
        value = path.read_text().strip()
        if value:
            break
        time.sleep(0.02)
    else:
        raise RuntimeError(f"{path} is empty; delete it or set OOGIRI_WEB__COOKIE_SECRET")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("web: cookie secret file had mode %o; tightening to 600", mode)
        path.chmod(0o600)
    return value.encode()


class Identities:
    """Signs user ids into cookies and derives the CSRF token bound to each id."""

    def __init__(self, secret: bytes) -> None:
        self._serializer = URLSafeSerializer(secret, salt="oogiri.web.user")
        self._csrf_key = hmac.new(secret, b"oogiri.web.csrf", hashlib.sha256).digest()

    @staticmethod
    def new_user_id() -> str:
        return f"web:{secrets.token_urlsafe(16)}"

    def sign(self, user_id: str) -> str:
        return self._serializer.dumps(user_id)

    def verify(self, cookie: str | None) -> str | None:
        if not cookie:
            return None
        try:
            value = self._serializer.loads(cookie)
        except BadSignature:
            return None
        if not isinstance(value, str) or not value.startswith("web:") or len(value) > 100:
            return None
        return value

    def csrf_token(self, user_id: str) -> str:
        return hmac.new(self._csrf_key, user_id.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, user_id: str, token: str | None) -> bool:
        # bytes: compare_digest refuses a str with non-ASCII characters (a header may carry any)
        given = (token or "").encode()
        return bool(token) and hmac.compare_digest(self.csrf_token(user_id).encode(), given)

    def visitor(self, request: Request) -> Visitor:
        """Who is asking: the id in a valid cookie, else a new one (not yet remembered)."""
        user_id = self.verify(request.cookies.get(USER_COOKIE))
        is_new = user_id is None
        if user_id is None:
            user_id = self.new_user_id()
        return Visitor(user_id, is_new, self.csrf_token(user_id))

    def remember(self, response: Response, who: Visitor, secure: bool) -> Response:
        """Set the identity cookies for a new visitor; always expose the current CSRF token."""
        response.headers[CSRF_HEADER] = who.csrf
        if who.is_new:
            response.set_cookie(
                USER_COOKIE,
                self.sign(who.user_id),
                max_age=COOKIE_MAX_AGE,
                httponly=True,
                samesite="lax",
                secure=secure,
                path="/",
            )
            response.set_cookie(
                CSRF_COOKIE,
                who.csrf,
                max_age=COOKIE_MAX_AGE,
                httponly=False,
                samesite="strict",
                secure=secure,
                path="/",
            )
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["Vary"] = "Cookie, Accept-Language"
        return response


@dataclass(slots=True)
class Visitor:
    user_id: str
    is_new: bool
    csrf: str


def _normalise_host(host: str) -> str:
    """Lower-case host[:port] without a default port (:80/:443; a proxy may add either)."""
    host = host.strip().lower()
    for default in (":80", ":443"):
        if host.endswith(default):
            return host[: -len(default)]
    return host


def same_origin(request: Request) -> bool:
    """False when Origin (or, without it, Referer) names another host than the one asked.

    Requests with neither header (curl, API clients) pass; a cross-site browser form always sends
    Origin on POST. X-Forwarded-Host is accepted as well: a cross-site form cannot set it.
    """
    hosts = {_normalise_host(request.headers.get("host", ""))}
    forwarded = request.headers.get("x-forwarded-host")
    if forwarded:
        hosts.add(_normalise_host(forwarded.split(",")[0]))
    hosts.discard("")
    origin = request.headers.get("origin")
    source = origin if origin is not None else request.headers.get("referer")
    if source is None:
        return True
    if source == "null":
        return False
    try:
        parts = urlsplit(source)
    except ValueError:  # e.g. "http://[::1": not a URL, so not our origin
        return False
    if not parts.netloc:
        return False
    return _normalise_host(parts.netloc) in hosts

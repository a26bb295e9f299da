"""Prometheus metrics of the web channel; the middleware that counts requests and adds headers."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Permissions-Policy", "camera=(), microphone=(), geolocation=(), interest-cohort=()"),
)


#: Label values come from this fixed set, never from the client: made-up methods and unknown
#: paths would otherwise add series without bound (3,000 requests once added 6,000).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def label_of(scope: Scope) -> tuple[str, str]:
    """(method, route template): an unknown method is "other", an unrouted path "unmatched"."""
    method = scope.get("method", "")
    route = getattr(scope.get("route"), "path", None)
    if route is None and scope.get("path", "").startswith("/static/"):
        route = "/static"  # the StaticFiles mount (a Mount sets no route on the scope)
    return (method if method in METHODS else "other"), (route or "unmatched")


class WebMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http = Counter(
            "oogiri_web_http_requests",
            "HTTP requests served by the web channel",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "oogiri_web_http_seconds",
            "HTTP response time of the web channel",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.upload_bytes = Histogram(
            "oogiri_web_upload_bytes",
            "Size of uploaded pictures",
            buckets=tuple(2**n for n in range(12, 26)),
            registry=self.registry,
        )
        self.refused = Counter(
            "oogiri_web_refused",
            "Requests the web channel refused before they reached the service",
            ["reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class WebMiddleware:
    """Adds the security headers to every response and counts requests per route template."""

    def __init__(self, app: ASGIApp, metrics: WebMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_headers(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                headers = MutableHeaders(scope=msg)
                for name, value in SECURITY_HEADERS:
                    if name not in headers:
                        headers[name] = value
            await send(msg)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            method, route = label_of(scope)
            self.metrics.http.labels(method, route, str(status)).inc()
            self.metrics.http_latency.labels(route).observe(time.perf_counter() - started)

"""The web channel itself: uvicorn serving ``create_api(app)`` inside the App's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp

from plugins.web.protocol import guarded_protocol
from plugins.web.routes import create_api

if TYPE_CHECKING:
    from bot.app import App

log = logging.getLogger(__name__)

CHANNEL = "web"


def default_allowed_hosts(bind_host: str) -> list[str]:
    """The bind address and localhost; a wildcard bind cannot know its public names."""
    if bind_host in ("", "0.0.0.0", "::"):
        return ["*"]
    host = bind_host.lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return sorted({host, "localhost", "127.0.0.1", "[::1]"})


def serving_app(app: App, bind_host: str) -> ASGIApp:
    """``create_api(app)`` behind Starlette's ``TrustedHostMiddleware`` (DNS rebinding).

    A browser tricked into resolving an attacker's name to 127.0.0.1 still sends that name as
    Host; only the configured names (default: the bind address and localhost) are answered.
    """
    configured = app.settings.web.allowed_hosts
    hosts = configured if configured is not None else default_allowed_hosts(bind_host)
    if "*" in hosts and configured is None:
        log.warning(
            "web: listening on all interfaces with no host allow-list; set web.allowed_hosts "
            "to the names this bot is reached by"
        )
    return TrustedHostMiddleware(create_api(app), allowed_hosts=hosts, www_redirect=False)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the App owns SIGINT/SIGTERM and stops us."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


class WebChannel:
    """Serves ``create_api(app)`` with uvicorn inside the running event loop."""

    name = CHANNEL

    def __init__(
        self,
        app: App,
        host: str | None = None,
        port: int | None = None,
        graceful_timeout_s: float = 10.0,
    ) -> None:
        self.app = app
        self.host = host if host is not None else app.settings.web.host
        self.requested_port = port if port is not None else app.settings.web.port
        self.graceful_timeout_s = graceful_timeout_s
        self.server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        """The port actually listened on (useful with port 0)."""
        if self._socket is None:
            return self.requested_port
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        if host in ("0.0.0.0", "[::]", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("web channel already started")
        # Binding first turns "address in use" into an OSError for the caller (uvicorn would
        # call sys.exit) and makes port 0 usable.
        self._socket = _bind(self.host, self.requested_port)
        try:
            web = self.app.settings.web
            config = uvicorn.Config(
                serving_app(self.app, self.host),
                lifespan="on",
                log_config=None,
                access_log=True,
                # The client address is worked out by the app itself (plugins/web/guard.py)
                # from web.trusted_proxies; uvicorn's own rewrite would hide the peer from it.
                proxy_headers=False,
                server_header=False,
                timeout_graceful_shutdown=int(self.graceful_timeout_s),
                http=guarded_protocol(
                    header_timeout_s=web.header_timeout_s,
                    max_connections=web.max_connections,
                    max_connections_per_ip=web.max_connections_per_ip,
                    trusted_peers=web.trusted_proxies,
                ),
                h11_max_incomplete_event_size=web.max_header_bytes,
                timeout_keep_alive=max(1, round(web.keep_alive_timeout_s)),
                # Requests beyond this many connections/tasks get uvicorn's 503.
                limit_concurrency=web.max_connections,
            )
            server = self.server = _Server(config)
            task = self._task = asyncio.create_task(
                self._serve(server, self._socket), name="oogiri-web"
            )
            while not server.started:
                if task.done():
                    task.result()  # re-raise the startup failure
                    raise RuntimeError("web server stopped while starting")
                await asyncio.sleep(0.01)
        except BaseException:
            if self._task is not None and not self._task.done():
                self._task.cancel()
            self._task = None
            self._socket.close()
            self._socket = None
            raise
        log.info("web: serving on %s", self.url)

    @staticmethod
    async def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            await server.serve(sockets=[sock])
        except SystemExit as exc:  # uvicorn exits on a failed lifespan startup
            raise RuntimeError("the web server failed to start (see the log)") from exc

    async def stop(self) -> None:
        task, server = self._task, self.server
        if task is None or server is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self.graceful_timeout_s + 5)
        except TimeoutError:
            server.force_exit = True
            with contextlib.suppress(Exception):
                await task
        except Exception:
            log.exception("web: server ended with an error")
        finally:
            self._task = None
            if self._socket is not None:
                self._socket.close()
                self._socket = None
        log.info("web: stopped")

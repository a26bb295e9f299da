"""uvicorn's h11 protocol with what it lacks against slow or numerous connections.

uvicorn has a keep-alive timeout, but nothing bounds the time a client may take to send its
request headers (a connection that sends one byte every few seconds stays open forever: 500 of
them were still open after 60 s), and ``limit_concurrency`` only answers 503 once a request's
headers are complete, so connections that never complete them are not capped either. This
subclass adds:

- a header timeout: from the connection's start (and after each response) the next request's
  headers must be complete within ``header_timeout_s``, else the connection is closed;
- a connection cap: beyond ``max_connections`` in all, or ``max_connections_per_ip`` from one
  peer (trusted proxies exempt: they carry everybody), a new connection is closed at once.

Only the h11 implementation is used (``http="h11"`` semantics), so that
``h11_max_incomplete_event_size`` bounds the header size as well.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

#: Warnings about refused connections are logged at most this often.
LOG_EVERY_S = 10.0


class GuardedH11Protocol(H11Protocol):
    """See the module docstring; the limits are class attributes set by ``guarded_protocol``."""

    header_timeout_s: float = 10.0
    max_connections: int = 1024
    max_connections_per_ip: int = 64
    trusted_peers: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    per_peer: ClassVar[Counter[str]] = Counter()
    stats: ClassVar[Counter[str]] = Counter()
    _last_warning: ClassVar[float] = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._peer: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = self.client[0] if self.client else None
        cls = type(self)
        if len(self.connections) > self.max_connections:
            self._refuse(transport, "connection cap")
            return
        if peer is not None and not self._trusted(peer):
            if cls.per_peer[peer] >= self.max_connections_per_ip:
                self._refuse(transport, "per-address connection cap")
                return
            cls.per_peer[peer] += 1
            self._peer = peer
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        if self._peer is not None:
            cls = type(self)
            cls.per_peer[self._peer] -= 1
            if cls.per_peer[self._peer] <= 0:
                del cls.per_peer[self._peer]
            self._peer = None
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's headers are complete
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        # Armed first: a pipelined request handled inside super() disarms it again.
        if not self.transport.is_closing():
            self._arm_header_timer()
        super().on_response_complete()

    # ------------------------------------------------------------------ internals

    def _trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self.trusted_peers)

    def _refuse(self, transport: asyncio.Transport, why: str) -> None:
        cls = type(self)
        cls.stats[why] += 1
        now = time.monotonic()
        if now - cls._last_warning > LOG_EVERY_S:
            cls._last_warning = now
            log.warning("web: closing new connections (%s; %d so far)", why, cls.stats[why])
        transport.close()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # still answering the previous request
        type(self).stats["header timeout"] += 1
        log.info("web: closing a connection whose request headers did not arrive in time")
        self.transport.close()


def guarded_protocol(
    *,
    header_timeout_s: float,
    max_connections: int,
    max_connections_per_ip: int,
    trusted_peers: Sequence[str],
) -> type[GuardedH11Protocol]:
    """A protocol class for ``uvicorn.Config(http=…)`` with these limits (and its own counters)."""
    networks = tuple(ipaddress.ip_network(p, strict=False) for p in trusted_peers)
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout_s": header_timeout_s,
            "max_connections": max_connections,
            "max_connections_per_ip": max_connections_per_ip,
            "trusted_peers": networks,
            "per_peer": Counter(),
            "stats": Counter(),
        },
    )

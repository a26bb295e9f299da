"""Identities that cost something: who is asking, by network, and how much the channel admits.

A cookie is free to drop, so per-session limits alone mean nothing to an attacker. Here every
request is also attributed to its *network*: the client address (the peer, or the first address
in ``X-Forwarded-For`` that is not one of ``web.trusted_proxies``), IPv6 folded to its
``web.ipv6_prefix`` (one subscriber usually holds a whole /64). Per network the channel limits
uploads, votes and the minting of new sessions; across all networks it admits at most
``web.max_inflight_uploads`` uploads at once. Votes remember a keyed hash of their network (never
the address) so training can require several distinct networks behind a web-rated joke.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from bot.models import EngineBusy, RateLimited

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection

    from bot.limits import Limiter

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
UNKNOWN = "unknown"


def parse_networks(values: Sequence[str]) -> tuple[IPNetwork, ...]:
    """``["127.0.0.1", "10.0.0.0/8", "::1"]`` → networks (a bare address is a /32 or /128)."""
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip())


def _address(text: str) -> IPAddress | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.7:8080"
        text = text.split(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]
) -> IPAddress | None:
    """The address that reached the first proxy we trust.

    Walks ``X-Forwarded-For`` from the right (the hop our trusted proxy added last) and stops at
    the first address that is not a trusted proxy; everything left of it is the client's to
    forge. Without a trusted peer the header is ignored.
    """
    address = _address(peer) if peer else None
    if address is None or not any(address in net for net in trusted):
        return address
    hops = [hop for header in forwarded_for for hop in header.split(",")]
    for hop in reversed(hops):
        candidate = _address(hop)
        if candidate is None:
            return address  # garbage in the chain: trust nothing beyond the last good hop
        address = candidate
        if not any(candidate in net for net in trusted):
            return candidate
    return address


def network_of(address: IPAddress | None, ipv6_prefix: int) -> str:
    """The key limits are counted under: an IPv4 address, or an IPv6 /``ipv6_prefix``."""
    if address is None:
        return UNKNOWN
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


class Guard:
    """Per-network limits (through the App's limiter, so replicas share them) and admission."""

    def __init__(
        self,
        limiter: Limiter,
        *,
        secret: bytes,
        trusted_proxies: Sequence[str],
        ipv6_prefix: int,
        uploads_per_minute: int,
        votes_per_minute: int,
        new_sessions_per_hour: int,
        max_inflight_uploads: int,
        inflight_uploads_per_network: int,
    ) -> None:
        self.limiter = limiter
        self._hash_key = hmac.new(secret, b"oogiri.web.network", hashlib.sha256).digest()
        self.trusted = parse_networks(trusted_proxies)
        self.ipv6_prefix = ipv6_prefix
        self.uploads_per_minute = uploads_per_minute
        self.votes_per_minute = votes_per_minute
        self.new_sessions_per_hour = new_sessions_per_hour
        self.max_inflight_uploads = max_inflight_uploads
        self.inflight_uploads_per_network = inflight_uploads_per_network
        self.inflight = 0
        self._per_network: Counter[str] = Counter()

    # ------------------------------------------------------------------ who

    def address(self, conn: HTTPConnection) -> IPAddress | None:
        peer = conn.client.host if conn.client else None
        return client_address(peer, conn.headers.getlist("x-forwarded-for"), self.trusted)

    def network(self, conn: HTTPConnection) -> str:
        return network_of(self.address(conn), self.ipv6_prefix)

    def network_hash(self, network: str) -> str:
        """What a vote stores: enough to tell networks apart, not to recover an address."""
        return hmac.new(self._hash_key, network.encode(), hashlib.sha256).hexdigest()[:24]

    # ------------------------------------------------------------------ limits

    async def _hit(self, kind: str, network: str, limit: int, window_s: float) -> None:
        if limit <= 0:
            return
        wait = await self.limiter.hit(f"web:{kind}:{network}", limit, window_s)
        if wait is not None:
            raise RateLimited("rate_network", seconds=max(1, math.ceil(wait)))

    async def upload(self, network: str) -> None:
        await self._hit("upload", network, self.uploads_per_minute, 60.0)

    async def vote(self, network: str) -> None:
        await self._hit("vote", network, self.votes_per_minute, 60.0)

    async def new_session(self, network: str) -> None:
        """A cookie-less request is about to get a new identity: identities cost a slot."""
        if self.new_sessions_per_hour <= 0:
            return
        wait = await self.limiter.hit(f"web:session:{network}", self.new_sessions_per_hour, 3600.0)
        if wait is not None:
            raise RateLimited("rate_sessions", seconds=max(1, math.ceil(wait)))

    @contextmanager
    def admit(self, network: str) -> Iterator[None]:
        """One upload in flight: ``EngineBusy`` when the channel or this network is full."""
        if self.inflight >= self.max_inflight_uploads:
            raise EngineBusy(detail="web: too many uploads in flight")
        per_network = self.inflight_uploads_per_network
        if per_network > 0 and self._per_network[network] >= per_network:
            raise RateLimited("rate_network", seconds=2)
        self.inflight += 1
        self._per_network[network] += 1
        try:
            yield
        finally:
            self.inflight -= 1
            self._per_network[network] -= 1
            if self._per_network[network] <= 0:
                del self._per_network[network]

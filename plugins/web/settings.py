"""Settings of the web channel: ``settings.web``, env ``OOGIRI_WEB__…``, ``[web]`` in oogiri.toml.

The web plugin contributes this section through ``oogiri_register_settings``, as any plugin would.
Lists accept JSON or commas: ``OOGIRI_WEB__TRUSTED_PROXIES=10.0.0.2,fd00::/64``.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from oogiri import PluginSettings, split_list


class WebSettings(PluginSettings):
    """Where the web channel listens, how its cookies behave and what it admits per network."""

    host: str = "127.0.0.1"
    port: int = 8000
    cookie_secret: SecretStr | None = Field(
        default=None, description="unset: a random secret is created once in data_dir"
    )
    secure_cookies: bool = Field(default=False, description="set when served over HTTPS")
    public_stats: bool = True

    # --- who is asking (issue 21): limits per network, not only per (free) cookie
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        description="peers (addresses or CIDRs) whose X-Forwarded-For is believed",
    )
    ipv6_prefix: int = Field(
        default=64, ge=16, le=128, description="IPv6 clients count per this prefix"
    )
    uploads_per_ip_per_minute: int = Field(
        default=20, ge=0, description="per network; 0: unlimited"
    )
    votes_per_ip_per_minute: int = Field(default=60, ge=0, description="per network; 0: unlimited")
    new_sessions_per_ip_per_hour: int = Field(
        default=30, ge=0, description="new cookie identities per network; 0: unlimited"
    )
    max_inflight_uploads: int = Field(
        default=32, ge=1, description="uploads in progress, all networks"
    )
    inflight_uploads_per_ip: int = Field(default=2, ge=0, description="per network; 0: unlimited")

    # --- the HTTP server
    allowed_hosts: Annotated[list[str] | None, NoDecode] = Field(
        default=None,
        description="Host header allow-list; unset: the bind address and localhost ('*': any)",
    )
    metrics_token: SecretStr | None = Field(
        default=None, description="when set, /metrics needs 'Authorization: Bearer <token>'"
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="a request's headers must arrive"
    )
    keep_alive_timeout_s: float = Field(
        default=5.0, gt=0, description="idle keep-alive connections"
    )
    max_connections: int = Field(default=1024, ge=1, description="open connections, all clients")
    max_connections_per_ip: int = Field(default=64, ge=1, description="open connections per peer")
    max_header_bytes: int = Field(default=16384, ge=1024, description="request line + headers")

    @field_validator("trusted_proxies", "allowed_hosts", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return value

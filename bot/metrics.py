"""Prometheus metrics, one registry per app so tests and replicas never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "oogiri_requests",
            "Joke requests by channel and outcome",
            ["channel", "outcome"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "oogiri_request_seconds",
            "Time from request to joke (or rejection)",
            ["channel"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.engine_latency = Histogram(
            "oogiri_engine_seconds",
            "Engine generation time",
            ["model_version"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.ratings = Counter(
            "oogiri_ratings",
            "Votes by channel and direction",
            ["channel", "value"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "oogiri_engine_in_flight", "Engine calls in progress", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

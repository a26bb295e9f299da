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
        self.queue_waiting = Gauge(
            "oogiri_engine_queue_waiting",
            "Requests waiting for an engine slot (admission control)",
            ["engine"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "oogiri_engine_queue_wait_seconds",
            "Time a request waited for an engine slot",
            ["engine"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
            registry=self.registry,
        )
        self.admission_rejected = Counter(
            "oogiri_admission_rejected",
            "Requests answered 'busy' by admission control (queue_full, wait_limit)",
            ["engine", "reason"],
            registry=self.registry,
        )

        # outbox and moderation (bot/outbox.py, bot/moderation.py)
        self.outbox = Counter(
            "oogiri_outbox",
            "Outbox replies by channel and event "
            "(stored, delivered, retried, expired, dropped, gave_up)",
            ["channel", "event"],
            registry=self.registry,
        )
        self.moderated = Counter(
            "oogiri_moderated",
            "Requests refused by moderation (blocked, not_allowed)",
            ["channel", "reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

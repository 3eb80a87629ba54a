"""Prometheus metrics, one registry per app so several apps can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The counters and gauges ``GET /metrics`` exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections_open = Gauge(
            "triows_connections_open", "Open WebSocket connections", registry=self.registry
        )
        self.messages_published = Counter(
            "triows_messages_published",
            "Messages handed to the broker, by outcome and kind (user or room)",
            ["outcome", "kind"],
            registry=self.registry,
        )
        self.messages_delivered = Counter(
            "triows_messages_delivered",
            "Message frames queued to a local connection, by kind (user or room)",
            ["kind"],
            registry=self.registry,
        )
        self.messages_dropped = Counter(
            "triows_messages_dropped",
            "Messages not delivered to a local connection, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.send_seconds = Histogram(
            "triows_send_seconds",
            "Time from a send request to the broker's confirm",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.presence_events = Counter(
            "triows_presence_events",
            "Room joins and leaves: published (joined, left), or not: the user is in the "
            "room on another instance (elsewhere), the broker failed (unavailable), too many "
            "checks at once (dropped)",
            ["outcome"],
            registry=self.registry,
        )
        self.presence_queries = Counter(
            "triows_presence_queries",
            "Presence queries answered here, by whether every instance answered in time",
            ["complete"],
            registry=self.registry,
        )
        self.broker_ready = Gauge(
            "triows_broker_ready",
            "1 while the backend is connected and consuming",
            registry=self.registry,
        )

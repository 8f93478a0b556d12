"""Prometheus metrics, on a registry of the app's own (several apps can share a process)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "steerway_connections_open", "Open WebSocket connections", ["endpoint"], registry=r
        )
        self.events = Counts("steerway_events_appended", "Events appended to conversations", "type")
        r.register(self.events)
        self.runs = Counter(
            "steerway_runs_ended", "Runs ended, by final status", ["status"], registry=r
        )
        self.steering = Counter(
            "steerway_steering_messages",
            "Steering messages by outcome (queued, absorbed, dropped, follow_up)",
            ["outcome"],
            registry=r,
        )
        self.delivery = Histogram(
            "steerway_result_delivery_seconds",
            "From a runner result reaching the gateway to its event's first send to a client",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.client_errors = Counter(
            "steerway_client_errors", "Error frames sent to clients, by code", ["code"], registry=r
        )
        self.slow_consumers = Counter(
            "steerway_slow_consumer_closes", "Clients closed with 4008", registry=r
        )
        self.store_batches = Gauge(
            "steerway_store_batches", "Group commits written to the store", registry=r
        )

        self.replay_reads = Gauge(
            "steerway_replay_store_reads",
            "Store reads of WebSocket replays (queries: one per page of up to 100 "
            "conversations, shared by the clients at once)",
            registry=r,
        )

    def cluster(
        self, leases: Callable[[], int], gaps: Callable[[], int], dropped: Callable[[], int]
    ) -> None:
        """Cluster mode only: what the node holds and what its bus had to repair."""
        r = self.registry
        Gauge(
            "steerway_cluster_leases", "Conversations whose lease this node holds", registry=r
        ).set_function(leases)
        Gauge(
            "steerway_cluster_gap_events",
            "Events read from the store to fill a gap in a relayed stream",
            registry=r,
        ).set_function(gaps)
        Gauge(
            "steerway_cluster_dropped_messages",
            "Messages not relayed through Redis (queue full or Redis down); gaps are filled",
            registry=r,
        ).set_function(dropped)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Counts:
    """A counter by one label kept as plain integers (`counts[label] += n`) and read when
    scraped: prometheus-client's counters take a lock and check the labels per increment,
    a cost per event on the hot path."""

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.counts: Tally[str] = Tally()

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, count in sorted(self.counts.items()):
            family.add_metric([value], count)
        yield family

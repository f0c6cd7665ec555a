"""The hub's Prometheus metrics, in a registry of their own (served at ``/metrics``).

Ingest: messages stored by kind, drops by reason, duplicates, sequence gaps, rebirth
requests, batch size and write time, queue depth. Fleet: devices online. MQTT: connection
state, publish latency (publish call to the broker's acknowledgement) by kind, and the
broker's own drop counter ``$SYS/broker/publish/messages/dropped`` as last read from the
broker, so a broker that sheds messages for a slow subscriber is visible beside the hub's
counters.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST
MESSAGE_KINDS = ("birth", "status", "telemetry", "state", "events", "result")
DROP_REASONS = (
    "topic",
    "too_large",
    "decode",
    "schema_version",
    "device_mismatch",
    "stale_will",
    "stale_session",
    "store_error",
)
"""Why a message was dropped: the contract's ``WireError.reason`` values, plus
``device_mismatch`` (payload device id differs from the topic's), ``stale_will`` (a Will
from an older session), ``stale_session`` (another status or a birth from an older session)
and ``store_error`` (the store refused that one message)."""
PUBLISH_KINDS = ("hub_state", "cmd", "desired")


class HubMetrics:
    """Every metric of the hub, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.ingest_messages = Counter(
            "edgefleet_hub_ingest_messages",
            "Device messages decoded and written to the store, by kind.",
            ["kind"],
            registry=r,
        )
        self.ingest_dropped = Counter(
            "edgefleet_hub_ingest_dropped",
            "Device messages counted and dropped, by reason.",
            ["reason"],
            registry=r,
        )
        self.ingest_duplicates = Counter(
            "edgefleet_hub_ingest_duplicates",
            "Redelivered messages (same device, session and seq) stored only once, by kind.",
            ["kind"],
            registry=r,
        )
        self.seq_gaps = Counter(
            "edgefleet_hub_ingest_seq_gaps",
            "Missing sequence numbers within a device session, after the grace period.",
            registry=r,
        )
        self.rebirth_requests = Counter(
            "edgefleet_hub_rebirth_requests",
            "Rebirth commands sent to devices, by cause (seq_gap, no_birth).",
            ["cause"],
            registry=r,
        )
        self.hook_errors = Counter(
            "edgefleet_hub_ingest_hook_errors",
            "Exceptions raised by ingest hooks, by hook.",
            ["hook"],
            registry=r,
        )
        self.store_retries = Counter(
            "edgefleet_hub_ingest_store_retries",
            "Batches whose write failed with a transient store error and was retried.",
            registry=r,
        )
        self.batch_size = Histogram(
            "edgefleet_hub_ingest_batch_size",
            "Messages per ingest write transaction.",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "edgefleet_hub_ingest_batch_seconds",
            "Time to decode and write one ingest batch.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.queue_depth = Gauge(
            "edgefleet_hub_ingest_queue_depth",
            "Messages received and not yet written.",
            registry=r,
        )
        self.devices_online = Gauge(
            "edgefleet_hub_devices_online", "Devices whose last status is online.", registry=r
        )
        self.mqtt_connected = Gauge(
            "edgefleet_hub_mqtt_connected",
            "1 while the hub is connected to the broker.",
            registry=r,
        )
        self.publish_latency = Histogram(
            "edgefleet_hub_publish_latency_seconds",
            "From publish to the broker's acknowledgement, by kind (hub_state, cmd, desired).",
            ["kind"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
            registry=r,
        )
        self.rollout_tick_seconds = Histogram(
            "edgefleet_hub_rollout_tick_seconds",
            "Time one rollout tick took to step every active rollout (lock wait excluded).",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.broker_dropped = Gauge(
            "edgefleet_hub_broker_messages_dropped",
            "The broker's $SYS/broker/publish/messages/dropped, as last read.",
            registry=r,
        )
        for kind in MESSAGE_KINDS:
            self.ingest_messages.labels(kind)
            self.ingest_duplicates.labels(kind)
        for reason in DROP_REASONS:
            self.ingest_dropped.labels(reason)
        for cause in ("seq_gap", "no_birth"):
            self.rebirth_requests.labels(cause)
        for kind in PUBLISH_KINDS:
            self.publish_latency.labels(kind)

    def render(self) -> bytes:
        """The text exposition format (serve with ``CONTENT_TYPE``)."""
        return bytes(generate_latest(self.registry))

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when absent), e.g.
        ``value("edgefleet_hub_ingest_dropped_total", reason="decode")``."""
        found = self.registry.get_sample_value(name, labels)
        return float(found) if found is not None else 0.0

    def dropped(self, reason: str) -> float:
        return self.value("edgefleet_hub_ingest_dropped_total", reason=reason)

    def stored(self, kind: str) -> float:
        return self.value("edgefleet_hub_ingest_messages_total", kind=kind)

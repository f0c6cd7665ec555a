"""Prometheus metrics of the local inference API, in a registry of their own.

The server feeds the request counters and latency histograms; the model table's state
(in flight, queued, loaded) and the agent's readiness are read from the host when
``/metrics`` is scraped, so they are never stale. The daemon reads the same numbers for
MQTT telemetry with :meth:`ApiMetrics.request_counts` and may add its own health gauges
with :meth:`ApiMetrics.agent_gauge`.

Label values are bounded: a model the host does not hold is counted as model ``""``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from agent.api.oip import Readiness
from agent.host import ModelHost

OUTCOMES = (
    "success",
    "bad_request",
    "not_found",
    "too_large",
    "overloaded",
    "unavailable",
    "error",
)
"""Outcome label values: 200, 400, 404, 413, 429, 503, 500."""

_STATUS_OUTCOME = {
    200: "success",
    400: "bad_request",
    404: "not_found",
    413: "too_large",
    429: "overloaded",
    503: "unavailable",
}

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Seconds; from a small classifier on a fast core to a large detector on a slow one."""


def outcome_of(status: int) -> str:
    """The outcome label of an HTTP status."""
    return _STATUS_OUTCOME.get(status, "bad_request" if 400 <= status < 500 else "error")


class _HostCollector:
    """Scrape-time gauges read from the model host, the readiness check and the server."""

    def __init__(
        self,
        host: ModelHost,
        readiness: Callable[[], Readiness],
        connections: Callable[[], int] | None,
    ) -> None:
        self.host = host
        self.readiness = readiness
        self.connections = connections

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "edgefleet_model_in_flight",
            "Requests running on a model (holding a permit).",
            labels=["model", "version"],
        )
        queued = GaugeMetricFamily(
            "edgefleet_model_queue_depth",
            "Requests waiting for a permit on a model.",
            labels=["model", "version"],
        )
        state = GaugeMetricFamily(
            "edgefleet_model_state",
            "1 for each model in the active table, labelled with its state.",
            labels=["model", "version", "state"],
        )
        active = 0
        for name, slot in self.host.table.items():
            version = slot.version or ""
            in_flight.add_metric([name, version], slot.in_flight)
            queued.add_metric([name, version], slot.queued)
            state.add_metric([name, version, slot.state], 1)
            active += slot.state == "active"
        yield in_flight
        yield queued
        yield state
        yield GaugeMetricFamily(
            "edgefleet_models_loaded", "Models loaded and serving.", value=active
        )
        ready = GaugeMetricFamily(
            "edgefleet_agent_ready",
            "1 when the desired model set is loaded and smoke-tested.",
            value=1 if self.readiness().ready else 0,
        )
        yield ready
        if self.connections is not None:
            yield GaugeMetricFamily(
                "edgefleet_api_connections",
                "Open connections to the inference API.",
                value=self.connections(),
            )


class ApiMetrics:
    """The inference API's metrics. Thread-safe; one per server."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True
    ) -> None:
        """A fresh registry unless one is given; ``process_metrics`` adds process_* (CPU,
        memory, open files) as the agent's own health."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._host_collector: _HostCollector | None = None
        self._agent_gauges: dict[str, Gauge] = {}
        self._children: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        labels = ["model", "version"]
        self.requests = Counter(
            "edgefleet_inference_requests",
            "Inference requests by model, version and outcome (failures: outcome != success).",
            [*labels, "outcome"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "edgefleet_inference_request_duration_seconds",
            "Successful inference requests, from request line to response sent.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "edgefleet_inference_queue_duration_seconds",
            "Time successful requests waited for a permit.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "edgefleet_inference_compute_duration_seconds",
            "Time successful requests spent in session.run.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "edgefleet_api_connections_refused",
            "Connections refused because the server's connection limit was reached.",
            registry=self.registry,
        )
        if process_metrics:
            ProcessCollector(registry=self.registry)

    def observe_host(
        self,
        host: ModelHost,
        readiness: Callable[[], Readiness],
        connections: Callable[[], int] | None = None,
    ) -> None:
        """Export the host's per-model gauges and the readiness (once per registry)."""
        with self._lock:
            if self._host_collector is not None:
                if self._host_collector.host is not host:
                    raise ValueError("these metrics already observe another model host")
                return
            self._host_collector = _HostCollector(host, readiness, connections)
            self.registry.register(self._host_collector)

    def record(
        self,
        model: str,
        version: str,
        status: int,
        *,
        duration_s: float | None = None,
        queue_s: float | None = None,
        compute_s: float | None = None,
    ) -> None:
        """Count one inference request; latencies are observed for successes only."""
        outcome = outcome_of(status)
        children = self._children.get((model, version, outcome))
        if children is None:
            children = self._children_for(model, version, outcome)
        counter, request_seconds, queue_seconds, compute_seconds = children
        counter.inc()
        if outcome != "success":
            return
        if duration_s is not None:
            request_seconds.observe(duration_s)
        if queue_s is not None:
            queue_seconds.observe(queue_s)
        if compute_s is not None:
            compute_seconds.observe(compute_s)

    def _children_for(self, model: str, version: str, outcome: str) -> tuple[Any, ...]:
        """The labelled series of one (model, version, outcome), looked up once."""
        children = (
            self.requests.labels(model, version, outcome),
            self.request_seconds.labels(model, version),
            self.queue_seconds.labels(model, version),
            self.compute_seconds.labels(model, version),
        )
        self._children[(model, version, outcome)] = children
        return children

    def agent_gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        """A gauge ``edgefleet_agent_<name>`` for the daemon's own health (created once)."""
        with self._lock:
            gauge = self._agent_gauges.get(name)
            if gauge is None:
                gauge = Gauge(
                    f"edgefleet_agent_{name}", documentation, labelnames, registry=self.registry
                )
                self._agent_gauges[name] = gauge
            return gauge

    def request_counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """model -> version -> outcome -> requests since start, for telemetry."""
        counts: dict[str, dict[str, dict[str, int]]] = {}
        for family in self.requests.collect():
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                labels: dict[str, Any] = sample.labels
                per_version = counts.setdefault(labels["model"], {})
                per_outcome = per_version.setdefault(labels["version"], {})
                per_outcome[labels["outcome"]] = int(sample.value)
        return counts

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

"""Rules for the probation window after a switch. Pure: statistics and time come in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.stats import StatsSnapshot
from contract.manifests import RuntimePolicy


@dataclass(frozen=True)
class Breach:
    model: str
    message: str


def find_breach(stats: Mapping[str, StatsSnapshot], policy: RuntimePolicy) -> Breach | None:
    """The first model (by name) whose window breaks the runtime policy's limits, if any.

    Error rate is judged only once a model has served ``min_requests_for_probation``
    requests in the window; latency only for models with a ``max_latency_p95_ms``.
    """
    for name in sorted(stats):
        snap = stats[name]
        limits = policy.for_model(name)
        enough = snap.requests + snap.errors >= max(1, policy.min_requests_for_probation)
        if enough and snap.error_rate is not None and snap.error_rate > policy.max_error_rate:
            return Breach(
                name,
                f"{name}: error rate {snap.error_rate:.1%} over {snap.requests + snap.errors} "
                f"requests exceeds {policy.max_error_rate:.1%}",
            )
        limit = limits.max_latency_p95_ms
        if enough and limit is not None and snap.p95_ms is not None and snap.p95_ms > limit:
            return Breach(name, f"{name}: latency p95 {snap.p95_ms:.1f} ms exceeds {limit} ms")
    return None

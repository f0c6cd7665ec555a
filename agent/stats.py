"""Per-model request statistics over a sliding window, cheap enough for every inference.

The window holds the most recent ``window_samples`` runs that are at most ``window_s``
seconds old (both bounds apply). Percentiles use the nearest-rank method over the
latencies in the window: ``p`` is the value at rank ``ceil(p / 100 * n)`` of the sorted
samples. They are computed in :meth:`ModelStats.snapshot`, never on the hot path, where
:meth:`ModelStats.record` is an append to a deque under a lock.

A *request* is one run of the model (it succeeded or raised); an *error* is a run that
raised; a *rejection* is a request refused before it ran (overloaded, unavailable) or
whose inputs ONNX Runtime refused.
Latency percentiles cover the successful runs only, so fast failures do not flatter them.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Protocol


class Clock(Protocol):
    """A source of monotonic seconds."""

    def now(self) -> float: ...


class MonotonicClock:
    """The process's monotonic clock."""

    def now(self) -> float:
        return time.monotonic()


@dataclass(frozen=True)
class StatsSnapshot:
    """Numbers for telemetry: the window's, then totals since the stats were created."""

    window_s: float
    window_samples: int
    requests: int
    errors: int
    rejected: int
    error_rate: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    total_requests: int
    total_errors: int
    total_rejected: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None when there are none."""
    if not sorted_values:
        return None
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    rank = math.ceil(p / 100 * len(sorted_values))
    return sorted_values[max(rank, 1) - 1]


class ModelStats:
    """Thread-safe sliding-window statistics of one model (one slot of the host)."""

    def __init__(
        self,
        *,
        window_samples: int = 1000,
        window_s: float = 60.0,
        clock: Clock | None = None,
    ) -> None:
        if window_samples < 1:
            raise ValueError("window_samples must be at least 1")
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_samples = window_samples
        self.window_s = window_s
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._lock = threading.Lock()
        # (time, latency_ms, ok) per run; times of rejections.
        self._runs: deque[tuple[float, float, bool]] = deque(maxlen=window_samples)
        self._rejections: deque[float] = deque(maxlen=window_samples)
        self._total_requests = 0
        self._total_errors = 0
        self._total_rejected = 0

    def record(self, latency_ms: float, *, ok: bool = True) -> None:
        """Record one run of the model and how long it took."""
        now = self._clock.now()
        with self._lock:
            self._runs.append((now, latency_ms, ok))
            self._total_requests += 1
            if not ok:
                self._total_errors += 1
            self._expire(now)

    def record_rejected(self) -> None:
        """Record one request refused before it ran."""
        now = self._clock.now()
        with self._lock:
            self._rejections.append(now)
            self._total_rejected += 1
            self._expire(now)

    def _expire(self, now: float) -> None:
        cutoff = now - self.window_s
        runs = self._runs
        while runs and runs[0][0] < cutoff:
            runs.popleft()
        rejections = self._rejections
        while rejections and rejections[0] < cutoff:
            rejections.popleft()

    def snapshot(self) -> StatsSnapshot:
        """The window's counts and latency percentiles, and the totals."""
        now = self._clock.now()
        with self._lock:
            self._expire(now)
            runs = list(self._runs)
            rejected = len(self._rejections)
            totals = (self._total_requests, self._total_errors, self._total_rejected)
        latencies = sorted(latency for _, latency, ok in runs if ok)
        errors = sum(1 for _, _, ok in runs if not ok)
        return StatsSnapshot(
            window_s=self.window_s,
            window_samples=self.window_samples,
            requests=len(runs),
            errors=errors,
            rejected=rejected,
            error_rate=errors / len(runs) if runs else None,
            p50_ms=percentile(latencies, 50),
            p95_ms=percentile(latencies, 95),
            p99_ms=percentile(latencies, 99),
            total_requests=totals[0],
            total_errors=totals[1],
            total_rejected=totals[2],
        )

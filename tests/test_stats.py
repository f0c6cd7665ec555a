"""Sliding-window statistics: counts, nearest-rank percentiles, expiry, totals."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from agent.stats import ModelStats, percentile


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def now(self) -> float:
        return self.t


def reference(values: list[float], p: float) -> float:
    """Nearest-rank percentile as numpy computes it (the inverted empirical CDF)."""
    return float(np.percentile(np.array(values), p, method="inverted_cdf"))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 99, 100, 101, 500])
def test_percentiles_match_a_sorted_reference(n: int) -> None:
    rng = random.Random(n)
    clock = FakeClock()
    stats = ModelStats(window_samples=1000, window_s=60.0, clock=clock)
    values = [round(rng.uniform(0.1, 50.0), 3) for _ in range(n)]
    for v in values:
        stats.record(v)
        clock.t += 0.01
    snap = stats.snapshot()
    assert snap.requests == n
    assert snap.p50_ms == reference(values, 50)
    assert snap.p95_ms == reference(values, 95)
    assert snap.p99_ms == reference(values, 99)


def test_percentile_edges() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    with pytest.raises(ValueError):
        percentile([1.0], 0)


def test_window_keeps_the_last_n_samples_and_all_totals() -> None:
    clock = FakeClock()
    stats = ModelStats(window_samples=10, window_s=3600.0, clock=clock)
    for i in range(25):
        stats.record(float(i), ok=i % 5 != 0)
    snap = stats.snapshot()
    assert snap.requests == 10
    last = list(range(15, 25))
    assert snap.errors == sum(1 for i in last if i % 5 == 0) == 2
    ok_latencies = [float(i) for i in last if i % 5 != 0]
    assert snap.p50_ms == reference(ok_latencies, 50)
    assert snap.p99_ms == 24.0
    assert (snap.total_requests, snap.total_errors) == (25, 5)
    assert snap.error_rate == pytest.approx(0.2)


def test_samples_older_than_the_window_expire() -> None:
    clock = FakeClock()
    stats = ModelStats(window_samples=100, window_s=10.0, clock=clock)
    stats.record(100.0)
    stats.record_rejected()
    clock.t += 5.0
    stats.record(1.0)
    snap = stats.snapshot()
    assert (snap.requests, snap.rejected, snap.p99_ms) == (2, 1, 100.0)

    clock.t += 5.5  # the first sample and the rejection are now 10.5 s old
    snap = stats.snapshot()
    assert (snap.requests, snap.rejected, snap.p99_ms) == (1, 0, 1.0)

    clock.t += 60.0
    snap = stats.snapshot()
    assert snap.requests == 0
    assert snap.p50_ms is None and snap.p95_ms is None and snap.p99_ms is None
    assert snap.error_rate is None
    assert (snap.total_requests, snap.total_rejected) == (2, 1)


def test_errors_count_but_do_not_enter_latency() -> None:
    stats = ModelStats(clock=FakeClock())
    stats.record(5.0)
    stats.record(0.01, ok=False)
    snap = stats.snapshot()
    assert (snap.requests, snap.errors, snap.error_rate) == (2, 1, 0.5)
    assert snap.p50_ms == 5.0


def test_snapshot_is_json_ready() -> None:
    stats = ModelStats(window_samples=5, window_s=2.0, clock=FakeClock())
    stats.record(1.5)
    d = stats.snapshot().to_dict()
    assert d["window_s"] == 2.0 and d["window_samples"] == 5
    assert d["requests"] == 1 and d["p95_ms"] == 1.5
    assert set(d) >= {"errors", "rejected", "total_requests", "total_errors", "total_rejected"}


def test_concurrent_recording_loses_nothing() -> None:
    stats = ModelStats(window_samples=100)

    def work() -> None:
        for _ in range(2000):
            stats.record(1.0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = stats.snapshot()
    assert snap.total_requests == 8000
    assert snap.requests == 100


def test_invalid_windows_are_refused() -> None:
    with pytest.raises(ValueError):
        ModelStats(window_samples=0)
    with pytest.raises(ValueError):
        ModelStats(window_s=0)

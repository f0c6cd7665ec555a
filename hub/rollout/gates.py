"""The rollout gates as pure functions of counts and figures; each returns a ``GateResult``
(passed, failed or pending, its value, its threshold and a reason an operator can read).

Shares are compared exactly (``fractions.Fraction`` of the decimal the operator wrote), so a
threshold that is exactly met is met. Semantics: docs/rollouts.md, "Gates".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

from hub.rollout.model import GateResult, HealthAnalysis, HealthFigures

SUCCESS = "success"
ERROR_THRESHOLD = "error_threshold"
MAX_FAILURES = "max_failures"
HEALTH = "health"

HealthKey = tuple[str, str]
"""(profile, model): what the health analysis compares like with like."""


@dataclass(frozen=True)
class Counts:
    """Devices by outcome. ``failed`` includes timed-out devices; ``unreachable`` devices
    were never switched because they stayed offline; ``in_progress`` are waiting or
    switched devices still working (they count toward neither side)."""

    total: int = 0
    healthy: int = 0
    failed: int = 0
    unreachable: int = 0

    @property
    def in_progress(self) -> int:
        return self.total - self.healthy - self.failed - self.unreachable

    @property
    def finished(self) -> int:
        return self.healthy + self.failed


def _exact(value: float) -> Fraction:
    return Fraction(repr(value))


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def success_gate(
    counts: Counts,
    threshold: float,
    *,
    unreachable_fails: bool = False,
    require_healthy: bool = False,
) -> GateResult:
    """The share of the cohort applied and healthy reaches ``threshold`` percent.

    The denominator is the cohort without its unreachable devices (or with them, counted as
    not healthy, when ``unreachable_fails``). Passed once healthy / denominator >= threshold;
    failed once that can no longer happen even if every device still working succeeds;
    pending in between. An empty denominator passes (nothing reachable to wait for) unless
    ``require_healthy`` (the canary: the rollout never goes on without evidence).
    """
    unreachable = 0 if unreachable_fails else counts.unreachable
    failed = counts.failed + (counts.unreachable if unreachable_fails else 0)
    base = counts.total - unreachable
    needed = math.ceil(_exact(threshold) * base / 100)
    if require_healthy:
        needed = max(needed, 1)
    if base == 0 and needed == 0:
        return GateResult(
            name=SUCCESS,
            status="passed",
            threshold=threshold,
            reason=f"no reachable device ({counts.unreachable} unreachable, left out)",
        )
    value = _pct(counts.healthy, base) if base else None
    shown = f"{counts.healthy}/{base} healthy"
    working = base - counts.healthy - failed
    if counts.healthy >= needed:
        status, why = "passed", f"{shown} (needs {needed})"
    elif counts.healthy + working >= needed:
        status, why = "pending", f"{shown}, {working} still working (needs {needed})"
    else:
        what = "no reachable device" if base == 0 else f"{failed} failed"
        possible = counts.healthy + working
        why = f"{shown}, {what}: at most {possible} can be healthy (needs {needed})"
        status = "failed"
    return GateResult(name=SUCCESS, status=status, value=value, threshold=threshold, reason=why)


def error_threshold_gate(
    failed: int, finished: int, threshold: float, min_finished: int
) -> GateResult:
    """Failed among finished devices stays at or below ``threshold`` percent; not evaluated
    (pending) before ``min_finished`` devices have finished."""
    if finished < min_finished:
        return GateResult(
            name=ERROR_THRESHOLD,
            status="pending",
            value=_pct(failed, finished) if finished else None,
            threshold=threshold,
            reason=f"{finished} finished; evaluated from {min_finished} finished",
        )
    share = Fraction(100 * failed, finished)
    passed = share <= _exact(threshold)
    relation = "<=" if passed else ">"
    return GateResult(
        name=ERROR_THRESHOLD,
        status="passed" if passed else "failed",
        value=float(share),
        threshold=threshold,
        reason=f"{failed}/{finished} finished failed ({_fmt(float(share))}% {relation} "
        f"{_fmt(threshold)}%)",
    )


def max_failures_gate(failed: int, limit: int) -> GateResult:
    """At most ``limit`` devices failed."""
    passed = failed <= limit
    return GateResult(
        name=MAX_FAILURES,
        status="passed" if passed else "failed",
        value=float(failed),
        threshold=float(limit),
        reason=f"{failed} failed ({'<=' if passed else '>'} {limit} tolerated)",
    )


def health_gate(
    canary: Mapping[HealthKey, HealthFigures],
    baseline: Mapping[HealthKey, HealthFigures],
    analysis: HealthAnalysis,
) -> GateResult:
    """One evaluation of the canary cohort against the baseline cohort.

    Figures are summed per (profile, model) over the same window. A pair is compared when
    both sides served at least ``min_requests``: the canary's p95 must not exceed the
    baseline's times ``latency_tolerance`` plus ``latency_margin_ms``, and its error rate
    not the baseline's times ``error_rate_tolerance`` plus ``error_rate_margin``. Failed if
    any comparison fails; passed if at least one pair was compared; pending (no data)
    otherwise. ``value`` is the worst canary/baseline p95 ratio, ``threshold`` the
    tolerance; ``checks`` hold every comparison.
    """
    wanted = set(analysis.models)
    checks: list[GateResult] = []
    worst: float | None = None
    short: list[str] = []
    for key in sorted(canary):
        profile, model = key
        if wanted and model not in wanted:
            continue
        label = f"{profile or '(no profile)'}/{model}"
        new, old = canary[key], baseline.get(key, HealthFigures())
        if new.requests < analysis.min_requests or old.requests < analysis.min_requests:
            short.append(
                f"{label}: {new.requests} canary / {old.requests} baseline requests "
                f"(needs {analysis.min_requests} each)"
            )
            continue
        latency = _latency_check(label, new, old, analysis)
        if latency is not None:
            checks.append(latency)
            if latency.value is not None:
                worst = latency.value if worst is None else max(worst, latency.value)
        checks.append(_error_rate_check(label, new, old, analysis))
    if not checks:
        why = "; ".join(short) if short else "no canary figures in the window"
        return GateResult(
            name=HEALTH,
            status="pending",
            threshold=analysis.latency_tolerance,
            reason=f"no data: {why}",
        )
    failed = [c for c in checks if c.status == "failed"]
    reason = "; ".join(c.reason for c in failed) if failed else f"{len(checks)} checks passed"
    return GateResult(
        name=HEALTH,
        status="failed" if failed else "passed",
        value=worst,
        threshold=analysis.latency_tolerance,
        reason=reason,
        checks=tuple(checks),
    )


def _latency_check(
    label: str, new: HealthFigures, old: HealthFigures, analysis: HealthAnalysis
) -> GateResult | None:
    new_p95, old_p95 = new.latency_p95_ms, old.latency_p95_ms
    if new_p95 is None or old_p95 is None:
        return None
    allowed = old_p95 * analysis.latency_tolerance + analysis.latency_margin_ms
    if old_p95 > 0:
        ratio = new_p95 / old_p95
    elif new_p95 == 0:
        ratio = 1.0
    else:
        ratio = math.inf
    passed = new_p95 <= allowed
    return GateResult(
        name=f"latency {label}",
        status="passed" if passed else "failed",
        value=ratio,
        threshold=analysis.latency_tolerance,
        reason=f"{label}: p95 {new_p95:.1f} ms vs baseline {old_p95:.1f} ms "
        f"({ratio:.2f}x, allowed {allowed:.1f} ms)",
    )


def _error_rate_check(
    label: str, new: HealthFigures, old: HealthFigures, analysis: HealthAnalysis
) -> GateResult:
    new_rate = new.errors / new.requests
    old_rate = old.errors / old.requests
    allowed = old_rate * analysis.error_rate_tolerance + analysis.error_rate_margin
    passed = new_rate <= allowed
    return GateResult(
        name=f"error_rate {label}",
        status="passed" if passed else "failed",
        value=new_rate,
        threshold=allowed,
        reason=f"{label}: error rate {new_rate:.2%} vs baseline {old_rate:.2%} "
        f"(allowed {allowed:.2%})",
    )

"""Rollout gates as pure functions, at their edges; maintenance windows; spec parsing."""

from __future__ import annotations

from datetime import datetime
from fractions import Fraction
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from contract.errors import ManifestError
from contract.manifests import ModelSetRef
from hub.errors import HubError, RolloutError
from hub.rollout.gates import (
    Counts,
    error_threshold_gate,
    health_gate,
    max_failures_gate,
    success_gate,
)
from hub.rollout.model import (
    HealthAnalysis,
    HealthFigures,
    RolloutSpec,
    load_spec,
    parse_duration,
    parse_percent,
)
from hub.rollout.windows import MaintenanceWindow, any_open, next_open, parse_cron

# --- success threshold -----------------------------------------------------------------------


def test_success_threshold_exactly_met_passes() -> None:
    result = success_gate(Counts(total=10, healthy=9, failed=0), 90)
    assert result.status == "passed"
    assert result.value == 90.0
    assert result.threshold == 90


def test_success_threshold_one_short_is_pending() -> None:
    result = success_gate(Counts(total=10, healthy=8, failed=0), 90)
    assert result.status == "pending"
    assert "2 still working" in result.reason


def test_devices_still_working_count_toward_neither_side() -> None:
    # 1 healthy, 1 failed, 8 working: at 10% the one healthy device is enough ...
    assert success_gate(Counts(total=10, healthy=1, failed=1), 10).status == "passed"
    # ... and at 90% the gate waits: the working devices may still make it.
    assert success_gate(Counts(total=10, healthy=1, failed=1), 90).status == "pending"
    # Working devices are not failures: none healthy yet is pending, not failed.
    assert success_gate(Counts(total=10), 100).status == "pending"


def test_success_gate_fails_once_the_threshold_cannot_be_reached() -> None:
    assert success_gate(Counts(total=10, healthy=8, failed=1), 90).status == "pending"
    result = success_gate(Counts(total=10, healthy=8, failed=2), 90)
    assert result.status == "failed"
    assert result.reason == "8/10 healthy, 2 failed: at most 8 can be healthy (needs 9)"
    assert success_gate(Counts(total=4, healthy=0, failed=1), 100).status == "failed"


def test_unreachable_devices_are_left_out_or_counted_as_failed() -> None:
    counts = Counts(total=10, healthy=8, unreachable=2)
    left_out = success_gate(counts, 100)
    assert left_out.status == "passed"
    assert left_out.value == 100.0
    counted = success_gate(counts, 100, unreachable_fails=True)
    assert counted.status == "failed"
    assert counted.value == 80.0


def test_every_device_unreachable_passes_a_batch_but_not_a_canary() -> None:
    counts = Counts(total=3, unreachable=3)
    batch = success_gate(counts, 100)
    assert batch.status == "passed"
    assert "3 unreachable" in batch.reason
    canary = success_gate(counts, 100, require_healthy=True)
    assert canary.status == "failed"
    assert "no reachable device" in canary.reason


def test_empty_cohort_passes_the_success_gate() -> None:
    assert success_gate(Counts(), 100).status == "passed"


def test_require_healthy_needs_one_even_at_a_low_threshold() -> None:
    assert success_gate(Counts(total=5, failed=0), 1, require_healthy=True).status == "pending"
    assert success_gate(Counts(total=5, healthy=1), 1, require_healthy=True).status == "passed"


@settings(max_examples=150, deadline=None)
@given(
    total=st.integers(0, 60),
    data=st.data(),
    threshold=st.sampled_from([1, 10, 12.5, 33.3, 50, 66.7, 75, 90, 99.9, 100]),
)
def test_success_gate_matches_its_definition(
    total: int, data: st.DataObject, threshold: float
) -> None:
    healthy = data.draw(st.integers(0, total))
    failed = data.draw(st.integers(0, total - healthy))
    unreachable = data.draw(st.integers(0, total - healthy - failed))
    counts = Counts(total=total, healthy=healthy, failed=failed, unreachable=unreachable)
    result = success_gate(counts, threshold)
    base = total - unreachable
    met = healthy * 100 >= Fraction(str(threshold)) * base
    reachable = (base - failed) * 100 >= Fraction(str(threshold)) * base
    expected = "passed" if met else ("pending" if reachable else "failed")
    assert result.status == expected


# --- error threshold and max failures --------------------------------------------------------


def test_error_threshold_not_evaluated_before_min_finished() -> None:
    result = error_threshold_gate(failed=4, finished=4, threshold=10, min_finished=5)
    assert result.status == "pending"
    assert result.value == 100.0
    assert "evaluated from 5 finished" in result.reason
    assert error_threshold_gate(0, 0, 10, 1).status == "pending"


def test_error_threshold_evaluated_at_exactly_min_finished() -> None:
    assert error_threshold_gate(failed=4, finished=5, threshold=10, min_finished=5).status == (
        "failed"
    )
    assert error_threshold_gate(failed=0, finished=5, threshold=10, min_finished=5).status == (
        "passed"
    )


def test_error_threshold_exactly_at_the_threshold_is_tolerated() -> None:
    at = error_threshold_gate(failed=1, finished=10, threshold=10, min_finished=1)
    assert at.status == "passed"
    assert at.value == 10.0
    above = error_threshold_gate(failed=2, finished=10, threshold=10, min_finished=1)
    assert above.status == "failed"
    assert "20% > 10%" in above.reason


def test_error_threshold_zero_tolerates_no_failure() -> None:
    assert error_threshold_gate(0, 3, 0, 1).status == "passed"
    assert error_threshold_gate(1, 300, 0, 1).status == "failed"


def test_error_threshold_is_exact_for_fractional_thresholds() -> None:
    # 1/3 is 33.333...%: above a 33.3% threshold, at or below 33.34%.
    assert error_threshold_gate(1, 3, 33.3, 1).status == "failed"
    assert error_threshold_gate(1, 3, 33.34, 1).status == "passed"


def test_max_failures_is_absolute() -> None:
    assert max_failures_gate(failed=2, limit=2).status == "passed"
    result = max_failures_gate(failed=3, limit=2)
    assert result.status == "failed"
    assert (result.value, result.threshold) == (3.0, 2.0)
    assert max_failures_gate(0, 0).status == "passed"
    assert max_failures_gate(1, 0).status == "failed"


# --- health analysis -------------------------------------------------------------------------

ANALYSIS = HealthAnalysis(min_requests=50, latency_tolerance=1.5, max_missing_data=2)


def figures(requests: int, p95: float | None, errors: int = 0) -> HealthFigures:
    return HealthFigures.from_p95(requests, errors, p95)


def test_canary_three_times_slower_fails() -> None:
    result = health_gate(
        {("rpi4", "det"): figures(200, 36.0)}, {("rpi4", "det"): figures(400, 12.0)}, ANALYSIS
    )
    assert result.status == "failed"
    assert result.value == pytest.approx(3.0)
    assert result.threshold == 1.5
    assert "3.00x" in result.reason
    assert {c.name: c.status for c in result.checks} == {
        "latency rpi4/det": "failed",
        "error_rate rpi4/det": "passed",
    }


def test_canary_within_tolerance_passes() -> None:
    result = health_gate(
        {("rpi4", "det"): figures(200, 17.9)}, {("rpi4", "det"): figures(400, 12.0)}, ANALYSIS
    )
    assert result.status == "passed"
    exactly = health_gate(
        {("rpi4", "det"): figures(200, 18.0)}, {("rpi4", "det"): figures(400, 12.0)}, ANALYSIS
    )
    assert exactly.status == "passed"


def test_no_baseline_data_or_no_canary_data_is_pending() -> None:
    no_baseline = health_gate({("rpi4", "det"): figures(200, 12.0)}, {}, ANALYSIS)
    assert no_baseline.status == "pending"
    assert no_baseline.reason.startswith("no data")
    no_canary = health_gate({}, {("rpi4", "det"): figures(200, 12.0)}, ANALYSIS)
    assert no_canary.status == "pending"
    too_few = health_gate(
        {("rpi4", "det"): figures(49, 99.0)}, {("rpi4", "det"): figures(400, 12.0)}, ANALYSIS
    )
    assert too_few.status == "pending"
    assert "needs 50 each" in too_few.reason


def test_baseline_of_another_profile_is_not_compared() -> None:
    result = health_gate(
        {("rpi4", "det"): figures(200, 36.0)}, {("jetson", "det"): figures(400, 12.0)}, ANALYSIS
    )
    assert result.status == "pending"


def test_error_rate_against_a_clean_baseline_uses_the_margin() -> None:
    baseline = {("p", "m"): figures(1000, 10.0, errors=0)}
    within = health_gate({("p", "m"): figures(1000, 10.0, errors=10)}, baseline, ANALYSIS)
    assert within.status == "passed"  # 1% <= 0% x 2 + 1%
    above = health_gate({("p", "m"): figures(1000, 10.0, errors=11)}, baseline, ANALYSIS)
    assert above.status == "failed"
    assert "error rate 1.10%" in above.reason


def test_error_rate_is_compared_even_without_latency() -> None:
    result = health_gate(
        {("p", "m"): figures(100, None, errors=50)}, {("p", "m"): figures(100, None)}, ANALYSIS
    )
    assert result.status == "failed"
    assert [c.name for c in result.checks] == ["error_rate p/m"]


def test_health_models_filter() -> None:
    analysis = HealthAnalysis(models=["cls"])
    result = health_gate(
        {("p", "det"): figures(200, 90.0), ("p", "cls"): figures(200, 5.0)},
        {("p", "det"): figures(200, 10.0), ("p", "cls"): figures(200, 5.0)},
        analysis,
    )
    assert result.status == "passed"
    assert all("cls" in c.name for c in result.checks)


def test_health_figures_add_up_weighted() -> None:
    total = figures(100, 10.0) + figures(300, 20.0, errors=3)
    assert total.requests == 400
    assert total.latency_p95_ms == pytest.approx(17.5)
    assert total.error_rate == pytest.approx(0.0075)
    assert HealthFigures().latency_p95_ms is None
    assert HealthFigures().error_rate is None


# --- maintenance windows ---------------------------------------------------------------------


def ts(text: str, zone: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


def test_cron_fields() -> None:
    cron = parse_cron("*/15 1-4 * jan,JUL mon-fri")
    assert cron.minutes == frozenset({0, 15, 30, 45})
    assert cron.hours == frozenset({1, 2, 3, 4})
    assert cron.months == frozenset({1, 7})
    assert cron.weekdays == frozenset({1, 2, 3, 4, 5})
    assert parse_cron("0 0 * * 7").weekdays == frozenset({0})
    assert parse_cron("5/20 * * * *").minutes == frozenset({5, 25, 45})
    assert parse_cron("0 0 1-10/3 * *").days == frozenset({1, 4, 7, 10})


def test_cron_day_of_month_or_day_of_week_when_both_given() -> None:
    cron = parse_cron("0 12 1 * mon")
    # 2024-01-01 is a Monday and the 1st; 2024-01-08 a Monday; 2024-02-01 a Thursday.
    for day in ("2024-01-01", "2024-01-08", "2024-02-01"):
        assert cron.matches(datetime.fromisoformat(f"{day}T12:00"))
    assert not cron.matches(datetime.fromisoformat("2024-01-09T12:00"))
    only_dow = parse_cron("0 12 * * mon")
    assert not only_dow.matches(datetime.fromisoformat("2024-02-01T12:00"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("* * * *", "has 4 fields"),
        ("60 * * * *", "minute: 60 is outside 0-59"),
        ("* 5-1 * * *", "runs backwards"),
        ("*/0 * * * *", "step '0'"),
        ("* * L * *", "'L' is not a number"),
        ("* * * * mon#2", "not a number"),
        ("* * * foo *", "or a name (jan-dec)"),
        ("1,,2 * * * *", "empty list item"),
    ],
)
def test_cron_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_cron(text)


def test_window_in_a_time_zone_follows_daylight_saving() -> None:
    window = MaintenanceWindow(cron="* 2-3 * * *", timezone="Europe/Berlin")
    # Winter: 02:30 Berlin is 01:30 UTC; summer: 00:30 UTC.
    assert window.is_open(ts("2024-01-15T02:30", "Europe/Berlin"))
    assert window.is_open(ts("2024-01-15T01:30"))
    assert not window.is_open(ts("2024-01-15T03:30"))  # 04:30 in Berlin
    assert window.is_open(ts("2024-07-15T00:30"))
    assert not window.is_open(ts("2024-07-15T01:30", "Europe/Berlin"))
    # 2024-03-31 02:00-02:59 does not exist in Berlin: only 03:00-03:59 is open that night.
    assert window.is_open(ts("2024-03-31T01:15"))  # 03:15 CEST
    assert not window.is_open(ts("2024-03-31T00:59"))  # 01:59 CET


def test_window_with_duration() -> None:
    window = MaintenanceWindow(cron="0 22 * * sat", timezone="UTC", duration_s=3 * 3600)
    assert window.is_open(ts("2024-06-01T22:00"))  # a Saturday
    assert window.is_open(ts("2024-06-02T00:59:59"))
    assert not window.is_open(ts("2024-06-02T01:00"))
    assert not window.is_open(ts("2024-06-01T21:59:59"))


def test_no_window_means_always_open_and_next_open() -> None:
    assert any_open([], 0.0)
    window = MaintenanceWindow(cron="30 3 * * *")
    now = ts("2024-06-01T12:00:10")
    assert not any_open([window], now)
    assert next_open([window], now) == ts("2024-06-02T03:30")
    assert next_open([window], ts("2024-06-02T03:30:20")) == ts("2024-06-02T03:30:20")
    never = MaintenanceWindow(cron="0 0 30 2 *")
    assert next_open([never], now) is None


def test_window_validation() -> None:
    with pytest.raises(ValidationError, match="unknown time zone"):
        MaintenanceWindow(cron="* * * * *", timezone="Mars/Olympus")
    with pytest.raises(ValidationError, match="has 6 fields"):
        MaintenanceWindow(cron="0 * * * * *")
    assert MaintenanceWindow(cron="  0   2 * *   * ").cron == "0 2 * * *"


# --- the spec --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(90, 90.0), ("90", 90.0), ("45s", 45.0), ("10m", 600.0), ("1h30m", 5400.0),
     ("1.5h", 5400.0), ("2d", 172800.0), ("250ms", 0.25), (" 1h 5s ", 3605.0)],
)  # fmt: skip
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10x", "m10", "-5", "1h-2m", True, None, "nan"])
def test_parse_duration_refuses(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_parse_percent() -> None:
    assert parse_percent("12.5%") == 12.5
    assert parse_percent(10) == 10.0
    with pytest.raises(ValueError):
        parse_percent("ten")


def spec_data(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {"name": "r", "policy": "base", "target": "2"}
    data.update(overrides)
    return data


def test_spec_defaults_and_shorthands() -> None:
    spec = RolloutSpec.model_validate(
        spec_data(cohorts={"canary": "1%", "batches": "25, 50,100", "bake_s": "10m"})
    )
    assert spec.cohorts.canary is not None and spec.cohorts.canary.percent == 1.0
    assert [b.percent for b in spec.cohorts.batches] == [25.0, 50.0, 100.0]
    assert spec.cohorts.bake_s == 600.0
    assert spec.gates.success_threshold == 100.0
    assert spec.promotes
    counted = RolloutSpec.model_validate(spec_data(cohorts={"canary": 3}))
    assert counted.cohorts.canary is not None and counted.cohorts.canary.count == 3
    assert [b.percent for b in counted.cohorts.batches] == [100.0]


def test_per_cohort_bake() -> None:
    spec = RolloutSpec.model_validate(
        spec_data(
            cohorts={
                "canary": {"count": 1, "bake_s": "1h"},
                "batches": [{"percent": 50, "bake_s": 5}, 100],
                "bake_s": 60,
            }
        )
    )
    assert [spec.cohorts.bake_of(i) for i in range(3)] == [3600.0, 5.0, 60.0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cohorts": {"batches": [50, 25, 100]}}, "increase strictly"),
        ({"cohorts": {"batches": [25, 50]}}, "last batch must be 100"),
        ({"cohorts": {"batches": [0, 100]}}, "greater than 0"),
        ({"cohorts": {"canary": {"count": 1, "percent": 5}}}, "either a count or a percent"),
        ({"health": {}}, "give a canary"),
        ({"promote": True, "selector": {"labels": {"site": "a"}}}, "promote would move"),
        ({"gates": {"success_threshold": 101}}, "less than or equal to 100"),
        ({"device_timeout_s": 0}, "greater than 0"),
        ({"surprise": 1}, "Extra inputs"),
    ],
)
def test_spec_refuses(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RolloutSpec.model_validate(spec_data(**overrides))


def test_bind_sets_the_baseline_and_refuses_nonsense() -> None:
    spec = RolloutSpec.model_validate(spec_data())
    with pytest.raises(RolloutError, match="bind it"):
        _ = spec.target_ref
    bound = spec.bind("base", ModelSetRef(name="ocr", version="1"))
    assert bound.baseline == ModelSetRef(name="ocr", version="1")
    assert bound.target_ref == ModelSetRef(name="ocr", version="2")
    assert bound.bind("base", ModelSetRef(name="ocr", version="1")) == bound
    with pytest.raises(RolloutError, match="was bound to"):
        bound.bind("base", ModelSetRef(name="ocr", version="0"))
    with pytest.raises(RolloutError, match="not other"):
        spec.bind("other", ModelSetRef(name="ocr", version="1"))
    with pytest.raises(RolloutError, match="nothing to roll out"):
        spec.bind("base", ModelSetRef(name="ocr", version="2"))
    other_set = RolloutSpec.model_validate(spec_data(model_set="ocr-lite")).bind(
        "base", ModelSetRef(name="ocr", version="2")
    )
    assert other_set.target_ref == ModelSetRef(name="ocr-lite", version="2")
    assert isinstance(RolloutError("x"), HubError)


def test_load_spec_from_yaml() -> None:
    text = """\
schema: edgefleet.rollout/1
name: ocr-2
policy: base
target: "2.0"
selector: {labels: {site: lab}}
cohorts:
  canary: {count: 2, bake_s: 30m}
  batches: [25, 50, 100]
  bake_s: 10m
gates: {success_threshold: 95%, error_threshold: 5, min_finished: 10, max_failures: 3}
health: {window_s: 5m, interval_s: 1m, latency_tolerance: 1.5}
device_timeout_s: 30m
cohort_timeout_s: 2h
offline: {grace_s: 15m, unreachable_fails: false}
windows:
  - {cron: "* 1-4 * * *", timezone: Europe/Berlin}
only_when_idle: true
on_failure: hold
"""
    spec = load_spec(text, "ocr-2.yaml")
    assert spec.gates.success_threshold == 95.0
    assert spec.cohorts.canary is not None and spec.cohorts.canary.bake_s == 1800.0
    assert spec.windows[0].timezone == "Europe/Berlin"
    assert not spec.promotes
    with pytest.raises(ManifestError, match=r"ocr-2.yaml:3"):
        load_spec(text.replace("policy: base", "policy: Base!"), "ocr-2.yaml")

"""``bench/soak.py`` for half a minute: a real broker, hub and agent, rollouts back and forth
while two clients call the inference API.

Only facts are checked (rollouts completed and succeeded, every inference request answered,
telemetry stored, nothing logged as an error, samples taken, the report's shape), never a
slope or a duration: on a shared two-core machine those move with whatever else runs, and
half a minute is far too short to judge a trend. The flatness verdict is the long run's
business (docs/soak.md).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "bench" / "soak.py"

pytestmark = pytest.mark.slow

PROCESSES = ("agent", "hub")
METRICS = ("rss_mb", "fds", "threads")
FIGURES = ("start", "end", "min", "max", "slope_per_hour", "slope_per_cycle", "bound", "flat")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("soak")
    done = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--minutes",
            "0.5",
            "--interval",
            "1",
            "--json",
            "--workdir",
            str(workdir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    # 1 is a legitimate outcome here: half a minute may be judged "not flat" or "too short".
    assert done.returncode in (0, 1), done.stderr[-4000:]
    parsed: dict[str, Any] = json.loads(done.stdout)
    parsed["_stderr"] = done.stderr
    return parsed


def test_report_shape(report: dict[str, Any]) -> None:
    assert report["schema"] == "edgefleet.soak-report/1"
    for key in (
        "ok",
        "problems",
        "options",
        "machine",
        "rollouts",
        "inference",
        "telemetry",
        "samples",
        "metrics",
        "bounds",
        "logs",
        "exit_codes",
    ):
        assert key in report, key
    assert report["options"]["minutes"] == 0.5
    for process in PROCESSES:
        for metric in METRICS:
            figures = report["metrics"][process][metric]
            assert set(FIGURES) <= set(figures), (process, metric, figures)
    assert report["ok"] == (not report["problems"])


def test_only_flatness_can_fail_a_short_run(report: dict[str, Any]) -> None:
    """Anything but a trend verdict is a real failure: a rollout, a request, a log line,
    telemetry, a process exit."""
    other = [
        p for p in report["problems"] if " is not flat" not in p and not p.startswith("too short")
    ]
    assert other == [], report["_stderr"][-4000:]


def test_rollouts_went_back_and_forth(report: dict[str, Any]) -> None:
    rollouts = report["rollouts"]
    assert rollouts["completed"] >= 2
    assert rollouts["succeeded"] == rollouts["started"] == len(rollouts["list"])
    targets = [r["target"] for r in rollouts["list"]]
    assert targets[:2] == ["2.0.0", "1.0.0"]
    assert all(r["phase"] == "succeeded" for r in rollouts["list"])


def test_inference_was_answered(report: dict[str, Any]) -> None:
    inference = report["inference"]
    assert inference["requests"] > 0
    assert inference["succeeded"] > 0
    assert inference["failed"] == 0, inference["failed_by_status"]
    assert inference["succeeded"] + inference["refused"] == inference["requests"]
    # The classifier answered from both model sets: the swaps happened under load.
    assert set(inference["versions_served"]["cls"]) == {"1.0.0", "1.1.0"}


def test_telemetry_reached_the_hub(report: dict[str, Any]) -> None:
    telemetry = report["telemetry"]
    assert telemetry["published"] > 0
    assert telemetry["missing"] == 0
    assert telemetry["stored"] >= telemetry["published"]


def test_nothing_logged_an_error_and_everything_stopped(report: dict[str, Any]) -> None:
    for name in PROCESSES:
        assert report["logs"][name]["errors"] == [], report["logs"][name]
    assert report["exit_codes"], report["exit_codes"]
    assert all(code == 0 for code in report["exit_codes"].values()), report["exit_codes"]


def test_samples_were_taken(report: dict[str, Any]) -> None:
    samples = report["samples"]
    assert samples["count"] >= 5
    assert len(samples["series"]) == samples["count"]
    first = samples["series"][0]
    for process in PROCESSES:
        for metric in METRICS:
            assert first[f"{process}_{metric}"] > 0


# --- the verdict, on made-up series (no process, no clock) --------------------------------------


@functools.cache
def _soak_module() -> Any:
    """bench/soak.py as a module (``bench/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("edgefleet_bench_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _series(values: Callable[[float], float], *, seconds: int = 600, every: int = 2) -> list[Any]:
    soak = _soak_module()
    return [
        soak.Sample(float(t), 0, {"agent": {"rss_mb": values(t), "fds": values(t), "threads": 0}})
        for t in range(0, seconds, every)
    ]


def _figures(samples: list[Any], metric: str, cycle_s: float = 6.0) -> dict[str, Any]:
    figures: dict[str, Any] = _soak_module().metric_figures(samples, "agent", metric, cycle_s)
    return figures


def test_noisy_but_flat_memory_is_flat() -> None:
    rng = random.Random(1)
    samples = _series(lambda t: 220 + rng.gauss(0, 10))
    figures = _figures(samples, "rss_mb")
    assert figures["flat"] is True
    assert figures["bound_effective"] > figures["bound"]["per_hour"]


def test_steady_growth_is_not_flat_even_under_the_noise_bound() -> None:
    rng = random.Random(2)
    samples = _series(lambda t: 166 + 35 * t / 3600 + rng.gauss(0, 0.3))
    figures = _figures(samples, "rss_mb")
    assert figures["flat"] is False
    assert figures["slope_per_hour"] == pytest.approx(35, abs=3)


def test_one_descriptor_kept_per_cycle_is_not_flat() -> None:
    assert _figures(_series(lambda t: 21 + t // 6), "fds")["flat"] is False
    assert _figures(_series(lambda t: 21.0), "fds")["flat"] is True
    # A descriptor open now and then (a download, a connection) averages out.
    assert _figures(_series(lambda t: 21 + (t % 30 == 0)), "fds")["flat"] is True

"""Pressure shedding: hot or short of memory, lowest priority first; back with hysteresis."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.config import load_config
from agent.daemon import Agent
from agent.errors import ModelUnavailable
from agent.pressure import Pressure, decide
from agent.probation import find_breach
from agent.stats import StatsSnapshot
from contract.manifests import ModelRuntime, RuntimePolicy
from contract.messages import Event
from contract.signing import SigningKey
from hub.broker import MosquittoBroker
from support.fleet import Tap, agent_toml, desired_state, mqtt_tap, ocr_specs, sha256_of, signed
from support.http_server import ArtifactServer

DEVICE = "hot-dev-1"
PRIORITIES = {"det": 30, "rec": 20, "cls": 10}


def pressure(temp: float | None, available: int = 4000) -> Pressure:
    return Pressure(temperature_c=temp, throttle_c=80.0, available_mb=available, floor_mb=256)


def test_hot_device_sheds_lowest_priority_first() -> None:
    decision = decide(
        pressure(85.0), loaded=PRIORITIES, shed=set(), priorities=PRIORITIES, memory_mb={}
    )
    assert decision.shed == "cls"
    assert "temperature 85.0 C over 80.0 C" in decision.reason


def test_short_of_memory_sheds_too() -> None:
    decision = decide(
        pressure(None, available=100),
        loaded={"det": 30, "rec": 20},
        shed={"cls"},
        priorities=PRIORITIES,
        memory_mb={},
    )
    assert decision.shed == "rec"
    assert "available memory 100 MB under 256 MB" in decision.reason


def test_hysteresis_keeps_models_shed_just_under_the_limit() -> None:
    kwargs = {"loaded": {"det": 30}, "shed": {"cls", "rec"}, "priorities": PRIORITIES}
    assert decide(pressure(78.0), memory_mb={}, **kwargs).restore is None  # type: ignore[arg-type]
    back = decide(pressure(74.0), memory_mb={}, **kwargs)  # type: ignore[arg-type]
    assert back.restore == "rec"


def test_restore_waits_for_memory_headroom() -> None:
    decision = decide(
        pressure(None, available=500),
        loaded={"det": 30},
        shed={"rec"},
        priorities=PRIORITIES,
        memory_mb={"rec": 300},
    )
    assert decision.restore is None


def test_nothing_to_shed_when_nothing_is_loaded() -> None:
    decision = decide(pressure(95.0), loaded={}, shed={"cls"}, priorities=PRIORITIES, memory_mb={})
    assert decision.shed is None and decision.restore is None


def snapshot(requests: int, errors: int, p95: float | None) -> StatsSnapshot:
    total = requests + errors
    return StatsSnapshot(
        window_s=60,
        window_samples=1000,
        requests=requests,
        errors=errors,
        rejected=0,
        error_rate=errors / total if total else None,
        p50_ms=p95,
        p95_ms=p95,
        p99_ms=p95,
        total_requests=requests,
        total_errors=errors,
        total_rejected=0,
    )


def test_probation_judges_error_rate_only_after_the_minimum_sample() -> None:
    policy = RuntimePolicy(max_error_rate=0.1, min_requests_for_probation=20)
    assert find_breach({"m": snapshot(5, 5, 1.0)}, policy) is None
    breach = find_breach({"m": snapshot(15, 5, 1.0)}, policy)
    assert breach is not None and "error rate 25.0%" in breach.message


def test_probation_judges_latency_against_the_model_limit() -> None:
    policy = RuntimePolicy(
        min_requests_for_probation=1, models={"m": ModelRuntime(max_latency_p95_ms=10.0)}
    )
    assert find_breach({"m": snapshot(10, 0, 9.0)}, policy) is None
    breach = find_breach({"m": snapshot(10, 0, 30.0)}, policy)
    assert breach is not None and breach.model == "m"


def test_exactly_at_the_error_limit_is_not_a_breach() -> None:
    policy = RuntimePolicy(max_error_rate=0.25, min_requests_for_probation=4)
    assert find_breach({"m": snapshot(3, 1, 1.0)}, policy) is None


@pytest.fixture
def hot_agent(
    broker: MosquittoBroker, tmp_path: Path, ocr_models: dict[str, Path]
) -> Iterator[tuple[Agent, Tap, Path]]:
    sensor = tmp_path / "temp"
    sensor.write_text("50000\n")
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "hot.yaml").write_text(
        "schema: edgefleet.profile/1\n"
        "name: hot-test\n"
        "description: a test device whose temperature the test sets\n"
        "match: {}\n"
        "budgets: {model_memory_mb: 512, storage_mb: 1024, threads: 2}\n"
        "providers: [CPUExecutionProvider]\n"
        "variant_preference: [fp32]\n"
        f"thermal: {{sensor: {sensor}, throttle_c: 80, critical_c: 90}}\n"
    )
    key = SigningKey.generate()
    config_path = tmp_path / "agent.toml"
    config_path.write_text(
        agent_toml(
            device_id=DEVICE,
            broker=broker,
            state_dir=tmp_path / "state",
            key=key,
            profile="hot-test",
        ).replace('profile = "hot-test"', f'profile = "hot-test"\nprofiles_dir = "{profiles}"')
    )
    config = load_config(config_path, {})
    with ArtifactServer() as files, mqtt_tap(broker, f"edgefleet/v1/dev/{DEVICE}/up/#") as tap:
        for path in ocr_models.values():
            files.add(f"/artifacts/{sha256_of(path)}", path)
        agent = Agent(config, environ={}, pressure_interval_s=0.1)
        agent.start()
        try:
            doc = desired_state(
                DEVICE, 1, ocr_specs(ocr_models), base_urls=[files.url("/artifacts")]
            )
            tap.publish_desired(DEVICE, signed(doc, key))
            tap.wait_for(lambda t: agent.applier.applied_generation == 1, 60, "generation 1")
            yield agent, tap, sensor
        finally:
            agent.stop()


def events(tap: Tap, kind: str) -> list[Event]:
    return [m for m in tap.messages("events") if isinstance(m, Event) and m.kind == kind]


def test_agent_sheds_when_hot_and_restores_when_cool(hot_agent: tuple[Agent, Tap, Path]) -> None:
    agent, tap, sensor = hot_agent
    sensor.write_text("86000\n")
    shed = tap.wait_for(
        lambda t: (found := events(t, "pressure.shed")) and len(found) >= 3 and found,
        30,
        "three models shed",
    )
    assert [e.data["model"] for e in shed[:3]] == ["cls", "rec", "det"]
    with pytest.raises(ModelUnavailable, match=re.escape("shed: temperature 86.0 C over 80.0 C")):
        agent.host.infer("cls", {"x": np.zeros((1, 3, 48, 192), np.float32)})

    sensor.write_text("78000\n")  # under the limit, but not by the margin: stays shed
    tap.wait_for(lambda t: agent.applier.status.shed, 2, "still shed")
    assert not events(tap, "pressure.restored")

    sensor.write_text("60000\n")
    restored = tap.wait_for(
        lambda t: (found := events(t, "pressure.restored")) and len(found) >= 3 and found,
        60,
        "three models restored",
    )
    assert [e.data["model"] for e in restored[:3]] == ["det", "rec", "cls"]
    out = agent.host.infer("cls", {"x": np.zeros((1, 3, 48, 192), np.float32)})
    assert next(iter(out.values())).shape == (1, 2)

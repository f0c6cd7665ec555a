"""The operator's preview: real firmware profiles, recorded facts, the contract's select."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.manifests import ModelSet, Policy
from contract.profile import FirmwareProfile, HardwareFacts
from contract.select import select
from contract.yaml_source import load_model_set, load_policy, load_profile
from hub.plan import PLAN_COLUMNS, DevicePlan, PlanRow, plan_device, render_plan_table
from hub.resolve import DeviceView, Resolution, resolve

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "tests" / "fixtures" / "manifests"
FACTS = ROOT / "tests" / "fixtures" / "facts"


def profile(name: str) -> FirmwareProfile:
    path = ROOT / "firmware-profiles" / f"{name}.yaml"
    return load_profile(path.read_text(), path.name)


def facts(name: str) -> HardwareFacts:
    return HardwareFacts.model_validate(json.loads((FACTS / f"{name}.json").read_text()))


@pytest.fixture(scope="module")
def ocr() -> ModelSet:
    return load_model_set((MANIFESTS / "modelset.yaml").read_text(), "modelset.yaml")


@pytest.fixture(scope="module")
def policies() -> list[Policy]:
    warehouse = load_policy((MANIFESTS / "policy.yaml").read_text(), "policy.yaml")
    servers = warehouse.model_copy(
        update={
            "name": "servers",
            "selector": warehouse.selector.model_copy(
                update={"labels": {}, "profiles": ["x86-64-nvidia-server"]}
            ),
        }
    )
    return [warehouse, servers]


def resolved(device: DeviceView, policies: list[Policy], ocr: ModelSet) -> Resolution:
    return resolve(device, policies, {(ocr.name, ocr.version): ocr})


def test_pi_with_int8_preference_gets_int8(policies: list[Policy], ocr: ModelSet) -> None:
    device = DeviceView("pi-1", {"site": "warehouse"}, "raspberry-pi-4-4gb")
    result = plan_device(
        resolved(device, policies, ocr), profile("raspberry-pi-4-4gb"), facts("raspberry-pi-4-4gb")
    )
    assert result.status == "planned"
    assert result.plan is not None
    det = result.plan.entry("ocr-det")
    assert det.outcome == "chosen"
    assert det.variant == "det-int8"
    assert det.provider == "CPUExecutionProvider"
    assert [c.model for c in result.plan.chosen] == ["ocr-det", "ocr-rec", "ocr-cls"]
    assert "3 of 3 models fit" in result.message


def test_big_server_gets_fp16_on_tensorrt(policies: list[Policy], ocr: ModelSet) -> None:
    device = DeviceView("gpu-1", {}, "x86-64-nvidia-server")
    result = plan_device(
        resolved(device, policies, ocr),
        profile("x86-64-nvidia-server"),
        facts("x86-64-nvidia-server"),
    )
    assert result.plan is not None
    chosen = {c.model: (c.precision, c.provider) for c in result.plan.chosen}
    assert chosen == {
        "ocr-det": ("fp16", "TensorrtExecutionProvider"),
        "ocr-rec": ("fp32", "CPUExecutionProvider"),
        "ocr-cls": ("fp32", "CPUExecutionProvider"),
    }


def test_the_preview_is_what_the_device_computes(policies: list[Policy], ocr: ModelSet) -> None:
    device = DeviceView("pi-1", {"site": "warehouse"}, "raspberry-pi-4-4gb")
    board, seen = profile("raspberry-pi-4-4gb"), facts("raspberry-pi-4-4gb")
    result = plan_device(resolved(device, policies, ocr), board, seen)
    assert result.plan == select(ocr, board, seen)


def test_device_without_facts_is_not_reported(policies: list[Policy], ocr: ModelSet) -> None:
    device = DeviceView("pi-new", {"site": "warehouse"}, "raspberry-pi-4-4gb")
    resolution = resolved(device, policies, ocr)
    result = plan_device(resolution, None, None)
    assert result.status == "not_reported"
    assert result.plan is None
    assert "not reported its facts or profile" in result.message
    only_profile = plan_device(resolution, profile("raspberry-pi-4-4gb"), None)
    assert only_profile.status == "not_reported"
    assert "its facts yet" in only_profile.message
    rows = render_plan_table([result])
    assert [(r.model, r.outcome, r.variant) for r in rows] == [
        ("ocr-cls", "not_reported", None),
        ("ocr-det", "not_reported", None),
        ("ocr-rec", "not_reported", None),
    ]
    assert all(r.policy == "warehouse-ocr" and "no birth" in r.message for r in rows)


def test_unassigned_device(policies: list[Policy], ocr: ModelSet) -> None:
    device = DeviceView("office-1", {"site": "office"}, "raspberry-pi-4-4gb")
    result = plan_device(
        resolved(device, policies, ocr), profile("raspberry-pi-4-4gb"), facts("raspberry-pi-4-4gb")
    )
    assert result.status == "unassigned"
    (row,) = render_plan_table([result])
    assert row.outcome == "unassigned"
    assert row.model is None
    assert row.profile == "raspberry-pi-4-4gb"


def test_table_rows_show_choices_and_skips(policies: list[Policy], ocr: ModelSet) -> None:
    device = DeviceView("pi-1", {"site": "warehouse"}, "raspberry-pi-4-4gb")
    squeezed = facts("raspberry-pi-4-4gb").model_copy(update={"memory_available_mb": 256 + 100})
    planned = plan_device(resolved(device, policies, ocr), profile("raspberry-pi-4-4gb"), squeezed)
    rows = render_plan_table([planned])
    assert [r.device for r in rows] == ["pi-1"] * 3
    det, rec, cls = rows[:3]
    assert det == PlanRow(
        device="pi-1",
        profile="raspberry-pi-4-4gb",
        model="ocr-det",
        version="4.0",
        policy="warehouse-ocr",
        outcome="chosen",
        variant="det-int8",
        precision="int8",
        provider="CPUExecutionProvider",
        memory_mb=90,
        reason=None,
        message=det.message,
    )
    assert (rec.outcome, rec.reason, rec.variant) == ("skipped", "does_not_fit_memory", None)
    assert "300 MB" in rec.message
    assert (cls.outcome, cls.reason) == ("skipped", "does_not_fit_memory")
    assert list(det.as_dict()) == list(PLAN_COLUMNS)
    json.dumps([r.as_dict() for r in rows])


def test_device_plan_keeps_its_resolution(policies: list[Policy], ocr: ModelSet) -> None:
    device = DeviceView("pi-1", {"site": "warehouse"}, "raspberry-pi-4-4gb")
    resolution = resolved(device, policies, ocr)
    result = plan_device(resolution, None, facts("raspberry-pi-4-4gb"))
    assert isinstance(result, DevicePlan)
    assert result.resolution is resolution
    assert result.device_id == "pi-1"
    assert "its profile yet" in result.message


def test_device_without_a_birth_is_not_reported_even_when_no_policy_applies_yet(
    policies: list[Policy], ocr: ModelSet
) -> None:
    # Policies select by profile, and a device names its profile only in its birth.
    result = plan_device(
        resolved(DeviceView("pi-3", {"site": "warehouse"}), policies, ocr), None, None
    )
    assert result.status == "not_reported"
    assert "no policy applies to it so far" in result.message
    (row,) = render_plan_table([result])
    assert (row.device, row.model, row.outcome) == ("pi-3", None, "not_reported")


def test_rows_follow_the_given_device_order(policies: list[Policy], ocr: ModelSet) -> None:
    plans = [
        plan_device(
            resolved(DeviceView(name, {"site": "warehouse"}, "raspberry-pi-4-4gb"), policies, ocr),
            None,
            None,
        )
        for name in ("pi-b", "pi-a")
    ]
    assert [r.device for r in render_plan_table(plans)] == ["pi-b"] * 3 + ["pi-a"] * 3

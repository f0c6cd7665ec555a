"""Layered policy resolution: selectors, per-model priority, ties, overrides, determinism."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.errors import EdgefleetError
from contract.manifests import ModelSet, ModelSetRef, ModelSpec, Policy, Selector
from hub.errors import DuplicatePolicy, HubError, MissingModelSet
from hub.resolve import DeviceView, ModelSetKey, resolve, selector_matches


def spec(name: str, version: str = "1", priority: int = 0) -> ModelSpec:
    digest = hashlib.sha256(f"{name}/{version}".encode()).hexdigest()
    return ModelSpec.model_validate(
        {
            "name": name,
            "version": version,
            "priority": priority,
            "variants": [
                {
                    "name": f"{name}-fp32",
                    "precision": "fp32",
                    "artifact": {"sha256": digest, "size": 1},
                    "requires": {"memory_mb": 10},
                }
            ],
        }
    )


def model_set(name: str, version: str, *models: ModelSpec) -> ModelSet:
    return ModelSet.model_validate(
        {"schema": "edgefleet.modelset/1", "name": name, "version": version, "models": models}
    )


def policy(
    name: str,
    set_name: str,
    set_version: str = "1",
    *,
    priority: int = 0,
    selector: Mapping[str, Any] | None = None,
    runtime: Mapping[str, Any] | None = None,
) -> Policy:
    return Policy.model_validate(
        {
            "schema": "edgefleet.policy/1",
            "name": name,
            "priority": priority,
            "selector": dict(selector or {}),
            "model_set": {"name": set_name, "version": set_version},
            "runtime": dict(runtime or {}),
        }
    )


def sets(*items: ModelSet) -> dict[ModelSetKey, ModelSet]:
    return {(s.name, s.version): s for s in items}


PI = DeviceView("pi-1", labels={"site": "warehouse", "ring": "canary"}, profile="rpi4")

BASE = model_set("base", "1", spec("det"), spec("rec"))
BASE_2 = model_set("base", "2", spec("det", "2"), spec("rec", "2"))
EXTRA = model_set("extra", "1", spec("det", "9"), spec("cls"))
SETS = sets(BASE, BASE_2, EXTRA)


# --- selectors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ({}, True),
        ({"labels": {"site": "warehouse"}}, True),
        ({"labels": {"site": "warehouse", "ring": "canary"}}, True),
        ({"labels": {"site": "office"}}, False),
        ({"labels": {"site": "warehouse", "missing": "x"}}, False),
        ({"profiles": ["rpi4", "rpi5"]}, True),
        ({"profiles": ["rpi5"]}, False),
        ({"devices": ["pi-1", "pi-2"]}, True),
        ({"devices": ["pi-2"]}, False),
        ({"labels": {"site": "warehouse"}, "profiles": ["rpi4"], "devices": ["pi-1"]}, True),
        ({"labels": {"site": "warehouse"}, "profiles": ["rpi4"], "devices": ["pi-2"]}, False),
        ({"labels": {"site": "warehouse"}, "profiles": ["rpi5"], "devices": ["pi-1"]}, False),
        ({"labels": {"site": "office"}, "profiles": ["rpi4"], "devices": ["pi-1"]}, False),
    ],
)
def test_selector(selector: dict[str, Any], matches: bool) -> None:
    assert selector_matches(Selector.model_validate(selector), PI) is matches


def test_a_device_without_a_profile_matches_no_profile_selector() -> None:
    bare = DeviceView("new-1")
    assert selector_matches(Selector(), bare)
    assert not selector_matches(Selector(profiles=["rpi4"]), bare)
    assert not selector_matches(Selector(labels={"site": "warehouse"}), bare)


# --- layering -------------------------------------------------------------------------


def test_single_policy_gives_its_set() -> None:
    result = resolve(PI, [policy("base", "base")], SETS)
    assert [m.name for m in result.models] == ["det", "rec"]
    assert result.model_set == ModelSetRef(name="base", version="1")
    assert result.policy == "base"
    assert result.policies == ("base",)
    assert result.source("rec").policy == "base"
    assert not result.warnings


def test_higher_priority_wins_per_model_and_lower_layers_fill_in() -> None:
    policies = [
        policy("base", "base", priority=0),
        policy("extra", "extra", priority=10, selector={"labels": {"ring": "canary"}}),
    ]
    result = resolve(PI, policies, SETS)
    assert {m.name: m.version for m in result.models} == {"cls": "1", "det": "9", "rec": "1"}
    assert result.source("det").policy == "extra"
    assert result.source("det").model_set == ModelSetRef(name="extra", version="1")
    assert result.source("rec").policy == "base"
    assert result.source("cls").policy == "extra"
    assert result.policy == "extra"
    assert result.model_set == ModelSetRef(name="extra", version="1")
    assert result.policies == ("extra", "base")
    assert [m.name for m in result.models] == sorted(m.name for m in result.models)
    assert not result.warnings


def test_non_matching_policy_does_not_layer() -> None:
    policies = [
        policy("base", "base"),
        policy("extra", "extra", priority=10, selector={"labels": {"ring": "stable"}}),
    ]
    result = resolve(PI, policies, SETS)
    assert {m.name: m.version for m in result.models} == {"det": "1", "rec": "1"}
    assert result.policies == ("base",)


def test_runtime_comes_from_the_top_policy_whole() -> None:
    policies = [
        policy("base", "base", runtime={"probation_s": 10, "models": {"rec": {"queue_depth": 2}}}),
        policy("extra", "extra", priority=5, runtime={"probation_s": 99}),
    ]
    result = resolve(PI, policies, SETS)
    assert result.runtime is not None
    assert result.runtime.probation_s == 99
    assert result.runtime.models == {}
    (warning,) = result.warnings
    assert warning.code == "runtime_not_applied"
    assert "rec" in warning.message and "base" in warning.message


def test_tie_is_broken_by_name_and_reported() -> None:
    policies = [policy("zeta", "extra", priority=3), policy("alpha", "base", priority=3)]
    result = resolve(PI, policies, SETS)
    assert result.source("det").policy == "alpha"
    assert result.source("det").version == "1"
    assert result.policy == "alpha"
    ties = [w for w in result.warnings if w.code == "priority_tie"]
    assert len(ties) == 1
    assert "det" in ties[0].message and "alpha, zeta" in ties[0].message


def test_no_tie_warning_for_disjoint_models_at_equal_priority() -> None:
    other = model_set("other", "1", spec("ocr"))
    result = resolve(PI, [policy("a", "base"), policy("b", "other")], {**SETS, **sets(other)})
    assert [m.name for m in result.models] == ["det", "ocr", "rec"]
    assert not result.warnings


def test_nothing_matches_gives_an_empty_resolution() -> None:
    result = resolve(PI, [policy("x", "base", selector={"devices": ["other"]})], SETS)
    assert result.empty
    assert result.device_id == "pi-1"
    assert result.models == ()
    assert result.runtime is None
    assert result.model_set is None
    assert result.policy is None
    assert resolve(PI, [], SETS).empty


# --- overrides (rollouts) -------------------------------------------------------------


def test_override_pins_one_policys_model_set_for_the_device() -> None:
    policies = [policy("base", "base"), policy("extra", "extra", priority=10)]
    pins = {"base": ModelSetRef(name="base", version="2")}
    result = resolve(PI, policies, SETS, overrides=pins)
    assert result.source("rec").version == "2"
    assert result.source("rec").pinned
    assert result.source("rec").model_set == ModelSetRef(name="base", version="2")
    assert result.source("det").policy == "extra"
    assert not result.source("det").pinned
    assert not result.warnings


def test_override_of_the_top_policy_changes_the_reported_model_set() -> None:
    pins = {"base": ModelSetRef(name="base", version="2")}
    result = resolve(PI, [policy("base", "base")], SETS, overrides=pins)
    assert result.model_set == ModelSetRef(name="base", version="2")
    assert {m.version for m in result.models} == {"2"}


def test_unused_overrides_are_reported() -> None:
    policies = [policy("base", "base"), policy("far", "extra", selector={"devices": ["x"]})]
    pins = {
        "far": ModelSetRef(name="extra", version="1"),
        "ghost": ModelSetRef(name="base", version="2"),
    }
    result = resolve(PI, policies, SETS, overrides=pins)
    codes = [(w.code, w.message) for w in result.warnings]
    assert [c for c, _ in codes] == ["override_unused", "override_unused"]
    assert "does not apply" in codes[0][1] and "far" in codes[0][1]
    assert "does not exist" in codes[1][1] and "ghost" in codes[1][1]
    assert {m.version for m in result.models} == {"1"}


def test_missing_model_set_is_an_error() -> None:
    with pytest.raises(MissingModelSet) as caught:
        resolve(PI, [policy("base", "base", "7")], SETS)
    assert caught.value.policy == "base"
    assert not caught.value.pinned
    pins = {"base": ModelSetRef(name="base", version="8")}
    with pytest.raises(MissingModelSet, match="override") as pinned:
        resolve(PI, [policy("base", "base")], SETS, overrides=pins)
    assert pinned.value.pinned
    assert isinstance(pinned.value, HubError)
    assert isinstance(pinned.value, EdgefleetError)


def test_a_missing_set_of_a_policy_that_does_not_apply_is_no_error() -> None:
    far = policy("far", "nowhere", selector={"devices": ["x"]})
    assert not resolve(PI, [policy("base", "base"), far], SETS).empty


def test_duplicate_policy_names_are_refused() -> None:
    with pytest.raises(DuplicatePolicy):
        resolve(PI, [policy("base", "base"), policy("base", "extra", priority=3)], SETS)


# --- determinism ----------------------------------------------------------------------

POOL_SETS = sets(
    BASE,
    BASE_2,
    EXTRA,
    model_set("ocr", "1", spec("det", "3"), spec("cls", "3"), spec("rec", "3")),
    model_set("misc", "1", spec("cls", "4"), spec("layout")),
)
SELECTORS: list[dict[str, Any]] = [
    {},
    {"labels": {"site": "warehouse"}},
    {"labels": {"site": "office"}},
    {"profiles": ["rpi4"]},
    {"devices": ["pi-1"]},
    {"devices": ["pi-2"]},
]


@st.composite
def policy_lists(draw: st.DrawFn) -> list[Policy]:
    names = draw(st.lists(st.sampled_from("abcdefgh"), min_size=0, max_size=6, unique=True))
    return [
        policy(
            name,
            *draw(st.sampled_from(sorted(POOL_SETS))),
            priority=draw(st.integers(0, 2)),
            selector=draw(st.sampled_from(SELECTORS)),
        )
        for name in names
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies=policy_lists(), data=st.data())
def test_resolution_does_not_depend_on_policy_order(
    policies: Sequence[Policy], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(policies))
    first = resolve(PI, policies, POOL_SETS)
    assert resolve(PI, shuffled, POOL_SETS) == first
    assert len({m.name for m in first.models}) == len(first.models)
    applying = [p for p in policies if selector_matches(p.selector, PI)]
    for source in first.sources:
        carriers = [
            p.priority
            for p in applying
            if source.model
            in {m.name for m in POOL_SETS[(p.model_set.name, p.model_set.version)].models}
        ]
        assert source.priority == max(carriers)
    assert first.empty is (not applying)

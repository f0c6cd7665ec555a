"""Variant selection: example cases for each rule and property tests for the guarantees."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.apply import providers_of
from contract.manifests import ModelSpec, Variant
from contract.profile import FirmwareProfile, HardwareFacts, Precision
from contract.select import (
    MEMORY_RESERVE_MB,
    Choice,
    Plan,
    Skip,
    canonical_architecture,
    memory_budget,
    provider_order,
    select,
)
from contract.yaml_source import load_model_set, load_profile

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"
XNNPACK = "XnnpackExecutionProvider"
PROVIDERS = [CPU, CUDA, TRT, XNNPACK]
PRECISIONS: list[Precision] = ["int8", "fp16", "fp32"]
ARCHITECTURES = ["aarch64", "arm64", "x86_64", "riscv64"]

FIXTURES = Path(__file__).parent / "fixtures" / "manifests"
PROPERTY_SETTINGS = settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def variant(
    name: str,
    precision: Precision,
    memory_mb: int,
    providers: Sequence[str] = (CPU,),
    architectures: Sequence[str] = (),
) -> Variant:
    return Variant.model_validate(
        {
            "name": name,
            "precision": precision,
            "artifact": {"sha256": hashlib.sha256(name.encode()).hexdigest(), "size": 1},
            "requires": {
                "architectures": list(architectures),
                "providers": list(providers),
                "memory_mb": memory_mb,
            },
        }
    )


def model(name: str, priority: int, *variants: Variant) -> ModelSpec:
    return ModelSpec(name=name, version="1", priority=priority, variants=list(variants))


def profile(
    budget_mb: int = 1000,
    providers: Sequence[str] = (CPU,),
    preference: Sequence[Precision] = ("int8", "fp16", "fp32"),
) -> FirmwareProfile:
    return FirmwareProfile.model_validate(
        {
            "schema": "edgefleet.profile/1",
            "name": "board",
            "description": "a test board",
            "match": {},
            "budgets": {"model_memory_mb": budget_mb, "storage_mb": 1000, "threads": 2},
            "providers": list(providers),
            "variant_preference": list(preference),
        }
    )


def facts(
    architecture: str = "aarch64",
    providers: Sequence[str] = (CPU,),
    available_mb: int | None = None,
) -> HardwareFacts:
    return HardwareFacts(
        architecture=architecture,
        cpu_count=4,
        memory_total_mb=8192,
        memory_available_mb=available_mb,
        providers=list(providers),
    )


# --- examples ---------------------------------------------------------------------------


def test_wrong_architecture() -> None:
    plan = select(
        [model("det", 1, variant("v", "fp32", 10, architectures=["x86_64"]))], profile(), facts()
    )
    entry = plan.entry("det")
    assert isinstance(entry, Skip)
    assert entry.reason == "wrong_architecture"
    assert entry.message == "no variant runs on aarch64; variants need x86_64"


def test_architecture_aliases_match() -> None:
    assert canonical_architecture("ARM64") == "aarch64"
    assert canonical_architecture("amd64") == "x86_64"
    plan = select(
        [model("det", 1, variant("v", "fp32", 10, architectures=["arm64"]))], profile(), facts()
    )
    assert isinstance(plan.entry("det"), Choice)


def test_provider_missing_on_the_device() -> None:
    spec = model("det", 1, variant("v", "fp16", 10, providers=[CUDA]))
    plan = select([spec], profile(providers=[CUDA, CPU]), facts(providers=[CPU]))
    entry = plan.entry("det")
    assert isinstance(entry, Skip)
    assert entry.reason == "provider_missing"
    assert entry.message == (
        f"variants need {CUDA}; profile board offers {CUDA}, {CPU}, the device has {CPU}"
    )


def test_provider_missing_from_the_profile() -> None:
    spec = model("det", 1, variant("v", "fp16", 10, providers=[CUDA]))
    plan = select([spec], profile(providers=[CPU]), facts(providers=[CUDA, CPU]))
    entry = plan.entry("det")
    assert isinstance(entry, Skip)
    assert entry.reason == "provider_missing"


def test_no_variant_in_a_precision_the_profile_runs() -> None:
    spec = model("det", 1, variant("v", "fp16", 10))
    plan = select([spec], profile(preference=["int8", "fp32"]), facts())
    entry = plan.entry("det")
    assert isinstance(entry, Skip)
    assert entry.reason == "no_variant"
    assert entry.message == (
        "no variant in a precision profile board runs (int8, fp32); runnable variants are fp16"
    )


def test_does_not_fit_memory_names_the_numbers() -> None:
    specs = [
        model("big", 10, variant("b", "fp32", 700)),
        model("huge", 5, variant("h8", "int8", 400), variant("h32", "fp32", 900)),
    ]
    plan = select(specs, profile(budget_mb=1000), facts())
    entry = plan.entry("huge")
    assert isinstance(entry, Skip)
    assert entry.reason == "does_not_fit_memory"
    assert entry.message == (
        "smallest eligible variant h8 needs 400 MB; 300 MB of the 1000 MB budget left"
    )


def test_falls_back_to_a_smaller_variant_before_skipping() -> None:
    spec = model(
        "det",
        1,
        variant("det-int8", "int8", 300),
        variant("det-fp16", "fp16", 120),
        variant("det-fp32", "fp32", 200),
    )
    plan = select([spec], profile(budget_mb=250), facts())
    entry = plan.entry("det")
    assert isinstance(entry, Choice)
    assert (entry.variant, entry.precision, entry.memory_mb) == ("det-fp16", "fp16", 120)
    assert entry.message == "fell back from det-int8 (300 MB): 120 MB of 250 MB left"
    assert plan.used_mb == 120


def test_preference_beats_size_when_both_fit() -> None:
    spec = model("det", 1, variant("a", "fp32", 50), variant("b", "int8", 90))
    plan = select([spec], profile(preference=["int8", "fp32"]), facts())
    entry = plan.entry("det")
    assert isinstance(entry, Choice)
    assert entry.variant == "b"
    assert entry.message == "preferred variant, 90 MB of 1000 MB left"


def test_provider_follows_the_profile_order() -> None:
    spec = model("det", 1, variant("v", "fp16", 10, providers=[CUDA, TRT, CPU]))
    plan = select([spec], profile(providers=[TRT, CUDA, CPU]), facts(providers=[CPU, CUDA]))
    entry = plan.entry("det")
    assert isinstance(entry, Choice)
    assert entry.provider == CUDA


def test_a_session_falls_back_along_the_profile_order() -> None:
    v = variant("v", "fp16", 10, providers=[CUDA, TRT, CPU])
    spec = model("det", 1, v)
    nvidia = profile(providers=[TRT, CUDA, CPU])
    device = facts(providers=[CPU, CUDA, TRT])
    assert provider_order(v, nvidia, device) == [TRT, CUDA, CPU]
    assert provider_order(v, nvidia, facts(providers=[CPU])) == [CPU]
    (choice,) = select([spec], nvidia, device).chosen
    assert providers_of(choice, spec, nvidia) == [TRT, CUDA, CPU]
    # a choice on a lower provider falls back only to the ones after it
    lower = choice.model_copy(update={"provider": CUDA})
    assert providers_of(lower, spec, nvidia) == [CUDA, CPU]


def test_higher_priority_is_kept_over_lower() -> None:
    specs = [
        model("low", 1, variant("l", "fp32", 300)),
        model("high", 10, variant("h", "fp32", 400)),
    ]
    plan = select(specs, profile(budget_mb=500), facts())
    assert [e.model for e in plan.entries] == ["high", "low"]
    assert isinstance(plan.entry("high"), Choice)
    assert isinstance(plan.entry("low"), Skip)


def test_lower_priority_takes_room_a_too_big_higher_one_cannot_use() -> None:
    specs = [
        model("low", 1, variant("l", "fp32", 300)),
        model("high", 10, variant("h", "fp32", 600)),
    ]
    plan = select(specs, profile(budget_mb=500), facts())
    assert isinstance(plan.entry("high"), Skip)
    assert isinstance(plan.entry("low"), Choice)


def test_equal_priorities_are_ordered_by_name() -> None:
    specs = [model("b", 1, variant("vb", "fp32", 300)), model("a", 1, variant("va", "fp32", 300))]
    plan = select(specs, profile(budget_mb=500), facts())
    assert [e.model for e in plan.entries] == ["a", "b"]
    assert isinstance(plan.entry("a"), Choice)


def test_budget_is_capped_by_available_memory_minus_the_reserve() -> None:
    board = profile(budget_mb=2048)
    assert memory_budget(board, facts()) == (2048, "profile board allows 2048 MB")
    budget, note = memory_budget(board, facts(available_mb=1000))
    assert budget == 1000 - MEMORY_RESERVE_MB
    assert (
        note
        == f"1000 MB available minus {MEMORY_RESERVE_MB} MB reserve (profile board allows 2048 MB)"
    )
    assert memory_budget(board, facts(available_mb=100))[0] == 0
    assert memory_budget(board, facts(available_mb=4000))[0] == 2048


def test_a_model_set_and_its_models_give_the_same_plan() -> None:
    model_set = load_model_set((FIXTURES / "modelset.yaml").read_text(), "modelset.yaml")
    board = load_profile((FIXTURES / "profile.yaml").read_text(), "profile.yaml")
    device = facts(providers=["VSINPUExecutionProvider", CPU], available_mb=900)
    plan = select(model_set, board, device)
    assert plan == select(list(model_set.models), board, device)
    assert plan.budget_mb == 900 - MEMORY_RESERVE_MB
    assert [(c.model, c.variant, c.provider) for c in plan.chosen] == [
        ("ocr-det", "det-int8", CPU),
        ("ocr-rec", "rec-fp32", CPU),
        ("ocr-cls", "cls-fp32", CPU),
    ]
    assert plan.used_mb == 90 + 300 + 40


def test_duplicate_model_names_are_refused() -> None:
    specs = [model("a", 1, variant("v", "fp32", 1)), model("a", 2, variant("w", "fp32", 1))]
    with pytest.raises(ValueError, match="duplicate model names: a"):
        select(specs, profile(), facts())


def test_plan_round_trips_through_json() -> None:
    specs = [model("a", 2, variant("v", "fp32", 10)), model("b", 1, variant("w", "fp16", 10))]
    plan = select(specs, profile(preference=["fp32"]), facts())
    text = plan.model_dump_json()
    assert '"outcome":"chosen"' in text
    assert '"reason":"no_variant"' in text
    assert Plan.model_validate_json(text) == plan


# --- properties -------------------------------------------------------------------------


@st.composite
def variants_of(draw: st.DrawFn, model_name: str) -> list[Variant]:
    count = draw(st.integers(1, 4))
    return [
        variant(
            f"{model_name}-v{index}",
            draw(st.sampled_from(PRECISIONS)),
            draw(st.integers(1, 600)),
            providers=draw(
                st.lists(st.sampled_from(PROVIDERS), min_size=1, max_size=3, unique=True)
            ),
            architectures=draw(st.lists(st.sampled_from(ARCHITECTURES), max_size=2, unique=True)),
        )
        for index in range(count)
    ]


@st.composite
def model_lists(draw: st.DrawFn) -> list[ModelSpec]:
    names = draw(st.lists(st.sampled_from([f"m{i}" for i in range(8)]), max_size=6, unique=True))
    return [model(name, draw(st.integers(-2, 2)), *draw(variants_of(name))) for name in names]


@st.composite
def profiles(draw: st.DrawFn) -> FirmwareProfile:
    return profile(
        budget_mb=draw(st.integers(1, 2000)),
        providers=draw(st.lists(st.sampled_from(PROVIDERS), min_size=1, unique=True)),
        preference=draw(st.lists(st.sampled_from(PRECISIONS), min_size=1, unique=True)),
    )


@st.composite
def facts_of(draw: st.DrawFn) -> HardwareFacts:
    return facts(
        architecture=draw(st.sampled_from(["aarch64", "x86_64", "amd64"])),
        providers=draw(st.lists(st.sampled_from(PROVIDERS), unique=True)),
        available_mb=draw(st.none() | st.integers(0, 2500)),
    )


def on_architecture(spec: ModelSpec, device: HardwareFacts) -> list[Variant]:
    arch = canonical_architecture(device.architecture)
    return [
        v
        for v in spec.variants
        if not v.requires.architectures
        or arch in {canonical_architecture(a) for a in v.requires.architectures}
    ]


def with_provider(
    variants: list[Variant], board: FirmwareProfile, device: HardwareFacts
) -> list[Variant]:
    usable = set(board.providers) & set(device.providers)
    return [v for v in variants if usable & set(v.requires.providers)]


def eligible(spec: ModelSpec, board: FirmwareProfile, device: HardwareFacts) -> list[Variant]:
    runnable = with_provider(on_architecture(spec, device), board, device)
    return [v for v in runnable if v.precision in board.variant_preference]


def memory_left_before(plan: Plan) -> list[int]:
    """For each entry, the budget minus what the entries above it took."""
    left, result = plan.budget_mb, []
    for entry in plan.entries:
        result.append(left)
        if isinstance(entry, Choice):
            left -= entry.memory_mb
    return result


@PROPERTY_SETTINGS
@given(model_lists(), profiles(), facts_of())
def test_never_over_budget(
    specs: list[ModelSpec], board: FirmwareProfile, device: HardwareFacts
) -> None:
    plan = select(specs, board, device)
    assert plan.used_mb == sum(choice.memory_mb for choice in plan.chosen)
    assert plan.used_mb <= plan.budget_mb <= board.budgets.model_memory_mb
    if device.memory_available_mb is not None:
        assert plan.budget_mb <= max(0, device.memory_available_mb - MEMORY_RESERVE_MB)


@PROPERTY_SETTINGS
@given(model_lists(), profiles(), facts_of(), st.data())
def test_deterministic_whatever_the_input_order(
    specs: list[ModelSpec], board: FirmwareProfile, device: HardwareFacts, data: st.DataObject
) -> None:
    plan = select(specs, board, device)
    assert select(specs, board, device) == plan
    shuffled = [
        spec.model_copy(update={"variants": data.draw(st.permutations(spec.variants))})
        for spec in data.draw(st.permutations(specs))
    ]
    again = select(shuffled, board, device)
    assert again.model_dump_json() == plan.model_dump_json()
    assert Plan.model_validate_json(plan.model_dump_json()) == plan


@PROPERTY_SETTINGS
@given(model_lists(), profiles(), facts_of())
def test_every_model_once_in_priority_order(
    specs: list[ModelSpec], board: FirmwareProfile, device: HardwareFacts
) -> None:
    plan = select(specs, board, device)
    expected = [s.name for s in sorted(specs, key=lambda s: (-s.priority, s.name))]
    assert [entry.model for entry in plan.entries] == expected


@PROPERTY_SETTINGS
@given(model_lists(), profiles(), facts_of())
def test_never_drops_a_higher_priority_model_to_keep_a_lower_one(
    specs: list[ModelSpec], board: FirmwareProfile, device: HardwareFacts
) -> None:
    """A model skipped for memory could not have fitted even if every lower-priority
    model had been left out: its smallest eligible variant exceeds the budget minus what
    the higher-priority models took. And lower models never change a higher one's outcome:
    planning only the top k models gives the first k entries of the full plan."""
    plan = select(specs, board, device)
    by_name = {spec.name: spec for spec in specs}
    for entry, left in zip(plan.entries, memory_left_before(plan), strict=True):
        if isinstance(entry, Skip) and entry.reason == "does_not_fit_memory":
            smallest = min(
                v.requires.memory_mb for v in eligible(by_name[entry.model], board, device)
            )
            assert smallest > left
    for k in range(len(plan.entries)):
        top = [by_name[entry.model] for entry in plan.entries[:k]]
        assert select(top, board, device).entries == plan.entries[:k]


@PROPERTY_SETTINGS
@given(model_lists(), profiles(), facts_of())
def test_every_skip_reason_matches_the_inputs(
    specs: list[ModelSpec], board: FirmwareProfile, device: HardwareFacts
) -> None:
    plan = select(specs, board, device)
    by_name = {spec.name: spec for spec in specs}
    for entry, left in zip(plan.entries, memory_left_before(plan), strict=True):
        spec = by_name[entry.model]
        on_arch = on_architecture(spec, device)
        runnable = with_provider(on_arch, board, device)
        fitting = [v for v in eligible(spec, board, device) if v.requires.memory_mb <= left]
        if isinstance(entry, Choice):
            assert fitting
            continue
        assert not fitting
        if entry.reason == "wrong_architecture":
            assert not on_arch
        elif entry.reason == "provider_missing":
            assert on_arch
            assert not runnable
        elif entry.reason == "no_variant":
            assert runnable
            assert not eligible(spec, board, device)
        else:
            assert entry.reason == "does_not_fit_memory"
            assert eligible(spec, board, device)
            assert str(left) in entry.message


@PROPERTY_SETTINGS
@given(model_lists(), profiles(), facts_of())
def test_choice_is_the_best_fitting_variant_on_the_best_provider(
    specs: list[ModelSpec], board: FirmwareProfile, device: HardwareFacts
) -> None:
    plan = select(specs, board, device)
    by_name = {spec.name: spec for spec in specs}
    for entry, left in zip(plan.entries, memory_left_before(plan), strict=True):
        if not isinstance(entry, Choice):
            continue
        spec = by_name[entry.model]
        chosen = next(v for v in spec.variants if v.name == entry.variant)
        assert chosen in eligible(spec, board, device)
        assert (entry.precision, entry.memory_mb, entry.sha256, entry.version) == (
            chosen.precision,
            chosen.requires.memory_mb,
            chosen.artifact.sha256,
            spec.version,
        )
        assert entry.provider in board.providers
        assert entry.provider in device.providers
        assert entry.provider in chosen.requires.providers
        earlier = board.providers[: board.providers.index(entry.provider)]
        assert not set(earlier) & set(device.providers) & set(chosen.requires.providers)
        rank = board.variant_preference.index
        for other in eligible(spec, board, device):
            if other.requires.memory_mb <= left:
                assert (rank(chosen.precision), chosen.requires.memory_mb, chosen.name) <= (
                    rank(other.precision),
                    other.requires.memory_mb,
                    other.name,
                )

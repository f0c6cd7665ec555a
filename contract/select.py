"""Which variant of each model a device runs, on which execution provider, within its memory.

The hub's preview and the agent's own choice both call ``select``, so what an operator sees
is what the device does. Rules, in order:

1. Models are considered by priority, higher first; equal priorities by name.
2. A variant is *eligible* when its architectures (empty: any) include the device's, one
   of its providers is offered by both the profile and the device, and its precision is
   one the profile lists in ``variant_preference`` (a profile lists only the precisions
   its device runs well).
3. The provider is the first of the profile's providers that the variant supports and
   the device has.
4. Eligible variants rank by the profile's precision preference, then smaller memory,
   then name. The first that fits the memory still left is chosen, so a model whose
   preferred variant is too big falls back to a smaller one before it is skipped.
5. Greedy: a model's choice depends only on the models above it, so a lower-priority
   model can never push out a higher-priority one.

The memory budget is the profile's ``model_memory_mb``, capped at
``memory_available_mb - MEMORY_RESERVE_MB`` when the device reports what is available.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt

from contract.base import WireModel
from contract.manifests import ModelSet, ModelSpec, Variant
from contract.profile import FirmwareProfile, HardwareFacts, Precision

MEMORY_RESERVE_MB = 256
"""MiB left free for the OS, the agent and inference buffers when the device reports how
much memory is available. Callers should report availability as if none of the agent's
models were loaded (adding back what its sessions hold), or loaded models shrink their own
budget on the next plan.
"""

ARCHITECTURE_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}

SkipReason = Literal["wrong_architecture", "provider_missing", "no_variant", "does_not_fit_memory"]


class Choice(WireModel):
    """A model the device runs: which variant, on which provider, taking how much memory."""

    outcome: Literal["chosen"] = "chosen"
    model: str
    version: str
    variant: str
    precision: Precision
    provider: str
    memory_mb: NonNegativeInt
    sha256: str
    message: str


class Skip(WireModel):
    """A model the device leaves out, with a reason code and a message naming the numbers."""

    outcome: Literal["skipped"] = "skipped"
    model: str
    version: str
    reason: SkipReason
    message: str


Entry = Annotated[Choice | Skip, Field(discriminator="outcome")]


class Plan(WireModel):
    """The outcome for every model, in the order they were considered (priority first)."""

    profile: str
    budget_mb: NonNegativeInt
    budget_note: str
    used_mb: NonNegativeInt
    entries: tuple[Entry, ...]

    @property
    def chosen(self) -> tuple[Choice, ...]:
        return tuple(entry for entry in self.entries if isinstance(entry, Choice))

    @property
    def skipped(self) -> tuple[Skip, ...]:
        return tuple(entry for entry in self.entries if isinstance(entry, Skip))

    def entry(self, model: str) -> Choice | Skip:
        """The outcome for ``model``; ``KeyError`` when the plan does not mention it."""
        for entry in self.entries:
            if entry.model == model:
                return entry
        raise KeyError(model)


def canonical_architecture(name: str) -> str:
    """``arm64`` and ``aarch64`` name one architecture; so do ``amd64`` and ``x86_64``."""
    lowered = name.strip().lower()
    return ARCHITECTURE_ALIASES.get(lowered, lowered)


def memory_budget(profile: FirmwareProfile, facts: HardwareFacts) -> tuple[int, str]:
    """The MiB models may take on this device, and a sentence saying where it comes from."""
    allowed = profile.budgets.model_memory_mb
    if facts.memory_available_mb is None:
        return allowed, f"profile {profile.name} allows {allowed} MB"
    free = max(0, facts.memory_available_mb - MEMORY_RESERVE_MB)
    if free >= allowed:
        return allowed, (
            f"profile {profile.name} allows {allowed} MB ({facts.memory_available_mb} MB available)"
        )
    return free, (
        f"{facts.memory_available_mb} MB available minus {MEMORY_RESERVE_MB} MB reserve "
        f"(profile {profile.name} allows {allowed} MB)"
    )


def supported_providers(variant: Variant, profile: FirmwareProfile) -> list[str]:
    """The profile's providers that the variant supports, preferred first."""
    return [provider for provider in profile.providers if provider in variant.requires.providers]


def provider_order(variant: Variant, profile: FirmwareProfile, facts: HardwareFacts) -> list[str]:
    """The profile's providers that the variant supports and the device has, preferred
    first: where a session cannot start on one (TensorRT without its libraries, say), the
    next is tried."""
    return [p for p in supported_providers(variant, profile) if p in facts.providers]


def provider_for(variant: Variant, profile: FirmwareProfile, facts: HardwareFacts) -> str | None:
    """The profile's most preferred provider that the variant supports and the device has."""
    order = provider_order(variant, profile, facts)
    return order[0] if order else None


def runs_on(variant: Variant, architecture: str) -> bool:
    """Whether the variant's architectures (empty: any) include ``architecture``."""
    wanted = variant.requires.architectures
    target = canonical_architecture(architecture)
    return not wanted or any(canonical_architecture(a) == target for a in wanted)


def ranked_variants(
    spec: ModelSpec, profile: FirmwareProfile, facts: HardwareFacts
) -> list[tuple[Variant, str]] | Skip:
    """The model's eligible variants with their providers, best first, or why there are none."""
    on_architecture = [v for v in spec.variants if runs_on(v, facts.architecture)]
    if not on_architecture:
        needed = sorted({a for v in spec.variants for a in v.requires.architectures})
        return _skip(
            spec,
            "wrong_architecture",
            f"no variant runs on {facts.architecture}; variants need {_listing(needed)}",
        )
    runnable = [
        (variant, provider)
        for variant in on_architecture
        if (provider := provider_for(variant, profile, facts)) is not None
    ]
    if not runnable:
        needed = sorted({p for v in on_architecture for p in v.requires.providers})
        return _skip(
            spec,
            "provider_missing",
            f"variants need {_listing(needed)}; profile {profile.name} offers "
            f"{_listing(profile.providers)}, the device has {_listing(facts.providers)}",
        )
    preference = profile.variant_preference
    eligible = [(v, p) for v, p in runnable if v.precision in preference]
    if not eligible:
        offered = sorted({v.precision for v, _ in runnable})
        return _skip(
            spec,
            "no_variant",
            f"no variant in a precision profile {profile.name} runs "
            f"({_listing(preference)}); runnable variants are {_listing(offered)}",
        )
    return sorted(
        eligible,
        key=lambda pair: (
            preference.index(pair[0].precision),
            pair[0].requires.memory_mb,
            pair[0].name,
        ),
    )


def select(
    model_set: ModelSet | Sequence[ModelSpec],
    profile: FirmwareProfile,
    facts: HardwareFacts,
) -> Plan:
    """Choose a variant and provider for each model, within the memory budget.

    Deterministic: the same inputs give an identical plan, whatever their order.
    Raises ``ValueError`` when two models share a name.
    """
    models = model_set.models if isinstance(model_set, ModelSet) else list(model_set)
    names = [spec.name for spec in models]
    if len(set(names)) != len(names):
        duplicated = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"duplicate model names: {', '.join(duplicated)}")

    budget, budget_note = memory_budget(profile, facts)
    left = budget
    entries: list[Choice | Skip] = []
    for spec in sorted(models, key=lambda spec: (-spec.priority, spec.name)):
        entry = _decide(spec, profile, facts, left, budget)
        if isinstance(entry, Choice):
            left -= entry.memory_mb
        entries.append(entry)
    return Plan(
        profile=profile.name,
        budget_mb=budget,
        budget_note=budget_note,
        used_mb=budget - left,
        entries=tuple(entries),
    )


def _decide(
    spec: ModelSpec, profile: FirmwareProfile, facts: HardwareFacts, left: int, budget: int
) -> Choice | Skip:
    ranked = ranked_variants(spec, profile, facts)
    if isinstance(ranked, Skip):
        return ranked
    preferred = ranked[0][0]
    for variant, provider in ranked:
        if variant.requires.memory_mb <= left:
            if variant is preferred:
                message = f"preferred variant, {variant.requires.memory_mb} MB of {left} MB left"
            else:
                message = (
                    f"fell back from {preferred.name} ({preferred.requires.memory_mb} MB): "
                    f"{variant.requires.memory_mb} MB of {left} MB left"
                )
            return Choice(
                model=spec.name,
                version=spec.version,
                variant=variant.name,
                precision=variant.precision,
                provider=provider,
                memory_mb=variant.requires.memory_mb,
                sha256=variant.artifact.sha256,
                message=message,
            )
    smallest = min(ranked, key=lambda pair: (pair[0].requires.memory_mb, pair[0].name))[0]
    return _skip(
        spec,
        "does_not_fit_memory",
        f"smallest eligible variant {smallest.name} needs {smallest.requires.memory_mb} MB; "
        f"{left} MB of the {budget} MB budget left",
    )


def _skip(spec: ModelSpec, reason: SkipReason, message: str) -> Skip:
    return Skip(model=spec.name, version=spec.version, reason=reason, message=message)


def _listing(items: Sequence[str]) -> str:
    return ", ".join(items) if items else "none"

"""Layered policy resolution: which models and runtime policy one device should run.

Pure: the caller passes the device, every current policy and the model sets they name, and
gets a ``Resolution`` back. The rules (docs/decisions/0007-layered-policies.md):

1. A policy applies to a device when its selector matches: every part the selector gives
   must match (labels: each key present with an equal value; profiles: the device's
   profile is listed; devices: the device id is listed). An empty selector matches all.
2. Applying policies are ranked by *precedence*: higher ``priority`` first, then policy
   name in ascending order, so equal priorities still give one deterministic order.
3. A per-device pin (``overrides``, used by rollouts) replaces the model-set reference of
   the named policy for this device only; the policy still applies only if it matches.
4. For each model name, the first policy in precedence order whose model set contains
   that model supplies it (whole: version, variants, inputs, golden). When another
   applying policy of the same priority also contains it, a ``priority_tie`` warning
   names them all.
5. The runtime policy is the whole runtime of the first policy in precedence order (the
   *top* policy); it is never merged. Per-model limits that a lower policy sets for a
   model it supplies, and that the top policy does not repeat, give a
   ``runtime_not_applied`` warning. The reported model set is the top policy's (pinned)
   set; the top policy always supplies at least one model.
6. No applying policy: an empty resolution (no models, no runtime); the device gets no
   desired state (see ``hub.desired.next_document``).

Models come out sorted by name; the result does not depend on the order of ``policies``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from contract.manifests import ModelSet, ModelSetRef, ModelSpec, Policy, RuntimePolicy, Selector
from contract.profile import FirmwareProfile, HardwareFacts
from hub.errors import DuplicatePolicy, MissingModelSet

ModelSetKey = tuple[str, str]
"""(model-set name, version): how ``resolve`` looks model sets up."""

WarningCode = Literal["priority_tie", "override_unused", "runtime_not_applied"]


@dataclass(frozen=True)
class DeviceView:
    """What resolution and planning need to know about one device (from its birth)."""

    device_id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    profile: str | None = None
    """Name of the firmware profile the device reported; None before its first birth."""
    facts: HardwareFacts | None = None
    profile_document: FirmwareProfile | None = None


@dataclass(frozen=True)
class ModelSource:
    """Where one resolved model came from."""

    model: str
    version: str
    policy: str
    priority: int
    model_set: ModelSetRef
    pinned: bool
    """True when the model set is a per-device override, not the policy's own."""


@dataclass(frozen=True)
class ResolutionWarning:
    """Something an operator should look at; resolution went on regardless."""

    code: WarningCode
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Resolution:
    """The layered result for one device; ``empty`` when no policy applies."""

    device_id: str
    models: tuple[ModelSpec, ...] = ()
    runtime: RuntimePolicy | None = None
    model_set: ModelSetRef | None = None
    policy: str | None = None
    """The top policy: the one the runtime and the reported model set come from."""
    policies: tuple[str, ...] = ()
    """Every applying policy, in precedence order."""
    sources: tuple[ModelSource, ...] = ()
    warnings: tuple[ResolutionWarning, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.models

    def source(self, model: str) -> ModelSource:
        """Where ``model`` came from; ``KeyError`` when the resolution does not have it."""
        for source in self.sources:
            if source.model == model:
                return source
        raise KeyError(model)


def selector_matches(selector: Selector, device: DeviceView) -> bool:
    """Whether every part ``selector`` gives matches ``device``; an empty one matches all."""
    if any(device.labels.get(key) != value for key, value in selector.labels.items()):
        return False
    if selector.profiles and device.profile not in selector.profiles:
        return False
    return not selector.devices or device.device_id in selector.devices


def precedence(policy: Policy) -> tuple[int, str]:
    """Sort key: higher priority first, then name ascending."""
    return (-policy.priority, policy.name)


@dataclass(frozen=True)
class _Layer:
    policy: Policy
    ref: ModelSetRef
    model_set: ModelSet
    pinned: bool


def resolve(
    device: DeviceView,
    policies: Sequence[Policy],
    model_sets: Mapping[ModelSetKey, ModelSet],
    *,
    overrides: Mapping[str, ModelSetRef] | None = None,
) -> Resolution:
    """Resolve the policies that apply to ``device`` into one set of models and a runtime.

    ``overrides`` maps a policy name to the model set this device uses for that policy
    instead of the policy's own. Raises ``DuplicatePolicy`` when two policies share a name
    and ``MissingModelSet`` when an applying policy (or its override) names a model set
    that ``model_sets`` lacks: publishing the lower layers alone would be a silent change.
    """
    _refuse_duplicate_names(policies)
    pins = dict(overrides or {})
    applying = sorted((p for p in policies if selector_matches(p.selector, device)), key=precedence)
    warnings = _unused_overrides(pins, policies, applying, device.device_id)
    if not applying:
        return Resolution(device_id=device.device_id, warnings=tuple(warnings))

    layers = [_layer(policy, pins, model_sets) for policy in applying]
    winners: dict[str, tuple[_Layer, ModelSpec]] = {}
    ties: dict[str, list[str]] = {}
    for layer in layers:
        for spec in layer.model_set.models:
            won = winners.get(spec.name)
            if won is None:
                winners[spec.name] = (layer, spec)
            elif won[0].policy.priority == layer.policy.priority:
                ties.setdefault(spec.name, [won[0].policy.name]).append(layer.policy.name)

    top = layers[0]
    names = sorted(winners)
    for name in sorted(ties):
        tied = ties[name]
        warnings.append(
            ResolutionWarning(
                "priority_tie",
                f"model {name}: policies {', '.join(tied)} have the same priority "
                f"{winners[name][0].policy.priority}; {tied[0]} wins by name",
            )
        )
    warnings.extend(_runtime_not_applied(top, [winners[name] for name in names]))
    return Resolution(
        device_id=device.device_id,
        models=tuple(winners[name][1] for name in names),
        runtime=top.policy.runtime,
        model_set=top.ref,
        policy=top.policy.name,
        policies=tuple(layer.policy.name for layer in layers),
        sources=tuple(
            ModelSource(
                model=spec.name,
                version=spec.version,
                policy=layer.policy.name,
                priority=layer.policy.priority,
                model_set=layer.ref,
                pinned=layer.pinned,
            )
            for layer, spec in (winners[name] for name in names)
        ),
        warnings=tuple(warnings),
    )


def _refuse_duplicate_names(policies: Sequence[Policy]) -> None:
    seen: set[str] = set()
    for policy in policies:
        if policy.name in seen:
            raise DuplicatePolicy(policy.name)
        seen.add(policy.name)


def _unused_overrides(
    pins: Mapping[str, ModelSetRef],
    policies: Sequence[Policy],
    applying: Sequence[Policy],
    device_id: str,
) -> list[ResolutionWarning]:
    known = {p.name for p in policies}
    applied = {p.name for p in applying}
    warnings = []
    for name in sorted(pins):
        if name in applied:
            continue
        why = "does not apply to this device" if name in known else "does not exist"
        warnings.append(
            ResolutionWarning(
                "override_unused",
                f"override for policy {name} on device {device_id} is not used: the policy {why}",
            )
        )
    return warnings


def _layer(
    policy: Policy, pins: Mapping[str, ModelSetRef], model_sets: Mapping[ModelSetKey, ModelSet]
) -> _Layer:
    pinned = policy.name in pins
    ref = pins[policy.name] if pinned else policy.model_set
    found = model_sets.get((ref.name, ref.version))
    if found is None:
        raise MissingModelSet(policy.name, ref.name, ref.version, pinned=pinned)
    return _Layer(policy=policy, ref=ref, model_set=found, pinned=pinned)


def _runtime_not_applied(
    top: _Layer, winners: Sequence[tuple[_Layer, ModelSpec]]
) -> list[ResolutionWarning]:
    warnings = []
    for layer, spec in winners:
        if layer is top:
            continue
        limits = layer.policy.runtime.models.get(spec.name)
        if limits is not None and top.policy.runtime.models.get(spec.name) != limits:
            warnings.append(
                ResolutionWarning(
                    "runtime_not_applied",
                    f"model {spec.name}: its limits in policy {layer.policy.name} are not "
                    f"applied; the runtime policy comes from {top.policy.name}",
                )
            )
    return warnings

"""Which firmware profile fits a device: every profile scored against the device's facts.

The rules, in the order they are applied:

- **Hard criteria disqualify.** The architecture must be listed (after normalising
  ``arm64``/``amd64``), total memory must lie in the profile's range, and at least one of the
  profile's required execution providers must be available.
- **Identity criteria add points.** Device-tree model and CPU model patterns are regular
  expressions searched (``re.search``, case-sensitive unless the pattern says ``(?i)``) in the
  device's strings. A fact the device could not read neither adds points nor disqualifies.
  A profile that names identity patterns is disqualified when none of them matched and the
  device's known identity contradicts them: a Raspberry Pi 5 is not a Raspberry Pi 4 because
  its memory happens to fit.
- **More specific evidence wins.** Points: device-tree model 100, CPU model 60, a required
  provider present 30, each declared memory bound 10, a declared architecture 10. The matched
  non-fallback profile with the most points is chosen; ties go to the name that sorts first.
- **The fallback** (``fallback: true``) is chosen only when no other profile matched.
- **An override** (the agent's configured profile) wins whatever the scores say; the scores
  are still computed so an operator sees how well the forced profile fits.

The hub's planner and the agent run this same code on the same facts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from contract.errors import ManifestError
from contract.profile import FirmwareProfile, HardwareFacts

DEVICE_TREE_POINTS = 100
CPU_MODEL_POINTS = 60
PROVIDER_POINTS = 30
MEMORY_BOUND_POINTS = 10
ARCHITECTURE_POINTS = 10

ARCHITECTURE_ALIASES = {
    "arm64": "aarch64",
    "armv8": "aarch64",
    "amd64": "x86_64",
    "x64": "x86_64",
    "x86-64": "x86_64",
}

OVERRIDE_SOURCE = "profile override"
PROFILES_SOURCE = "firmware profiles"

CriterionName = Literal[
    "architecture", "memory", "providers", "device_tree_model", "cpu_model", "any"
]
Outcome = Literal["met", "failed", "unknown"]
How = Literal["override", "detected", "fallback"]


def normalise_architecture(machine: str) -> str:
    """``platform.machine()`` spelled one way: ``arm64`` -> ``aarch64``, ``AMD64`` -> ``x86_64``."""
    lowered = machine.strip().lower()
    return ARCHITECTURE_ALIASES.get(lowered, lowered)


class Criterion(BaseModel):
    """One criterion of one profile, judged against the facts."""

    model_config = ConfigDict(frozen=True)

    criterion: CriterionName
    outcome: Outcome
    points: int = 0
    reason: str


class ProfileScore(BaseModel):
    """How one profile fits the facts. ``reasons`` holds one line per criterion, in order."""

    model_config = ConfigDict(frozen=True)

    name: str
    fallback: bool
    matched: bool
    points: int
    criteria: list[Criterion]
    reasons: list[str]

    @property
    def failures(self) -> list[str]:
        """The reasons of the criteria that did not hold."""
        return [c.reason for c in self.criteria if c.outcome == "failed"]


class Choice(BaseModel):
    """The chosen profile, how it was chosen, and every profile's score, best first."""

    model_config = ConfigDict(frozen=True)

    profile: FirmwareProfile
    how: How
    scores: list[ProfileScore]

    @property
    def chosen(self) -> ProfileScore:
        """The score of the chosen profile."""
        return self.score_of(self.profile.name)

    def score_of(self, name: str) -> ProfileScore:
        """The score of the profile called ``name``."""
        for candidate in self.scores:
            if candidate.name == name:
                return candidate
        raise KeyError(name)

    def lost_because(self, candidate: ProfileScore) -> str:
        """One line on why ``candidate`` was not chosen (empty for the chosen profile)."""
        chosen = self.chosen
        if candidate.name == chosen.name:
            return ""
        if not candidate.matched:
            return "; ".join(candidate.failures) or "did not match"
        if self.how == "override":
            return f"profile {chosen.name!r} was set explicitly"
        if candidate.fallback:
            return "fallback: used only when no other profile matches"
        if candidate.points < chosen.points:
            return f"{candidate.points} points < {chosen.points} for {chosen.name}"
        return f"tied at {candidate.points} points; {chosen.name} sorts first by name"


def score(profile: FirmwareProfile, facts: HardwareFacts) -> ProfileScore:
    """Judge every criterion of ``profile`` against ``facts``."""
    match = profile.match
    criteria: list[Criterion] = []

    architecture = normalise_architecture(facts.architecture)
    if match.architectures:
        wanted = [normalise_architecture(a) for a in match.architectures]
        listed = _list(match.architectures)
        if architecture in wanted:
            criteria.append(
                Criterion(
                    criterion="architecture",
                    outcome="met",
                    points=ARCHITECTURE_POINTS,
                    reason=f"architecture {architecture} in {listed}",
                )
            )
        else:
            criteria.append(
                Criterion(
                    criterion="architecture",
                    outcome="failed",
                    reason=f"architecture {architecture} not in {listed}",
                )
            )

    memory = match.memory
    if memory.min_mb > 0 or memory.max_mb is not None:
        low = memory.min_mb
        high = memory.max_mb
        span = f"{low}..{'' if high is None else high}"
        total = facts.memory_total_mb
        if total >= low and (high is None or total <= high):
            bounds = (low > 0) + (high is not None)
            criteria.append(
                Criterion(
                    criterion="memory",
                    outcome="met",
                    points=MEMORY_BOUND_POINTS * bounds,
                    reason=f"memory {total} MiB within {span}",
                )
            )
        else:
            criteria.append(
                Criterion(
                    criterion="memory",
                    outcome="failed",
                    reason=f"memory {total} MiB outside {span}",
                )
            )

    if match.providers:
        present = [p for p in match.providers if p in facts.providers]
        if present:
            criteria.append(
                Criterion(
                    criterion="providers",
                    outcome="met",
                    points=PROVIDER_POINTS,
                    reason=f"provider {present[0]} available (one of {_list(match.providers)})",
                )
            )
        else:
            criteria.append(
                Criterion(
                    criterion="providers",
                    outcome="failed",
                    reason=f"none of providers {_list(match.providers)} available "
                    f"(device has {_list(facts.providers)})",
                )
            )

    identity = [
        _identity(
            "device_tree_model",
            "device-tree model",
            match.device_tree_model,
            facts.device_tree_model,
            DEVICE_TREE_POINTS,
        ),
        _identity("cpu_model", "CPU model", match.cpu_model, facts.cpu_model, CPU_MODEL_POINTS),
    ]
    declared = [c for c in identity if c is not None]
    criteria.extend(declared)

    if not criteria:
        criteria.append(
            Criterion(criterion="any", outcome="met", reason="no criteria: fits any device")
        )

    hard_failed = any(
        c.outcome == "failed" for c in criteria if c.criterion not in _IDENTITY_CRITERIA
    )
    identity_contradicted = (
        bool(declared)
        and not any(c.outcome == "met" for c in declared)
        and any(c.outcome == "failed" for c in declared)
    )
    return ProfileScore(
        name=profile.name,
        fallback=profile.fallback,
        matched=not hard_failed and not identity_contradicted,
        points=sum(c.points for c in criteria),
        criteria=criteria,
        reasons=[c.reason for c in criteria],
    )


def choose(
    profiles: Sequence[FirmwareProfile],
    facts: HardwareFacts,
    override: str | None = None,
) -> Choice:
    """Choose the profile for ``facts``: the override if given, else the best match, else the
    fallback. Raises ``ManifestError`` (field ``profile``) for an unknown override, and when
    nothing matches and no fallback matches either.
    """
    by_name: dict[str, FirmwareProfile] = {}
    for profile in profiles:
        if profile.name in by_name:
            raise ManifestError(
                PROFILES_SOURCE, None, "name", f"unique profile names; {profile.name!r} is twice"
            )
        by_name[profile.name] = profile
    scores = sorted((score(p, facts) for p in profiles), key=_rank)

    if override is not None:
        if override not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            raise ManifestError(
                OVERRIDE_SOURCE,
                None,
                "profile",
                f"the name of a known profile ({known}); got {override!r}",
            )
        return Choice(profile=by_name[override], how="override", scores=scores)

    for candidate in scores:
        if candidate.matched:
            how: How = "fallback" if candidate.fallback else "detected"
            return Choice(profile=by_name[candidate.name], how=how, scores=scores)
    raise ManifestError(
        PROFILES_SOURCE,
        None,
        "profile",
        "a profile that matches this device, or one with fallback: true; none of "
        f"{len(scores)} profile(s) matched",
    )


_IDENTITY_CRITERIA = ("device_tree_model", "cpu_model")


def _rank(candidate: ProfileScore) -> tuple[bool, bool, int, str]:
    """Matched before unmatched, specific before fallback, more points first, then by name."""
    return (not candidate.matched, candidate.fallback, -candidate.points, candidate.name)


def _identity(
    criterion: CriterionName,
    label: str,
    patterns: list[str],
    value: str | None,
    points: int,
) -> Criterion | None:
    if not patterns:
        return None
    if value is None or not value.strip():
        return Criterion(
            criterion=criterion,
            outcome="unknown",
            reason=f"{label} unknown (profile expects {_patterns(patterns)})",
        )
    invalid: list[str] = []
    for pattern in patterns:
        try:
            found = re.search(pattern, value) is not None
        except re.error:
            invalid.append(pattern)
            continue
        if found:
            return Criterion(
                criterion=criterion,
                outcome="met",
                points=points,
                reason=f"{label} '{value}' matches '{pattern}'",
            )
    reason = f"{label} '{value}' matches none of {_patterns(patterns)}"
    if invalid:
        reason += f" (invalid pattern(s): {_patterns(invalid)})"
    return Criterion(criterion=criterion, outcome="failed", reason=reason)


def _list(items: Sequence[str]) -> str:
    return "[" + ", ".join(items) + "]"


def _patterns(patterns: Sequence[str]) -> str:
    return "[" + ", ".join(f"'{p}'" for p in patterns) + "]"

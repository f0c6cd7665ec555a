"""Pressure shedding: which models to unload when hot or short of memory, and when to reload.

Pure rules with hysteresis. A model is shed (lowest priority first) while the device is
over a limit, one per evaluation, and restored (highest priority first) only once the
device is back under the limit by a margin, so that it does not flap.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

TEMPERATURE_MARGIN_C = 5.0
MEMORY_MARGIN_MB = 128


@dataclass(frozen=True)
class Pressure:
    temperature_c: float | None
    throttle_c: float | None
    available_mb: int
    floor_mb: int

    def hot(self) -> bool:
        return (
            self.temperature_c is not None
            and self.throttle_c is not None
            and self.temperature_c >= self.throttle_c
        )

    def short_of_memory(self) -> bool:
        return self.available_mb < self.floor_mb

    def cool_enough(self) -> bool:
        return (
            self.temperature_c is None
            or self.throttle_c is None
            or self.temperature_c <= self.throttle_c - TEMPERATURE_MARGIN_C
        )

    def memory_enough(self, extra_mb: int) -> bool:
        return self.available_mb - extra_mb >= self.floor_mb + MEMORY_MARGIN_MB

    def reason(self) -> str:
        parts = []
        if self.hot():
            parts.append(f"temperature {self.temperature_c:.1f} C over {self.throttle_c:.1f} C")
        if self.short_of_memory():
            parts.append(f"available memory {self.available_mb} MB under {self.floor_mb} MB")
        return "; ".join(parts)


@dataclass(frozen=True)
class Decision:
    shed: str | None = None
    restore: str | None = None
    reason: str = ""


def decide(
    pressure: Pressure,
    *,
    loaded: Mapping[str, int],
    shed: Set[str],
    priorities: Mapping[str, int],
    memory_mb: Mapping[str, int],
) -> Decision:
    """One step: shed the lowest-priority loaded model, restore the highest shed one, or nothing.

    ``loaded`` maps served model names to priority; ``shed`` names the models shed earlier.
    """
    if pressure.hot() or pressure.short_of_memory():
        if not loaded:
            return Decision()
        victim = min(loaded, key=lambda name: (loaded[name], name))
        return Decision(shed=victim, reason=pressure.reason())
    if not shed or not pressure.cool_enough():
        return Decision()
    back = max(shed, key=lambda name: (priorities.get(name, 0), name))
    if not pressure.memory_enough(memory_mb.get(back, 0)):
        return Decision()
    return Decision(restore=back, reason="back under limits")

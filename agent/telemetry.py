"""Build telemetry: system, agent, per-model and link figures for one interval."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from contract.messages import AgentStats, Latency, LinkStats, ModelStats, SystemStats
from contract.profile import Thermal


def read_temperature(sensor: str | None) -> float | None:
    """Degrees Celsius from a sysfs file in millidegrees; None when absent or unreadable."""
    if not sensor:
        return None
    try:
        raw = Path(sensor).read_text().strip()
        return int(raw) / 1000.0
    except (OSError, ValueError):
        return None


class SystemSampler:
    """System figures; CPU percent covers the time since the previous sample."""

    def __init__(self, *, thermal: Thermal | None, disk_path: Path) -> None:
        self._thermal = thermal
        self._disk_path = disk_path
        self._boot = psutil.boot_time()
        psutil.cpu_percent(None)

    def temperature(self) -> float | None:
        return read_temperature(self._thermal.sensor if self._thermal else None)

    def available_mb(self) -> int:
        return int(psutil.virtual_memory().available // 2**20)

    def sample(self) -> SystemStats:
        memory = psutil.virtual_memory()
        load = os.getloadavg()
        try:
            disk_free = psutil.disk_usage(str(self._disk_path)).free
        except OSError:
            disk_free = 0
        temperature = self.temperature()
        throttled = (
            temperature is not None
            and self._thermal is not None
            and temperature >= self._thermal.throttle_c
        )
        return SystemStats(
            cpu_percent=min(100.0, psutil.cpu_percent(None)),
            load_1=load[0],
            load_5=load[1],
            load_15=load[2],
            memory_used_mb=int(memory.used // 2**20),
            memory_available_mb=int(memory.available // 2**20),
            disk_free_mb=int(disk_free // 2**20),
            temperature_c=temperature,
            throttled=throttled,
            uptime_s=max(0.0, time.time() - self._boot),
        )


def process_rss_mb() -> int:
    return int(psutil.Process().memory_info().rss // 2**20)


class ModelCounters:
    """Turns the host's running totals into per-interval request and error counts."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str | None], tuple[int, int]] = {}

    def interval(self, snapshot: Mapping[str, Mapping[str, Any]]) -> dict[str, ModelStats]:
        result: dict[str, ModelStats] = {}
        seen: dict[tuple[str, str | None], tuple[int, int]] = {}
        for name, entry in snapshot.items():
            stats = entry["stats"]
            key = (name, entry.get("variant"))
            totals = (int(stats["total_requests"]), int(stats["total_errors"]))
            before = self._last.get(key, (0, 0))
            if totals[0] < before[0] or totals[1] < before[1]:
                before = (0, 0)
            seen[key] = totals
            latency = None
            if stats["p50_ms"] is not None:
                latency = Latency(p50=stats["p50_ms"], p95=stats["p95_ms"], p99=stats["p99_ms"])
            state = entry["state"]
            reason = entry.get("reason") or ""
            result[name] = ModelStats(
                version=entry["version"] or "0",
                variant=entry.get("variant"),
                provider=entry.get("provider"),
                state="ready"
                if state == "active"
                else ("shed" if reason.startswith("shed") else "failed"),
                requests=totals[0] - before[0],
                errors=totals[1] - before[1],
                latency_ms=latency,
            )
        self._last = seen
        return result


def link_stats(
    reconnects: int,
    outbox_depth: int,
    dropped: int,
    refused: int,
    incoming_dropped: Mapping[str, int],
    *,
    oversized: int = 0,
) -> LinkStats:
    """The link's figures; ``oversized`` packets (above the announced maximum, each ended
    its connection unread) count as ``too_large`` among the incoming drops."""
    incoming = dict(incoming_dropped)
    if oversized:
        incoming["too_large"] = oversized
    return LinkStats(
        reconnects=reconnects,
        outbox_depth=outbox_depth,
        dropped=dropped,
        refused=refused,
        incoming_dropped=incoming,
    )


def agent_stats(version: str, applied: int, desired: int, phase: Any) -> AgentStats:
    return AgentStats(
        version=version,
        rss_mb=process_rss_mb(),
        applied_generation=applied,
        desired_generation=desired,
        phase=phase,
    )

"""Valid device messages for hub tests and benchmarks, with everything but the ids defaulted."""

from __future__ import annotations

from typing import Any

from contract.messages import (
    AgentStats,
    Birth,
    CmdResult,
    Event,
    InventoryItem,
    Latency,
    ModelReport,
    ModelStats,
    State,
    Status,
    SystemStats,
    Telemetry,
)
from contract.profile import FirmwareProfile, HardwareFacts

TS = 1_750_000_000.0
SHA = "ab" * 32

PROFILE = FirmwareProfile.model_validate(
    {
        "schema": "edgefleet.profile/1",
        "name": "raspberry-pi-4-4gb",
        "description": "Raspberry Pi 4 Model B, 4 GB",
        "match": {"architectures": ["aarch64"]},
        "budgets": {"model_memory_mb": 1024, "storage_mb": 4096, "threads": 4},
        "providers": ["CPUExecutionProvider"],
        "variant_preference": ["int8", "fp32"],
    }
)
FACTS = HardwareFacts(architecture="aarch64", cpu_count=4, memory_total_mb=3796)


def birth(device_id: str, session: int = 1, seq: int = 1, **changes: Any) -> Birth:
    fields: dict[str, Any] = {
        "device_id": device_id,
        "session": session,
        "seq": seq,
        "ts": TS,
        "agent_version": "0.1.0",
        "facts": FACTS,
        "profile": PROFILE,
        "profile_source": "detected",
        "labels": {"site": "lab"},
        "capabilities": ["rebirth"],
        "inventory": [
            InventoryItem(
                model="det",
                version="4.0",
                variant="det-int8",
                precision="int8",
                provider="CPUExecutionProvider",
                sha256=SHA,
            )
        ],
        "applied_generation": 0,
    }
    fields.update(changes)
    return Birth(**fields)


def status(
    device_id: str, session: int = 1, seq: int | None = 0, state: str = "online", **changes: Any
) -> Status:
    fields: dict[str, Any] = {
        "device_id": device_id,
        "session": session,
        "seq": seq,
        "state": state,
        "ts": TS,
    }
    fields.update(changes)
    return Status(**fields)


def will(device_id: str, session: int) -> Status:
    """The offline Will of a session: no seq."""
    return status(device_id, session, None, "offline")


def telemetry(device_id: str, session: int = 1, seq: int = 2, **changes: Any) -> Telemetry:
    fields: dict[str, Any] = {
        "device_id": device_id,
        "session": session,
        "seq": seq,
        "ts": TS + seq,
        "interval_s": 10.0,
        "system": SystemStats(
            cpu_percent=37.5,
            load_1=0.9,
            load_5=0.7,
            load_15=0.5,
            memory_used_mb=1200,
            memory_available_mb=2500,
            disk_free_mb=20_000,
            temperature_c=61.2,
            uptime_s=3600.0,
        ),
        "agent": AgentStats(
            version="0.1.0",
            rss_mb=48,
            applied_generation=1,
            desired_generation=1,
            phase="committed",
        ),
        "models": {
            "det": ModelStats(
                version="4.0",
                variant="det-int8",
                provider="CPUExecutionProvider",
                state="ready",
                requests=120,
                errors=1,
                latency_ms=Latency(p50=31.0, p95=48.5, p99=70.1),
            ),
            "rec": ModelStats(
                version="4.0",
                variant="rec-fp32",
                state="ready",
                requests=40,
                errors=0,
                latency_ms=Latency(p50=20.0, p95=30.0, p99=41.0),
            ),
        },
    }
    fields.update(changes)
    return Telemetry(**fields)


def state(
    device_id: str, session: int = 1, seq: int = 3, applied: int = 1, **changes: Any
) -> State:
    fields: dict[str, Any] = {
        "device_id": device_id,
        "session": session,
        "seq": seq,
        "ts": TS + seq,
        "applied_generation": applied,
        "desired_generation": applied,
        "phase": "committed",
        "models": [
            ModelReport(name="det", version="4.0", variant="det-int8", precision="int8", ready=True)
        ],
    }
    fields.update(changes)
    return State(**fields)


def event(device_id: str, session: int = 1, seq: int = 4, **changes: Any) -> Event:
    fields: dict[str, Any] = {
        "device_id": device_id,
        "session": session,
        "seq": seq,
        "ts": TS + seq,
        "kind": "update.committed",
        "generation": 1,
        "message": "generation 1 committed",
        "data": {"models": ["det"]},
    }
    fields.update(changes)
    return Event(**fields)


def result(device_id: str, session: int = 1, seq: int = 5, **changes: Any) -> CmdResult:
    fields: dict[str, Any] = {
        "device_id": device_id,
        "session": session,
        "seq": seq,
        "ts": TS + seq,
        "cmd_id": "c-1",
        "ok": True,
        "result": {"p95_ms": 48.0},
    }
    fields.update(changes)
    return CmdResult(**fields)

"""Helpers for hub service, end-to-end and benchmark runs: real profiles and facts as births,
model-set and policy YAML written from what the registry stored, a recording publisher."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from contract.messages import Birth
from contract.profile import FirmwareProfile, HardwareFacts
from contract.yaml_source import load_profile

ROOT = Path(__file__).resolve().parent.parent.parent
PROFILES_DIR = ROOT / "firmware-profiles"
FACTS_DIR = ROOT / "tests" / "fixtures" / "facts"
TS = 1_750_000_000.0

OCR_HINTS: dict[str, dict[str, list[int]]] = {
    "det": {"x": [1, 3, 320, 320]},
    "cls": {"x": [1, 3, 48, 192]},
    "rec": {"x": [1, 3, 48, 320]},
}
OCR_PRIORITY = {"det": 30, "cls": 10, "rec": 20}
DEFAULT_MEMORY_MB = {"det": 60, "cls": 20, "rec": 100}


def profile(name: str) -> FirmwareProfile:
    """A shipped firmware profile (firmware-profiles/<name>.yaml)."""
    path = PROFILES_DIR / f"{name}.yaml"
    return load_profile(path.read_text(), str(path))


def facts(name: str) -> HardwareFacts:
    """Recorded hardware facts of a real device (tests/fixtures/facts/<name>.json)."""
    data = json.loads((FACTS_DIR / f"{name}.json").read_text())
    data.pop("_source", None)
    return HardwareFacts.model_validate(data)


def birth(
    device_id: str,
    profile_name: str,
    *,
    facts_name: str | None = None,
    labels: dict[str, str] | None = None,
    session: int = 1,
    seq: int = 1,
) -> Birth:
    """A birth as an agent with ``profile_name`` (from its config) would send it."""
    return Birth(
        device_id=device_id,
        session=session,
        seq=seq,
        ts=TS,
        agent_version="0.1.0",
        facts=facts(facts_name or profile_name),
        profile=profile(profile_name),
        profile_source="override",
        labels=labels or {},
    )


class VariantRecord(Protocol):
    """A stored model variant: ``hub.store.ModelRecord`` or the API's ``ModelVariant``."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def variant(self) -> str: ...
    @property
    def precision(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def load_memory_mb(self) -> float | None: ...


def memory_of(record: VariantRecord) -> int:
    """``requires.memory_mb`` for a variant: what the hub measured, rounded up."""
    if record.load_memory_mb is None:
        return DEFAULT_MEMORY_MB.get(record.name, 50)
    return max(1, math.ceil(record.load_memory_mb))


def modelset_yaml(
    records: Iterable[VariantRecord],
    *,
    name: str = "ocr",
    version: str = "1.0.0",
    model_version: str = "1.0.0",
    variants: dict[str, list[str]] | None = None,
) -> str:
    """A model set of the OCR models among ``records`` (every variant of each, or the ones
    ``variants`` names), with their sha256s, sizes and measured memory."""
    records = list(records)
    lines = ["schema: edgefleet.modelset/1", f"name: {name}", f'version: "{version}"', "models:"]
    for model in ("det", "cls", "rec"):
        chosen = sorted(
            (
                r
                for r in records
                if r.name == model
                and r.version == model_version
                and (variants is None or r.variant in variants.get(model, [r.variant]))
            ),
            key=lambda r: r.variant,
        )
        if not chosen:
            continue
        lines += [
            f"  - name: {model}",
            f'    version: "{model_version}"',
            f"    priority: {OCR_PRIORITY[model]}",
            "    inputs:",
            *(f"      {k}: {{shape: {v}}}" for k, v in OCR_HINTS[model].items()),
            "    variants:",
        ]
        for record in chosen:
            lines += [
                f"      - name: {record.variant}",
                f"        precision: {record.precision}",
                "        artifact:",
                f"          sha256: {record.sha256}",
                f"          size: {record.size}",
                "        requires:",
                f"          memory_mb: {memory_of(record)}",
            ]
    return "\n".join(lines) + "\n"


def policy_yaml(
    *,
    name: str = "ocr-everywhere",
    model_set: str = "ocr",
    version: str = "1.0.0",
    priority: int = 0,
    labels: dict[str, str] | None = None,
    profiles: list[str] | None = None,
    probation_s: float = 0.0,
    telemetry_interval_s: float = 1.0,
) -> str:
    lines = ["schema: edgefleet.policy/1", f"name: {name}", f"priority: {priority}", "selector:"]
    lines.append(f"  labels: {json.dumps(labels or {})}")
    lines.append(f"  profiles: {json.dumps(profiles or [])}")
    lines += [
        "model_set:",
        f"  name: {model_set}",
        f'  version: "{version}"',
        "runtime:",
        f"  probation_s: {probation_s}",
        f"  telemetry_interval_s: {telemetry_interval_s}",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Published:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class RecordingPublisher:
    """A ``hub.controller.Publisher`` that keeps what it was given (acknowledged at once)."""

    sent: list[Published] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> Any:
        with self.lock:
            self.sent.append(Published(topic, payload, qos, retain))
        return None

    def take(self) -> list[Published]:
        """What was sent since the last ``take``."""
        with self.lock:
            sent, self.sent = self.sent, []
        return sent

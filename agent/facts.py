"""What this device is: architecture, board, CPU, memory, storage, ONNX Runtime providers, heat.

Every file reader takes ``root`` (default ``/``) so tests can point it at a fake sysfs/procfs
tree. A file that is missing or unreadable is normal on some boards: the reader returns
``None`` (or an empty collection) and never raises. Memory, CPU count, storage and providers
come from the running system (psutil, the scheduler, ONNX Runtime); with a ``root`` other
than ``/``, memory and CPU count are read from that tree's ``/proc`` files instead.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import psutil
from pydantic import ValidationError

from contract.errors import ManifestError
from contract.profile import HardwareFacts
from contract.profile_match import normalise_architecture

MIB = 1024 * 1024

DEVICE_TREE_MODEL_FILES = ("sys/firmware/devicetree/base/model", "proc/device-tree/model")
# /proc/cpuinfo keys naming the CPU or board, most telling first: the Raspberry Pi kernel's
# "Model", 32-bit Arm "Hardware", x86 "model name", MIPS "cpu model", RISC-V "uarch".
CPU_MODEL_KEYS = ("Model", "Hardware", "model name", "cpu model", "uarch")
THERMAL_DIR = "sys/class/thermal"

_ZONE_NUMBER = re.compile(r"(\d+)$")


def read_architecture(machine: str | None = None) -> str:
    """The CPU architecture, normalised (``arm64`` -> ``aarch64``, ``amd64`` -> ``x86_64``)."""
    raw = platform.machine() if machine is None else machine
    return normalise_architecture(raw) or "unknown"


def read_device_tree_model(root: str | Path = "/") -> str | None:
    """The board's device-tree model ("Raspberry Pi 4 Model B Rev 1.4"), or None (x86)."""
    for relative in DEVICE_TREE_MODEL_FILES:
        text = _read_text(Path(root) / relative)
        if text is None:
            continue
        model = text.split("\x00", 1)[0].strip()
        if model:
            return model
    return None


def read_cpu_model(root: str | Path = "/") -> str | None:
    """The CPU or board name from ``/proc/cpuinfo`` (see ``CPU_MODEL_KEYS``), or None."""
    fields = _cpuinfo_fields(root)
    for key in CPU_MODEL_KEYS:
        value = fields.get(key)
        if value:
            return value
    return None


def read_cpu_count(root: str | Path = "/") -> int | None:
    """CPUs this process may run on; under a fake ``root``, the processors its cpuinfo lists."""
    if _is_live(root):
        if hasattr(os, "sched_getaffinity"):
            return len(os.sched_getaffinity(0)) or None
        return os.cpu_count()
    text = _read_text(Path(root) / "proc/cpuinfo")
    if text is None:
        return None
    count = sum(1 for line in text.splitlines() if line.split(":", 1)[0].strip() == "processor")
    return count or None


def read_memory_mb(root: str | Path = "/") -> tuple[int | None, int | None]:
    """Total and available memory in MiB: psutil live, ``/proc/meminfo`` under a fake root."""
    if _is_live(root):
        try:
            memory = psutil.virtual_memory()
        except (OSError, RuntimeError):
            return None, None
        return int(memory.total) // MIB, int(memory.available) // MIB
    text = _read_text(Path(root) / "proc/meminfo")
    if text is None:
        return None, None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) // 1024  # meminfo counts in kB
    return values.get("MemTotal"), values.get("MemAvailable")


def read_storage_free_mb(path: str | Path = "/") -> int | None:
    """Free space in MiB on the file system that holds ``path`` (or would, once created)."""
    candidate = Path(path).absolute()
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    try:
        return int(psutil.disk_usage(str(candidate)).free) // MIB
    except OSError:
        return None


def read_providers() -> list[str]:
    """ONNX Runtime's available execution providers; empty when it is missing or broken."""
    try:
        import onnxruntime

        return [str(name) for name in onnxruntime.get_available_providers()]
    except Exception:  # an absent or half-installed runtime is a fact, not a crash
        return []


def read_thermal_zones(root: str | Path = "/") -> dict[str, float]:
    """``/sys/class/thermal/thermal_zoneN/temp`` (path as the device sees it) -> °C."""
    base = Path(root) / THERMAL_DIR
    try:
        zones = [p for p in base.iterdir() if p.name.startswith("thermal_zone")]
    except OSError:
        return {}
    readings: dict[str, float] = {}
    for zone in sorted(zones, key=_zone_order):
        text = _read_text(zone / "temp")
        if text is None:
            continue
        try:
            millidegrees = int(text.strip())
        except ValueError:
            continue
        readings[f"/{THERMAL_DIR}/{zone.name}/temp"] = millidegrees / 1000.0
    return readings


def collect_facts(root: str | Path = "/", storage_path: str | Path = "/") -> HardwareFacts:
    """Everything above, as the ``HardwareFacts`` a profile is matched against."""
    total, available = read_memory_mb(root)
    return HardwareFacts(
        architecture=read_architecture(),
        device_tree_model=read_device_tree_model(root),
        cpu_model=read_cpu_model(root),
        cpu_count=read_cpu_count(root) or 1,
        memory_total_mb=total or 0,
        memory_available_mb=available,
        storage_free_mb=read_storage_free_mb(storage_path),
        providers=read_providers(),
        thermal_zones=read_thermal_zones(root),
    )


def load_facts_file(path: str | Path) -> HardwareFacts:
    """Recorded facts from a JSON file; any problem is one ``ManifestError`` naming the file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(source, None, "(file)", f"a readable file ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ManifestError(source, None, "(file)", "UTF-8 text") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(source, exc.lineno, "(json)", f"valid JSON: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise ManifestError(source, 1, "(document)", "a JSON object of hardware facts")
    try:
        return HardwareFacts.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "(document)"
        raise ManifestError(source, None, field, error["msg"]) from exc


def _is_live(root: str | Path) -> bool:
    return Path(root).absolute() == Path("/")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def _cpuinfo_fields(root: str | Path) -> dict[str, str]:
    """The first value of each ``key : value`` line of ``/proc/cpuinfo``."""
    text = _read_text(Path(root) / "proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in (text or "").splitlines():
        key, separator, value = line.partition(":")
        if separator:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _zone_order(zone: Path) -> tuple[int, str]:
    found = _ZONE_NUMBER.search(zone.name)
    return (int(found.group(1)) if found else -1, zone.name)

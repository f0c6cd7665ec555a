"""Hardware facts: every reader against a fake sysfs/procfs tree, and against this machine."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import psutil
import pytest

from agent.facts import (
    collect_facts,
    load_facts_file,
    read_architecture,
    read_cpu_count,
    read_cpu_model,
    read_device_tree_model,
    read_memory_mb,
    read_providers,
    read_storage_free_mb,
    read_thermal_zones,
)
from contract.errors import ManifestError
from contract.profile import HardwareFacts

PI4_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08

processor\t: 1
BogoMIPS\t: 108.00

processor\t: 2
BogoMIPS\t: 108.00

processor\t: 3
BogoMIPS\t: 108.00

Revision\t: c03114
Serial\t\t: 10000000abcdef01
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""

X86_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 190
model name\t: Intel(R) N100
stepping\t: 0

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) N100
"""

ARM32_CPUINFO = """\
processor\t: 0
model name\t: ARMv7 Processor rev 5 (v7l)
Hardware\t: Freescale i.MX6 Quad/DualLite (Device Tree)
Revision\t: 0000
"""

RISCV_CPUINFO = """\
processor\t: 0
hart\t\t: 1
isa\t\t: rv64imafdc
mmu\t\t: sv39
uarch\t\t: sifive,u74-mc
"""

# arm64 mainline kernels (Jetson, i.MX) name no CPU model at all.
ARM64_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 62.50
CPU implementer\t: 0x41
CPU part\t: 0xd42
"""

MEMINFO = """\
MemTotal:        3885056 kB
MemFree:         2811392 kB
MemAvailable:    3380224 kB
Buffers:           40960 kB
"""


def write(root: Path, relative: str, content: str | bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.fixture
def pi_tree(tmp_path: Path) -> Path:
    """A Raspberry Pi 4 as its /sys and /proc show it, with odd thermal zones added."""
    root = tmp_path / "pi"
    write(root, "sys/firmware/devicetree/base/model", b"Raspberry Pi 4 Model B Rev 1.4\x00")
    write(root, "proc/cpuinfo", PI4_CPUINFO)
    write(root, "proc/meminfo", MEMINFO)
    write(root, "sys/class/thermal/thermal_zone0/temp", "48686\n")
    write(root, "sys/class/thermal/thermal_zone10/temp", "-5250\n")
    write(root, "sys/class/thermal/thermal_zone2/temp", "31000\n")
    write(root, "sys/class/thermal/thermal_zone3/temp", "\n")  # driver with no reading
    (root / "sys/class/thermal/thermal_zone4").mkdir()  # zone without a temp file
    (root / "sys/class/thermal/cooling_device0").mkdir()
    write(root, "sys/class/thermal/cooling_device0/cur_state", "0\n")
    return root


# --- architecture -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("aarch64", "aarch64"),
        ("arm64", "aarch64"),
        ("AMD64", "x86_64"),
        ("x86_64", "x86_64"),
        ("riscv64", "riscv64"),
        ("armv7l", "armv7l"),
        ("", "unknown"),
    ],
)
def test_architecture_is_normalised(machine: str, expected: str) -> None:
    assert read_architecture(machine) == expected


# --- device tree ------------------------------------------------------------------------


def test_device_tree_model_strips_the_nul(pi_tree: Path) -> None:
    assert read_device_tree_model(pi_tree) == "Raspberry Pi 4 Model B Rev 1.4"


def test_device_tree_model_falls_back_to_proc(tmp_path: Path) -> None:
    write(tmp_path, "proc/device-tree/model", b"NXP i.MX8MPlus EVK board\x00")
    assert read_device_tree_model(tmp_path) == "NXP i.MX8MPlus EVK board"


def test_device_tree_model_missing_or_empty_is_none(tmp_path: Path) -> None:
    assert read_device_tree_model(tmp_path) is None
    write(tmp_path, "sys/firmware/devicetree/base/model", b"\x00")
    assert read_device_tree_model(tmp_path) is None


def test_unreadable_device_tree_model_is_none(tmp_path: Path) -> None:
    (tmp_path / "sys/firmware/devicetree/base/model").mkdir(parents=True)  # EISDIR on read
    assert read_device_tree_model(tmp_path) is None


# --- CPU --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        (PI4_CPUINFO, "Raspberry Pi 4 Model B Rev 1.4"),
        (X86_CPUINFO, "Intel(R) N100"),
        (ARM32_CPUINFO, "Freescale i.MX6 Quad/DualLite (Device Tree)"),
        (RISCV_CPUINFO, "sifive,u74-mc"),
        (ARM64_CPUINFO, None),
        ("", None),
    ],
)
def test_cpu_model(tmp_path: Path, cpuinfo: str, expected: str | None) -> None:
    write(tmp_path, "proc/cpuinfo", cpuinfo)
    assert read_cpu_model(tmp_path) == expected


def test_cpu_model_without_cpuinfo_is_none(tmp_path: Path) -> None:
    assert read_cpu_model(tmp_path) is None


def test_cpu_count_from_a_fake_tree(pi_tree: Path, tmp_path: Path) -> None:
    assert read_cpu_count(pi_tree) == 4
    assert read_cpu_count(tmp_path / "empty") is None


def test_cpu_count_of_this_machine() -> None:
    count = read_cpu_count()
    assert count is not None
    assert count >= 1


# --- memory and storage ------------------------------------------------------------------


def test_memory_from_a_fake_tree(pi_tree: Path, tmp_path: Path) -> None:
    assert read_memory_mb(pi_tree) == (3794, 3301)
    assert read_memory_mb(tmp_path / "empty") == (None, None)


def test_memory_of_this_machine() -> None:
    total, available = read_memory_mb()
    assert total is not None
    assert available is not None
    assert 0 < available <= total


def test_storage_free_of_a_path_not_created_yet(tmp_path: Path) -> None:
    free = read_storage_free_mb(tmp_path / "var" / "lib" / "edgefleet")
    assert free is not None
    assert free >= 0


def test_storage_free_when_the_disk_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path: str) -> object:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(psutil, "disk_usage", broken)
    assert read_storage_free_mb(tmp_path) is None


# --- providers --------------------------------------------------------------------------


def test_providers_of_this_machine() -> None:
    assert "CPUExecutionProvider" in read_providers()


def test_providers_without_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    assert read_providers() == []


def test_providers_of_a_broken_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = types.ModuleType("onnxruntime")

    def get_available_providers() -> list[str]:
        raise RuntimeError("libonnxruntime_providers_cuda.so: cannot open shared object")

    broken.get_available_providers = get_available_providers  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "onnxruntime", broken)
    assert read_providers() == []


# --- thermal ----------------------------------------------------------------------------


def test_thermal_zones_in_degrees_in_zone_order(pi_tree: Path) -> None:
    zones = read_thermal_zones(pi_tree)
    assert list(zones) == [
        "/sys/class/thermal/thermal_zone0/temp",
        "/sys/class/thermal/thermal_zone2/temp",
        "/sys/class/thermal/thermal_zone10/temp",
    ]
    assert zones["/sys/class/thermal/thermal_zone0/temp"] == pytest.approx(48.686)
    assert zones["/sys/class/thermal/thermal_zone10/temp"] == pytest.approx(-5.25)


def test_no_thermal_directory(tmp_path: Path) -> None:
    assert read_thermal_zones(tmp_path) == {}


# --- everything together ----------------------------------------------------------------


def test_collect_facts_from_a_fake_tree(pi_tree: Path, tmp_path: Path) -> None:
    facts = collect_facts(root=pi_tree, storage_path=tmp_path)
    assert facts.device_tree_model == "Raspberry Pi 4 Model B Rev 1.4"
    assert facts.cpu_model == "Raspberry Pi 4 Model B Rev 1.4"
    assert facts.cpu_count == 4
    assert (facts.memory_total_mb, facts.memory_available_mb) == (3794, 3301)
    assert facts.storage_free_mb is not None
    assert len(facts.thermal_zones) == 3


def test_collect_facts_from_an_empty_tree_never_raises(tmp_path: Path) -> None:
    facts = collect_facts(root=tmp_path, storage_path=tmp_path / "missing")
    assert facts.device_tree_model is None
    assert facts.cpu_model is None
    assert facts.cpu_count == 1
    assert facts.memory_total_mb == 0
    assert facts.memory_available_mb is None
    assert facts.thermal_zones == {}


def test_collect_facts_of_this_machine() -> None:
    facts = collect_facts()
    assert facts.architecture == read_architecture()
    assert facts.cpu_count >= 1
    assert facts.memory_total_mb > 0
    assert "CPUExecutionProvider" in facts.providers
    # What the device reports in its birth message survives a JSON round trip.
    again = HardwareFacts.model_validate_json(facts.model_dump_json())
    assert again == facts


# --- recorded facts ---------------------------------------------------------------------


def test_load_facts_file_keeps_unknown_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "facts.json",
        json.dumps(
            {"_source": "a note", "architecture": "arm64", "cpu_count": 4, "memory_total_mb": 3794}
        ),
    )
    facts = load_facts_file(path)
    assert facts.model_extra == {"_source": "a note"}
    assert facts.memory_total_mb == 3794


def test_load_facts_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as caught:
        load_facts_file(tmp_path / "nope.json")
    assert str(caught.value).startswith(f"{tmp_path / 'nope.json'}: (file): a readable file")


def test_load_facts_file_bad_json_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "facts.json", '{\n  "architecture": "aarch64",\n  cpu_count: 4\n}\n')
    with pytest.raises(ManifestError) as caught:
        load_facts_file(path)
    assert caught.value.line == 3
    assert str(caught.value).startswith(f"{path}:3: (json): valid JSON")


def test_load_facts_file_bad_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "facts.json",
        json.dumps({"architecture": "aarch64", "cpu_count": 0, "memory_total_mb": 1}),
    )
    with pytest.raises(ManifestError) as caught:
        load_facts_file(path)
    assert caught.value.field == "cpu_count"


def test_load_facts_file_not_an_object(tmp_path: Path) -> None:
    path = write(tmp_path, "facts.json", "[1, 2]")
    with pytest.raises(ManifestError, match="a JSON object"):
        load_facts_file(path)

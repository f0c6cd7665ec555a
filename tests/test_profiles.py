"""Firmware profiles: the shipped files, matching rules, detection and ``profile detect``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import agent
from agent.cli import main
from agent.facts import collect_facts, load_facts_file
from agent.profiles import default_profiles_dir, detect, load_profiles, profile_dir_candidates
from contract.errors import ManifestError
from contract.profile import FirmwareProfile, HardwareFacts
from contract.profile_match import choose, score
from contract.yaml_source import load_profile

REPO = Path(__file__).resolve().parent.parent
PROFILES_DIR = REPO / "firmware-profiles"
FACTS_DIR = REPO / "tests" / "fixtures" / "facts"
FIXTURES = sorted(FACTS_DIR.glob("*.json"))
SHIPPED = {
    "raspberry-pi-4-4gb",
    "raspberry-pi-5-8gb",
    "jetson-orin-nano-8gb",
    "nxp-imx8m-plus",
    "intel-n100-gateway",
    "x86-64-nvidia-server",
    "generic",
}


def expected_profile(fixture: Path) -> str:
    """``<profile>.json`` or ``<profile>--<what>.json`` names the profile it must pick."""
    return fixture.stem.split("--")[0]


def profile(name: str, *, fallback: bool = False, **match: Any) -> FirmwareProfile:
    return FirmwareProfile.model_validate(
        {
            "schema": "edgefleet.profile/1",
            "name": name,
            "description": name,
            "fallback": fallback,
            "match": match,
            "budgets": {"model_memory_mb": 256, "storage_mb": 1024, "threads": 1},
            "providers": ["CPUExecutionProvider"],
            "variant_preference": ["fp32"],
        }
    )


def facts(**values: Any) -> HardwareFacts:
    base: dict[str, Any] = {
        "architecture": "aarch64",
        "cpu_count": 4,
        "memory_total_mb": 3794,
        "providers": ["CPUExecutionProvider"],
    }
    return HardwareFacts.model_validate(base | values)


# --- the shipped files ------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(PROFILES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_profile_file_loads_and_cites_its_sources(path: Path) -> None:
    text = path.read_text()
    loaded = load_profile(text, str(path))
    assert loaded.name == path.stem
    assert text.startswith("#"), "a comment block with the public facts comes first"
    assert "Source" in text
    assert loaded.thermal is not None
    assert "CPUExecutionProvider" in loaded.providers


def test_the_shipped_set() -> None:
    profiles = load_profiles()
    assert {p.name for p in profiles} >= SHIPPED
    assert [p.name for p in profiles if p.fallback] == ["generic"]


def test_every_device_class_has_a_recorded_fixture() -> None:
    assert {expected_profile(f) for f in FIXTURES} >= SHIPPED


# --- detection from recorded facts -------------------------------------------------------


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
def test_each_fixture_picks_its_profile(fixture: Path) -> None:
    recorded = load_facts_file(fixture)
    assert recorded.model_extra is not None
    assert "_source" in recorded.model_extra
    choice = detect(recorded)
    want = expected_profile(fixture)
    assert choice.profile.name == want
    assert choice.how == ("fallback" if want == "generic" else "detected")
    assert choice.chosen.matched
    assert choice.scores[0].name == want
    for other in choice.scores[1:]:
        assert choice.lost_because(other)


def test_override_wins_even_against_the_facts() -> None:
    pi4 = load_facts_file(FACTS_DIR / "raspberry-pi-4-4gb.json")
    choice = detect(pi4, override="x86-64-nvidia-server")
    assert choice.how == "override"
    assert choice.profile.name == "x86-64-nvidia-server"
    assert not choice.chosen.matched  # the explanation still shows how badly it fits
    assert "architecture aarch64 not in [x86_64]" in choice.chosen.reasons
    pi_score = choice.score_of("raspberry-pi-4-4gb")
    assert pi_score.matched
    assert choice.lost_because(pi_score) == "profile 'x86-64-nvidia-server' was set explicitly"


def test_unknown_override_is_refused() -> None:
    pi4 = load_facts_file(FACTS_DIR / "raspberry-pi-4-4gb.json")
    with pytest.raises(ManifestError) as caught:
        detect(pi4, override="raspberry-pi-9")
    assert caught.value.field == "profile"
    assert "'raspberry-pi-9'" in str(caught.value)
    assert "raspberry-pi-4-4gb" in str(caught.value)


def test_this_machines_real_facts_produce_a_valid_choice() -> None:
    live = collect_facts()
    choice = detect(live)
    assert choice.profile.name in {p.name for p in load_profiles()}
    assert choice.how in ("detected", "fallback")
    assert choice.chosen.matched
    assert len(choice.scores) == len(load_profiles())


# --- matching rules ---------------------------------------------------------------------


def test_reasons_name_each_criterion() -> None:
    pi4 = profile(
        "pi4",
        architectures=["aarch64"],
        device_tree_model=["^Raspberry Pi 4"],
        memory={"min_mb": 3500, "max_mb": 4200},
    )
    result = score(pi4, facts(device_tree_model="Raspberry Pi 4 Model B Rev 1.4"))
    assert result.matched
    assert result.reasons == [
        "architecture aarch64 in [aarch64]",
        "memory 3794 MiB within 3500..4200",
        "device-tree model 'Raspberry Pi 4 Model B Rev 1.4' matches '^Raspberry Pi 4'",
    ]
    assert result.points == 10 + 20 + 100


def test_hard_criteria_disqualify() -> None:
    server = profile(
        "server",
        architectures=["x86_64"],
        memory={"min_mb": 15000},
        providers=["CUDAExecutionProvider"],
    )
    result = score(server, facts(architecture="arm64"))
    assert not result.matched
    assert result.failures == [
        "architecture aarch64 not in [x86_64]",
        "memory 3794 MiB outside 15000..",
        "none of providers [CUDAExecutionProvider] available (device has [CPUExecutionProvider])",
    ]


def test_unknown_identity_neither_adds_nor_disqualifies() -> None:
    pi4 = profile("pi4", architectures=["aarch64"], device_tree_model=["^Raspberry Pi 4"])
    result = score(pi4, facts(device_tree_model=None))
    assert result.matched
    assert result.points == 10
    assert result.criteria[-1].outcome == "unknown"


def test_contradicted_identity_disqualifies() -> None:
    pi4 = profile("pi4", architectures=["aarch64"], device_tree_model=["^Raspberry Pi 4"])
    result = score(pi4, facts(device_tree_model="Raspberry Pi 5 Model B Rev 1.0"))
    assert not result.matched
    assert result.failures == [
        "device-tree model 'Raspberry Pi 5 Model B Rev 1.0' matches none of ['^Raspberry Pi 4']"
    ]


def test_one_identity_match_is_enough() -> None:
    board = profile("board", device_tree_model=["EVK"], cpu_model=["Cortex-A55"])
    result = score(board, facts(device_tree_model="NXP EVK", cpu_model="Cortex-A53"))
    assert result.matched
    assert result.points == 100


def test_an_invalid_pattern_does_not_match_and_says_so() -> None:
    board = profile("board", device_tree_model=["([unclosed"])
    result = score(board, facts(device_tree_model="Any Board"))
    assert not result.matched
    assert "invalid pattern(s): ['([unclosed']" in result.failures[0]


def test_more_specific_evidence_wins() -> None:
    broad = profile("a-broad", architectures=["aarch64"], memory={"min_mb": 1000})
    board = profile("z-board", architectures=["aarch64"], device_tree_model=["Orin"])
    choice = choose([broad, board], facts(device_tree_model="NVIDIA Jetson Orin Nano"))
    assert choice.profile.name == "z-board"
    assert choice.lost_because(choice.score_of("a-broad")) == "20 points < 110 for z-board"


def test_ties_are_broken_by_name() -> None:
    first, second = (
        profile("beta", architectures=["aarch64"]),
        profile("alpha", architectures=["aarch64"]),
    )
    choice = choose([first, second], facts())
    assert choice.profile.name == "alpha"
    assert (
        choice.lost_because(choice.score_of("beta"))
        == "tied at 10 points; alpha sorts first by name"
    )


def test_the_fallback_wins_only_when_nothing_else_matched() -> None:
    catch_all = profile("catch-all", fallback=True)
    arm = profile("arm", architectures=["aarch64"])
    assert choose([catch_all, arm], facts()).profile.name == "arm"
    riscv = choose([catch_all, arm], facts(architecture="riscv64"))
    assert (riscv.profile.name, riscv.how) == ("catch-all", "fallback")
    arm_wins = choose([catch_all, arm], facts())
    assert arm_wins.lost_because(arm_wins.score_of("catch-all")) == (
        "fallback: used only when no other profile matches"
    )


def test_the_generic_profile_takes_an_unknown_risc_v_board() -> None:
    board = load_facts_file(FACTS_DIR / "generic--starfive-visionfive-2.json")
    choice = detect(board)
    assert (choice.profile.name, choice.how) == ("generic", "fallback")
    assert all(not s.matched for s in choice.scores if s.name != "generic")


def test_nothing_matches_and_no_fallback() -> None:
    with pytest.raises(ManifestError) as caught:
        choose([profile("x86", architectures=["x86_64"])], facts())
    assert caught.value.field == "profile"


def test_duplicate_names_are_refused_by_choose() -> None:
    with pytest.raises(ManifestError, match="twice"):
        choose([profile("same"), profile("same")], facts())


# --- loading from a directory -------------------------------------------------------------


def copy_profile(directory: Path, name: str, as_name: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{as_name or name}.yaml"
    target.write_text((PROFILES_DIR / f"{name}.yaml").read_text())
    return target


def test_duplicate_names_in_a_directory_name_file_and_line(tmp_path: Path) -> None:
    copy_profile(tmp_path, "generic")
    copy = copy_profile(tmp_path, "generic", as_name="zz-generic-copy")
    with pytest.raises(ManifestError) as caught:
        load_profiles(tmp_path)
    line = copy.read_text().splitlines().index("name: generic") + 1
    assert str(caught.value).startswith(f"{copy}:{line}: name: a unique profile name")


def test_an_empty_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="at least one"):
        load_profiles(tmp_path)


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="a readable directory"):
        load_profiles(tmp_path / "nope")


def test_profiles_are_found_in_the_checkout() -> None:
    assert default_profiles_dir() == PROFILES_DIR


def test_the_installed_wheel_location_comes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site-packages" / "agent"
    copy_profile(package / "firmware_profiles", "generic")
    (package / "__init__.py").write_text("")
    monkeypatch.setattr(agent, "__file__", str(package / "__init__.py"))
    assert profile_dir_candidates()[0] == package / "firmware_profiles"
    assert default_profiles_dir() == package / "firmware_profiles"
    assert [p.name for p in load_profiles()] == ["generic"]


# --- the command line -------------------------------------------------------------------


def test_cli_explain(capsys: pytest.CaptureFixture[str]) -> None:
    fixture = FACTS_DIR / "raspberry-pi-4-4gb.json"
    assert main(["profile", "detect", "--explain", "--facts", str(fixture)]) == 0
    out = capsys.readouterr().out
    assert f"Hardware facts (recorded in {fixture})" in out
    assert "device-tree model  Raspberry Pi 4 Model B Rev 1.4" in out
    assert "Profile: raspberry-pi-4-4gb (detected, 130 points;" in out
    assert (
        "+ device-tree model 'Raspberry Pi 4 Model B Rev 1.4' matches '^Raspberry Pi 4 Model B'"
        in out
    )
    assert "throttle 80 C, critical 85 C" in out
    assert "Other profiles" in out
    pi5_row = next(
        line for line in out.splitlines() if line.strip().startswith("raspberry-pi-5-8gb")
    )
    assert "matches none of" in pi5_row
    assert "memory 3794 MiB outside 7500..8300" in pi5_row
    generic_row = next(line for line in out.splitlines() if line.strip().startswith("generic "))
    assert "fallback: used only when no other profile matches" in generic_row


def test_cli_plain_and_override(capsys: pytest.CaptureFixture[str]) -> None:
    fixture = str(FACTS_DIR / "jetson-orin-nano-8gb.json")
    assert main(["profile", "detect", "--facts", fixture]) == 0
    assert capsys.readouterr().out == "jetson-orin-nano-8gb (detected)\n"
    assert main(["profile", "detect", "--facts", fixture, "--profile", "generic"]) == 0
    assert capsys.readouterr().out == "generic (override)\n"


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    fixture = FACTS_DIR / "nxp-imx8m-plus.json"
    assert main(["profile", "detect", "--json", "--facts", str(fixture)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["profile"] == "nxp-imx8m-plus"
    assert document["how"] == "detected"
    assert document["document"]["schema"] == "edgefleet.profile/1"
    assert document["facts"]["device_tree_model"] == "NXP i.MX8MPlus EVK board"
    assert document["facts"]["_source"].startswith("NXP i.MX 8M Plus EVK")
    assert len(document["scores"]) == len(SHIPPED)
    chosen = [s for s in document["scores"] if s["chosen"]]
    assert [s["name"] for s in chosen] == ["nxp-imx8m-plus"]
    assert all(s["lost_because"] for s in document["scores"] if not s["chosen"])


def test_cli_unknown_override_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    fixture = str(FACTS_DIR / "raspberry-pi-5-8gb.json")
    assert main(["profile", "detect", "--facts", fixture, "--profile", "pi9"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("edgefleet-agent: profile override: profile: ")


def test_cli_bad_profile_file_is_one_line_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy_profile(tmp_path, "generic")
    bad = copy_profile(tmp_path, "raspberry-pi-4-4gb")
    text = bad.read_text().replace("  threads: 3\n", "  threads: 3\n  gpu_memory_mb: 512\n")
    bad.write_text(text)
    line = text.splitlines().index("  gpu_memory_mb: 512") + 1
    fixture = str(FACTS_DIR / "raspberry-pi-4-4gb.json")
    status = main(["profile", "detect", "--profiles-dir", str(tmp_path), "--facts", fixture])
    captured = capsys.readouterr()
    assert status == 1
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"edgefleet-agent: {bad}:{line}: budgets.gpu_memory_mb: ")


def test_cli_bad_facts_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "facts.json"
    broken.write_text('{"architecture": "aarch64",\n')
    assert main(["profile", "detect", "--facts", str(broken)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"edgefleet-agent: {broken}:2: (json): valid JSON")
    assert err.count("\n") == 1


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile"]) == 2
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err


def test_cli_as_a_real_process(tmp_path: Path) -> None:
    fixture = FACTS_DIR / "x86-64-nvidia-server.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "profile",
            "detect",
            "--explain",
            "--facts",
            str(fixture),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Profile: x86-64-nvidia-server (detected" in result.stdout
    assert "+ provider CUDAExecutionProvider available" in result.stdout
    assert "intel-n100-gateway" in result.stdout
    assert result.stderr == ""


@pytest.mark.slow
def test_profiles_are_found_from_an_installed_wheel(tmp_path: Path) -> None:
    pytest.importorskip("hatchling")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")]
    subprocess.run([*build, str(REPO)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("edgefleet-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    fixture = FACTS_DIR / "raspberry-pi-5-8gb.json"
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "profile", "detect", "--json", "--facts", str(fixture)],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(site)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["profile"] == "raspberry-pi-5-8gb"
    assert document["profiles_dir"] == str(site / "agent" / "firmware_profiles")

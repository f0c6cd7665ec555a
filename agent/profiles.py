"""Firmware profiles on disk: where they are, loading them, and choosing one for this device."""

from __future__ import annotations

import re
from pathlib import Path

import agent
from contract.errors import ManifestError
from contract.profile import FirmwareProfile, HardwareFacts
from contract.profile_match import Choice, choose
from contract.yaml_source import load_profile

PROFILE_SUFFIXES = (".yaml", ".yml")

_NAME_LINE = re.compile(r"^name\s*:", re.MULTILINE)


def profile_dir_candidates() -> list[Path]:
    """Where profiles are looked for: inside an installed wheel first, then the checkout."""
    package_dir = Path(agent.__file__).resolve().parent
    return [package_dir / "firmware_profiles", package_dir.parent / "firmware-profiles"]


def default_profiles_dir() -> Path:
    """The first existing directory of ``profile_dir_candidates()``."""
    candidates = profile_dir_candidates()
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise ManifestError(
        " or ".join(str(c) for c in candidates),
        None,
        "(directory)",
        "a directory of firmware profiles; the installation is incomplete",
    )


def load_profiles(directory: str | Path | None = None) -> list[FirmwareProfile]:
    """Every ``*.yaml``/``*.yml`` profile in ``directory`` (default: the shipped ones), by file
    name. A broken file or a name used twice raises ``ManifestError`` naming file and line.
    """
    folder = default_profiles_dir() if directory is None else Path(directory)
    try:
        paths = sorted(p for p in folder.iterdir() if p.suffix in PROFILE_SUFFIXES)
    except OSError as exc:
        raise ManifestError(
            str(folder), None, "(directory)", f"a readable directory ({exc.strerror})"
        ) from exc
    if not paths:
        raise ManifestError(str(folder), None, "(directory)", "at least one *.yaml profile")

    profiles: list[FirmwareProfile] = []
    defined_in: dict[str, Path] = {}
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ManifestError(
                str(path), None, "(file)", f"a readable file ({exc.strerror})"
            ) from exc
        except UnicodeDecodeError as exc:
            raise ManifestError(str(path), None, "(file)", "UTF-8 text") from exc
        profile = load_profile(text, str(path))
        if profile.name in defined_in:
            raise ManifestError(
                str(path),
                _name_line(text),
                "name",
                f"a unique profile name; {profile.name!r} is already defined in "
                f"{defined_in[profile.name]}",
            )
        defined_in[profile.name] = path
        profiles.append(profile)
    return profiles


def detect(
    facts: HardwareFacts,
    override: str | None = None,
    profiles_dir: str | Path | None = None,
) -> Choice:
    """Choose this device's profile from the profiles in ``profiles_dir`` (default: shipped)."""
    return choose(load_profiles(profiles_dir), facts, override)


def _name_line(text: str) -> int | None:
    found = _NAME_LINE.search(text)
    return None if found is None else text.count("\n", 0, found.start()) + 1

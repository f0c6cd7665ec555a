"""What a simulation is made of: its configuration, the fleet plan, profiles, facts, figures.

Everything here is deterministic: the same configuration gives the same device ids, the
same profile per device and exactly the same devices in each failure share, so a test or
an operator can say in advance which devices will fail.
"""

from __future__ import annotations

import importlib.util
import json
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from contract.errors import KeyFormatError, ManifestError
from contract.profile import FirmwareProfile, HardwareFacts
from contract.signing import PublicKey, TrustedKeys
from contract.topics import device_id_problem
from contract.yaml_source import load_profile
from hub.errors import HubError

OfflineMode = Literal["never", "on_update", "after"]
OFFLINE_MODES: tuple[OfflineMode, ...] = ("never", "on_update", "after")
PROFILE_SUFFIXES = (".yaml", ".yml")
PRECISION_FACTOR = {"int8": 0.7, "fp16": 0.85, "fp32": 1.0}
P95_OVER_P50 = 1.6
P99_OVER_P50 = 2.2
SIMULATED_MEMORY_RESERVE_MB = 512


class SimulationError(HubError):
    """A simulation cannot start as configured (profiles, keys, limits, share values)."""


@dataclass(frozen=True)
class Failures:
    """Which share of the fleet misbehaves, and how. Shares are fractions of all devices.

    The shares are drawn independently (seeded), so one device may be both slow and
    failing to apply; ``round(share * devices)`` devices are chosen for each.
    """

    fail_apply: float = 0.0
    """Share that reports ``update.failed`` with ``fail_code`` on every apply."""
    fail_code: str = "fetch_error"
    offline: float = 0.0
    """Share that is offline as ``offline_mode`` says."""
    offline_mode: OfflineMode = "never"
    """never: never connects. on_update: drops its connection (the broker publishes its
    Will) when a new desired state arrives, before applying it. after: drops its connection
    ``offline_after_s`` after connecting."""
    offline_after_s: float = 30.0
    offline_for_s: float | None = None
    """How long a device that dropped stays away; None: until the simulation stops."""
    slow: float = 0.0
    """Share whose inference latency is multiplied by ``slow_factor``."""
    slow_factor: float = 3.0
    slow_version: str | None = None
    """Model-set version that is slow on those devices; None: every version."""
    errors: float = 0.0
    """Share whose inference requests fail at ``error_rate``."""
    error_rate: float = 0.2
    error_version: str | None = None
    """Model-set version that errs on those devices; None: every version."""
    crash_version: str | None = None
    """A model-set version whose smoke test fails (``update.failed``, smoke_test_error)."""
    crash: float = 1.0
    """Share of the fleet on which ``crash_version`` fails (default: every device)."""

    def check(self) -> None:
        for name in ("fail_apply", "offline", "slow", "errors", "crash", "error_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise SimulationError(f"{name} must be a share between 0 and 1, got {value}")
        if self.offline_mode not in OFFLINE_MODES:
            raise SimulationError(
                f"offline_mode must be one of {', '.join(OFFLINE_MODES)}, got {self.offline_mode!r}"
            )
        if self.slow_factor <= 0:
            raise SimulationError(f"slow_factor must be positive, got {self.slow_factor}")
        if self.offline_after_s < 0 or (self.offline_for_s is not None and self.offline_for_s < 0):
            raise SimulationError("offline_after_s and offline_for_s must not be negative")


@dataclass(frozen=True)
class SimulationConfig:
    """Everything a simulation needs. Picklable: worker processes receive a copy."""

    broker_url: str
    devices: int
    trusted_keys: tuple[PublicKey, ...]
    profiles: Mapping[str, int] = field(default_factory=dict)
    """Profile name -> weight; empty: every non-fallback profile of ``profiles_dir``, once."""
    profiles_dir: Path | None = None
    """Firmware profiles; None: the agent's shipped ones (see ``default_profiles_dir``)."""
    id_prefix: str = "sim"
    first_index: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    seed: int = 0
    failures: Failures = field(default_factory=Failures)
    telemetry_interval_s: float | None = None
    """None: the desired state's ``runtime.telemetry_interval_s`` (10 s before any)."""
    telemetry_qos: int = 1
    apply_delay_s: float = 1.0
    """Simulated stage+load+smoke time of an apply, jittered by +-50 %."""
    request_rate: float = 2.0
    """Simulated inference requests per second per model (0: no traffic)."""
    connect_rate: float = 500.0
    """Connection attempts per second, all processes together."""
    processes: int = 1
    threads: int = 1
    """Event-loop threads per process; one is enough (the GIL serialises them anyway)."""
    isolate: bool = False
    """Run the devices in worker processes even when ``processes`` is 1, so that they do not
    share this process's GIL (a hub or a benchmark driver in the same process)."""
    keepalive: int = 60
    connect_timeout_s: float = 15.0
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    outbox_limit: int = 100
    """Messages a disconnected device keeps for later (events, telemetry); older ones drop."""

    def check(self) -> None:
        if self.devices < 0:
            raise SimulationError(f"devices must not be negative, got {self.devices}")
        if not self.trusted_keys:
            raise SimulationError("at least one trusted hub key is needed")
        try:
            TrustedKeys(self.trusted_keys)
        except KeyFormatError as exc:
            raise SimulationError(f"trusted keys: {exc}") from None
        if self.processes < 1 or self.threads < 1:
            raise SimulationError("processes and threads must be at least 1")
        if self.connect_rate <= 0:
            raise SimulationError(f"connect_rate must be positive, got {self.connect_rate}")
        if self.telemetry_interval_s is not None and self.telemetry_interval_s <= 0:
            raise SimulationError("telemetry_interval_s must be positive")
        if self.telemetry_qos not in (0, 1):
            raise SimulationError(f"telemetry_qos must be 0 or 1, got {self.telemetry_qos}")
        if self.apply_delay_s < 0 or self.request_rate < 0:
            raise SimulationError("apply_delay_s and request_rate must not be negative")
        for name, weight in self.profiles.items():
            if weight < 0:
                raise SimulationError(f"profile {name}: weight must not be negative")
        if self.profiles and not any(self.profiles.values()):
            raise SimulationError("at least one profile needs a positive weight")
        problem = device_id_problem(device_id(self, max(0, self.devices - 1)))
        if problem is not None:
            raise SimulationError(f"id_prefix {self.id_prefix!r}: {problem}")
        self.failures.check()


@dataclass(frozen=True)
class DeviceSpec:
    """One simulated device as planned: who it is and how it misbehaves."""

    index: int
    device_id: str
    profile: str
    fail_apply: bool = False
    offline: bool = False
    slow: bool = False
    errors: bool = False
    crash: bool = False

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(
            name
            for name in ("fail_apply", "offline", "slow", "errors", "crash")
            if getattr(self, name)
        )


def device_id(config: SimulationConfig, index: int) -> str:
    """``{prefix}-{number}``, numbers zero-padded to at least five digits."""
    width = max(5, len(str(config.first_index + max(0, config.devices - 1))))
    return f"{config.id_prefix}-{config.first_index + index:0{width}d}"


def chosen(devices: int, share: float, seed: int, mode: str) -> frozenset[int]:
    """Exactly ``round(share * devices)`` indexes, drawn with a generator seeded per mode."""
    count = min(devices, round(share * devices))
    return frozenset(random.Random(f"{seed}:{mode}").sample(range(devices), count))


def plan_devices(config: SimulationConfig, weights: Sequence[tuple[str, int]]) -> list[DeviceSpec]:
    """The fleet: device ids, profiles (a weighted round robin) and failure modes."""
    cycle = [name for name, weight in weights for _ in range(weight)]
    if config.devices and not cycle:
        raise SimulationError("no profile to give the devices")
    n, f, seed = config.devices, config.failures, config.seed
    fail_apply = chosen(n, f.fail_apply, seed, "fail_apply")
    offline = chosen(n, f.offline, seed, "offline")
    slow = chosen(n, f.slow, seed, "slow")
    errors = chosen(n, f.errors, seed, "errors")
    crash = chosen(n, f.crash if f.crash_version else 0.0, seed, "crash")
    return [
        DeviceSpec(
            index=i,
            device_id=device_id(config, i),
            profile=cycle[i % len(cycle)],
            fail_apply=i in fail_apply,
            offline=i in offline,
            slow=i in slow,
            errors=i in errors,
            crash=i in crash,
        )
        for i in range(n)
    ]


def connects_at_all(spec: DeviceSpec, failures: Failures) -> bool:
    """Whether the device ever connects (an offline device in mode ``never`` does not)."""
    return not (spec.offline and failures.offline_mode == "never")


# ---- firmware profiles --------------------------------------------------------------


def profile_dir_candidates() -> list[Path]:
    """Where the agent's profiles are: its installed package, then the checkout.

    The agent package is located without importing it (hub/ never imports agent/).
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec("agent")
    if spec is not None and spec.submodule_search_locations:
        package = Path(next(iter(spec.submodule_search_locations))).resolve()
        candidates += [package / "firmware_profiles", package.parent / "firmware-profiles"]
    checkout = Path(__file__).resolve().parents[2] / "firmware-profiles"
    if checkout not in candidates:
        candidates.append(checkout)
    return candidates


def default_profiles_dir() -> Path:
    for candidate in profile_dir_candidates():
        if candidate.is_dir():
            return candidate
    where = " or ".join(str(c) for c in profile_dir_candidates())
    raise SimulationError(f"no firmware profiles found ({where}); pass a profiles directory")


def load_profiles(directory: Path | None = None) -> dict[str, FirmwareProfile]:
    """Every profile of ``directory`` (default: the shipped ones) by name."""
    folder = default_profiles_dir() if directory is None else directory
    try:
        paths = sorted(p for p in folder.iterdir() if p.suffix in PROFILE_SUFFIXES)
    except OSError as exc:
        raise SimulationError(f"{folder}: cannot read ({exc.strerror or exc})") from None
    profiles: dict[str, FirmwareProfile] = {}
    for path in paths:
        try:
            profile = load_profile(path.read_text(encoding="utf-8"), str(path))
        except (OSError, UnicodeDecodeError) as exc:
            raise SimulationError(f"{path}: cannot read ({exc})") from None
        except ManifestError as exc:
            raise SimulationError(str(exc)) from None
        profiles[profile.name] = profile
    if not profiles:
        raise SimulationError(f"{folder}: no *.yaml firmware profiles")
    return profiles


def profile_weights(
    config: SimulationConfig, available: Mapping[str, FirmwareProfile]
) -> list[tuple[str, int]]:
    """The configured (name, weight) pairs, or every non-fallback profile once."""
    if not config.profiles:
        names = [n for n, p in sorted(available.items()) if not p.fallback] or sorted(available)
        return [(name, 1) for name in names]
    unknown = sorted(set(config.profiles) - set(available))
    if unknown:
        raise SimulationError(
            f"unknown profile {', '.join(unknown)}; known: {', '.join(sorted(available))}"
        )
    return [(name, weight) for name, weight in config.profiles.items() if weight > 0]


def parse_profile_weights(text: str) -> dict[str, int]:
    """``"raspberry-pi-4-4gb=3,generic"`` -> ``{"raspberry-pi-4-4gb": 3, "generic": 1}``."""
    weights: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, weight = part.partition("=")
        try:
            value = int(weight) if weight else 1
        except ValueError:
            raise SimulationError(f"profile weight {part!r}: expected NAME or NAME=COUNT") from None
        if value < 0:
            raise SimulationError(f"profile weight {part!r} must not be negative")
        weights[name.strip()] = weights.get(name.strip(), 0) + value
    return weights


def facts_for(profile: FirmwareProfile) -> HardwareFacts:
    """Hardware facts a device of this class reports: inside the profile's memory range,
    on its first architecture, with every provider the profile lists."""
    match = profile.match
    architecture = match.architectures[0] if match.architectures else "x86_64"
    low, high = match.memory.min_mb, match.memory.max_mb
    if high is not None:
        total = (low + high) // 2
    else:
        total = max(low, profile.budgets.model_memory_mb + 2 * SIMULATED_MEMORY_RESERVE_MB)
    available = max(0, total - SIMULATED_MEMORY_RESERVE_MB)
    return HardwareFacts(
        architecture=architecture,
        cpu_count=max(1, profile.budgets.threads + 1),
        memory_total_mb=total,
        memory_available_mb=available,
        storage_free_mb=profile.budgets.storage_mb * 2,
        providers=list(profile.providers),
    )


# ---- latency model ------------------------------------------------------------------


def base_latency_ms(model: str, precision: str, profile: FirmwareProfile) -> float:
    """A device's typical p50 for a model: stable per model name, faster for int8 and for
    profiles with more threads."""
    spread = (zlib.crc32(model.encode()) % 1000) / 1000.0
    threads = max(1, profile.budgets.threads)
    profile_factor = min(3.0, max(0.5, 4.0 / threads))
    return (8.0 + 40.0 * spread) * PRECISION_FACTOR.get(precision, 1.0) * profile_factor


# ---- keys ---------------------------------------------------------------------------


def read_public_keys(path: Path) -> tuple[PublicKey, ...]:
    """Keys from the hub's public key file: ``{"keys": [...]}`` or a plain list."""
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SimulationError(f"{path}: cannot read the hub's public keys ({exc})") from None
    entries = data.get("keys") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise SimulationError(f'{path}: expected {{"keys": [{{"keyid": ..., "public_key": ...}}]}}')
    keys: list[PublicKey] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"keyid", "public_key"} <= set(entry):
            raise SimulationError(f"{path}: keys[{index}]: expected keyid and public_key")
        keys.append(PublicKey(keyid=str(entry["keyid"]), public_key=str(entry["public_key"])))
    try:
        TrustedKeys(keys)
    except KeyFormatError as exc:
        raise SimulationError(f"{path}: {exc}") from None
    return tuple(keys)


# ---- figures ------------------------------------------------------------------------


@dataclass
class SimStats:
    """Counters of a simulation (all processes together when merged)."""

    devices: int = 0
    expected_online: int = 0
    """Devices that connect at all (offline devices in mode never do not)."""
    connected: int = 0
    ever_connected: int = 0
    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    dropped_on_purpose: int = 0
    births: int = 0
    published: int = 0
    published_bytes: int = 0
    telemetry: int = 0
    events: int = 0
    states: int = 0
    received: int = 0
    desired_accepted: int = 0
    desired_refused: int = 0
    applies_ok: int = 0
    applies_failed: int = 0
    commits: int = 0
    rollbacks: int = 0
    commands: int = 0
    outbox_dropped: int = 0
    errors: int = 0
    """Exceptions caught in the event loop (a bug; the log has the traceback)."""
    ramp_s: float | None = None
    """Seconds from start until every device that connects at all had connected once."""
    generations: dict[int, int] = field(default_factory=dict)
    """Applied generation -> number of devices."""
    versions: dict[str, int] = field(default_factory=dict)
    """Model-set version served -> number of devices ("" for none yet)."""
    phases: dict[str, int] = field(default_factory=dict)

    @classmethod
    def merge(cls, parts: Sequence[SimStats]) -> SimStats:
        total = cls()
        for part in parts:
            for f in fields(cls):
                mine, theirs = getattr(total, f.name), getattr(part, f.name)
                if isinstance(theirs, dict):
                    for key, value in theirs.items():
                        mine[key] = mine.get(key, 0) + value
                elif f.name == "ramp_s":
                    continue
                else:
                    setattr(total, f.name, mine + theirs)
        ramps = [p.ramp_s for p in parts if p.expected_online]
        if ramps and all(r is not None for r in ramps):
            total.ramp_s = max(r for r in ramps if r is not None)
        elif not ramps:
            total.ramp_s = 0.0
        return total

    def as_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["generations"] = {str(k): v for k, v in sorted(self.generations.items())}
        return data


@dataclass(frozen=True)
class DeviceView:
    """One device as it is now."""

    device_id: str
    profile: str
    modes: tuple[str, ...]
    connected: bool
    session: int
    seq: int
    applied_generation: int
    desired_generation: int
    phase: str
    model_set_version: str | None
    last_error_code: str | None

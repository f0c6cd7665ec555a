"""``edgefleet-hub demo``: the whole product on one machine, in a few minutes.

What it does, in order (every step is a real process or a real API call):

1. **broker**: ``mosquitto`` from its binary when there is one, else the embedded broker of
   the ``amqtt`` package (MQTT 3.1.1 only: the hub is configured for 3.1.1, and the agents
   find out by themselves, falling back when the broker refuses MQTT 5), on a free
   loopback port;
2. **hub**: ``edgefleet-hub init`` into the demo's directory, then ``edgefleet-hub serve``
   in a child process (ingest, controller, artifact server, HTTP API);
3. **agents**: several ``edgefleet-agent run`` processes, each overriding its firmware
   profile so that one machine plays a fleet (Raspberry Pi, Intel N100 gateway, NVIDIA
   server, Jetson, i.MX 8M Plus), each with its own inference API port;
4. **models**: the three real OCR models of ``rapidocr-onnxruntime`` (detector,
   classifier, recogniser) registered through the API, the classifier with an int8 variant
   the hub derives; the model set ``ocr`` 1.0.0 and a policy for the fleet;
5. **load**: a small load generator (``hub.demo_load``) calls every agent's inference API;
6. **rollouts**: when the hub has them, a canary-then-batches rollout to model set 2.0.0
   while the load runs, then a rollout of a deliberately broken model (its output is
   NaN) that the canary gate stops and rolls back;
7. **summary**: devices, profile, the variant each chose, latency p50/p95 from the load
   generator and from the hub's telemetry, the rollout timeline, as a table and, with
   ``--summary-json``, as JSON.

Then everything stops — load, agents, hub, broker, in that order — also on Ctrl-C, and the
demo checks that none of its processes is left. ``--keep`` leaves the fleet running until
Ctrl-C and prints how to point ``mosquitto_sub`` and the CLI at it.

Every child runs in its own session (a Ctrl-C in the terminal reaches the demo only, which
then stops the children in order) and, on Linux, is told to exit when the demo dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, Literal

from hub.broker import MosquittoBroker, find_mosquitto, free_port
from hub.config import HubConfig, load_config
from hub.demo_load import LoadGenerator, Target, Tensor
from hub.errors import ClientError, HubError
from hub.init import init_hub

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from hub.api_models import (
        DeviceDetail,
        DeviceSummary,
        ModelVariant,
        RolloutDetail,
        RolloutEventOut,
    )
    from hub.client import HubClient

BrokerChoice = Literal["auto", "mosquitto", "amqtt"]

FLEET: tuple[tuple[str, str], ...] = (
    ("rpi4-01", "raspberry-pi-4-4gb"),
    ("n100-02", "intel-n100-gateway"),
    ("gpu-03", "x86-64-nvidia-server"),
    ("rpi5-04", "raspberry-pi-5-8gb"),
    ("jetson-05", "jetson-orin-nano-8gb"),
    ("imx8-06", "nxp-imx8m-plus"),
)
"""Device id and firmware profile of each demo agent, in the order they are used."""
DEFAULT_DEVICES = 6
QUICK_DEVICES = 3
MAX_DEVICES = 24

OCR_FILES = {
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
}
OCR_INPUTS: dict[str, dict[str, list[int]]] = {
    "det": {"x": [1, 3, 320, 320]},
    "cls": {"x": [1, 3, 48, 192]},
    "rec": {"x": [1, 3, 48, 320]},
}
OCR_PRIORITY = {"det": 30, "cls": 10, "rec": 20}
DEFAULT_MEMORY_MB = {"det": 60, "cls": 20, "rec": 100}

MODEL_SET = "ocr"
POLICY = "ocr-fleet"
FLEET_LABELS = {"fleet": "demo"}
V1 = "1.0.0"
V2 = "2.0.0"
BROKEN = "3.0.0"
CLS_V2 = "1.1.0"
CLS_BROKEN = "3.0.0-nan"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

HUB_READY_TIMEOUT_S = 60.0
AGENT_BIRTH_TIMEOUT_S = 90.0
CONVERGE_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.25
ROLLOUT_TIMEOUT_S = 300.0


class DemoError(HubError):
    """A step of the demo failed; the message says which and where its logs are."""


# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoOptions:
    """What ``edgefleet-hub demo`` was asked; None: the default for quick or full."""

    quick: bool = False
    keep: bool = False
    devices: int | None = None
    bake_s: float | None = None
    load_s: float | None = None
    rps: float | None = None
    workdir: Path | None = None
    summary_json: Path | None = None
    broker: BrokerChoice = "auto"
    rollouts: bool = True
    live: bool | None = None
    """The rich live view: None decides by whether stdout is a terminal."""

    @property
    def device_count(self) -> int:
        count = self.devices or (QUICK_DEVICES if self.quick else DEFAULT_DEVICES)
        return max(1, min(MAX_DEVICES, count))

    @property
    def bake(self) -> float:
        """Bake after every rollout cohort; zero with --quick."""
        return self.bake_s if self.bake_s is not None else (0.0 if self.quick else 10.0)

    @property
    def soak(self) -> float:
        """Seconds of load before the first rollout and after the last."""
        return self.load_s if self.load_s is not None else (3.0 if self.quick else 15.0)

    @property
    def requests_per_s(self) -> float:
        return self.rps if self.rps is not None else (3.0 if self.quick else 4.0)

    @property
    def probation(self) -> float:
        return 0.0 if self.quick else 5.0

    @property
    def telemetry_interval(self) -> float:
        return 1.0 if self.quick else 2.0


def fleet(count: int) -> list[tuple[str, str]]:
    """``count`` (device id, profile) pairs: FLEET, then round again with new numbers."""
    devices = []
    for index in range(count):
        device_id, profile = FLEET[index % len(FLEET)]
        if index >= len(FLEET):
            device_id = f"{device_id.rsplit('-', 1)[0]}-{index + 1:02d}"
        devices.append((device_id, profile))
    return devices


# --- the record of what happened ---------------------------------------------------------------


@dataclass(frozen=True)
class Moment:
    """One line of the timeline: seconds since the demo started, where, what."""

    t: float
    source: str
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"t": round(self.t, 2), "source": self.source, "text": self.text}


@dataclass
class RolloutOutcome:
    """A rollout the demo ran: what it asked, how it ended, its timeline."""

    name: str
    target: str
    expected: str
    """The phase the demo expects it to end in (succeeded, or rolled back / failed)."""
    phase: str | None = None
    reason: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    timeline: list[Moment] = field(default_factory=list)
    failed_devices: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "failed_devices": list(self.failed_devices),
            "target": self.target,
            "expected": self.expected,
            "phase": self.phase,
            "reason": self.reason,
            "duration_s": (
                round(self.finished_at - self.started_at, 2)
                if self.started_at is not None and self.finished_at is not None
                else None
            ),
            "timeline": [m.to_dict() for m in self.timeline],
        }


# --- child processes -----------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


@functools.cache
def _libc() -> Any:
    """The C library on Linux (for prctl), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the demo dies, whatever kills it (Linux)."""
    libc = _libc()
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The demo's environment without what would steer a hub or an agent (or systemd's
    notification socket, when the demo itself runs under systemd)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EDGEFLEET_", "NOTIFY_SOCKET", "WATCHDOG_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class Child:
    """A process the demo started; its output goes to ``log_path``."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        kept = [line for line in text.splitlines() if " apscheduler." not in line]
        return "\n".join(kept[-lines:])

    def describe(self) -> str:
        state = "running" if self.alive else f"exited with {self.proc.returncode}"
        return f"{self.name} (pid {self.pid}, {state}, log {self.log_path}):\n{self.tail()}"

    def terminate(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def reap(self, timeout: float) -> int:
        """Wait for the exit (SIGKILL after ``timeout``); the exit status."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


class Children:
    """Every process the demo starts, stopped in groups in the order asked."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: list[Child] = []

    def spawn(self, name: str, argv: Sequence[str], *, cwd: Path | None = None) -> Child:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        log = log_path.open("ab")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(),
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent if _libc() is not None else None,  # noqa: PLW1509
            )
        except BaseException:
            log.close()
            raise
        child = Child(name, proc, log_path, log)
        self.children.append(child)
        return child

    def stop(self, group: Sequence[Child], timeout: float = STOP_TIMEOUT_S) -> dict[str, int]:
        """SIGTERM every child of ``group`` at once, then reap each; name -> exit status."""
        for child in group:
            child.terminate()
        deadline = time.monotonic() + timeout
        codes = {}
        for child in group:
            codes[child.name] = child.reap(max(0.1, deadline - time.monotonic()))
            if child in self.children:
                self.children.remove(child)
        return codes

    def stop_all(self) -> dict[str, int]:
        """Everything still held, the newest first."""
        return self.stop(list(reversed(self.children)))

    def running(self) -> list[Child]:
        return [c for c in self.children if c.alive]


def leftover_processes(pids: Sequence[int]) -> list[int]:
    """Those of ``pids`` still running (not zombies), and any child of this process."""
    left = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        if not _is_zombie(pid):
            left.append(pid)
    with contextlib.suppress(ImportError):
        import psutil

        left += [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in left]
    return left


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def wait_port(host: str, port: int, child: Child, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not child.alive:
            raise DemoError(f"{what} exited before it listened: {child.describe()}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise DemoError(
                    f"{what} did not listen on {host}:{port} in {timeout:g} s: {child.describe()}"
                ) from None
            time.sleep(0.05)


# --- the broker ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerInfo:
    """The broker the demo runs: which one, where, and the MQTT version it speaks."""

    kind: Literal["mosquitto", "amqtt"]
    host: str
    port: int
    protocol: Literal["5", "3.1.1"]
    child: Child

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def describe(self) -> str:
        if self.kind == "mosquitto":
            return f"mosquitto (MQTT 5) at {self.url}"
        return f"amqtt, embedded (MQTT 3.1.1) at {self.url}"


def amqtt_available() -> bool:
    return importlib.util.find_spec("amqtt") is not None


def start_broker(choice: BrokerChoice, workdir: Path, children: Children) -> BrokerInfo:
    """mosquitto when asked or found, else amqtt; DemoError when neither can run."""
    binary = find_mosquitto()
    if choice == "mosquitto" or (choice == "auto" and binary is not None):
        if binary is None:
            raise DemoError("--broker mosquitto: no mosquitto binary (apt-get install mosquitto)")
        runner = MosquittoBroker(workdir=workdir / "broker")
        config = runner.write_config()
        child = children.spawn("mosquitto", [binary, "-c", str(config)])
        wait_port(runner.host, runner.port, child, 15.0, "mosquitto")
        return BrokerInfo("mosquitto", runner.host, runner.port, "5", child)
    if not amqtt_available():
        raise DemoError(
            "no MQTT broker: install mosquitto (apt-get install mosquitto), or the demo's "
            "embedded one with pip install 'edgefleet[demo]'"
        )
    directory = workdir / "broker"
    directory.mkdir(parents=True, exist_ok=True)
    host, port = "127.0.0.1", free_port()
    config = directory / "amqtt.yaml"
    config.write_text(
        "listeners:\n"
        "  default:\n"
        "    type: tcp\n"
        f"    bind: {host}:{port}\n"
        "plugins:\n"
        "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
        "    allow_anonymous: true\n"
    )
    child = children.spawn(
        "amqtt", [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(config)]
    )
    wait_port(host, port, child, 30.0, "the amqtt broker")
    return BrokerInfo("amqtt", host, port, "3.1.1", child)


# --- the hub -------------------------------------------------------------------------------------


def make_hub(directory: Path, broker: BrokerInfo) -> HubConfig:
    """``edgefleet-hub init`` for this broker, with free ports; MQTT 3.1.1 (and no shared
    subscription) for a broker that speaks nothing newer."""
    result = init_hub(
        directory,
        hub_id="demo-hub",
        broker_url=broker.url,
        api_bind=f"127.0.0.1:{free_port()}",
        artifacts_bind=f"127.0.0.1:{free_port()}",
    )
    if broker.protocol == "3.1.1":
        text = result.config_path.read_text().replace('protocol = "5"', 'protocol = "3.1.1"')
        result.config_path.write_text(text)
    return load_config(result.config_path)


def api_url(config: HubConfig) -> str:
    return f"http://{config.api.bind}"


def executable(name: str) -> str:
    """How to run ``name`` from this installation: beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name) or name


# --- models, model sets, policy ------------------------------------------------------------------


def ocr_model_files() -> dict[str, Path]:
    """The OCR models shipped in the rapidocr-onnxruntime package (not imported: only its
    files are needed)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise DemoError(
            "the demo's models come with rapidocr-onnxruntime: pip install 'edgefleet[demo]'"
        )
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = {name: models / filename for name, filename in OCR_FILES.items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DemoError(f"rapidocr-onnxruntime is installed without its models: {missing}")
    return files


def nan_model(path: Path) -> Path:
    """A valid ONNX model whose output is always NaN (``sqrt(-(|x| + 1))``): it loads, and
    the agent's smoke test refuses it."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    one = helper.make_node("Constant", [], ["one"], value=helper.make_tensor("c", 1, [], [1.0]))
    nodes = [
        one,
        helper.make_node("Abs", ["x"], ["a"]),
        helper.make_node("Add", ["a", "one"], ["b"]),
        helper.make_node("Neg", ["b"], ["c"]),
        helper.make_node("Sqrt", ["c"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "nan", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def memory_of(variant: ModelVariant) -> int:
    if variant.load_memory_mb is None:
        return DEFAULT_MEMORY_MB.get(variant.name, 50)
    return max(1, math.ceil(variant.load_memory_mb))


def modelset_yaml(
    variants: Sequence[ModelVariant], *, version: str, models: Mapping[str, str]
) -> str:
    """Model set ``ocr`` ``version``: for each model name -> model version in ``models``,
    every stored variant of it."""
    lines = [
        "schema: edgefleet.modelset/1",
        f"name: {MODEL_SET}",
        f'version: "{version}"',
        "models:",
    ]
    for name, model_version in models.items():
        chosen = sorted(
            (v for v in variants if v.name == name and v.version == model_version),
            key=lambda v: v.variant,
        )
        if not chosen:
            raise DemoError(f"no variant of model {name} {model_version} is registered")
        lines += [
            f"  - name: {name}",
            f'    version: "{model_version}"',
            f"    priority: {OCR_PRIORITY[name]}",
        ]
        shapes = OCR_INPUTS[name] if chosen[0].inputs and _dynamic(chosen[0]) else {}
        if shapes:
            lines.append("    inputs:")
            lines += [f"      {k}: {{shape: {v}}}" for k, v in shapes.items()]
        lines.append("    variants:")
        for variant in chosen:
            lines += [
                f"      - name: {variant.variant}",
                f"        precision: {variant.precision}",
                "        artifact:",
                f"          sha256: {variant.sha256}",
                f"          size: {variant.size}",
                "        requires:",
                f"          memory_mb: {memory_of(variant)}",
            ]
    return "\n".join(lines) + "\n"


def _dynamic(variant: ModelVariant) -> bool:
    """Whether any input of the variant has a dynamic dimension."""
    for tensor in variant.inputs:
        shape = tensor.get("shape") or []
        if any(not isinstance(d, int) or d < 0 for d in shape):
            return True
    return False


def policy_yaml(*, version: str, probation_s: float, telemetry_interval_s: float) -> str:
    return (
        "schema: edgefleet.policy/1\n"
        f"name: {POLICY}\n"
        "priority: 0\n"
        "selector:\n"
        f"  labels: {json.dumps(FLEET_LABELS)}\n"
        "model_set:\n"
        f"  name: {MODEL_SET}\n"
        f'  version: "{version}"\n'
        "runtime:\n"
        f"  probation_s: {probation_s}\n"
        f"  telemetry_interval_s: {telemetry_interval_s}\n"
        "  min_requests_for_probation: 5\n"
    )


# --- agents --------------------------------------------------------------------------------------


@dataclass
class DemoAgent:
    device_id: str
    profile: str
    config_path: Path
    api_port: int
    child: Child | None = None


def write_agent_config(
    directory: Path, device_id: str, profile: str, config: HubConfig, broker: BrokerInfo
) -> DemoAgent:
    state_dir = directory / device_id
    state_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    lines = [
        f"device_id = {json.dumps(device_id)}",
        f"state_dir = {json.dumps(str(state_dir))}",
        f"profile = {json.dumps(profile)}",
        'log_level = "info"',
        "",
        "[broker]",
        f"url = {json.dumps(broker.url)}",
        "keepalive = 5",
        # The agent falls back to 3.1.1 when a broker answers MQTT 5 with CONNACK 0x84,
        # but amqtt closes the connection without a CONNACK when the CONNECT carries a
        # Will (every agent's does): say 3.1.1 from the start.
        *([f'protocol = "{broker.protocol}"'] if broker.protocol != "5" else []),
        "",
        "[trust]",
        f"hub_public_keys_file = {json.dumps(str(config.public_keys_path))}",
        "",
        "[labels]",
        *(f"{k} = {json.dumps(v)}" for k, v in FLEET_LABELS.items()),
        f"site = {json.dumps('demo-' + profile.split('-', maxsplit=1)[0])}",
        "",
        "[api]",
        f'bind = "127.0.0.1:{port}"',
    ]
    path = directory / f"{device_id}.toml"
    path.write_text("\n".join(lines) + "\n")
    return DemoAgent(device_id, profile, path, port)


def converged(device: DeviceDetail, versions: Mapping[str, str] | None = None) -> bool:
    """The device applied and committed the newest document the hub published for it, and
    (with ``versions``) runs those model versions."""
    desired = device.desired
    if desired is None or desired.published_at is None:
        return False
    if device.applied_generation != desired.generation or device.phase != "committed":
        return False
    if device.state is None:
        return False
    running = {m.name: m.version for m in device.state.models if m.ready}
    if versions is not None:
        return all(running.get(name) == v for name, v in versions.items() if name in running)
    return True


def failed_generation(device: DeviceDetail) -> str | None:
    """Why the device failed the newest document the hub published for it, if it did."""
    desired, state = device.desired, device.state
    if desired is None or state is None or state.last_error is None:
        return None
    if state.last_error.generation != desired.generation or device.phase != "failed":
        return None
    error = state.last_error
    hint = ""
    if error.code == "nothing_fits":
        hint = " (this machine has too little memory available right now)"
    return f"generation {error.generation}: {error.code}: {error.message}{hint}"


# --- the view ------------------------------------------------------------------------------------


@dataclass
class DeviceRow:
    device_id: str
    profile: str
    online: bool = False
    generation: int = 0
    phase: str = "-"
    models: dict[str, str] = field(default_factory=dict)
    """model -> "version variant" of what it reports ready."""


class View:
    """What the person watching sees: one line per moment, and, on a terminal, a live
    table of the fleet (rich) refreshed from the hub's API and the load generator."""

    def __init__(self, console: Console, *, live: bool, started: float) -> None:
        self.console = console
        self.live_enabled = live
        self.started = started
        self.stage = "starting"
        self.timeline: list[Moment] = []
        self.rows: dict[str, DeviceRow] = {}
        self.rollout_line = ""
        self.load: LoadGenerator | None = None
        self._lock = threading.Lock()
        self._live: Any = None
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()
        self._client: HubClient | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def note(self, text: str, *, source: str = "demo") -> Moment:
        moment = Moment(self.elapsed(), source, text)
        with self._lock:
            self.timeline.append(moment)
        style = {"demo": "bold", "rollout": "magenta", "device": "cyan"}.get(source, "")
        self.console.print(f"[dim]{moment.t:7.1f}s[/] [{style}]{_escape(text)}[/]")
        return moment

    def set_stage(self, stage: str) -> None:
        self.stage = stage
        self.note(stage)

    # --- the live table ----------------------------------------------------------------

    def start_live(self, client: HubClient, devices: Sequence[DemoAgent]) -> None:
        for agent in devices:
            self.rows.setdefault(agent.device_id, DeviceRow(agent.device_id, agent.profile))
        if not self.live_enabled:
            return
        from rich.live import Live

        self._client = client
        self._stop.clear()
        self._poller = threading.Thread(target=self._poll, name="demo-view", daemon=True)
        self._poller.start()
        self._live = Live(
            get_renderable=self._render,
            console=self.console,
            refresh_per_second=2,
            transient=True,
        )
        self._live.start()

    def stop_live(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(10)
            self._poller = None
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            client = self._client
            if client is None:
                continue
            try:
                devices = list(client.iter_devices(labels=FLEET_LABELS))
            except HubError:
                continue
            self.update_devices(devices)

    def update_devices(self, devices: Sequence[DeviceSummary]) -> None:
        with self._lock:
            for device in devices:
                row = self.rows.setdefault(
                    device.device_id, DeviceRow(device.device_id, device.profile or "?")
                )
                row.online = device.online
                row.generation = device.applied_generation
                row.phase = device.phase or "-"
                row.models = {
                    m.name: f"{m.version} {m.variant or '?'}" for m in device.models if m.ready
                }

    def _render(self) -> RenderableType:
        from rich.console import Group
        from rich.table import Table

        table = Table(
            title=f"edgefleet demo: {self.stage}  ({self.elapsed():.0f} s)",
            title_justify="left",
            expand=False,
        )
        for column in ("device", "profile", "online", "gen", "phase", "det", "cls", "rec"):
            table.add_column(column)
        for column in ("req/s", "p50 ms", "p95 ms", "errors"):
            table.add_column(column, justify="right")
        with self._lock:
            rows = list(self.rows.values())
        for row in rows:
            rate = p50 = p95 = errors = "-"
            if self.load is not None and row.device_id in {t.device_id for t in self.load.targets}:
                recent = self.load.device(row.device_id, recent=True)
                rate = f"{self.load.rate(row.device_id):.1f}"
                p50, p95 = _ms(recent.p50_ms), _ms(recent.p95_ms)
                errors = str(recent.errors)
            table.add_row(
                row.device_id,
                row.profile,
                "yes" if row.online else "no",
                str(row.generation),
                row.phase,
                row.models.get("det", "-"),
                row.models.get("cls", "-"),
                row.models.get("rec", "-"),
                rate,
                p50,
                p95,
                errors,
            )
        parts: list[RenderableType] = [table]
        if self.rollout_line:
            parts.append(_escape(self.rollout_line))
        return Group(*parts)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# --- the demo ------------------------------------------------------------------------------------


class Demo:
    """One run of the demo; ``run()`` returns the exit status."""

    def __init__(self, options: DemoOptions, console: Console | None = None) -> None:
        from rich.console import Console

        self.options = options
        if console is None:
            wide = None if os.environ.get("COLUMNS") or sys.stdout.isatty() else 130
            console = Console(highlight=False, width=wide)
        self.console = console
        live = options.live if options.live is not None else self.console.is_terminal
        self.started = time.monotonic()
        self.view = View(self.console, live=live, started=self.started)
        self.own_workdir = options.workdir is None
        self.workdir = (
            options.workdir.resolve()
            if options.workdir is not None
            else Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
        )
        self.children = Children(self.workdir / "logs")
        self.broker: BrokerInfo | None = None
        self.hub_config: HubConfig | None = None
        self.hub_child: Child | None = None
        self.client: HubClient | None = None
        self.agents: list[DemoAgent] = []
        self.load: LoadGenerator | None = None
        self.variants: list[ModelVariant] = []
        self.rollouts: list[RolloutOutcome] = []
        self.rollouts_note: str | None = None
        self.durations: dict[str, float] = {}
        self.summary: dict[str, Any] | None = None
        self.pids: list[int] = []
        self.agents_started = self.started
        self.keeping = False

    # --- entry -----------------------------------------------------------------------------

    def run(self) -> int:
        status = EXIT_OK
        failure: str | None = None
        interrupted = False
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self._scenario()
            if self.options.keep:
                self._keep()
        except KeyboardInterrupt:
            if self.keeping:  # the way to end --keep
                self.view.note("stopping everything")
            else:
                interrupted = True
                status = EXIT_INTERRUPTED
                self.view.note("interrupted: stopping everything")
        except HubError as exc:  # DemoError, ClientError, ...
            failure = " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
            full = str(exc)
            status = EXIT_FAILED
            self.console.print(f"[red]demo failed:[/] {_escape(full)}")
        finally:
            ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                clean = self._shutdown()
            finally:
                signal.signal(signal.SIGINT, ignored)
                signal.signal(signal.SIGTERM, previous)
        if self.summary is not None:
            self.summary["stopped_cleanly"] = clean
        if self.options.summary_json is not None:
            self._write_summary(failure, interrupted)
        if not clean and status == EXIT_OK:
            status = EXIT_FAILED
        if status == EXIT_OK and self.own_workdir and not self.options.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif self.own_workdir:
            self.console.print(f"logs and data kept in {self.workdir}")
        return status

    def _scenario(self) -> None:
        options = self.options
        self.console.print(
            f"[bold]edgefleet demo[/]: {options.device_count} devices"
            f"{', quick' if options.quick else ''}; working in {self.workdir}"
        )
        self._start_broker()
        self._start_hub()
        self._start_agents()
        self._register_v1()
        self._wait_fleet()
        self._start_load()
        self._soak("load running")
        if options.rollouts:
            self._run_rollouts()
        self._soak("load after the rollouts")
        if not options.keep:  # with --keep the load goes on, for telemetry to show
            self.load_stopped()
        self.summary = self._collect()
        self.view.stop_live()
        self._print_summary(self.summary)
        self._check(self.summary)

    def load_stopped(self) -> None:
        if self.load is not None:
            self.load.stop()

    # --- steps -----------------------------------------------------------------------------

    def _timed(self, name: str, started: float) -> None:
        self.durations[name] = round(time.monotonic() - started, 2)

    def _start_broker(self) -> None:
        started = time.monotonic()
        self.broker = start_broker(self.options.broker, self.workdir, self.children)
        self.pids.append(self.broker.child.pid)
        self._timed("broker", started)
        self.view.note(f"broker: {self.broker.describe()}")

    def _start_hub(self) -> None:
        from hub.client import HubClient

        assert self.broker is not None
        started = time.monotonic()
        config = make_hub(self.workdir / "hub", self.broker)
        assert config.source is not None
        self.hub_config = config
        self.hub_child = child = self.children.spawn(
            "hub", [sys.executable, "-m", "hub.cli", "serve", "--config", str(config.source)]
        )
        self.pids.append(child.pid)
        self.client = client = HubClient(api_url(config), config.api_token(), timeout=120)
        deadline = time.monotonic() + HUB_READY_TIMEOUT_S
        while True:
            if not child.alive:
                raise DemoError(f"the hub exited: {child.describe()}")
            try:
                client.health()
                break
            except ClientError:
                if time.monotonic() > deadline:
                    raise DemoError(f"the hub's API did not answer: {child.describe()}") from None
                time.sleep(POLL_S)
        self._timed("hub", started)
        self.view.note(f"hub: serving, API {api_url(config)}")

    def _start_agents(self) -> None:
        assert self.broker is not None and self.hub_config is not None
        directory = self.workdir / "agents"
        for device_id, profile in fleet(self.options.device_count):
            agent = write_agent_config(directory, device_id, profile, self.hub_config, self.broker)
            agent.child = self.children.spawn(
                device_id,
                [sys.executable, "-m", "agent.cli", "run", "--config", str(agent.config_path)],
            )
            self.pids.append(agent.child.pid)
            self.agents.append(agent)
        self.agents_started = time.monotonic()
        self.view.note(
            f"agents: started {len(self.agents)} "
            f"({', '.join(f'{a.device_id} as {a.profile}' for a in self.agents)})"
        )

    def _register_v1(self) -> None:
        client = self._client()
        started = time.monotonic()
        files = ocr_model_files()
        for name, path in files.items():
            stored = client.add_model(
                path,
                name=name,
                version=V1,
                quantize="int8" if name == "cls" else None,
                input_shapes=OCR_INPUTS[name],
            )
            self.variants += stored
            shown = ", ".join(
                f"{v.variant} ({v.size / 1e6:.1f} MB, {v.load_memory_mb or 0:.0f} MiB)"
                for v in stored
            )
            self.view.note(f"model {name} {V1}: {shown}")
        record = client.apply_model_set(
            modelset_yaml(self.variants, version=V1, models=dict.fromkeys(OCR_FILES, V1)),
            "demo:ocr-1.0.0.yaml",
        )
        self.view.note(f"model set {record.name} {record.version} published")
        policy = client.apply_policy(
            policy_yaml(
                version=V1,
                probation_s=self.options.probation,
                telemetry_interval_s=self.options.telemetry_interval,
            ),
            "demo:policy.yaml",
        )
        self.view.note(
            f"policy {policy.name} v{policy.version}: devices labelled fleet=demo run "
            f"{MODEL_SET} {V1}"
        )
        self._timed("register", started)

    def _wait_fleet(self) -> None:
        self.view.start_live(self._client(), self.agents)
        self._wait_converged(dict.fromkeys(OCR_FILES, V1), V1, births=True)
        self._timed("fleet_ready", self.agents_started)

    def _wait_converged(
        self, versions: Mapping[str, str], label: str, *, births: bool = False
    ) -> None:
        """Until every device committed the newest document the hub published for it, with
        the model ``versions`` of model set ``label``."""
        client = self._client()
        self.view.set_stage(f"waiting for every device to run {MODEL_SET} {label}")
        born: set[str] = set()
        done: set[str] = set()
        started = time.monotonic()
        deadline = started + CONVERGE_TIMEOUT_S
        while len(done) < len(self.agents):
            self._check_children()
            for agent in self.agents:
                if agent.device_id in done:
                    continue
                try:
                    device = client.device(agent.device_id)
                except ClientError as exc:
                    if exc.status != 404:
                        raise
                    continue
                if births and agent.device_id not in born and device.profile is not None:
                    born.add(agent.device_id)
                    self.view.note(
                        f"{agent.device_id}: online as {device.profile} ({device.profile_source})",
                        source="device",
                    )
                failure = failed_generation(device)
                if failure is not None:
                    raise DemoError(
                        f"{agent.device_id} could not apply {MODEL_SET} {label}: {failure}"
                        + (f"\n{agent.child.describe()}" if agent.child else "")
                    )
                if converged(device, versions):
                    done.add(agent.device_id)
                    self.view.note(
                        f"{agent.device_id}: runs {MODEL_SET} {label}: {_models_text(device)}",
                        source="device",
                    )
            if len(done) < len(self.agents):
                unborn = [a for a in self.agents if births and a.device_id not in born]
                if unborn and time.monotonic() > started + AGENT_BIRTH_TIMEOUT_S:
                    raise DemoError(
                        f"no birth from {[a.device_id for a in unborn]} in "
                        f"{AGENT_BIRTH_TIMEOUT_S:g} s: they do not reach the broker or the "
                        "hub does not hear them\n"
                        + "\n\n".join(a.child.describe() for a in unborn if a.child)
                    )
                if time.monotonic() > deadline:
                    missing = [a for a in self.agents if a.device_id not in done]
                    raise DemoError(
                        f"not every device runs {MODEL_SET} {label} after "
                        f"{CONVERGE_TIMEOUT_S:g} s: {[a.device_id for a in missing]}\n"
                        + "\n\n".join(a.child.describe() for a in missing if a.child)
                    )
                time.sleep(POLL_S)

    def _start_load(self) -> None:
        self.load = LoadGenerator(
            [Target(a.device_id, "127.0.0.1", a.api_port) for a in self.agents],
            {name: Tensor("x", tuple(shape["x"])) for name, shape in OCR_INPUTS.items()},
            rps=self.options.requests_per_s,
        )
        self.view.load = self.load
        self.load.start()
        self.view.note(
            f"load: {self.options.requests_per_s:g} requests/s to each device's inference API "
            "(cls, rec, det)"
        )

    def _soak(self, stage: str) -> None:
        if self.options.soak <= 0:
            return
        self.view.set_stage(f"{stage} ({self.options.soak:g} s)")
        deadline = time.monotonic() + self.options.soak
        while time.monotonic() < deadline:
            self._check_children()
            time.sleep(min(POLL_S * 2, max(0.0, deadline - time.monotonic())))

    # --- rollouts --------------------------------------------------------------------------

    def _run_rollouts(self) -> None:
        """The two rollouts, when this hub has rollouts (hub/rollouts.py and the client's
        rollout methods); otherwise a note in the summary."""
        if not rollouts_available():
            self.rollouts_note = (
                "rollouts are not part of this hub build yet: the demo ran without them"
            )
            self.view.note(self.rollouts_note)
            return
        v2 = self._register_v2()
        started = time.monotonic()
        self._rollout(
            RolloutOutcome(name=f"{MODEL_SET}-{V2}", target=V2, expected="succeeded"),
            rollout_yaml(f"{MODEL_SET}-{V2}", V2, batches=[50, 100], bake_s=self.options.bake),
        )
        self._wait_converged(v2, V2)
        self._timed("rollout_v2", started)
        self._soak("load on model set 2.0.0")
        self._register_broken(v2)
        started = time.monotonic()
        self._rollout(
            RolloutOutcome(name=f"{MODEL_SET}-{BROKEN}", target=BROKEN, expected="failed"),
            rollout_yaml(f"{MODEL_SET}-{BROKEN}", BROKEN, batches=[100], bake_s=0.0),
        )
        self._wait_converged(v2, f"{V2} again")
        broken = self.rollouts[-1]
        failed = broken.failed_devices
        broken.timeline.append(
            self.view.note(
                f"rolled back: {', '.join(failed) or 'no device'} back on {MODEL_SET} {V2}; "
                "the other devices were never switched",
                source="rollout",
            )
        )
        self._timed("rollout_broken", started)

    def _register_v2(self) -> dict[str, str]:
        """cls 1.1.0 (with its int8 variant) and model set 2.0.0 = det, rec 1.0.0 + cls 1.1.0."""
        client = self._client()
        files = ocr_model_files()
        stored = client.add_model(
            files["cls"],
            name="cls",
            version=CLS_V2,
            quantize="int8",
            input_shapes=OCR_INPUTS["cls"],
        )
        self.variants += stored
        self.view.note(f"model cls {CLS_V2}: {', '.join(v.variant for v in stored)}")
        versions = {"det": V1, "cls": CLS_V2, "rec": V1}
        record = client.apply_model_set(
            modelset_yaml(self.variants, version=V2, models=versions), "demo:ocr-2.0.0.yaml"
        )
        self.view.note(f"model set {record.name} {record.version} published")
        return versions

    def _register_broken(self, base: Mapping[str, str]) -> None:
        """cls 3.0.0-nan: a model whose output is NaN, built here with onnx; model set
        3.0.0 = 2.0.0 with that classifier."""
        client = self._client()
        path = nan_model(self.workdir / "cls-nan.onnx")
        stored = client.add_model(path, name="cls", version=CLS_BROKEN)
        self.variants += stored
        self.view.note(f"model cls {CLS_BROKEN}: a classifier whose output is NaN")
        versions = {**base, "cls": CLS_BROKEN}
        record = client.apply_model_set(
            modelset_yaml(self.variants, version=BROKEN, models=versions),
            "demo:ocr-3.0.0.yaml",
        )
        self.view.note(f"model set {record.name} {record.version} published (broken)")

    def _rollout(self, outcome: RolloutOutcome, text: str) -> None:
        """Start a rollout and follow it to its end, its events into the timeline."""
        from hub.rollout.model import TERMINAL_PHASES

        client = self._client()
        self.rollouts.append(outcome)
        self.view.set_stage(f"rollout {outcome.name}: {MODEL_SET} -> {outcome.target}")
        detail = client.start_rollout(text, f"demo:{outcome.name}.yaml")
        outcome.started_at = self.view.elapsed()
        seen: set[int] = set()
        deadline = time.monotonic() + ROLLOUT_TIMEOUT_S + 4 * self.options.bake
        while True:
            names = {c.index: c.name for c in detail.cohort_progress}
            for event in sorted(detail.events, key=lambda e: e.id):
                if event.id in seen:
                    continue
                seen.add(event.id)
                if event.kind == "device.failed" and event.device_id:
                    outcome.failed_devices.append(event.device_id)
                outcome.timeline.append(self.view.note(_event_text(event, names), source="rollout"))
            self.view.rollout_line = _rollout_line(detail)
            if detail.phase in TERMINAL_PHASES:
                break
            self._check_children()
            if time.monotonic() > deadline:
                raise DemoError(
                    f"rollout {outcome.name} still {detail.phase} after "
                    f"{ROLLOUT_TIMEOUT_S:g} s: {detail.reason}"
                )
            time.sleep(POLL_S * 2)
            detail = client.rollout(outcome.name, events=200)
        outcome.phase = detail.phase
        outcome.reason = detail.reason
        outcome.finished_at = self.view.elapsed()
        self.view.rollout_line = ""
        self.view.note(f"rollout {outcome.name}: {detail.phase} ({detail.reason})")

    # --- summary ---------------------------------------------------------------------------

    def _collect(self) -> dict[str, Any]:
        client = self._client()
        assert self.broker is not None and self.hub_config is not None
        devices = []
        for agent in self.agents:
            detail = client.device(agent.device_id)
            devices.append(self._device_summary(agent, detail))
        totals = self.load.totals() if self.load is not None else None
        return {
            "schema": "edgefleet.demo-summary/1",
            "quick": self.options.quick,
            "workdir": str(self.workdir),
            "broker": {
                "kind": self.broker.kind,
                "url": self.broker.url,
                "protocol": self.broker.protocol,
            },
            "hub": {
                "api": api_url(self.hub_config),
                "config": str(self.hub_config.source),
                "store": str(self.hub_config.store_path),
            },
            "model_set": {
                "name": MODEL_SET,
                "final": self._policy_version(),
            },
            "devices": devices,
            "load": totals.to_dict() if totals is not None else None,
            "rollouts": [r.to_dict() for r in self.rollouts],
            "rollouts_note": self.rollouts_note,
            "timeline": [m.to_dict() for m in self.view.timeline],
            "durations_s": dict(self.durations),
        }

    def _policy_version(self) -> str | None:
        try:
            return self._client().policy(POLICY).document.model_set.version
        except ClientError:
            return None

    def _device_summary(self, agent: DemoAgent, detail: DeviceDetail) -> dict[str, Any]:
        models = {}
        if detail.state is not None:
            for m in detail.state.models:
                models[m.name] = {
                    "version": m.version,
                    "variant": m.variant,
                    "precision": m.precision,
                    "provider": m.provider,
                    "ready": m.ready,
                }
        load: dict[str, Any] | None = None
        if self.load is not None:
            load = self.load.device(agent.device_id).to_dict()
            load["models"] = {
                name: self.load.model(agent.device_id, name).to_dict() for name in OCR_FILES
            }
            load["versions"] = self.load.versions(agent.device_id)
            load["failures"] = self.load.errors_by_status(agent.device_id)
        return {
            "device_id": agent.device_id,
            "profile": detail.profile,
            "profile_source": detail.profile_source,
            "online": detail.online,
            "applied_generation": detail.applied_generation,
            "phase": detail.phase,
            "models": models,
            "load": load,
            "telemetry": self._telemetry_latency(agent.device_id),
        }

    def _telemetry_latency(self, device_id: str) -> dict[str, Any]:
        """Per model, from the hub's stored telemetry (the agent's own measurement): the
        requests it counted and its p50 / p95, weighted by requests, over the load."""
        page = self._client().telemetry(device_id, limit=500)
        sums: dict[str, list[float]] = {}
        for item in page.items:
            for name, stats in item.message.models.items():
                if stats.latency_ms is None or stats.requests == 0:
                    continue
                entry = sums.setdefault(name, [0.0, 0.0, 0.0])
                entry[0] += stats.requests
                entry[1] += stats.latency_ms.p50 * stats.requests
                entry[2] += stats.latency_ms.p95 * stats.requests
        return {
            name: {
                "requests": int(n),
                "p50_ms": round(p50 / n, 2),
                "p95_ms": round(p95 / n, 2),
            }
            for name, (n, p50, p95) in sorted(sums.items())
        }

    def _print_summary(self, summary: Mapping[str, Any]) -> None:
        from rich.table import Table

        table = Table(title="devices", title_justify="left")
        for column in ("device", "profile", "det", "cls", "rec"):
            table.add_column(column)
        for column in ("requests", "errors", "p50 ms", "p95 ms", "hub p95 ms"):
            table.add_column(column, justify="right")
        for device in summary["devices"]:
            load = device["load"] or {}
            hub_p95 = _weighted(device["telemetry"], "p95_ms")
            table.add_row(
                device["device_id"],
                device["profile"] or "?",
                *(_variant_text(device["models"].get(name)) for name in OCR_FILES),
                str(load.get("requests", "-")),
                str(load.get("errors", "-")),
                _ms(load.get("p50_ms")),
                _ms(load.get("p95_ms")),
                _ms(hub_p95),
            )
        self.console.print()
        self.console.print(table)
        for rollout in summary["rollouts"]:
            timeline = Table(
                title=f"rollout {rollout['name']} -> {MODEL_SET} {rollout['target']}: "
                f"{rollout['phase']}",
                title_justify="left",
            )
            timeline.add_column("t (s)", justify="right")
            timeline.add_column("event")
            for moment in rollout["timeline"]:
                timeline.add_row(f"{moment['t']:.1f}", _escape(moment["text"]))
            self.console.print(timeline)
        if summary.get("rollouts_note"):
            self.console.print(f"[yellow]{_escape(summary['rollouts_note'])}[/]")
        durations = ", ".join(f"{k} {v:.1f} s" for k, v in summary["durations_s"].items())
        self.console.print(f"durations: {durations}")

    def _check(self, summary: Mapping[str, Any]) -> None:
        """What the demo promises: every device ran the final model set, the load was
        answered, each rollout ended as expected."""
        problems = []
        final = summary["model_set"]["final"]
        for device in summary["devices"]:
            if not device["models"]:
                problems.append(f"{device['device_id']} reports no model")
            load = device["load"] or {}
            if not load.get("requests"):
                problems.append(f"{device['device_id']} answered no request")
        for rollout in self.rollouts:
            if rollout.phase != rollout.expected:
                problems.append(
                    f"rollout {rollout.name} ended {rollout.phase}, expected {rollout.expected}"
                    + (f" ({rollout.reason})" if rollout.reason else "")
                )
        if problems:
            raise DemoError("; ".join(problems))
        self.view.note(f"done: every device runs {MODEL_SET} {final}")

    def _write_summary(self, failure: str | None, interrupted: bool) -> None:
        assert self.options.summary_json is not None
        summary = dict(self.summary or {"schema": "edgefleet.demo-summary/1"})
        summary["ok"] = failure is None and not interrupted and self.summary is not None
        summary["failure"] = failure
        summary["interrupted"] = interrupted
        summary["durations_s"] = dict(self.durations)
        path = self.options.summary_json
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")

    # --- keep, stop ------------------------------------------------------------------------

    def _keep(self) -> None:
        assert self.broker is not None and self.hub_config is not None
        hub_cli = executable("edgefleet-hub")
        first = self.agents[0] if self.agents else None
        lines = [
            "",
            "[bold]The fleet keeps running.[/] In another terminal:",
            "",
            "  # every message of the fleet (telemetry, state, events, desired documents)",
            f"  mosquitto_sub -h {self.broker.host} -p {self.broker.port} -t 'edgefleet/v1/#' -v",
            "",
            "  # the operators' CLI",
            f"  export EDGEFLEET_HUB_CONFIG={self.hub_config.source}",
            f"  {hub_cli} devices list",
            f"  {hub_cli} plan",
        ]
        if first is not None:
            lines += [
                f"  {hub_cli} telemetry tail {first.device_id} --follow",
                "",
                f"  # {first.device_id}'s inference API",
                f"  curl -s 127.0.0.1:{first.api_port}/v2/models/cls",
            ]
        lines += ["", f"Data and logs: {self.workdir}", "Press Ctrl-C to stop everything."]
        for line in lines:
            self.console.print(line, soft_wrap=True)
        sys.stdout.flush()
        self.keeping = True
        while True:
            self._check_children()
            time.sleep(1.0)

    def _shutdown(self) -> bool:
        """Stop the load, the agents, the hub, the broker; True when nothing is left."""
        started = time.monotonic()
        self.view.stop_live()
        if self.load is not None:
            self.load.stop()
        agents = [a.child for a in self.agents if a.child is not None]
        codes = self.children.stop([c for c in agents if c in self.children.children])
        if self.client is not None:
            self.client.close()
        codes.update(self.children.stop_all())
        left = leftover_processes(self.pids)
        self._timed("shutdown", started)
        self.durations["total"] = round(time.monotonic() - self.started, 2)
        unclean = {name: code for name, code in codes.items() if code not in (0, -15)}
        if left:
            self.console.print(f"[red]processes left running: {left}[/]")
        elif codes:
            text = f"stopped {len(codes)} processes in {self.durations['shutdown']:.1f} s"
            if unclean:
                text += f" (exit status: {unclean})"
            self.view.note(text)
        return not left

    def _check_children(self) -> None:
        for child in list(self.children.children):
            if not child.alive:
                raise DemoError(f"{child.name} exited unexpectedly: {child.describe()}")

    def _client(self) -> HubClient:
        if self.client is None:
            raise DemoError("the hub is not running")
        return self.client


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _models_text(device: DeviceDetail) -> str:
    if device.state is None:
        return "-"
    parts = []
    for m in sorted(device.state.models, key=lambda m: m.name):
        parts.append(f"{m.name} {m.variant or '?'}" + ("" if m.ready else " (not ready)"))
    return ", ".join(parts)


def _variant_text(model: Mapping[str, Any] | None) -> str:
    if not model:
        return "-"
    text = f"{model['version']} {model['variant'] or '?'}"
    return text if model.get("ready") else f"{text} (not ready)"


def _weighted(telemetry: Mapping[str, Mapping[str, float]], key: str) -> float | None:
    total = sum(t["requests"] for t in telemetry.values())
    if not total:
        return None
    return sum(t[key] * t["requests"] for t in telemetry.values()) / total


def rollout_yaml(name: str, target: str, *, batches: Sequence[int], bake_s: float) -> str:
    """A canary of one device, then cumulative batches; every cohort must be healthy, and a
    failure rolls the devices back."""
    return (
        "schema: edgefleet.rollout/1\n"
        f"name: {name}\n"
        f"policy: {POLICY}\n"
        f'target: "{target}"\n'
        "cohorts:\n"
        "  canary: {count: 1}\n"
        f"  batches: [{', '.join(str(b) for b in batches)}]\n"
        f"  bake_s: {bake_s:g}\n"
        "gates:\n"
        "  success_threshold: 100\n"
        "device_timeout_s: 3m\n"
        "on_failure: rollback\n"
    )


def _event_text(event: RolloutEventOut, cohorts: Mapping[int, str]) -> str:
    where = []
    if event.cohort is not None:
        where.append(cohorts.get(event.cohort, f"cohort {event.cohort}"))
    if event.device_id:
        where.append(event.device_id)
    text = event.kind + (f" [{', '.join(where)}]" if where else "")
    return f"{text}: {event.reason}" if event.reason else text


def _rollout_line(detail: RolloutDetail) -> str:
    counts = ", ".join(f"{n} {status}" for status, n in sorted(detail.counts.items()) if n)
    cohort = detail.cohort_name or ("done" if detail.cohort >= detail.cohorts else "-")
    return (
        f"rollout {detail.name}: {detail.phase}, cohort {min(detail.cohort + 1, detail.cohorts)}"
        f"/{detail.cohorts} ({cohort}); devices: {counts or '-'}"
    )


def rollouts_available() -> bool:
    """Whether this hub can run rollouts: the driver (hub/rollouts.py) and the client's
    rollout methods."""
    from hub.client import HubClient

    has_driver = importlib.util.find_spec("hub.rollouts") is not None
    return has_driver and hasattr(HubClient, "start_rollout")


def run_demo(options: DemoOptions) -> int:
    """Run the demo as asked; the exit status (0 ok, 1 failed, 130 interrupted)."""
    return Demo(options).run()

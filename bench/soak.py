"""Soak: one agent serving inference and telemetry for N minutes while the hub rolls its
model set back and forth; the agent's (and the hub's) resident memory, open file
descriptors and threads must stay flat, and nothing may log an error.

Setup (not part of the N minutes): a private mosquitto (``hub.broker.MosquittoBroker`` on a
free loopback port), ``edgefleet-hub init`` and ``edgefleet-hub serve`` in a child process
(its own artifact server on a free port is where the agent downloads from), the three OCR
models of ``rapidocr_onnxruntime`` registered as in ``edgefleet-hub demo`` (model set
``ocr`` 1.0.0: det, rec, cls 1.0.0 with its int8 variant; 2.0.0: the same with cls 1.1.0),
the demo's policy on 1.0.0 with a short telemetry interval, and one ``edgefleet-agent run``
(profile ``generic``) that applies 1.0.0.

Then, for N minutes: two client threads (``hub.demo_load``) send binary-tensor inference
requests to the agent's local API (cls, rec, det), while rollouts (a canary of the one
device, through the hub's HTTP API) move the policy to 2.0.0, back to 1.0.0, and so on;
each is followed to its end and to the device committing the promoted policy before the
next starts. A rollout *cycle* is one round trip, 1.0.0 -> 2.0.0 -> 1.0.0; every rollout
makes the agent load a whole new model table beside the old one, switch, and free the old.
Every ``--interval`` seconds psutil reads, for the agent and the hub process, RSS, open
file descriptors (``/proc/PID/fd``) and threads (``/proc/PID/status``). The warm-up is the
first cycle, and at least the first tenth of the soak (the agent's allocator arenas take
about a minute of swaps to reach their working size). Over the rest a least-squares line
per metric gives its slope per hour and per cycle, with the slope's standard error
(widened for the autocorrelation of successive samples). A metric is *flat* when its
slope is under its bound:

- RSS: 5 MB per hour. An old model table kept at a swap would add about 60 MB (the peak
  while two tables coexist); 1 KB kept per request, about 70 MB per hour at this load.
- open fds and threads: 0.5 per cycle, so one descriptor or thread kept per cycle (or per
  swap) fails, while transient ones (a download, a load worker) average out.

or under three standard errors of the slope when that is larger: the agent's RSS moves by
+-12 MB as models load and unload, so a ten-minute fit cannot tell 5 MB per hour from
nothing (its effective bound is then about 110 MB per hour, 0.2 MB per cycle); the
effective bound falls with the run's length to the power 1.5, to 5 MB per hour after about
80 minutes. The report gives both bounds (docs/soak.md).

The run fails (exit status 1) when a metric is not flat, the measured window holds less
than one cycle, an inference request failed (a ``429`` or ``503`` the inference API
documents for overload or a model not serving is counted apart, not as a failure), a
rollout did not succeed, the agent or the hub logged an ERROR / CRITICAL line or a
traceback (their output is captured to files and scanned), a process died or did not exit
cleanly, or telemetry the agent published is missing from the hub's store.

    .venv/bin/python bench/soak.py [--minutes 10] [--interval 2] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hub.api import encode_cursor  # noqa: E402
from hub.broker import free_port  # noqa: E402
from hub.client import HubClient  # noqa: E402
from hub.config import HubConfig, load_config  # noqa: E402
from hub.demo import (  # noqa: E402
    CLS_V2,
    OCR_FILES,
    OCR_INPUTS,
    V1,
    V2,
    BrokerInfo,
    Child,
    Children,
    DemoAgent,
    child_env,
    converged,
    executable,
    failed_generation,
    modelset_yaml,
    ocr_model_files,
    policy_yaml,
    rollout_yaml,
    start_broker,
    write_agent_config,
)
from hub.demo_load import LoadGenerator, Target, Tensor  # noqa: E402
from hub.errors import ClientError, HubError  # noqa: E402

SCHEMA = "edgefleet.soak-report/1"
DEVICE = "soak-01"
PROFILE = "generic"
VERSIONS: dict[str, dict[str, str]] = {
    V1: dict.fromkeys(OCR_FILES, V1),
    V2: {"det": V1, "cls": CLS_V2, "rec": V1},
}
TERMINAL = ("succeeded", "failed", "aborted", "rolled_back")
REFUSED = ("429", "503")
"""Statuses the inference API documents for a request it refuses (overload, a model not
serving): counted apart, not as failures."""

DEFAULT_MINUTES = 10.0
"""Setup and shutdown add about 15 seconds."""
RSS_BOUND_MB_PER_HOUR = 5.0
COUNT_BOUND_PER_CYCLE = 0.5
NOISE_SIGMAS = 3.0
MAX_AUTOCORRELATION = 0.99
WARMUP_SHARE = 0.1
"""The warm-up is the first rollout cycle, and at least this share of the soak."""
MIN_WINDOW_SAMPLES = 3

HUB_READY_TIMEOUT_S = 90.0
CONVERGE_TIMEOUT_S = 240.0
ROLLOUT_TIMEOUT_S = 300.0
TELEMETRY_SETTLE_S = 30.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.25
PROGRESS_S = 60.0

LOG_ERROR = re.compile(r"\b(ERROR|CRITICAL)\b|^Traceback \(most recent call last\)")
LOG_WARNING = re.compile(r"\bWARNING\b")
MAX_LOG_LINES = 50


class SoakError(HubError):
    """A step of the soak could not be done; the message says which."""


def progress(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- sampling ----------------------------------------------------------------------------------

METRICS = ("rss_mb", "fds", "threads")


@dataclass(frozen=True)
class Sample:
    """One reading of both processes, ``t`` seconds after the soak started."""

    t: float
    rollouts: int
    """Rollouts finished (device converged) when the sample was taken."""
    values: dict[str, dict[str, float]]
    """process (agent, hub) -> metric -> value."""


def read_process(process: psutil.Process) -> dict[str, float]:
    with process.oneshot():
        return {
            "rss_mb": process.memory_info().rss / 2**20,
            "fds": float(process.num_fds()),
            "threads": float(process.num_threads()),
        }


class Sampler:
    """A thread reading every process of ``pids`` every ``interval`` seconds."""

    def __init__(
        self, pids: Mapping[str, int], interval: float, rollouts: Callable[[], int]
    ) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.interval = interval
        self.rollouts = rollouts
        self.samples: list[Sample] = []
        self.failures: list[str] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling; safe to call twice, or before ``start``."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            self.sample()
            next_at += self.interval
            if self._stop.wait(max(0.0, next_at - time.monotonic())):
                return

    def sample(self) -> None:
        values = {}
        for name, process in self.processes.items():
            try:
                values[name] = read_process(process)
            except psutil.Error as exc:
                if len(self.failures) < 10:
                    self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
                return
        with self._lock:
            self.samples.append(Sample(self.elapsed(), self.rollouts(), values))


@dataclass(frozen=True)
class Fit:
    """A least-squares line: its slope and the slope's standard error, per second."""

    slope: float
    error: float


def fit(points: Sequence[tuple[float, float]]) -> Fit | None:
    """The least-squares slope of ``points`` (x, y) and its standard error, widened for the
    lag-1 autocorrelation of the residuals (successive samples of a process's memory are
    not independent); None with fewer than three points or a single x."""
    n = len(points)
    if n < 3:
        return None
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    residuals = [y - mean_y - slope * (x - mean_x) for x, y in points]
    squares = sum(r * r for r in residuals)
    if squares == 0:
        return Fit(slope, 0.0)
    rho = sum(a * b for a, b in itertools.pairwise(residuals)) / squares
    rho = min(max(rho, 0.0), MAX_AUTOCORRELATION)
    error = math.sqrt(squares / (n - 2) / sxx) * math.sqrt((1 + rho) / (1 - rho))
    return Fit(slope, error)


def metric_figures(
    samples: Sequence[Sample], process: str, metric: str, cycle_s: float | None
) -> dict[str, Any]:
    """start, end, min, max and the slopes of one metric over ``samples``; flat or not.

    Flat: the slope is under the metric's bound, or under ``NOISE_SIGMAS`` standard errors
    of the slope when the measurement is not precise enough to tell the bound apart from
    no growth (the effective bound is the larger of the two)."""
    points = [(s.t, s.values[process][metric]) for s in samples]
    line = fit(points)
    scale: float | None
    if metric == "rss_mb":
        unit, limit, scale = "per_hour", RSS_BOUND_MB_PER_HOUR, 3600.0
    else:
        unit, limit, scale = "per_cycle", COUNT_BOUND_PER_CYCLE, cycle_s
    figures: dict[str, Any] = {
        "start": None,
        "end": None,
        "min": None,
        "max": None,
        "slope_per_hour": None,
        "slope_per_cycle": None,
        "slope_error_per_hour": None,
        "bound": {unit: limit},
        "bound_effective": None,
        "flat": None,
    }
    if points:
        values = [y for _, y in points]
        figures.update(
            start=_round(values[0]),
            end=_round(values[-1]),
            min=_round(min(values)),
            max=_round(max(values)),
        )
    if line is None:
        return figures
    figures["slope_per_hour"] = _round(line.slope * 3600, 3)
    figures["slope_error_per_hour"] = _round(line.error * 3600, 3)
    if cycle_s is not None:
        figures["slope_per_cycle"] = _round(line.slope * cycle_s, 4)
    if scale is not None:
        effective = max(limit, NOISE_SIGMAS * line.error * scale)
        figures["bound_effective"] = _round(effective, 3)
        figures["flat"] = line.slope * scale < effective
    return figures


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# --- the telemetry tap ---------------------------------------------------------------------------


class TelemetryTap:
    """An MQTT subscriber counting the telemetry the device published, as the broker
    delivers it: distinct (session, seq), and the newest message's link figures."""

    def __init__(self, broker: BrokerInfo, device_id: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.seen: set[tuple[int, int]] = set()
        self.last: dict[str, Any] = {}
        self.undecodable = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"soak-tap-{os.getpid()}",
            protocol=mqtt.MQTTv5,
        )
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        self._client.subscribe(f"edgefleet/v1/dev/{device_id}/up/telemetry", qos=1)
        if not self._subscribed.wait(10):
            self.close()
            raise SoakError("the telemetry subscription was not acknowledged")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            body = json.loads(bytes(message.payload))
            key = (int(body["session"]), int(body["seq"]))
        except (ValueError, KeyError, TypeError):
            with self._lock:
                self.undecodable += 1
            return
        with self._lock:
            self.seen.add(key)
            self.last = body

    def snapshot(self) -> tuple[set[tuple[int, int]], dict[str, Any]]:
        with self._lock:
            return set(self.seen), dict(self.last)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def stored_telemetry(client: HubClient, device_id: str) -> set[tuple[int, int]]:
    """Every (session, seq) of the device's telemetry in the hub's store."""
    keys: set[tuple[int, int]] = set()
    cursor = encode_cursor([-1, -1])
    while True:
        page = client.telemetry(device_id, limit=1000, cursor=cursor)
        keys.update((item.message.session, item.message.seq) for item in page.items)
        if not page.items or page.next_cursor is None:
            return keys
        cursor = page.next_cursor


def ingested_telemetry(client: HubClient) -> float | None:
    """The hub's ``edgefleet_hub_ingest_messages_total{kind="telemetry"}``."""
    for line in client.metrics().splitlines():
        if line.startswith('edgefleet_hub_ingest_messages_total{kind="telemetry"}'):
            return float(line.split()[-1])
    return None


# --- logs ----------------------------------------------------------------------------------------


def scan_log(path: Path) -> dict[str, Any]:
    """The ERROR / CRITICAL / traceback lines of a log, and how many WARNING lines."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return {"path": str(path), "errors": [f"cannot read the log: {exc}"], "warnings": 0}
    errors = [line for line in lines if LOG_ERROR.search(line)]
    return {
        "path": str(path),
        "lines": len(lines),
        "error_count": len(errors),
        "errors": errors[:MAX_LOG_LINES],
        "warnings": sum(1 for line in lines if LOG_WARNING.search(line)),
    }


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Options:
    minutes: float
    interval: float
    clients: int
    rps: float
    telemetry_interval: float
    probation: float
    workdir: Path


@dataclass
class RolloutRecord:
    name: str
    target: str
    phase: str | None = None
    reason: str | None = None
    started: float = 0.0
    rollout_s: float | None = None
    converged_s: float | None = None
    """From the start until the device committed the promoted policy."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "phase": self.phase,
            "reason": self.reason,
            "started_s": round(self.started, 2),
            "rollout_s": _round(self.rollout_s),
            "converged_s": _round(self.converged_s),
        }


@dataclass
class Soak:
    options: Options
    children: Children = field(init=False)
    client: HubClient | None = None
    broker: BrokerInfo | None = None
    hub: Child | None = None
    agent: DemoAgent | None = None
    tap: TelemetryTap | None = None
    load: LoadGenerator | None = None
    sampler: Sampler | None = None
    rollouts: list[RolloutRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)
    converged_count: int = 0

    def __post_init__(self) -> None:
        self.children = Children(self.options.workdir / "logs")

    # --- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        started = time.monotonic()
        workdir = self.options.workdir
        self.broker = start_broker("mosquitto", workdir, self.children)
        progress(f"broker: mosquitto at {self.broker.url}")
        config = self._init_hub(workdir / "hub", self.broker)
        assert config.source is not None
        self.hub = self.children.spawn(
            "hub", [executable("edgefleet-hub"), "serve", "--config", str(config.source)]
        )
        self.client = HubClient(f"http://{config.api.bind}", config.api_token(), timeout=120)
        self._wait_hub()
        progress(f"hub: serving at http://{config.api.bind}")
        self._register()
        self.tap = TelemetryTap(self.broker, DEVICE)
        self.agent = write_agent_config(workdir / "agents", DEVICE, PROFILE, config, self.broker)
        self.agent.child = self.children.spawn(
            "agent", [executable("edgefleet-agent"), "run", "--config", str(self.agent.config_path)]
        )
        self._wait_converged(V1)
        self.durations["setup_s"] = round(time.monotonic() - started, 2)
        progress(f"agent {DEVICE}: runs ocr {V1}; setup took {self.durations['setup_s']:.0f} s")

    def _init_hub(self, directory: Path, broker: BrokerInfo) -> HubConfig:
        """``edgefleet-hub init`` for this broker; API and artifact server on free ports."""
        done = subprocess.run(
            [
                executable("edgefleet-hub"),
                "init",
                str(directory),
                "--hub-id",
                "soak-hub",
                "--broker-url",
                broker.url,
                "--api-bind",
                f"127.0.0.1:{free_port()}",
                "--artifacts-bind",
                f"127.0.0.1:{free_port()}",
            ],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise SoakError(f"edgefleet-hub init failed: {done.stderr.strip()}")
        return load_config(directory / "hub.toml")

    def _wait_hub(self) -> None:
        assert self.hub is not None
        deadline = time.monotonic() + HUB_READY_TIMEOUT_S
        while True:
            if not self.hub.alive:
                raise SoakError(f"the hub exited: {self.hub.describe()}")
            try:
                self._client().health()
                return
            except ClientError:
                if time.monotonic() > deadline:
                    raise SoakError(f"the hub did not answer: {self.hub.describe()}") from None
                time.sleep(POLL_S)

    def _register(self) -> None:
        """The demo's models and model sets 1.0.0 and 2.0.0, its policy on 1.0.0."""
        client = self._client()
        files = ocr_model_files()
        variants = []
        for name, path in files.items():
            variants += client.add_model(
                path,
                name=name,
                version=V1,
                quantize="int8" if name == "cls" else None,
                input_shapes=OCR_INPUTS[name],
            )
        variants += client.add_model(
            files["cls"],
            name="cls",
            version=CLS_V2,
            quantize="int8",
            input_shapes=OCR_INPUTS["cls"],
        )
        for version, models in VERSIONS.items():
            text = modelset_yaml(variants, version=version, models=models)
            client.apply_model_set(text, f"soak:ocr-{version}.yaml")
        client.apply_policy(
            policy_yaml(
                version=V1,
                probation_s=self.options.probation,
                telemetry_interval_s=self.options.telemetry_interval,
            ),
            "soak:policy.yaml",
        )
        progress(f"registered model sets ocr {V1} and {V2}, policy on {V1}")

    def _wait_converged(self, version: str) -> None:
        """Until the device committed the newest document the hub published for it and
        runs the model versions of model set ``version``."""
        client = self._client()
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        while True:
            self._check_children()
            try:
                device = client.device(DEVICE)
            except ClientError as exc:
                if exc.status != 404:
                    raise
            else:
                failure = failed_generation(device)
                if failure is not None:
                    raise SoakError(f"{DEVICE} could not apply ocr {version}: {failure}")
                if converged(device, VERSIONS[version]):
                    return
            if time.monotonic() > deadline:
                raise SoakError(
                    f"{DEVICE} does not run ocr {version} after {CONVERGE_TIMEOUT_S:g} s"
                )
            time.sleep(POLL_S)

    # --- the soak itself -----------------------------------------------------------------

    def soak(self) -> None:
        assert self.agent is not None and self.agent.child is not None and self.hub is not None
        options = self.options
        self.load = LoadGenerator(
            [
                Target(f"client-{i + 1}", "127.0.0.1", self.agent.api_port)
                for i in range(options.clients)
            ],
            {name: Tensor("x", tuple(shape["x"])) for name, shape in OCR_INPUTS.items()},
            rps=options.rps,
        )
        self.sampler = Sampler(
            {"agent": self.agent.child.pid, "hub": self.hub.pid},
            options.interval,
            lambda: self.converged_count,
        )
        self.load.start()
        self.sampler.start()
        deadline = self.sampler.started + options.minutes * 60
        progress(
            f"soak: {options.minutes:g} min, {options.clients} clients x {options.rps:g} "
            f"requests/s, samples every {options.interval:g} s"
        )
        target = V2
        shown = time.monotonic()
        while time.monotonic() < deadline:
            self._rollout(target)
            target = V1 if target == V2 else V2
            if time.monotonic() - shown >= PROGRESS_S:
                shown = time.monotonic()
                self._show_progress()
        self.durations["soak_s"] = round(self.sampler.elapsed(), 2)
        self.load.stop()
        self.sampler.stop()

    def _rollout(self, target: str) -> None:
        assert self.sampler is not None
        client = self._client()
        name = f"soak-{len(self.rollouts) + 1:03d}-{target}"
        record = RolloutRecord(name, target, started=self.sampler.elapsed())
        self.rollouts.append(record)
        started = time.monotonic()
        detail = client.start_rollout(
            rollout_yaml(name, target, batches=[100], bake_s=0.0), f"soak:{name}.yaml"
        )
        while detail.phase not in TERMINAL:
            self._check_children()
            if time.monotonic() - started > ROLLOUT_TIMEOUT_S:
                raise SoakError(f"rollout {name} still {detail.phase} after {ROLLOUT_TIMEOUT_S} s")
            time.sleep(POLL_S * 2)
            detail = client.rollout(name, events=0)
        record.phase, record.reason = detail.phase, detail.reason
        record.rollout_s = time.monotonic() - started
        if detail.phase != "succeeded":
            raise SoakError(f"rollout {name} ended {detail.phase}: {detail.reason}")
        self._wait_converged(target)
        record.converged_s = time.monotonic() - started
        self.converged_count += 1

    def _show_progress(self) -> None:
        assert self.sampler is not None and self.load is not None
        totals = self.load.totals()
        last = self.sampler.samples[-1].values if self.sampler.samples else {}
        memory = ", ".join(f"{p} RSS {v['rss_mb']:.0f} MB" for p, v in last.items())
        progress(
            f"{self.sampler.elapsed():.0f} s: {self.converged_count} rollouts, "
            f"{totals.requests} requests ({totals.errors} not answered 200); {memory}"
        )

    # --- shutdown ------------------------------------------------------------------------

    def shutdown(self) -> dict[str, Any]:
        """Stop everything, the agent first; the telemetry figures (once the agent has
        stopped, every message it published should be in the hub's store)."""
        if self.load is not None:
            self.load.stop()
        if self.sampler is not None:
            self.sampler.stop()
        telemetry: dict[str, Any] = {}
        if self.agent is not None and self.agent.child is not None:
            self.exit_codes.update(self.children.stop([self.agent.child], STOP_TIMEOUT_S))
            if self.tap is not None and self.client is not None and self.hub is not None:
                with contextlib.suppress(HubError, OSError):
                    telemetry = self._telemetry()
        if self.tap is not None:
            self.tap.close()
        if self.hub is not None:
            self.exit_codes.update(self.children.stop([self.hub], STOP_TIMEOUT_S))
        if self.client is not None:
            self.client.close()
        self.exit_codes.update(self.children.stop_all())
        return telemetry

    def _telemetry(self) -> dict[str, Any]:
        assert self.tap is not None
        client = self._client()
        time.sleep(1.0)  # the last messages reach the tap
        published, last = self.tap.snapshot()
        deadline = time.monotonic() + TELEMETRY_SETTLE_S
        while True:
            stored = stored_telemetry(client, DEVICE)
            missing = published - stored
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        link = last.get("link", {}) if isinstance(last.get("link"), dict) else {}
        return {
            "interval_s": self.options.telemetry_interval,
            "published": len(published),
            "stored": len(stored),
            "missing": len(missing),
            "not_published_but_stored": len(stored - published),
            "hub_ingested_metric": ingested_telemetry(client),
            "undecodable": self.tap.undecodable,
            "agent_link_dropped": link.get("dropped"),
            "agent_link_reconnects": link.get("reconnects"),
            "agent_outbox_depth": link.get("outbox_depth"),
        }

    # --- helpers -------------------------------------------------------------------------

    def _client(self) -> HubClient:
        if self.client is None:
            raise SoakError("the hub is not running")
        return self.client

    def _check_children(self) -> None:
        for child in self.children.children:
            if not child.alive:
                raise SoakError(f"{child.name} exited unexpectedly: {child.describe()}")


# --- the report ----------------------------------------------------------------------------------


def round_trips(rollouts: Sequence[RolloutRecord]) -> list[tuple[float, float]]:
    """(start, end) of every complete rollout cycle: a rollout to 2.0.0 and the one back,
    from the first's start to the device committing the second's model set."""
    done = [r for r in rollouts if r.converged_s is not None]
    return [
        (done[i].started, done[i + 1].started + (done[i + 1].converged_s or 0.0))
        for i in range(0, len(done) - 1, 2)
    ]


def build_report(soak: Soak, telemetry: Mapping[str, Any], failure: str | None) -> dict[str, Any]:
    options = soak.options
    samples = soak.sampler.samples if soak.sampler is not None else []
    done = [r for r in soak.rollouts if r.converged_s is not None]
    cycles = round_trips(soak.rollouts)
    soak_s = soak.durations.get("soak_s", samples[-1].t if samples else 0.0)
    warmup_end = max(cycles[0][1], WARMUP_SHARE * soak_s) if cycles else None
    window = [s for s in samples if warmup_end is not None and s.t >= warmup_end]
    measured = [c for c in cycles if warmup_end is not None and c[0] >= warmup_end - 1e-6]
    lengths = [end - start for start, end in measured or cycles]
    cycle_s = sum(lengths) / len(lengths) if lengths else None
    problems = list(soak.problems)
    if failure is not None:
        problems.append(failure)
    judged = len(window) >= MIN_WINDOW_SAMPLES and len(measured) >= 1
    metrics: dict[str, dict[str, Any]] = {}
    for process in ("agent", "hub"):
        metrics[process] = {}
        for metric in METRICS:
            figures = metric_figures(window, process, metric, cycle_s)
            figures["initial"] = _round(samples[0].values[process][metric]) if samples else None
            if not judged:
                figures["flat"] = None
            metrics[process][metric] = figures
            if figures["flat"] is False:
                unit = next(iter(figures["bound"]))
                problems.append(
                    f"{process} {metric} is not flat: {figures[f'slope_{unit}']:+g} "
                    f"{unit.replace('_', ' ')}, bound {figures['bound_effective']:g}"
                )
    if not judged:
        problems.append(
            f"too short to judge flatness: {len(measured)} cycle(s) and {len(window)} "
            "sample(s) after the warm-up"
        )
    if soak.sampler is not None:
        problems += [f"sampling failed: {f}" for f in soak.sampler.failures]

    inference = inference_figures(soak.load)
    if inference["failed"]:
        problems.append(f"inference requests failed: {inference['failed_by_status']}")
    if soak.load is not None and not inference["succeeded"]:
        problems.append("no inference request succeeded")

    logs = {
        "agent": scan_log(soak.children.logs / "agent.log"),
        "hub": scan_log(soak.children.logs / "hub.log"),
    }
    for name, scanned in logs.items():
        if scanned["errors"]:
            problems.append(f"the {name} logged {scanned.get('error_count', 1)} error line(s)")
    for name, code in soak.exit_codes.items():
        if code != 0:
            problems.append(f"{name} exited with status {code}")
    if telemetry.get("missing"):
        problems.append(f"{telemetry['missing']} telemetry message(s) missing from the hub")
    if soak.load is not None and not telemetry:
        problems.append("telemetry was not counted")
    for record in soak.rollouts:
        if record.phase is not None and record.phase != "succeeded":
            problems.append(f"rollout {record.name} ended {record.phase}")

    return {
        "schema": SCHEMA,
        "ok": not problems,
        "problems": problems,
        "options": {
            "minutes": options.minutes,
            "interval_s": options.interval,
            "clients": options.clients,
            "rps_per_client": options.rps,
            "telemetry_interval_s": options.telemetry_interval,
            "probation_s": options.probation,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "workdir": str(options.workdir),
        "durations_s": dict(soak.durations),
        "rollouts": {
            "started": len(soak.rollouts),
            "completed": len(done),
            "succeeded": sum(1 for r in soak.rollouts if r.phase == "succeeded"),
            "cycles": len(cycles),
            "cycle_s": _round(cycle_s),
            "converged_s": _stats([r.converged_s for r in done if r.converged_s is not None]),
            "list": [r.to_dict() for r in soak.rollouts],
        },
        "inference": inference,
        "telemetry": dict(telemetry),
        "samples": {
            "count": len(samples),
            "measured": len(window),
            "warmup_end_s": _round(warmup_end),
            "cycles_measured": len(measured),
            "series": [
                {"t": round(s.t, 2), "rollouts": s.rollouts, **_flatten(s.values)} for s in samples
            ],
        },
        "metrics": metrics,
        "bounds": {
            "rss_mb_per_hour": RSS_BOUND_MB_PER_HOUR,
            "fds_per_cycle": COUNT_BOUND_PER_CYCLE,
            "threads_per_cycle": COUNT_BOUND_PER_CYCLE,
        },
        "logs": logs,
        "exit_codes": dict(soak.exit_codes),
    }


def _flatten(values: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {f"{p}_{m}": round(v, 2) for p, figures in values.items() for m, v in figures.items()}


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "min": None, "max": None}
    return {
        "mean": round(sum(values) / len(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def inference_figures(load: LoadGenerator | None) -> dict[str, Any]:
    if load is None:
        return {"requests": 0, "succeeded": 0, "refused": 0, "failed": 0, "failed_by_status": {}}
    totals = load.totals()
    refused: dict[str, int] = {}
    failed: dict[str, int] = {}
    versions: dict[str, dict[str, int]] = {}
    for target in load.targets:
        for status, n in load.errors_by_status(target.device_id).items():
            bucket = refused if status in REFUSED else failed
            bucket[status] = bucket.get(status, 0) + n
        for model, served in load.versions(target.device_id).items():
            merged = versions.setdefault(model, {})
            for version, n in served.items():
                merged[version] = merged.get(version, 0) + n
    return {
        "requests": totals.requests,
        "succeeded": totals.requests - totals.errors,
        "refused": sum(refused.values()),
        "refused_by_status": refused,
        "failed": sum(failed.values()),
        "failed_by_status": failed,
        "versions_served": versions,
        "p50_ms": _round(totals.p50_ms),
        "p95_ms": _round(totals.p95_ms),
    }


def print_report(report: Mapping[str, Any]) -> None:
    options = report["options"]
    rollouts = report["rollouts"]
    inference = report["inference"]
    telemetry = report["telemetry"]
    samples = report["samples"]
    print(
        f"soak: {report['durations_s'].get('soak_s', 0) / 60:.1f} min "
        f"({options['minutes']:g} asked), {report['machine']['cpus']} CPUs; "
        f"setup {report['durations_s'].get('setup_s', 0):.0f} s"
    )
    print(
        f"rollouts: {rollouts['completed']} completed ({rollouts['succeeded']} succeeded), "
        f"{rollouts['cycles']} cycles of {rollouts['cycle_s']} s; device converged after "
        f"{rollouts['converged_s']['mean']} s on average (max {rollouts['converged_s']['max']})"
    )
    print(
        f"inference: {inference['requests']} requests, {inference['succeeded']} succeeded, "
        f"{inference['refused']} refused {inference.get('refused_by_status', {})}, "
        f"{inference['failed']} failed {inference['failed_by_status']}; "
        f"p50 {inference['p50_ms']} ms, p95 {inference['p95_ms']} ms"
    )
    if inference.get("versions_served"):
        served = "; ".join(
            f"{model} " + ", ".join(f"{v}: {n}" for v, n in sorted(by.items()))
            for model, by in sorted(inference["versions_served"].items())
        )
        print(f"  versions served: {served}")
    if telemetry:
        print(
            f"telemetry (every {telemetry['interval_s']:g} s): {telemetry['published']} "
            f"published, {telemetry['stored']} stored by the hub, {telemetry['missing']} "
            f"missing; agent outbox dropped {telemetry['agent_link_dropped']}, reconnects "
            f"{telemetry['agent_link_reconnects']}"
        )
    print(
        f"samples: {samples['count']} every {options['interval_s']:g} s, {samples['measured']} "
        f"after the warm-up (ends at {samples['warmup_end_s']} s), "
        f"{samples['cycles_measured']} cycles measured"
    )
    print(
        f"{'':14} {'start':>8} {'end':>8} {'min':>8} {'max':>8} {'slope/hour':>18} "
        f"{'slope/cycle':>11} {'bound':>14} {'flat':>4}"
    )
    for process, metrics in report["metrics"].items():
        for metric, fig in metrics.items():
            unit, limit = next(iter(fig["bound"].items()))
            bound = f"< {limit:g}/{unit.removeprefix('per_')}"
            if fig["bound_effective"] is not None and fig["bound_effective"] > limit:
                bound = f"< {_num(fig['bound_effective'])}/{unit.removeprefix('per_')}"
            slope = _cell(fig["slope_per_hour"], 8)
            if fig["slope_error_per_hour"] is not None:
                slope += f" ± {_num(fig['slope_error_per_hour']):<7}"
            else:
                slope = f"{slope:18}"
            flat = {True: "yes", False: "NO", None: "-"}[fig["flat"]]
            print(
                f"{process + ' ' + metric:14} {_cell(fig['start'])} {_cell(fig['end'])} "
                f"{_cell(fig['min'])} {_cell(fig['max'])} {slope:>18} "
                f"{_cell(fig['slope_per_cycle'], 11)} {bound:>14} {flat:>4}"
            )
    for name, scanned in report["logs"].items():
        count = scanned.get("error_count", len(scanned["errors"]))
        print(
            f"log {name}: {count} error lines, {scanned['warnings']} warnings ({scanned['path']})"
        )
        for line in scanned["errors"][:10]:
            print(f"  {line}")
    print(f"exit status: {report['exit_codes']}")
    for problem in report["problems"]:
        print(f"PROBLEM: {problem}")
    print("OK" if report["ok"] else "FAILED")


def _num(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _cell(value: Any, width: int = 8) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, float):
        return f"{value:>{width}.3g}" if abs(value) < 1 else f"{value:>{width}.1f}"
    return f"{value!s:>{width}}"


def run(options: Options) -> dict[str, Any]:
    soak = Soak(options)
    failure: str | None = None
    telemetry: Mapping[str, Any] = {}
    try:
        try:
            soak.setup()
            soak.soak()
        except HubError as exc:  # SoakError, ClientError, DemoError
            failure = " ".join(str(exc).split())
            progress(f"failed: {exc}")
        finally:
            telemetry = soak.shutdown()
    except KeyboardInterrupt:
        failure = "interrupted"
        soak.children.stop_all()
    return build_report(soak, telemetry, failure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--minutes", type=float, default=DEFAULT_MINUTES, help="soak length (setup not counted)"
    )
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--clients", type=int, default=2, help="inference client threads")
    parser.add_argument("--rps", type=float, default=10.0, help="requests per second per client")
    parser.add_argument("--telemetry-interval", type=float, default=1.0, metavar="S")
    parser.add_argument("--probation", type=float, default=2.0, metavar="S")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and logs here")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0 or args.clients < 1 or args.rps <= 0:
        parser.error("--minutes, --interval, --clients and --rps must be positive")
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-soak-")) if own else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    options = Options(
        minutes=args.minutes,
        interval=args.interval,
        clients=args.clients,
        rps=args.rps,
        telemetry_interval=args.telemetry_interval,
        probation=args.probation,
        workdir=workdir,
    )
    report = run(options)
    if own and report["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)
        report["workdir"] = None
    elif own:
        progress(f"logs and data kept in {workdir}")
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    else:
        print_report(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The demo's load generator: a few requests per second to every agent's inference API.

One thread per device sends Open Inference Protocol requests (binary tensors, as
``tritonclient`` does) to the agent's local API, cycling through the models with a fixed
mix (the classifier most, the detector least), at a bounded rate and for as long as the
demo runs. It records every answer: latency, HTTP status and the ``model_version`` that
served it, so the demo can show requests moving from one model-set version to the next
during a rollout without a failed request.

Only the standard library and numpy (random inputs); loopback addresses only.
"""

from __future__ import annotations

import http.client
import itertools
import json
import math
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

MIX: tuple[str, ...] = ("cls", "rec", "cls", "det", "cls", "rec")
"""The order requests go in, repeated: three classifier, two recogniser, one detector."""
RECENT = 200
"""Latencies kept per (device, model) for the live view's figures."""
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Tensor:
    """One model input the generator fills with random data."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Target:
    """One agent's inference API: ``host:port``."""

    device_id: str
    host: str
    port: int


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank, 0 < q <= 100) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class ModelLoad:
    """What one device answered for one model."""

    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    recent_ms: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    versions: dict[str, int] = field(default_factory=dict)
    """model_version served -> answers."""
    statuses: dict[str, int] = field(default_factory=dict)
    """Failed answers by HTTP status (or ``"connect"``)."""


@dataclass(frozen=True)
class LoadFigures:
    """A summary of answers: counts and latency percentiles (successful requests)."""

    requests: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None

    def to_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "p50_ms": _round(self.p50_ms),
            "p95_ms": _round(self.p95_ms),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def figures(loads: Sequence[ModelLoad], *, recent: bool = False) -> LoadFigures:
    """Counts and percentiles over ``loads`` (the recent window with ``recent``)."""
    samples = [v for load in loads for v in (load.recent_ms if recent else load.latencies_ms)]
    return LoadFigures(
        requests=sum(load.requests for load in loads),
        errors=sum(load.errors for load in loads),
        p50_ms=percentile(samples, 50),
        p95_ms=percentile(samples, 95),
    )


class LoadGenerator:
    """``start()`` a thread per target; ``stop()`` joins them. ``rps`` per device."""

    def __init__(
        self,
        targets: Sequence[Target],
        inputs: Mapping[str, Tensor],
        *,
        rps: float,
        mix: Sequence[str] = MIX,
        seed: int = 0,
    ) -> None:
        if rps <= 0:
            raise ValueError("rps must be positive")
        self.targets = list(targets)
        self.rps = rps
        self.mix = [m for m in mix if m in inputs]
        self._bodies = {name: _request_body(tensor, seed) for name, tensor in inputs.items()}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._loads: dict[str, dict[str, ModelLoad]] = {
            t.device_id: {m: ModelLoad() for m in inputs} for t in self.targets
        }
        self._sent_at: dict[str, deque[float]] = {t.device_id: deque() for t in self.targets}
        self.started_at: float | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("the load generator is already running")
        self._stop.clear()
        self.started_at = time.monotonic()
        for target in self.targets:
            thread = threading.Thread(
                target=self._run, args=(target,), name=f"demo-load-{target.device_id}"
            )
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = TIMEOUT_S + 5) -> None:
        """Stop sending and wait for the requests in flight; safe to call twice."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def __enter__(self) -> LoadGenerator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- figures -------------------------------------------------------------------------

    def device(self, device_id: str, *, recent: bool = False) -> LoadFigures:
        with self._lock:
            return figures(list(self._loads[device_id].values()), recent=recent)

    def model(self, device_id: str, model: str) -> LoadFigures:
        with self._lock:
            return figures([self._loads[device_id][model]])

    def rate(self, device_id: str, window_s: float = 5.0) -> float:
        """Requests answered per second over the last ``window_s``."""
        now = time.monotonic()
        with self._lock:
            sent = self._sent_at[device_id]
            while sent and sent[0] < now - window_s:
                sent.popleft()
            return len(sent) / window_s

    def versions(self, device_id: str) -> dict[str, dict[str, int]]:
        """model -> model_version -> answers."""
        with self._lock:
            return {m: dict(load.versions) for m, load in self._loads[device_id].items()}

    def errors_by_status(self, device_id: str) -> dict[str, int]:
        with self._lock:
            total: dict[str, int] = {}
            for load in self._loads[device_id].values():
                for status, n in load.statuses.items():
                    total[status] = total.get(status, 0) + n
            return total

    def totals(self) -> LoadFigures:
        with self._lock:
            return figures([load for loads in self._loads.values() for load in loads.values()])

    # --- the sending loop ----------------------------------------------------------------

    def _run(self, target: Target) -> None:
        interval = 1.0 / self.rps
        models: Iterator[str] = itertools.cycle(self.mix)
        connection: http.client.HTTPConnection | None = None
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                model = next(models)
                if connection is None:
                    connection = http.client.HTTPConnection(
                        target.host, target.port, timeout=TIMEOUT_S
                    )
                started = time.monotonic()
                status, version = _infer(connection, model, self._bodies[model])
                elapsed_ms = (time.monotonic() - started) * 1000
                if status != "200":
                    connection.close()
                    connection = None
                self._record(target.device_id, model, status, version, elapsed_ms)
                next_at = max(next_at + interval, time.monotonic() - interval)
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            if connection is not None:
                connection.close()

    def _record(
        self, device_id: str, model: str, status: str, version: str | None, elapsed_ms: float
    ) -> None:
        with self._lock:
            load = self._loads[device_id][model]
            load.requests += 1
            self._sent_at[device_id].append(time.monotonic())
            if status == "200":
                load.latencies_ms.append(elapsed_ms)
                load.recent_ms.append(elapsed_ms)
                key = version or "?"
                load.versions[key] = load.versions.get(key, 0) + 1
            else:
                load.errors += 1
                load.statuses[status] = load.statuses.get(status, 0) + 1


def _request_body(tensor: Tensor, seed: int) -> tuple[bytes, int]:
    """The binary-tensor request for ``tensor`` filled with uniform noise, and the length
    of its JSON header."""
    data = np.random.default_rng(seed).random(tensor.shape, dtype=np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": tensor.name,
                    "datatype": "FP32",
                    "shape": list(tensor.shape),
                    "parameters": {"binary_data_size": data.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + data.astype("<f4").tobytes(), len(header)


def _infer(
    connection: http.client.HTTPConnection, model: str, body: tuple[bytes, int]
) -> tuple[str, str | None]:
    """POST one inference; (HTTP status or ``"connect"``/``"timeout"``, model_version)."""
    payload, header_length = body
    try:
        connection.request(
            "POST",
            f"/v2/models/{model}/infer",
            body=payload,
            headers={
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(header_length),
            },
        )
        response = connection.getresponse()
        content = response.read()
    except TimeoutError:
        return "timeout", None
    except (OSError, http.client.HTTPException):
        return "connect", None
    if response.status != 200:
        return str(response.status), None
    length = response.getheader("Inference-Header-Content-Length")
    try:
        head = content[: int(length)] if length is not None else content
        version = json.loads(head).get("model_version")
    except (ValueError, AttributeError):
        return "bad-answer", None
    return "200", str(version) if version is not None else None

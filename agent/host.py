"""The model host: load and smoke-test ONNX Runtime sessions, switch them in one step, admit
inferences under each model's concurrency limit.

Apply order is *load the new, then swap, then drain the old*::

    new = {spec.name: Slot(load_model(...), policy.for_model(spec.name)) for spec in ...}
    old = host.swap(new)           # one atomic step; new requests now see `new`
    host.drain(old, timeout=30.0)  # waits for the old slots' in-flight requests, releases them

A request takes its slot from the active table when it enters :meth:`ModelHost.acquire`
and finishes on that slot's session even if a swap happens meanwhile; a request still
waiting in a queue when its slot is swapped out moves to the slot that replaced it.
Limits (max concurrency, queue depth, reject-or-queue) belong to a slot, so during a
switch the old slot's in-flight requests and the new slot's may briefly run side by side.
Statistics belong to a slot too: a new version starts with fresh numbers.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy.typing as npt
import onnxruntime as ort

from agent.errors import (
    InferenceError,
    ModelLoadError,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    SmokeTestError,
)
from agent.smoke import GoldenData, SmokeReport, is_dynamic, load_golden, run_smoke_test
from agent.stats import ModelStats
from contract.manifests import ModelRuntime, ModelSpec, Variant

Array = npt.NDArray[Any]
CPU = "CPUExecutionProvider"
SlotState = Literal["active", "unavailable", "retired", "released"]


# --- loading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorMeta:
    """An input or output as the inference API reports it; -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...] | None

    @classmethod
    def from_ort(cls, node: Any) -> TensorMeta:
        """From an ONNX Runtime NodeArg; None shape means the rank is unknown."""
        dims = node.shape
        shape = None if dims is None else tuple(-1 if is_dynamic(d) else int(d) for d in dims)
        return cls(name=node.name, datatype=node.type, shape=shape)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        shape = None if self.shape is None else list(self.shape)
        return {"name": self.name, "datatype": self.datatype, "shape": shape}


@dataclass(frozen=True)
class LoadedModel:
    """A smoke-tested ONNX Runtime session and what it is."""

    name: str
    version: str
    variant: str
    precision: str
    provider: str
    sha256: str
    intra_op_threads: int
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    smoke: SmokeReport
    session: Any = field(repr=False, compare=False)
    provider_fallback: str | None = None
    """Why the session runs on another provider than the first one asked for, if it does."""

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def metadata(self) -> dict[str, Any]:
        """A JSON-ready description (no session)."""
        return {
            "name": self.name,
            "version": self.version,
            "variant": self.variant,
            "precision": self.precision,
            "provider": self.provider,
            "provider_fallback": self.provider_fallback,
            "sha256": self.sha256,
            "intra_op_threads": self.intra_op_threads,
            "inputs": [i.to_dict() for i in self.inputs],
            "outputs": [o.to_dict() for o in self.outputs],
        }


def _pick_variant(spec: ModelSpec, digest: str, variant: str | None) -> Variant:
    if variant is not None:
        for v in spec.variants:
            if v.name == variant:
                if v.artifact.sha256 != digest:
                    raise ModelLoadError(
                        f"file sha256 {digest} is not variant {variant!r}'s {v.artifact.sha256}",
                        model=spec.name,
                    )
                return v
        raise ModelLoadError(f"the spec has no variant {variant!r}", model=spec.name)
    for v in spec.variants:
        if v.artifact.sha256 == digest:
            return v
    raise ModelLoadError(f"file sha256 {digest} matches no variant of the spec", model=spec.name)


def _read_golden(spec: ModelSpec, golden_path: Path | None) -> GoldenData | None:
    if spec.golden is None:
        if golden_path is not None:
            raise ModelLoadError(
                "a golden file was given but the spec has no golden entry", model=spec.name
            )
        return None
    if golden_path is None:
        raise ModelLoadError("the spec names a golden file but none was given", model=spec.name)
    try:
        data = Path(golden_path).read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read golden file: {exc}", model=spec.name) from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.golden.artifact.sha256:
        raise ModelLoadError(
            f"golden file sha256 {digest} is not the spec's {spec.golden.artifact.sha256}",
            model=spec.name,
        )
    try:
        arrays = load_golden(data)
    except SmokeTestError as exc:
        raise SmokeTestError(exc.reason, model=spec.name) from exc
    return GoldenData(arrays=arrays, rtol=spec.golden.rtol, atol=spec.golden.atol)


def provider_list(preferred: Sequence[str]) -> tuple[list[str], list[str]]:
    """The available providers of ``preferred`` in order, CPU last; and the unavailable ones."""
    available = set(ort.get_available_providers())
    chosen: list[str] = []
    missing: list[str] = []
    for name in preferred:
        if name in chosen or name == CPU:
            continue
        (chosen if name in available else missing).append(name)
    chosen.append(CPU)
    return chosen, missing


def session_options(intra_op_threads: int, *, allow_spinning: bool = False) -> Any:
    """SessionOptions for a hosted model: its share of threads, one inter-op thread.

    Spinning is off by default: on a small device an idle-spinning pool steals the cores
    that MQTT, HTTP and SQLite need, for a small latency gain.
    """
    if intra_op_threads < 1:
        raise ValueError("intra_op_threads must be at least 1 (0 would mean all cores)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    spin = "1" if allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return options


def _create_session(
    data: bytes, options: Any, providers: list[str], model: str
) -> tuple[Any, str | None]:
    try:
        return ort.InferenceSession(data, sess_options=options, providers=providers), None
    except Exception as exc:
        if providers == [CPU]:
            raise ModelLoadError(f"ONNX Runtime refused it: {exc}", model=model) from exc
        first_error = exc
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=[CPU])
    except Exception as exc:
        raise ModelLoadError(f"ONNX Runtime refused it: {exc}", model=model) from exc
    return session, f"{providers[0]} failed ({first_error}); fell back to {CPU}"


def load_model(
    path: Path | str,
    spec: ModelSpec,
    *,
    providers: Sequence[str],
    intra_op_threads: int,
    golden_path: Path | None = None,
    variant: str | None = None,
    allow_spinning: bool = False,
) -> LoadedModel:
    """Read, hash, open and smoke-test one model file; the result may serve.

    The file is read once and the session is created from those bytes, so what was hashed
    is what runs (models with external data files are therefore not supported). The
    variant is the one named, whose sha256 must match, or else the first whose sha256
    matches. Providers are tried in the given order, those this ONNX Runtime lacks skipped,
    CPU last; if session creation fails on the preferred list it is retried on CPU alone.
    Raises ModelLoadError (unreadable, hash, ONNX Runtime refused) or SmokeTestError.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}", model=spec.name) from exc
    digest = hashlib.sha256(data).hexdigest()
    chosen = _pick_variant(spec, digest, variant)
    golden = _read_golden(spec, golden_path)
    options = session_options(intra_op_threads, allow_spinning=allow_spinning)
    wanted, missing = provider_list(providers)
    session, fallback = _create_session(data, options, wanted, spec.name)
    used = session.get_providers()[0]
    if fallback is None and used != wanted[0]:
        fallback = f"{wanted[0]} was not used; running on {used}"
    if fallback is None and missing:
        fallback = f"not available in this ONNX Runtime: {missing}"
    try:
        report = run_smoke_test(session, spec.inputs, golden=golden)
    except SmokeTestError as exc:
        raise SmokeTestError(exc.reason, model=spec.name) from exc
    return LoadedModel(
        name=spec.name,
        version=spec.version,
        variant=chosen.name,
        precision=chosen.precision,
        provider=used,
        sha256=digest,
        intra_op_threads=intra_op_threads,
        inputs=tuple(TensorMeta.from_ort(i) for i in session.get_inputs()),
        outputs=tuple(TensorMeta.from_ort(o) for o in session.get_outputs()),
        smoke=report,
        session=session,
        provider_fallback=fallback,
    )


def thread_budget(total_threads: int, priorities: Mapping[str, int]) -> dict[str, int]:
    """Share ``total_threads`` intra-op threads among models (name -> priority).

    Rule: every model gets 1; the rest is dealt out one at a time in priority order
    (highest first, ties by name), round and round. So the sum is exactly the budget, a
    higher-priority model never gets fewer threads than a lower-priority one, and no two
    differ by more than one. When models outnumber threads each still gets 1 (ONNX Runtime
    needs one; 0 would mean all cores) and the sum is the model count: keep such a set's
    concurrency low, as the budget cannot be kept by threads alone.
    """
    if total_threads < 1:
        raise ValueError("total_threads must be at least 1")
    order = sorted(priorities, key=lambda name: (-priorities[name], name))
    shares = dict.fromkeys(order, 1)
    spare = total_threads - len(order) if order else 0
    for i in range(max(spare, 0)):
        shares[order[i % len(order)]] += 1
    return shares


# --- slots and admission ---------------------------------------------------------------


class _Waiter:
    __slots__ = ("cond", "granted")

    def __init__(self, lock: threading.Lock) -> None:
        self.cond = threading.Condition(lock)
        self.granted = False


class Slot:
    """One entry of the active table: a loaded model (or a reason it is not served), its
    runtime limits, its in-flight count and its statistics."""

    def __init__(
        self,
        model: LoadedModel | None,
        runtime: ModelRuntime | None = None,
        *,
        stats: ModelStats | None = None,
        name: str | None = None,
        version: str | None = None,
        reason: str | None = None,
    ) -> None:
        if model is None and (name is None or reason is None):
            raise ValueError("a slot without a model needs a name and a reason")
        self.name: str = model.name if model is not None else str(name)
        self.version: str | None = model.version if model is not None else version
        self.runtime = runtime if runtime is not None else ModelRuntime()
        self.reason = None if model is not None else reason
        self.stats = stats if stats is not None else ModelStats()
        self._model = model
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._waiters: deque[_Waiter] = deque()
        self._in_flight = 0
        self._retired = False
        self._released = False

    @classmethod
    def unavailable(
        cls,
        name: str,
        reason: str,
        *,
        version: str | None = None,
        runtime: ModelRuntime | None = None,
    ) -> Slot:
        """A placeholder that answers every request with ModelUnavailable(reason)."""
        return cls(None, runtime, name=name, version=version, reason=reason)

    @property
    def model(self) -> LoadedModel | None:
        """The loaded model; None for a placeholder or once released."""
        return self._model

    @property
    def state(self) -> SlotState:
        if self._released:
            return "released"
        if self._retired:
            return "retired"
        return "unavailable" if self.reason is not None else "active"

    @property
    def in_flight(self) -> int:
        """Requests holding a permit (running, or handed a permit and about to run)."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Requests waiting for a permit."""
        return len(self._waiters)

    def __repr__(self) -> str:
        return (
            f"Slot({self.name!r}, version={self.version!r}, state={self.state!r}, "
            f"in_flight={self._in_flight}, queued={len(self._waiters)})"
        )

    def _reject(self, reason: str) -> Overloaded:
        self.stats.record_rejected()
        return Overloaded(self.name, reason)

    def _enter(self, deadline: float | None) -> bool:
        """Take a permit: True when taken, False when the slot was retired (look again)."""
        with self._lock:
            if self._retired:
                return False
            if self.reason is not None:
                self.stats.record_rejected()
                raise ModelUnavailable(self.name, self.reason)
            limit = self.runtime.max_concurrency
            if self._in_flight < limit and not self._waiters:
                self._in_flight += 1
                return True
            if self.runtime.on_overload == "reject":
                raise self._reject(f"all {limit} permits are taken")
            if len(self._waiters) >= self.runtime.queue_depth:
                raise self._reject(
                    f"all {limit} permits are taken and the queue of "
                    f"{self.runtime.queue_depth} is full"
                )
            waiter = _Waiter(self._lock)
            self._waiters.append(waiter)
            while not waiter.granted and not self._retired:
                if deadline is None:
                    waiter.cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    waiter.cond.wait(remaining)
            if waiter.granted:
                return True
            self._waiters.remove(waiter)
            if self._retired:
                return False
            raise self._reject("timed out waiting in the queue for a permit")

    def _exit(self) -> None:
        """Give the permit back, or hand it straight to the first waiter (FIFO, no barging)."""
        with self._lock:
            if self._waiters and not self._retired:
                waiter = self._waiters.popleft()
                waiter.granted = True
                waiter.cond.notify()
                return
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def _retire(self) -> None:
        with self._lock:
            self._retired = True
            for waiter in self._waiters:
                waiter.cond.notify()

    def _drain(self, deadline: float | None) -> bool:
        """Wait until nothing is in flight, then drop the session; False on timeout."""
        with self._lock:
            while self._in_flight > 0:
                if deadline is None:
                    self._idle.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._idle.wait(remaining)
            self._model = None
            self._released = True
            return True


class Lease:
    """A permit on one slot, held for the duration of a request."""

    __slots__ = ("model", "slot")

    def __init__(self, slot: Slot, model: LoadedModel) -> None:
        self.slot = slot
        self.model = model

    def run(
        self, inputs: Mapping[str, Array], output_names: Sequence[str] | None = None
    ) -> dict[str, Array]:
        """``session.run`` on this lease's model, recorded in the slot's statistics.

        Raises InferenceError: status 400 when ONNX Runtime refused the inputs (counted as
        a rejection), 500 when the run failed (counted as an error).
        """
        names = list(output_names) if output_names is not None else self.model.output_names
        start = time.perf_counter()
        try:
            values = self.model.session.run(names, dict(inputs))
        except Exception as exc:
            if isinstance(exc, ValueError | TypeError) or type(exc).__name__ == "InvalidArgument":
                self.slot.stats.record_rejected()
                raise InferenceError(self.model.name, str(exc), status=400) from exc
            self.slot.stats.record((time.perf_counter() - start) * 1000.0, ok=False)
            raise InferenceError(self.model.name, str(exc), status=500) from exc
        self.slot.stats.record((time.perf_counter() - start) * 1000.0)
        return dict(zip(names, values, strict=True))


class _Default(Enum):
    HOST = "host"


class ModelHost:
    """The active model table and admission to it. Thread-safe."""

    def __init__(
        self,
        table: Mapping[str, Slot] | None = None,
        *,
        queue_timeout_s: float | None = None,
    ) -> None:
        """``queue_timeout_s``: how long a queued request waits for a permit (None: no limit)."""
        self.queue_timeout_s = queue_timeout_s
        self._swap_lock = threading.RLock()
        self._table: Mapping[str, Slot] = MappingProxyType({})
        if table:
            self.swap(table)

    @property
    def table(self) -> Mapping[str, Slot]:
        """The active table (read-only; replaced as a whole by swap)."""
        return self._table

    def swap(self, new_table: Mapping[str, Slot]) -> Mapping[str, Slot]:
        """Make ``new_table`` active in one step and return the table it replaced.

        Slots of the old table that are not in the new one are retired: they take no new
        requests, their queued requests move to the new table, their in-flight requests
        finish. Pass the returned table to :meth:`drain`. A retired slot cannot come back.
        """
        frozen = MappingProxyType(dict(new_table))
        with self._swap_lock:
            for key, slot in frozen.items():
                if key != slot.name:
                    raise ValueError(f"table key {key!r} holds slot {slot.name!r}")
                if slot.state in ("retired", "released"):
                    raise ValueError(f"slot {slot!r} was swapped out before and cannot come back")
            old = self._table
            self._table = frozen
            keep = {id(slot) for slot in frozen.values()}
            for slot in old.values():
                if id(slot) not in keep:
                    slot._retire()
        return old

    def drain(self, old: Mapping[str, Slot] | Iterable[Slot], timeout: float | None = None) -> bool:
        """Wait for the retired slots among ``old`` to finish in-flight requests, then release
        their sessions. Slots still active are left alone. False when ``timeout`` ran out
        first; those slots stay retired and may be drained again."""
        slots = old.values() if isinstance(old, Mapping) else old
        deadline = None if timeout is None else time.monotonic() + timeout
        done = True
        for slot in slots:
            if slot.state in ("retired", "released"):
                done = slot._drain(deadline) and done
        return done

    def mark_unavailable(self, name: str, reason: str) -> Mapping[str, Slot]:
        """Replace ``name``'s slot by a placeholder refusing requests with ``reason`` (503);
        returns the previous table, to drain. ModelNotFound when ``name`` is not hosted."""
        with self._swap_lock:
            slot = self._table.get(name)
            if slot is None:
                raise ModelNotFound(name)
            new = dict(self._table)
            new[name] = Slot.unavailable(name, reason, version=slot.version, runtime=slot.runtime)
            return self.swap(new)

    @contextmanager
    def acquire(
        self,
        name: str,
        *,
        version: str | None = None,
        timeout: float | _Default | None = _Default.HOST,
    ) -> Iterator[Lease]:
        """Hold a permit on ``name``'s current slot for one request.

        Raises ModelNotFound (404: no such model or version), ModelUnavailable (503: shed),
        Overloaded (429: rejected, queue full, or ``timeout`` seconds spent queued; the
        default is the host's queue_timeout_s).
        """
        wait = self.queue_timeout_s if isinstance(timeout, _Default) else timeout
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            slot = self._table.get(name)
            if slot is None:
                raise ModelNotFound(name)
            if version is not None and slot.version != version:
                raise ModelNotFound(name, f"version {version!r} is not loaded")
            if slot._enter(deadline):
                break
        try:
            model = slot.model
            assert model is not None  # a slot holding permits is never released
            yield Lease(slot, model)
        finally:
            slot._exit()

    def infer(
        self,
        name: str,
        inputs: Mapping[str, Array],
        output_names: Sequence[str] | None = None,
        *,
        version: str | None = None,
    ) -> dict[str, Array]:
        """Run ``name`` on ``inputs`` under its limits; outputs by name (all when None)."""
        with self.acquire(name, version=version) as lease:
            return lease.run(inputs, output_names)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per-model state and statistics of the active table, for telemetry."""
        result: dict[str, dict[str, Any]] = {}
        for name, slot in self._table.items():
            model = slot.model
            result[name] = {
                "version": slot.version,
                "variant": model.variant if model else None,
                "precision": model.precision if model else None,
                "provider": model.provider if model else None,
                "state": slot.state,
                "reason": slot.reason,
                "in_flight": slot.in_flight,
                "queued": slot.queued,
                "stats": slot.stats.snapshot().to_dict(),
            }
        return result

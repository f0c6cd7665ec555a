"""The model host on real ONNX Runtime: loading, smoke tests, swap under load, admission."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from agent.errors import (
    InferenceError,
    ModelLoadError,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    SmokeTestError,
)
from agent.host import LoadedModel, ModelHost, Slot, load_model, thread_budget
from contract.manifests import (
    Artifact,
    Golden,
    InputHint,
    ModelRuntime,
    ModelSpec,
    Requirements,
    Variant,
)

CPU = ["CPUExecutionProvider"]
OCR_HINTS = {"det": [1, 3, 320, 320], "cls": [1, 3, 48, 192], "rec": [1, 3, 48, 320]}


# --- helpers -----------------------------------------------------------------------------


def artifact(path: Path) -> Artifact:
    data = path.read_bytes()
    return Artifact(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def spec_for(
    name: str,
    path: Path,
    *,
    version: str = "1",
    priority: int = 0,
    hints: dict[str, list[int]] | None = None,
    golden: Path | None = None,
) -> ModelSpec:
    return ModelSpec(
        name=name,
        version=version,
        priority=priority,
        inputs={k: InputHint(shape=v) for k, v in (hints or {}).items()},
        golden=Golden(artifact=artifact(golden), rtol=1e-4, atol=1e-5) if golden else None,
        variants=[
            Variant(
                name="fp32",
                precision="fp32",
                artifact=artifact(path),
                requires=Requirements(memory_mb=64),
            )
        ],
    )


def save_graph(path: Path, nodes: list[Any], initializers: list[Any] | None = None) -> Path:
    """A float model x[batch, 4] -> y[batch, 4] built from ``nodes``."""
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=initializers or [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def add_model(path: Path, constant: float) -> Path:
    """y = x + constant."""
    c = helper.make_tensor("c", TensorProto.FLOAT, [1], [constant])
    return save_graph(path, [helper.make_node("Add", ["x", "c"], ["y"])], [c])


def nan_model(path: Path) -> Path:
    """y = x + log(-1): always NaN."""
    c = helper.make_tensor("c", TensorProto.FLOAT, [1], [-1.0])
    nodes = [helper.make_node("Log", ["c"], ["l"]), helper.make_node("Add", ["x", "l"], ["y"])]
    return save_graph(path, nodes, [c])


def load_tiny(path: Path, name: str = "m", version: str = "1") -> LoadedModel:
    return load_model(
        path, spec_for(name, path, version=version), providers=CPU, intra_op_threads=1
    )


class GatedSession:
    """A real session whose runs wait for a gate to open."""

    def __init__(self, inner: Any, gate: threading.Event) -> None:
        self.inner = inner
        self.gate = gate

    def run(self, names: Any, feeds: Any) -> Any:
        assert self.gate.wait(10), "gate never opened"
        return self.inner.run(names, feeds)


def gated(model: LoadedModel, gate: threading.Event) -> LoadedModel:
    return dataclasses.replace(model, session=GatedSession(model.session, gate))


def state(slot: Slot) -> str:
    """The slot's state, unnarrowed (it changes under the type checker's feet)."""
    return slot.state


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


class Workers:
    """Threads calling ``fn`` and keeping its result or exception."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.results: list[Any] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def start(self, fn: Callable[[], Any]) -> None:
        def body() -> None:
            try:
                result = fn()
            except BaseException as exc:
                with self._lock:
                    self.errors.append(exc)
            else:
                with self._lock:
                    self.results.append(result)

        thread = threading.Thread(target=body)
        self.threads.append(thread)
        thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(10)
            assert not thread.is_alive()


X = np.arange(4, dtype=np.float32).reshape(1, 4)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # never leave a worker blocked


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    d = tmp_path_factory.mktemp("tiny")
    return {
        "v1": load_tiny(add_model(d / "v1.onnx", 1.0), version="1"),
        "v2": load_tiny(add_model(d / "v2.onnx", 2.0), version="2"),
    }


@pytest.fixture(scope="module")
def ocr_loaded(ocr_models: dict[str, Path]) -> dict[str, LoadedModel]:
    return {
        name: load_model(
            path,
            spec_for(name, path, hints={"x": OCR_HINTS[name]}),
            providers=CPU,
            intra_op_threads=1,
        )
        for name, path in ocr_models.items()
    }


# --- loading the real OCR models ---------------------------------------------------------


@pytest.mark.parametrize("name", ["det", "cls", "rec"])
def test_ocr_models_load_with_hints(
    name: str, ocr_loaded: dict[str, LoadedModel], ocr_models: dict[str, Path]
) -> None:
    model = ocr_loaded[name]
    assert (model.name, model.version, model.variant, model.precision) == (
        name,
        "1",
        "fp32",
        "fp32",
    )
    assert model.provider == "CPUExecutionProvider" and model.provider_fallback is None
    assert model.sha256 == hashlib.sha256(ocr_models[name].read_bytes()).hexdigest()
    assert model.smoke.input_shapes == {"x": OCR_HINTS[name]} and not model.smoke.golden
    (inp,) = model.inputs
    assert (inp.name, inp.datatype) == ("x", "tensor(float)")
    assert inp.shape is not None and inp.shape[0] == -1 and inp.shape[1] == 3
    assert -1 in inp.shape[2:]
    meta = model.metadata()
    assert meta["inputs"][0]["shape"] == list(inp.shape)
    assert meta["outputs"][0]["datatype"] == "tensor(float)"
    assert "session" not in meta
    assert model.session.get_session_options().intra_op_num_threads == 1


def test_metadata_shapes(ocr_loaded: dict[str, LoadedModel]) -> None:
    assert ocr_loaded["det"].inputs[0].shape == (-1, 3, -1, -1)
    assert ocr_loaded["det"].outputs[0].shape == (-1, 1, -1, -1)
    assert ocr_loaded["cls"].outputs[0].shape == (-1, 2)
    assert ocr_loaded["rec"].outputs[0].shape == (-1, -1, 6625)


@pytest.mark.parametrize(("name", "shape"), [("cls", (2, 3, 48, 160)), ("det", (1, 3, 256, 288))])
def test_infer_is_bit_identical_to_onnxruntime(
    name: str,
    shape: tuple[int, ...],
    ocr_loaded: dict[str, LoadedModel],
    ocr_models: dict[str, Path],
) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    direct = ort.InferenceSession(str(ocr_models[name]), sess_options=options, providers=CPU)
    x = np.random.default_rng(11).random(shape, dtype=np.float32)
    (expected,) = direct.run(None, {"x": x})

    model = ocr_loaded[name]
    host = ModelHost({name: Slot(model)})
    out = host.infer(name, {"x": x})
    assert list(out) == model.output_names
    got = out[model.output_names[0]]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.tobytes() == expected.tobytes()
    snap = host.snapshot()[name]
    assert snap["stats"]["requests"] == 1 and snap["stats"]["p50_ms"] > 0
    assert (snap["version"], snap["provider"], snap["state"]) == (
        "1",
        "CPUExecutionProvider",
        "active",
    )


def make_golden(tmp_path: Path, cls_path: Path, *, perturb: float = 0.0) -> tuple[Path, np.ndarray]:
    session = ort.InferenceSession(str(cls_path), providers=CPU)
    x = np.random.default_rng(5).random((1, 3, 48, 192), dtype=np.float32)
    (y,) = session.run(None, {"x": x})
    out_name = session.get_outputs()[0].name
    path = tmp_path / f"golden-{perturb}.npz"
    arrays: dict[str, Any] = {"input:x": x, f"output:{out_name}": y + perturb}
    np.savez(path, **arrays)
    return path, x


def test_golden_comparison(tmp_path: Path, ocr_models: dict[str, Path]) -> None:
    cls_path = ocr_models["cls"]
    good, _ = make_golden(tmp_path, cls_path)
    model = load_model(
        cls_path,
        spec_for("cls", cls_path, golden=good),
        providers=CPU,
        intra_op_threads=1,
        golden_path=good,
    )
    assert model.smoke.golden

    bad, _ = make_golden(tmp_path, cls_path, perturb=0.01)
    with pytest.raises(SmokeTestError, match=r"'cls'.*differs from golden") as info:
        load_model(
            cls_path,
            spec_for("cls", cls_path, golden=bad),
            providers=CPU,
            intra_op_threads=1,
            golden_path=bad,
        )
    assert info.value.model == "cls"

    # the golden file must be the one the spec names, and must be given when named
    with pytest.raises(ModelLoadError, match="golden file sha256"):
        load_model(
            cls_path,
            spec_for("cls", cls_path, golden=good),
            providers=CPU,
            intra_op_threads=1,
            golden_path=bad,
        )
    with pytest.raises(ModelLoadError, match="none was given"):
        load_model(
            cls_path, spec_for("cls", cls_path, golden=good), providers=CPU, intra_op_threads=1
        )


# --- refusals ----------------------------------------------------------------------------


def test_nan_output_is_refused(tmp_path: Path) -> None:
    path = nan_model(tmp_path / "nan.onnx")
    with pytest.raises(SmokeTestError, match=r"'nanny'.*output 'y' has 4 non-finite"):
        load_model(path, spec_for("nanny", path), providers=CPU, intra_op_threads=1)


def test_corrupt_file_is_refused(tmp_path: Path, ocr_models: dict[str, Path]) -> None:
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(ocr_models["cls"].read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match=r"'broken'.*ONNX Runtime refused it") as info:
        load_model(path, spec_for("broken", path), providers=CPU, intra_op_threads=1)
    assert not isinstance(info.value, SmokeTestError)


def test_unknown_operator_is_refused(tmp_path: Path) -> None:
    path = save_graph(tmp_path / "unknown.onnx", [helper.make_node("NoSuchOp", ["x"], ["y"])])
    with pytest.raises(ModelLoadError, match="NoSuchOp"):
        load_model(path, spec_for("odd", path), providers=CPU, intra_op_threads=1)


def test_hash_and_variant_are_checked(tmp_path: Path) -> None:
    v1 = add_model(tmp_path / "v1.onnx", 1.0)
    v2 = add_model(tmp_path / "v2.onnx", 2.0)
    with pytest.raises(ModelLoadError, match="matches no variant"):
        load_model(v2, spec_for("m", v1), providers=CPU, intra_op_threads=1)
    with pytest.raises(ModelLoadError, match="is not variant 'fp32'"):
        load_model(v2, spec_for("m", v1), providers=CPU, intra_op_threads=1, variant="fp32")
    with pytest.raises(ModelLoadError, match="no variant 'int8'"):
        load_model(v1, spec_for("m", v1), providers=CPU, intra_op_threads=1, variant="int8")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(tmp_path / "gone.onnx", spec_for("m", v1), providers=CPU, intra_op_threads=1)
    with pytest.raises(ValueError, match="at least 1"):
        load_model(v1, spec_for("m", v1), providers=CPU, intra_op_threads=0)


def test_missing_hint_is_a_smoke_test_error(ocr_models: dict[str, Path]) -> None:
    path = ocr_models["cls"]
    with pytest.raises(SmokeTestError, match=r"'cls'.*input 'x'.*no shape hint"):
        load_model(path, spec_for("cls", path), providers=CPU, intra_op_threads=1)


def test_unavailable_provider_falls_back_to_cpu(tmp_path: Path) -> None:
    path = add_model(tmp_path / "m.onnx", 1.0)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA")
    model = load_model(
        path,
        spec_for("m", path),
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        intra_op_threads=2,
    )
    assert model.provider == "CPUExecutionProvider"
    assert (
        model.provider_fallback is not None and "CUDAExecutionProvider" in model.provider_fallback
    )
    assert model.session.get_session_options().intra_op_num_threads == 2


# --- swap --------------------------------------------------------------------------------


def test_swap_under_a_stream_of_requests(
    tiny_models: dict[str, LoadedModel], gate: threading.Event
) -> None:
    """4 threads stream requests through an update (v1 -> v2) and a rollback (v2 -> v1)."""
    runtime = ModelRuntime(max_concurrency=4, queue_depth=8)
    v1_gated = Slot(gated(tiny_models["v1"], gate), runtime)
    host = ModelHost({"m": v1_gated})
    stop = threading.Event()
    served: list[tuple[Slot, float]] = []
    lock = threading.Lock()

    def stream() -> int:
        n = 0
        while not stop.is_set():
            with host.acquire("m") as lease:
                out = lease.run({"x": X})["y"]
            with lock:
                served.append((lease.slot, float((out - X)[0, 0])))
            n += 1
        return n

    workers = Workers()
    for _ in range(4):
        workers.start(stream)
    try:
        wait_until(lambda: v1_gated.in_flight == 4)  # all four started on v1 and are held

        v2 = Slot(tiny_models["v2"], runtime)
        old = host.swap({"m": v2})
        assert old["m"] is v1_gated and state(v1_gated) == "retired"
        assert not host.drain(old, timeout=0.02)  # four requests still in flight on v1
        assert v1_gated.model is not None

        # new requests go to v2 at once, while v1 still serves its four
        assert float(host.infer("m", {"x": X})["y"][0, 0]) == 2.0
        gate.set()
        assert host.drain(old, timeout=5)
        assert state(v1_gated) == "released" and v1_gated.model is None

        wait_until(lambda: v2.stats.snapshot().total_requests >= 50)
        rollback = Slot(tiny_models["v1"], runtime)
        old = host.swap({"m": rollback})
        wait_until(lambda: rollback.stats.snapshot().total_requests >= 50)
    finally:
        stop.set()
        gate.set()
        workers.join()
    assert host.drain(old, timeout=5)
    assert state(v2) == "released"

    assert workers.errors == []
    per_slot = Counter(id(slot) for slot, _ in served)
    assert per_slot[id(v1_gated)] == 4  # exactly the requests that started on it
    assert per_slot[id(v2)] >= 49 and per_slot[id(rollback)] >= 50
    assert sum(workers.results) == len(served)
    # every request finished on the session of the slot it started on
    expected = {id(v1_gated): 1.0, id(v2): 2.0, id(rollback): 1.0}
    assert all(delta == expected[id(slot)] for slot, delta in served)
    assert v1_gated.stats.snapshot().total_requests == 4


def test_swap_checks_the_table(tiny_models: dict[str, LoadedModel]) -> None:
    first = Slot(tiny_models["v1"])
    host = ModelHost({"m": first})
    with pytest.raises(ValueError, match="holds slot 'm'"):
        host.swap({"other": Slot(tiny_models["v2"])})
    same = host.swap({"m": first})  # an unchanged slot stays active
    assert state(first) == "active" and same["m"] is first
    host.swap({"m": Slot(tiny_models["v2"])})
    assert state(first) == "retired"
    with pytest.raises(ValueError, match="cannot come back"):
        host.swap({"m": first})
    assert host.drain([first], timeout=1) and state(first) == "released"


def test_swap_removes_and_adds_models(tiny_models: dict[str, LoadedModel]) -> None:
    host = ModelHost({"m": Slot(tiny_models["v1"])})
    renamed = dataclasses.replace(tiny_models["v2"], name="n")
    old = host.swap({"n": Slot(renamed)})
    assert host.drain(old, timeout=1)
    with pytest.raises(ModelNotFound) as info:
        host.infer("m", {"x": X})
    assert info.value.status == 404
    assert float(host.infer("n", {"x": X})["y"][0, 0]) == 2.0


# --- admission ---------------------------------------------------------------------------


def test_reject_when_all_permits_are_taken(
    tiny_models: dict[str, LoadedModel], gate: threading.Event
) -> None:
    slot = Slot(
        gated(tiny_models["v1"], gate), ModelRuntime(max_concurrency=1, on_overload="reject")
    )
    host = ModelHost({"m": slot})
    workers = Workers()
    workers.start(lambda: host.infer("m", {"x": X}))
    try:
        wait_until(lambda: slot.in_flight == 1)
        with pytest.raises(Overloaded, match="all 1 permits are taken") as info:
            host.infer("m", {"x": X})
        assert info.value.status == 429 and info.value.model == "m"
    finally:
        gate.set()
        workers.join()
    assert workers.errors == []
    assert slot.stats.snapshot().rejected == 1
    assert float(host.infer("m", {"x": X})["y"][0, 0]) == 1.0  # a permit is free again


def test_queue_waits_then_succeeds_and_refuses_beyond_its_depth(
    tiny_models: dict[str, LoadedModel], gate: threading.Event
) -> None:
    runtime = ModelRuntime(max_concurrency=1, queue_depth=2, on_overload="queue")
    slot = Slot(gated(tiny_models["v1"], gate), runtime)
    host = ModelHost({"m": slot})
    order: list[int] = []

    def call(i: int) -> None:
        host.infer("m", {"x": X})
        order.append(i)

    workers = Workers()
    try:
        workers.start(lambda: call(0))
        wait_until(lambda: slot.in_flight == 1)
        workers.start(lambda: call(1))
        wait_until(lambda: slot.queued == 1)
        workers.start(lambda: call(2))
        wait_until(lambda: slot.queued == 2)
        with pytest.raises(Overloaded, match="queue of 2 is full"):
            host.infer("m", {"x": X})
        with pytest.raises(Overloaded, match="queue of 2 is full"):
            host.infer("m", {"x": X})
    finally:
        gate.set()
        workers.join()
    assert workers.errors == []
    assert order == [0, 1, 2]  # permits are handed over first come, first served
    snap = slot.stats.snapshot()
    assert (snap.requests, snap.rejected) == (3, 2)
    assert (slot.in_flight, slot.queued) == (0, 0)


def test_queue_timeout(tiny_models: dict[str, LoadedModel], gate: threading.Event) -> None:
    slot = Slot(gated(tiny_models["v1"], gate), ModelRuntime(max_concurrency=1, queue_depth=4))
    host = ModelHost({"m": slot}, queue_timeout_s=0.05)
    workers = Workers()
    workers.start(lambda: host.infer("m", {"x": X}))
    try:
        wait_until(lambda: slot.in_flight == 1)
        with pytest.raises(Overloaded, match="timed out"):
            host.infer("m", {"x": X})
        with pytest.raises(Overloaded, match="timed out"), host.acquire("m", timeout=0.01):
            pass
        assert slot.queued == 0
    finally:
        gate.set()
        workers.join()
    assert workers.errors == []
    assert slot.in_flight == 0


def test_queued_request_moves_to_the_new_slot_on_swap(
    tiny_models: dict[str, LoadedModel], gate: threading.Event
) -> None:
    runtime = ModelRuntime(max_concurrency=1, queue_depth=4)
    old_slot = Slot(gated(tiny_models["v1"], gate), runtime)
    host = ModelHost({"m": old_slot})
    workers = Workers()
    try:
        workers.start(lambda: float(host.infer("m", {"x": X})["y"][0, 0]))
        wait_until(lambda: old_slot.in_flight == 1)
        workers.start(lambda: float(host.infer("m", {"x": X})["y"][0, 0]))
        wait_until(lambda: old_slot.queued == 1)
        new_slot = Slot(tiny_models["v2"], runtime)
        old = host.swap({"m": new_slot})
        wait_until(lambda: new_slot.stats.snapshot().total_requests == 1)  # gate still shut
        assert old_slot.queued == 0 and old_slot.in_flight == 1
    finally:
        gate.set()
        workers.join()
    assert workers.errors == []
    assert sorted(workers.results) == [1.0, 2.0]
    assert host.drain(old, timeout=5)


def test_drain_waits_for_in_flight_requests(
    tiny_models: dict[str, LoadedModel], gate: threading.Event
) -> None:
    slot = Slot(gated(tiny_models["v1"], gate), ModelRuntime(max_concurrency=2))
    host = ModelHost({"m": slot})
    workers = Workers()
    try:
        workers.start(lambda: host.infer("m", {"x": X}))
        wait_until(lambda: slot.in_flight == 1)
        old = host.swap({})
        with pytest.raises(ModelNotFound):
            host.infer("m", {"x": X})
        assert not host.drain(old, timeout=0.02) and state(slot) == "retired"
        threading.Timer(0.05, gate.set).run()
        assert host.drain(old, timeout=5)
    finally:
        gate.set()
        workers.join()
    assert workers.errors == [] and state(slot) == "released"


# --- unavailable, not found, bad input ---------------------------------------------------


def test_unavailable_model_answers_with_the_reason(tiny_models: dict[str, LoadedModel]) -> None:
    slot = Slot(tiny_models["v1"])
    host = ModelHost({"m": slot, "n": Slot(dataclasses.replace(tiny_models["v2"], name="n"))})
    reason = "shed: temperature 86.0 C over 85.0 C"
    old = host.mark_unavailable("m", reason)
    assert host.drain(old, timeout=1)
    assert state(slot) == "released" and slot.model is None
    with pytest.raises(ModelUnavailable) as info:
        host.infer("m", {"x": X})
    assert info.value.status == 503 and info.value.reason == reason
    assert not isinstance(info.value, ModelNotFound)
    assert reason in str(info.value)
    assert float(host.infer("n", {"x": X})["y"][0, 0]) == 2.0  # the others keep serving
    snap = host.snapshot()
    assert snap["m"]["state"] == "unavailable" and snap["m"]["reason"] == reason
    assert snap["m"]["version"] == "1" and snap["m"]["stats"]["rejected"] == 1
    with pytest.raises(ModelNotFound):
        host.mark_unavailable("zzz", "shed")

    # reloaded: swap a fresh slot in
    host.swap({**host.table, "m": Slot(tiny_models["v1"])})
    assert float(host.infer("m", {"x": X})["y"][0, 0]) == 1.0


def test_not_found_and_version(tiny_models: dict[str, LoadedModel]) -> None:
    host = ModelHost({"m": Slot(tiny_models["v1"])})
    with pytest.raises(ModelNotFound) as info:
        host.infer("zzz", {"x": X})
    assert info.value.status == 404
    assert float(host.infer("m", {"x": X}, version="1")["y"][0, 0]) == 1.0
    with pytest.raises(ModelNotFound, match="version '2' is not loaded"):
        host.infer("m", {"x": X}, version="2")


def test_bad_inputs_are_400_and_not_model_errors(tiny_models: dict[str, LoadedModel]) -> None:
    slot = Slot(tiny_models["v1"])
    host = ModelHost({"m": slot})
    for feeds in ({"x": X.astype(np.float64)}, {"x": X[0]}, {"nope": X}):
        with pytest.raises(InferenceError) as info:
            host.infer("m", feeds)
        assert info.value.status == 400
    with pytest.raises(InferenceError):
        host.infer("m", {"x": X}, ["nope"])
    snap = slot.stats.snapshot()
    assert (snap.requests, snap.errors, snap.rejected) == (0, 0, 4)
    assert slot.in_flight == 0


class ExplodingSession:
    def run(self, names: Any, feeds: Any) -> Any:
        raise RuntimeError("kernel exploded")


def test_failed_runs_are_500_and_counted(tiny_models: dict[str, LoadedModel]) -> None:
    slot = Slot(dataclasses.replace(tiny_models["v1"], session=ExplodingSession()))
    host = ModelHost({"m": slot})
    with pytest.raises(InferenceError, match="kernel exploded") as info:
        host.infer("m", {"x": X})
    assert info.value.status == 500
    snap = slot.stats.snapshot()
    assert (snap.requests, snap.errors, snap.error_rate) == (1, 1, 1.0)
    assert slot.in_flight == 0


def test_requested_outputs(tiny_models: dict[str, LoadedModel]) -> None:
    host = ModelHost({"m": Slot(tiny_models["v1"])})
    assert list(host.infer("m", {"x": X}, ["y"])) == ["y"]


# --- thread budget -----------------------------------------------------------------------


def test_thread_budget_examples() -> None:
    assert thread_budget(2, {"det": 10, "cls": 1, "rec": 5}) == {"det": 1, "cls": 1, "rec": 1}
    assert thread_budget(4, {"det": 10, "cls": 1, "rec": 5}) == {"det": 2, "cls": 1, "rec": 1}
    assert thread_budget(8, {"det": 10, "cls": 1, "rec": 5}) == {"det": 3, "cls": 2, "rec": 3}
    assert thread_budget(4, {"b": 0, "a": 0}) == {"a": 2, "b": 2}
    assert thread_budget(3, {"b": 0, "a": 0}) == {"a": 2, "b": 1}
    assert thread_budget(4, {}) == {}
    with pytest.raises(ValueError):
        thread_budget(0, {"a": 1})


@given(
    total=st.integers(min_value=1, max_value=64),
    priorities=st.dictionaries(
        st.text("abcdefgh", min_size=1, max_size=4), st.integers(-5, 5), max_size=12
    ),
)
def test_thread_budget_never_oversubscribes(total: int, priorities: dict[str, int]) -> None:
    shares = thread_budget(total, priorities)
    assert set(shares) == set(priorities)
    assert all(n >= 1 for n in shares.values())
    if priorities:
        # the budget is kept whenever it can be (one thread per model is the floor)
        assert sum(shares.values()) == max(total, len(priorities))
        assert max(shares.values()) - min(shares.values()) <= 1
    for a, pa in priorities.items():
        for b, pb in priorities.items():
            if pa > pb:
                assert shares[a] >= shares[b]

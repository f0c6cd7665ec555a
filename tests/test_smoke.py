"""Smoke-test helpers: dtypes, synthetic inputs and their shape rule, NaN/Inf, golden files."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort
import pytest

from agent.errors import SmokeTestError
from agent.smoke import (
    GoldenData,
    check_outputs,
    compare_golden,
    golden_inputs,
    input_shape,
    load_golden,
    numpy_dtype,
    run_smoke_test,
    synthetic_inputs,
)
from contract.manifests import InputHint


class Arg(NamedTuple):
    """Stands in for an ONNX Runtime NodeArg."""

    name: str
    type: str
    shape: list[Any] | None


def hint(*shape: int) -> InputHint:
    return InputHint(shape=list(shape))


@pytest.fixture(scope="module")
def cls_session(ocr_models: dict[str, Path]) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        str(ocr_models["cls"]), sess_options=options, providers=["CPUExecutionProvider"]
    )


def test_dtypes() -> None:
    assert numpy_dtype("tensor(float)") == np.float32
    assert numpy_dtype("tensor(float16)") == np.float16
    assert numpy_dtype("tensor(double)") == np.float64
    assert numpy_dtype("tensor(int64)") == np.int64
    assert numpy_dtype("tensor(uint8)") == np.uint8
    assert numpy_dtype("tensor(bool)") == np.bool_
    assert numpy_dtype("tensor(string)") == np.object_
    with pytest.raises(ValueError, match="bfloat16"):
        numpy_dtype("tensor(bfloat16)")


def test_hint_is_the_whole_shape_and_must_fit_the_model() -> None:
    dims: list[int | str | None] = ["p2o.DynamicDimension.0", 3, "?", None]
    assert input_shape("x", dims, hint(2, 3, 48, 192)) == (2, 3, 48, 192)
    with pytest.raises(SmokeTestError, match=r"'x'.*rank 3.*rank 4"):
        input_shape("x", dims, hint(3, 48, 192))
    with pytest.raises(SmokeTestError, match=r"'x'.*says 4 at axis 1, the model fixes 3"):
        input_shape("x", dims, hint(1, 4, 48, 192))
    assert input_shape("x", None, hint(5)) == (5,)


def test_without_a_hint_only_the_batch_axis_has_a_default() -> None:
    assert input_shape("x", ["batch", 4], None) == (1, 4)
    assert input_shape("x", [None, 4], None) == (1, 4)
    assert input_shape("x", [2, 4], None) == (2, 4)
    assert input_shape("s", [], None) == ()
    with pytest.raises(SmokeTestError, match=r"'x'.*'h' at axis 2.*inputs\.x\.shape"):
        input_shape("x", [1, 3, "h", "w"], None)
    with pytest.raises(SmokeTestError, match="unknown rank"):
        input_shape("x", None, None)


def test_synthetic_inputs_are_deterministic_and_typed() -> None:
    args = [
        Arg("img", "tensor(float)", ["n", 3, "h", "w"]),
        Arg("half", "tensor(float16)", [2, 2]),
        Arg("ids", "tensor(int64)", [None, 5]),
        Arg("mask", "tensor(bool)", [1, 5]),
        Arg("text", "tensor(string)", [2]),
    ]
    hints = {"img": hint(1, 3, 8, 8)}
    a = synthetic_inputs(args, hints, seed=7)
    b = synthetic_inputs(args, hints, seed=7)
    c = synthetic_inputs(args, hints, seed=8)
    assert a["img"].shape == (1, 3, 8, 8) and a["img"].dtype == np.float32
    assert np.array_equal(a["img"], b["img"]) and not np.array_equal(a["img"], c["img"])
    assert ((a["img"] >= 0) & (a["img"] < 1)).all()
    assert a["half"].dtype == np.float16 and a["half"].shape == (2, 2)
    assert a["ids"].dtype == np.int64 and a["ids"].shape == (1, 5) and not a["ids"].any()
    assert a["mask"].dtype == np.bool_ and not a["mask"].any()
    assert a["text"].dtype == object and list(a["text"]) == ["", ""]


def test_synthetic_inputs_refuse_what_they_cannot_build() -> None:
    with pytest.raises(SmokeTestError, match=r"'img'.*no shape hint"):
        synthetic_inputs([Arg("img", "tensor(float)", [1, 3, "h", "w"])], {})
    with pytest.raises(SmokeTestError, match=r"does not have: \['imgs'\]"):
        synthetic_inputs([Arg("img", "tensor(float)", [1, 3])], {"imgs": hint(1, 3)})
    with pytest.raises(SmokeTestError, match=r"'b'.*bfloat16"):
        synthetic_inputs([Arg("b", "tensor(bfloat16)", [1])], {})


def test_synthetic_inputs_from_the_real_classifier(cls_session: Any) -> None:
    with pytest.raises(SmokeTestError, match="'x'"):
        synthetic_inputs(cls_session.get_inputs(), {})
    feeds = synthetic_inputs(cls_session.get_inputs(), {"x": hint(1, 3, 48, 192)})
    assert feeds["x"].shape == (1, 3, 48, 192)
    (out,) = cls_session.run(None, feeds)
    assert out.shape == (1, 2)


def test_check_outputs_names_the_bad_output() -> None:
    check_outputs({"a": np.ones(3, np.float32), "i": np.array([1, 2]), "s": np.array(["x"])})
    with pytest.raises(SmokeTestError, match=r"'b' has 1 non-finite.*of 3"):
        check_outputs({"a": np.ones(3), "b": np.array([1.0, np.nan, 2.0], np.float32)})
    with pytest.raises(SmokeTestError, match=r"'c' has 2 non-finite"):
        check_outputs({"c": np.array([np.inf, -np.inf], np.float16)})


def test_compare_golden() -> None:
    expected = np.array([[1.0, 2.0, 3.0]], np.float32)
    golden: dict[str, Any] = {"input:x": np.zeros(1), "output:y": expected}
    compare_golden({"y": expected + 1e-6}, golden, rtol=1e-3, atol=1e-4)
    with pytest.raises(SmokeTestError, match=r"'y' differs.*1 of 3.*\[0, 1\]"):
        compare_golden(
            {"y": expected + np.array([[0, 0.5, 0]], np.float32)}, golden, rtol=1e-3, atol=1e-4
        )
    with pytest.raises(SmokeTestError, match=r"shape \[3\], golden has \[1, 3\]"):
        compare_golden({"y": expected[0]}, golden, rtol=1e-3, atol=1e-4)
    with pytest.raises(SmokeTestError, match="'y' is not an output"):
        compare_golden({"z": expected}, golden, rtol=1e-3, atol=1e-4)
    with pytest.raises(SmokeTestError, match="no output"):
        compare_golden({"y": expected}, {"input:x": np.zeros(1)}, rtol=1e-3, atol=1e-4)
    ints = {"output:k": np.array([1, 2])}
    compare_golden({"k": np.array([1, 2])}, ints, rtol=0, atol=0)
    with pytest.raises(SmokeTestError):
        compare_golden({"k": np.array([1, 3])}, ints, rtol=0, atol=0)


def test_golden_inputs_must_be_exactly_the_models() -> None:
    arrays = {"input:x": np.zeros(1), "output:y": np.zeros(1)}
    assert list(golden_inputs(arrays, ["x"])) == ["x"]
    with pytest.raises(SmokeTestError, match=r"missing \['z'\], unknown \['x'\]"):
        golden_inputs(arrays, ["z"])


def test_load_golden_refuses_garbage_and_pickles(tmp_path: Path) -> None:
    buf = io.BytesIO()
    arrays_in: dict[str, Any] = {"input:x": np.ones(2), "output:y": np.zeros(2)}
    np.savez(buf, **arrays_in)
    arrays = load_golden(buf.getvalue())
    assert set(arrays) == {"input:x", "output:y"}
    path = tmp_path / "g.npz"
    path.write_bytes(buf.getvalue())
    assert set(load_golden(path)) == {"input:x", "output:y"}
    with pytest.raises(SmokeTestError, match="not a readable"):
        load_golden(b"not an npz")
    pickled = io.BytesIO()
    objects: dict[str, Any] = {"output:y": np.array([{"a": 1}], dtype=object)}
    np.savez(pickled, **objects)
    with pytest.raises(SmokeTestError, match="not a readable"):
        load_golden(pickled.getvalue())


def test_run_smoke_test_on_the_real_classifier(cls_session: Any) -> None:
    report = run_smoke_test(cls_session, {"x": hint(1, 3, 48, 192)})
    assert report.input_shapes == {"x": [1, 3, 48, 192]}
    assert not report.golden and report.duration_ms > 0

    x = np.random.default_rng(3).random((2, 3, 48, 160), dtype=np.float32)
    (y,) = cls_session.run(None, {"x": x})
    name = cls_session.get_outputs()[0].name
    golden = GoldenData(arrays={"input:x": x, f"output:{name}": y}, rtol=1e-4, atol=1e-5)
    report = run_smoke_test(cls_session, {}, golden=golden)
    assert report.golden and report.input_shapes == {"x": [2, 3, 48, 160]}

    bad = GoldenData(arrays={"input:x": x, f"output:{name}": y + 0.1}, rtol=1e-4, atol=1e-5)
    with pytest.raises(SmokeTestError, match="differs from golden"):
        run_smoke_test(cls_session, {}, golden=bad)


class FailingSession:
    def get_inputs(self) -> list[Arg]:
        return [Arg("x", "tensor(float)", ["n", 4])]

    def get_outputs(self) -> list[Arg]:
        return [Arg("y", "tensor(float)", ["n", 4])]

    def run(self, names: list[str], feeds: dict[str, Any]) -> list[Any]:
        raise RuntimeError("kernel exploded")


def test_run_failure_is_a_smoke_test_error() -> None:
    with pytest.raises(SmokeTestError, match=r"shapes \{'x': \[1, 4\]\} failed: kernel exploded"):
        run_smoke_test(FailingSession(), {})

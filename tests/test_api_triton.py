"""The real tritonclient.http client against the inference API hosting the three OCR models:
outputs are bit-identical to calling ONNX Runtime directly on the same input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from agent.api import InferenceServer
from agent.host import LoadedModel, ModelHost
from support.inference import OCR_HINTS, load_ocr, slot


@pytest.fixture(scope="module")
def ocr(ocr_models: dict[str, Path]) -> dict[str, LoadedModel]:
    return load_ocr(ocr_models)


@pytest.fixture
def client(ocr: dict[str, LoadedModel]) -> Iterator[triton.InferenceServerClient]:
    host = ModelHost({name: slot(model) for name, model in ocr.items()})
    server = InferenceServer(host, bind="127.0.0.1:0")
    server.start()
    connection = triton.InferenceServerClient(server.address, network_timeout=30.0)
    try:
        yield connection
    finally:
        connection.close()
        assert server.stop(timeout=5.0)


def sample(name: str, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).random(OCR_HINTS[name], dtype=np.float32)


def test_health_metadata_and_index(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata()["name"] == "edgefleet-agent"
    expected = {
        "det": ("sigmoid_0.tmp_0", [-1, 1, -1, -1]),
        "cls": ("save_infer_model/scale_0.tmp_1", [-1, 2]),
        "rec": ("softmax_11.tmp_0", [-1, -1, 6625]),
    }
    for name, (output, shape) in expected.items():
        assert client.is_model_ready(name)
        assert client.is_model_ready(name, "1")
        meta = client.get_model_metadata(name)
        assert meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, -1, -1]}]
        assert meta["outputs"] == [{"name": output, "datatype": "FP32", "shape": shape}]
    assert not client.is_model_ready("det", "2")
    assert not client.is_model_ready("nope")
    index = client.get_model_repository_index()
    assert {(e["name"], e["version"], e["state"]) for e in index} == {
        ("det", "1", "READY"),
        ("cls", "1", "READY"),
        ("rec", "1", "READY"),
    }


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("name", ["det", "cls", "rec"])
def test_infer_is_bit_identical_to_onnx_runtime(
    client: triton.InferenceServerClient, ocr: dict[str, LoadedModel], name: str, binary: bool
) -> None:
    x = sample(name)
    (output,) = ocr[name].output_names
    expected = ocr[name].session.run(None, {"x": x})[0]
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    requested = triton.InferRequestedOutput(output, binary_data=binary)
    result = client.infer(name, [tensor], outputs=[requested], request_id="r-7")
    got = result.as_numpy(output)
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    assert got.tobytes() == expected.tobytes()
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (name, "1", "r-7")
    with_version = client.infer(name, [tensor], model_version="1")  # all outputs, binary
    assert with_version.as_numpy(output).tobytes() == expected.tobytes()


def test_errors_reach_the_client(client: triton.InferenceServerClient) -> None:
    x = sample("cls")
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)

    def status_of(name: str, inputs: list[Any], version: str = "") -> tuple[str, str]:
        with pytest.raises(InferenceServerException) as info:
            client.infer(name, inputs, model_version=version)
        return str(info.value.status()), str(info.value.message())

    assert status_of("nope", [tensor])[0] == "404"
    assert status_of("cls", [tensor], "3") == (
        "404",
        "model 'cls' has no version '3' loaded (it has '1')",
    )
    wide = triton.InferInput("x", [1, 4, 48, 192], "FP32")
    wide.set_data_from_numpy(np.zeros((1, 4, 48, 192), np.float32))
    status, message = status_of("cls", [wide])
    assert status == "400"
    assert "has 4 at axis 1" in message
    double = triton.InferInput("x", list(x.shape), "FP64")
    double.set_data_from_numpy(x.astype(np.float64))
    assert status_of("cls", [double]) == (
        "400",
        "input 'x': datatype FP64, the model takes FP32",
    )
    assert client.is_server_live()  # the same client goes on working

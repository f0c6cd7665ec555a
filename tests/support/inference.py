"""Helpers for the inference API tests: model specs, small ONNX graphs, loaded OCR models,
HTTP over a Unix socket and raw sockets for requests no client library would send."""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from agent.host import LoadedModel, Slot, load_model
from contract.manifests import (
    Artifact,
    InputHint,
    ModelRuntime,
    ModelSpec,
    Requirements,
    Variant,
)

CPU = ["CPUExecutionProvider"]
OCR_HINTS = {"det": [1, 3, 320, 320], "cls": [1, 3, 48, 192], "rec": [1, 3, 48, 320]}


def spec_for(
    name: str, path: Path, *, version: str = "1", hints: Mapping[str, list[int]] | None = None
) -> ModelSpec:
    """A one-variant spec for the model file at ``path``."""
    data = path.read_bytes()
    return ModelSpec(
        name=name,
        version=version,
        priority=0,
        inputs={k: InputHint(shape=v) for k, v in (hints or {}).items()},
        variants=[
            Variant(
                name="fp32",
                precision="fp32",
                artifact=Artifact(sha256=hashlib.sha256(data).hexdigest(), size=len(data)),
                requires=Requirements(memory_mb=64),
            )
        ],
    )


def load(
    name: str,
    path: Path,
    *,
    version: str = "1",
    hints: Mapping[str, list[int]] | None = None,
    threads: int = 1,
) -> LoadedModel:
    """Load and smoke-test a model on CPU."""
    return load_model(
        path,
        spec_for(name, path, version=version, hints=hints),
        providers=CPU,
        intra_op_threads=threads,
    )


def load_ocr(paths: Mapping[str, Path]) -> dict[str, LoadedModel]:
    """The three OCR models, loaded with their shape hints."""
    return {name: load(name, paths[name], hints={"x": OCR_HINTS[name]}) for name in OCR_HINTS}


def slot(model: LoadedModel, **runtime: Any) -> Slot:
    """A slot for ``model`` with the given ModelRuntime fields."""
    return Slot(model, ModelRuntime(**runtime))


def save_add_model(path: Path, constant: float, *, width: int | None = None) -> Path:
    """An FP32 model y = x + constant, x of shape [batch, width] (width dynamic if None)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, width])],
        initializer=[helper.make_tensor("c", TensorProto.FLOAT, [], [constant])],
    )
    return _save(path, graph)


def save_identity_model(path: Path, elem_type: int, *, rank: int = 1) -> Path:
    """A model y = Identity(x) of any ONNX element type, every dimension dynamic."""
    dims: list[int | str | None] = [None] * rank
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", elem_type, dims)],
        [helper.make_tensor_value_info("y", elem_type, dims)],
    )
    return _save(path, graph)


def _save(path: Path, graph: Any) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix domain socket."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def binary_request(
    inputs: Mapping[str, np.ndarray[Any, Any]],
    *,
    datatype: str = "FP32",
    binary_output: bool = True,
) -> tuple[bytes, dict[str, str]]:
    """A Triton binary-extension body and its headers for float inputs."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": array.nbytes},
                }
                for name, array in inputs.items()
            ],
            "parameters": {"binary_data_output": binary_output},
        }
    ).encode()
    body = header + b"".join(array.tobytes() for array in inputs.values())
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return body, headers


def read_binary_response(response: http.client.HTTPResponse) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary section of a response."""
    body = response.read()
    length = response.getheader("Inference-Header-Content-Length")
    if length is None:
        return json.loads(body), b""
    return json.loads(body[: int(length)]), body[int(length) :]


def raw_exchange(port: int, data: bytes, *, shut_write: bool = True, timeout: float = 5.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port (then half-close) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def parse_raw_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one raw HTTP response."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


class GatedSession:
    """Wraps an ONNX Runtime session: ``run`` waits until ``gate`` is set (at most 10 s)."""

    def __init__(self, session: Any, gate: threading.Event) -> None:
        self.session = session
        self.gate = gate
        self.entered = threading.Semaphore(0)

    def run(self, names: Any, feeds: Any) -> Any:
        self.entered.release()
        self.gate.wait(10.0)
        return self.session.run(names, feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def gated(model: LoadedModel, gate: threading.Event) -> LoadedModel:
    """The same model whose runs wait for ``gate``."""
    return dataclasses.replace(model, session=GatedSession(model.session, gate))

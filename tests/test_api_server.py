"""The inference API over real HTTP on loopback (and a Unix socket) with small real models:
endpoints, every error status, body limits, admission limits, connection limits, stop."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto
from prometheus_client.parser import text_string_to_metric_families

from agent.api import ApiMetrics, InferenceServer, Readiness, RepositoryEntry
from agent.api.server import parse_bind
from agent.host import LoadedModel, ModelHost
from support.inference import (
    GatedSession,
    UnixHTTPConnection,
    binary_request,
    gated,
    load,
    parse_raw_response,
    raw_exchange,
    read_binary_response,
    save_add_model,
    save_identity_model,
    slot,
)

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    root = tmp_path_factory.mktemp("api-models")
    return {
        "add": load("add", save_add_model(root / "add.onnx", 1.0, width=4), hints={"x": [1, 4]}),
        "text": load("text", save_identity_model(root / "s.onnx", TensorProto.STRING)),
        "flags": load(
            "flags",
            save_identity_model(root / "b.onnx", TensorProto.BOOL, rank=2),
            hints={"x": [1, 2]},
        ),
    }


@contextmanager
def serving(host: ModelHost, **options: Any) -> Iterator[InferenceServer]:
    options.setdefault("bind", "127.0.0.1:0")
    options.setdefault("max_body_bytes", LIMIT)
    server = InferenceServer(host, **options)
    server.start()
    try:
        yield server
    finally:
        assert server.stop(timeout=5.0)


@pytest.fixture
def host(models: dict[str, LoadedModel]) -> ModelHost:
    return ModelHost({name: slot(model) for name, model in models.items()})


@pytest.fixture
def server(host: ModelHost) -> Iterator[InferenceServer]:
    with serving(host) as running:
        yield running


def connect(server: InferenceServer) -> http.client.HTTPConnection:
    assert server.port is not None
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)


def call(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, http.client.HTTPResponse]:
    """One request; the JSON body (or the raw bytes when it is not JSON)."""
    data = json.dumps(body).encode() if isinstance(body, dict | list) else body
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    raw = response.read()
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = raw
    return response.status, doc, response


def x_input(values: list[float], shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": shape or [1, len(values)], "data": values}


# --- endpoints -----------------------------------------------------------------------------


def test_health_metadata_and_index(server: InferenceServer) -> None:
    assert server.address == f"127.0.0.1:{server.port}"
    conn = connect(server)
    assert call(conn, "GET", "/v2/health/live")[:2] == (200, {"live": True})
    assert call(conn, "GET", "/v2/health/ready")[:2] == (200, {"ready": True})
    status, doc, _ = call(conn, "GET", "/v2")
    assert status == 200
    assert doc["name"] == "edgefleet-agent"
    assert "binary_tensor_data" in doc["extensions"]
    status, doc, _ = call(conn, "GET", "/v2/models/add")
    assert status == 200
    assert doc == {
        "name": "add",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
    }
    assert call(conn, "GET", "/v2/models/add/versions/1")[1] == doc
    assert call(conn, "GET", "/v2/models/add/ready")[:2] == (200, {"name": "add", "ready": True})
    assert call(conn, "GET", "/v2/models/add/versions/1/ready")[0] == 200
    status, doc, _ = call(conn, "POST", "/v2/repository/index")
    assert status == 200
    assert [(e["name"], e["state"]) for e in doc] == [
        ("add", "READY"),
        ("flags", "READY"),
        ("text", "READY"),
    ]
    conn.close()


def test_daemon_readiness_and_repository_are_reported(host: ModelHost) -> None:
    state = Readiness(False, "generation 7 is loading")
    entries = [
        RepositoryEntry("add", "1", "READY"),
        RepositoryEntry("rec", "4", "UNAVAILABLE", "left out by selection: memory budget"),
        RepositoryEntry("det", "2", "LOADING", "smoke test running"),
    ]
    with serving(host, readiness=lambda: state, repository=lambda: entries) as server:
        conn = connect(server)
        status, doc, _ = call(conn, "GET", "/v2/health/ready")
        assert (status, doc) == (400, {"ready": False, "error": "generation 7 is loading"})
        status, doc, _ = call(conn, "POST", "/v2/repository/index", {"ready": False})
        assert doc[1] == {
            "name": "rec",
            "version": "4",
            "state": "UNAVAILABLE",
            "reason": "left out by selection: memory budget",
        }
        status, doc, _ = call(conn, "POST", "/v2/repository/index", {"ready": True})
        assert [e["name"] for e in doc] == ["add"]
        status, doc, _ = call(conn, "GET", "/v2/models/rec")
        assert status == 404
        assert "left out by selection: memory budget" in doc["error"]
        status, doc, _ = call(conn, "POST", "/v2/models/rec/infer", {"inputs": [x_input([1])]})
        assert status == 404
        assert "left out by selection" in doc["error"]
        conn.close()


def test_json_and_binary_inference_on_one_keep_alive_connection(server: InferenceServer) -> None:
    conn = connect(server)
    for _ in range(3):
        status, doc, response = call(
            conn, "POST", "/v2/models/add/infer", {"id": "r1", "inputs": [x_input([1, 2, 3, 4])]}
        )
        assert status == 200
        assert response.getheader("Content-Type") == "application/json"
        assert doc == {
            "model_name": "add",
            "model_version": "1",
            "id": "r1",
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 4], "data": [2, 3, 4, 5]}],
        }
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        body, headers = binary_request({"x": x})
        conn.request("POST", "/v2/models/add/versions/1/infer", body=body, headers=headers)
        response = conn.getresponse()
        assert response.status == 200
        header, binary = read_binary_response(response)
        (out,) = header["outputs"]
        assert out["parameters"]["binary_data_size"] == 32
        assert np.array_equal(np.frombuffer(binary, np.float32).reshape(2, 4), x + 1)
    conn.close()


def test_requested_outputs_choose_json_or_binary_each(server: InferenceServer) -> None:
    conn = connect(server)
    request = {
        "inputs": [x_input([1, 2, 3, 4])],
        "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
        "parameters": {"binary_data_output": True},
    }
    status, doc, _ = call(conn, "POST", "/v2/models/add/infer", request)
    assert status == 200
    assert doc["outputs"][0]["data"] == [2, 3, 4, 5]
    request["outputs"] = [{"name": "y"}]
    conn.request("POST", "/v2/models/add/infer", body=json.dumps(request))
    _, binary = read_binary_response(conn.getresponse())
    assert np.frombuffer(binary, np.float32).tolist() == [2, 3, 4, 5]
    request["outputs"] = [{"name": "nope"}]
    status, doc, _ = call(conn, "POST", "/v2/models/add/infer", request)
    assert status == 400
    assert "no outputs ['nope']" in doc["error"]
    conn.close()


def test_bytes_and_bool_tensors(server: InferenceServer) -> None:
    conn = connect(server)
    words = {"name": "x", "datatype": "BYTES", "shape": [2], "data": ["ab", "wörld"]}
    status, doc, _ = call(conn, "POST", "/v2/models/text/infer", {"inputs": [words]})
    assert (status, doc["outputs"][0]["data"]) == (200, ["ab", "wörld"])
    flags = {"name": "x", "datatype": "BOOL", "shape": [1, 2], "data": [[True, False]]}
    status, doc, _ = call(conn, "POST", "/v2/models/flags/infer", {"inputs": [flags]})
    assert (status, doc["outputs"][0]["data"]) == (200, [True, False])
    conn.close()


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/models/nope/infer", {"inputs": [x_input([1, 2, 3, 4])]}, 404, "'nope' is not loaded"),
        ("/v2/models/add/versions/9/infer", {"inputs": [x_input([1, 2, 3, 4])]}, 404, "no version"),
        ("/v2/models/add/infer", {"inputs": [x_input([1, 2, 3])]}, 400, "has 3 at axis 1"),
        ("/v2/models/add/infer", {"inputs": [x_input([1, 2, 3, 4], [4])]}, 400, "rank"),
        ("/v2/models/add/infer", {"inputs": [x_input([1, 2, 3], [1, 4])]}, 400, "needs 4"),
        (
            "/v2/models/add/infer",
            {"inputs": [{**x_input([1, 2, 3, 4]), "datatype": "FP64"}]},
            400,
            "datatype FP64, the model takes FP32",
        ),
        (
            "/v2/models/add/infer",
            {"inputs": [{**x_input([1, 2, 3, 4]), "datatype": "FLOAT"}]},
            400,
            "unknown datatype 'FLOAT'",
        ),
        (
            "/v2/models/add/infer",
            {"inputs": [{**x_input([1, 2, 3, 4]), "name": "q"}]},
            400,
            "unknown ['q']",
        ),
        ("/v2/models/add/infer", b'{"inputs": [', 400, "not valid JSON"),
        ("/v2/models/add/infer", b"", 400, "not valid JSON"),
        ("/v2/models/nope", None, 404, "'nope' is not loaded"),
        ("/v2/models/nope/ready", None, 404, "'nope' is not loaded"),
        ("/v2/models/add/versions/2/ready", None, 404, "no version '2'"),
        ("/v2/nothing", None, 404, "no endpoint /v2/nothing"),
    ],
)
def test_error_statuses_keep_the_connection(
    server: InferenceServer, path: str, body: Any, status: int, message: str | None
) -> None:
    conn = connect(server)
    method = "GET" if body is None else "POST"
    got, doc, response = call(conn, method, path, body)
    assert got == status, doc
    assert set(doc) == {"error"}
    if message is not None:
        assert message in doc["error"]
    assert response.getheader("Connection") != "close"
    assert call(conn, "GET", "/v2/health/live")[0] == 200  # the connection still works
    conn.close()


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/v2/models/add", "GET"),
        ("POST", "/v2/health/ready", "GET"),
        ("GET", "/v2/models/add/infer", "POST"),
        ("GET", "/v2/repository/index", "POST"),
    ],
)
def test_wrong_method_is_405(server: InferenceServer, method: str, path: str, allowed: str) -> None:
    conn = connect(server)
    status, doc, response = call(conn, method, path)
    assert status == 405
    assert response.getheader("Allow") == allowed
    assert f"use {allowed}" in doc["error"]
    conn.close()


def test_binary_body_errors(server: InferenceServer) -> None:
    x = np.zeros((1, 4), np.float32)
    body, headers = binary_request({"x": x})
    conn = connect(server)
    # binary section shorter than binary_data_size: the body ends early
    status, doc, _ = call(conn, "POST", "/v2/models/add/infer", body[:-4], headers)
    assert status == 400
    assert "binary_data_size 16 at offset 0 runs past the 12 bytes" in doc["error"]
    # binary_data_size of gigabytes: refused from the sizes, nothing allocated
    huge = body.replace(b'"binary_data_size": 16', b'"binary_data_size": 16000000000')
    huge_headers = {**headers, "Inference-Header-Content-Length": str(len(huge) - 16)}
    status, doc, _ = call(conn, "POST", "/v2/models/add/infer", huge, huge_headers)
    assert status == 400
    assert "binary_data_size 16000000000" in doc["error"]
    # a bad header length value
    status, doc, _ = call(
        conn, "POST", "/v2/models/add/infer", body, {"Inference-Header-Content-Length": "x"}
    )
    assert status == 400
    conn.close()
    # header length larger than the whole body: refused before reading, connection closed
    conn = connect(server)
    headers = {**headers, "Inference-Header-Content-Length": str(len(body) + 1)}
    status, doc, response = call(conn, "POST", "/v2/models/add/infer", body, headers)
    assert status == 400
    assert "is larger than the body" in doc["error"]
    assert response.getheader("Connection") == "close"
    conn.close()


def test_body_limits(server: InferenceServer) -> None:
    assert server.port is not None
    # A declared Content-Length of gigabytes is refused at once: no body is ever sent.
    head = (
        b"POST /v2/models/add/infer HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 8000000000\r\nInference-Header-Content-Length: 10\r\n\r\n"
    )
    status, headers, body = parse_raw_response(raw_exchange(server.port, head, shut_write=False))
    assert status == 413
    assert headers["connection"] == "close"
    assert "8000000000 bytes exceeds the limit of 65536" in json.loads(body)["error"]
    # The same for an endpoint without the binary extension
    head = b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n"
    assert parse_raw_response(raw_exchange(server.port, head, shut_write=False))[0] == 413
    # Expect: 100-continue gets the refusal instead of 100 Continue
    head = (
        b"POST /v2/models/add/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 70000\r\n\r\n"
    )
    assert parse_raw_response(raw_exchange(server.port, head, shut_write=False))[0] == 413
    # A chunked body is counted while it is read
    chunk = b"%x\r\n%s\r\n" % (40000, b" " * 40000)
    head = b"POST /v2/models/add/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, _, body = parse_raw_response(raw_exchange(server.port, head + chunk * 2 + b"0\r\n\r\n"))
    assert status == 413
    assert "more than 80000 bytes" in json.loads(body)["error"]
    # A body that ends before its Content-Length
    doc = json.dumps({"inputs": [x_input([1, 2, 3, 4])]}).encode()
    head = b"POST /v2/models/add/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    status, _, body = parse_raw_response(raw_exchange(server.port, head % (len(doc) + 10) + doc))
    assert status == 400
    assert f"the body ended after {len(doc)} of {len(doc) + 10} bytes" in json.loads(body)["error"]
    for bad in (b"-5", b"1e3", b"12, 12", "\u00b2".encode("latin-1")):
        request = b"POST /v2/models/add/infer HTTP/1.1\r\nContent-Length: " + bad + b"\r\n\r\n"
        assert parse_raw_response(raw_exchange(server.port, request))[0] == 400


def test_chunked_and_expect_continue_bodies_are_served(server: InferenceServer) -> None:
    assert server.port is not None
    doc = json.dumps({"inputs": [x_input([1, 2, 3, 4])]}).encode()
    chunks = b"".join(
        b"%x;ext=1\r\n%s\r\n" % (len(doc[i : i + 7]), doc[i : i + 7]) for i in range(0, len(doc), 7)
    )
    head = b"POST /v2/models/add/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, _, body = parse_raw_response(raw_exchange(server.port, head + chunks + b"0\r\n\r\n"))
    assert status == 200
    assert json.loads(body)["outputs"][0]["data"] == [2, 3, 4, 5]
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v2/models/add/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(doc)
        )
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(doc)
        reply = sock.recv(65536)
    assert parse_raw_response(reply)[0] == 200


def test_unsupported_encodings_are_refused(server: InferenceServer) -> None:
    conn = connect(server)
    body = json.dumps({"inputs": [x_input([1, 2, 3, 4])]}).encode()
    status, doc, _ = call(conn, "POST", "/v2/models/add/infer", body, {"Content-Encoding": "gzip"})
    assert (status, "not supported" in doc["error"]) == (415, True)
    conn.close()
    assert server.port is not None
    request = b"POST /v2/models/add/infer HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"
    assert parse_raw_response(raw_exchange(server.port, request))[0] == 501
    assert parse_raw_response(raw_exchange(server.port, b"NONSENSE\r\n\r\n"))[0] == 400


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET /v2 HTTP/2.0\r\n\r\n", 505),
        (b"GET /v2\r\n\r\n", 400),
        (b"GET /v2 HTTP/1.1\r\nNo colon here\r\n\r\n", 400),
        (b"GET /v2 HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET /v2 HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
        (b"GET /v2 HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
        (b"GET /v2 HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
        (
            b"POST /v2/repository/index HTTP/1.1\r\nContent-Length: 2\r\n"
            b"Content-Length: 2\r\n\r\n{}",
            400,
        ),
        (b"GET /" + b"v" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    ],
)
def test_malformed_http_is_refused_and_closed(
    server: InferenceServer, request_head: bytes, status: int
) -> None:
    assert server.port is not None
    got, headers, body = parse_raw_response(raw_exchange(server.port, request_head))
    assert got == status
    assert headers["connection"] == "close"
    assert set(json.loads(body)) == {"error"}


def test_connection_header_and_http_1_0(server: InferenceServer) -> None:
    assert server.port is not None
    closing = b"GET /v2/health/live HTTP/1.1\r\nConnection: close\r\n\r\n"
    status, headers, _ = parse_raw_response(raw_exchange(server.port, closing, shut_write=False))
    assert (status, headers["connection"]) == (200, "close")
    old = b"GET /v2/health/live HTTP/1.0\r\n\r\n"
    status, headers, _ = parse_raw_response(raw_exchange(server.port, old, shut_write=False))
    assert (status, headers["connection"]) == (200, "close")
    two = b"GET /v2/health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n\r\n" * 2
    replies = raw_exchange(server.port, two)
    assert replies.count(b"HTTP/1.1 200 OK") == 2
    conn = connect(server)
    conn.request("HEAD", "/v2/health/live")
    response = conn.getresponse()
    assert response.status == 405
    assert response.read() == b""
    assert call(conn, "GET", "/v2/health/live")[0] == 200  # nothing was left on the wire
    conn.close()


def test_a_stalled_body_times_out(host: ModelHost) -> None:
    with serving(host, timeout_s=0.2) as server:
        assert server.port is not None
        head = b"POST /v2/models/add/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"
        status, _, body = parse_raw_response(raw_exchange(server.port, head, shut_write=False))
        assert status == 408
        assert "timed out reading the body" in json.loads(body)["error"]


def test_unavailable_model_is_503(host: ModelHost, server: InferenceServer) -> None:
    old = host.mark_unavailable("add", "shed under memory pressure")
    host.drain(old)
    conn = connect(server)
    status, doc, _ = call(conn, "POST", "/v2/models/add/infer", {"inputs": [x_input([1] * 4)]})
    assert status == 503
    assert "shed under memory pressure" in doc["error"]
    assert call(conn, "GET", "/v2/models/add")[0] == 503
    status, doc, _ = call(conn, "GET", "/v2/models/add/ready")
    assert (status, doc["ready"], doc["error"]) == (400, False, "shed under memory pressure")
    status, doc, _ = call(conn, "GET", "/v2/health/ready")
    assert status == 400
    assert "add (shed under memory pressure)" in doc["error"]
    status, doc, _ = call(conn, "POST", "/v2/repository/index")
    assert {
        "name": "add",
        "version": "1",
        "state": "UNAVAILABLE",
        "reason": "shed under memory pressure",
    } in doc
    conn.close()


def post_in_thread(
    server: InferenceServer, body: dict[str, Any], results: list[tuple[int, Any]]
) -> threading.Thread:
    def run() -> None:
        conn = connect(server)
        try:
            status, doc, _ = call(conn, "POST", "/v2/models/add/infer", body)
            results.append((status, doc))
        except (OSError, http.client.HTTPException) as exc:
            results.append((0, exc))
        finally:
            conn.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def metric_samples(server: InferenceServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    conn = connect(server)
    status, text, response = call(conn, "GET", "/metrics")
    conn.close()
    assert status == 200
    assert response.getheader("Content-Type", "").startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_overload_rejects_with_429(models: dict[str, LoadedModel]) -> None:
    gate = threading.Event()
    limited = slot(gated(models["add"], gate), max_concurrency=1, on_overload="reject")
    host = ModelHost({"add": limited})
    body = {"inputs": [x_input([1, 2, 3, 4])]}
    results: list[tuple[int, Any]] = []
    with serving(host) as server:
        first = post_in_thread(server, body, results)
        wait_for(lambda: limited.in_flight == 1)
        conn = connect(server)
        status, doc, _ = call(conn, "POST", "/v2/models/add/infer", body)
        assert status == 429
        assert "all 1 permits are taken" in doc["error"]
        conn.close()
        gate.set()
        first.join()
        assert results[0][0] == 200


def test_queue_then_429_and_metrics(models: dict[str, LoadedModel]) -> None:
    gate = threading.Event()
    queued = slot(gated(models["add"], gate), max_concurrency=1, queue_depth=1)
    host = ModelHost({"add": queued})
    body = {"inputs": [x_input([1, 2, 3, 4])]}
    results: list[tuple[int, Any]] = []
    with serving(host) as server:
        threads = [post_in_thread(server, body, results)]
        wait_for(lambda: queued.in_flight == 1)
        threads.append(post_in_thread(server, body, results))
        wait_for(lambda: queued.queued == 1)
        samples = metric_samples(server)
        assert samples[key("edgefleet_model_in_flight", model="add", version="1")] == 1
        assert samples[key("edgefleet_model_queue_depth", model="add", version="1")] == 1
        conn = connect(server)
        status, doc, _ = call(conn, "POST", "/v2/models/add/infer", body)
        assert status == 429
        assert "queue of 1 is full" in doc["error"]
        conn.close()
        gate.set()
        for thread in threads:
            thread.join()
        assert sorted(status for status, _ in results) == [200, 200]
        samples = metric_samples(server)
        requests = "edgefleet_inference_requests_total"
        assert samples[key(requests, model="add", version="1", outcome="success")] == 2
        assert samples[key(requests, model="add", version="1", outcome="overloaded")] == 1
        for histogram in ("request", "queue", "compute"):
            name = f"edgefleet_inference_{histogram}_duration_seconds_count"
            assert samples[key(name, model="add", version="1")] == 2


def test_metrics_count_outcomes_and_state(server: InferenceServer) -> None:
    conn = connect(server)
    good = {"inputs": [x_input([1, 2, 3, 4])]}
    for _ in range(3):
        assert call(conn, "POST", "/v2/models/add/infer", good)[0] == 200
    assert call(conn, "POST", "/v2/models/add/infer", {"inputs": [x_input([1])]})[0] == 400
    assert call(conn, "POST", "/v2/models/nope/infer", good)[0] == 404
    assert call(conn, "POST", "/v2/models/other/infer", good)[0] == 404
    conn.close()
    samples = metric_samples(server)

    def requests(model: str, version: str, outcome: str) -> float:
        name = "edgefleet_inference_requests_total"
        return samples.get(key(name, model=model, version=version, outcome=outcome), 0.0)

    assert requests("add", "1", "success") == 3
    assert requests("add", "1", "bad_request") == 1
    assert requests("", "", "not_found") == 2  # unknown names do not become labels
    name = "edgefleet_inference_request_duration_seconds"
    assert samples[key(f"{name}_count", model="add", version="1")] == 3
    assert samples[key(f"{name}_bucket", model="add", version="1", le="+Inf")] == 3
    assert samples[key("edgefleet_models_loaded")] == 3
    assert samples[key("edgefleet_agent_ready")] == 1
    assert samples[key("edgefleet_model_state", model="add", version="1", state="active")] == 1
    assert ("process_resident_memory_bytes", ()) in samples
    counts = server.metrics.request_counts()
    assert counts["add"]["1"] == {"success": 3, "bad_request": 1}
    assert counts[""][""] == {"not_found": 2}


def test_daemon_gauges_share_the_registry(host: ModelHost) -> None:
    metrics = ApiMetrics(process_metrics=False)
    metrics.agent_gauge("applied_generation", "Generation applied.").set(12)
    assert metrics.agent_gauge("applied_generation", "again") is metrics.agent_gauge(
        "applied_generation", "x"
    )
    with serving(host, metrics=metrics) as server:
        samples = metric_samples(server)
    assert samples[("edgefleet_agent_applied_generation", ())] == 12
    assert ("process_resident_memory_bytes", ()) not in samples
    with pytest.raises(ValueError, match="another model host"):
        metrics.observe_host(ModelHost(), lambda: Readiness(True))


# --- binds, connections, shutdown ----------------------------------------------------------


def test_unix_socket(host: ModelHost, tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    path.touch()
    with pytest.raises(FileExistsError):
        InferenceServer(host, bind=f"unix:{path}").start()
    path.unlink()
    with serving(host, bind=f"unix:{path}") as server:
        assert server.address == f"unix:{path}"
        assert server.port is None
        conn = UnixHTTPConnection(str(path))
        assert call(conn, "GET", "/v2/health/ready")[0] == 200
        x = np.ones((1, 4), np.float32)
        body, headers = binary_request({"x": x})
        conn.request("POST", "/v2/models/add/infer", body=body, headers=headers)
        _, binary = read_binary_response(conn.getresponse())
        assert np.frombuffer(binary, np.float32).tolist() == [2, 2, 2, 2]
        conn.close()
    assert not path.exists()


def test_bind_forms() -> None:
    assert parse_bind("127.0.0.1:8501") == (socket.AF_INET, ("127.0.0.1", 8501))
    assert parse_bind("[::1]:80") == (socket.AF_INET6, ("::1", 80))
    assert parse_bind(":80") == (socket.AF_INET, ("0.0.0.0", 80))
    assert parse_bind("unix:/run/a.sock") == (socket.AF_UNIX, "/run/a.sock")
    for bad in ("127.0.0.1", "host:http", "h:70000", "unix:"):
        with pytest.raises(ValueError):
            parse_bind(bad)
    with pytest.raises(ValueError, match="max_body_bytes"):
        InferenceServer(ModelHost(), max_body_bytes=0)
    with pytest.raises(ValueError, match="max_connections"):
        InferenceServer(ModelHost(), max_connections=0)


def test_connection_limit_bounds_threads(host: ModelHost) -> None:
    with serving(host, max_connections=2) as server:
        held = [connect(server), connect(server)]
        for conn in held:
            assert call(conn, "GET", "/v2/health/live")[0] == 200
        threads = threading.active_count()
        for _ in range(5):
            extra = connect(server)
            status, doc, response = call(extra, "GET", "/v2/health/live")
            assert status == 503
            assert "too many connections (the limit is 2)" in doc["error"]
            assert response.getheader("Retry-After") == "1"
            extra.close()
        assert threading.active_count() == threads
        held.pop().close()
        wait_for(lambda: len(server._connections) < 2)
        again = connect(server)
        assert call(again, "GET", "/v2/health/live")[0] == 200
        samples = metric_samples_via(again)
        assert samples[("edgefleet_api_connections_refused_total", ())] == 5
        for conn in (*held, again):
            conn.close()


def metric_samples_via(conn: http.client.HTTPConnection) -> dict[Any, float]:
    _, text, _ = call(conn, "GET", "/metrics")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_idle_connections_are_closed(host: ModelHost) -> None:
    with serving(host, timeout_s=0.2) as server:
        conn = connect(server)
        assert call(conn, "GET", "/v2/health/live")[0] == 200
        wait_for(lambda: not server._connections)
        conn.close()


def test_stop_lets_in_flight_requests_finish(models: dict[str, LoadedModel]) -> None:
    gate = threading.Event()
    model = gated(models["add"], gate)
    host = ModelHost({"add": slot(model, max_concurrency=2)})
    server = InferenceServer(host, bind="127.0.0.1:0")
    server.start()
    idle = connect(server)
    assert call(idle, "GET", "/v2/health/live")[0] == 200
    results: list[tuple[int, Any]] = []
    busy = post_in_thread(server, {"inputs": [x_input([1, 2, 3, 4])]}, results)
    session = model.session
    assert isinstance(session, GatedSession)
    assert session.entered.acquire(timeout=5)
    stopped: list[bool] = []
    stopper = threading.Thread(target=lambda: stopped.append(server.stop(timeout=5.0)))
    stopper.start()
    wait_for(lambda: server._listener is not None and server._listener.fileno() == -1)
    with pytest.raises(OSError):
        connect(server).request("GET", "/v2/health/live")
    gate.set()
    busy.join()
    stopper.join()
    assert results == [(200, results[0][1])]
    assert stopped == [True]
    with pytest.raises((http.client.HTTPException, OSError)):
        call(idle, "GET", "/v2/health/live")
    idle.close()


def test_stop_gives_up_after_its_timeout(models: dict[str, LoadedModel]) -> None:
    gate = threading.Event()
    host = ModelHost({"add": slot(gated(models["add"], gate))})
    server = InferenceServer(host, bind="127.0.0.1:0")
    server.start()
    results: list[tuple[int, Any]] = []
    client = post_in_thread(server, {"inputs": [x_input([1, 2, 3, 4])]}, results)
    wait_for(lambda: host.table["add"].in_flight == 1)
    started = time.monotonic()
    assert server.stop(timeout=0.1) is False
    assert time.monotonic() - started < 2.0
    client.join()
    assert results[0][0] == 0  # the connection was cut
    gate.set()
    wait_for(lambda: not server._connections)

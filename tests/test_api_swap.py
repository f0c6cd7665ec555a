"""Serving through an update and a rollback: no request fails, each is answered wholly by
one version, and in-flight requests finish on the session they started on."""

from __future__ import annotations

import http.client
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.api import InferenceServer
from agent.host import LoadedModel, ModelHost, Slot
from support.inference import (
    GatedSession,
    binary_request,
    gated,
    load,
    read_binary_response,
    save_add_model,
    slot,
)

WIDTH = 2048


def version(root: Path, number: int) -> LoadedModel:
    """Version N of model "add": y = x + N, so every answer says which version computed it."""
    path = save_add_model(root / f"add-{number}.onnx", float(number))
    return load("add", path, version=str(number), hints={"x": [1, WIDTH]})


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


class Client(threading.Thread):
    """Sends binary requests on one keep-alive connection until told to stop; records the
    version of every answer and every failure."""

    def __init__(self, port: int, seed: int) -> None:
        super().__init__(name=f"client-{seed}")
        self.port = port
        self.rng = np.random.default_rng(seed)
        self.versions: list[str] = []
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            while not self.halt.is_set():
                x = self.rng.random((1, WIDTH), dtype=np.float32)
                body, headers = binary_request({"x": x})
                try:
                    conn.request("POST", "/v2/models/add/infer", body=body, headers=headers)
                    response = conn.getresponse()
                    header, binary = read_binary_response(response)
                except (OSError, http.client.HTTPException) as exc:
                    self.failures.append(repr(exc))
                    conn.close()
                    continue
                if response.status != 200:
                    self.failures.append(f"{response.status} {header}")
                    continue
                served = header["model_version"]
                y = np.frombuffer(binary, np.float32).reshape(1, WIDTH)
                if y.tobytes() != (x + np.float32(served)).tobytes():
                    self.failures.append(f"answer of version {served} is not x + {served}")
                self.versions.append(served)
        finally:
            conn.close()


def test_stream_through_update_and_rollback(tmp_path: Path) -> None:
    v1, v2 = version(tmp_path, 1), version(tmp_path, 2)
    host = ModelHost({"add": slot(v1, max_concurrency=2, queue_depth=8)})
    server = InferenceServer(host, bind="127.0.0.1:0")
    server.start()
    assert server.port is not None
    clients = [Client(server.port, seed) for seed in range(4)]
    for client in clients:
        client.start()

    def answered(by: str) -> int:
        return sum(c.versions.count(by) for c in clients)

    try:
        wait_for(lambda: answered("1") >= 150)
        old = host.swap({"add": slot(v2, max_concurrency=2, queue_depth=8)})  # update
        assert host.drain(old, timeout=10.0)
        wait_for(lambda: answered("2") >= 150)
        before_rollback = answered("1")
        rollback = version(tmp_path, 1)  # the previous generation, loaded again
        old = host.swap({"add": slot(rollback, max_concurrency=2, queue_depth=8)})
        assert host.drain(old, timeout=10.0)
        wait_for(lambda: answered("1") >= before_rollback + 150)
    finally:
        for client in clients:
            client.halt.set()
        for client in clients:
            client.join()
        assert server.stop(timeout=5.0)

    assert [f for c in clients for f in c.failures] == []
    for client in clients:
        # Each client's requests are sequential: once it saw the new version it never saw
        # the old one again until the rollback.
        assert re.fullmatch("1*2*1*", "".join(client.versions)), client.versions
    counts = server.metrics.request_counts()["add"]
    total = sum(len(c.versions) for c in clients)
    assert counts["1"]["success"] + counts["2"]["success"] == total
    assert set(counts["1"]) == set(counts["2"]) == {"success"}


def test_in_flight_request_finishes_on_the_old_version(tmp_path: Path) -> None:
    gate = threading.Event()
    old_model = gated(version(tmp_path, 1), gate)
    host = ModelHost({"add": Slot(old_model)})
    server = InferenceServer(host, bind="127.0.0.1:0")
    server.start()
    assert server.port is not None
    x = np.ones((1, WIDTH), np.float32)
    results: dict[str, tuple[str, bytes]] = {}

    def post(key: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port or 0, timeout=10)
        body, headers = binary_request({"x": x})
        conn.request("POST", "/v2/models/add/infer", body=body, headers=headers)
        header, binary = read_binary_response(conn.getresponse())
        results[key] = (header["model_version"], binary)
        conn.close()

    first = threading.Thread(target=post, args=("old",))
    first.start()
    session = old_model.session
    assert isinstance(session, GatedSession)
    assert session.entered.acquire(timeout=5)  # the first request is inside session.run
    old = host.swap({"add": Slot(version(tmp_path, 2))})
    post("new")  # answered by the new version while the old one is still busy
    assert results["new"] == ("2", (x + 2).tobytes())
    assert not host.drain(old, timeout=0.05)  # the old slot still has its request
    gate.set()
    first.join()
    assert results["old"] == ("1", (x + 1).tobytes())
    assert host.drain(old, timeout=5.0)
    assert server.stop(timeout=5.0)


@pytest.mark.parametrize("pinned", ["1", "2"])
def test_requests_pinned_to_a_version(tmp_path: Path, pinned: str) -> None:
    host = ModelHost({"add": Slot(version(tmp_path, 1))})
    server = InferenceServer(host, bind="127.0.0.1:0")
    server.start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port or 0, timeout=10)
    body, headers = binary_request({"x": np.zeros((1, WIDTH), np.float32)})
    conn.request("POST", f"/v2/models/add/versions/{pinned}/infer", body=body, headers=headers)
    status = conn.getresponse()
    status.read()
    assert status.status == (200 if pinned == "1" else 404)
    conn.close()
    assert server.stop(timeout=5.0)

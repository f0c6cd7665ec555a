"""Inference API benchmark: what serving over HTTP adds to raw ONNX Runtime.

Every figure is paired with a baseline measured in the same run on the same machine:

- latency: the OCR direction classifier (1x3x48x192), binary tensors, one client on one
  keep-alive connection (a plain http.client loop, and tritonclient.http) against the
  agent's server in another process — versus ``session.run`` on the same model in this
  process. Raw and served blocks alternate so drift hits both. Target: p50 at most
  0.5 ms over raw.
- throughput: the OCR detector at 1x3x640x640 with two concurrent clients (the model
  slot admits two, one intra-op thread each) — versus two threads calling ``session.run``
  on one session in this process. Target: at least 0.9x. Raw and served rounds
  alternate; CPU time per inference (server and clients together) is reported as well,
  since on a shared machine other work shifts wall-clock rates, not CPU cost.

Run: ``python bench/bench_api.py [--latency-requests 2000] [--throughput-requests 6]
[--rounds 6]``.
The server runs in a child process (``--serve``), as the agent does, with glibc's malloc
arenas capped as the agent caps them; ``MALLOC_ARENA_MAX=16`` in the environment measures
it with glibc's default instead (eight per core here).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from agent.api import InferenceServer  # noqa: E402
from agent.host import LoadedModel, ModelHost  # noqa: E402
from agent.memory import cap_malloc_arenas  # noqa: E402
from support.inference import binary_request, load, slot  # noqa: E402

CLS_SHAPE = (1, 3, 48, 192)
DET_SHAPE = (1, 3, 640, 640)
CLS_OUTPUT = "save_infer_model/scale_0.tmp_1"


def model_paths() -> dict[str, Path]:
    import rapidocr_onnxruntime

    models = Path(rapidocr_onnxruntime.__file__).parent / "models"
    return {
        "det": models / "ch_PP-OCRv4_det_infer.onnx",
        "cls": models / "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    }


def load_models() -> dict[str, LoadedModel]:
    paths = model_paths()
    return {
        "cls": load("cls", paths["cls"], hints={"x": list(CLS_SHAPE)}),
        "det": load("det", paths["det"], hints={"x": [1, 3, 320, 320]}),
    }


# --- the server process ----------------------------------------------------------------


def serve() -> None:
    """Host cls (one at a time) and det (two at a time) until stdin closes; glibc's
    arenas capped as ``edgefleet-agent run`` caps them (unless MALLOC_ARENA_MAX is set)."""
    cap_malloc_arenas(os.environ)
    models = load_models()
    host = ModelHost(
        {
            "cls": slot(models["cls"], max_concurrency=1, queue_depth=8),
            "det": slot(models["det"], max_concurrency=2, queue_depth=8),
        }
    )
    server = InferenceServer(host, bind="127.0.0.1:0", max_body_bytes=64 << 20)
    server.start()
    print(server.port, flush=True)
    sys.stdin.read()
    server.stop()


def start_server() -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    return child, int(child.stdout.readline())


# --- measurements ----------------------------------------------------------------------


def timed(call: Callable[[], Any], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(int(p / 100 * len(ordered)), len(ordered) - 1)]


class KeepAliveClient:
    """One keep-alive http.client connection posting a prepared binary request."""

    def __init__(self, port: int, model: str, x: np.ndarray[Any, Any]) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.path = f"/v2/models/{model}/infer"
        self.body, self.headers = binary_request({"x": x})

    def __call__(self) -> bytes:
        self.conn.request("POST", self.path, body=self.body, headers=self.headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {data[:200]!r}")
        return data

    def close(self) -> None:
        self.conn.close()


def latency(port: int, raw: LoadedModel, requests: int) -> dict[str, Any]:
    import tritonclient.http as triton

    x = np.random.default_rng(0).random(CLS_SHAPE, dtype=np.float32)
    feeds = {"x": x}

    def run_raw() -> None:
        raw.session.run(None, feeds)

    client = KeepAliveClient(port, "cls", x)
    expected = raw.session.run(None, feeds)[0].tobytes()
    assert client().endswith(expected), "served output differs from raw"
    triton_client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    tensor = triton.InferInput("x", list(CLS_SHAPE), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    outputs = [triton.InferRequestedOutput(CLS_OUTPUT, binary_data=True)]

    def run_triton() -> None:
        triton_client.infer("cls", [tensor], outputs=outputs)

    samples: dict[str, list[float]] = {"raw": [], "http.client": [], "tritonclient": []}
    calls: dict[str, Callable[[], Any]] = {
        "raw": run_raw,
        "http.client": client,
        "tritonclient": run_triton,
    }
    for call in calls.values():
        timed(call, 100)  # warm up
    block = 100
    for _ in range(max(requests // block, 1)):
        for name, call in calls.items():
            samples[name].extend(timed(call, block))
    client.close()
    triton_client.close()
    raw_p50, raw_p95 = percentile(samples["raw"], 50), percentile(samples["raw"], 95)
    result: dict[str, Any] = {"requests_each": len(samples["raw"])}
    for name, values in samples.items():
        p50, p95 = percentile(values, 50), percentile(values, 95)
        result[name] = {
            "p50_ms": round(p50 * 1e3, 3),
            "p95_ms": round(p95 * 1e3, 3),
            "p50_added_ms": round((p50 - raw_p50) * 1e3, 3),
            "p95_added_ms": round((p95 - raw_p95) * 1e3, 3),
            "p50_ratio": round(p50 / raw_p50, 2),
        }
    return result


def two_at_once(call_factory: Callable[[], Callable[[], Any]], per_thread: int) -> float:
    """Inferences per second of two threads each making ``per_thread`` calls."""
    calls = [call_factory() for _ in range(2)]
    for call in calls:
        call()  # warm up (and open connections)
    barrier = threading.Barrier(3)

    def work(call: Callable[[], Any]) -> None:
        barrier.wait()
        for _ in range(per_thread):
            call()

    threads = [threading.Thread(target=work, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    for call in calls:
        close = getattr(call, "close", None)
        if close is not None:
            close()
    return 2 * per_thread / elapsed


def cpu_seconds(*processes: psutil.Process) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def throughput(
    port: int, server_pid: int, raw: LoadedModel, per_thread: int, rounds: int
) -> dict[str, Any]:
    x = np.random.default_rng(1).random(DET_SHAPE, dtype=np.float32)
    feeds = {"x": x}
    me, server = psutil.Process(), psutil.Process(server_pid)

    def raw_factory() -> Callable[[], Any]:
        return lambda: raw.session.run(None, feeds)

    def served_factory() -> Callable[[], Any]:
        return KeepAliveClient(port, "det", x)

    rates: dict[str, list[float]] = {"raw": [], "served": []}
    cpu: dict[str, float] = {"raw": 0.0, "served": 0.0}
    order = [("raw", raw_factory), ("served", served_factory)]
    for round_number in range(rounds):
        # Alternate which goes first, so load from elsewhere on the machine hits both.
        for name, factory in order if round_number % 2 == 0 else order[::-1]:
            before = cpu_seconds(me, server)
            rates[name].append(two_at_once(factory, per_thread))
            cpu[name] += cpu_seconds(me, server) - before
    # Rates over all rounds together (harmonic mean: total inferences / total time).
    raw_rate = statistics.harmonic_mean(rates["raw"])
    served_rate = statistics.harmonic_mean(rates["served"])
    ratios = [s / r for s, r in zip(rates["served"], rates["raw"], strict=True)]
    inferences = rounds * (2 * per_thread + 2)  # with the warm-up calls
    return {
        "inferences_per_round": 2 * per_thread,
        "rounds": rounds,
        "raw_per_s": round(raw_rate, 2),
        "served_per_s": round(served_rate, 2),
        "ratio": round(served_rate / raw_rate, 3),
        "median_round_ratio": round(statistics.median(ratios), 3),
        "round_ratios": [round(r, 3) for r in ratios],
        "raw_cpu_ms_per_inference": round(cpu["raw"] / inferences * 1e3, 1),
        "served_cpu_ms_per_inference": round(cpu["served"] / inferences * 1e3, 1),
        "cpu_ratio": round(cpu["raw"] / cpu["served"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-requests", type=int, default=2000)
    parser.add_argument("--throughput-requests", type=int, default=6, help="per client, a round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    raw = load_models()
    child, port = start_server()
    try:
        lat = latency(port, raw["cls"], args.latency_requests)
        thr = throughput(port, child.pid, raw["det"], args.throughput_requests, args.rounds)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    print(f"machine: {os.cpu_count()} cores; onnxruntime intra-op threads 1 per session")
    print(
        f"(a) latency, cls {'x'.join(map(str, CLS_SHAPE))}, binary tensors, keep-alive, "
        f"{lat['requests_each']} requests each"
    )
    for name in ("raw", "http.client", "tritonclient"):
        row = lat[name]
        print(
            f"    {name:13s} p50 {row['p50_ms']:7.3f} ms  p95 {row['p95_ms']:7.3f} ms  "
            f"p50 +{row['p50_added_ms']:.3f} ms ({row['p50_ratio']:.2f}x)  "
            f"p95 +{row['p95_added_ms']:.3f} ms"
        )
    target = "met" if lat["http.client"]["p50_added_ms"] <= 0.5 else "MISSED"
    print(f"    target p50 added <= 0.5 ms: {target}")
    print(
        f"(b) throughput, det {'x'.join(map(str, DET_SHAPE))}, two concurrent clients, "
        f"{thr['rounds']} alternating rounds of {thr['inferences_per_round']} each"
    )
    print(
        f"    raw {thr['raw_per_s']:.2f}/s  served {thr['served_per_s']:.2f}/s  "
        f"ratio {thr['ratio']:.3f}x (target >= 0.9x: "
        f"{'met' if thr['ratio'] >= 0.9 else 'MISSED'}); median of rounds "
        f"{thr['median_round_ratio']:.3f}x; rounds {thr['round_ratios']}"
    )
    print(
        f"    CPU per inference: raw {thr['raw_cpu_ms_per_inference']} ms, served "
        f"{thr['served_cpu_ms_per_inference']} ms (server + clients): the ratio on an "
        f"otherwise idle machine would be about {thr['cpu_ratio']:.3f}x"
    )
    print(json.dumps({"latency": lat, "throughput": thr}))


if __name__ == "__main__":
    main()

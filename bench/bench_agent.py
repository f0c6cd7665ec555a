"""Agent benchmark: apply time, resident memory and idle CPU against raw ONNX Runtime.

Every figure is paired with a baseline measured in the same run on the same machine:

- apply: publish a signed desired state naming the three OCR models (served over loopback
  HTTP) to a fresh agent process, until its state says applied — versus a fresh Python
  process that downloads the same files, hashes them, creates the three sessions and runs
  one inference each. Target: at most 1.3x.
- memory: RSS of the agent serving the three models versus a bare Python process that
  loaded the same three sessions and ran each once. Target: at most 40 MB more.
- idle CPU: the agent with the three models loaded and telemetry every 10 s, over a quiet
  window. Target: under 1 % of one core.

Run: ``python bench/bench_agent.py [--rounds 3] [--idle-s 30]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from contract.manifests import RuntimePolicy  # noqa: E402
from contract.messages import State  # noqa: E402
from contract.signing import SigningKey  # noqa: E402
from hub.broker import MosquittoBroker  # noqa: E402
from support.fleet import (  # noqa: E402
    agent_toml,
    desired_state,
    mqtt_tap,
    ocr_specs,
    sha256_of,
    signed,
)
from support.http_server import ArtifactServer  # noqa: E402

RAW_SCRIPT = r"""
import hashlib, sys, time, urllib.request
import numpy as np, onnxruntime as ort
shapes = {"det": (1, 3, 320, 320), "cls": (1, 3, 48, 192), "rec": (1, 3, 48, 320)}
start = time.perf_counter()
sessions = []
for name, url, path in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
    data = urllib.request.urlopen(url).read()
    hashlib.sha256(data).hexdigest()
    with open(path, "wb") as f:
        f.write(data)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random(shapes[name], dtype=np.float32)
    s.run(None, {"x": x})
    sessions.append(s)
print(time.perf_counter() - start, flush=True)
sys.stdin.readline()
"""


def ocr_models() -> dict[str, Path]:
    import rapidocr_onnxruntime

    base = Path(rapidocr_onnxruntime.__file__).parent / "models"
    return {
        "det": base / "ch_PP-OCRv4_det_infer.onnx",
        "cls": base / "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "rec": base / "ch_PP-OCRv4_rec_infer.onnx",
    }


def raw_apply(files: ArtifactServer, models: dict[str, Path], work: Path) -> tuple[float, int]:
    """Seconds for download + hash + sessions + one run each, and the process's RSS after."""
    args = []
    for name, path in models.items():
        args += [name, files.url(f"/artifacts/{sha256_of(path)}"), str(work / f"raw-{name}.onnx")]
    proc = subprocess.Popen(
        [sys.executable, "-c", RAW_SCRIPT, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    seconds = float(proc.stdout.readline())
    rss = psutil.Process(proc.pid).memory_info().rss
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(30)
    return seconds, rss


def agent_apply(
    broker: MosquittoBroker,
    files: ArtifactServer,
    models: dict[str, Path],
    work: Path,
    idle_s: float,
) -> tuple[float, int, float | None]:
    """Seconds from publishing the desired state to the applied state, RSS, idle CPU %."""
    key = SigningKey.generate()
    device = f"bench-{time.monotonic_ns()}"
    config = work / f"{device}.toml"
    config.write_text(
        agent_toml(device_id=device, broker=broker, state_dir=work / device, key=key)
        .replace('log_level = "debug"', 'log_level = "warning"')
        .replace('profile = "generic"', 'profile = "intel-n100-gateway"')
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with mqtt_tap(broker, f"edgefleet/v1/dev/{device}/up/#") as tap:
            tap.wait_for(lambda t: t.messages("birth"), 60, "birth")
            runtime = RuntimePolicy(probation_s=0, telemetry_interval_s=10.0)
            doc = desired_state(
                device, 1, ocr_specs(models), base_urls=[files.url("/artifacts")], runtime=runtime
            )
            payload = signed(doc, key)
            start = time.perf_counter()
            tap.publish_desired(device, payload)
            tap.wait_for(
                lambda t: any(
                    isinstance(m, State) and m.applied_generation == 1 for m in t.messages("state")
                ),
                120,
                "applied",
            )
            seconds = time.perf_counter() - start
            process = psutil.Process(proc.pid)
            time.sleep(2.0)
            rss = process.memory_info().rss
            idle = None
            if idle_s > 0:
                before = process.cpu_times()
                t0 = time.perf_counter()
                time.sleep(idle_s)
                after = process.cpu_times()
                used = (after.user - before.user) + (after.system - before.system)
                idle = 100.0 * used / (time.perf_counter() - t0)
        return seconds, rss, idle
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=30.0)
    args = parser.parse_args()
    models = ocr_models()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with MosquittoBroker(workdir=work / "broker") as broker, ArtifactServer() as files:
            for path in models.values():
                files.add(f"/artifacts/{sha256_of(path)}", path)
            raw_times, raw_rss, agent_times, agent_rss, idles = [], [], [], [], []
            for round_ in range(args.rounds):
                seconds, rss = raw_apply(files, models, work)
                raw_times.append(seconds)
                raw_rss.append(rss)
                idle_s = args.idle_s if round_ == args.rounds - 1 else 0.0
                seconds, rss, idle = agent_apply(broker, files, models, work, idle_s)
                agent_times.append(seconds)
                agent_rss.append(rss)
                if idle is not None:
                    idles.append(idle)
    raw_t, agent_t = statistics.median(raw_times), statistics.median(agent_times)
    raw_m, agent_m = statistics.median(raw_rss) / 2**20, statistics.median(agent_rss) / 2**20
    print(
        f"apply (median of {args.rounds}): raw {raw_t:.3f} s, agent {agent_t:.3f} s, "
        f"ratio {agent_t / raw_t:.2f}x (target <= 1.3x)"
    )
    print(
        f"RSS (median): raw {raw_m:.0f} MB, agent {agent_m:.0f} MB, "
        f"difference {agent_m - raw_m:+.0f} MB (target <= +40 MB)"
    )
    if idles:
        print(
            f"idle CPU over {args.idle_s:.0f} s with telemetry every 10 s: "
            f"{idles[-1]:.2f} % of one core (target < 1 %)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

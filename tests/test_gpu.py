"""The agent on an NVIDIA host: the CUDA build of ONNX Runtime (onnxruntime-gpu) and a GPU.

What only such a host can show: the profile it is detected as, the plan that puts the real
OCR models on a GPU provider, sessions that start there (falling back along the profile's
order when TensorRT's libraries are missing), answers that agree with the CPU's, and a
swap under a stream of requests. Skipped where ONNX Runtime has no CUDA provider (CI).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.apply import providers_of
from agent.facts import collect_facts
from agent.host import LoadedModel, ModelHost, Slot, load_model
from agent.profiles import load_profiles
from contract.manifests import Artifact, InputHint, ModelSpec, Requirements, Variant
from contract.profile_match import choose
from contract.select import select

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TRT, CUDA)
SHAPES = {"det": (1, 3, 320, 320), "cls": (1, 3, 48, 192), "rec": (1, 3, 48, 320)}
AGREEMENT = 2e-2
"""Largest difference from the CPU's answer: the outputs are probabilities in [0, 1], and
CUDA may run convolutions in TF32 (10-bit mantissa)."""

pytestmark = pytest.mark.skipif(
    CUDA not in ort.get_available_providers(),
    reason="needs the CUDA build of ONNX Runtime (onnxruntime-gpu) and an NVIDIA GPU",
)


def ocr_spec(name: str, path: Path) -> ModelSpec:
    data = path.read_bytes()
    return ModelSpec(
        name=name,
        version="1",
        priority=0,
        inputs={"x": InputHint(shape=list(SHAPES[name]))},
        variants=[
            Variant(
                name="fp32",
                precision="fp32",
                artifact=Artifact(sha256=hashlib.sha256(data).hexdigest(), size=len(data)),
                requires=Requirements(memory_mb=64, providers=[TRT, CUDA, CPU]),
            )
        ],
    )


@pytest.fixture(scope="module")
def on_gpu(ocr_models: dict[str, Path]) -> dict[str, LoadedModel]:
    """The OCR models as the agent's applier loads them on this host's detected profile."""
    facts = collect_facts()
    profile = choose(load_profiles(), facts).profile
    specs = [ocr_spec(name, path) for name, path in ocr_models.items()]
    plan = select(specs, profile, facts)
    loaded = {}
    for choice in plan.chosen:
        spec = next(s for s in specs if s.name == choice.model)
        loaded[choice.model] = load_model(
            ocr_models[choice.model],
            spec,
            providers=providers_of(choice, spec, profile),
            intra_op_threads=2,
        )
    return loaded


def test_an_nvidia_host_is_detected_as_one() -> None:
    facts = collect_facts()
    chosen = choose(load_profiles(), facts)
    assert chosen.profile.name == "x86-64-nvidia-server", [s.name for s in chosen.scores]
    assert chosen.how == "detected"


def test_the_ocr_models_run_on_a_gpu_provider(on_gpu: dict[str, LoadedModel]) -> None:
    assert sorted(on_gpu) == ["cls", "det", "rec"]
    for model in on_gpu.values():
        assert model.provider in GPU_PROVIDERS, (model.name, model.provider_fallback)
        if model.provider != GPU_PROVIDERS[0]:  # TensorRT's libraries are not installed
            assert model.provider_fallback, model.name
        print(f"{model.name}: {model.provider} ({model.provider_fallback or 'as planned'})")


@pytest.mark.parametrize("name", ["det", "cls", "rec"])
def test_gpu_answers_agree_with_the_cpu(
    name: str, on_gpu: dict[str, LoadedModel], ocr_models: dict[str, Path]
) -> None:
    cpu = ort.InferenceSession(str(ocr_models[name]), providers=[CPU])
    x = np.random.default_rng(3).random(SHAPES[name], dtype=np.float32)
    (expected,) = cpu.run(None, {"x": x})
    model = on_gpu[name]
    got = ModelHost({name: Slot(model)}).infer(name, {"x": x})[model.output_names[0]]
    assert got.shape == expected.shape and got.dtype == expected.dtype
    difference = float(np.max(np.abs(got - expected)))
    print(f"{name} on {model.provider}: largest difference from the CPU {difference:.2e}")
    assert difference < AGREEMENT


def test_a_swap_on_the_gpu_under_a_stream_of_requests(
    on_gpu: dict[str, LoadedModel], ocr_models: dict[str, Path]
) -> None:
    old = on_gpu["cls"]
    host = ModelHost({"cls": Slot(old)})
    x = np.random.default_rng(4).random(SHAPES["cls"], dtype=np.float32)
    expected = host.infer("cls", {"x": x})[old.output_names[0]]
    stop = threading.Event()
    answers: list[np.ndarray] = []
    errors: list[BaseException] = []

    def client() -> None:
        while not stop.is_set():
            try:
                answers.append(host.infer("cls", {"x": x})[old.output_names[0]])
            except BaseException as exc:
                errors.append(exc)

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        for _ in range(5):
            fresh = load_model(
                ocr_models["cls"],
                ocr_spec("cls", ocr_models["cls"]),
                providers=[old.provider, CPU],
                intra_op_threads=2,
            )
            previous = host.swap({"cls": Slot(fresh)})
            assert host.drain(previous, timeout=30)
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)
    assert errors == []
    assert len(answers) > 0
    assert all(float(np.max(np.abs(a - expected))) < AGREEMENT for a in answers)
    assert host.table["cls"].model is not None
    assert host.table["cls"].model.provider == old.provider

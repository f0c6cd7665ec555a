"""The real tritonclient against a real agent process that applied the OCR models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.http as httpclient

from contract.signing import SigningKey
from hub.broker import MosquittoBroker, free_port
from support.agent_process import agent_process
from support.fleet import agent_toml, desired_state, mqtt_tap, ocr_specs, sha256_of, signed
from support.http_server import ArtifactServer

DEVICE = "api-e2e-1"
SHAPES = {"det": (1, 3, 320, 320), "cls": (1, 3, 48, 192), "rec": (1, 3, 48, 320)}


def test_tritonclient_against_the_daemon(
    broker: MosquittoBroker, tmp_path: Path, ocr_models: dict[str, Path]
) -> None:
    key = SigningKey.generate()
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        agent_toml(
            device_id=DEVICE,
            broker=broker,
            state_dir=tmp_path / "state",
            key=key,
            api_bind=f"127.0.0.1:{port}",
        )
    )
    with (
        ArtifactServer() as files,
        mqtt_tap(broker, f"edgefleet/v1/dev/{DEVICE}/up/#") as tap,
        agent_process(config, tmp_path) as agent,
    ):
        for path in ocr_models.values():
            files.add(f"/artifacts/{sha256_of(path)}", path)
        agent.wait_ready()
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert client.is_server_live()
            assert not client.is_server_ready()
            doc = desired_state(
                DEVICE, 1, ocr_specs(ocr_models), base_urls=[files.url("/artifacts")]
            )
            tap.publish_desired(DEVICE, signed(doc, key))
            tap.wait_for(lambda _: client.is_server_ready(), 60, "the server to be ready")
            index = {m["name"]: m for m in client.get_model_repository_index()}
            assert {name: m["state"] for name, m in index.items()} == {
                "cls": "READY",
                "det": "READY",
                "rec": "READY",
            }
            for name, path in ocr_models.items():
                meta = client.get_model_metadata(name)
                assert meta["inputs"][0]["shape"][1] == 3
                x = np.random.default_rng(3).random(SHAPES[name], dtype=np.float32)
                tensor = httpclient.InferInput("x", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x, binary_data=True)
                result = client.infer(name, [tensor])
                output = meta["outputs"][0]["name"]
                raw = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                np.testing.assert_array_equal(result.as_numpy(output), raw.run(None, {"x": x})[0])
        finally:
            client.close()
        assert agent.terminate() == 0, agent.describe()

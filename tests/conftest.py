"""Shared fixtures: a private mosquitto per test, real OCR models, and a thread-leak check."""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.broker import MosquittoBroker

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A mosquitto from the real binary on a free loopback port, stopped after the test."""
    with MosquittoBroker(workdir=tmp_path / "broker") as running:
        yield running


@pytest.fixture(scope="session")
def ocr_models() -> dict[str, Path]:
    """The three real OCR models shipped in the rapidocr-onnxruntime package (found without
    importing it: its own dependencies are not needed here)."""
    found = importlib.util.find_spec("rapidocr_onnxruntime")
    assert found is not None and found.submodule_search_locations, "rapidocr-onnxruntime"
    models = Path(found.submodule_search_locations[0]) / "models"
    return {
        "det": models / "ch_PP-OCRv4_det_infer.onnx",
        "cls": models / "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "rec": models / "ch_PP-OCRv4_rec_infer.onnx",
    }


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads running after it returned."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith("asyncio_")
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads leaked: {[t.name for t in leaked]}"

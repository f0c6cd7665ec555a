"""HubService on a real SQLite file, real ONNX files and a recording publisher: the registry
(models, model sets, policies), the controller (signed retained documents, generations,
re-signing, holds, pins) and plan."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from contract.errors import ManifestError
from contract.manifests import ModelSetRef, Selector
from contract.messages import Desired, Event, State, decode
from contract.select import Choice, select
from contract.signing import TrustedKeys
from contract.topics import Kind, down_topic
from hub.artifacts import ArtifactStore
from hub.config import HubConfig
from hub.controller import ControllerLoop
from hub.desired import content_hash
from hub.errors import (
    Conflict,
    InvalidModelName,
    ModelFileError,
    ModelSetConflict,
    UnknownArtifact,
    UnknownModelSet,
)
from hub.ingest import IngestHooks
from hub.init import init_hub
from hub.keys import Keyring
from hub.service import HubService
from hub.store import Store
from support.hub_fleet import (
    OCR_HINTS,
    Published,
    RecordingPublisher,
    birth,
    facts,
    modelset_yaml,
    policy_yaml,
    profile,
)

START = 1_750_000_000.0
DEVICES = {
    # device id: (profile, labels)
    "pi-1": ("raspberry-pi-4-4gb", {"site": "lab"}),
    "gw-1": ("intel-n100-gateway", {"site": "lab"}),
    "srv-1": ("x86-64-nvidia-server", {"site": "lab"}),
    "other-1": ("raspberry-pi-4-4gb", {"site": "elsewhere"}),
}


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Hub:
    config: HubConfig
    store: Store
    service: HubService
    publisher: RecordingPublisher
    keys: Keyring
    clock: Clock

    def trusted(self) -> TrustedKeys:
        return TrustedKeys(self.keys.public_keys())

    def documents(self, sent: list[Published]) -> dict[str, Desired]:
        """The documents sent, by device, each checked: retained, QoS 1, on its topic, signed."""
        found: dict[str, Desired] = {}
        for item in sent:
            document = decode(Desired, item.payload)
            device_id = document.payload.device_id
            assert item.topic == down_topic(device_id, Kind.DESIRED)
            assert item.retain and item.qos == 1
            document.verify(self.trusted())
            found[device_id] = document
        assert len(found) == len(sent)
        return found


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    result = init_hub(tmp_path / "hub", hub_id="hub-test")
    config = result.config
    clock = Clock()
    store = Store(config.store_path, clock=clock)
    keys = Keyring(config.keys_dir, config.public_keys_path, clock=clock)
    publisher = RecordingPublisher()
    service = HubService(
        config,
        store,
        artifacts=ArtifactStore(config.artifacts_dir),
        keys=keys,
        publisher=publisher,
        clock=clock,
    )
    try:
        yield Hub(config, store, service, publisher, keys, clock)
    finally:
        store.close()


def register_ocr(hub: Hub, ocr_models: dict[str, Path], *, measure: bool = False) -> None:
    """det, cls (with an int8 variant) and rec, version 1.0.0."""
    for name, path in ocr_models.items():
        hub.service.add_model(
            path,
            name=name,
            version="1.0.0",
            quantize_int8=name == "cls",
            input_shapes=OCR_HINTS[name],
            measure=measure,
        )


def born(hub: Hub, *device_ids: str) -> None:
    for device_id in device_ids or tuple(DEVICES):
        name, labels = DEVICES[device_id]
        assert hub.store.record_birth(birth(device_id, name, labels=labels), START)


def applied(hub: Hub, ocr_models: dict[str, Path]) -> None:
    """Models registered, model set ocr 1.0.0 published, devices born, policy applied."""
    register_ocr(hub, ocr_models)
    hub.service.apply_model_set(modelset_yaml(hub.store.list_models()), "ocr.yaml")
    born(hub)
    hub.service.apply_policy(policy_yaml(labels={"site": "lab"}), "policy.yaml")


# --- registry ------------------------------------------------------------------------------


def test_add_model_stores_inspection_measurement_and_artifact(
    hub: Hub, ocr_models: dict[str, Path]
) -> None:
    [det] = hub.service.add_model(
        ocr_models["det"], name="det", version="1.0.0", input_shapes=OCR_HINTS["det"]
    )
    assert (det.variant, det.precision) == ("fp32", "fp32")
    assert det.size == ocr_models["det"].stat().st_size
    assert [i["name"] for i in det.inputs] == ["x"]
    assert det.inputs[0]["shape"][0:2] == [-1, 3] and det.inputs[0]["type"] == "tensor(float)"
    assert len(det.outputs) == 1 and det.opset is not None
    assert det.load_memory_mb is not None and det.load_memory_mb > 0
    assert det.latency_ms is not None and det.latency_ms > 0
    assert det.metadata["measurement"]["input_shapes"] == {"x": [1, 3, 320, 320]}
    assert det.metadata["memory_source"] == "measured"
    stored = hub.store.get_artifact(det.sha256)
    assert stored.size == det.size
    assert hub.service.artifacts.path(det.sha256).read_bytes() == ocr_models["det"].read_bytes()
    assert hub.store.get_model("det", "1.0.0", "fp32") == det

    again = hub.service.add_model(ocr_models["det"], name="det", version="1.0.0")
    assert again == [det]
    with pytest.raises(Conflict, match="another artifact"):
        hub.service.add_model(ocr_models["rec"], name="det", version="1.0.0")


def test_add_model_without_shapes_stores_it_unmeasured(
    hub: Hub, ocr_models: dict[str, Path]
) -> None:
    [rec] = hub.service.add_model(ocr_models["rec"], name="rec", version="2", memory_mb=120)
    assert rec.latency_ms is None and rec.metadata["measurement"] is None
    assert rec.load_memory_mb == 120 and rec.metadata["memory_source"] == "operator"


def test_quantize_int8_stores_a_variant_with_its_drift(
    hub: Hub, ocr_models: dict[str, Path]
) -> None:
    fp32, int8 = hub.service.add_model(
        ocr_models["cls"],
        name="cls",
        version="1.0.0",
        quantize_int8=True,
        input_shapes=OCR_HINTS["cls"],
    )
    assert (int8.variant, int8.precision) == ("int8", "int8")
    assert int8.sha256 != fp32.sha256 and int8.size < fp32.size
    assert hub.service.artifacts.exists(int8.sha256)
    assert int8.metadata["derived_from"] == {"variant": "fp32", "sha256": fp32.sha256}
    assert int8.drift is not None
    assert int8.drift["sample_source"] == "synthetic" and int8.drift["samples"] == 4
    [(output, drift)] = int8.drift["outputs"].items()
    assert output == fp32.outputs[0]["name"]
    assert drift["cosine"] > 0.9 and drift["max_abs"] >= 0
    assert drift["top1_agreement"] is not None  # cls outputs class probabilities
    assert int8.load_memory_mb is not None and int8.latency_ms is not None
    assert fp32.drift is None
    # again: nothing is derived anew
    assert hub.service.add_model(
        ocr_models["cls"], name="cls", version="1.0.0", quantize_int8=True
    ) == [fp32, int8]


def test_add_model_refuses_bad_names_and_files(hub: Hub, tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match=r"junk\.onnx"):
        hub.service.add_model(junk, name="det", version="1")
    with pytest.raises(InvalidModelName, match="name 'Det'"):
        hub.service.add_model(junk, name="Det", version="1")
    with pytest.raises(InvalidModelName, match="version"):
        hub.service.add_model(junk, name="det", version="1 0")
    assert hub.store.list_models() == [] and hub.store.list_artifacts() == []


def test_apply_model_set_publishes_it_once(hub: Hub, ocr_models: dict[str, Path]) -> None:
    register_ocr(hub, ocr_models)
    text = modelset_yaml(hub.store.list_models())
    record = hub.service.apply_model_set(text, "ocr.yaml")
    assert (record.name, record.version, record.published) == ("ocr", "1.0.0", True)
    cls = next(m for m in record.document["models"] if m["name"] == "cls")
    assert sorted(v["name"] for v in cls["variants"]) == ["fp32", "int8"]
    assert hub.service.apply_model_set(text, "ocr.yaml") == record

    fewer = modelset_yaml(hub.store.list_models(), variants={"cls": ["fp32"]})
    with pytest.raises(ModelSetConflict) as caught:
        hub.service.apply_model_set(fewer, "ocr-again.yaml")
    err = caught.value
    assert isinstance(err, ManifestError)
    assert (err.source, err.field, err.line) == ("ocr-again.yaml", "version", 3)
    assert "published with other content" in str(err)
    assert hub.store.get_model_set("ocr", "1.0.0").document == record.document


def test_apply_model_set_refuses_an_unknown_artifact(hub: Hub, ocr_models: dict[str, Path]) -> None:
    register_ocr(hub, ocr_models)
    text = modelset_yaml(hub.store.list_models())
    rec = hub.store.get_model("rec", "1.0.0", "fp32")
    unknown = "f" * 64
    with pytest.raises(UnknownArtifact) as caught:
        hub.service.apply_model_set(text.replace(rec.sha256, unknown), "bad.yaml")
    err = caught.value
    assert err.source == "bad.yaml" and err.sha256 == unknown
    assert err.field == "models[2].variants[0].artifact.sha256"
    assert (
        err.line is not None
        and unknown in text.replace(rec.sha256, unknown).splitlines()[err.line - 1]
    )
    with pytest.raises(UnknownArtifact, match=r"size: artifact .* is \d+ bytes in the hub"):
        hub.service.apply_model_set(
            text.replace(f"size: {rec.size}", f"size: {rec.size + 1}"), "size.yaml"
        )
    # with a url of its own, an artifact the hub does not hold is fine
    with_url = text.replace(
        f"sha256: {rec.sha256}", f"sha256: {unknown}\n          url: https://cdn.example/rec"
    ).replace('version: "1.0.0"\nmodels', 'version: "1.0.1"\nmodels')
    assert hub.service.apply_model_set(with_url, "url.yaml").version == "1.0.1"
    assert hub.store.find_model_set("ocr", "1.0.0") is None


def test_apply_policy_refuses_a_missing_model_set(hub: Hub) -> None:
    with pytest.raises(UnknownModelSet) as caught:
        hub.service.apply_policy(policy_yaml(version="9.9"), "policy.yaml")
    err = caught.value
    assert (err.source, err.field, err.name, err.version) == (
        "policy.yaml",
        "model_set",
        "ocr",
        "9.9",
    )
    assert err.line == policy_yaml(version="9.9").splitlines().index('  version: "9.9"') + 1
    assert "does not exist" in str(err)
    assert hub.store.list_policies() == []
    with pytest.raises(ManifestError, match="priority"):
        hub.service.apply_policy(policy_yaml().replace("priority: 0", "priority: high"), "p.yaml")


# --- controller ----------------------------------------------------------------------------


def test_apply_policy_publishes_signed_retained_documents(
    hub: Hub, ocr_models: dict[str, Path]
) -> None:
    applied(hub, ocr_models)
    report = hub.service.last_report
    assert report is not None
    assert (report.published, report.unassigned, report.failed) == (3, 1, 0)
    assert report.outcomes["other-1"] == "unassigned"
    documents = hub.documents(hub.publisher.take())
    assert sorted(documents) == ["gw-1", "pi-1", "srv-1"]
    for device_id, document in documents.items():
        state = document.payload
        assert state.generation == 1 and report.generations[device_id] == 1
        assert state.model_set == ModelSetRef(name="ocr", version="1.0.0")
        assert [m.name for m in state.models] == ["cls", "det", "rec"]
        assert state.issued_at == START
        assert state.expires_at == START + hub.config.desired.validity_s
        assert state.artifact_base_urls == [hub.config.artifacts.own_url]
        assert {k.keyid for k in state.trusted_keys} == {k.keyid for k in hub.keys.active()}
        assert state.runtime.probation_s == 0
        stored = hub.store.latest_desired(device_id)
        assert stored is not None and stored.generation == 1
        assert stored.published_at == START
        assert stored.content_hash == content_hash(state)
        assert decode(Desired, document_bytes(stored.document)).payload == state
    assert hub.store.latest_desired("other-1") is None
    # equal content: nothing is published
    again = hub.service.reconcile()
    assert (again.unchanged, again.published, again.unassigned) == (3, 0, 1)
    assert hub.publisher.take() == []
    # changed content: every matching device gets the next generation
    hub.clock.now += 60
    hub.service.apply_policy(policy_yaml(labels={"site": "lab"}, probation_s=5), "policy.yaml")
    assert hub.store.get_policy("ocr-everywhere").version == 2
    changed = hub.documents(hub.publisher.take())
    assert {d: doc.payload.generation for d, doc in changed.items()} == {
        "gw-1": 2,
        "pi-1": 2,
        "srv-1": 2,
    }
    assert all(doc.payload.runtime.probation_s == 5 for doc in changed.values())


def document_bytes(document: dict[str, object]) -> bytes:
    return json.dumps(document).encode()


def test_resign_due_resigns_near_expiry_only(hub: Hub, ocr_models: dict[str, Path]) -> None:
    applied(hub, ocr_models)
    first = hub.documents(hub.publisher.take())
    desired = hub.config.desired
    hub.clock.now = START + desired.validity_s - desired.resign_before_s - 60
    assert hub.service.resign_due().devices == 0
    assert hub.publisher.take() == []
    hub.clock.now += 120  # now within resign_before_s of expiry
    report = hub.service.resign_due()
    assert (report.resigned, report.published, report.devices) == (3, 0, 3)
    resigned = hub.documents(hub.publisher.take())
    for device_id, document in resigned.items():
        state, before = document.payload, first[device_id].payload
        assert state.generation == 2
        assert state.issued_at == hub.clock.now
        assert state.expires_at == hub.clock.now + desired.validity_s
        assert content_hash(state) == content_hash(before)
    assert hub.service.resign_due().devices == 0


def test_a_rolled_back_device_is_held(hub: Hub, ocr_models: dict[str, Path]) -> None:
    applied(hub, ocr_models)
    hub.publisher.take()
    assert hub.service.mark_rolled_back("pi-1", 1)
    assert not hub.service.mark_rolled_back("pi-1", 7)
    desired = hub.config.desired
    hub.clock.now = START + desired.validity_s - desired.resign_before_s + 1
    report = hub.service.resign_due()
    assert report.outcomes == {"gw-1": "resigned", "pi-1": "held", "srv-1": "resigned"}
    assert sorted(hub.documents(hub.publisher.take())) == ["gw-1", "srv-1"]
    # new content lifts the hold
    hub.service.apply_policy(policy_yaml(labels={"site": "lab"}, probation_s=9), "policy.yaml")
    assert hub.documents(hub.publisher.take())["pi-1"].payload.generation == 2
    assert hub.service.resign_due().devices == 0


def test_pins_override_the_policys_model_set(hub: Hub, ocr_models: dict[str, Path]) -> None:
    applied(hub, ocr_models)
    hub.publisher.take()
    hub.service.apply_model_set(
        modelset_yaml(hub.store.list_models(), version="2.0.0", variants={"cls": ["fp32"]}),
        "ocr2.yaml",
    )
    ref = ModelSetRef(name="ocr", version="2.0.0")
    hub.service.set_pins("gw-1", {"ocr-everywhere": ref}, rollout="r1")
    pins = hub.service.get_pins("gw-1")
    assert pins is not None and pins.model_sets == {"ocr-everywhere": ref}
    report = hub.service.reconcile()
    assert report.outcomes["gw-1"] == "published" and report.unchanged == 2
    [(device_id, document)] = hub.documents(hub.publisher.take()).items()
    assert device_id == "gw-1"
    assert document.payload.model_set == ref and document.payload.rollout == "r1"
    cls = next(m for m in document.payload.models if m.name == "cls")
    assert [v.name for v in cls.variants] == ["fp32"]
    assert hub.service.plan()[0].resolution.model_set == ref  # gw-1 sorts first

    hub.service.set_pins("gw-1", {})
    assert hub.service.get_pins("gw-1") is None
    hub.service.reconcile(["gw-1"])
    [back] = hub.documents(hub.publisher.take()).values()
    assert back.payload.model_set.version == "1.0.0" and back.payload.generation == 3

    with pytest.raises(UnknownModelSet, match=r"ocr 3\.0\.0 is not published"):
        hub.service.set_pins("gw-1", {"ocr-everywhere": ModelSetRef(name="ocr", version="3.0.0")})


def test_plan_is_what_select_gives_for_each_devices_reported_facts(
    hub: Hub, ocr_models: dict[str, Path]
) -> None:
    applied(hub, ocr_models)
    plans = {p.device_id: p for p in hub.service.plan()}
    assert sorted(plans) == sorted(DEVICES)
    assert plans["other-1"].status == "unassigned"
    model_set = hub.store.get_model_set("ocr", "1.0.0")
    cls_variant = {}
    for device_id in ("pi-1", "gw-1", "srv-1"):
        device_plan = plans[device_id]
        name = DEVICES[device_id][0]
        assert device_plan.status == "planned" and device_plan.profile == name
        assert device_plan.plan == select(device_plan.resolution.models, profile(name), facts(name))
        assert device_plan.resolution.model_set == ModelSetRef(name="ocr", version="1.0.0")
        assert device_plan.plan is not None
        entry = device_plan.plan.entry("cls")
        assert isinstance(entry, Choice)
        cls_variant[device_id] = entry.variant
    assert cls_variant == {"pi-1": "int8", "gw-1": "int8", "srv-1": "fp32"}
    assert model_set.published
    lab_pis = hub.service.plan(Selector(profiles=["raspberry-pi-4-4gb"]))
    assert [p.device_id for p in lab_pis] == ["other-1", "pi-1"]


def test_a_device_ahead_of_the_hub_gets_a_generation_above_its_own(
    hub: Hub, ocr_models: dict[str, Path]
) -> None:
    applied(hub, ocr_models)
    hub.publisher.take()
    state = State(
        device_id="srv-1",
        session=1,
        seq=5,
        ts=START,
        applied_generation=7,
        desired_generation=7,
        phase="committed",
    )
    assert hub.store.record_state(state, START)
    hub.service.reconcile(["srv-1"])
    [document] = hub.documents(hub.publisher.take()).values()
    assert document.payload.generation == 8


class AckingPublisher(RecordingPublisher):
    """Returns paho-like acknowledgements that only arrive when ``ack`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.ack = threading.Event()

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> object:
        super().publish(topic, payload, qos=qos, retain=retain)
        return _Ack(self.ack)


class _Ack:
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def wait_for_publish(self, timeout: float | None = None) -> None:
        self.event.wait(timeout)

    def is_published(self) -> bool:
        return self.event.is_set()


def test_unacknowledged_documents_are_published_again(
    hub: Hub, ocr_models: dict[str, Path]
) -> None:
    register_ocr(hub, ocr_models)
    hub.service.apply_model_set(modelset_yaml(hub.store.list_models()), "ocr.yaml")
    born(hub, "pi-1", "gw-1")
    publisher = AckingPublisher()
    hub.service.controller.publisher = publisher
    hub.service.controller.ack_timeout_s = 0.05
    hub.service.apply_policy(policy_yaml(), "policy.yaml")
    report = hub.service.last_report
    assert report is not None and (report.published, report.unacknowledged) == (2, 2)
    assert len(publisher.take()) == 2
    assert sorted(d.device_id for d in hub.store.unpublished_desired()) == ["gw-1", "pi-1"]
    publisher.ack.set()
    assert hub.service.publish_pending() == 2
    again = publisher.take()
    assert sorted(hub.documents(again)) == ["gw-1", "pi-1"]
    assert all(d.payload.generation == 1 for d in hub.documents(again).values())
    assert hub.store.unpublished_desired() == []
    assert hub.service.publish_pending() == 0


def test_without_a_publisher_documents_wait_for_the_server(
    hub: Hub, ocr_models: dict[str, Path]
) -> None:
    hub.service.controller.publisher = None
    applied(hub, ocr_models)
    report = hub.service.last_report
    assert report is not None and (report.published, report.unacknowledged) == (3, 3)
    assert len(hub.store.unpublished_desired()) == 3
    hub.service.controller.publisher = hub.publisher
    assert hub.service.publish_pending() == 3
    assert sorted(hub.documents(hub.publisher.take())) == ["gw-1", "pi-1", "srv-1"]


def test_controller_loop_reconciles_births_and_holds_rollbacks(
    hub: Hub, ocr_models: dict[str, Path]
) -> None:
    register_ocr(hub, ocr_models)
    hub.service.apply_model_set(modelset_yaml(hub.store.list_models()), "ocr.yaml")
    hub.service.apply_policy(policy_yaml(labels={"site": "lab"}), "policy.yaml")
    hooks = IngestHooks()
    loop = ControllerLoop(hub.service.controller)
    loop.attach(hooks)
    loop.start()
    try:
        pi = birth("pi-1", "raspberry-pi-4-4gb", labels={"site": "lab"})
        hub.store.record_birth(pi, START)
        for hook in hooks.on_birth:
            hook("pi-1", pi)
        assert loop.idle()
        assert sorted(hub.documents(hub.publisher.take())) == ["pi-1"]
        event = Event(
            device_id="pi-1", session=1, seq=9, ts=START, kind="update.rolled_back", generation=1
        )
        for on_event in hooks.on_event:
            on_event("pi-1", event)
        assert loop.idle()
        hub.clock.now = START + hub.config.desired.validity_s
        assert hub.service.resign_due().outcomes == {"pi-1": "held"}
        loop.request_all()
        assert loop.idle()
        assert hub.publisher.take() == []
    finally:
        loop.stop()


def test_controller_loop_resends_what_a_device_never_received(
    hub: Hub, ocr_models: dict[str, Path]
) -> None:
    applied(hub, ocr_models)
    stored = hub.store.latest_desired("pi-1")
    assert stored is not None
    hub.publisher.take()
    hooks = IngestHooks()
    loop = ControllerLoop(hub.service.controller)
    loop.attach(hooks)
    loop.start()

    def report(applied_generation: int, seq: int) -> None:
        state = State(
            device_id="pi-1",
            session=1,
            seq=seq,
            ts=START,
            applied_generation=applied_generation,
            desired_generation=applied_generation,
            phase="idle",
        )
        hub.store.record_state(state, START)  # the ingest stores it, then runs the hooks
        for hook in hooks.on_state:
            hook("pi-1", state)
        assert loop.idle()

    try:
        report(0, 2)  # the broker acknowledged it a moment ago: it may be on its way
        assert hub.publisher.take() == []
        hub.clock.now = START + 60
        report(0, 3)  # still not received a minute later: sent again, as it is
        [again] = hub.publisher.take()
        assert again.retain and again.topic == down_topic("pi-1", Kind.DESIRED)
        assert json.loads(again.payload) == stored.document
        report(0, 4)  # not again right away
        assert hub.publisher.take() == []
        report(1, 5)  # received: nothing to do
        assert hub.publisher.take() == []
        report(5, 6)  # ahead of the hub (restored from a backup): numbered above it
        [ahead] = hub.documents(hub.publisher.take()).values()
        assert ahead.payload.generation == 6
    finally:
        loop.stop()

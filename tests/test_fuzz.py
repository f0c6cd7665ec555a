"""Fuzzing every parser that reads the network, with a counted outcome for every example.

Targets: MQTT topics (``contract.topics.parse_topic``), every wire message type
(``contract.messages.decode``: random bytes, random JSON under the right schema id, damaged
and mutated valid messages, foreign and unknown-major schema ids), the agent's verdict on a
desired state (``agent.desired.judge_desired``: random bytes, damaged and mutated genuine
documents, mutated payloads signed again by the trusted key, genuine documents of every
generation, device and age), the inference API's codec (``agent.api.oip``: JSON bodies,
binary-extension bodies with random ``binary_data_size`` values, the repository index body)
and the real inference server over loopback HTTP (random bodies split at a random
``Inference-Header-Content-Length``), and the YAML manifests an operator feeds the hub
(``contract.yaml_source``: random text and mutated valid documents).

Each target names the typed errors that count as a rejection. An example is *accepted*
(the parser returned; a property of the result is then checked, e.g. a decoded message
encodes back to the same message) or *rejected* with a reason (the error class or its
``reason``, a refusal code, an HTTP status). Anything else fails: another exception, an
example slower than the deadline (a hang), or, for the inference codec, an example whose
traced allocations exceed ``MEMORY_FACTOR`` times its size plus ``MEMORY_SLACK`` (a buffer
sized from a declared length instead of the bytes that came). ``Tally`` counts every example;
``decided == examples`` is the proof that each one was accepted or rejected with a type.

CI runs every target with ``CI_EXAMPLES`` examples (the whole file takes well under a
minute); ``bench/fuzz_long.py`` runs the same targets with a larger budget and prints the
counts.
"""

from __future__ import annotations

import copy
import http.client
import json
import math
import struct
import time
import tracemalloc
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from onnx import TensorProto

from agent.api import InferenceServer, oip
from agent.desired import Accepted, judge_desired
from agent.host import ModelHost
from contract.errors import ManifestError, TopicError, WireError
from contract.manifests import (
    Artifact,
    ModelSetRef,
    ModelSpec,
    Requirements,
    RuntimePolicy,
    Variant,
)
from contract.messages import (
    MESSAGE_TYPES,
    Cmd,
    Desired,
    DesiredState,
    HubState,
    Message,
    _decode_checked,
    decode,
    encode,
)
from contract.signing import SigningKey, TrustedKeys
from contract.topics import parse_topic
from contract.yaml_source import load_model_set, load_policy, load_profile
from support import hub_samples
from support.inference import load, save_add_model, save_identity_model, slot

CI_EXAMPLES = 250
"""Examples per target in CI."""
DEADLINE = timedelta(seconds=2)
"""Longest one example may take: a parser that hangs fails the run."""
MEMORY_FACTOR = 64
MEMORY_SLACK = 1 << 20
"""An inference codec example may allocate at most MEMORY_FACTOR x its size + MEMORY_SLACK."""

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "manifests"
DEVICE = "fuzz-dev-1"
NOW = 1_750_000_000.0
LAST_GENERATION = 5
ROLLED_BACK = 9
KEY = SigningKey.generate()
OTHER_KEY = SigningKey.generate()
TRUSTED = TrustedKeys([KEY.public])
SHA = "ab" * 32

Runner = Callable[[Any], str | None]
"""Runs one example: returns None when accepted, or a rejection reason it returned (a
refusal); raises one of the target's typed errors when it rejects by raising."""


def _class_name(exc: BaseException) -> str:
    return type(exc).__name__


_DECODE_REASONS = [
    ("not UTF-8", "not_utf8"),
    ("surrogate", "lone_surrogate"),
    ("not JSON", "not_json"),
    ("not a JSON object", "not_an_object"),
    ("nested", "too_deep"),
    ("'schema'", "schema_missing"),
    ("schema id", "schema_malformed"),
    ("expected schema", "schema_foreign"),
    ("does not match the topic", "device_mismatch"),
]
_TOPIC_REASONS = [
    ("empty", "empty"),
    ("characters, at most", "too_long"),
    ("contains NUL", "nul"),
    ("does not start with", "root"),
    ("version", "version"),
    ("'dev' or 'hub'", "scope"),
    ("hub topic", "hub_kind"),
    ("too few levels", "too_few_levels"),
    ("extra levels", "extra_levels"),
    ("device id", "device_id"),
    ("direction", "direction"),
    ("kind", "kind"),
]
_OIP_REASONS = [
    ("not valid JSON", "not_json"),
    ("must be a JSON object", "not_an_object"),
    ("shared memory", "shared_memory"),
    ("binary_data_output", "binary_data_output"),
    ("id must be", "id"),
    ("inputs must be", "no_inputs"),
    ("name must be", "name"),
    ("given twice", "duplicate"),
    ("asked for twice", "duplicate"),
    ("both data and", "data_and_binary"),
    ("neither data nor", "no_data"),
    ("belong to no input", "binary_left_over"),
    ("BYTES element", "bytes_element"),
    ("BOOL bytes", "bool_bytes"),
    ("binary_data_size", "binary_data_size"),
    ("data has", "count"),
    ("data must be", "data_type"),
    ("do not fit", "range"),
    ("regular list", "ragged"),
    ("datatype", "datatype"),
    ("shape", "shape"),
    ("classification", "classification"),
    ("binary_data must be", "binary_data"),
    ("outputs must be", "outputs"),
    ("ready must be", "ready"),
]


def _classify(message: str, table: list[tuple[str, str]], default: str) -> str:
    return next((reason for needle, reason in table if needle in message), default)


def _wire_reason(exc: BaseException) -> str:
    """The error's reason (too_large, schema_version, ...); decode errors by what failed
    (a validation failure is ``invalid``), topic errors by which level."""
    if isinstance(exc, TopicError):
        return "topic:" + _classify(str(exc), _TOPIC_REASONS, "other")
    if isinstance(exc, WireError) and exc.reason == "decode":
        return _classify(str(exc), _DECODE_REASONS, "invalid")
    return exc.reason if isinstance(exc, WireError) else type(exc).__name__


def _oip_reason(exc: BaseException) -> str:
    message = exc.message if isinstance(exc, oip.ProtocolError) else str(exc)
    return _classify(message, _OIP_REASONS, "other")


@dataclass(frozen=True)
class Target:
    name: str
    strategy: st.SearchStrategy[Any]
    runner: Callable[[], AbstractContextManager[Runner]]
    """Sets up what the target needs (a server) and yields the function that runs one example."""
    rejects: tuple[type[BaseException], ...] = ()
    reason: Callable[[BaseException], str] = _class_name
    size: Callable[[Any], int] | None = None
    """The example's size in bytes, for targets whose allocations are bounded by it."""


@dataclass
class Tally:
    """What became of every example of one target."""

    target: str
    examples: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    peak_bytes: int = 0
    """Largest traced allocation peak of one example (memory-bounded targets)."""

    @property
    def decided(self) -> int:
        return self.accepted + sum(self.rejected.values())

    def line(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected.items()))
        memory = f", peak {self.peak_bytes / 1024:.0f} KiB" if self.peak_bytes else ""
        return (
            f"{self.target}: {self.examples} examples in {self.seconds:.1f}s, "
            f"{self.accepted} accepted, {sum(self.rejected.values())} rejected "
            f"({reasons}){memory}"
        )


def fuzz(target: Target, *, examples: int, seed: int | None = None) -> Tally:
    """Run ``target`` on ``examples`` generated examples; every one ends up in the tally.

    A RuntimeWarning (numpy's overflow in a cast, say) is an error here: a parser that
    warns has let a value through that it should have refused.
    """
    tally = Tally(target.name)
    started = time.perf_counter()
    tracing = target.size is not None and not tracemalloc.is_tracing()
    if tracing:
        tracemalloc.start()
    try:
        with warnings.catch_warnings(), target.runner() as run:
            warnings.simplefilter("error", RuntimeWarning)

            def record(example: Any) -> None:
                tally.examples += 1
                if target.size is not None:
                    tracemalloc.reset_peak()
                    base = tracemalloc.get_traced_memory()[0]
                try:
                    verdict = run(example)
                except target.rejects as exc:
                    tally.rejected[target.reason(exc)] += 1
                else:
                    if verdict is None:
                        tally.accepted += 1
                    else:
                        tally.rejected[verdict] += 1
                if target.size is not None:
                    size = target.size(example)
                    peak = tracemalloc.get_traced_memory()[1] - base
                    assert peak <= MEMORY_FACTOR * size + MEMORY_SLACK, (
                        f"{target.name}: {peak} bytes allocated for a {size}-byte example"
                    )
                    tally.peak_bytes = max(tally.peak_bytes, peak)

            check = settings(
                max_examples=examples,
                deadline=DEADLINE,
                database=None,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck),
            )(given(target.strategy)(record))
            if seed is not None:
                check = hypothesis_seed(seed)(check)
            check()
    finally:
        if tracing:
            tracemalloc.stop()
    tally.seconds = time.perf_counter() - started
    assert tally.decided == tally.examples, tally.line()
    return tally


@contextmanager
def _pure(run: Runner) -> Iterator[Runner]:
    yield run


def pure(run: Runner) -> Callable[[], AbstractContextManager[Runner]]:
    return lambda: _pure(run)


# --- building blocks ---------------------------------------------------------------------

LONE_SURROGATES = ["\ud800", "x\udfff", "\udbff\udbff"]
texts = st.text(max_size=12) | st.sampled_from(LONE_SURROGATES)
huge_ints = st.integers(min_value=-(2**70), max_value=2**70)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-3, max_value=3)
    | huge_ints
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into ``doc``: dict keys and list indexes, the root included."""
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found += _paths(value, (*prefix, index))
    return found


def _confuse(value: Any) -> list[Any]:
    """Values of the wrong type or range for what ``value`` is."""
    wrong: list[Any] = [None, [], {}, "", [value], {"value": value}, "\ud800"]
    if isinstance(value, bool):
        wrong += [0, "true"]
    elif isinstance(value, int | float):
        wrong += [-1, -value, str(value), 2**64, 10**30, 1e308, 0.5, True]
    elif isinstance(value, str):
        wrong += [len(value), value * 50, value + "\x00", value.upper(), "\ud800", " " + value]
    return wrong


@st.composite
def mutated(draw: st.DrawFn, doc: Any, *, max_mutations: int = 3) -> Any:
    """``doc`` (a parsed JSON document) after 1-3 edits that mostly keep it structured:
    a value replaced (random, or wrong for its type), a key deleted or added, a list item
    duplicated or dropped."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(min_value=1, max_value=max_mutations))):
        path = draw(st.sampled_from(_paths(doc)))
        if not path:
            doc = draw(json_values) if draw(st.integers(0, 9)) == 0 else doc
            continue
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        value = parent[last]
        action = draw(st.sampled_from(["replace", "confuse", "delete", "add", "duplicate", "nest"]))
        if action == "replace":
            parent[last] = draw(json_values)
        elif action == "confuse":
            parent[last] = draw(st.sampled_from(_confuse(value)))
        elif action == "delete":
            del parent[last]
        elif action == "add" and isinstance(value, dict):
            value[draw(st.text(max_size=8))] = draw(json_values)
        elif action == "duplicate" and isinstance(value, list) and value:
            value.append(copy.deepcopy(value[0]))
        elif action == "nest":
            parent[last] = [[[[value]]]]
    return doc


@st.composite
def damaged(draw: st.DrawFn, payload: bytes) -> bytes:
    """``payload`` with 1-4 bytes overwritten, or cut short."""
    data = bytearray(payload)
    if draw(st.booleans()):
        return bytes(data[: draw(st.integers(min_value=0, max_value=len(data)))])
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        index = draw(st.integers(min_value=0, max_value=len(data) - 1))
        data[index] = draw(st.integers(min_value=0, max_value=255))
    return bytes(data)


def dumps(doc: Any, ascii_only: bool = True) -> bytes:
    return json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# --- topics ------------------------------------------------------------------------------

TOPIC_PARTS = [
    "edgefleet",
    "v1",
    "v2",
    "dev",
    "hub",
    "up",
    "down",
    "state",
    "desired",
    "cmd",
    "birth",
    "telemetry",
    "result",
    "",
    "+",
    "#",
    "pi-1",
    "a" * 65,
    "a b",
    "\x00",
    "$share",
]
device_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,70}", fullmatch=True)
topic_strings = (
    st.builds(
        lambda d, k: f"edgefleet/v1/dev/{d}/{k}",
        device_ids,
        st.sampled_from(["up/birth", "up/telemetry", "up/events", "down/desired", "down/cmd"]),
    )
    | st.just("edgefleet/v1/hub/state")
    | st.text(max_size=300)
    | st.lists(st.sampled_from(TOPIC_PARTS) | st.text(max_size=8), max_size=8).map("/".join)
    | st.builds(
        lambda d, k: f"edgefleet/v1/dev/{d}/{k}",
        st.text(max_size=70),
        st.sampled_from(["up/birth", "down/desired", "down/cmd", "up/state", "sideways/x"]),
    )
)


def run_topic(topic: str) -> None:
    parsed = parse_topic(topic)
    assert parsed.topic == topic
    assert parse_topic(parsed.topic) == parsed


# --- messages ----------------------------------------------------------------------------

MODEL = ModelSpec(
    name="cls",
    version="1.0.0",
    priority=10,
    variants=[
        Variant(
            name="fp32",
            precision="fp32",
            artifact=Artifact(sha256=SHA, size=1024),
            requires=Requirements(memory_mb=20),
        )
    ],
)


def desired_state(
    generation: int = 7,
    *,
    device_id: str = DEVICE,
    issued_at: float = NOW - 60,
    validity_s: float = 3600,
    models: list[ModelSpec] | None = None,
) -> DesiredState:
    return DesiredState(
        device_id=device_id,
        generation=generation,
        issued_at=issued_at,
        expires_at=issued_at + validity_s,
        model_set=ModelSetRef(name="ocr", version="1.0.0"),
        models=[MODEL] if models is None else models,
        runtime=RuntimePolicy(),
        artifact_base_urls=["http://hub.example/artifacts"],
    )


SAMPLES: dict[type[Message], Message] = {
    sample.__class__: sample
    for sample in (
        hub_samples.birth(DEVICE),
        hub_samples.status(DEVICE),
        hub_samples.telemetry(DEVICE),
        hub_samples.state(DEVICE),
        hub_samples.event(DEVICE),
        hub_samples.result(DEVICE),
        Desired.sign(desired_state(), KEY),
        Cmd(cmd_id="c-1", command="rebirth", args={"reason": "test"}, ts=NOW),
        HubState(state="online", hub_id="hub-1", ts=NOW),
    )
}
assert set(SAMPLES) == set(MESSAGE_TYPES), "every message type needs a sample"


def message_payloads(kind: type[Message]) -> st.SearchStrategy[bytes]:
    """Bytes, random objects under the schema id, and edits of a valid message."""
    sample = json.loads(encode(SAMPLES[kind]))
    other_schemas = [m.SCHEMA for m in MESSAGE_TYPES if m is not kind]
    schemas = (
        st.sampled_from(
            [
                kind.SCHEMA,
                f"{kind.SCHEMA_NAME}/2",
                f"{kind.SCHEMA_NAME}/0",
                f"{kind.SCHEMA_NAME}/01",
                f"{kind.SCHEMA_NAME}/9999999",
                kind.SCHEMA_NAME,
                kind.SCHEMA.upper(),
                *other_schemas,
            ]
        )
        | json_scalars
    )

    def with_schema(schema: Any, doc: dict[str, Any]) -> dict[str, Any]:
        return {**doc, "schema": schema}

    def with_extra(extra: dict[str, Any]) -> dict[str, Any]:
        return {**extra, **sample}

    return st.one_of(
        st.binary(max_size=512),
        st.builds(with_schema, st.just(kind.SCHEMA), st.dictionaries(texts, json_values)).map(
            dumps
        ),
        st.builds(with_schema, schemas, st.just(sample)).map(dumps),
        mutated(sample).map(dumps),
        st.builds(with_extra, st.dictionaries(st.text(min_size=1, max_size=8), json_values)).map(
            dumps
        ),
        damaged(encode(SAMPLES[kind])),
        st.just(encode(SAMPLES[kind])),
    )


def message_runner(kind: type[Message]) -> Runner:
    def run(payload: bytes) -> None:
        msg = decode(kind, payload)
        # decode's one-pass path must accept exactly what the checked path accepts
        checked = _decode_checked(kind, payload)
        assert checked.model_dump(mode="json", by_alias=True) == msg.model_dump(
            mode="json", by_alias=True
        )
        wire = encode(msg)
        again = decode(kind, wire)
        dumped = again.model_dump(mode="json", by_alias=True)
        assert dumped == msg.model_dump(mode="json", by_alias=True)
        assert encode(again) == wire

    return run


# --- desired states ----------------------------------------------------------------------

GENUINE = Desired.sign(desired_state(), KEY)
GENUINE_DOC = json.loads(encode(GENUINE))


def _resign(payload: Any, keys: list[SigningKey]) -> bytes:
    if not isinstance(payload, dict):
        return dumps({"schema": Desired.SCHEMA, "payload": payload, "signatures": []})
    try:
        signatures = [key.sign(payload).model_dump() for key in keys]
    except UnicodeEncodeError:  # a lone surrogate: the hub could not sign it either
        signatures = [{"keyid": key.keyid, "sig": "AAAA"} for key in keys]
    return dumps({"schema": Desired.SCHEMA, "payload": payload, "signatures": signatures})


@st.composite
def genuine_documents(draw: st.DrawFn) -> bytes:
    """Documents the hub could have signed: any generation, device, age, models, signers."""
    state = desired_state(
        draw(st.integers(min_value=1, max_value=12)),
        device_id=draw(st.sampled_from([DEVICE, "other-dev"])),
        issued_at=NOW - draw(st.sampled_from([0.0, 60.0, 7200.0])),
        validity_s=draw(st.sampled_from([1.0, 3600.0])),
        models=draw(
            st.sampled_from([[], [MODEL], [MODEL, MODEL.model_copy(update={"name": "b"})]])
        ),
    )
    keys = draw(
        st.sampled_from([[KEY], [KEY], [OTHER_KEY, KEY], [KEY, OTHER_KEY], [OTHER_KEY], []])
    )
    return encode(Desired.sign(state, *keys))


def _with_note(text: str) -> bytes:
    """The genuine document with a field added to its payload after signing."""
    return dumps({**GENUINE_DOC, "payload": {**GENUINE_DOC["payload"], "note": text}})


desired_payloads = st.one_of(
    st.binary(max_size=512),
    damaged(encode(GENUINE)),
    mutated(GENUINE_DOC).map(dumps),
    st.builds(_with_note, texts),
    st.builds(
        _resign,
        mutated(GENUINE_DOC["payload"]),
        st.sampled_from([[KEY], [OTHER_KEY], [OTHER_KEY, KEY], []]),
    ),
    genuine_documents(),
)


def run_judge(payload: bytes) -> str | None:
    verdict = judge_desired(
        payload,
        device_id=DEVICE,
        trusted=TRUSTED,
        last_generation=LAST_GENERATION,
        refused_generations=[ROLLED_BACK],
        now=NOW,
    )
    if not isinstance(verdict, Accepted):
        return str(verdict.code)
    state = verdict.state
    assert verdict.keyid == KEY.keyid
    assert state.device_id == DEVICE
    assert state.generation > LAST_GENERATION and state.generation != ROLLED_BACK
    assert state.expires_at > NOW
    assert TRUSTED.verify(verdict.signed_payload, decode(Desired, payload).signatures)
    return None


# --- the inference API -------------------------------------------------------------------

DATATYPES = list(oip.DATATYPES)
dims = st.integers(min_value=0, max_value=4) | st.integers(min_value=-2, max_value=2**64)
shapes = st.lists(dims, max_size=4) | st.lists(st.just(0), min_size=30, max_size=70) | json_values
numbers = st.integers(-(2**65), 2**65) | st.floats() | st.booleans()
tensor_data = (
    st.lists(numbers, max_size=16)
    | st.lists(st.lists(numbers, max_size=3), max_size=4)
    | st.lists(st.text(max_size=4), max_size=8)
    | st.builds(lambda n, m: ["a" * m, *[""] * n], st.integers(0, 2000), st.integers(0, 2000))
    | json_values
)
sizes = st.integers(min_value=0, max_value=64) | st.integers(min_value=-5, max_value=2**64)
tensor_params = st.fixed_dictionaries(
    {},
    optional={
        "binary_data_size": sizes | json_scalars,
        "shared_memory_region": texts,
        "other": json_values,
    },
)
input_tensors = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "y", ""]) | texts,
        "datatype": st.sampled_from(DATATYPES) | json_scalars,
        "shape": shapes,
    },
    optional={"data": tensor_data, "parameters": tensor_params | json_values},
)
requested_outputs = st.lists(
    st.fixed_dictionaries(
        {"name": st.sampled_from(["y", "z"]) | texts},
        optional={
            "parameters": st.dictionaries(
                st.sampled_from(["binary_data", "classification", "x"]), json_scalars
            )
        },
    ),
    max_size=3,
)
infer_requests = st.fixed_dictionaries(
    {"inputs": st.lists(input_tensors, max_size=3) | json_values},
    optional={
        "id": texts | json_scalars,
        "parameters": st.dictionaries(
            st.sampled_from(["binary_data_output", "shared_memory_x", "k"]), json_scalars
        )
        | json_values,
        "outputs": requested_outputs | json_values,
    },
)


@st.composite
def binary_requests(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A binary-extension request whose sizes mostly add up, with the bytes after it."""
    inputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for index in range(draw(st.integers(min_value=1, max_value=3))):
        datatype = draw(st.sampled_from(DATATYPES))
        shape = draw(st.lists(st.integers(min_value=0, max_value=4), max_size=3))
        count = math.prod(shape)
        if datatype == "BYTES":
            strings = draw(st.lists(st.binary(max_size=6), min_size=count, max_size=count))
            chunk = b"".join(len(s).to_bytes(4, "little") + s for s in strings)
        else:
            chunk = draw(
                st.binary(
                    min_size=count * oip.DATATYPES[datatype].itemsize,
                    max_size=count * oip.DATATYPES[datatype].itemsize,
                )
            )
        skew = draw(st.sampled_from([0, 0, 0, 0, -1, 1, 4, 2**40]))
        size = max(0, len(chunk) + skew)
        inputs.append(
            {
                "name": f"in{index}",
                "datatype": datatype,
                "shape": shape,
                "parameters": {"binary_data_size": size},
            }
        )
        chunks.append(chunk)
    binary = b"".join(chunks) + draw(st.sampled_from([b"", b"", b"\0", b"junk"]))
    return dumps({"inputs": inputs}), binary


odd_shapes = st.sampled_from(
    [[0, 2**63], [2**40, 0, 2**40], [0] * 33, [0] * 70, [1] * 33, [2**62, 2**62]]
)
"""Shapes numpy cannot hold even empty, and ranks past its limit."""
ELEMENT_KINDS = [
    st.booleans(),
    st.integers(min_value=-3, max_value=300),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(),
    st.text(max_size=3),
    st.none(),
    st.booleans() | st.integers() | st.floats() | st.text(max_size=2),
]


def _nest(flat: list[Any], shape: list[int]) -> Any:
    """``flat`` as nested lists of ``shape`` (row-major), as a JSON client may send it."""
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


@st.composite
def json_requests(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A request with JSON ``data`` whose counts mostly add up: every datatype, each tensor's
    values of one kind (booleans, small or huge integers, floats, strings, nulls) or mixed,
    flat or nested by the shape."""
    inputs: list[dict[str, Any]] = []
    for index in range(draw(st.integers(min_value=1, max_value=2))):
        datatype = draw(st.sampled_from(DATATYPES))
        if draw(st.integers(min_value=0, max_value=9)) == 0:
            # One long string among many empty ones: numpy would size every element for
            # the longest (an allocation out of all proportion with the body).
            n, m = draw(st.integers(1000, 3000)), draw(st.integers(1000, 3000))
            strings = ["a" * m, *[""] * n]
            inputs.append(
                {"name": f"in{index}", "datatype": datatype, "shape": [n + 1], "data": strings}
            )
            continue
        shape = draw(st.lists(st.integers(min_value=0, max_value=3), max_size=3) | odd_shapes)
        count = max(0, math.prod(shape) + draw(st.sampled_from([0, 0, 0, 0, 1, -1])))
        if count > 64:  # an odd shape: its data cannot match, a few values will do
            count = draw(st.integers(min_value=0, max_value=3))
        values = draw(st.sampled_from(ELEMENT_KINDS))
        flat = draw(st.lists(values, min_size=count, max_size=count))
        small = len(shape) <= 3 and all(d <= 3 for d in shape)
        nested = small and count == math.prod(shape) and draw(st.booleans())
        data = _nest(flat, shape) if nested else flat
        inputs.append({"name": f"in{index}", "datatype": datatype, "shape": shape, "data": data})
    return dumps({"inputs": inputs}), b""


oip_json_bodies = st.one_of(
    st.binary(max_size=256),
    json_values.map(dumps),
    infer_requests.map(dumps),
    infer_requests.map(lambda doc: dumps(doc, ascii_only=False)),
)
oip_bodies = st.tuples(oip_json_bodies, st.just(b"")) | json_requests() | binary_requests()
oip_binary_bodies = (
    st.tuples(infer_requests.map(dumps), st.binary(max_size=256)) | binary_requests()
)


def run_infer_parse(body: tuple[bytes, bytes]) -> None:
    header, binary = body
    request = oip.parse_infer_request(header, binary)
    for tensor in request.inputs:
        assert tensor.data.shape == tensor.shape
        assert tensor.data.dtype == oip.DATATYPES[tensor.datatype]
        if tensor.datatype != "BYTES":
            assert tensor.data.nbytes <= len(header) * 8 + len(binary)


def run_index(body: bytes) -> None:
    assert oip.parse_index_request(body) in (True, False)


def body_size(body: tuple[bytes, bytes]) -> int:
    return len(body[0]) + len(body[1])


@st.composite
def add_requests(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A request the ``add`` model (FP32 [batch, 4]) answers: JSON or binary."""
    batch = draw(st.integers(min_value=0, max_value=3))
    values = draw(st.lists(st.floats(width=32), min_size=4 * batch, max_size=4 * batch))
    tensor: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": [batch, 4]}
    doc: dict[str, Any] = {"inputs": [tensor]}
    if draw(st.booleans()):
        tensor["data"] = values
        return dumps(doc), b""
    binary = b"".join(struct.pack("<f", v) for v in values)
    tensor["parameters"] = {"binary_data_size": len(binary)}
    doc["parameters"] = {"binary_data_output": draw(st.booleans())}
    return dumps(doc), binary


@st.composite
def http_infer(draw: st.DrawFn) -> tuple[str, bytes, str | None]:
    """(model, body, Inference-Header-Content-Length or None) for POST .../infer."""
    model = draw(st.sampled_from(["add", "add", "text", "missing"]))
    header, binary = draw(oip_bodies | oip_binary_bodies | add_requests())
    body = header + binary
    length = draw(
        st.sampled_from([str(len(header)), None])
        | st.integers(min_value=0, max_value=len(body) + 8).map(str)
        | st.sampled_from(["-1", "abc", "1e3", "99999999999999999999", " 7", "²"])
    )
    return model, body, length


HTTP_STATUSES = {200: None, 400: "http_400", 404: "http_404", 413: "http_413"}


@contextmanager
def http_runner() -> Iterator[Runner]:
    """A real inference server on loopback with two small models and one keep-alive client."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = {
            "add": load("add", save_add_model(root / "add.onnx", 1.0, width=4)),
            "text": load("text", save_identity_model(root / "s.onnx", TensorProto.STRING)),
        }
        host = ModelHost({name: slot(model) for name, model in models.items()})
        server = InferenceServer(host, bind="127.0.0.1:0", max_body_bytes=64 * 1024)
        server.start()
        assert server.port is not None
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:

            def run(example: tuple[str, bytes, str | None]) -> str | None:
                model, body, length = example
                headers = {"Content-Type": "application/octet-stream"}
                if length is not None:
                    headers["Inference-Header-Content-Length"] = length
                conn.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
                response = conn.getresponse()
                answer = response.read()
                assert response.status in HTTP_STATUSES, (response.status, answer[:300])
                if response.status != 200:
                    assert "error" in json.loads(answer)
                return HTTP_STATUSES[response.status]

            yield run
            conn.request("GET", "/v2/health/live")
            assert conn.getresponse().status == 200
        finally:
            conn.close()
            assert server.stop(timeout=5.0)


# --- YAML manifests ----------------------------------------------------------------------

TRICKY_SCALARS = [
    "~",
    "2001-02-30",
    "2001-13-45 10:00:00",
    "!!int 0x",
    "!!float xyz",
    "!!binary ===",
    "!!python/object:os.system x",
    "!!set {a}",
    "0o19",
    "0x_",
    ".nan",
    "-.inf",
    "1_000",
    "1e99999",
    "9" * 5000,
    "1" + ":1" * 2000,
    "&a x",
    "*a",
    "*undefined",
    "[",
    "{",
    "'",
    '"',
    "|",
    ">-",
    "? a",
    "@",
    "`",
    "yes",
    "'1.0'",
    "[1, [2, [3]]]",
    "{a: 1, a: 2}",
    "\x00",
    "\ufeff",
    "\t",
    "\ud800",
]
BILLION_LAUGHS = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
)
yaml_edits = st.sampled_from(TRICKY_SCALARS) | st.text(max_size=20)


@st.composite
def mutated_yaml(draw: st.DrawFn, text: str) -> str:
    """A valid document after 1-3 line edits: a value replaced with a tricky scalar, a line
    deleted, duplicated, re-indented or inserted, or the text cut short."""
    lines = text.splitlines()
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        if not lines:
            break
        index = draw(st.integers(min_value=0, max_value=len(lines) - 1))
        line = lines[index]
        action = draw(st.sampled_from(["value", "delete", "duplicate", "indent", "insert", "cut"]))
        if action == "value":
            key, colon, _ = line.partition(":")
            edit = draw(yaml_edits)
            lines[index] = f"{key}: {edit}" if colon else f"{line[: len(line) // 2]}{edit}"
        elif action == "delete":
            del lines[index]
        elif action == "duplicate":
            lines.insert(index, line)
        elif action == "indent":
            shift = draw(st.sampled_from([-2, -1, 1, 2]))
            lines[index] = " " * shift + line if shift > 0 else line[-shift:]
        elif action == "insert":
            lines.insert(index, draw(yaml_edits))
        else:
            cut = "\n".join(lines)
            return cut[: draw(st.integers(min_value=0, max_value=len(cut)))]
    return "\n".join(lines)


def yaml_texts(fixture: str) -> st.SearchStrategy[str]:
    text = (FIXTURES / fixture).read_text()
    return st.one_of(
        st.text(max_size=400),
        st.sampled_from(TRICKY_SCALARS),
        st.just(BILLION_LAUGHS),
        mutated_yaml(text),
        st.just(text),
    )


def manifest_reason(exc: BaseException) -> str:
    assert isinstance(exc, ManifestError)
    assert exc.source == "fuzz.yaml"
    top = exc.field.split(".")[0].split("[")[0]
    return top if top.startswith("(") else "field"


def yaml_runner(loader: Callable[[str, str], Any]) -> Runner:
    def run(text: str) -> None:
        loader(text, "fuzz.yaml")

    return run


# --- the targets -------------------------------------------------------------------------

TARGETS: list[Target] = [
    Target("topic", topic_strings, pure(run_topic), (TopicError,), _wire_reason),
    *[
        Target(
            f"decode.{kind.SHORT_NAME}",
            message_payloads(kind),
            pure(message_runner(kind)),
            (WireError,),
            _wire_reason,
        )
        for kind in MESSAGE_TYPES
    ],
    Target("judge_desired", desired_payloads, pure(run_judge)),
    Target(
        "oip.json_body",
        oip_bodies,
        pure(run_infer_parse),
        (oip.ProtocolError,),
        _oip_reason,
        size=body_size,
    ),
    Target(
        "oip.binary_body",
        oip_binary_bodies,
        pure(run_infer_parse),
        (oip.ProtocolError,),
        _oip_reason,
        size=body_size,
    ),
    Target(
        "oip.index_body",
        st.binary(max_size=64) | json_values.map(dumps),
        pure(run_index),
        (oip.ProtocolError,),
        _oip_reason,
        size=len,
    ),
    Target("http.infer", http_infer(), http_runner),
    Target(
        "yaml.modelset",
        yaml_texts("modelset.yaml"),
        pure(yaml_runner(load_model_set)),
        (ManifestError,),
        manifest_reason,
    ),
    Target(
        "yaml.policy",
        yaml_texts("policy.yaml"),
        pure(yaml_runner(load_policy)),
        (ManifestError,),
        manifest_reason,
    ),
    Target(
        "yaml.profile",
        yaml_texts("profile.yaml"),
        pure(yaml_runner(load_profile)),
        (ManifestError,),
        manifest_reason,
    ),
]
BY_NAME = {target.name: target for target in TARGETS}


@pytest.mark.parametrize("name", list(BY_NAME))
def test_fuzz(name: str) -> None:
    """Every example accepted or rejected with a typed error; both sides reached."""
    tally = fuzz(BY_NAME[name], examples=CI_EXAMPLES)
    print(tally.line())
    assert tally.examples >= CI_EXAMPLES // 2, tally.line()
    # A generator that only ever produces garbage would prove little.
    assert tally.accepted and tally.rejected, tally.line()

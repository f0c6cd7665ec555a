"""Every message on the wire, each naming its schema and major version (``edgefleet.birth/1``).

Decoding is defensive: the size is checked before parsing, and anything that is not a valid
message raises a ``contract.errors.WireError`` subclass that callers count and drop. Unknown
fields from newer peers are kept and survive a decode/encode round trip; an unknown major
version is refused with ``UnsupportedSchemaVersion``.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, TypeVar, overload

from pydantic import (
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.config import JsonDict

from contract.base import WireModel
from contract.errors import MessageDecodeError, MessageTooLarge, UnsupportedSchemaVersion
from contract.manifests import ModelSetRef, ModelSpec, Name, RuntimePolicy, Sha256, Version
from contract.profile import FirmwareProfile, HardwareFacts, Precision
from contract.signing import PublicKey, Signature, SigningKey, TrustedKeys
from contract.topics import (
    DEVICE_ID_MAX_LENGTH,
    DEVICE_ID_PATTERN,
    HUB_STATE_TOPIC,
    Direction,
    Kind,
    ParsedTopic,
    device_topic,
)

DEFAULT_MAX_BYTES = 256 * 1024
DESIRED_MAX_BYTES = 1024 * 1024
MAX_PACKET_BYTES = DESIRED_MAX_BYTES + 64 * 1024
"""Largest MQTT packet either side needs: a desired document of the largest size with its
topic, headers and properties. The broker configuration and the agent's CONNECT use it."""
MAX_DEPTH = 64
"""Deepest nesting of arrays and objects a payload may have."""

_SCHEMA_ID = re.compile(r"([a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+)/([0-9]{1,6})")
_SHOWN_CHARS = 64
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")
"""A JSON escape of a UTF-16 surrogate: the only way a lone one gets into parsed text."""
_SCHEMA_DESCRIPTION = "Names the message and its major version; required on the wire."

DeviceId = Annotated[
    str,
    Field(
        pattern=DEVICE_ID_PATTERN,
        max_length=DEVICE_ID_MAX_LENGTH,
        description="Device id: [A-Za-z0-9][A-Za-z0-9._:-]*, at most 64 characters.",
    ),
]
UnixTime = Annotated[float, Field(ge=0, description="Unix time in seconds.")]
Generation = Annotated[int, Field(ge=0, description="Desired-state generation; 0 means none.")]

Phase = Literal["idle", "staging", "loading", "probation", "committed", "rolled_back", "failed"]
ModelState = Literal["loading", "ready", "failed", "shed"]
OnlineState = Literal["online", "offline"]
ProfileSource = Literal["override", "detected"]

M = TypeVar("M", bound="Message")


def split_schema(schema: str) -> tuple[str, int]:
    """``"edgefleet.telemetry/1"`` -> ``("edgefleet.telemetry", 1)``; MessageDecodeError else."""
    match = _SCHEMA_ID.fullmatch(schema)
    if match is None:
        raise MessageDecodeError(f"malformed schema id {_show(schema)}")
    return match.group(1), int(match.group(2))


def _show(text: str) -> str:
    if len(text) > _SHOWN_CHARS:
        return repr(text[:_SHOWN_CHARS]) + "..."
    return repr(text)


def _require_schema(schema: JsonDict) -> None:
    """Mark ``schema`` required in the JSON Schema (it has a default only for constructors)."""
    required = schema.get("required")
    names = [str(n) for n in required] if isinstance(required, list) else []
    if "schema" not in names:
        names.insert(0, "schema")
    schema["required"] = list(names)


def _schema_field(schema: str) -> Any:
    return Field(default=schema, alias="schema", description=_SCHEMA_DESCRIPTION)


class Part(WireModel):
    """A nested part of a message: unknown fields are kept; NaN and infinities are refused."""

    model_config = ConfigDict(allow_inf_nan=False)


class Message(WireModel):
    """Base of every message. Subclasses define ``schema_`` as a one-value Literal."""

    model_config = ConfigDict(allow_inf_nan=False, json_schema_extra=_require_schema)

    SCHEMA: ClassVar[str] = ""
    SCHEMA_NAME: ClassVar[str] = ""
    SCHEMA_MAJOR: ClassVar[int] = 0
    SHORT_NAME: ClassVar[str] = ""
    TOPIC: ClassVar[tuple[Direction, Kind] | None] = None
    MAX_BYTES: ClassVar[int] = DEFAULT_MAX_BYTES
    JSON_FAST_PATH: ClassVar[bool] = True
    """Whether ``decode`` may validate the raw JSON directly (see ``_decode_plain``); off
    for types whose validators need the parsed Python objects."""

    schema_: str = Field(alias="schema", description=_SCHEMA_DESCRIPTION)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields["schema_"]
        if field.is_required():
            return
        schema = str(field.default)
        cls.SCHEMA = schema
        cls.SCHEMA_NAME, cls.SCHEMA_MAJOR = split_schema(schema)
        cls.SHORT_NAME = cls.SCHEMA_NAME.removeprefix("edgefleet.")

    def subject_device_id(self) -> str | None:
        """The device this message is from or about, if it names one."""
        return None


class DeviceMessage(Message):
    """Fields every device-to-hub message carries."""

    device_id: DeviceId
    session: NonNegativeInt = Field(
        description="Connection counter of the agent: grows by one on every connect; the "
        "same value is in the birth and the Will of that connection."
    )
    seq: NonNegativeInt = Field(
        description="Per-device message counter, persisted: strictly increasing across "
        "sessions and restarts (a restart may skip ahead). Within a session, a gap that "
        "is not filled soon means lost messages."
    )
    ts: UnixTime

    def subject_device_id(self) -> str | None:
        return self.device_id


class InventoryItem(Part):
    """A model artifact the device holds and can load."""

    model: Name
    version: Version
    variant: Name
    precision: Precision
    provider: str = Field(description="Execution provider the variant runs on here.")
    sha256: Sha256


class Birth(DeviceMessage):
    """Sent on every connect; announces who the device is and what it has."""

    schema_: Literal["edgefleet.birth/1"] = _schema_field("edgefleet.birth/1")
    TOPIC = (Direction.UP, Kind.BIRTH)

    agent_version: str
    facts: HardwareFacts = Field(description="What the agent read about the hardware.")
    profile: FirmwareProfile = Field(description="The full firmware profile the device chose.")
    profile_source: ProfileSource = Field(
        description="override: named in the agent's config; detected: scored from the facts."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Labels from the agent's config (policy selectors)."
    )
    capabilities: list[str] = Field(
        default_factory=list, description="Commands and features this agent supports."
    )
    inventory: list[InventoryItem] = Field(
        default_factory=list, description="Artifacts on disk, ready to load."
    )
    applied_generation: Generation = 0


class Status(Message):
    """online after connect; offline as the MQTT Will (retained)."""

    schema_: Literal["edgefleet.status/1"] = _schema_field("edgefleet.status/1")
    TOPIC = (Direction.UP, Kind.STATUS)

    state: OnlineState
    device_id: DeviceId
    session: NonNegativeInt = Field(
        description="The connection this status belongs to; a Will from an older session "
        "than the last birth is ignored."
    )
    seq: NonNegativeInt | None = Field(
        default=None, description="Absent in the Will, which is fixed at connect time."
    )
    ts: UnixTime = Field(description="Unix time in seconds; for the Will, the connect time.")

    def subject_device_id(self) -> str | None:
        return self.device_id


class SystemStats(Part):
    cpu_percent: float = Field(ge=0, description="CPU use over the interval, 0-100.")
    load_1: float = Field(ge=0)
    load_5: float = Field(ge=0)
    load_15: float = Field(ge=0)
    memory_used_mb: NonNegativeInt
    memory_available_mb: NonNegativeInt
    disk_free_mb: NonNegativeInt = Field(description="Free space where the agent keeps models.")
    temperature_c: float | None = Field(
        default=None, description="Hottest thermal sensor of the profile; null without one."
    )
    throttled: bool = Field(default=False, description="Thermal or power throttling is active.")
    uptime_s: float = Field(ge=0)


class AgentStats(Part):
    version: str
    rss_mb: NonNegativeInt = Field(description="Resident memory of the agent process.")
    applied_generation: Generation
    desired_generation: Generation
    phase: Phase


class Latency(Part):
    """Inference latency percentiles over the interval, in milliseconds."""

    p50: float = Field(ge=0)
    p95: float = Field(ge=0)
    p99: float = Field(ge=0)


class ModelStats(Part):
    version: Version
    variant: Name | None = None
    provider: str | None = None
    state: ModelState = Field(description="shed: unloaded to relieve memory or heat.")
    requests: NonNegativeInt = Field(default=0, description="Requests during the interval.")
    errors: NonNegativeInt = Field(default=0, description="Failed requests during the interval.")
    latency_ms: Latency | None = Field(
        default=None, description="null when there were no requests."
    )


class LinkStats(Part):
    reconnects: NonNegativeInt = Field(default=0, description="Reconnects since the agent started.")
    outbox_depth: NonNegativeInt = Field(default=0, description="Messages waiting to be sent.")
    dropped: NonNegativeInt = Field(
        default=0, description="Messages dropped from the full outbox since the agent started."
    )
    refused: NonNegativeInt = Field(
        default=0,
        description="Messages the broker refused for good (MQTT 5: not authorized, invalid "
        "topic or payload, too large) and the agent dropped, since it started.",
    )
    incoming_dropped: dict[str, NonNegativeInt] = Field(
        default_factory=dict,
        description="Messages from the broker the agent dropped since it started, by reason "
        "(cmd_decode, desired_bad_signature, inbox_full, too_large, ...); refused desired "
        "documents are also reported as desired.refused events, commands only here.",
    )


class Telemetry(DeviceMessage):
    """Periodic health of the system, the agent, each model and the link."""

    schema_: Literal["edgefleet.telemetry/1"] = _schema_field("edgefleet.telemetry/1")
    TOPIC = (Direction.UP, Kind.TELEMETRY)

    interval_s: PositiveFloat = Field(description="Length of the interval the counters cover.")
    system: SystemStats
    agent: AgentStats
    models: dict[Name, ModelStats] = Field(default_factory=dict)
    link: LinkStats = Field(default_factory=LinkStats)


class ModelReport(Part):
    name: Name
    version: Version
    variant: Name | None = None
    precision: Precision | None = None
    provider: str | None = None
    ready: bool
    reason: str | None = Field(
        default=None, description="Why the model is not ready or was left out."
    )


class LastError(Part):
    generation: Generation
    code: str = Field(description="Machine-readable error code, e.g. hash_mismatch.")
    message: str


class State(DeviceMessage):
    """The device's reported state (retained)."""

    schema_: Literal["edgefleet.state/1"] = _schema_field("edgefleet.state/1")
    TOPIC = (Direction.UP, Kind.STATE)

    applied_generation: Generation
    desired_generation: Generation = Field(description="Newest generation the device received.")
    phase: Phase = Field(description="Where the device is in applying a generation.")
    models: list[ModelReport] = Field(default_factory=list)
    last_error: LastError | None = None
    refused_generation: PositiveInt | None = Field(
        default=None, description="Newest generation the device refused, if any."
    )


class EventKind(StrEnum):
    """Well-known event kinds; others may appear and are kept as text."""

    UPDATE_STARTED = "update.started"
    UPDATE_FAILED = "update.failed"
    UPDATE_ACTIVATED = "update.activated"
    UPDATE_COMMITTED = "update.committed"
    UPDATE_ROLLED_BACK = "update.rolled_back"
    DESIRED_REFUSED = "desired.refused"
    PRESSURE_SHED = "pressure.shed"
    PRESSURE_RESTORED = "pressure.restored"
    THERMAL_THROTTLED = "thermal.throttled"
    THERMAL_NORMAL = "thermal.normal"
    CMD_DONE = "cmd.done"


class Event(DeviceMessage):
    """A discrete event."""

    schema_: Literal["edgefleet.event/1"] = _schema_field("edgefleet.event/1")
    TOPIC = (Direction.UP, Kind.EVENTS)

    kind: str = Field(
        pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$",
        max_length=128,
        description="Dotted kind, e.g. update.started, desired.refused, pressure.shed.",
    )
    generation: Generation | None = Field(
        default=None, description="The generation the event is about, if any."
    )
    message: str = Field(default="", description="Human-readable summary.")
    data: dict[str, Any] = Field(default_factory=dict, description="Details, by kind.")


class DesiredState(Part):
    """What one device should run. Signed as a whole; the device applies all of it or none."""

    device_id: DeviceId
    generation: PositiveInt = Field(description="Grows strictly per device.")
    issued_at: UnixTime
    expires_at: UnixTime = Field(description="The device refuses the document after this time.")
    model_set: ModelSetRef
    models: list[ModelSpec] = Field(description="The resolved models of the model set.")
    runtime: RuntimePolicy
    artifact_base_urls: list[str] = Field(
        default_factory=list, description="Where artifacts without a url are fetched by hash."
    )
    trusted_keys: list[PublicKey] = Field(
        default_factory=list, description="Keys the device trusts from now on (key rotation)."
    )
    rollout: str | None = Field(default=None, description="The rollout this generation is part of.")

    @model_validator(mode="after")
    def _consistent(self) -> DesiredState:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        return self

    def signable(self) -> dict[str, Any]:
        """The JSON object that is signed: this state as it goes on the wire."""
        return self.model_dump(mode="json", by_alias=True)


_SIGNED_PAYLOAD = "edgefleet.signed_payload"
"""Validation context key: the payload dict just signed (``Desired.sign``), kept as is."""


class Desired(Message):
    """Signed envelope of the desired state (retained). Signatures cover `payload`."""

    schema_: Literal["edgefleet.desired/1"] = _schema_field("edgefleet.desired/1")
    TOPIC = (Direction.DOWN, Kind.DESIRED)
    MAX_BYTES = DESIRED_MAX_BYTES
    JSON_FAST_PATH = False  # keeps the payload exactly as received, for the signatures

    payload: DesiredState
    signatures: list[Signature]

    _signed: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_signed_payload(
        cls, data: Any, handler: ModelWrapValidatorHandler[Desired], info: ValidationInfo
    ) -> Desired:
        if isinstance(data, Desired):
            return handler(data)
        model = handler(data)
        signed = info.context.get(_SIGNED_PAYLOAD) if isinstance(info.context, dict) else None
        if isinstance(signed, dict):
            model._signed = signed
            return model
        raw = data.get("payload") if isinstance(data, Mapping) else None
        model._signed = copy.deepcopy(raw) if isinstance(raw, dict) else model.payload.signable()
        return model

    @classmethod
    def sign(cls, state: DesiredState, *keys: SigningKey) -> Desired:
        """An envelope of ``state`` signed by each key."""
        signable = state.signable()
        return cls.model_validate(
            {"payload": state, "signatures": [key.sign(signable) for key in keys]},
            context={_SIGNED_PAYLOAD: signable},
        )

    def signed_payload(self) -> dict[str, Any]:
        """The payload exactly as received (or as built): what the signatures cover."""
        return copy.deepcopy(self._signed)

    def verify(self, trusted: TrustedKeys) -> str:
        """The id of the trusted key that signed this document; a TrustError otherwise."""
        return trusted.verify(self._signed, self.signatures)

    def subject_device_id(self) -> str | None:
        return self.payload.device_id


class Cmd(Message):
    """A command for one device."""

    schema_: Literal["edgefleet.cmd/1"] = _schema_field("edgefleet.cmd/1")
    TOPIC = (Direction.DOWN, Kind.CMD)

    cmd_id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$", description="Correlates the result."
    )
    command: str = Field(
        pattern=r"^[a-z][a-z0-9_.-]{0,63}$", description="e.g. rebirth, benchmark."
    )
    args: dict[str, Any] = Field(default_factory=dict)
    ts: UnixTime
    reply_to: str | None = Field(
        default=None,
        description="Topic for the result; null: the MQTT 5 response topic, else up/result.",
    )


class CmdResult(DeviceMessage):
    """The outcome of a command."""

    schema_: Literal["edgefleet.cmd_result/1"] = _schema_field("edgefleet.cmd_result/1")
    TOPIC = (Direction.UP, Kind.RESULT)

    cmd_id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$", description="The command's cmd_id."
    )
    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    error: str | None = Field(default=None, description="Required when ok is false.")

    @model_validator(mode="after")
    def _error_when_failed(self) -> CmdResult:
        if not self.ok and not self.error:
            raise ValueError("error is required when ok is false")
        return self


class HubState(Message):
    """Hub online / offline (retained; offline is the hub's MQTT Will)."""

    schema_: Literal["edgefleet.hub_state/1"] = _schema_field("edgefleet.hub_state/1")
    TOPIC = (Direction.HUB, Kind.STATE)

    state: OnlineState
    hub_id: str = Field(
        pattern=DEVICE_ID_PATTERN,
        max_length=DEVICE_ID_MAX_LENGTH,
        description="Which hub process (several workers may share a fleet).",
    )
    ts: UnixTime


MESSAGE_TYPES: tuple[type[Message], ...] = (
    Birth,
    Status,
    Telemetry,
    State,
    Event,
    Desired,
    Cmd,
    CmdResult,
    HubState,
)
MESSAGES: dict[str, type[Message]] = {m.SHORT_NAME: m for m in MESSAGE_TYPES}
"""Message types by short name: birth, status, ..., cmd_result, hub_state."""
TOPIC_MESSAGES: dict[tuple[Direction, Kind], type[Message]] = {
    m.TOPIC: m for m in MESSAGE_TYPES if m.TOPIC is not None
}


def message_type(name: str) -> type[Message]:
    """A message type by short name (``telemetry``) or schema (``edgefleet.telemetry[/1]``)."""
    short = name.split("/", 1)[0].removeprefix("edgefleet.")
    try:
        return MESSAGES[short]
    except KeyError:
        raise ValueError(f"no message type {name!r}") from None


def message_for_topic(parsed: ParsedTopic) -> type[Message]:
    """The message type published on a topic."""
    return TOPIC_MESSAGES[(parsed.direction, parsed.kind)]


def topic_for(msg: Message, device_id: str | None = None) -> str:
    """The topic ``msg`` is published on; ``device_id`` is needed only for commands."""
    topic = type(msg).TOPIC
    if topic is None:
        raise ValueError(f"{type(msg).__name__} has no topic")
    direction, kind = topic
    if direction is Direction.HUB:
        return HUB_STATE_TOPIC
    return device_topic(device_id or msg.subject_device_id() or "", direction, kind)


def _parse_json(payload: bytes) -> Any:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageDecodeError(f"payload is not UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise MessageDecodeError(
            f"payload is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise MessageDecodeError("payload is nested too deeply") from None
    except ValueError as exc:
        raise MessageDecodeError(f"payload is not JSON: {str(exc)[:_SHOWN_CHARS]}") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(data):
        # An escaped lone surrogate parses, but no UTF-8 encoder (canonical JSON, encode,
        # the hub's store) can write it back: refuse it here, for every message type.
        raise MessageDecodeError("payload holds a lone UTF-16 surrogate escape (not Unicode)")
    return data


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string (key or value) in ``value`` holds an unpaired surrogate."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _too_deep(value: Any, limit: int) -> bool:
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):  # only containers add depth
                stack.append((child, depth + 1))
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _first_error(model: type[Message], exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "(message)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{model.SCHEMA}: {where}: {first['msg']}{more}"


@overload
def decode(kind: type[M], payload: bytes, *, max_bytes: int | None = None) -> M: ...
@overload
def decode(kind: str, payload: bytes, *, max_bytes: int | None = None) -> Message: ...
def decode(kind: type[Message] | str, payload: bytes, *, max_bytes: int | None = None) -> Message:
    """Decode ``payload`` as the message type ``kind`` (a class or a name for message_type).

    ``max_bytes`` defaults to the type's limit (256 KiB; 1 MiB for desired). Raises
    MessageTooLarge before parsing, MessageDecodeError for bad JSON, nesting deeper than
    MAX_DEPTH, a missing or foreign schema or a failed validation, UnsupportedSchemaVersion
    for an unknown major version.
    """
    model = message_type(kind) if isinstance(kind, str) else kind
    if not model.SCHEMA:
        raise ValueError(f"{model.__name__} is not a concrete message type")
    limit = model.MAX_BYTES if max_bytes is None else max_bytes
    if len(payload) > limit:
        raise MessageTooLarge(len(payload), limit)
    payload = bytes(payload)
    if model.JSON_FAST_PATH:
        msg = _decode_plain(model, payload)
        if msg is not None:
            return msg
    return _decode_checked(model, payload)


def _decode_plain(model: type[M], payload: bytes) -> M | None:
    """The common case in one pass of pydantic-core's JSON parser: a payload that cannot
    hold what ``_decode_checked`` refuses beyond validation (deep nesting, NaN or
    infinities, escapes that may be lone surrogates, a missing schema). None means "take
    the checked path", which also gives the precise error for anything invalid."""
    if (
        payload.count(b"{") + payload.count(b"[") > MAX_DEPTH
        or b"\\u" in payload
        or b"NaN" in payload
        or b"Infinity" in payload
    ):
        return None
    try:
        msg = model.model_validate_json(payload)
    except ValidationError:
        return None
    return msg if "schema_" in msg.model_fields_set else None


def _decode_checked(model: type[M], payload: bytes) -> M:
    data = _parse_json(payload)
    if not isinstance(data, dict):
        raise MessageDecodeError(f"{model.SCHEMA}: payload is not a JSON object")
    if _too_deep(data, MAX_DEPTH):
        raise MessageDecodeError(f"payload is nested more than {MAX_DEPTH} levels deep")
    schema = data.get("schema")
    if schema is None:
        raise MessageDecodeError(f"{model.SCHEMA}: missing 'schema' field")
    if not isinstance(schema, str):
        raise MessageDecodeError(f"{model.SCHEMA}: 'schema' is not a string")
    name, major = split_schema(schema)
    if name != model.SCHEMA_NAME:
        raise MessageDecodeError(f"expected schema {model.SCHEMA!r}, got {_show(schema)}")
    if major != model.SCHEMA_MAJOR:
        raise UnsupportedSchemaVersion(schema[:_SHOWN_CHARS], model.SCHEMA)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise MessageDecodeError(_first_error(model, exc)) from None


def decode_for_topic(
    parsed: ParsedTopic, payload: bytes, *, max_bytes: int | None = None
) -> Message:
    """Decode a payload received on ``parsed``; the device id in it must match the topic's."""
    msg = decode(message_for_topic(parsed), payload, max_bytes=max_bytes)
    claimed = msg.subject_device_id()
    if parsed.device_id is not None and claimed is not None and claimed != parsed.device_id:
        raise MessageDecodeError(
            f"{msg.SCHEMA}: device_id {claimed!r} does not match the topic's {parsed.device_id!r}"
        )
    return msg


def encode(msg: Message) -> bytes:
    """Compact JSON with wire names; MessageTooLarge if a peer would refuse its size."""
    data = msg.model_dump_json(by_alias=True).encode("utf-8")
    limit = type(msg).MAX_BYTES
    if len(data) > limit:
        raise MessageTooLarge(len(data), limit)
    return data

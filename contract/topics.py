"""The MQTT topic tree: builders, subscription filters and the one parser.

    edgefleet/v1/dev/{device_id}/up/{birth|status|telemetry|state|events|result}
    edgefleet/v1/dev/{device_id}/down/{desired|cmd}
    edgefleet/v1/hub/state

The device id comes first and the direction splits the tree, so two broker ACL patterns
(write ``.../dev/%u/up/#``, read ``.../dev/%u/down/#``) confine every device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from contract.errors import TopicError

ROOT = "edgefleet"
VERSION = "v1"
PREFIX = f"{ROOT}/{VERSION}"

DEVICE_ID_MAX_LENGTH = 64
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
_VERSION_LEVEL = re.compile(r"v[0-9]+")
_SHOWN_CHARS = 48
MAX_TOPIC_LENGTH = 256


class Direction(StrEnum):
    UP = "up"
    DOWN = "down"
    HUB = "hub"


class Kind(StrEnum):
    BIRTH = "birth"
    STATUS = "status"
    TELEMETRY = "telemetry"
    STATE = "state"
    EVENTS = "events"
    RESULT = "result"
    DESIRED = "desired"
    CMD = "cmd"


KINDS: dict[Direction, tuple[Kind, ...]] = {
    Direction.UP: (
        Kind.BIRTH,
        Kind.STATUS,
        Kind.TELEMETRY,
        Kind.STATE,
        Kind.EVENTS,
        Kind.RESULT,
    ),
    Direction.DOWN: (Kind.DESIRED, Kind.CMD),
    Direction.HUB: (Kind.STATE,),
}

HUB_STATE_TOPIC = f"{PREFIX}/hub/state"
DEVICE_UP_ALL = f"{PREFIX}/dev/+/up/#"
"""Everything every device sends: the hub's ingest subscription."""


@dataclass(frozen=True)
class TopicInfo:
    """How a topic is used: QoS levels (the first is the default), retain flag, purpose."""

    direction: Direction
    kind: Kind
    qos: tuple[int, ...]
    retained: bool
    purpose: str

    @property
    def pattern(self) -> str:
        if self.direction is Direction.HUB:
            return f"{PREFIX}/hub/{self.kind}"
        return f"{PREFIX}/dev/{{device_id}}/{self.direction}/{self.kind}"


TOPICS: tuple[TopicInfo, ...] = (
    TopicInfo(
        Direction.UP,
        Kind.BIRTH,
        (1,),
        False,
        "Sent on every connect: identity, agent version, hardware facts, chosen firmware "
        "profile, capabilities, model inventory, session.",
    ),
    TopicInfo(
        Direction.UP,
        Kind.STATUS,
        (1,),
        True,
        "online after connect; offline as the MQTT Will. Carries the session, so a late "
        "Will from an older session is ignored.",
    ),
    TopicInfo(
        Direction.UP,
        Kind.TELEMETRY,
        (0, 1),
        False,
        "Periodic system, agent, per-model and link health.",
    ),
    TopicInfo(
        Direction.UP,
        Kind.STATE,
        (1,),
        True,
        "Reported state: applied generation, phase, per-model readiness, last error.",
    ),
    TopicInfo(
        Direction.UP,
        Kind.EVENTS,
        (1,),
        False,
        "Discrete events: update started/failed/activated/rolled back, pressure, commands.",
    ),
    TopicInfo(
        Direction.UP,
        Kind.RESULT,
        (1,),
        False,
        "Command results, for peers without MQTT 5 response topics.",
    ),
    TopicInfo(
        Direction.DOWN,
        Kind.DESIRED,
        (1,),
        True,
        "Signed desired state: the full document, never a patch; generation only grows.",
    ),
    TopicInfo(
        Direction.DOWN,
        Kind.CMD,
        (1,),
        False,
        "Commands (rebirth, benchmark, ...); the result goes to the MQTT 5 response topic "
        "or to up/result.",
    ),
    TopicInfo(
        Direction.HUB,
        Kind.STATE,
        (1,),
        True,
        "Hub online / offline (offline is the hub's MQTT Will).",
    ),
)


_TOPIC_INFO = {(info.direction, info.kind): info for info in TOPICS}


def topic_info(direction: Direction | str, kind: Kind | str) -> TopicInfo:
    """The catalogue entry of a topic; TopicError when the pair is not in the tree."""
    return _TOPIC_INFO[_pair(direction, kind)]


@dataclass(frozen=True)
class ParsedTopic:
    """A topic of the tree. ``device_id`` is None only for hub topics."""

    device_id: str | None
    direction: Direction
    kind: Kind

    def __post_init__(self) -> None:
        direction, kind = _pair(self.direction, self.kind)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "kind", kind)
        if self.direction is Direction.HUB:
            if self.device_id is not None:
                raise TopicError("hub topics have no device id")
        else:
            validate_device_id(self.device_id or "")

    @property
    def topic(self) -> str:
        if self.direction is Direction.HUB:
            return f"{PREFIX}/hub/{self.kind}"
        return device_topic(self.device_id or "", self.direction, self.kind)

    @property
    def info(self) -> TopicInfo:
        return topic_info(self.direction, self.kind)


def _show(text: str) -> str:
    """A bounded, printable rendering of untrusted text for error messages."""
    if len(text) > _SHOWN_CHARS:
        return repr(text[:_SHOWN_CHARS]) + "..."
    return repr(text)


def device_id_problem(device_id: str) -> str | None:
    """Why ``device_id`` is not a safe device id, or None when it is."""
    if not device_id:
        return "device id is empty"
    if len(device_id) > DEVICE_ID_MAX_LENGTH:
        return f"device id is {len(device_id)} characters, at most {DEVICE_ID_MAX_LENGTH} allowed"
    for char, what in (("\x00", "NUL"), ("+", "'+'"), ("#", "'#'"), ("/", "'/'")):
        if char in device_id:
            return f"device id {_show(device_id)} contains {what}"
    if any(c.isspace() for c in device_id):
        return f"device id {_show(device_id)} contains white space"
    if _DEVICE_ID.fullmatch(device_id) is None:
        return f"device id {_show(device_id)} does not match [A-Za-z0-9][A-Za-z0-9._:-]*"
    return None


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is safe in a topic; raise TopicError naming why not."""
    problem = device_id_problem(device_id)
    if problem is not None:
        raise TopicError(problem)
    return device_id


def _pair(direction: Direction | str, kind: Kind | str) -> tuple[Direction, Kind]:
    try:
        d = Direction(direction)
    except ValueError:
        raise TopicError(f"unknown direction {_show(str(direction))}") from None
    try:
        k = Kind(kind)
    except ValueError:
        raise TopicError(f"unknown kind {_show(str(kind))}") from None
    if k not in KINDS[d]:
        allowed = ", ".join(KINDS[d])
        raise TopicError(f"{d.value} topics have no kind {k.value!r} (expected {allowed})")
    return d, k


def device_topic(device_id: str, direction: Direction | str, kind: Kind | str) -> str:
    """``edgefleet/v1/dev/{device_id}/{direction}/{kind}`` after checking every part."""
    d, k = _pair(direction, kind)
    if d is Direction.HUB:
        raise TopicError("hub topics have no device id")
    return f"{PREFIX}/dev/{validate_device_id(device_id)}/{d}/{k}"


def up_topic(device_id: str, kind: Kind | str) -> str:
    """A device-to-hub topic, e.g. ``up_topic("pi-1", Kind.TELEMETRY)``."""
    return device_topic(device_id, Direction.UP, kind)


def down_topic(device_id: str, kind: Kind | str) -> str:
    """A hub-to-device topic, e.g. ``down_topic("pi-1", Kind.DESIRED)``."""
    return device_topic(device_id, Direction.DOWN, kind)


def up_filter(kind: Kind | str | None = None) -> str:
    """Filter over all devices' up topics, or one kind of them."""
    if kind is None:
        return DEVICE_UP_ALL
    _, k = _pair(Direction.UP, kind)
    return f"{PREFIX}/dev/+/up/{k}"


def down_filter(device_id: str) -> str:
    """What one device subscribes to: everything the hub sends it."""
    return f"{PREFIX}/dev/{validate_device_id(device_id)}/down/#"


def shared_subscription(group: str, topic_filter: str = DEVICE_UP_ALL) -> str:
    """An MQTT 5 shared subscription ``$share/{group}/{filter}`` (hub workers share ingest)."""
    problem = device_id_problem(group)
    if problem is not None:
        raise TopicError(problem.replace("device id", "share group"))
    if not topic_filter or topic_filter.startswith("$share/") or "\x00" in topic_filter:
        raise TopicError(f"not a plain topic filter: {_show(topic_filter)}")
    return f"$share/{group}/{topic_filter}"


def parse_topic(topic: str) -> ParsedTopic:
    """Parse a topic of the tree; anything else raises TopicError with the reason."""
    if not topic:
        raise TopicError("empty topic")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise TopicError(f"topic is {len(topic)} characters, at most {MAX_TOPIC_LENGTH} allowed")
    if "\x00" in topic:
        raise TopicError(f"topic {_show(topic)} contains NUL")
    levels = topic.split("/")
    if levels[0] != ROOT:
        raise TopicError(f"topic {_show(topic)} does not start with {ROOT + '/'!r}")
    if len(levels) < 2 or levels[1] != VERSION:
        if len(levels) >= 2 and _VERSION_LEVEL.fullmatch(levels[1]):
            raise TopicError(f"topic {_show(topic)}: unsupported topic version {levels[1]!r}")
        raise TopicError(f"topic {_show(topic)}: expected version level {VERSION!r}")
    scope = levels[2] if len(levels) > 2 else ""
    if scope == "hub":
        if levels[3:] == ["state"]:
            return ParsedTopic(None, Direction.HUB, Kind.STATE)
        raise TopicError(f"topic {_show(topic)}: unknown hub topic")
    if scope != "dev":
        raise TopicError(f"topic {_show(topic)}: expected 'dev' or 'hub' after the version")
    if len(levels) < 6:
        raise TopicError(f"topic {_show(topic)}: too few levels for a device topic")
    if len(levels) > 6:
        raise TopicError(f"topic {_show(topic)}: extra levels after the kind")
    device_id, direction, kind = levels[3:6]
    problem = device_id_problem(device_id)
    if problem is not None:
        raise TopicError(f"topic {_show(topic)}: {problem}")
    if direction not in (Direction.UP, Direction.DOWN):
        raise TopicError(f"topic {_show(topic)}: direction {_show(direction)} is not up or down")
    d = Direction(direction)
    if kind not in KINDS[d]:
        raise TopicError(f"topic {_show(topic)}: unknown {d.value} kind {_show(kind)}")
    return ParsedTopic(device_id, d, Kind(kind))

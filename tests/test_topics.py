"""The topic tree: builders and the parser agree, and malformed topics are refused with a reason."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contract.errors import TopicError
from contract.topics import (
    DEVICE_UP_ALL,
    HUB_STATE_TOPIC,
    KINDS,
    TOPICS,
    Direction,
    Kind,
    ParsedTopic,
    device_topic,
    down_filter,
    down_topic,
    parse_topic,
    shared_subscription,
    topic_info,
    up_filter,
    up_topic,
    validate_device_id,
)

SAFE_FIRST = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
device_ids = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(SAFE_FIRST),
    st.text(alphabet=SAFE_FIRST + "._:-", max_size=63),
)
device_pairs = st.sampled_from([(d, k) for d in (Direction.UP, Direction.DOWN) for k in KINDS[d]])


def test_the_documented_tree() -> None:
    assert up_topic("pi-001", Kind.BIRTH) == "edgefleet/v1/dev/pi-001/up/birth"
    assert up_topic("pi-001", "result") == "edgefleet/v1/dev/pi-001/up/result"
    assert down_topic("pi-001", Kind.DESIRED) == "edgefleet/v1/dev/pi-001/down/desired"
    assert HUB_STATE_TOPIC == "edgefleet/v1/hub/state"
    assert {(i.direction, i.kind) for i in TOPICS} == {
        *((d, k) for d, kinds in KINDS.items() for k in kinds)
    }


@pytest.mark.parametrize(("direction", "kind"), [(d, k) for d, ks in KINDS.items() for k in ks])
def test_every_topic_round_trips(direction: Direction, kind: Kind) -> None:
    if direction is Direction.HUB:
        topic = HUB_STATE_TOPIC
        expected = ParsedTopic(None, direction, kind)
    else:
        topic = device_topic("gw.7:a_b-c", direction, kind)
        expected = ParsedTopic("gw.7:a_b-c", direction, kind)
    parsed = parse_topic(topic)
    assert parsed == expected
    assert parsed.topic == topic
    assert parsed.info is topic_info(direction, kind)


def test_retained_topics_are_the_documented_ones() -> None:
    retained = {(i.direction.value, i.kind.value) for i in TOPICS if i.retained}
    assert retained == {("up", "status"), ("up", "state"), ("down", "desired"), ("hub", "state")}
    assert topic_info("up", "telemetry").qos == (0, 1)


def test_filters() -> None:
    assert DEVICE_UP_ALL == "edgefleet/v1/dev/+/up/#"
    assert up_filter() == DEVICE_UP_ALL
    assert up_filter(Kind.TELEMETRY) == "edgefleet/v1/dev/+/up/telemetry"
    assert down_filter("pi-001") == "edgefleet/v1/dev/pi-001/down/#"
    assert shared_subscription("hub") == "$share/hub/edgefleet/v1/dev/+/up/#"
    assert shared_subscription("ingest", up_filter("state")) == (
        "$share/ingest/edgefleet/v1/dev/+/up/state"
    )


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (lambda: shared_subscription("a/b"), "share group 'a/b' contains '/'"),
        (lambda: shared_subscription("", DEVICE_UP_ALL), "share group is empty"),
        (lambda: shared_subscription("hub", "$share/x/y"), "not a plain topic filter"),
        (lambda: shared_subscription("hub", ""), "not a plain topic filter"),
        (lambda: up_filter("desired"), "up topics have no kind 'desired'"),
        (lambda: down_filter("a+b"), "contains '+'"),
        (lambda: up_topic("pi", "cmd"), "up topics have no kind 'cmd'"),
        (lambda: down_topic("pi", "birth"), "down topics have no kind 'birth'"),
        (lambda: up_topic("pi", "nope"), "unknown kind 'nope'"),
        (lambda: device_topic("pi", "sideways", "birth"), "unknown direction 'sideways'"),
        (lambda: device_topic("pi", "hub", "state"), "hub topics have no device id"),
        (lambda: ParsedTopic(None, Direction.UP, Kind.BIRTH), "device id is empty"),
        (lambda: ParsedTopic("pi", Direction.HUB, Kind.STATE), "hub topics have no device id"),
    ],
)
def test_builders_refuse(call: object, reason: str) -> None:
    assert callable(call)
    with pytest.raises(TopicError, match=reason.replace("+", r"\+").replace("$", r"\$")):
        call()


@pytest.mark.parametrize(
    ("device_id", "reason"),
    [
        ("", "device id is empty"),
        ("a" * 65, "device id is 65 characters, at most 64 allowed"),
        ("pi+1", "contains '\\+'"),
        ("pi#1", "contains '#'"),
        ("pi/1", "contains '/'"),
        ("pi\x001", "contains NUL"),
        ("pi 1", "contains white space"),
        ("pi\t1", "contains white space"),
        ("-pi", r"does not match \[A-Za-z0-9\]"),
        (".hidden", "does not match"),
        ("$SYS", "does not match"),
        ("pï", "does not match"),
        ("٣", "does not match"),
    ],
)
def test_unsafe_device_ids_are_refused(device_id: str, reason: str) -> None:
    with pytest.raises(TopicError, match=reason):
        validate_device_id(device_id)


def test_longest_device_id_is_accepted() -> None:
    longest = "a" * 64
    assert validate_device_id(longest) == longest
    assert parse_topic(up_topic(longest, "birth")).device_id == longest


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("", "empty topic"),
        ("x" * 300, "topic is 300 characters, at most 256 allowed"),
        ("edgefleet/v1/dev/pi\x00/up/birth", "contains NUL"),
        ("other/v1/dev/pi/up/birth", "does not start with 'edgefleet/'"),
        ("Edgefleet/v1/dev/pi/up/birth", "does not start with 'edgefleet/'"),
        ("/edgefleet/v1/dev/pi/up/birth", "does not start with 'edgefleet/'"),
        ("edgefleet", "expected version level 'v1'"),
        ("edgefleet/v2/dev/pi/up/birth", "unsupported topic version 'v2'"),
        ("edgefleet/V1/dev/pi/up/birth", "expected version level 'v1'"),
        ("edgefleet/v1", "expected 'dev' or 'hub' after the version"),
        ("edgefleet/v1/devices/pi/up/birth", "expected 'dev' or 'hub' after the version"),
        ("edgefleet/v1/hub/status", "unknown hub topic"),
        ("edgefleet/v1/hub/state/extra", "unknown hub topic"),
        ("edgefleet/v1/dev/pi/up", "too few levels"),
        ("edgefleet/v1/dev/pi/up/birth/extra", "extra levels after the kind"),
        ("edgefleet/v1/dev/pi/up/birth/", "extra levels after the kind"),
        ("edgefleet/v1/dev/+/up/birth", "device id '\\+' contains '\\+'"),
        ("edgefleet/v1/dev/#/up/birth", "contains '#'"),
        ("edgefleet/v1/dev//up/birth", "device id is empty"),
        ("edgefleet/v1/dev/" + "a" * 65 + "/up/birth", "at most 64 allowed"),
        ("edgefleet/v1/dev/pi 1/up/birth", "white space"),
        ("edgefleet/v1/dev/pi/sideways/birth", "direction 'sideways' is not up or down"),
        ("edgefleet/v1/dev/pi/up/desired", "unknown up kind 'desired'"),
        ("edgefleet/v1/dev/pi/down/birth", "unknown down kind 'birth'"),
        ("edgefleet/v1/dev/pi/up/Birth", "unknown up kind 'Birth'"),
        ("edgefleet/v1/dev/pi/up/+", "unknown up kind '\\+'"),
    ],
)
def test_malformed_topics_are_refused_with_a_reason(topic: str, reason: str) -> None:
    with pytest.raises(TopicError, match=reason):
        parse_topic(topic)


def test_reasons_do_not_echo_huge_input() -> None:
    with pytest.raises(TopicError) as caught:
        parse_topic("edgefleet/v1/dev/" + "a" * 200 + "/up/birth")
    assert len(str(caught.value)) < 200


@given(device_ids, device_pairs)
def test_build_then_parse_round_trips(device_id: str, pair: tuple[Direction, Kind]) -> None:
    direction, kind = pair
    topic = device_topic(device_id, direction, kind)
    assert parse_topic(topic) == ParsedTopic(device_id, direction, kind)
    assert parse_topic(topic).topic == topic


@given(st.text(max_size=300))
def test_parse_raises_only_topic_errors_on_any_text(topic: str) -> None:
    try:
        parsed = parse_topic(topic)
    except TopicError:
        return
    assert parsed.topic == topic


@given(
    st.lists(
        st.sampled_from(["edgefleet", "v1", "dev", "hub", "up", "down", "state", "birth", "pi"])
        | st.text(max_size=5),
        max_size=8,
    )
)
def test_parse_raises_only_topic_errors_on_near_misses(levels: list[str]) -> None:
    topic = "/".join(levels)
    try:
        parsed = parse_topic(topic)
    except TopicError:
        return
    assert parsed.topic == topic

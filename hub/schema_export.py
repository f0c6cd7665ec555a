"""JSON Schemas of the wire messages, and the topic and message reference generated from them."""

from __future__ import annotations

import inspect
import json
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from contract.errors import EdgefleetError
from contract.messages import (
    DEFAULT_MAX_BYTES,
    DESIRED_MAX_BYTES,
    MESSAGE_TYPES,
    TOPIC_MESSAGES,
    Message,
)
from contract.topics import (
    DEVICE_ID_MAX_LENGTH,
    DEVICE_UP_ALL,
    TOPICS,
    Direction,
    down_filter,
    shared_subscription,
)

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
REFERENCE_PATH = "docs/reference/messages.md"
REFERENCE_COMMAND = f"edgefleet-hub schema reference > {REFERENCE_PATH}"

_DIRECTIONS = {
    Direction.UP: "device to hub",
    Direction.DOWN: "hub to device",
    Direction.HUB: "hub to all",
}
_CONSTRAINTS = (
    ("ge", ">= {}"),
    ("gt", "> {}"),
    ("le", "<= {}"),
    ("lt", "< {}"),
    ("min_length", "min length {}"),
    ("max_length", "max length {}"),
    ("pattern", "pattern `{}`"),
)
_SCALARS: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
    Any: "any",
}


class SchemaExportError(EdgefleetError):
    """The schemas could not be written."""


def schema_filename(model: type[Message]) -> str:
    """``edgefleet.birth.v1.schema.json`` for ``edgefleet.birth/1``."""
    return f"{model.SCHEMA_NAME}.v{model.SCHEMA_MAJOR}.schema.json"


def message_schema(model: type[Message]) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one message, with wire names."""
    return {"$schema": JSON_SCHEMA_DIALECT, **model.model_json_schema(by_alias=True)}


def render_schema(model: type[Message]) -> str:
    """The schema file's text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(message_schema(model), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def schema_files() -> dict[str, str]:
    """File name -> text for every message, in a fixed order."""
    return {schema_filename(m): render_schema(m) for m in MESSAGE_TYPES}


def export_schemas(directory: Path) -> list[Path]:
    """Write one JSON Schema file per message into ``directory`` (created if missing)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name, text in schema_files().items():
            path = directory / name
            path.write_text(text, encoding="utf-8")
            written.append(path)
    except OSError as exc:
        raise SchemaExportError(
            f"cannot write schemas to {directory}: {exc.strerror or exc}"
        ) from exc
    return written


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _doc(obj: type[Any]) -> str:
    doc = obj.__doc__
    if not doc:
        return ""
    return inspect.cleandoc(doc).split("\n\n", 1)[0].replace("\n", " ")


def _constraints(metadata: Iterable[Any]) -> list[str]:
    found: list[str] = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            found.extend(_constraints(item.metadata))
            continue
        for attr, template in _CONSTRAINTS:
            value = getattr(item, attr, None)
            if value is not None:
                found.append(template.format(value))
    return found


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _type_text(annotation: Any, parts: list[type[BaseModel]]) -> str:
    """Readable JSON type of ``annotation``; models it mentions are appended to ``parts``."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Annotated:
        base = _type_text(args[0], parts)
        extra = _constraints(args[1:])
        return f"{base} ({', '.join(extra)})" if extra else base
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_text(a, parts) for a in args)
    if origin is list:
        return f"array of {_type_text(args[0], parts)}"
    if origin is dict:
        return f"object of {_type_text(args[0], parts)} to {_type_text(args[1], parts)}"
    if _is_model(annotation):
        if annotation not in parts:
            parts.append(annotation)
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    return getattr(annotation, "__name__", str(annotation))


def _default_text(model: type[BaseModel], field: FieldInfo) -> str:
    if field.is_required() or (issubclass(model, Message) and field.alias == "schema"):
        return "required"
    if field.default is PydanticUndefined:
        value = field.get_default(call_default_factory=True)
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "all defaults"
    return f"`{json.dumps(to_jsonable_python(value))}`"


def _field_table(model: type[BaseModel], parts: list[type[BaseModel]]) -> list[str]:
    lines = ["| Field | Type | Default | Description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        type_text = _type_text(field.annotation, parts)
        extra = _constraints(field.metadata)
        if extra:
            type_text += f" ({', '.join(extra)})"
        cells = (
            f"`{field.alias or name}`",
            type_text,
            _default_text(model, field),
            field.description or "",
        )
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    extra_fields = model.model_config.get("extra")
    if extra_fields == "allow":
        lines += ["", "Unknown fields are kept."]
    elif extra_fields == "forbid":
        lines += ["", "Unknown fields are refused."]
    return lines


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n % 2**20 == 0 else f"{n // 2**10} KiB"


def _topic_table() -> list[str]:
    lines = [
        "| Topic | Direction | QoS | Retained | Schema | Purpose |",
        "|---|---|---|---|---|---|",
    ]
    for info in TOPICS:
        model = TOPIC_MESSAGES[(info.direction, info.kind)]
        cells = (
            f"`{info.pattern}`",
            _DIRECTIONS[info.direction],
            "/".join(str(q) for q in info.qos),
            "yes" if info.retained else "no",
            f"`{model.SCHEMA}`",
            info.purpose,
        )
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def render_reference() -> str:
    """The Markdown topic and message reference, generated from the contract's models."""
    parts: list[type[BaseModel]] = []
    lines = [
        "# Topic and message reference",
        "",
        "<!-- Generated from contract/topics.py and contract/messages.py; do not edit by hand.",
        f"     Regenerate: {REFERENCE_COMMAND}",
        "     (without the console script: python -m hub.cli schema reference).",
        "     tests/test_schema_export.py fails when this file differs from the generated",
        "     text. -->",
        "",
        "Every payload is a UTF-8 JSON object whose `schema` field names the message and its",
        "major version, e.g. `edgefleet.telemetry/1`. Receivers keep fields they do not know",
        "and refuse a major version they do not know. A payload is refused before parsing when",
        f"it is larger than {_size(DEFAULT_MAX_BYTES)} ({_size(DESIRED_MAX_BYTES)} for the",
        "desired state). `edgefleet-hub schema export DIR` writes the JSON Schema of every",
        "message.",
        "",
        "## Topics",
        "",
        *_topic_table(),
        "",
        "A device id matches `[A-Za-z0-9][A-Za-z0-9._:-]*` and has at most",
        f"{DEVICE_ID_MAX_LENGTH} characters, so it never contains `+`, `#`, `/`, NUL or white",
        "space.",
        "",
        "Subscriptions:",
        "",
        f"- hub ingest: `{DEVICE_UP_ALL}`; shared between hub workers:",
        f"  `{shared_subscription('hub')}`",
        f"- one device: `{down_filter('DEVICE')}` (with its own id)",
        "- broker ACL per device (user name = device id): write",
        "  `edgefleet/v1/dev/%u/up/#`, read `edgefleet/v1/dev/%u/down/#`",
        "",
        "## Messages",
    ]
    for model in MESSAGE_TYPES:
        topic = model.TOPIC
        assert topic is not None
        info = next(i for i in TOPICS if (i.direction, i.kind) == topic)
        lines += [
            "",
            f"### {model.SCHEMA}",
            "",
            f"{_doc(model)} Topic: `{info.pattern}`.",
            "",
            *_field_table(model, parts),
        ]
    lines += ["", "## Parts", "", "Objects nested in the messages above."]
    index = 0
    while index < len(parts):
        part = parts[index]
        index += 1
        lines += ["", f"### {part.__name__}", ""]
        doc = _doc(part)
        if doc:
            lines += [doc, ""]
        lines += _field_table(part, parts)
    return "\n".join(lines) + "\n"

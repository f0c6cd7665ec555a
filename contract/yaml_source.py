"""Operator-authored YAML to validated models, every failure one line: file, line, field, why.

The caller reads the file and passes its text; nothing here touches the file system.
"""

from __future__ import annotations

import difflib
import re
import types
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from contract.errors import ManifestError
from contract.manifests import (
    NAME_PATTERN,
    SHA256_PATTERN,
    VERSION_PATTERN,
    ModelSet,
    Policy,
)
from contract.profile import FirmwareProfile
from contract.validation import EntryError, Loc

M = TypeVar("M", bound=BaseModel)

SYNTAX_FIELD = "(yaml)"
DOCUMENT_FIELD = "(document)"
MAX_EXPANDED_VALUES = 100_000
"""Refuse documents whose aliases expand past this many values (a "billion laughs")."""

_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")

_PATTERN_MEANINGS = {
    NAME_PATTERN: "a name of lowercase letters, digits, '.', '_' or '-' "
    "(at most 64, starting with a letter or digit)",
    VERSION_PATTERN: "a version of letters, digits, '.', '+', '_' or '-' (at most 64)",
    SHA256_PATTERN: "a sha256 of 64 lowercase hex digits",
}

_TYPE_EXPECTATIONS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "set_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dataclass_type": "a mapping",
}


def load_document(text: str, source: str, model: type[M], *, strict: bool = True) -> M:
    """Parse YAML ``text`` into ``model``; any failure raises one ``ManifestError``.

    ``source`` names the text in errors (usually its path). Duplicate keys are refused.
    With ``strict`` (the default) values are not coerced: ``"5"`` is not an integer and
    ``1.0`` is not a string.
    """
    root, data = _parse(text, source)
    if not isinstance(data, dict):
        line = None if root is None else _line(root)
        got = _describe(data)
        raise ManifestError(source, line, DOCUMENT_FIELD, f"expected a mapping of keys, got {got}")
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as exc:
        raise _first_error(exc, root, source, model) from exc


def load_model_set(text: str, source: str) -> ModelSet:
    """A model set (``edgefleet.modelset/1``) from YAML text."""
    return load_document(text, source, ModelSet)


def load_policy(text: str, source: str) -> Policy:
    """A policy (``edgefleet.policy/1``) from YAML text."""
    return load_document(text, source, Policy)


def load_profile(text: str, source: str) -> FirmwareProfile:
    """A firmware profile (``edgefleet.profile/1``) from YAML text."""
    return load_document(text, source, FirmwareProfile)


def format_field(loc: Loc) -> str:
    """A location as an operator reads it: ``models[1].variants[0].artifact.sha256``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text or DOCUMENT_FIELD


def _parse(text: str, source: str) -> tuple[yaml.Node | None, object]:
    """The node tree (for lines) and the data, refusing duplicate keys before PyYAML drops one."""
    try:
        loader = yaml.SafeLoader(text)  # checks every character first
    except yaml.reader.ReaderError as exc:
        at_line = text.count("\n", 0, exc.position) + 1
        expected = f"invalid YAML: character #x{exc.character:04x} is not allowed"
        raise ManifestError(source, at_line, SYNTAX_FIELD, expected) from exc
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        _refuse_duplicate_keys(root, source)
        _refuse_alias_bombs(root, source)
        return root, loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else mark.line + 1
        problem = exc.problem or exc.context or "unreadable"
        if "<block" in problem:
            problem += " (check the indentation)"
        raise ManifestError(source, line, SYNTAX_FIELD, f"invalid YAML: {problem}") from exc
    except yaml.YAMLError as exc:
        raise ManifestError(source, None, SYNTAX_FIELD, f"invalid YAML: {exc}") from exc
    except (ValueError, OverflowError) as exc:
        # A scalar its tag cannot hold: "2001-02-30", "!!int 0x", an int of 5000 digits.
        raise ManifestError(source, None, SYNTAX_FIELD, f"invalid YAML value: {exc}") from exc
    except RecursionError as exc:
        raise ManifestError(source, None, SYNTAX_FIELD, "invalid YAML: nested too deeply") from exc
    finally:
        loader.dispose()


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _refuse_duplicate_keys(root: yaml.Node, source: str) -> None:
    """PyYAML keeps the last of two equal keys; an operator meant one of them, so refuse.

    Runs on the composed tree, before construction folds merge keys (``<<``) into it.
    """
    seen_nodes: set[int] = set()
    pending: list[tuple[yaml.Node, Loc]] = [(root, ())]
    while pending:
        node, loc = pending.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                    key = (key_node.tag, key_node.value)
                    if key in first_line:
                        raise ManifestError(
                            source,
                            _line(key_node),
                            format_field((*loc, key_node.value)),
                            f"duplicate key; first at line {first_line[key]}",
                        )
                    first_line[key] = _line(key_node)
                    pending.append((value_node, (*loc, key_node.value)))
                else:
                    pending.append((value_node, loc))
        elif isinstance(node, yaml.SequenceNode):
            pending.extend((item, (*loc, index)) for index, item in enumerate(node.value))


def _refuse_alias_bombs(root: yaml.Node, source: str) -> None:
    """Refuse aliases that refer to themselves or expand past ``MAX_EXPANDED_VALUES``."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def expanded(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise ManifestError(source, _line(node), DOCUMENT_FIELD, "an alias refers to itself")
        open_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            size = 1 + sum(expanded(key) + expanded(value) for key, value in node.value)
        elif isinstance(node, yaml.SequenceNode):
            size = 1 + sum(expanded(item) for item in node.value)
        else:
            size = 1
        open_nodes.discard(id(node))
        if size > MAX_EXPANDED_VALUES:
            raise ManifestError(
                source,
                _line(node),
                DOCUMENT_FIELD,
                f"aliases expand to more than {MAX_EXPANDED_VALUES} values",
            )
        sizes[id(node)] = size
        return size

    expanded(root)


def _child(node: yaml.Node, part: str | int) -> tuple[yaml.Node, int] | None:
    """The node under ``part`` and the line that names it (a key's line, an item's line).

    Construction has folded merged keys into the mapping ahead of its own keys, so the
    last key that matches is the one whose value counts.
    """
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
        if 0 <= part < len(node.value):
            item: yaml.Node = node.value[part]
            return item, _line(item)
        return None
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in reversed(node.value):
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                return value_node, _line(key_node)
    return None


def _locate(root: yaml.Node | None, loc: Loc) -> int | None:
    """The line of the deepest part of ``loc`` that the document has."""
    if root is None:
        return None
    node, line = root, _line(root)
    for part in loc:
        found = _child(node, part)
        if found is None:
            break
        node, line = found
    return line


def _first_error(
    exc: ValidationError, root: yaml.Node | None, source: str, model: type[BaseModel]
) -> ManifestError:
    """The one error to show: unknown keys first (a typo also makes a field "missing"),
    missing fields last, the rest from the top of the file down."""
    errors = exc.errors()
    rank = {"extra_forbidden": 0, "missing": 2}

    def sort_key(order: int) -> tuple[int, int, int]:
        error = errors[order]
        line = _locate(root, _error_loc(error))
        return (rank.get(error["type"], 1), line if line is not None else 0, order)

    first = min(range(len(errors)), key=sort_key)
    return _to_manifest_error(errors[first], root, source, model)


def _error_loc(error: ErrorDetails) -> Loc:
    loc: Loc = tuple(part for part in error["loc"] if part != "[key]")
    problem = error.get("ctx", {}).get("error")
    if isinstance(problem, EntryError):
        loc = (*loc, *problem.at)
    return loc


def _to_manifest_error(
    error: ErrorDetails, root: yaml.Node | None, source: str, model: type[BaseModel]
) -> ManifestError:
    loc = _error_loc(error)
    line = _locate(root, loc)
    expected = _expectation(error, model)
    problem = error.get("ctx", {}).get("error")
    if isinstance(problem, EntryError) and problem.first is not None:
        first_loc = tuple(error["loc"]) + problem.first
        first_line = _locate(root, first_loc)
        where = f"line {first_line}" if first_line is not None else format_field(first_loc)
        expected = f"{expected}; first at {where}"
    return ManifestError(source, line, format_field(loc), expected)


def _expectation(error: ErrorDetails, model: type[BaseModel]) -> str:
    kind = error["type"]
    ctx: dict[str, Any] = dict(error.get("ctx", {}))
    got = _describe(error["input"])
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, tuple(error["loc"])[:-1])
        if not allowed:
            return "unknown key"
        guess = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1)
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        return f"unknown key{hint}; expected one of: {', '.join(allowed)}"
    if tuple(error["loc"])[-1:] == ("[key]",):
        return f"expected a string key, got {got}"
    if kind == "value_error":
        problem = ctx.get("error")
        if isinstance(problem, EntryError):
            return problem.expected
        return str(problem) if problem is not None else error["msg"]
    if kind in _TYPE_EXPECTATIONS:
        expected = f"expected {_TYPE_EXPECTATIONS[kind]}, got {got}"
        if kind == "string_type" and isinstance(error["input"], int | float | bool):
            expected += " (put it in quotes)"
        return expected
    if kind == "literal_error":
        choices = str(ctx["expected"])
        one_of = "one of " if " or " in choices else ""
        return f"expected {one_of}{choices}, got {got}"
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", ""))
        meaning = _PATTERN_MEANINGS.get(pattern, f"text matching {pattern}")
        return f"expected {meaning}, got {got}"
    bounds = {
        "greater_than": "a number greater than {gt}",
        "greater_than_equal": "a number of at least {ge}",
        "less_than": "a number below {lt}",
        "less_than_equal": "a number of at most {le}",
        "too_short": "at least {min_length} item(s)",
        "too_long": "at most {max_length} item(s)",
        "string_too_short": "at least {min_length} character(s)",
        "string_too_long": "at most {max_length} character(s)",
    }
    if kind in bounds:
        return f"expected {bounds[kind].format(**ctx)}, got {got}"
    message = error["msg"]
    return message[:1].lower() + message[1:]


def _describe(value: object) -> str:
    """A value as the operator wrote it, short."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)}" if value else "an empty list"
    if isinstance(value, str) and len(value) > 36:
        return repr(value[:36] + "...")
    return repr(value)


def _allowed_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    """The keys the mapping at ``loc`` accepts, as the operator writes them."""
    target: object = model
    for part in loc:
        target = _step(target, part)
        if target is None:
            return []
    target = _unwrap(target)
    if isinstance(target, type) and issubclass(target, BaseModel):
        return [info.alias or name for name, info in target.model_fields.items()]
    return []


def _step(annotation: object, part: str | int) -> object:
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, info in annotation.model_fields.items():
            if part in (name, info.alias):
                return info.annotation
        return None
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin in (list, tuple, set, frozenset) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _unwrap(annotation: object) -> object:
    """Strip ``Annotated`` and ``X | None`` down to the one type that validates a value."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation

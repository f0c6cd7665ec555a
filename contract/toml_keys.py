"""How configuration errors name a TOML key and show the value found there."""

from __future__ import annotations

import json
import re

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_SHOWN_CHARS = 40


def toml_key(name: str) -> str:
    """``name`` as a TOML key: bare when it can be, quoted otherwise."""
    return name if _BARE_KEY.match(name) else json.dumps(name)


def dotted_key(loc: tuple[str | int, ...]) -> str:
    """A location as written in TOML: ``trust.hub_public_keys[0].keyid``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = toml_key(part)
            text += f".{name}" if text else name
    return text or "(document)"


def describe_value(value: object) -> str:
    """A short description of a value found in a file, for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."

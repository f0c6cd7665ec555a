"""Canonical JSON: the exact bytes that are signed and verified.

Keys sorted, no insignificant white space, UTF-8, integers as integers, floats in Python's
shortest round-trip form; NaN and infinities are refused. A document that went through
``json.loads`` and back gives the same bytes, so a verifier needs only the parsed payload.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """Encode ``value`` canonically; raise ValueError for NaN/Inf or non-JSON types."""
    return json.dumps(
        value,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8")

"""Validator helpers that point at the exact entry at fault, not only at the field holding it."""

from __future__ import annotations

from collections.abc import Iterable

Loc = tuple[str | int, ...]


class EntryError(ValueError):
    """A validator's complaint about the entry at ``at``, relative to the field it validates.

    Pydantic keeps the exception in the error's context, so a YAML loader can extend the
    field's location with ``at`` (and ``first``, an earlier entry it conflicts with) and
    name the exact line.
    """

    def __init__(self, expected: str, at: Loc = (), first: Loc | None = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.at = at
        self.first = first


def refuse_duplicates(keys: Iterable[str], what: str, suffix: Loc = ()) -> None:
    """Raise ``EntryError`` at the second occurrence of any key in ``keys``.

    ``suffix`` is appended to an entry's index to name the part holding the key, for
    example ``("name",)`` for a list of mappings identified by their name.
    """
    first_index: dict[str, int] = {}
    for index, key in enumerate(keys):
        if key in first_index:
            raise EntryError(
                f"duplicate {what} {key!r}",
                at=(index, *suffix),
                first=(first_index[key], *suffix),
            )
        first_index[key] = index

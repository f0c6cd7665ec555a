"""Pydantic bases: strict for what operators author, lenient for what crosses the wire."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ManifestModel(BaseModel):
    """An operator-authored document: unknown keys are mistakes, so they are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class WireModel(BaseModel):
    """A message on the wire: unknown fields from newer peers are kept, not refused."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

"""Building, signing and re-signing each device's desired-state document. Pure: no clock.

Generations (docs/decisions/0007-layered-policies.md):

- The *content* of a document is what affects the device: ``model_set``, ``models``,
  ``runtime``, ``artifact_base_urls``, ``trusted_keys``, ``rollout``. Its hash
  (``content_hash``) is kept beside the generation, so the controller compares hashes,
  never documents.
- A new document (``publish``) gets generation previous + 1 only when the content hash
  changed. Equal content is ``unchanged``: nothing is published.
- Documents expire (``validity_s``). When equal content is within ``resign_before_s`` of
  expiry it is re-signed (``resign``): new ``issued_at``/``expires_at`` and generation
  previous + 1 too, because the agent refuses an equal generation. ``content_changed`` is
  False then: an agent that compares the content hash with its active generation's
  records the new generation and reloads nothing.
- A device that rolled back from the current content is not sent it again under a new
  generation (``hold``): re-signing would make it retry the content it rejected.
- No policy applies (``unassigned``): nothing is published or re-signed; the device keeps
  its last applied generation. The contract has no "run nothing" document.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contract.canonical import canonical_json
from contract.manifests import ModelSetRef, ModelSpec, RuntimePolicy
from contract.messages import Desired, DesiredState
from contract.signing import PublicKey, SigningKey
from hub.resolve import Resolution

CONTENT_FIELDS = ("model_set", "models", "runtime", "artifact_base_urls", "trusted_keys", "rollout")
"""The fields of a desired state that affect the device, in the order they are hashed."""

_CONTENT_DEFAULTS: dict[str, Any] = {"artifact_base_urls": [], "trusted_keys": [], "rollout": None}

DEFAULT_VALIDITY_S = 7 * 24 * 3600.0
"""How long a signed document is valid: a device offline for longer needs a re-signed one."""
DEFAULT_RESIGN_BEFORE_S = 2 * 24 * 3600.0
"""Re-sign a document when it has less than this left."""

DecisionKind = Literal["publish", "resign", "unchanged", "hold", "unassigned"]


class DesiredContent(BaseModel):
    """The part of a desired state that affects the device (no id, generation or times)."""

    model_config = ConfigDict(frozen=True)

    model_set: ModelSetRef
    models: list[ModelSpec]
    runtime: RuntimePolicy
    artifact_base_urls: list[str] = Field(default_factory=list)
    trusted_keys: list[PublicKey] = Field(default_factory=list)
    rollout: str | None = None


@dataclass(frozen=True)
class PreviousDesired:
    """What the hub stored of the last document it published to a device."""

    generation: int
    expires_at: float
    content_hash: str
    rolled_back: bool = False
    """The device reported rolling back from this document's content."""

    @classmethod
    def of(cls, document: Desired | DesiredState, *, rolled_back: bool = False) -> PreviousDesired:
        """The record of a document as published."""
        state = document.payload if isinstance(document, Desired) else document
        return cls(
            generation=state.generation,
            expires_at=state.expires_at,
            content_hash=content_hash(state),
            rolled_back=rolled_back,
        )


@dataclass(frozen=True)
class Decision:
    """What to do for one device; ``document`` is set for ``publish`` and ``resign``."""

    kind: DecisionKind
    reason: str
    content_changed: bool
    """Whether the content differs from the previous document's (True for the first)."""
    content_hash: str | None
    """Hash of the resolved content; None when ``unassigned``."""
    generation: int | None
    """The new document's generation, else the previous one's (None if there is none)."""
    document: Desired | None = None

    @property
    def publishes(self) -> bool:
        return self.document is not None


def desired_content(
    resolution: Resolution,
    *,
    base_urls: Sequence[str],
    trusted_keys: Sequence[PublicKey],
    rollout: str | None = None,
) -> DesiredContent:
    """The content a non-empty resolution gives; ValueError for an empty one."""
    if resolution.empty or resolution.runtime is None or resolution.model_set is None:
        raise ValueError(f"device {resolution.device_id}: no policy applies, so no content")
    return DesiredContent(
        model_set=resolution.model_set,
        models=list(resolution.models),
        runtime=resolution.runtime,
        artifact_base_urls=list(base_urls),
        trusted_keys=list(trusted_keys),
        rollout=rollout,
    )


def content_hash(value: DesiredContent | DesiredState | Mapping[str, Any]) -> str:
    """Hex sha256 of the canonical JSON of the ``CONTENT_FIELDS`` of ``value``.

    ``value`` may be content, a desired state, or its JSON form (a signed payload as
    received; its other fields are ignored, absent optional ones count as their defaults).
    """
    if isinstance(value, DesiredContent | DesiredState):
        data = value.model_dump(mode="json", by_alias=True, include=set(CONTENT_FIELDS))
    else:
        missing = [name for name in CONTENT_FIELDS if name not in value]
        required = [name for name in missing if name not in _CONTENT_DEFAULTS]
        if required:
            raise ValueError(f"not a desired-state payload: missing {', '.join(required)}")
        data = {name: value.get(name, _CONTENT_DEFAULTS.get(name)) for name in CONTENT_FIELDS}
    return hashlib.sha256(canonical_json(data)).hexdigest()


class ContentHashes:
    """``content_hash`` remembered for contents built from the same objects.

    Within one reconcile every device that resolves to the same model set gets the very
    same ``ModelSpec`` and ``RuntimePolicy`` objects, so their contents are equal when those
    objects and the few plain fields are: one hash serves them all. Keep an instance for
    one reconcile only; it holds the contents it hashed, so no object id is reused meanwhile.
    """

    def __init__(self) -> None:
        self._known: dict[tuple[object, ...], tuple[str, DesiredContent]] = {}

    def __call__(self, content: DesiredContent) -> str:
        key = (
            tuple(map(id, content.models)),
            id(content.runtime),
            content.model_set.name,
            content.model_set.version,
            tuple(content.artifact_base_urls),
            tuple((k.keyid, k.public_key) for k in content.trusted_keys),
            content.rollout,
        )
        known = self._known.get(key)
        if known is None:
            known = self._known[key] = (content_hash(content), content)
        return known[0]


def due_for_resign(previous: PreviousDesired, now: float, resign_before_s: float) -> bool:
    """Whether ``previous`` expires within ``resign_before_s`` of ``now`` (or has expired)."""
    return previous.expires_at - now <= resign_before_s


def next_document(
    previous: PreviousDesired | None,
    resolution: Resolution,
    *,
    device_id: str,
    now: float,
    validity_s: float,
    resign_before_s: float,
    keys: Sequence[SigningKey],
    trusted_keys: Sequence[PublicKey],
    base_urls: Sequence[str],
    rollout: str | None = None,
    device_generation: int = 0,
    hashes: Callable[[DesiredContent], str] = content_hash,
) -> Decision:
    """Decide whether ``device_id`` needs a new document, and build and sign it if so.

    ``previous`` is the last document the hub published to the device (kept even while no
    policy applies), None if there never was one. ``device_generation`` is the newest
    generation the device reports having received; when it is above ``previous`` (a hub
    restored from an old backup) the document is published above it, or the device would
    refuse it as stale. Every key in ``keys`` signs. A non-empty ``trusted_keys`` replaces
    the device's trusted keys, so it must include a signing key. ``hashes`` computes the
    content hash (a ``ContentHashes`` shares it between devices). Raises ValueError for
    inconsistent arguments.
    """
    _check_arguments(
        resolution,
        device_id=device_id,
        validity_s=validity_s,
        resign_before_s=resign_before_s,
        keys=keys,
        trusted_keys=trusted_keys,
    )
    known = previous.generation if previous is not None else 0
    if resolution.empty:
        return Decision(
            kind="unassigned",
            reason="no policy applies to this device; nothing is published",
            content_changed=False,
            content_hash=None,
            generation=previous.generation if previous is not None else None,
        )
    content = desired_content(
        resolution, base_urls=base_urls, trusted_keys=trusted_keys, rollout=rollout
    )
    digest = hashes(content)

    def build(kind: DecisionKind, reason: str, changed: bool) -> Decision:
        generation = max(known, device_generation) + 1
        state = DesiredState(
            device_id=device_id,
            generation=generation,
            issued_at=now,
            expires_at=now + validity_s,
            model_set=content.model_set,
            models=content.models,
            runtime=content.runtime,
            artifact_base_urls=content.artifact_base_urls,
            trusted_keys=content.trusted_keys,
            rollout=content.rollout,
        )
        return Decision(kind, reason, changed, digest, generation, Desired.sign(state, *keys))

    if previous is None:
        return build("publish", "first document for this device", True)
    changed = digest != previous.content_hash
    if device_generation > previous.generation:
        return build(
            "publish",
            f"the device has seen generation {device_generation}, newer than the hub's "
            f"{previous.generation}",
            changed,
        )
    if changed:
        return build("publish", "content changed", True)
    if previous.rolled_back:
        return Decision(
            "hold",
            f"the device rolled back from this content (generation {previous.generation}); "
            "not re-sent until the content changes",
            False,
            digest,
            previous.generation,
        )
    if due_for_resign(previous, now, resign_before_s):
        left = previous.expires_at - now
        when = f"expires in {left:.0f}s" if left > 0 else f"expired {-left:.0f}s ago"
        return build("resign", f"content unchanged; generation {previous.generation} {when}", False)
    return Decision("unchanged", "content unchanged", False, digest, previous.generation)


def _check_arguments(
    resolution: Resolution,
    *,
    device_id: str,
    validity_s: float,
    resign_before_s: float,
    keys: Sequence[SigningKey],
    trusted_keys: Sequence[PublicKey],
) -> None:
    if resolution.device_id != device_id:
        raise ValueError(f"resolution is for device {resolution.device_id}, not {device_id}")
    if not validity_s > 0:
        raise ValueError(f"validity_s must be positive, not {validity_s}")
    if not 0 <= resign_before_s < validity_s:
        raise ValueError(
            f"resign_before_s must be at least 0 and below validity_s ({validity_s}), "
            f"not {resign_before_s}: every document would be due at once"
        )
    if not keys:
        raise ValueError("at least one signing key is needed")
    trusted = {key.keyid for key in trusted_keys}
    if trusted and not trusted & {key.keyid for key in keys}:
        raise ValueError(
            "trusted_keys replaces the device's keys but names none of the signing keys: "
            "the device would refuse every later document"
        )

"""Rules for accepting a desired-state document. Pure: the driver passes time and state in."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from contract.errors import MissingSignature, TrustError, UnknownKey, WireError
from contract.messages import Desired, DesiredState, decode
from contract.signing import PublicKey, TrustedKeys


class RefusalCode(StrEnum):
    MALFORMED = "malformed"
    MISSING_SIGNATURE = "missing_signature"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    WRONG_DEVICE = "wrong_device"
    STALE_GENERATION = "stale_generation"
    EXPIRED = "expired"
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class Refusal:
    code: RefusalCode
    message: str
    generation: int | None = None


@dataclass(frozen=True)
class Accepted:
    state: DesiredState
    signed_payload: dict[str, object]
    keyid: str


def judge_desired(
    payload: bytes,
    *,
    device_id: str,
    trusted: TrustedKeys,
    last_generation: int,
    refused_generations: Iterable[int],
    now: float,
) -> Accepted | Refusal:
    """Accept a signed desired-state document, or say why not.

    A document is accepted only when it parses, carries a valid signature from a trusted
    key, names this device, has a generation strictly greater than ``last_generation``,
    has not expired, and is not a generation this device rolled back from.
    """
    try:
        envelope = decode(Desired, payload)
    except WireError as exc:
        return Refusal(RefusalCode.MALFORMED, str(exc))
    state = envelope.payload
    try:
        keyid = envelope.verify(trusted)
    except MissingSignature as exc:
        return Refusal(RefusalCode.MISSING_SIGNATURE, str(exc), state.generation)
    except UnknownKey as exc:
        return Refusal(RefusalCode.UNKNOWN_KEY, str(exc), state.generation)
    except TrustError as exc:
        return Refusal(RefusalCode.BAD_SIGNATURE, str(exc), state.generation)
    if state.device_id != device_id:
        return Refusal(
            RefusalCode.WRONG_DEVICE,
            f"document is for device {state.device_id!r}, this is {device_id!r}",
            state.generation,
        )
    if state.generation <= last_generation:
        return Refusal(
            RefusalCode.STALE_GENERATION,
            f"generation {state.generation} is not newer than {last_generation}",
            state.generation,
        )
    if state.expires_at <= now:
        return Refusal(
            RefusalCode.EXPIRED,
            f"document expired {now - state.expires_at:.0f}s ago",
            state.generation,
        )
    if state.generation in set(refused_generations):
        return Refusal(
            RefusalCode.ROLLED_BACK,
            f"generation {state.generation} was rolled back here; waiting for a newer one",
            state.generation,
        )
    return Accepted(state=state, signed_payload=envelope.signed_payload(), keyid=keyid)


def rotated_keys(current: list[PublicKey], accepted: DesiredState) -> list[PublicKey]:
    """The keys to trust after applying ``accepted``: its key list when it names one."""
    return list(accepted.trusted_keys) if accepted.trusted_keys else list(current)

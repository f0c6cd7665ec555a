"""The error tree of the agent. Every class here derives from ``contract.errors.EdgefleetError``.

    EdgefleetError                      (contract/errors.py)
    └── AgentError                      base of every error the agent raises on purpose
        ├── ArtifactError               getting one content-addressed artifact onto the disk
        │   ├── FetchError              transport: HTTP status, connection, timeout, bad URL
        │   ├── ArtifactTooLarge        above the agent's size cap; refused before reading
        │   ├── VerificationError       the bytes are not the ones the signed document names
        │   │   ├── SizeMismatch
        │   │   └── HashMismatch
        │   ├── ArtifactUnavailable     every candidate URL failed; holds each URL's error
        │   └── NotCached               asked for a hash that is not in the cache
        └── StorageError                the local disk failed us (path and errno)
            └── StorageFull             ENOSPC, or less free space than the artifact needs

Add new classes under the branch whose fault they describe and extend this tree.
"""

from __future__ import annotations

import errno as errno_codes

from contract.errors import EdgefleetError


class AgentError(EdgefleetError):
    """Base of every error the agent raises on purpose."""


# --- artifacts ---------------------------------------------------------------------------


class ArtifactError(AgentError):
    """Fetching, verifying or looking up one content-addressed artifact failed."""


class FetchError(ArtifactError):
    """A transfer failed: an HTTP status, a connection error, a timeout or an unusable URL.

    ``retryable`` says whether asking the same URL again may succeed (5xx, timeouts, resets,
    a body cut short); ``status`` is the HTTP status when there was one.
    """

    def __init__(
        self,
        url: str,
        reason: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        attempts: int = 1,
    ) -> None:
        self.url = url
        self.reason = reason
        self.status = status
        self.retryable = retryable
        self.attempts = attempts
        tail = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{url}: {reason}{tail}")


class ArtifactTooLarge(ArtifactError):
    """An artifact (announced or received) is larger than the agent accepts."""

    def __init__(self, source: str, size: int, limit: int) -> None:
        self.source = source
        self.size = size
        self.limit = limit
        super().__init__(f"{source}: {size} bytes exceeds the size cap of {limit} bytes")


class VerificationError(ArtifactError):
    """The bytes are not the ones the signed document promised."""


class SizeMismatch(VerificationError):
    """The size announced or received differs from the expected size.

    ``at_least`` is true when the transfer was stopped as soon as it passed the expected
    size, so ``actual`` is a lower bound.
    """

    def __init__(self, source: str, expected: int, actual: int, *, at_least: bool = False) -> None:
        self.source = source
        self.expected = expected
        self.actual = actual
        self.at_least = at_least
        got = f"more than {actual - 1}" if at_least else str(actual)
        super().__init__(f"{source}: expected {expected} bytes, got {got}")


class HashMismatch(VerificationError):
    """The sha256 of the received bytes differs from the expected one."""

    def __init__(self, source: str, expected: str, actual: str) -> None:
        self.source = source
        self.expected = expected
        self.actual = actual
        super().__init__(f"{source}: expected sha256 {expected}, got {actual}")


class ArtifactUnavailable(ArtifactError):
    """No candidate URL delivered a verified copy; ``failures`` holds (url, error) in order."""

    def __init__(self, sha256: str, failures: list[tuple[str, ArtifactError]]) -> None:
        self.sha256 = sha256
        self.failures = list(failures)
        if failures:
            detail = "; ".join(str(error) for _, error in failures)
            message = f"artifact {sha256}: no candidate URL delivered it: {detail}"
        else:
            message = f"artifact {sha256}: no URL to fetch it from (no artifact url, no base URL)"
        super().__init__(message)


class NotCached(ArtifactError):
    """The artifact is not in the cache's verified store."""

    def __init__(self, sha256: str) -> None:
        self.sha256 = sha256
        super().__init__(f"artifact {sha256} is not in the cache")


# --- local storage -----------------------------------------------------------------------


class StorageError(AgentError):
    """The local disk failed: ``path`` names the file, ``errno`` the OS error when known."""

    def __init__(self, path: str, reason: str, *, errno: int | None = None) -> None:
        self.path = path
        self.reason = reason
        self.errno = errno
        super().__init__(f"{path}: {reason}")


class StorageFull(StorageError):
    """No space left (ENOSPC), or less free space than an artifact needs.

    ``needed`` and ``free`` are bytes when known (the early budget check knows both).
    """

    def __init__(self, path: str, *, needed: int | None = None, free: int | None = None) -> None:
        self.needed = needed
        self.free = free
        if needed is not None and free is not None:
            reason = f"not enough space: {needed} bytes needed, {free} bytes free"
        else:
            reason = "no space left on device"
        super().__init__(path, reason, errno=errno_codes.ENOSPC)


# --- model host (agent/host.py, agent/smoke.py) ------------------------------------------
#
#   AgentError
#   ├── ModelLoadError          a model file could not become a serving session
#   │   └── SmokeTestError      the session was created but failed its smoke test
#   ├── ModelUnavailable        inference refused: the model is shed or not serving (503)
#   │   └── ModelNotFound       no such model or version in the active table (404)
#   ├── Overloaded              concurrency limit reached and rejecting, or queue full (429)
#   └── InferenceError          a run raised: inputs refused (400) or the model failed (500)


class ModelLoadError(AgentError):
    """A model could not be loaded: unreadable, wrong hash, or refused by ONNX Runtime."""

    def __init__(self, reason: str, *, model: str | None = None) -> None:
        self.reason = reason
        self.model = model
        super().__init__(f"model {model!r}: {reason}" if model else reason)


class SmokeTestError(ModelLoadError):
    """A session was created but its smoke test failed (inputs, run, NaN/Inf, golden)."""


class ModelUnavailable(AgentError):
    """Inference refused because the model is not serving; ``status`` is the HTTP status."""

    status: int = 503

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(f"model {model!r} is unavailable: {reason}")


class ModelNotFound(ModelUnavailable):
    """No model, or no such version of it, is in the active table."""

    status = 404

    def __init__(self, model: str, reason: str = "not loaded") -> None:
        super().__init__(model, reason)


class Overloaded(AgentError):
    """All permits are taken and the model rejects, or its queue is full or timed out."""

    status: int = 429

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(f"model {model!r} is overloaded: {reason}")


class InferenceError(AgentError):
    """A run raised; ``status`` is 400 when ONNX Runtime refused the inputs, else 500."""

    def __init__(self, model: str, reason: str, *, status: int = 500) -> None:
        self.model = model
        self.reason = reason
        self.status = status
        super().__init__(f"model {model!r}: inference failed: {reason}")

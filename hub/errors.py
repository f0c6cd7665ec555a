"""The hub's error tree; every class is an ``EdgefleetError``, which the CLI prints as one line.

EdgefleetError (contract.errors)
└── HubError                    anything the hub refuses or fails to do on purpose
    ├── ModelFileError          a file is not a readable ONNX model (names the file)
    ├── MeasureError            measuring load memory / latency failed
    │   └── MissingShapeHint    a dynamic input without a concrete shape (names the input)
    ├── QuantizeError           deriving an int8 variant failed (names the source file)
    ├── ArtifactError           the content-addressed artifact directory
    │   ├── InvalidSha256       not 64 lowercase hex digits
    │   └── ArtifactNotFound    no artifact with that hash
    ├── PolicyError             policies cannot be resolved for a device (hub/resolve.py)
    │   ├── DuplicatePolicy     two policies given to one resolution share a name
    │   └── MissingModelSet     a policy or a pin names a model set the hub does not have
    ├── RegistryError           the registry refused a model, a model set or a policy
    │   ├── InvalidModelName    a model name, version or variant the manifests cannot carry
    │   └── ManifestRejected    also a ManifestError: names the file, line and field
    │       ├── UnknownArtifact       a variant's artifact is not stored and has no url,
    │       │                         or is stored with another size
    │       ├── ModelSetConflict      the model set version is published with other content
    │       └── UnknownModelSet       a policy or a pin names a model set that is not published
    ├── RolloutError            a rollout cannot be created, bound or moved as asked
    │   ├── RolloutConflict     another active rollout holds one of its devices, or the
    │   │                       policy no longer names what a promotion expects
    │   └── InvalidTransition   the operation is not allowed in the rollout's phase
    ├── ConfigError             hub.toml is unreadable or invalid (names the file and the key)
    ├── InitError               ``init`` refused or failed (names the directory)
    ├── KeyringError            the signing keys: unreadable files, unknown key id, last key
    ├── StoreError              the SQLite store refused or failed an operation
    │   ├── SchemaTooNew        the database was written by a newer hub
    │   ├── NotFound            no such row (names what was looked up)
    │   ├── Conflict            a row with that key exists with other content, or a
    │   │                       generation that is not newer than the stored one
    │   └── Immutable           a published model set or a policy version cannot change
    ├── CAError                 the fleet CA's files: none there, exists already, unreadable
    ├── EnrollmentError         a device cannot be enrolled or revoked (names device or file)
    ├── BrokerConfigError       the mosquitto configuration cannot be rendered or written
    ├── IngestError             the MQTT ingest cannot start (broker unreachable, refused)
    ├── ClientError             an HTTP API call failed (status, the server's code and message)
    │   └── HubUnreachable      no response: nothing listens at the URL, connection failed
    └── CliError                a command cannot run as given (no token, bad URL, unreadable file)
"""

from __future__ import annotations

from pathlib import Path

from contract.errors import EdgefleetError, ManifestError


class HubError(EdgefleetError):
    """Base of every error the hub raises on purpose."""


class ModelFileError(HubError):
    """A file is missing, not ONNX, corrupt, or not usable as a single-file artifact."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class MeasureError(HubError):
    """Loading or running a model in the measuring subprocess failed."""


class MissingShapeHint(MeasureError):
    """An input has dynamic dimensions and no concrete shape was given for it."""

    def __init__(self, input_name: str, shape: list[int], dim_names: list[str | None]) -> None:
        dims = ", ".join(
            (name or "?") if size < 0 else str(size)
            for size, name in zip(shape, dim_names, strict=True)
        )
        super().__init__(
            f"input {input_name!r} has dynamic dimensions [{dims}]; give a concrete shape for it"
        )
        self.input_name = input_name


class QuantizeError(HubError):
    """Deriving a quantized variant of a model failed."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: cannot quantize: {reason}")
        self.path = Path(path)
        self.reason = reason


class ArtifactError(HubError):
    """The content-addressed artifact directory refused or failed an operation."""


class InvalidSha256(ArtifactError):
    """A string that is not 64 lowercase hexadecimal digits was used as an artifact hash."""

    def __init__(self, value: str) -> None:
        shown = value if len(value) <= 80 else value[:77] + "..."
        super().__init__(f"{shown!r} is not a sha256 (64 lowercase hex digits)")
        self.value = value


class ArtifactNotFound(ArtifactError):
    """No artifact with that hash is stored."""

    def __init__(self, sha256: str) -> None:
        super().__init__(f"no artifact with sha256 {sha256}")
        self.sha256 = sha256


class PolicyError(HubError):
    """Policies cannot be resolved for a device (hub/resolve.py)."""


class DuplicatePolicy(PolicyError):
    """Two policies given to one resolution share a name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"policy {name!r} is given twice; pass one version of each policy")
        self.name = name


class MissingModelSet(PolicyError):
    """A policy, or a per-device override of it, names a model set the hub does not have."""

    def __init__(self, policy: str, name: str, version: str, *, pinned: bool = False) -> None:
        via = "an override of policy" if pinned else "policy"
        super().__init__(f"{via} {policy!r} names model set {name} {version}, which does not exist")
        self.policy = policy
        self.model_set = name
        self.version = version
        self.pinned = pinned


# --- configuration, init, keys, store, ingest (hub/config.py, init.py, keys.py, store.py,
# ingest.py) -------------------------------------------------------------------------------


class ConfigError(HubError):
    """hub.toml is unreadable or invalid: ``source`` names the file, ``key`` the dotted key."""

    def __init__(self, source: str, key: str, expected: str, *, line: int | None = None) -> None:
        self.source = source
        self.key = key
        self.expected = expected
        self.line = line
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {key}: {expected}")


class InitError(HubError):
    """``edgefleet-hub init`` refused (the directory holds a hub already) or failed."""


class KeyringError(HubError):
    """The hub's signing keys: a key file is missing or unreadable, a key id is unknown or
    ambiguous, or retiring would leave no active key."""


class StoreError(HubError):
    """The SQLite store refused or failed an operation."""


class SchemaTooNew(StoreError):
    """The database's schema version is newer than this hub knows."""

    def __init__(self, path: str, version: int, supported: int) -> None:
        super().__init__(
            f"{path}: schema version {version} is newer than this hub supports ({supported}); "
            "upgrade the hub"
        )
        self.version = version
        self.supported = supported


class NotFound(StoreError):
    """No row with the given key."""


class Conflict(StoreError):
    """A row with that key exists with other content, or a generation is not newer."""


class Immutable(StoreError):
    """A published model set, or a stored policy version, cannot be changed or deleted."""


class IngestError(HubError):
    """The MQTT ingest cannot start: the broker is unreachable or refused the connection."""


# --- HTTP API client (hub/client.py) -------------------------------------------------------


class ClientError(HubError):
    """A call to the hub's HTTP API failed: ``status`` (None when no response came back),
    the server's error ``code`` and its message."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class HubUnreachable(ClientError):
    """No HTTP response: the hub is not listening at the URL, or the connection failed."""


# --- registry (hub/registry.py) ------------------------------------------------------------


class RegistryError(HubError):
    """The registry refused a model, a model set or a policy."""


class InvalidModelName(RegistryError):
    """A model name, version or variant name that a model set could not refer to."""

    def __init__(self, what: str, value: str, expected: str) -> None:
        super().__init__(f"model {what} {value!r}: expected {expected}")
        self.what = what
        self.value = value


class ManifestRejected(RegistryError, ManifestError):
    """A valid manifest the hub refuses: ``source``, ``line`` and ``field`` say where."""


class UnknownArtifact(ManifestRejected):
    """A variant (or golden file) names an artifact the hub does not store and gives no url,
    or one the hub stores with another size."""

    def __init__(
        self, source: str, line: int | None, field: str, expected: str, *, sha256: str
    ) -> None:
        super().__init__(source, line, field, expected)
        self.sha256 = sha256


class ModelSetConflict(ManifestRejected):
    """The model set's name and version are published with other content (immutable)."""


class UnknownModelSet(ManifestRejected):
    """A policy (or a per-device pin) names a model set the hub has not published."""

    def __init__(
        self, source: str, line: int | None, field: str, expected: str, *, name: str, version: str
    ) -> None:
        super().__init__(source, line, field, expected)
        self.name = name
        self.version = version


# --- enrollment and broker access (hub/ca.py, hub/enroll.py, hub/broker_config.py) --------


class CAError(HubError):
    """The fleet CA's files: no CA in the directory (or one exists already on ``ca init``),
    a file is unreadable, unwritable or not what it should be. Names the file."""


class EnrollmentError(HubError):
    """A device cannot be enrolled or revoked: a bad or reserved id, a device enrolled
    already, an unknown device, a bundle directory that is not empty. Names the device or
    the file."""


class BrokerConfigError(HubError):
    """The broker configuration cannot be rendered or written (names the file or option)."""


class CliError(HubError):
    """An ``edgefleet-hub`` command cannot run as given: no API token, a bad hub URL, an
    unreadable input file, a malformed option value."""


# --- rollouts (hub/rollout/) ---------------------------------------------------------------


class RolloutError(HubError):
    """A rollout cannot be created, bound to its policy or moved as asked."""


class RolloutConflict(RolloutError):
    """Another active rollout already holds one of the devices (``devices`` maps each such
    device to that rollout), or a promotion found the policy changed under it."""

    def __init__(self, message: str, devices: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.devices = dict(devices or {})


class InvalidTransition(RolloutError):
    """The operation (pause, resume, abort, rollback) is not allowed in the current phase."""

    def __init__(self, rollout: str, operation: str, phase: str) -> None:
        super().__init__(f"rollout {rollout} is {phase}: cannot {operation} it")
        self.rollout = rollout
        self.operation = operation
        self.phase = phase

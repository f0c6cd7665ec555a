"""The error tree of the contract, grouped by whose fault the error is.

EdgefleetError
├── WireError                   network input; callers count it and drop the message
│   ├── TopicError              a topic outside the tree, or an unsafe device id
│   ├── MessageTooLarge         refused before parsing
│   ├── MessageDecodeError      not JSON, or does not fit the schema
│   └── UnsupportedSchemaVersion  a major version this code does not know
├── ManifestError               an operator's file: names file, line, field, expectation
└── TrustError                  signatures and keys
    ├── MissingSignature
    ├── UnknownKey
    ├── BadSignature
    └── KeyFormatError
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Base of every error edgefleet raises on purpose."""


class WireError(EdgefleetError):
    """Input from the network that breaks the contract. Count it, log it, drop it."""

    reason: str = "wire"


class TopicError(WireError):
    reason = "topic"


class MessageTooLarge(WireError):
    reason = "too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class MessageDecodeError(WireError):
    reason = "decode"


class UnsupportedSchemaVersion(WireError):
    reason = "schema_version"

    def __init__(self, schema: str, supported: str) -> None:
        super().__init__(f"schema {schema!r} is not supported (this side speaks {supported!r})")
        self.schema = schema
        self.supported = supported


class ManifestError(EdgefleetError):
    """An operator-authored document (YAML manifest, profile, config) is invalid."""

    def __init__(
        self,
        source: str,
        line: int | None,
        field: str,
        expected: str,
    ) -> None:
        self.source = source
        self.line = line
        self.field = field
        self.expected = expected
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {field}: {expected}")


class TrustError(EdgefleetError):
    """A signature or key check failed."""


class MissingSignature(TrustError):
    pass


class UnknownKey(TrustError):
    pass


class BadSignature(TrustError):
    pass


class KeyFormatError(TrustError):
    pass

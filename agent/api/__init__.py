"""The local inference API: the Open Inference Protocol (KServe V2) with Triton's binary
tensor extension, over HTTP/1.1 on loopback or a Unix socket, with Prometheus metrics.

The daemon needs only what is exported here::

    from agent.api import ApiMetrics, InferenceServer, Readiness, RepositoryEntry
"""

from agent.api.metrics import ApiMetrics
from agent.api.oip import ProtocolError, Readiness, RepositoryEntry
from agent.api.server import (
    DEFAULT_BIND,
    DEFAULT_MAX_BODY_BYTES,
    InferenceServer,
    host_readiness,
    host_repository,
)

__all__ = [
    "DEFAULT_BIND",
    "DEFAULT_MAX_BODY_BYTES",
    "ApiMetrics",
    "InferenceServer",
    "ProtocolError",
    "Readiness",
    "RepositoryEntry",
    "host_readiness",
    "host_repository",
]

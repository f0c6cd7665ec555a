"""What the agent and the hub agree on: topics, messages, manifests, signatures, selection.

Pure code: nothing in this package reads files, opens sockets or looks at the clock.
Callers pass text in and get typed values (or a typed error from ``contract.errors``) out.
"""

__version__ = "0.1.0"

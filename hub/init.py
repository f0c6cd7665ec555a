"""``edgefleet-hub init DIR``: create the hub's data directory.

DIR/                mode 0700
    hub.toml        the configuration (0600), every section spelt out
    hub.db          the SQLite store, migrated to the current schema
    keys/           the first Ed25519 signing key (0600) and keyring.json
    hub-keys.json   the public key(s) for agents (trust.hub_public_keys_file)
    api-token       the HTTP API's bearer token (0600)
    artifacts/      the content-addressed artifact store
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from contract.topics import device_id_problem
from hub.config import (
    CONFIG_NAME,
    DEFAULT_ARTIFACTS_BIND,
    HubConfig,
    parse_config,
    render_config,
)
from hub.errors import InitError
from hub.keys import KeyInfo, Keyring, write_atomic
from hub.store import Store

DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
DEFAULT_API_BIND = "127.0.0.1:8600"


@dataclass(frozen=True)
class InitResult:
    """What ``init_hub`` created."""

    directory: Path
    config: HubConfig
    key: KeyInfo

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_NAME


def default_hub_id() -> str:
    """``hub-<hostname>`` when the host name is a valid id, else ``hub``."""
    name = socket.gethostname().split(".")[0]
    candidate = f"hub-{name}"
    return candidate if device_id_problem(candidate) is None else "hub"


def init_hub(
    directory: Path,
    *,
    hub_id: str | None = None,
    broker_url: str = DEFAULT_BROKER_URL,
    api_bind: str = DEFAULT_API_BIND,
    artifacts_bind: str = DEFAULT_ARTIFACTS_BIND,
    artifact_base_urls: list[str] | None = None,
) -> InitResult:
    """Create a hub data directory; InitError if ``directory`` is not empty or on failure.

    Configuration mistakes (a bad URL, bind or id) raise ConfigError before anything is
    written.
    """
    config_file = directory / CONFIG_NAME
    text = render_config(
        hub_id=hub_id or default_hub_id(),
        broker_url=broker_url,
        api_bind=api_bind,
        artifacts_bind=artifacts_bind,
        artifact_base_urls=artifact_base_urls,
    )
    config = parse_config(text, config_file)
    if directory.exists():
        if not directory.is_dir():
            raise InitError(f"{directory}: exists and is not a directory")
        if any(directory.iterdir()):
            raise InitError(f"{directory}: not empty; init only creates a new hub directory")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        write_atomic(config_file, text.encode(), 0o600)
        write_atomic(
            config.path(config.api.token_file or "api-token"),
            (secrets.token_urlsafe(32) + "\n").encode(),
            0o600,
        )
        config.artifacts_dir.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise InitError(f"{directory}: cannot create the hub directory: {exc}") from exc
    with Store(config.store_path) as store:
        store.set_meta("hub_id", config.hub_id)
        store.set_meta("created_at", repr(time.time()))
    ring = Keyring.create(config.keys_dir, config.public_keys_path)
    config._source = config_file.resolve()
    return InitResult(directory=directory, config=config, key=ring.active()[0])

"""The hub's configuration file, ``hub.toml`` (``edgefleet-hub init`` writes one).

``load_config(path)`` reads and validates it into a ``HubConfig``; any mistake raises one
``ConfigError`` naming the file, the dotted key and what was expected. Unknown keys are
refused and values are not coerced (``keepalive = "30"`` is an error). ``data_dir`` is
relative to the file's directory, every other relative path to ``data_dir``.

The CLI finds the file with ``--config``, else ``$EDGEFLEET_HUB_CONFIG``, else ``./hub.toml``
(``config_path``).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from contract.broker_url import (
    BrokerAddress,
    broker_fields_problem,
    check_broker_url,
)
from contract.toml_keys import describe_value, dotted_key
from contract.topics import device_id_problem
from hub.errors import ConfigError

CONFIG_ENV = "EDGEFLEET_HUB_CONFIG"
CONFIG_NAME = "hub.toml"
DEFAULT_VALIDITY_S = 7 * 24 * 3600.0
DEFAULT_RESIGN_BEFORE_S = 2 * 24 * 3600.0
_TOML_POSITION = re.compile(r"\s*\(at (?:line (\d+), column \d+|end of document)\)\s*$")
_TYPES = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
}


class _Problem(ValueError):
    """A model validator's complaint about the key ``at`` (relative to the model)."""

    def __init__(self, expected: str, at: str) -> None:
        super().__init__(expected)
        self.expected = expected
        self.at = at


def _protocol_from_number(value: object) -> object:
    return "5" if value == 5 and not isinstance(value, bool) else value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class BrokerSection(BrokerAddress, _Section):
    """``[broker]``: the MQTT broker and the hub's account on it."""

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = Field(default=None, min_length=1)
    password: SecretStr | None = None
    password_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    keepalive: int = Field(default=30, ge=5, le=65535)
    protocol: Annotated[Literal["5", "3.1.1"], BeforeValidator(_protocol_from_number)] = "5"
    shared_group: str = Field(
        default="",
        description="MQTT 5 shared-subscription group of the ingest, for ingest workers; "
        "empty (the default) for a plain subscription, which survives a broker restart.",
    )
    session_expiry_s: int = Field(default=3600, ge=0, le=4294967295)

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        return check_broker_url(url)

    @field_validator("shared_group")
    @classmethod
    def _check_group(cls, group: str) -> str:
        problem = device_id_problem(group) if group else None
        if problem is not None:
            raise ValueError("expected " + problem.replace("device id", "a group name that"))
        return group

    @model_validator(mode="after")
    def _consistent(self) -> BrokerSection:
        problem = broker_fields_problem(self)
        if problem is not None:
            raise _Problem(*problem)
        if self.shared_group and self.protocol != "5":
            raise _Problem(
                'shared subscriptions need protocol "5"; set shared_group = ""', "protocol"
            )
        return self


class ApiSection(_Section):
    """``[api]``: where the HTTP API listens and its bearer token."""

    bind: str = "127.0.0.1:8600"
    token_file: str | None = "api-token"
    token: SecretStr | None = None

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, bind: str) -> str:
        host, sep, port = bind.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port (IPv6 as [::1]:8600), got {bind!r}")
        return bind

    @model_validator(mode="after")
    def _one_token(self) -> ApiSection:
        if self.token is not None and self.token_file is not None:
            raise _Problem("set token or token_file, not both", "token")
        if self.token is None and self.token_file is None:
            raise _Problem("the API needs a token: set token_file (or token)", "token_file")
        return self


class DesiredSection(_Section):
    """``[desired]``: how long signed documents are valid and when they are re-signed."""

    validity_s: float = Field(default=DEFAULT_VALIDITY_S, gt=0, strict=False)
    resign_before_s: float = Field(default=DEFAULT_RESIGN_BEFORE_S, ge=0, strict=False)

    @model_validator(mode="after")
    def _ordered(self) -> DesiredSection:
        if self.resign_before_s >= self.validity_s:
            raise _Problem("must be below desired.validity_s", "resign_before_s")
        return self


DEFAULT_ARTIFACTS_BIND = "127.0.0.1:8601"
"""Where the hub's artifact server listens unless ``[artifacts] bind`` says otherwise."""


class ArtifactsSection(_Section):
    """``[artifacts]``: the content-addressed store and external places that serve it."""

    dir: str = "artifacts"
    base_urls: list[str] = Field(default_factory=list)
    serve: bool = Field(
        default=True, description="Run the hub's own artifact server (``edgefleet-hub serve``)."
    )
    bind: str = DEFAULT_ARTIFACTS_BIND
    url: str | None = Field(
        default=None,
        description="How devices reach the hub's artifact server; default http://<bind>/artifacts.",
    )
    token_file: str | None = Field(
        default=None, description="Bearer token the artifact server requires; unset: none."
    )

    @field_validator("base_urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        for index, url in enumerate(urls):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"[{index}]: expected an http:// or https:// URL, got {url!r}")
        return urls

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, bind: str) -> str:
        host, sep, port = bind.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port (IPv6 as [::1]:8601), got {bind!r}")
        return bind

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        return url

    @property
    def own_url(self) -> str:
        """The base URL of the hub's own artifact server, as devices reach it."""
        if self.url is not None:
            return self.url.rstrip("/")
        return f"http://{self.bind}/artifacts"

    def bind_address(self) -> tuple[str, int]:
        """``bind`` as (host, port), IPv6 without brackets."""
        host, _, port = self.bind.rpartition(":")
        return host.strip("[]"), int(port)


class IngestSection(_Section):
    """``[ingest]``: batching, sequence-gap handling and telemetry retention."""

    max_batch: int = Field(default=500, ge=1, le=100_000)
    queue_size: int = Field(default=100_000, ge=100)
    max_message_bytes: int = Field(default=256 * 1024, ge=1024)
    detect_gaps: bool = True
    gap_grace_s: float = Field(default=5.0, ge=0, strict=False)
    rebirth_interval_s: float = Field(default=60.0, ge=0, strict=False)
    telemetry_retention_days: float = Field(default=7.0, gt=0, strict=False)
    rollup_retention_days: float = Field(default=90.0, gt=0, strict=False)


class StoreSection(_Section):
    path: str = "hub.db"


class KeysSection(_Section):
    """``[keys]``: the private signing keys and the public key file for agents."""

    dir: str = "keys"
    public_file: str = "hub-keys.json"


class HubConfig(_Section):
    """The whole of hub.toml. Paths are strings here; ``path()`` resolves them."""

    hub_id: str = "hub"
    data_dir: str = "."
    store: StoreSection = Field(default_factory=StoreSection)
    keys: KeysSection = Field(default_factory=KeysSection)
    broker: BrokerSection = Field(default_factory=BrokerSection)
    api: ApiSection = Field(default_factory=ApiSection)
    desired: DesiredSection = Field(default_factory=DesiredSection)
    artifacts: ArtifactsSection = Field(default_factory=ArtifactsSection)
    ingest: IngestSection = Field(default_factory=IngestSection)

    _source: Path | None = PrivateAttr(default=None)

    @field_validator("hub_id")
    @classmethod
    def _check_hub_id(cls, hub_id: str) -> str:
        problem = device_id_problem(hub_id)
        if problem is not None:
            raise ValueError("expected " + problem.replace("device id", "a hub id that"))
        return hub_id

    @property
    def source(self) -> Path | None:
        """The file this configuration was read from."""
        return self._source

    @property
    def data_path(self) -> Path:
        """``data_dir``, resolved against the configuration file's directory."""
        base = self._source.parent if self._source is not None else Path.cwd()
        path = Path(self.data_dir).expanduser()
        return path if path.is_absolute() else (base / path).resolve()

    def path(self, value: str) -> Path:
        """A path of the configuration, resolved against ``data_dir``."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.data_path / path

    @property
    def store_path(self) -> Path:
        return self.path(self.store.path)

    @property
    def keys_dir(self) -> Path:
        return self.path(self.keys.dir)

    @property
    def public_keys_path(self) -> Path:
        return self.path(self.keys.public_file)

    @property
    def artifacts_dir(self) -> Path:
        return self.path(self.artifacts.dir)

    @property
    def client_id(self) -> str:
        return self.broker.client_id or f"edgefleet-hub-{self.hub_id}"

    def _where(self) -> str:
        return str(self._source) if self._source is not None else CONFIG_NAME

    def _read_secret(self, key: str, value: str) -> str:
        path = self.path(value)
        try:
            return path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(self._where(), key, f"cannot read {path}: {reason}") from None

    def broker_password(self) -> str | None:
        """The broker password, from ``password`` or ``password_file``."""
        if self.broker.password is not None:
            return self.broker.password.get_secret_value()
        if self.broker.password_file is not None:
            return self._read_secret("broker.password_file", self.broker.password_file)
        return None

    def artifacts_token(self) -> str | None:
        """The artifact server's bearer token from ``artifacts.token_file``, or None."""
        if self.artifacts.token_file is None:
            return None
        return self._read_secret("artifacts.token_file", self.artifacts.token_file) or None

    def api_token(self) -> str:
        """The API bearer token, from ``token`` or ``token_file`` (white space removed)."""
        if self.api.token is not None:
            token = self.api.token.get_secret_value()
        else:
            token = self._read_secret("api.token_file", self.api.token_file or "")
        if len(token) < 16:
            raise ConfigError(self._where(), "api.token", "expected at least 16 characters")
        return token


def config_path(explicit: Path | None, environ: Mapping[str, str] | None = None) -> Path:
    """``explicit``, else ``$EDGEFLEET_HUB_CONFIG``, else ``./hub.toml``."""
    if explicit is not None:
        return explicit
    env = (os.environ if environ is None else environ).get(CONFIG_ENV)
    return Path(env) if env else Path(CONFIG_NAME)


def load_config(path: Path) -> HubConfig:
    """Read and validate hub.toml; ConfigError (file, key, expectation) on any problem."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(source, "(file)", "expected UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(source, "(file)", f"cannot read: {exc.strerror or exc}") from None
    return parse_config(text, path)


def parse_config(text: str, path: Path) -> HubConfig:
    """Validate the text of a hub.toml that lives (or will live) at ``path``."""
    source = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_POSITION.search(message)
        line = None
        if match:
            line = int(match.group(1)) if match.group(1) else text.count("\n") + 1
        problem = message[: match.start()] if match else message
        raise ConfigError(source, "(toml)", f"invalid TOML: {problem}", line=line) from None
    try:
        config = HubConfig.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc.errors()[0], source) from None
    config._source = path.resolve()
    for key in ("password_file", "ca_file", "cert_file", "key_file"):
        value = getattr(config.broker, key)
        if value is not None and not config.path(value).is_file():
            raise ConfigError(source, f"broker.{key}", f"{config.path(value)} does not exist")
    return config


def _config_error(error: ErrorDetails, source: str) -> ConfigError:
    loc: tuple[str | int, ...] = tuple(error["loc"])
    problem = error.get("ctx", {}).get("error")
    if isinstance(problem, _Problem):
        loc = (*loc, problem.at)
    key = dotted_key(loc)
    kind = error["type"]
    ctx: dict[str, Any] = dict(error.get("ctx", {}))
    got = (
        "a value not shown here"
        if "password" in key or "token" in key
        else describe_value(error["input"])
    )
    if kind == "missing":
        expected = "required key is missing"
    elif kind == "extra_forbidden":
        expected = "unknown key; expected one of: " + ", ".join(_allowed(loc[:-1]))
    elif kind == "value_error":
        expected = getattr(problem, "expected", None) or str(problem)
    elif kind in _TYPES:
        expected = f"expected {_TYPES[kind]}, got {got}"
    elif kind == "literal_error":
        expected = f"expected one of {ctx['expected']}, got {got}"
    else:
        message = error["msg"]
        expected = f"{message[:1].lower()}{message[1:]}, got {got}"
    return ConfigError(source, key, expected)


def _allowed(loc: tuple[str | int, ...]) -> list[str]:
    model: Any = HubConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def render_config(
    *,
    hub_id: str,
    broker_url: str,
    api_bind: str,
    artifacts_bind: str = DEFAULT_ARTIFACTS_BIND,
    artifact_base_urls: list[str] | None = None,
) -> str:
    """The hub.toml that ``init`` writes: every section with its defaults spelt out."""

    def s(value: str) -> str:
        return json.dumps(value)

    urls = ", ".join(s(u) for u in artifact_base_urls or [])
    return f"""# edgefleet hub configuration (written by `edgefleet-hub init`).
# Relative paths are relative to data_dir; data_dir is relative to this file.
hub_id = {s(hub_id)}
data_dir = "."

[store]
path = "hub.db"

[keys]
dir = "keys"                      # private Ed25519 signing keys (mode 0600)
public_file = "hub-keys.json"     # give this file to agents: trust.hub_public_keys_file

[broker]
url = {s(broker_url)}
# username = "edgefleet-hub"
# password_file = "broker-password"
protocol = "5"
shared_group = ""                 # "hub": MQTT 5 shared subscription, for ingest workers
session_expiry_s = 3600           # the broker keeps the hub's messages across a restart
# The broker's max_queued_messages must be 0 (or above the hub's backlog):
# mosquitto's default of 1000 silently drops QoS 1 messages (docs/hub-ingest.md).

[api]
bind = {s(api_bind)}
token_file = "api-token"

[desired]
validity_s = {DEFAULT_VALIDITY_S:.0f}.0          # signed documents expire after this
resign_before_s = {DEFAULT_RESIGN_BEFORE_S:.0f}.0     # re-signed when less than this is left

[artifacts]
dir = "artifacts"
base_urls = [{urls}]               # external servers (S3, CDN) serving the files by hash
serve = true                      # the hub's own artifact server, listed after base_urls
bind = {s(artifacts_bind)}
# url = "http://hub.example:8601/artifacts"   # how devices reach it (default: from bind)
# token_file = "artifacts-token"  # require this bearer token (agents: artifacts.token_file)

[ingest]
max_batch = 500
detect_gaps = true
gap_grace_s = 5.0
rebirth_interval_s = 60.0
telemetry_retention_days = 7.0
rollup_retention_days = 90.0
"""

"""The agent's configuration: a TOML file, environment overrides, one error per mistake.

``load_config`` reads ``/etc/edgefleet/agent.toml`` (or any path), applies every
``EDGEFLEET_AGENT__<KEY>`` / ``EDGEFLEET_AGENT__<SECTION>__<KEY>`` variable on top, and
validates the result into an ``AgentConfig``. Any problem raises one ``ManifestError`` that
names the file, the dotted key and what was expected. docs/configuration.md lists every key.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from contract.broker_url import (
    BrokerAddress,
    broker_fields_problem,
    check_broker_url,
)
from contract.errors import KeyFormatError, ManifestError
from contract.signing import PublicKey, TrustedKeys
from contract.toml_keys import describe_value, dotted_key, toml_key
from contract.topics import device_id_problem

ENV_PREFIX = "EDGEFLEET_AGENT__"
DEFAULT_CONFIG_PATH = Path("/etc/edgefleet/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/edgefleet")
MIB = 1024 * 1024
MASK = "********"

_PROFILE_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$"
_PATTERN_MEANINGS = {
    _PROFILE_PATTERN: "a profile name of lowercase letters, digits, '.', '_' or '-' "
    "(at most 64, starting with a letter or digit)",
    _LABEL_PATTERN: "a label name of letters, digits, '.', '_', '/' or '-' "
    "(at most 63, starting with a letter or digit)",
}
_TOML_POSITION = re.compile(r"\s*\(at (?:line (\d+), column \d+|end of document)\)\s*$")


class _KeyProblemError(ValueError):
    """A model validator's complaint about the key ``at``, relative to the model."""

    def __init__(self, expected: str, at: tuple[str | int, ...] = ()) -> None:
        super().__init__(expected)
        self.expected = expected
        self.at = at


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are taken relative to the configuration file's directory."""
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if not value.is_absolute() and isinstance(base, Path):
        value = base / value
    return value


def _existing_file(value: Path) -> Path:
    if not value.is_file():
        what = "is not a regular file" if value.exists() else "does not exist"
        raise ValueError(f"expected an existing file, {value} {what}")
    return value


def _existing_dir(value: Path) -> Path:
    if not value.is_dir():
        what = "is not a directory" if value.exists() else "does not exist"
        raise ValueError(f"expected an existing directory, {value} {what}")
    return value


ConfigPath = Annotated[Path, Field(strict=False), AfterValidator(_resolve_path)]
ExistingFile = Annotated[ConfigPath, AfterValidator(_existing_file)]
ExistingDir = Annotated[ConfigPath, AfterValidator(_existing_dir)]


def _protocol_from_number(value: object) -> object:
    """``protocol = 5`` (a TOML integer) means ``"5"``."""
    return "5" if value == 5 and not isinstance(value, bool) else value


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


class _Section(BaseModel):
    """Unknown keys are mistakes; values are not coerced (``"30"`` is not an integer)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class BrokerConfig(BrokerAddress, _Section):
    """``[broker]``: where the MQTT broker is and how to authenticate to it."""

    url: str = Field(description="mqtt://host[:port] or mqtts://host[:port].")
    username: str | None = Field(default=None, min_length=1)
    password: SecretStr | None = None
    password_file: ExistingFile | None = None
    ca_file: ExistingFile | None = None
    cert_file: ExistingFile | None = None
    key_file: ExistingFile | None = None
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    keepalive: int = Field(default=30, ge=5, le=65535)
    protocol: Annotated[Literal["5", "3.1.1"], BeforeValidator(_protocol_from_number)] = "5"

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        return check_broker_url(url)

    @model_validator(mode="after")
    def _consistent(self) -> BrokerConfig:
        problem = broker_fields_problem(self)
        if problem is not None:
            expected, key = problem
            raise _KeyProblemError(expected, at=(key,))
        return self

    def password_value(self) -> str | None:
        """The password, read from ``password_file`` (trailing newline removed) if set there."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        return None


class HubKey(_Section):
    """One trusted hub public key: key id and raw Ed25519 key in base64."""

    keyid: str
    public_key: str


class TrustConfig(_Section):
    """``[trust]``: the hub keys whose signatures on the desired state are accepted."""

    hub_public_keys: list[HubKey] = Field(default_factory=list)
    hub_public_keys_file: ExistingFile | None = None

    @field_validator("hub_public_keys")
    @classmethod
    def _valid_keys(cls, keys: list[HubKey]) -> list[HubKey]:
        trusted = TrustedKeys()
        for index, key in enumerate(keys):
            try:
                trusted.add(PublicKey(keyid=key.keyid, public_key=key.public_key))
            except KeyFormatError as exc:
                raise _KeyProblemError(str(exc), at=(index,)) from None
        return keys


class ApiConfig(_Section):
    """``[api]``: where the local inference API listens."""

    bind: str = Field(
        default="127.0.0.1:8501",
        description='"host:port" (IPv6 as "[::1]:8501") or "unix:/absolute/path.sock".',
    )
    max_body_bytes: int = Field(default=16 * MIB, ge=1024)

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, bind: str) -> str:
        expected = f'expected "host:port" or "unix:/absolute/path", got {bind!r}'
        if bind.startswith("unix:"):
            if not bind[5:].startswith("/") or len(bind) == 6:
                raise ValueError(expected)
            return bind
        host, sep, port = bind.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(expected)
        if host.startswith("[") != host.endswith("]") or (":" in host and host[0] != "["):
            raise ValueError(expected)
        return bind

    @property
    def unix_path(self) -> Path | None:
        """The socket path of a ``unix:`` bind, else None."""
        return Path(self.bind[5:]) if self.bind.startswith("unix:") else None

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of a TCP bind (IPv6 without brackets), else None."""
        if self.bind.startswith("unix:"):
            return None
        host, _, port = self.bind.rpartition(":")
        return host.strip("[]"), int(port)


class ArtifactsConfig(_Section):
    """``[artifacts]``: how model files are downloaded."""

    token_file: ExistingFile | None = None
    max_artifact_bytes: int = Field(default=2048 * MIB, ge=1)
    timeout_s: float = Field(default=60.0, gt=0)
    update_retry_s: float = Field(default=30.0, gt=0)
    update_retry_max_s: float = Field(default=900.0, gt=0)

    @model_validator(mode="after")
    def _retry_order(self) -> ArtifactsConfig:
        if self.update_retry_max_s < self.update_retry_s:
            raise _KeyProblemError(
                f"expected at least update_retry_s ({self.update_retry_s:g}), "
                f"got {self.update_retry_max_s:g}",
                at=("update_retry_max_s",),
            )
        return self

    def token(self) -> str | None:
        """The bearer token from ``token_file`` (surrounding white space removed), or None."""
        if self.token_file is None:
            return None
        return self.token_file.read_text(encoding="utf-8").strip()


class TelemetryConfig(_Section):
    """``[telemetry]``: bounds of the store-and-forward outbox used while offline."""

    outbox_max_messages: int = Field(default=10_000, ge=1)
    outbox_max_bytes: int = Field(default=16 * MIB, ge=1024)


LabelName = Annotated[str, Field(pattern=_LABEL_PATTERN)]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class AgentConfig(_Section):
    """The whole agent configuration (the TOML file's top level)."""

    device_id: str
    broker: BrokerConfig
    state_dir: ConfigPath = DEFAULT_STATE_DIR
    trust: TrustConfig = Field(default_factory=TrustConfig)
    profile: Annotated[str, Field(pattern=_PROFILE_PATTERN)] | None = None
    profiles_dir: ExistingDir | None = None
    labels: dict[LabelName, Annotated[str, Field(max_length=256)]] = Field(default_factory=dict)
    api: ApiConfig = Field(default_factory=ApiConfig)
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    log_level: Annotated[LogLevel, BeforeValidator(_lower)] = "info"

    _source: Path | None = PrivateAttr(default=None)
    _from_env: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("device_id")
    @classmethod
    def _check_device_id(cls, device_id: str) -> str:
        problem = device_id_problem(device_id)
        if problem is not None:
            raise ValueError(
                f"expected 1 to 64 of [A-Za-z0-9._:-] starting with a letter or digit ({problem})"
            )
        return device_id

    @model_validator(mode="after")
    def _has_trust(self) -> AgentConfig:
        if not self.trust.hub_public_keys and self.trust.hub_public_keys_file is None:
            raise _KeyProblemError(
                "expected hub_public_keys or hub_public_keys_file: without a trusted hub key "
                "no desired state can be accepted",
                at=("trust",),
            )
        return self

    @property
    def client_id(self) -> str:
        """The MQTT client id: ``broker.client_id``, or the device id."""
        return self.broker.client_id or self.device_id

    @property
    def source(self) -> Path | None:
        """The file this configuration was loaded from."""
        return self._source

    @property
    def from_env(self) -> Mapping[str, str]:
        """Dotted key -> the environment variable that set it."""
        return dict(self._from_env)

    @property
    def state_db_path(self) -> Path:
        """The SQLite file of generations, session and seq (agent/state.py)."""
        return self.state_dir / "state.db"

    @property
    def outbox_db_path(self) -> Path:
        """The SQLite file of the telemetry outbox (agent/outbox.py)."""
        return self.state_dir / "outbox.db"


# --------------------------------------------------------------------------- loading


def load_config(path: Path, environ: Mapping[str, str]) -> AgentConfig:
    """Read, override from ``environ`` and validate; raise ManifestError on any problem.

    Relative paths in the file (and in overrides) are relative to the file's directory.
    Hub keys from ``trust.hub_public_keys_file`` are read and checked too.
    """
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ManifestError(source, None, "(file)", "expected UTF-8 text") from None
    except OSError as exc:
        raise ManifestError(source, None, "(file)", f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_POSITION.search(message)
        line = None
        if match:
            line = int(match.group(1)) if match.group(1) else text.count("\n") + 1
        problem = message[: match.start()] if match else message
        raise ManifestError(source, line, "(toml)", f"invalid TOML: {problem}") from None
    from_env = _apply_env(data, environ, source)
    context = {"base_dir": path.resolve().parent}
    try:
        config = AgentConfig.model_validate(data, context=context)
    except ValidationError as exc:
        raise _to_manifest_error(exc.errors()[0], source, from_env) from exc
    config._source = path
    config._from_env = from_env
    trusted_keys(config)
    return config


def hub_public_keys(config: AgentConfig) -> list[PublicKey]:
    """The configured hub keys: the inline ones plus those in the key file, checked."""
    keys = [PublicKey(keyid=k.keyid, public_key=k.public_key) for k in config.trust.hub_public_keys]
    TrustedKeys(keys)
    key_file = config.trust.hub_public_keys_file
    if key_file is not None:
        for index, entry in enumerate(_read_key_file(key_file)):
            where = f"[{index}]"
            if not isinstance(entry, dict) or set(entry) != {"keyid", "public_key"}:
                raise ManifestError(
                    str(key_file), None, where, 'expected {"keyid": ..., "public_key": ...}'
                )
            if not all(isinstance(v, str) for v in entry.values()):
                raise ManifestError(str(key_file), None, where, "expected string values")
            key = PublicKey(keyid=entry["keyid"], public_key=entry["public_key"])
            try:
                TrustedKeys([key])
            except KeyFormatError as exc:
                raise ManifestError(str(key_file), None, where, str(exc)) from None
            keys.append(key)
    return keys


def trusted_keys(config: AgentConfig) -> TrustedKeys:
    """The hub keys to verify desired states with: the inline ones plus those in the file."""
    return TrustedKeys(hub_public_keys(config))


def _read_key_file(key_file: Path) -> list[Any]:
    """A JSON list of keys, or an object whose ``keys`` is that list."""
    source = str(key_file)
    try:
        data = json.loads(key_file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(source, None, "(file)", f"cannot read: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        line = getattr(exc, "lineno", None)
        raise ManifestError(source, line, "(json)", f"invalid JSON: {exc}") from None
    if isinstance(data, dict) and set(data) == {"keys"}:
        data = data["keys"]
    if not isinstance(data, list) or not data:
        raise ManifestError(source, None, "(document)", "expected a non-empty JSON list of keys")
    return data


# --------------------------------------------------------------------------- environment


def _apply_env(data: dict[str, Any], environ: Mapping[str, str], source: str) -> dict[str, str]:
    """Apply ``EDGEFLEET_AGENT__...`` variables to ``data``; return dotted key -> variable.

    Names are case-insensitive (keys are lower-cased). A value for a text field is taken as
    is; any other value is parsed as a TOML value (``30``, ``true``, ``["a"]``) when it is
    one. An empty value removes the key, so that its default applies.
    """
    applied: dict[str, str] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if len(parts) > 2 or not all(parts):
            raise ManifestError(
                source,
                None,
                name,
                f"expected {ENV_PREFIX}<KEY> or {ENV_PREFIX}<SECTION>__<KEY> "
                "(one double underscore between section and key)",
            )
        raw = environ[name]
        target = data
        if len(parts) == 2:
            section = data.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise ManifestError(
                    source, None, parts[0], f"expected a table, so that ${name} can set a key in it"
                )
            target = section
        key = parts[-1]
        if raw == "":
            target.pop(key, None)
        else:
            target[key] = raw if _is_text_field(parts) else _parse_scalar(raw)
        applied[dotted_key(tuple(parts))] = name
    return applied


def _parse_scalar(raw: str) -> object:
    try:
        parsed = tomllib.loads(f"value = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    return parsed["value"] if set(parsed) == {"value"} else raw


def _is_text_field(parts: list[str]) -> bool:
    """Whether the key at ``parts`` holds text (a string, a path, a choice of strings)."""
    annotation: object = None
    model: object = AgentConfig
    for part in parts:
        if isinstance(model, type) and issubclass(model, BaseModel):
            field = model.model_fields.get(part)
            annotation = None if field is None else field.annotation
        elif get_origin(model) is dict:
            annotation = get_args(model)[1]
        else:
            return False
        model = _strip(annotation)
    return _is_text(_strip(annotation))


def _strip(annotation: object) -> object:
    """Remove ``Annotated`` and ``| None`` around a type."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
            continue
        members = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) in (Union, UnionType) and len(members) == 1:
            annotation = members[0]
            continue
        return annotation


def _is_text(annotation: object) -> bool:
    if annotation in (str, Path, SecretStr):
        return True
    return get_origin(annotation) is Literal and all(
        isinstance(a, str) for a in get_args(annotation)
    )


# --------------------------------------------------------------------------- errors

_TYPE_EXPECTATIONS = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "path_type": "a path (a string)",
    "is_instance_of": "a path (a string)",
}


def _to_manifest_error(
    error: ErrorDetails, source: str, from_env: Mapping[str, str]
) -> ManifestError:
    loc = tuple(error["loc"])
    is_key = loc[-1:] == ("[key]",)
    loc = tuple(part for part in loc if part != "[key]")
    problem = error.get("ctx", {}).get("error")
    if isinstance(problem, _KeyProblemError):
        loc = (*loc, *problem.at)
    field = dotted_key(loc)
    expected = _expectation(error, is_key, secret=loc[-1:] == ("password",))
    for depth in range(len(loc), 0, -1):
        variable = from_env.get(dotted_key(loc[:depth]))
        if variable is not None:
            expected += f" (set by ${variable})"
            break
    return ManifestError(source, None, field, expected)


def _expectation(error: ErrorDetails, is_key: bool, secret: bool) -> str:
    kind = error["type"]
    ctx: dict[str, Any] = dict(error.get("ctx", {}))
    got = "a value not shown here" if secret else describe_value(error["input"])
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(tuple(error["loc"])[:-1])
        return "unknown key; expected one of: " + ", ".join(allowed)
    if kind == "value_error":
        problem = ctx.get("error")
        text = getattr(problem, "expected", None) or str(problem)
        return text
    if kind in _TYPE_EXPECTATIONS:
        return f"expected {_TYPE_EXPECTATIONS[kind]}, got {got}"
    if kind == "literal_error":
        return f"expected one of {ctx['expected']}, got {got}"
    if kind == "string_pattern_mismatch":
        meaning = _PATTERN_MEANINGS.get(str(ctx.get("pattern")), f"text matching {ctx}")
        return f"expected {meaning}, got {got}" + (" as a key" if is_key else "")
    bounds = {
        "greater_than": "a number greater than {gt}",
        "greater_than_equal": "a number of at least {ge}",
        "less_than": "a number below {lt}",
        "less_than_equal": "a number of at most {le}",
        "string_too_short": "at least {min_length} character(s)",
        "string_too_long": "at most {max_length} character(s)",
    }
    if kind in bounds:
        return f"expected {bounds[kind].format(**ctx)}, got {got}"
    message = error["msg"]
    return message[:1].lower() + message[1:]


def _allowed_keys(loc: tuple[str | int, ...]) -> list[str]:
    model: object = AgentConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _strip(field.annotation)
        if get_origin(model) is list:
            model = _strip(get_args(model)[0])
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


# --------------------------------------------------------------------------- rendering


def effective_settings(config: AgentConfig) -> str:
    """The settings in force, as TOML with comments; secrets are masked.

    Each value says whether it is a default or came from an environment variable.
    """
    where = f" ({config.source})" if config.source is not None else ""
    lines = [f"# edgefleet-agent effective settings{where}"]
    tables: list[tuple[str, BaseModel | dict[str, str]]] = []
    for name in AgentConfig.model_fields:
        value = getattr(config, name)
        if isinstance(value, BaseModel | dict):
            tables.append((name, value))
        else:
            lines.append(_setting(config, name, name, value))
    for table, value in tables:
        lines += ["", f"[{table}]"]
        if isinstance(value, dict):
            if not value:
                lines.append("# (none)")
            lines += [_setting(config, f"{table}.{k}", _key(k), v) for k, v in value.items()]
            continue
        for name in type(value).model_fields:
            item = getattr(value, name)
            if table == "broker" and name == "client_id" and item is None:
                lines.append(f"client_id = {_toml(config.client_id)}  # default: the device id")
                continue
            lines.append(_setting(config, f"{table}.{name}", name, item, parent=value))
        if table == "trust":
            ids = sorted(trusted_keys(config).keyids)
            lines.append(f"# {len(ids)} trusted key(s): " + ", ".join(k[:16] for k in ids))
    return "\n".join(lines) + "\n"


def _setting(
    config: AgentConfig, dotted: str, key: str, value: object, parent: BaseModel | None = None
) -> str:
    owner: BaseModel = parent if parent is not None else config
    name = dotted.rsplit(".", 1)[-1]
    variable = config.from_env.get(dotted)
    if variable is not None:
        note = f"from ${variable}"
    elif name in type(owner).model_fields and name not in owner.model_fields_set:
        note = "default"
    else:
        note = ""
    if value is None:
        return f"# {key}: not set" + (f" ({note})" if note else "")
    return f"{key} = {_toml(value)}" + (f"  # {note}" if note else "")


def _key(name: str) -> str:
    return toml_key(name)


def _toml(value: object) -> str:
    if isinstance(value, SecretStr):
        return json.dumps(MASK)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, BaseModel):
        pairs = (f"{k} = {_toml(getattr(value, k))}" for k in type(value).model_fields)
        return "{ " + ", ".join(pairs) + " }"
    return json.dumps(str(value))

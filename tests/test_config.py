"""Agent configuration: TOML, environment overrides, and one clear error per mistake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import (
    DEFAULT_STATE_DIR,
    MASK,
    AgentConfig,
    effective_settings,
    load_config,
    trusted_keys,
)
from contract.errors import ManifestError
from contract.signing import SigningKey

HUB_KEY = SigningKey.generate().public
OTHER_KEY = SigningKey.generate().public


def minimal(**extra: str) -> str:
    """A minimal valid file; ``extra`` appends raw TOML lines to the top level."""
    head = "".join(f"{line}\n" for line in extra.values())
    return (
        head
        + 'device_id = "pi-0001"\n'
        + '[broker]\nurl = "mqtt://broker.local"\n'
        + "[trust]\n"
        + f'hub_public_keys = [{{ keyid = "{HUB_KEY.keyid}", '
        + f'public_key = "{HUB_KEY.public_key}" }}]\n'
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, **env: str) -> AgentConfig:
    return load_config(write(tmp_path, text), env)


def error(tmp_path: Path, text: str, **env: str) -> ManifestError:
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as caught:
        load_config(path, env)
    assert caught.value.source == str(path)
    return caught.value


def test_minimal_file_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, minimal())
    assert config.device_id == "pi-0001"
    assert config.client_id == "pi-0001"
    assert config.state_dir == DEFAULT_STATE_DIR
    assert config.state_db_path == DEFAULT_STATE_DIR / "state.db"
    assert config.outbox_db_path == DEFAULT_STATE_DIR / "outbox.db"
    assert (config.broker.host, config.broker.port, config.broker.tls) == (
        "broker.local",
        1883,
        False,
    )
    assert config.broker.keepalive == 30
    assert config.broker.protocol == "5"
    assert config.profile is None
    assert config.labels == {}
    assert config.api.bind == "127.0.0.1:8501"
    assert config.api.tcp_address == ("127.0.0.1", 8501)
    assert config.api.unix_path is None
    assert config.telemetry.outbox_max_messages == 10_000
    assert config.telemetry.outbox_max_bytes == 16 * 1024 * 1024
    assert config.log_level == "info"
    assert trusted_keys(config).keyids == {HUB_KEY.keyid}


def test_full_file(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem", "token"):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "profiles").mkdir()
    keys = tmp_path / "hub-keys.json"
    keys.write_text(json.dumps([OTHER_KEY.model_dump()]))
    text = f"""
device_id = "gw-7.line:2"
state_dir = "/srv/edgefleet"
profile = "raspberry-pi-4"
profiles_dir = "profiles"
log_level = "DEBUG"

[broker]
url = "mqtts://broker.example.com:8884"
username = "gw-7"
password = "s3cret"
ca_file = "ca.pem"
cert_file = "cert.pem"
key_file = "key.pem"
client_id = "edge-gw-7"
keepalive = 15
protocol = "3.1.1"

[trust]
hub_public_keys = [{{ keyid = "{HUB_KEY.keyid}", public_key = "{HUB_KEY.public_key}" }}]
hub_public_keys_file = "hub-keys.json"

[labels]
site = "plant-3"
"line/position" = "2"

[api]
bind = "unix:/run/edgefleet/agent.sock"
max_body_bytes = 1048576

[artifacts]
token_file = "token"
max_artifact_bytes = 1000000
timeout_s = 12.5

[telemetry]
outbox_max_messages = 500
outbox_max_bytes = 65536
"""
    config = load(tmp_path, text)
    assert config.source == tmp_path / "agent.toml"
    assert config.broker.tls and config.broker.port == 8884
    assert config.broker.ca_file == tmp_path / "ca.pem"
    assert config.broker.password_value() == "s3cret"
    assert config.client_id == "edge-gw-7"
    assert config.broker.protocol == "3.1.1"
    assert config.profiles_dir == tmp_path / "profiles"
    assert config.log_level == "debug"
    assert config.labels == {"site": "plant-3", "line/position": "2"}
    assert config.api.unix_path == Path("/run/edgefleet/agent.sock")
    assert config.api.tcp_address is None
    assert config.artifacts.token() == "x"
    assert config.artifacts.timeout_s == 12.5
    assert trusted_keys(config).keyids == {HUB_KEY.keyid, OTHER_KEY.keyid}

    shown = effective_settings(config)
    assert "s3cret" not in shown
    assert f'password = "{MASK}"' in shown
    assert 'url = "mqtts://broker.example.com:8884"' in shown
    assert '"line/position" = "2"' in shown
    assert "2 trusted key(s)" in shown


def test_password_file_and_ipv6_bind(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    text = minimal().replace(
        'url = "mqtt://broker.local"',
        'url = "mqtt://[::1]:1884"\nusername = "u"\npassword_file = "pw"',
    )
    config = load(tmp_path, text + '[api]\nbind = "[::1]:9000"\n')
    assert config.broker.password_value() == "from-file"
    assert config.broker.host == "::1"
    assert config.api.tcp_address == ("::1", 9000)


def test_environment_overrides_by_type(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    config = load(
        tmp_path,
        minimal(),
        EDGEFLEET_AGENT__DEVICE_ID="pi-0002",
        EDGEFLEET_AGENT__BROKER__URL="mqtts://other:8883",
        EDGEFLEET_AGENT__BROKER__CA_FILE="ca.pem",
        EDGEFLEET_AGENT__BROKER__KEEPALIVE="60",
        EDGEFLEET_AGENT__BROKER__USERNAME="1234",
        EDGEFLEET_AGENT__BROKER__PASSWORD="5678",
        EDGEFLEET_AGENT__BROKER__PROTOCOL="5",
        EDGEFLEET_AGENT__LABELS__ROOM="12",
        EDGEFLEET_AGENT__TELEMETRY__OUTBOX_MAX_MESSAGES="250",
        EDGEFLEET_AGENT__ARTIFACTS__TIMEOUT_S="2.5",
        EDGEFLEET_AGENT__log_level="warning",
        EDGEFLEET_AGENTX__IGNORED="1",
        UNRELATED="1",
    )
    assert config.device_id == "pi-0002"
    assert config.client_id == "pi-0002"
    assert config.broker.url == "mqtts://other:8883"
    assert config.broker.ca_file == tmp_path / "ca.pem"
    assert config.broker.keepalive == 60
    # Text fields keep digits as text: a numeric password stays a string.
    assert config.broker.username == "1234"
    assert config.broker.password_value() == "5678"
    assert config.labels == {"room": "12"}
    assert config.telemetry.outbox_max_messages == 250
    assert config.artifacts.timeout_s == 2.5
    assert config.log_level == "warning"
    assert config.from_env["broker.keepalive"] == "EDGEFLEET_AGENT__BROKER__KEEPALIVE"

    shown = effective_settings(config)
    assert "5678" not in shown
    assert "keepalive = 60  # from $EDGEFLEET_AGENT__BROKER__KEEPALIVE" in shown
    assert 'client_id = "pi-0002"  # default: the device id' in shown
    assert 'bind = "127.0.0.1:8501"  # default' in shown


def test_environment_sets_lists_and_empty_resets(tmp_path: Path) -> None:
    keys = f'[{{keyid = "{OTHER_KEY.keyid}", public_key = "{OTHER_KEY.public_key}"}}]'
    text = minimal(profile='profile = "jetson-orin"')
    config = load(
        tmp_path, text, EDGEFLEET_AGENT__TRUST__HUB_PUBLIC_KEYS=keys, EDGEFLEET_AGENT__PROFILE=""
    )
    assert trusted_keys(config).keyids == {OTHER_KEY.keyid}
    assert config.profile is None


@pytest.mark.parametrize(
    ("text_edit", "env", "field", "expected"),
    [
        pytest.param(
            ("", 'colour = "blue"\n'),
            {},
            "colour",
            "unknown key; expected one of: device_id",
            id="unknown-top-level-key",
        ),
        pytest.param(
            ('url = "mqtt://broker.local"', 'url = "mqtt://broker.local"\nport = 1883'),
            {},
            "broker.port",
            "unknown key; expected one of: url, username",
            id="unknown-section-key",
        ),
        pytest.param(
            ("", ""),
            {"EDGEFLEET_AGENT__BROKER__QOS": "1"},
            "broker.qos",
            "unknown key; expected one of: url",
            id="unknown-key-from-env",
        ),
        pytest.param(
            ('url = "mqtt://broker.local"', 'url = "mqtt://broker.local"\nkeepalive = "30"'),
            {},
            "broker.keepalive",
            "expected an integer, got '30'",
            id="wrong-type",
        ),
        pytest.param(
            ("", ""),
            {"EDGEFLEET_AGENT__BROKER__KEEPALIVE": "soon"},
            "broker.keepalive",
            "expected an integer, got 'soon' (set by $EDGEFLEET_AGENT__BROKER__KEEPALIVE)",
            id="wrong-type-from-env",
        ),
        pytest.param(
            ("", "labels = [1]\n"),
            {},
            "labels",
            "expected a table, got a list of 1",
            id="table-expected",
        ),
        pytest.param(
            ("mqtt://broker.local", "http://broker.local"),
            {},
            "broker.url",
            "expected mqtt://host[:port] or mqtts://host[:port], got 'http://broker.local'",
            id="bad-url-scheme",
        ),
        pytest.param(
            ("mqtt://broker.local", "mqtt://broker.local:99999"),
            {},
            "broker.url",
            "(bad port)",
            id="bad-url-port",
        ),
        pytest.param(
            ("mqtt://broker.local", "mqtt://u:p@broker.local"),
            {},
            "broker.url",
            "(put credentials in username and password)",
            id="credentials-in-url",
        ),
        pytest.param(
            ("mqtt://broker.local", "mqtt:///nohost"),
            {},
            "broker.url",
            "expected mqtt://host[:port]",
            id="url-without-host",
        ),
        pytest.param(
            ("mqtt://broker.local", "mqtts://broker.local"),
            {"EDGEFLEET_AGENT__BROKER__CA_FILE": "missing-ca.pem"},
            "broker.ca_file",
            "expected an existing file,",
            id="missing-tls-file",
        ),
        pytest.param(
            (
                'url = "mqtt://broker.local"',
                "url = 'mqtts://b'\ncert_file = 'nope.pem'\nkey_file = 'k'",
            ),
            {},
            "broker.cert_file",
            "nope.pem does not exist",
            id="missing-cert-file",
        ),
        pytest.param(
            ('device_id = "pi-0001"', 'device_id = "pi/0001"'),
            {},
            "device_id",
            "expected 1 to 64 of [A-Za-z0-9._:-] starting with a letter or digit",
            id="bad-device-id",
        ),
        pytest.param(
            ('device_id = "pi-0001"', f'device_id = "{"x" * 65}"'),
            {},
            "device_id",
            "at most 64",
            id="device-id-too-long",
        ),
        pytest.param(
            ('device_id = "pi-0001"', ""),
            {},
            "device_id",
            "required key is missing",
            id="missing-device-id",
        ),
        pytest.param(
            ("", ""),
            {"EDGEFLEET_AGENT__TRUST__HUB_PUBLIC_KEYS": "[]"},
            "trust",
            "expected hub_public_keys or hub_public_keys_file",
            id="no-trusted-key",
        ),
        pytest.param(
            ("", ""),
            {"EDGEFLEET_AGENT__TRUST__HUB_PUBLIC_KEYS": '[{keyid = "k", public_key = "!"}]'},
            "trust.hub_public_keys[0]",
            "not valid base64",
            id="bad-hub-key",
        ),
        pytest.param(
            ("", ""),
            {"EDGEFLEET_AGENT__BROKER__PASSWORD": "pw"},
            "broker.username",
            "a password needs a username",
            id="password-without-username",
        ),
        pytest.param(
            ('url = "mqtt://broker.local"', "url = 'mqtts://b'\ncert_file = 'agent.toml'"),
            {},
            "broker.key_file",
            "cert_file and key_file go together",
            id="cert-without-key",
        ),
        pytest.param(
            ('url = "mqtt://broker.local"', "url = 'mqtt://b'\nca_file = 'agent.toml'"),
            {},
            "broker.ca_file",
            "TLS files need an mqtts:// url",
            id="tls-file-plain-url",
        ),
        pytest.param(
            ("", ""),
            {"EDGEFLEET_AGENT__BROKER__PROTOCOL": "4"},
            "broker.protocol",
            "expected one of '5' or '3.1.1', got '4'",
            id="bad-protocol",
        ),
        pytest.param(
            ("", ""),
            {"EDGEFLEET_AGENT__API__BIND": "8501"},
            "api.bind",
            'expected "host:port" or "unix:/absolute/path"',
            id="bad-bind",
        ),
        pytest.param(
            ("", ""),
            {"EDGEFLEET_AGENT__API__BIND": "unix:relative.sock"},
            "api.bind",
            'expected "host:port" or "unix:/absolute/path"',
            id="relative-unix-bind",
        ),
        pytest.param(
            ("", ""),
            {"EDGEFLEET_AGENT__TELEMETRY__OUTBOX_MAX_MESSAGES": "0"},
            "telemetry.outbox_max_messages",
            "expected a number of at least 1, got 0",
            id="bound-too-small",
        ),
        pytest.param(
            ("", 'profile = "Pi 4"\n'),
            {},
            "profile",
            "expected a profile name",
            id="bad-profile-name",
        ),
        pytest.param(
            ("", ""),
            {"EDGEFLEET_AGENT__LABELS__NOT OK": "x"},
            'labels."not ok"',
            "expected a label name",
            id="bad-label-name",
        ),
        pytest.param(
            ("", ""),
            {"EDGEFLEET_AGENT__BROKER__TLS__CA": "x"},
            "EDGEFLEET_AGENT__BROKER__TLS__CA",
            "expected EDGEFLEET_AGENT__<KEY> or EDGEFLEET_AGENT__<SECTION>__<KEY>",
            id="env-name-too-deep",
        ),
        pytest.param(
            ("", ""),
            {"EDGEFLEET_AGENT__DEVICE_ID__X": "x"},
            "device_id",
            "expected a table, so that $EDGEFLEET_AGENT__DEVICE_ID__X can set a key in it",
            id="env-section-is-a-value",
        ),
    ],
)
def test_errors_name_file_key_and_expectation(
    tmp_path: Path, text_edit: tuple[str, str], env: dict[str, str], field: str, expected: str
) -> None:
    old, new = text_edit
    text = minimal()
    text = new + text if old == "" else text.replace(old, new, 1)
    problem = error(tmp_path, text, **env)
    assert problem.field == field
    assert expected in problem.expected
    assert str(problem).startswith(f"{tmp_path / 'agent.toml'}: {field}: ")


def test_a_wrong_password_value_is_not_shown(tmp_path: Path) -> None:
    text = minimal().replace(
        'url = "mqtt://broker.local"', 'url = "mqtt://b"\nusername = "u"\npassword = 987654'
    )
    problem = error(tmp_path, text)
    assert problem.field == "broker.password"
    assert "987654" not in str(problem)
    assert "expected a string, got a value not shown here" in problem.expected


def test_toml_syntax_error_names_its_line(tmp_path: Path) -> None:
    problem = error(tmp_path, minimal() + "\n[api]\nbind = \n")
    assert problem.line == minimal().count("\n") + 3
    assert problem.field == "(toml)"
    assert problem.expected.startswith("invalid TOML: ")
    assert "line" not in problem.expected
    assert str(problem).startswith(f"{tmp_path / 'agent.toml'}:{problem.line}: (toml): ")


def test_unterminated_string_at_end_of_file(tmp_path: Path) -> None:
    problem = error(tmp_path, minimal() + 'log_level = "info')
    assert problem.line == minimal().count("\n") + 1


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"agent\.toml: \(file\): cannot read: No such file"):
        load_config(tmp_path / "agent.toml", {})
    path = tmp_path / "agent.toml"
    path.write_bytes(b"device_id = '\xff'\n")
    with pytest.raises(ManifestError, match=r"\(file\): expected UTF-8 text"):
        load_config(path, {})


def test_hub_key_file_errors_name_the_key_file(tmp_path: Path) -> None:
    keys = tmp_path / "hub-keys.json"
    text = minimal().replace("hub_public_keys = ", 'hub_public_keys_file = "hub-keys.json"\n#')
    keys.write_text(json.dumps({"keys": [HUB_KEY.model_dump()]}))
    assert trusted_keys(load(tmp_path, text)).keyids == {HUB_KEY.keyid}

    mismatched = {"keyid": OTHER_KEY.keyid, "public_key": HUB_KEY.public_key}
    keys.write_text(json.dumps([HUB_KEY.model_dump(), mismatched]))
    with pytest.raises(ManifestError) as caught:
        load(tmp_path, text)
    assert caught.value.source == str(keys)
    assert caught.value.field == "[1]"
    assert "does not match its public key" in caught.value.expected

    keys.write_text("[{")
    with pytest.raises(ManifestError, match=r"hub-keys\.json:1: \(json\): invalid JSON"):
        load(tmp_path, text)
    keys.write_text("[]")
    with pytest.raises(ManifestError, match="expected a non-empty JSON list of keys"):
        load(tmp_path, text)
    keys.write_text('[{"keyid": "x"}]')
    with pytest.raises(ManifestError, match=r"\[0\]: expected \{\"keyid\""):
        load(tmp_path, text)


def test_docs_list_every_key() -> None:
    """docs/configuration.md names every key and its environment variable."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    for name, field in AgentConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            for key in annotation.model_fields:
                if name == "trust" and annotation.__name__ == "HubKey":
                    continue
                assert f"`{key}`" in doc, f"{name}.{key} is not documented"
                variable = f"EDGEFLEET_AGENT__{name.upper()}__{key.upper()}"
                assert variable in doc, f"{variable} is not documented"
        else:
            assert f"`{name}`" in doc or f"`[{name}]`" in doc, f"{name} is not documented"
            if name != "labels":
                assert f"EDGEFLEET_AGENT__{name.upper()}" in doc


def test_update_retry_bounds_must_be_ordered(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        'device_id = "x"\n[broker]\nurl = "mqtt://127.0.0.1"\n'
        "[artifacts]\nupdate_retry_s = 100\nupdate_retry_max_s = 10\n"
    )
    with pytest.raises(ManifestError) as caught:
        load_config(path, {})
    assert "artifacts.update_retry_max_s: expected at least update_retry_s (100), got 10" in str(
        caught.value
    )

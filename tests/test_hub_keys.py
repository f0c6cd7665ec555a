"""Hub init, signing keys and their rotation, hub.toml, and the ``init`` / ``keys`` commands."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from contract.errors import BadSignature, UnknownKey
from contract.signing import PublicKey, TrustedKeys
from hub import cli
from hub.config import config_path, load_config, parse_config, render_config
from hub.errors import ConfigError, InitError, KeyringError
from hub.init import init_hub
from hub.keys import Keyring
from hub.store import SCHEMA_VERSION, Store
from support import hub_samples as samples

PAYLOAD = {"generation": 1, "device_id": "pi-1"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def published(path: Path) -> list[PublicKey]:
    """The keys an agent reads from the public key file."""
    return [PublicKey.model_validate(k) for k in json.loads(path.read_text())["keys"]]


@pytest.fixture
def ring(tmp_path: Path) -> Keyring:
    return Keyring.create(tmp_path / "keys", tmp_path / "hub-keys.json", clock=lambda: 100.0)


# --- keys ----------------------------------------------------------------------------------


def test_a_new_keyring_has_one_private_key_readable_only_by_the_hub(
    ring: Keyring, tmp_path: Path
) -> None:
    (key,) = ring.keys()
    assert (key.state, key.created_at) == ("active", 100.0)
    assert mode(tmp_path / "keys") == 0o700
    assert mode(tmp_path / "keys" / f"{key.keyid}.pem") == 0o600
    assert mode(ring.index_path) == 0o600
    assert mode(ring.public_file) == 0o644
    assert [k.keyid for k in published(ring.public_file)] == [key.keyid]
    assert "PRIVATE" not in ring.public_file.read_text()
    with pytest.raises(KeyringError, match="exists already"):
        Keyring.create(tmp_path / "keys", tmp_path / "hub-keys.json")


def test_the_published_keys_verify_what_the_signing_keys_sign(ring: Keyring) -> None:
    (signer,) = ring.signing_keys()
    trusted = TrustedKeys(published(ring.public_file))
    assert trusted.verify(PAYLOAD, [signer.sign(PAYLOAD)]) == signer.keyid
    with pytest.raises(BadSignature):
        trusted.verify({**PAYLOAD, "generation": 2}, [signer.sign(PAYLOAD)])


def test_rotation_adds_then_retires_keys(ring: Keyring, tmp_path: Path) -> None:
    (old,) = ring.keys()
    old_trust = TrustedKeys(published(ring.public_file))
    new = ring.add()
    assert mode(tmp_path / "keys" / f"{new.keyid}.pem") == 0o600
    assert [k.keyid for k in published(ring.public_file)] == [old.keyid, new.keyid]
    assert [k.keyid for k in ring.public_keys()] == [old.keyid, new.keyid]
    signatures = [key.sign(PAYLOAD) for key in ring.signing_keys()]
    assert old_trust.verify(PAYLOAD, signatures) == old.keyid  # agents not rotated yet

    retired = ring.retire(old.keyid[:10])
    assert (retired.state, retired.retired_at) == ("retired", 100.0)
    assert not (tmp_path / "keys" / f"{old.keyid}.pem").exists()
    assert [k.keyid for k in published(ring.public_file)] == [new.keyid]
    assert [k.keyid for k in ring.signing_keys()] == [new.keyid]
    every = ring.keys()
    assert [k.state for k in every] == ["retired", "active"]
    with pytest.raises(UnknownKey):
        old_trust.verify(PAYLOAD, [ring.signing_keys()[0].sign(PAYLOAD)])
    with pytest.raises(KeyringError, match="retired already"):
        ring.retire(old.keyid)
    with pytest.raises(KeyringError, match="only active key"):
        ring.retire(new.keyid)


def test_key_ids_are_found_by_unique_prefix(ring: Keyring) -> None:
    (key,) = ring.keys()
    assert ring.find(key.keyid[:8]) == key
    with pytest.raises(KeyringError, match="at least 8"):
        ring.find(key.keyid[:4])
    with pytest.raises(KeyringError, match="no key"):
        ring.find("0" * 64 if not key.keyid.startswith("0") else "1" * 64)


def test_a_damaged_key_file_is_reported(ring: Keyring, tmp_path: Path) -> None:
    (key,) = ring.keys()
    (tmp_path / "keys" / f"{key.keyid}.pem").write_text("not a key")
    with pytest.raises(KeyringError, match=r"\.pem"):
        ring.signing_keys()
    with pytest.raises(KeyringError, match="no keyring"):
        Keyring(tmp_path / "elsewhere", tmp_path / "x.json").keys()


# --- init ----------------------------------------------------------------------------------


def test_init_creates_the_data_directory(tmp_path: Path) -> None:
    directory = tmp_path / "hub"
    result = init_hub(directory, hub_id="hub-test", broker_url="mqtt://broker:1884")
    config = load_config(directory / "hub.toml")
    assert (config.hub_id, config.broker.url) == ("hub-test", "mqtt://broker:1884")
    assert config.data_path == directory.resolve()
    assert mode(directory) == 0o700
    assert mode(directory / "hub.toml") == 0o600
    assert mode(directory / "api-token") == 0o600
    assert len(config.api_token()) >= 32
    assert mode(config.keys_dir / f"{result.key.keyid}.pem") == 0o600
    assert [k.keyid for k in published(config.public_keys_path)] == [result.key.keyid]
    assert config.artifacts_dir.is_dir()
    with Store(config.store_path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.get_meta("hub_id") == "hub-test"


def test_init_refuses_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    init_hub(tmp_path / "hub")
    with pytest.raises(InitError, match="not empty"):
        init_hub(tmp_path / "hub")


def test_init_checks_its_options_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"broker\.url"):
        init_hub(tmp_path / "hub", broker_url="http://broker")
    assert not (tmp_path / "hub").exists()


# --- hub.toml ------------------------------------------------------------------------------


def test_the_written_configuration_round_trips() -> None:
    text = render_config(
        hub_id="hub-1",
        broker_url="mqtts://mqtt.example:8883",
        api_bind="0.0.0.0:8600",
        artifact_base_urls=["https://cdn.example/a/"],
    )
    config = parse_config(text, Path("/srv/hub/hub.toml"))
    assert config.broker.tls and config.broker.port == 8883
    assert config.artifacts.base_urls == ["https://cdn.example/a/"]
    assert config.store_path == Path("/srv/hub/hub.db")
    assert config.client_id == "edgefleet-hub-hub-1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hub_id = 3", "hub.toml: hub_id: expected a string, got 3"),
        ('[broker]\nurl = "http://x"', "broker.url: expected mqtt://host[:port]"),
        ('[broker]\nkeepalive = "30"', "broker.keepalive: expected an integer, got '30'"),
        ("[brokr]\nurl = 1", "brokr: unknown key; expected one of: hub_id, data_dir"),
        (
            '[broker]\nprotocol = "3.1.1"\nshared_group = "hub"',
            "broker.protocol: shared subscriptions need",
        ),
        ("[desired]\nresign_before_s = 1e9", "desired.resign_before_s: must be below"),
        ('[api]\ntoken = "abcdefghijklmnopq"', "api.token: set token or token_file"),
        ('[broker]\npassword = "secret1234"', "broker.username: a password needs a username"),
        ("x = ", "hub.toml:1: (toml): invalid TOML"),
    ],
)
def test_configuration_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, Path("hub.toml"))
    assert message in str(info.value)
    assert "secret1234" not in str(info.value)


def test_config_path_order(tmp_path: Path) -> None:
    assert config_path(tmp_path / "a.toml", {"EDGEFLEET_HUB_CONFIG": "b.toml"}) == (
        tmp_path / "a.toml"
    )
    assert config_path(None, {"EDGEFLEET_HUB_CONFIG": "b.toml"}) == Path("b.toml")
    assert config_path(None, {}) == Path("hub.toml")


def test_a_missing_configuration_file_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


# --- the commands --------------------------------------------------------------------------


def test_init_and_keys_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "hub"
    assert cli.main(["init", str(directory), "--hub-id", "hub-cli"]) == 0
    out = capsys.readouterr().out
    assert "created hub hub-cli" in out and "hub-keys.json" in out
    config = str(directory / "hub.toml")

    assert cli.main(["keys", "add", "--config", config]) == 0
    capsys.readouterr()
    assert cli.main(["keys", "list", "--config", config, "--json"]) == 0
    keys = json.loads(capsys.readouterr().out)
    assert [k["state"] for k in keys] == ["active", "active"]
    old = keys[0]["keyid"]

    # A device that never applied a document trusting the new key would be stranded.
    loaded = load_config(directory / "hub.toml")
    with Store(loaded.store_path) as store:
        store.record_birth(samples.birth("pi-1"), 1.0)
    assert cli.main(["keys", "retire", old, "--config", config]) == cli.ERROR_EXIT
    err = capsys.readouterr().err
    assert err.startswith("edgefleet-hub: error: 1 devices have not applied") and "pi-1" in err
    assert err.count("\n") == 1

    assert cli.main(["keys", "retire", old[:12], "--config", config, "--force"]) == 0
    assert f"retired signing key {old}" in capsys.readouterr().out
    assert [k.keyid for k in published(loaded.public_keys_path)] == [keys[1]["keyid"]]
    assert cli.main(["keys", "retire", keys[1]["keyid"], "--config", config]) == cli.ERROR_EXIT
    assert "only active key" in capsys.readouterr().err


def test_init_into_a_used_directory_is_one_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "something").write_text("x")
    assert cli.main(["init", str(tmp_path / "hub")]) == cli.ERROR_EXIT
    err = capsys.readouterr().err
    assert "not empty" in err and err.count("\n") == 1

"""``edgefleet-hub`` as a real subprocess against a real API server (uvicorn, real store):
tables and JSON, every error one line on stderr with a non-zero exit, the connection
settings, the local commands, and ``serve`` end to end."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.api import create_app
from hub.artifacts import ArtifactStore
from hub.broker import MosquittoBroker, free_port
from hub.cli import DEFAULT_HUB_URL, bind_url, build_parser, hub_token, hub_url, parse_since
from hub.config import load_config
from hub.errors import CliError, ConfigError
from hub.init import DEFAULT_API_BIND, init_hub
from hub.keys import Keyring
from hub.service import HubService
from hub.store import Store
from support.hub_api import TOKEN, ApiServer, StoreService, seed_devices, seed_telemetry

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "tests" / "fixtures" / "manifests"
EXE = str(Path(sys.executable).parent / "edgefleet-hub")
CLS_SHAPE = "x=1,3,48,192"


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``edgefleet-hub ARGS`` with a clean environment plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    base["COLUMNS"] = "250"
    return subprocess.run(
        [EXE, *args],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (asserting that is all there is)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgefleet-hub: error: ")
    return lines[0].removeprefix("edgefleet-hub: error: ")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "hub.db") as opened:
        yield opened


@pytest.fixture
def server(store: Store, tmp_path: Path) -> Iterator[ApiServer]:
    service = StoreService(store, tmp_path / "artifacts")
    with ApiServer(create_app(service, token=TOKEN)) as running:
        yield running


@pytest.fixture
def env(server: ApiServer) -> dict[str, str]:
    return {"EDGEFLEET_HUB_URL": server.url, "EDGEFLEET_HUB_TOKEN": TOKEN}


# --- fleet commands ----------------------------------------------------------------------------


def test_devices_list_as_a_table_and_as_json(env: dict[str, str], store: Store) -> None:
    ids = seed_devices(store, 4)
    table = ok(run("devices", "list", env=env))
    lines = table.splitlines()
    assert "DEVICE" in lines[0] and "ONLINE" in lines[0]
    for device_id in ids:
        (row,) = [line for line in lines if line.startswith(device_id + " ")]
        assert "raspberry-pi-4-4gb" in row
    listed = json.loads(ok(run("devices", "list", "--json", env=env)))
    assert [d["device_id"] for d in listed] == ids
    assert listed[0]["models"][0]["name"] == "det"

    def ids_of(*options: str) -> list[str]:
        return [
            d["device_id"]
            for d in json.loads(ok(run("devices", "list", "--json", *options, env=env)))
        ]

    assert ids_of("--label", "site=lab") == ["dev-000", "dev-002"]
    assert ids_of("--offline") == ["dev-001", "dev-003"]
    assert ids_of("--online", "--label", "n=2") == ["dev-002"]
    assert ids_of("--model", "det@4.0") == ["dev-000", "dev-002"]
    assert ids_of("--model", "det@9") == []
    assert ids_of("--profile", "raspberry-pi-4-4gb", "--limit", "3") == ids[:3]
    assert "no devices" in ok(run("devices", "list", "--label", "site=mars", env=env))
    assert "--label" in one_line_error(run("devices", "list", "--label", "site", env=env))


def test_devices_show(env: dict[str, str], store: Store) -> None:
    seed_devices(store, 1)
    seed_telemetry(store, "dev-000", 2)
    text = ok(run("devices", "show", "dev-000", env=env))
    assert "committed" in text and "det-int8" in text and "last telemetry" in text
    shown = json.loads(ok(run("devices", "show", "dev-000", "--json", env=env)))
    assert shown["device_id"] == "dev-000" and shown["last_telemetry"]["seq"] == 11
    assert one_line_error(run("devices", "show", "ghost", env=env)) == "no device 'ghost'"


def test_modelset_apply_with_a_bad_file_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes((MANIFESTS / "bad-precision.yaml").read_bytes())
    message = one_line_error(run("modelset", "apply", str(bad), env=env))
    assert message == (
        f"{bad}:13: models[0].variants[0].precision: expected one of 'int8', 'fp16' or "
        "'fp32', got 'int4'"
    )
    syntax = one_line_error(run("modelset", "apply", str(MANIFESTS / "bad-syntax.yaml"), env=env))
    assert syntax.startswith(f"{MANIFESTS / 'bad-syntax.yaml'}:")
    missing = one_line_error(run("modelset", "apply", str(tmp_path / "nope.yaml"), env=env))
    assert missing.startswith(f"{tmp_path / 'nope.yaml'}: cannot read")


def test_model_sets_policies_plan_events_telemetry(env: dict[str, str], store: Store) -> None:
    seed_devices(store, 4)
    seed_telemetry(store, "dev-001", 3)
    applied = ok(run("modelset", "apply", str(MANIFESTS / "modelset.yaml"), env=env))
    assert applied.strip() == "model set ocr 2024.06.1 applied (published)"
    assert "ocr-det@4.0" in ok(run("modelset", "list", env=env))
    assert (
        json.loads(ok(run("modelset", "show", "ocr", "--json", env=env)))["version"] == "2024.06.1"
    )
    assert "det-fp16" in ok(run("modelset", "show", "ocr", "2024.06.1", env=env))
    assert "ocr 9" in one_line_error(run("modelset", "show", "ocr", "9", env=env))

    assert "warehouse-ocr version 1 applied" in ok(
        run("policy", "apply", str(MANIFESTS / "policy.yaml"), env=env)
    )
    policies = json.loads(ok(run("policy", "list", "--json", env=env)))
    assert [(p["name"], p["version"]) for p in policies] == [("warehouse-ocr", 1)]
    assert "site=warehouse" in ok(run("policy", "show", "warehouse-ocr", env=env))
    assert json.loads(ok(run("policy", "list", "--all", "--json", env=env)))[0]["active"] is True

    plan = json.loads(ok(run("plan", "--label", "site=warehouse", "--json", env=env)))
    assert [d["device_id"] for d in plan["items"]] == ["dev-001", "dev-003"]
    table = ok(run("plan", "--device", "dev-001", env=env))
    assert "ocr-det" in table and "warehouse-ocr" in table
    assert "unassigned" in ok(run("plan", "--device", "dev-000", env=env))

    events = json.loads(ok(run("events", "--json", env=env)))
    assert {e["device_id"] for e in events} == {"dev-000", "dev-002"}
    assert (
        json.loads(ok(run("events", "--device", "dev-002", "--json", env=env)))[0]["kind"]
        == "update.committed"
    )
    assert "update.committed" in ok(run("events", "--limit", "1", env=env))
    assert json.loads(ok(run("events", "--since", "1d", "--json", env=env))) == []

    lines = ok(run("telemetry", "tail", "dev-001", "--json", "--limit", "2", env=env)).splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [11, 12]
    human = ok(run("telemetry", "tail", "dev-001", env=env)).splitlines()
    assert len(human) == 3 and "cpu 37.5%" in human[0]


def test_telemetry_follow_prints_new_messages(env: dict[str, str], store: Store) -> None:
    seed_devices(store, 1)
    seed_telemetry(store, "dev-000", 1)
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    proc = subprocess.Popen(
        [EXE, "telemetry", "tail", "dev-000", "--follow", "--interval", "0.2", "--json"],
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["seq"] == 10
        seed_telemetry(store, "dev-000", 2, start_seq=11)
        assert json.loads(proc.stdout.readline())["seq"] == 11
        assert json.loads(proc.stdout.readline())["seq"] == 12
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) in (0, 130)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_token_and_connection_errors_are_one_line(server: ApiServer, store: Store) -> None:
    seed_devices(store, 1)
    wrong = one_line_error(
        run(
            "devices",
            "list",
            env={"EDGEFLEET_HUB_URL": server.url, "EDGEFLEET_HUB_TOKEN": "wrong-token-123456"},
        )
    )
    assert wrong.startswith("wrong API token")
    flag = one_line_error(
        run(
            "--token",
            "nope",
            "devices",
            "list",
            env={"EDGEFLEET_HUB_URL": server.url, "EDGEFLEET_HUB_TOKEN": TOKEN},
        )
    )
    assert flag.startswith("wrong API token")
    none = one_line_error(run("devices", "list", env={"EDGEFLEET_HUB_URL": server.url}))
    assert none.startswith("no API token")
    unreachable = one_line_error(
        run("devices", "list", "--hub", f"http://127.0.0.1:{free_port()}", "--token", TOKEN)
    )
    assert unreachable.startswith("cannot reach the hub at http://127.0.0.1:")
    scheme = one_line_error(run("devices", "list", "--hub", "ftp://x", "--token", TOKEN))
    assert scheme.startswith("hub URL: expected http://")


def test_connection_from_hub_toml(server: ApiServer, store: Store, tmp_path: Path) -> None:
    seed_devices(store, 2)
    (tmp_path / "api-token").write_text(TOKEN + "\n")
    config = tmp_path / "hub.toml"
    config.write_text(f'[api]\nbind = "0.0.0.0:{server.port}"\ntoken_file = "api-token"\n')
    listed = json.loads(ok(run("--config", str(config), "devices", "list", "--json")))
    assert [d["device_id"] for d in listed] == ["dev-000", "dev-001"]
    # after the command too, and through the environment
    assert ok(run("devices", "list", "--config", str(config), "--json"))
    assert ok(run("devices", "list", "--json", env={"EDGEFLEET_HUB_CONFIG": str(config)}))
    health = json.loads(ok(run("health", "--config", str(config), "--json")))
    assert health["status"] == "ok"
    # --hub and --token win over the file
    bad = one_line_error(run("devices", "list", "--config", str(config), "--token", "x" * 20))
    assert bad.startswith("wrong API token")
    broken = tmp_path / "broken.toml"
    broken.write_text("[api]\nbind = 8600\n")
    assert one_line_error(run("devices", "list", "--config", str(broken))).startswith(f"{broken}")


def test_connection_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EDGEFLEET_HUB_URL", "EDGEFLEET_HUB_TOKEN", "EDGEFLEET_HUB_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    assert bind_url(DEFAULT_API_BIND) == DEFAULT_HUB_URL
    assert bind_url("0.0.0.0:9000") == "http://127.0.0.1:9000"
    assert bind_url("[::]:9000") == "http://[::1]:9000"
    assert bind_url("hub.lan:9000") == "http://hub.lan:9000"
    args = build_parser().parse_args(["devices", "list"])
    assert hub_url(args, None) == DEFAULT_HUB_URL
    monkeypatch.setenv("EDGEFLEET_HUB_URL", "http://env:1")
    assert hub_url(args, None) == "http://env:1"
    (tmp_path / "t").write_text("t" * 20)
    config = tmp_path / "hub.toml"
    config.write_text('[api]\nbind = "10.0.0.5:7000"\ntoken_file = "t"\n')
    loaded = load_config(config)
    with_flag = build_parser().parse_args(["--config", str(config), "devices", "list"])
    # the config of --config beats the environment; that of $EDGEFLEET_HUB_CONFIG does not
    assert hub_url(with_flag, loaded) == "http://10.0.0.5:7000"
    assert hub_url(args, loaded) == "http://env:1"
    monkeypatch.delenv("EDGEFLEET_HUB_URL")
    assert hub_url(args, loaded) == "http://10.0.0.5:7000"
    assert hub_token(args, loaded) == "t" * 20
    monkeypatch.setenv("EDGEFLEET_HUB_TOKEN", "from-env")
    assert hub_token(args, loaded) == "from-env"
    assert hub_token(with_flag, loaded) == "t" * 20
    given = build_parser().parse_args(["--hub", "http://a:1", "devices", "list", "--token", "tok"])
    assert (hub_url(given, loaded), hub_token(given, loaded)) == ("http://a:1", "tok")
    monkeypatch.delenv("EDGEFLEET_HUB_TOKEN")
    with pytest.raises(CliError, match="no API token"):
        hub_token(args, None)
    (tmp_path / "t").write_text("short")
    with pytest.raises(ConfigError):
        hub_token(args, load_config(config))


def test_since_accepts_durations_times_and_seconds() -> None:
    now = 1_750_000_000.0
    assert parse_since("30s", now) == now - 30
    assert parse_since("10m", now) == now - 600
    assert parse_since("2h", now) == now - 7200
    assert parse_since("1d", now) == now - 86400
    assert parse_since("1700000000", now) == 1_700_000_000.0
    assert parse_since("2025-06-15T00:00:00Z", now) == 1_749_945_600.0
    assert parse_since("2025-06-15 00:00:00", now) == 1_749_945_600.0
    with pytest.raises(CliError, match="--since"):
        parse_since("yesterday", now)


def test_options_before_and_after_the_command() -> None:
    parser = build_parser()
    before = parser.parse_args(["--hub", "http://h:1", "--token", "t", "plan", "--json"])
    after = parser.parse_args(["plan", "--hub", "http://h:1", "--token", "t", "--json"])
    for args in (before, after):
        assert (args.hub, args.token, args.json) == ("http://h:1", "t", True)
    plain = parser.parse_args(["devices", "list"])
    assert (plain.hub, plain.token, plain.config, plain.online) == (None, None, None, None)
    assert parser.parse_args(["devices", "list", "--offline"]).online is False
    with pytest.raises(SystemExit):
        parser.parse_args(["devices", "list", "--online", "--offline"])
    assert isinstance(plain, argparse.Namespace)


# --- the real service: models --------------------------------------------------------------------


@pytest.fixture
def real_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    created = init_hub(tmp_path / "hub", hub_id="hub-cli")
    config = load_config(created.config_path)
    with Store(config.store_path) as store:
        service = HubService(
            config,
            store,
            artifacts=ArtifactStore(config.artifacts_dir),
            keys=Keyring(config.keys_dir, config.public_keys_path),
            publisher=None,
        )
        with ApiServer(create_app(service)) as server:
            yield {
                "EDGEFLEET_HUB_URL": server.url,
                "EDGEFLEET_HUB_CONFIG": str(created.config_path),
            }


def test_model_add_a_real_ocr_model(real_env: dict[str, str], ocr_models: dict[str, Path]) -> None:
    path = ocr_models["cls"]
    added = json.loads(
        ok(
            run(
                "model",
                "add",
                str(path),
                "--name",
                "ocr-cls",
                "--version",
                "2.0",
                "--input",
                CLS_SHAPE,
                "--quantize",
                "int8",
                "--json",
                env=real_env,
                timeout=600,
            )
        )
    )
    assert [(v["variant"], v["precision"]) for v in added] == [("fp32", "fp32"), ("int8", "int8")]
    assert added[0]["size"] == path.stat().st_size
    assert added[0]["load_memory_mb"] and added[1]["drift"]
    table = ok(run("model", "list", env=real_env))
    assert "ocr-cls" in table and "int8" in table
    shown = json.loads(ok(run("model", "show", "ocr-cls", "--json", env=real_env)))
    assert shown["versions"] == ["2.0"] and len(shown["variants"]) == 2
    assert "sha256" in ok(run("model", "show", "ocr-cls", env=real_env))
    # the same file again is accepted (content-addressed); junk is one line naming the file
    again = ok(
        run(
            "model",
            "add",
            str(path),
            "--name",
            "ocr-cls",
            "--version",
            "2.0",
            "--json",
            env=real_env,
        )
    )
    assert json.loads(again)[0]["sha256"] == added[0]["sha256"]
    junk = path.parent / "README.md"
    if not junk.exists():
        junk = Path(__file__)
    message = one_line_error(
        run("model", "add", str(junk), "--name", "x", "--version", "1", env=real_env)
    )
    assert message.startswith(f"{junk.name}: ")
    assert (
        one_line_error(
            run("model", "add", "/nonexistent.onnx", "--name", "x", "--version", "1", env=real_env)
        )
        == "/nonexistent.onnx: no such file"
    )
    bad_input = one_line_error(
        run(
            "model",
            "add",
            str(path),
            "--name",
            "x",
            "--version",
            "1",
            "--input",
            "x=1,a",
            env=real_env,
        )
    )
    assert bad_input.startswith("--input: expected NAME=")


# --- local commands ------------------------------------------------------------------------------


def test_init_and_keys(tmp_path: Path) -> None:
    hub_dir = tmp_path / "hub"
    created = ok(run("init", str(hub_dir), "--hub-id", "hub-keys"))
    assert "created hub hub-keys" in created
    config = str(hub_dir / "hub.toml")
    keys = json.loads(ok(run("keys", "list", "--config", config, "--json")))
    assert [k["state"] for k in keys] == ["active"]
    first = keys[0]["keyid"]
    assert "added signing key" in ok(run("keys", "add", "--config", config))
    assert "retired" in ok(run("keys", "retire", first[:12], "--config", config))
    states = {
        k["keyid"]: k["state"]
        for k in json.loads(ok(run("keys", "list", "--config", config, "--json")))
    }
    assert states[first] == "retired" and list(states.values()).count("active") == 1
    (last,) = [k for k, s in states.items() if s == "active"]
    assert "only active key" in one_line_error(run("keys", "retire", last, "--config", config))
    assert "not empty" in one_line_error(run("init", str(hub_dir)))
    assert "KEY ID" in ok(run("keys", "list", env={"EDGEFLEET_HUB_CONFIG": config}))


def test_init_takes_the_listening_addresses(tmp_path: Path) -> None:
    hub_dir = tmp_path / "hub"
    ok(
        run(
            "init",
            str(hub_dir),
            "--api-bind",
            "127.0.0.1:18600",
            "--artifacts-bind",
            "[::1]:18601",
        )
    )
    config = load_config(hub_dir / "hub.toml")
    assert (config.api.bind, config.artifacts.bind) == ("127.0.0.1:18600", "[::1]:18601")
    error = one_line_error(run("init", str(tmp_path / "other"), "--artifacts-bind", "nowhere"))
    assert "artifacts.bind" in error and "host:port" in error
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_serve_then_drive_it_with_the_cli(tmp_path: Path, broker: MosquittoBroker) -> None:
    api_port = free_port()
    created = init_hub(
        tmp_path / "hub",
        hub_id="hub-serve",
        broker_url=broker.url,
        api_bind=f"127.0.0.1:{api_port}",
        artifacts_bind=f"127.0.0.1:{free_port()}",
    )
    path = created.config_path
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [EXE, "serve", "--config", str(path)], env=base, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            health = run("health", "--config", str(path), "--json")
            if health.returncode == 0:
                break
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, health.stderr
            time.sleep(0.3)
        assert json.loads(health.stdout)["hub_id"] == "hub-serve"
        assert json.loads(ok(run("devices", "list", "--config", str(path), "--json"))) == []
        bad = one_line_error(
            run("modelset", "apply", str(MANIFESTS / "bad-precision.yaml"), "--config", str(path))
        )
        assert ":13: models[0].variants[0].precision" in bad
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()

"""``edgefleet-hub``: the operators' command line.

Each command group adds itself to the parser in an ``_add_<group>`` function and sets
``handler`` (a function of the parsed arguments returning the exit code). Any
``EdgefleetError`` a handler raises becomes one line on stderr and exit code 2.

Local commands work on the hub's files (``init``, ``keys``, ``schema``, ``serve``); the fleet
commands (``devices``, ``model``, ``modelset``, ``policy``, ``plan``, ``events``,
``telemetry``, ``health``) are clients of a running hub's HTTP API:

- the hub's URL: ``--hub URL``, else ``[api] bind`` of the hub.toml given with
  ``--config``, else ``$EDGEFLEET_HUB_URL``, else the bind of ``$EDGEFLEET_HUB_CONFIG``'s
  file, else ``DEFAULT_HUB_URL``;
- the API token: ``--token``, else the ``--config`` file's, else ``$EDGEFLEET_HUB_TOKEN``,
  else ``$EDGEFLEET_HUB_CONFIG``'s.

The command line beats the environment; within each, a URL or token given as such beats
one read from a configuration file. The fleet commands print tables for people and, with
``--json``, JSON for scripts (hub/cli_output.py).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from contract import __version__
from contract.errors import EdgefleetError
from hub.errors import ClientError, CliError

if TYPE_CHECKING:
    from hub.api_models import TelemetryItem
    from hub.client import HubClient
    from hub.config import HubConfig

PROG = "edgefleet-hub"
ERROR_EXIT = 2
URL_ENV = "EDGEFLEET_HUB_URL"
TOKEN_ENV = "EDGEFLEET_HUB_TOKEN"
DEFAULT_HUB_URL = "http://127.0.0.1:8600"
"""Where the fleet commands look for the API by default: hub.toml's default ``[api] bind``."""
FOLLOW_INTERVAL_S = 2.0

Handler = Callable[[argparse.Namespace], int]
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


# --- schema ----------------------------------------------------------------------------------


def _schema_export(args: argparse.Namespace) -> int:
    from hub.schema_export import export_schemas

    written = export_schemas(args.dir)
    print(f"wrote {len(written)} schemas to {args.dir}")
    return 0


def _schema_reference(args: argparse.Namespace) -> int:
    from hub.schema_export import render_reference

    sys.stdout.write(render_reference())
    return 0


def _add_schema(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    schema = commands.add_parser("schema", help="JSON Schemas and reference of the wire messages")
    sub = schema.add_subparsers(dest="schema_command", metavar="COMMAND", required=True)
    export = sub.add_parser("export", help="write one JSON Schema file per message into DIR")
    export.add_argument("dir", metavar="DIR", type=Path)
    export.set_defaults(handler=_schema_export)
    reference = sub.add_parser(
        "reference", help="print the Markdown topic and message reference (docs/reference)"
    )
    reference.set_defaults(handler=_schema_reference)


# --- init, keys, serve (local) ---------------------------------------------------------------


def _load_local_config(args: argparse.Namespace) -> HubConfig:
    from hub.config import config_path, load_config

    return load_config(config_path(args.config))


def _init(args: argparse.Namespace) -> int:
    from hub.init import DEFAULT_API_BIND, DEFAULT_BROKER_URL, init_hub

    result = init_hub(
        args.dir,
        hub_id=args.hub_id,
        broker_url=args.broker_url or DEFAULT_BROKER_URL,
        api_bind=args.api_bind or DEFAULT_API_BIND,
        artifact_base_urls=args.artifact_base_url or None,
    )
    config = result.config
    print(f"created hub {config.hub_id} in {result.directory}")
    print(f"  configuration   {result.config_path}")
    print(f"  signing key     {result.key.keyid}")
    print(f"  agents' keys    {config.public_keys_path}  (trust.hub_public_keys_file)")
    print(f"  API token       {config.path(config.api.token_file or 'api-token')}")
    print(f"run it with: {PROG} serve --config {result.config_path}")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from hub import cli_output
    from hub.keys import Keyring

    config = _load_local_config(args)
    keys = Keyring(config.keys_dir, config.public_keys_path).keys()
    if args.json:
        cli_output.print_json([asdict(k) for k in keys])
    else:
        cli_output.keys_table(keys)
    return 0


def _keys_add(args: argparse.Namespace) -> int:
    from hub.keys import Keyring

    config = _load_local_config(args)
    info = Keyring(config.keys_dir, config.public_keys_path).add()
    print(f"added signing key {info.keyid}; documents are now signed with every active key")
    print(f"retire the old key once every device applied one: {PROG} keys retire OLD-KEYID")
    return 0


def _keys_retire(args: argparse.Namespace) -> int:
    from hub.keys import Keyring
    from hub.store import Store

    config = _load_local_config(args)
    ring = Keyring(config.keys_dir, config.public_keys_path)
    target = ring.find(args.keyid)
    remaining = [k.keyid for k in ring.active() if k.keyid != target.keyid]
    if remaining and not args.force:
        with Store(config.store_path) as store:
            pending = store.devices_not_trusting(remaining)
        if pending:
            shown = ", ".join(pending[:5]) + (
                f" and {len(pending) - 5} more" if len(pending) > 5 else ""
            )
            raise CliError(
                f"{len(pending)} devices have not applied a document that trusts the other "
                f"active keys ({shown}); retiring {target.keyid[:12]} now would strand them "
                "(--force retires anyway)"
            )
    retired = ring.retire(target.keyid)
    print(f"retired signing key {retired.keyid}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from hub.config import config_path
    from hub.server import run_server

    return run_server(config_path(args.config))


def _add_local(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    init = commands.add_parser("init", help="create a hub data directory (store, keys, token)")
    init.add_argument("dir", metavar="DIR", type=Path)
    init.add_argument("--hub-id", help="the hub's id (default: hub-<hostname>)")
    init.add_argument("--broker-url", metavar="URL", help="mqtt://host:port or mqtts://...")
    init.add_argument("--api-bind", metavar="HOST:PORT", help="where the HTTP API listens")
    init.add_argument(
        "--artifact-base-url",
        metavar="URL",
        action="append",
        help="an external server of the artifacts (repeatable)",
    )
    init.set_defaults(handler=_init)

    config = _config_option()
    keys = commands.add_parser("keys", help="the hub's signing keys and their rotation")
    sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    listing = sub.add_parser(
        "list", help="every key, active and retired", parents=[config, _json()]
    )
    listing.set_defaults(handler=_keys_list)
    add = sub.add_parser("add", help="add an active signing key", parents=[config])
    add.set_defaults(handler=_keys_add)
    retire = sub.add_parser(
        "retire", help="stop signing with a key (not the last one)", parents=[config]
    )
    retire.add_argument("keyid", metavar="KEYID", help="the key id or a prefix of 8+ characters")
    retire.add_argument(
        "--force", action="store_true", help="even if devices do not trust the other keys yet"
    )
    retire.set_defaults(handler=_keys_retire)

    serve = commands.add_parser(
        "serve", help="run the hub (ingest, controller, HTTP API)", parents=[config]
    )
    serve.set_defaults(handler=_serve)


# --- the API client ----------------------------------------------------------------------


def _client_config(args: argparse.Namespace) -> HubConfig | None:
    """The hub.toml named by ``--config`` or ``$EDGEFLEET_HUB_CONFIG``; None without one."""
    from hub.config import CONFIG_ENV, load_config

    path = args.config or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    return None if path is None else load_config(path)


def bind_url(bind: str) -> str:
    """The URL a client uses for an ``[api] bind`` address (a wildcard means this host)."""
    host, _, port = bind.rpartition(":")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"http://{host}:{port}"


def hub_url(args: argparse.Namespace, config: HubConfig | None) -> str:
    """``--hub``; else the ``[api] bind`` of ``--config``; else ``$EDGEFLEET_HUB_URL``; else
    that of ``$EDGEFLEET_HUB_CONFIG``; else ``DEFAULT_HUB_URL``."""
    url: str | None = args.hub
    if not url and config is not None and args.config is not None:
        url = bind_url(config.api.bind)
    url = url or os.environ.get(URL_ENV)
    if not url and config is not None:
        url = bind_url(config.api.bind)
    url = url or DEFAULT_HUB_URL
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"hub URL: expected http://host:port or https://..., got {url!r}")
    return url


def hub_token(args: argparse.Namespace, config: HubConfig | None) -> str:
    """``--token``; else the token of ``--config``; else ``$EDGEFLEET_HUB_TOKEN``; else that
    of ``$EDGEFLEET_HUB_CONFIG``."""
    token: str | None = args.token
    if not token and config is not None and args.config is not None:
        token = config.api_token()
    token = token or os.environ.get(TOKEN_ENV)
    if not token and config is not None:
        token = config.api_token()
    if not token:
        raise CliError(
            f"no API token: give --token, set {TOKEN_ENV}, or --config the hub's hub.toml"
        )
    return token


def _client(args: argparse.Namespace) -> HubClient:
    from hub.client import HubClient

    config = _client_config(args)
    return HubClient(hub_url(args, config), hub_token(args, config))


def _labels(values: Sequence[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for value in values or ():
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise CliError(f"--label: expected KEY=VALUE, got {value!r}")
        labels[key] = val
    return labels


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CliError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise CliError(f"{path}: cannot read: {exc.strerror or exc}") from None


def parse_since(value: str, now: float | None = None) -> float:
    """``30s``/``10m``/``2h``/``1d`` ago, an ISO 8601 time, or Unix seconds."""
    text = value.strip()
    match = _DURATION.match(text)
    if match:
        now = time.time() if now is None else now
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(
            f"--since: expected 30s, 10m, 2h, 1d, an ISO time or Unix seconds, got {value!r}"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _input_shapes(values: Sequence[str] | None) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for value in values or ():
        name, sep, dims = value.rpartition("=")
        try:
            shape = [int(d) for d in dims.split(",")]
        except ValueError:
            shape = []
        if not sep or not name or not shape or any(d < 1 for d in shape):
            raise CliError(f"--input: expected NAME=D1,D2,... (positive sizes), got {value!r}")
        shapes[name] = shape
    return shapes


# --- fleet commands ----------------------------------------------------------------------


def _health(args: argparse.Namespace) -> int:
    from hub import cli_output

    with _client(args) as hub:
        health = hub.health()
        if args.json:
            cli_output.print_model(health)
        else:
            print(
                f"hub {health.hub_id or '?'} at {hub.url}: {health.status} "
                f"(version {health.version}, store schema {health.schema_version})"
            )
    return 0


def _devices_list(args: argparse.Namespace) -> int:
    from hub import cli_output

    model = version = None
    if args.model:
        name, _, ver = args.model.partition("@")
        model, version = name or None, ver or None
    with _client(args) as hub:
        devices = list(
            hub.iter_devices(
                labels=_labels(args.label),
                profile=args.profile,
                online=args.online,
                model=model,
                model_version=version,
                limit=args.limit,
            )
        )
    if args.json:
        cli_output.print_models(devices)
    else:
        cli_output.devices_table(devices)
    return 0


def _devices_show(args: argparse.Namespace) -> int:
    from hub import cli_output

    with _client(args) as hub:
        device = hub.device(args.device_id)
    if args.json:
        cli_output.print_model(device)
    else:
        cli_output.device_detail(device)
    return 0


def _model_add(args: argparse.Namespace) -> int:
    from hub import cli_output

    path: Path = args.file
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    with _client(args) as hub:
        variants = hub.add_model(
            path,
            name=args.name,
            version=args.version,
            variant=args.variant,
            precision=args.precision,
            quantize=args.quantize,
            input_shapes=_input_shapes(args.input),
            memory_mb=args.memory_mb,
        )
    if args.json:
        cli_output.print_models(variants)
    else:
        cli_output.models_table(variants)
    return 0


def _model_list(args: argparse.Namespace) -> int:
    from hub import cli_output

    with _client(args) as hub:
        variants = list(hub.iter_models(name=args.name))
    if args.json:
        cli_output.print_models(variants)
    else:
        cli_output.models_table(variants)
    return 0


def _model_show(args: argparse.Namespace) -> int:
    from hub import cli_output

    with _client(args) as hub:
        model = hub.model(args.name, args.version)
    if args.json:
        cli_output.print_model(model)
    else:
        cli_output.model_detail(model)
    return 0


def _modelset_apply(args: argparse.Namespace) -> int:
    from hub import cli_output

    text = _read_text(args.file)
    with _client(args) as hub:
        record = hub.apply_model_set(text, str(args.file))
    if args.json:
        cli_output.print_model(record)
    else:
        state = "published" if record.published else "draft"
        print(f"model set {record.name} {record.version} applied ({state})")
    return 0


def _modelset_list(args: argparse.Namespace) -> int:
    from hub import cli_output

    with _client(args) as hub:
        records = list(hub.iter_model_sets(name=args.name))
    if args.json:
        cli_output.print_models(records)
    else:
        cli_output.model_sets_table(records)
    return 0


def _modelset_show(args: argparse.Namespace) -> int:
    from hub import cli_output

    with _client(args) as hub:
        record = hub.model_set(args.name, args.version)
    if args.json:
        cli_output.print_model(record)
    else:
        cli_output.model_set_detail(record)
    return 0


def _policy_apply(args: argparse.Namespace) -> int:
    from hub import cli_output

    text = _read_text(args.file)
    with _client(args) as hub:
        record = hub.apply_policy(text, str(args.file))
    if args.json:
        cli_output.print_model(record)
    else:
        print(f"policy {record.name} version {record.version} applied (active)")
    return 0


def _policy_list(args: argparse.Namespace) -> int:
    from hub import cli_output

    with _client(args) as hub:
        records = list(hub.iter_policies(all_versions=args.all))
    if args.json:
        cli_output.print_models(records)
    else:
        cli_output.policies_table(records)
    return 0


def _policy_show(args: argparse.Namespace) -> int:
    from hub import cli_output

    with _client(args) as hub:
        record = hub.policy(args.name, args.version)
    if args.json:
        cli_output.print_model(record)
    else:
        cli_output.policy_detail(record)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from hub import cli_output

    with _client(args) as hub:
        plan = hub.plan(
            labels=_labels(args.label), profiles=args.profile or (), devices=args.device or ()
        )
    if args.json:
        cli_output.print_model(plan)
    else:
        cli_output.plan_table(plan)
    return 0


def _events(args: argparse.Namespace) -> int:
    from hub import cli_output

    since = parse_since(args.since) if args.since else None
    with _client(args) as hub:
        events = list(
            hub.iter_events(device=args.device, kind=args.kind, since=since, limit=args.limit)
        )
    if args.json:
        cli_output.print_models(events)
    else:
        cli_output.events_table(events)
    return 0


def _telemetry_tail(args: argparse.Namespace) -> int:
    from hub import cli_output

    with _client(args) as hub:
        for item in _telemetry_items(hub, args):
            if args.json:
                cli_output.print_json_line(item)
            else:
                cli_output.telemetry_line(item)
            sys.stdout.flush()
    return 0


def _telemetry_items(hub: HubClient, args: argparse.Namespace) -> Iterator[TelemetryItem]:
    page = hub.telemetry(args.device_id, limit=args.limit)
    yield from page.items
    cursor = page.next_cursor
    while args.follow:
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return
        page = hub.telemetry(args.device_id, limit=500, cursor=cursor)
        yield from page.items
        cursor = page.next_cursor


def _config_option() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        default=argparse.SUPPRESS,
        help="the hub's hub.toml (default: $EDGEFLEET_HUB_CONFIG, else ./hub.toml)",
    )
    return parent


def _json() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help="print JSON for scripts")
    return parent


def _connection(*, suppress: bool) -> argparse.ArgumentParser:
    """--hub, --token and --config; on subcommands they default to SUPPRESS so that the
    value given before the command is kept."""
    parent = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    group = parent.add_argument_group("hub connection")
    group.add_argument(
        "--hub",
        metavar="URL",
        default=default,
        help=f"the hub's API (default: --config's [api] bind, ${URL_ENV}, {DEFAULT_HUB_URL})",
    )
    group.add_argument(
        "--token", default=default, help=f"the API token (default: ${TOKEN_ENV}, --config's)"
    )
    group.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        default=default,
        help="the hub's hub.toml (default: $EDGEFLEET_HUB_CONFIG)",
    )
    return parent


def _add_fleet(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    conn = _connection(suppress=True)
    out = _json()
    both = [conn, out]

    health = commands.add_parser("health", help="check the hub answers and the token", parents=both)
    health.set_defaults(handler=_health)

    devices = commands.add_parser("devices", help="devices the hub knows")
    sub = devices.add_subparsers(dest="devices_command", metavar="COMMAND", required=True)
    listing = sub.add_parser("list", help="devices matching every filter given", parents=both)
    listing.add_argument(
        "--label", metavar="KEY=VALUE", action="append", help="label equal to (repeatable)"
    )
    listing.add_argument("--profile", help="firmware profile name")
    online = listing.add_mutually_exclusive_group()
    online.add_argument("--online", dest="online", action="store_const", const=True)
    online.add_argument("--offline", dest="online", action="store_const", const=False)
    listing.add_argument(
        "--model", metavar="NAME[@VERSION]", help="runs this model (and version), as reported"
    )
    listing.add_argument("--limit", type=int, help="at most this many devices")
    listing.set_defaults(handler=_devices_list, online=None)
    show = sub.add_parser("show", help="one device in full", parents=both)
    show.add_argument("device_id", metavar="DEVICE")
    show.set_defaults(handler=_devices_show)

    model = commands.add_parser("model", help="ONNX models and their variants")
    sub = model.add_subparsers(dest="model_command", metavar="COMMAND", required=True)
    add = sub.add_parser(
        "add", help="upload, inspect, measure and store an ONNX file", parents=both
    )
    add.add_argument("file", metavar="FILE", type=Path)
    add.add_argument("--name", required=True)
    add.add_argument("--version", required=True)
    add.add_argument("--variant", help="variant name (default: from name and precision)")
    add.add_argument("--precision", choices=("int8", "fp16", "fp32"))
    add.add_argument("--quantize", choices=("int8",), help="also derive an int8 variant")
    add.add_argument(
        "--input",
        metavar="NAME=D1,D2,...",
        action="append",
        help="concrete shape for an input with dynamic sizes (repeatable)",
    )
    add.add_argument("--memory-mb", type=int, help="memory the variant needs, if not measured")
    add.set_defaults(handler=_model_add)
    listing = sub.add_parser("list", help="every variant of every model", parents=both)
    listing.add_argument("--name", help="only this model")
    listing.set_defaults(handler=_model_list)
    show = sub.add_parser("show", help="one model's versions and variants", parents=both)
    show.add_argument("name", metavar="NAME")
    show.add_argument("--version", help="only this version")
    show.set_defaults(handler=_model_show)

    modelset = commands.add_parser("modelset", help="model sets (YAML)")
    sub = modelset.add_subparsers(dest="modelset_command", metavar="COMMAND", required=True)
    apply = sub.add_parser("apply", help="validate and publish a model-set file", parents=both)
    apply.add_argument("file", metavar="FILE", type=Path)
    apply.set_defaults(handler=_modelset_apply)
    listing = sub.add_parser("list", help="every model set version", parents=both)
    listing.add_argument("--name", help="only this model set")
    listing.set_defaults(handler=_modelset_list)
    show = sub.add_parser("show", help="one model set (newest version by default)", parents=both)
    show.add_argument("name", metavar="NAME")
    show.add_argument("version", metavar="VERSION", nargs="?")
    show.set_defaults(handler=_modelset_show)

    policy = commands.add_parser("policy", help="policies (YAML)")
    sub = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    apply = sub.add_parser("apply", help="store a policy file as the active version", parents=both)
    apply.add_argument("file", metavar="FILE", type=Path)
    apply.set_defaults(handler=_policy_apply)
    listing = sub.add_parser("list", help="the active policies", parents=both)
    listing.add_argument("--all", action="store_true", help="every version of every policy")
    listing.set_defaults(handler=_policy_list)
    show = sub.add_parser("show", help="one policy (the active version by default)", parents=both)
    show.add_argument("name", metavar="NAME")
    show.add_argument("--version", type=int)
    show.set_defaults(handler=_policy_show)

    plan = commands.add_parser(
        "plan", help="what matching devices would run, before anything is published", parents=both
    )
    plan.add_argument("--label", metavar="KEY=VALUE", action="append", help="(repeatable)")
    plan.add_argument("--profile", action="append", help="profile name (repeatable)")
    plan.add_argument("--device", action="append", help="device id (repeatable)")
    plan.set_defaults(handler=_plan)

    events = commands.add_parser("events", help="device events, newest first", parents=both)
    events.add_argument("--device", help="only this device")
    events.add_argument("--kind", help="only this kind (e.g. update.failed)")
    events.add_argument("--since", help="30s, 10m, 2h, 1d ago, an ISO time or Unix seconds")
    events.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    events.set_defaults(handler=_events)

    telemetry = commands.add_parser("telemetry", help="device telemetry")
    sub = telemetry.add_subparsers(dest="telemetry_command", metavar="COMMAND", required=True)
    tail = sub.add_parser(
        "tail", help="a device's newest telemetry (--json: one message per line)", parents=both
    )
    tail.add_argument("device_id", metavar="DEVICE")
    tail.add_argument("--limit", type=int, default=10, help="how many to show first (default 10)")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new messages")
    tail.add_argument(
        "--interval", type=float, default=FOLLOW_INTERVAL_S, help="seconds between polls"
    )
    tail.set_defaults(handler=_telemetry_tail)


def build_parser() -> argparse.ArgumentParser:
    """The full parser; command groups register themselves here."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage an edgefleet fleet.",
        parents=[_connection(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_schema(commands)
    _add_local(commands)
    _add_fleet(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (2 with one line on stderr for an error)."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except EdgefleetError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, ClientError) and exc.status == 401:
            message += f" (give --token, set {TOKEN_ENV}, or --config the hub's hub.toml)"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return ERROR_EXIT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader (head, less) went away: nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

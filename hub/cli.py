"""``edgefleet-hub``: the operators' command line.

Each command group adds itself to the parser in an ``_add_<group>`` function and sets
``handler`` (a function of the parsed arguments returning the exit code). Any
``EdgefleetError`` a handler raises becomes one line on stderr and exit code 2.

Local commands work on the hub's files (``init``, ``keys``, ``schema``, ``serve``) and on the
fleet CA (``ca init|crl``, ``device enroll|revoke|evict``, ``broker-config``; see
docs/enrollment.md); the fleet commands (``devices``, ``model``, ``modelset``, ``policy``,
``plan``, ``events``, ``telemetry``, ``health``, ``rollout``) are clients of a running hub's
HTTP API:

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
    from hub.api_models import RolloutDetail, TelemetryItem
    from hub.client import HubClient
    from hub.config import HubConfig

PROG = "edgefleet-hub"
ERROR_EXIT = 2
URL_ENV = "EDGEFLEET_HUB_URL"
TOKEN_ENV = "EDGEFLEET_HUB_TOKEN"
DEFAULT_HUB_URL = "http://127.0.0.1:8600"
"""Where the fleet commands look for the API by default: hub.toml's default ``[api] bind``."""
FOLLOW_INTERVAL_S = 2.0
WATCH_INTERVAL_S = 2.0
"""How often ``rollout status --watch`` asks the hub."""
TERMINAL_PHASES = ("succeeded", "failed", "aborted", "rolled_back")

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
    from hub.config import DEFAULT_ARTIFACTS_BIND
    from hub.init import DEFAULT_API_BIND, DEFAULT_BROKER_URL, init_hub

    result = init_hub(
        args.dir,
        hub_id=args.hub_id,
        broker_url=args.broker_url or DEFAULT_BROKER_URL,
        api_bind=args.api_bind or DEFAULT_API_BIND,
        artifacts_bind=args.artifacts_bind or DEFAULT_ARTIFACTS_BIND,
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


def _worker_index(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 999:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to 999, got {text!r}")
    return int(text)


def _ingest_worker(args: argparse.Namespace) -> int:
    from hub.config import config_path
    from hub.server import run_server

    return run_server(config_path(args.config), ingest_worker=args.index)


def _add_local(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    init = commands.add_parser("init", help="create a hub data directory (store, keys, token)")
    init.add_argument("dir", metavar="DIR", type=Path)
    init.add_argument("--hub-id", help="the hub's id (default: hub-<hostname>)")
    init.add_argument("--broker-url", metavar="URL", help="mqtt://host:port or mqtts://...")
    init.add_argument("--api-bind", metavar="HOST:PORT", help="where the HTTP API listens")
    init.add_argument(
        "--artifacts-bind", metavar="HOST:PORT", help="where the hub's artifact server listens"
    )
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
    worker = commands.add_parser(
        "ingest-worker",
        help="run one more ingest process beside the hub (shared subscription)",
        parents=[config],
    )
    worker.add_argument(
        "--index",
        type=_worker_index,
        metavar="N",
        default=1,
        help="this worker's number: its MQTT client id is <hub client id>-ingest-<N>",
    )
    worker.set_defaults(handler=_ingest_worker)


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


def _add_simulate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hub.simulate import add_simulate_arguments

    simulate = commands.add_parser(
        "simulate", help="run N simulated agents on real MQTT connections (rehearse a rollout)"
    )
    add_simulate_arguments(simulate)


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``demo``: the whole product on this machine (hub/demo.py)."""

    def run(args: argparse.Namespace) -> int:
        from hub.demo import DemoOptions, run_demo

        return run_demo(
            DemoOptions(
                quick=args.quick,
                keep=args.keep,
                devices=args.devices,
                bake_s=args.bake,
                load_s=args.load,
                rps=args.rps,
                workdir=args.workdir,
                summary_json=args.summary_json,
                broker=args.broker,
                rollouts=args.rollouts,
                live=args.live,
            )
        )

    demo = commands.add_parser(
        "demo",
        help="run a broker, a hub and a fleet of real agents here, with rollouts and load",
        description="Start a broker, a hub and several agents (one firmware profile each) on "
        "this machine, register the OCR models, roll out a new model set while a load "
        "generator calls the agents, then a broken one that the canary stops; print a "
        "summary and stop everything (Ctrl-C stops everything too).",
    )
    demo.add_argument("--quick", action="store_true", help="3 devices, no bake, short load")
    demo.add_argument(
        "--keep", action="store_true", help="keep the fleet running afterwards, until Ctrl-C"
    )
    demo.add_argument("--devices", type=int, metavar="N", help="agents to run (default 6)")
    demo.add_argument("--bake", type=float, metavar="SECONDS", help="bake after each cohort")
    demo.add_argument(
        "--load", type=float, metavar="SECONDS", help="load before and after the rollouts"
    )
    demo.add_argument("--rps", type=float, help="requests per second to each device")
    demo.add_argument(
        "--workdir", type=Path, metavar="DIR", help="keep the demo's files here (default: temp)"
    )
    demo.add_argument(
        "--summary-json", type=Path, metavar="FILE", help="also write the summary as JSON"
    )
    demo.add_argument(
        "--broker",
        choices=("auto", "mosquitto", "amqtt"),
        default="auto",
        help="mosquitto, the embedded amqtt, or auto: mosquitto when installed (default)",
    )
    demo.add_argument(
        "--no-rollouts", dest="rollouts", action="store_false", help="skip the rollouts"
    )
    demo.add_argument(
        "--live",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the live table (default: on a terminal)",
    )
    demo.set_defaults(handler=run)


# --- rollouts ----------------------------------------------------------------------------

# (flag dest, the spec's path). Numbers become numbers (``_flag_value``); the rest stays
# text that the hub checks with the spec's own rules, so "10m", "5%" and "25,50,100" work.
_TEXT_FLAGS = frozenset({"name", "policy", "to", "model_set", "on_failure"})
_ROLLOUT_FLAGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("name", ("name",)),
    ("policy", ("policy",)),
    ("to", ("target",)),
    ("model_set", ("model_set",)),
    ("canary", ("cohorts", "canary")),
    ("batches", ("cohorts", "batches")),
    ("bake", ("cohorts", "bake_s")),
    ("success_threshold", ("gates", "success_threshold")),
    ("error_threshold", ("gates", "error_threshold")),
    ("min_finished", ("gates", "min_finished")),
    ("max_failures", ("gates", "max_failures")),
    ("device_timeout", ("device_timeout_s",)),
    ("cohort_timeout", ("cohort_timeout_s",)),
    ("offline_grace", ("offline", "grace_s")),
    ("unreachable_fails", ("offline", "unreachable_fails")),
    ("only_when_idle", ("only_when_idle",)),
    ("idle_max_rps", ("idle_max_rps",)),
    ("on_failure", ("on_failure",)),
    ("promote", ("promote",)),
    ("health_window", ("health", "window_s")),
    ("health_interval", ("health", "interval_s")),
    ("latency_tolerance", ("health", "latency_tolerance")),
    ("latency_margin_ms", ("health", "latency_margin_ms")),
    ("error_rate_tolerance", ("health", "error_rate_tolerance")),
    ("error_rate_margin", ("health", "error_rate_margin")),
    ("min_requests", ("health", "min_requests")),
    ("max_missing_data", ("health", "max_missing_data")),
    ("max_failed_evaluations", ("health", "max_failed")),
)
_NAME_CHARS = re.compile(r"[^a-z0-9._-]+")


def _flag_value(value: object) -> object:
    """A number given as a flag is a number in the spec (its numbers are strict)."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _put(document: dict[str, object], path: tuple[str, ...], value: object) -> None:
    node = document
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def default_rollout_name(policy: str, target: str, now: float | None = None) -> str:
    """``<policy>-<target>-<UTC time>``, made a valid rollout name."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    base = _NAME_CHARS.sub("-", f"{policy}-{target}".lower()).strip("-._") or "rollout"
    return f"{base[:48]}-{stamp:%Y%m%d-%H%M%S}"


def rollout_document(args: argparse.Namespace) -> tuple[str, str]:
    """The rollout YAML to send and its source name: FILE as it is when no flag changes
    it (so errors name its lines), else FILE's fields with the flags' on top."""
    import yaml

    file: Path | None = args.file
    text = _read_text(file) if file is not None else ""
    given = [
        (path, value if dest in _TEXT_FLAGS else _flag_value(value))
        for dest, path in _ROLLOUT_FLAGS
        if (value := getattr(args, dest)) is not None
    ]
    if args.label or args.profile or args.device:
        selector: dict[str, object] = {}
        if args.label:
            selector["labels"] = _labels(args.label)
        if args.profile:
            selector["profiles"] = list(args.profile)
        if args.device:
            selector["devices"] = list(args.device)
        given.append((("selector",), selector))
    if args.window:
        windows = [{"cron": cron, "timezone": args.timezone or "UTC"} for cron in args.window]
        given.append((("windows",), windows))
    if args.health and not any(path[0] == "health" for path, _ in given):
        given.append((("health",), {}))
    source = str(file) if file is not None else "<command line>"
    if file is not None and not given:
        return text, source
    try:
        loaded = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise CliError(f"{source}: not YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(loaded, dict):
        raise CliError(f"{source}: expected a mapping (a rollout document)")
    document: dict[str, object] = dict(loaded)
    for path, value in given:
        _put(document, path, value)
    if "name" not in document:
        policy, target = document.get("policy"), document.get("target")
        if not isinstance(policy, str) or not isinstance(target, str | int | float):
            raise CliError("give a rollout FILE, or --policy and --to (and optionally --name)")
        document["name"] = default_rollout_name(policy, str(target))
    if file is not None:
        source += " (with flags)"
    return yaml.safe_dump(document, sort_keys=False), source


def _rollout_start(args: argparse.Namespace) -> int:
    from hub import cli_output

    text, source = rollout_document(args)
    with _client(args) as hub:
        detail = hub.start_rollout(text, source)
        if args.watch:
            return _watch(hub, detail.name, args)
    if args.json:
        cli_output.print_model(detail)
    else:
        cli_output.print_rollout(detail)
    return 0


def _rollout_status(args: argparse.Namespace) -> int:
    from hub import cli_output

    with _client(args) as hub:
        if args.watch:
            return _watch(hub, args.name, args)
        detail = hub.rollout(args.name, events=args.events, devices=args.devices)
    if args.json:
        cli_output.print_model(detail)
    else:
        cli_output.print_rollout(detail)
    return 0


def _watch(hub: HubClient, name: str, args: argparse.Namespace) -> int:
    """Refresh the status every ``--interval`` until the rollout ends (exit 0 when it
    succeeded, 1 otherwise; Ctrl-C: 130)."""
    from hub import cli_output

    def fetch() -> RolloutDetail:
        return hub.rollout(name, events=args.events, devices=args.devices)

    detail = fetch()
    if args.json:
        cli_output.print_json_line(detail)
        while detail.phase not in TERMINAL_PHASES:
            time.sleep(args.interval)
            detail = fetch()
            cli_output.print_json_line(detail)
            sys.stdout.flush()
    elif cli_output.interactive():
        with cli_output.live(cli_output.rollout_view(detail)) as live:
            while detail.phase not in TERMINAL_PHASES:
                time.sleep(args.interval)
                detail = fetch()
                live.update(cli_output.rollout_view(detail), refresh=True)
    else:  # not a terminal: the final status only
        while detail.phase not in TERMINAL_PHASES:
            time.sleep(args.interval)
            detail = fetch()
        cli_output.print_rollout(detail)
    return 0 if detail.phase == "succeeded" else 1


def _rollout_list(args: argparse.Namespace) -> int:
    from hub import cli_output

    with _client(args) as hub:
        rollouts = list(hub.iter_rollouts(phases=args.phase or ()))
    if args.json:
        cli_output.print_models(rollouts)
    else:
        cli_output.rollouts_table(rollouts)
    return 0


def _rollout_operate(args: argparse.Namespace) -> int:
    from hub import cli_output

    with _client(args) as hub:
        detail = hub.operate_rollout(args.name, args.operation, args.reason or "")
    if args.json:
        cli_output.print_model(detail)
    else:
        print(f"rollout {detail.name}: {detail.phase} ({detail.reason})")
    return 0


def _add_rollout(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    both = [_connection(suppress=True), _json()]
    rollout = commands.add_parser(
        "rollout", help="move a policy's devices to another model-set version, in cohorts"
    )
    sub = rollout.add_subparsers(dest="rollout_command", metavar="COMMAND", required=True)

    def watch_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--interval",
            type=float,
            default=WATCH_INTERVAL_S,
            help=f"seconds between refreshes with --watch (default {WATCH_INTERVAL_S:g})",
        )
        parser.add_argument(
            "--events", type=int, default=10, help="newest events to show (default 10)"
        )
        parser.add_argument("--devices", action="store_true", help="list every device")

    start = sub.add_parser(
        "start",
        help="start a rollout from a YAML file and/or flags (docs/rollouts.md)",
        parents=both,
        description="Start a rollout. FILE is an edgefleet.rollout/1 document; each flag "
        "sets the spec field of the same meaning (on top of FILE's). Durations: 90, 45s, "
        "10m, 1h30m; shares: 10 or 10%%.",
    )
    start.add_argument("file", metavar="FILE", type=Path, nargs="?", help="the rollout YAML")
    start.add_argument("--name", help="the rollout's name (default: POLICY-VERSION-time)")
    start.add_argument("--policy", help="the policy whose model set moves")
    start.add_argument("--to", metavar="VERSION", help="the model-set version to move to")
    start.add_argument("--model-set", metavar="NAME", help="target model set (default: same)")
    start.add_argument("--label", metavar="KEY=VALUE", action="append", help="narrow: label")
    start.add_argument("--profile", action="append", help="narrow: firmware profile")
    start.add_argument("--device", action="append", help="narrow: device id")
    cohorts = start.add_argument_group("cohorts")
    cohorts.add_argument("--canary", metavar="N|P%%", help="canary devices: a count or a share")
    cohorts.add_argument("--batches", metavar="P,P,...", help="cumulative percentages to 100")
    cohorts.add_argument("--bake", metavar="DURATION", help="bake after every cohort")
    gates = start.add_argument_group("gates")
    gates.add_argument("--success-threshold", metavar="PCT")
    gates.add_argument("--error-threshold", metavar="PCT")
    gates.add_argument("--min-finished", metavar="N")
    gates.add_argument("--max-failures", metavar="N")
    gates.add_argument("--device-timeout", metavar="DURATION")
    gates.add_argument("--cohort-timeout", metavar="DURATION")
    gates.add_argument("--offline-grace", metavar="DURATION")
    gates.add_argument(
        "--unreachable-fails", action="store_const", const=True, help="count them as failed"
    )
    health = start.add_argument_group("health analysis (the canary against the baseline)")
    health.add_argument("--health", action="store_true", help="enable it with its defaults")
    health.add_argument("--health-window", metavar="DURATION")
    health.add_argument("--health-interval", metavar="DURATION")
    health.add_argument("--latency-tolerance", metavar="X")
    health.add_argument("--latency-margin-ms", metavar="MS")
    health.add_argument("--error-rate-tolerance", metavar="X")
    health.add_argument("--error-rate-margin", metavar="RATE")
    health.add_argument("--min-requests", metavar="N")
    health.add_argument("--max-missing-data", metavar="N")
    health.add_argument("--max-failed-evaluations", metavar="N")
    when = start.add_argument_group("when devices switch")
    when.add_argument(
        "--window", metavar="CRON", action="append", help="maintenance window (repeatable)"
    )
    when.add_argument("--timezone", metavar="TZ", help="of the windows (default UTC)")
    when.add_argument("--only-when-idle", action="store_const", const=True)
    when.add_argument("--idle-max-rps", metavar="RPS")
    start.add_argument("--on-failure", choices=("rollback", "hold"))
    promote = start.add_mutually_exclusive_group()
    promote.add_argument("--promote", dest="promote", action="store_const", const=True)
    promote.add_argument("--no-promote", dest="promote", action="store_const", const=False)
    start.add_argument("--watch", action="store_true", help="then show its status until it ends")
    watch_options(start)
    start.set_defaults(handler=_rollout_start, promote=None)

    status = sub.add_parser(
        "status", help="a rollout's cohorts, progress and gate values", parents=both
    )
    status.add_argument("name", metavar="NAME")
    status.add_argument(
        "--watch",
        "-w",
        action="store_true",
        help="refresh until it ends (exit 0: succeeded; 1: failed, aborted, rolled back)",
    )
    watch_options(status)
    status.set_defaults(handler=_rollout_status)

    listing = sub.add_parser("list", help="every rollout, oldest first", parents=both)
    listing.add_argument("--phase", action="append", help="only this phase (repeatable)")
    listing.set_defaults(handler=_rollout_list)

    helps = {
        "pause": "hold a rollout: nothing is switched and no gate decides",
        "resume": "continue a paused rollout",
        "abort": "stop and send every device it pinned back to the baseline",
        "rollback": "undo a rollout (and its promotion): devices back to the baseline",
    }
    for operation, text in helps.items():
        command = sub.add_parser(operation, help=text, parents=both)
        command.add_argument("name", metavar="NAME")
        command.add_argument("--reason", help="why (kept in the rollout's events)")
        command.set_defaults(handler=_rollout_operate, operation=operation)


# --- CA, enrollment, broker (local; docs/enrollment.md) --------------------------------------


def _ca_init(args: argparse.Namespace) -> int:
    from hub.ca import ca_init

    result = ca_init(
        args.dir,
        common_name=args.common_name,
        hub_name=args.hub_name,
        validity_days=args.days,
        crl_days=args.crl_days,
    )
    print(f"created the fleet CA in {result.directory}")
    print(f"  CA certificate   {result.ca_cert}")
    print(f"  revocation list  {result.crl}")
    print(f"  hub certificate  {result.hub_cert}  (hub.toml [broker] cert_file)")
    print(f"  hub key          {result.hub_key}  (hub.toml [broker] key_file)")
    return 0


def _ca_crl(args: argparse.Namespace) -> int:
    from hub.ca import CertificateAuthority, refresh_crl

    path = refresh_crl(args.dir, crl_days=args.days)
    expires = datetime.fromtimestamp(CertificateAuthority(args.dir).crl_expires_at, UTC)
    print(f"re-signed {path}; valid until {expires:%Y-%m-%d %H:%M} UTC (reload the broker)")
    return 0


def _device_enroll(args: argparse.Namespace) -> int:
    from hub.ca import DEFAULT_DEVICE_DAYS
    from hub.enroll import enroll_device, parse_labels
    from hub.store import Store

    config = _load_local_config(args)
    csr = None
    if args.csr is not None:
        try:
            csr = args.csr.read_bytes()
        except OSError as exc:
            raise CliError(f"{args.csr}: cannot read: {exc.strerror or exc}") from None
    with Store(config.store_path) as store:
        bundle = enroll_device(
            args.ca,
            args.device_id,
            args.out,
            broker_url=args.broker_url,
            hub_keys_file=config.public_keys_path,
            labels=parse_labels(args.labels or ""),
            validity_days=args.days or DEFAULT_DEVICE_DAYS,
            csr=csr,
            replace=args.replace,
            store=store,
        )
    print(f"enrolled {bundle.device_id}: certificate {bundle.certificate.serial:x}")
    print(f"  bundle  {bundle.directory}  (copy it to /etc/edgefleet/ on the device; secret)")
    for path in sorted(bundle.files.values()):
        print(f"    {path.name}")
    if bundle.replaced:
        serials = ", ".join(f"{r.serial:x}" for r in bundle.replaced)
        print(f"  revoked the earlier certificate(s) {serials}: reload the broker")
    return 0


def _device_revoke(args: argparse.Namespace) -> int:
    from hub.enroll import revoke_device
    from hub.store import Store

    config = _load_local_config(args)
    with Store(config.store_path) as store:
        done = revoke_device(args.ca, args.device_id, store=store, reason=args.reason)
    what = f"{len(done.revoked)} certificate(s)" if done.revoked else "no new certificate"
    print(f"revoked {done.device_id}: {what}; CRL {done.crl}")
    print(f"  removed {done.desired_removed} desired document(s) from the hub's store")
    print(f"next: reload the broker, then {PROG} device evict {done.device_id}")
    return 0


def _device_evict(args: argparse.Namespace) -> int:
    from hub.enroll import evict_device

    config = _load_local_config(args)
    evict_device(config, args.device_id, timeout=args.timeout)
    print(f"evicted {args.device_id}: connection closed, retained desired document cleared")
    return 0


def _broker_config(args: argparse.Namespace) -> int:
    from hub.broker_config import server_certificate_names, write_broker_config
    from hub.ca import DEFAULT_HUB_NAME

    files = write_broker_config(
        args.out,
        args.ca,
        fleet_size=args.fleet_size,
        server_names=args.server_name or ("localhost", "127.0.0.1"),
        port=args.port,
        bind=args.bind,
        hub_port=None if args.no_hub_listener else args.hub_port,
        hub_bind=args.hub_bind,
        hub_names=args.hub_name or (DEFAULT_HUB_NAME,),
        plain_port=args.plain_port,
        persistence_dir=args.persistence_dir,
        log_file=args.log_file,
        max_packet_bytes=args.max_packet_bytes,
        queue_per_device=args.queue_per_device,
        run_as_root=args.run_as_root,
        broker_user=args.broker_user or None,
    )
    settings = files.settings
    print(f"wrote the broker configuration to {files.config.parent}")
    print(f"  configuration  {files.config}")
    print(f"  ACL            {files.acl}")
    names = ", ".join(server_certificate_names(files.server_cert))
    print(f"  certificate    {files.server_cert}  ({names})")
    print(f"  devices        port {settings.port}, up to {settings.max_connections} connections")
    if settings.hub_port is not None:
        print(f"  hub            {settings.hub_bind}:{settings.hub_port} (client certificate)")
    if files.hub_password_file is not None:
        print(f"  hub password   {files.hub_password_file}  (hub.toml [broker] password_file)")
    print(f"run: mosquitto -c {files.config}")
    return 0


def _add_security(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hub.broker_config import (
        DEFAULT_HUB_BIND,
        DEFAULT_HUB_PORT,
        DEFAULT_MAX_PACKET_BYTES,
        DEFAULT_PORT,
        DEFAULT_QUEUE_PER_DEVICE,
    )
    from hub.ca import (
        DEFAULT_CA_DAYS,
        DEFAULT_CA_NAME,
        DEFAULT_CRL_DAYS,
        DEFAULT_DEVICE_DAYS,
        DEFAULT_HUB_NAME,
        REVOCATION_REASONS,
    )

    config = _config_option()
    ca = commands.add_parser("ca", help="the fleet CA (docs/enrollment.md)")
    sub = ca.add_subparsers(dest="ca_command", metavar="COMMAND", required=True)
    init = sub.add_parser("init", help="create the fleet CA and the hub's broker certificate")
    init.add_argument("dir", metavar="DIR", type=Path)
    init.add_argument("--common-name", default=DEFAULT_CA_NAME, help="the CA's name")
    init.add_argument("--hub-name", default=DEFAULT_HUB_NAME, help="the hub's broker account")
    init.add_argument(
        "--days", type=int, default=DEFAULT_CA_DAYS, help="CA validity (default %(default)s)"
    )
    init.add_argument(
        "--crl-days",
        type=int,
        default=DEFAULT_CRL_DAYS,
        help="CRL validity (default %(default)s)",
    )
    init.set_defaults(handler=_ca_init)
    crl = sub.add_parser("crl", help="re-sign the revocation list (before it expires)")
    crl.add_argument("dir", metavar="DIR", type=Path)
    crl.add_argument("--days", type=int, help="validity in days (default: the CA's setting)")
    crl.set_defaults(handler=_ca_crl)

    device = commands.add_parser("device", help="enroll, revoke and evict one device")
    sub = device.add_subparsers(dest="device_command", metavar="COMMAND", required=True)
    enroll = sub.add_parser(
        "enroll", help="issue a device certificate and write its agent bundle", parents=[config]
    )
    enroll.add_argument("device_id", metavar="ID")
    enroll.add_argument("--ca", metavar="DIR", type=Path, required=True, help="the CA directory")
    enroll.add_argument("--out", metavar="OUT", type=Path, required=True, help="a new bundle dir")
    enroll.add_argument(
        "--broker-url", metavar="URL", required=True, help="mqtts://host:8883 as devices see it"
    )
    enroll.add_argument("--labels", metavar="K=V,...", help="the device's labels")
    enroll.add_argument("--csr", metavar="FILE", type=Path, help="certify the device's own key")
    enroll.add_argument(
        "--days", type=int, help=f"certificate validity (default {DEFAULT_DEVICE_DAYS})"
    )
    enroll.add_argument(
        "--replace", action="store_true", help="re-key: revoke its earlier certificates"
    )
    enroll.set_defaults(handler=_device_enroll)
    revoke = sub.add_parser(
        "revoke", help="revoke its certificates and forget its desired state", parents=[config]
    )
    revoke.add_argument("device_id", metavar="ID")
    revoke.add_argument("--ca", metavar="DIR", type=Path, required=True, help="the CA directory")
    revoke.add_argument("--reason", default="unspecified", choices=REVOCATION_REASONS)
    revoke.set_defaults(handler=_device_revoke)
    evict = sub.add_parser(
        "evict",
        help="close its broker connection and clear its retained document",
        parents=[config],
    )
    evict.add_argument("device_id", metavar="ID")
    evict.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    evict.set_defaults(handler=_device_evict)

    broker = commands.add_parser("broker-config", help="write the mosquitto configuration")
    broker.add_argument("out", metavar="OUT", type=Path)
    broker.add_argument("--ca", metavar="DIR", type=Path, required=True, help="the CA directory")
    broker.add_argument("--fleet-size", type=int, required=True, help="devices to size it for")
    broker.add_argument(
        "--server-name",
        action="append",
        help="a host name or address devices connect to (repeatable; default localhost, 127.0.0.1)",
    )
    broker.add_argument("--port", type=int, default=DEFAULT_PORT, help="devices' TLS port")
    broker.add_argument("--bind", help="devices' listener address (default: all)")
    broker.add_argument("--hub-port", type=int, default=DEFAULT_HUB_PORT, help="hub TLS port")
    broker.add_argument("--hub-bind", default=DEFAULT_HUB_BIND, help="hub listener address")
    broker.add_argument("--no-hub-listener", action="store_true", help="no hub TLS listener")
    broker.add_argument("--hub-name", action="append", help="a hub account (repeatable)")
    broker.add_argument("--plain-port", type=int, help="a loopback listener without TLS too")
    broker.add_argument("--persistence-dir", type=Path, help="default OUT/data")
    broker.add_argument("--log-file", type=Path, help="default: the system log")
    broker.add_argument("--max-packet-bytes", type=int, default=DEFAULT_MAX_PACKET_BYTES)
    broker.add_argument("--queue-per-device", type=int, default=DEFAULT_QUEUE_PER_DEVICE)
    broker.add_argument("--run-as-root", action="store_true", help="emit `user root`")
    broker.add_argument(
        "--broker-user", default="mosquitto", help="owner of the broker's files when run as root"
    )
    broker.set_defaults(handler=_broker_config)


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
    _add_security(commands)
    _add_fleet(commands)
    _add_rollout(commands)
    _add_demo(commands)
    _add_simulate(commands)
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

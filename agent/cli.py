"""``edgefleet-agent``: the device agent's command line.

Commands are grouped (``profile detect``, later ``run``, ``status``, ``config check``); each
group registers itself through a function listed in ``COMMAND_GROUPS`` and sets a handler
``(args) -> exit status``. Every ``EdgefleetError`` becomes one line on stderr and exit
status 1; usage errors exit with 2, as argparse does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from contract.errors import EdgefleetError
from contract.profile import HardwareFacts
from contract.profile_match import Choice

PROG = "edgefleet-agent"
EXIT_ERROR = 1

Handler = Callable[[argparse.Namespace], int]
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    handler: Handler = args.handler
    try:
        return handler(args)
    except EdgefleetError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: {message}", file=sys.stderr)
        return EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    """The parser with every command group registered."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The edgefleet device agent: hosts ONNX models chosen for this device.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMAND_GROUPS:
        register(commands)
    return parser


# --- profile ---------------------------------------------------------------------------


def add_profile_commands(commands: Subcommands) -> None:
    """``profile detect``."""
    group = commands.add_parser("profile", help="firmware profiles")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    detect = actions.add_parser(
        "detect",
        help="choose this device's firmware profile",
        description="Read this device's hardware facts (or recorded ones) and choose the "
        "firmware profile that fits it.",
    )
    detect.add_argument(
        "--explain", action="store_true", help="show the facts, the reasons and why others lost"
    )
    detect.add_argument("--json", action="store_true", help="machine-readable output")
    detect.add_argument("--profiles-dir", type=Path, metavar="DIR", help="profiles to choose from")
    detect.add_argument(
        "--facts", type=Path, metavar="FILE", help="recorded HardwareFacts JSON instead"
    )
    detect.add_argument(
        "--profile", metavar="NAME", help="force this profile, as the agent's config can"
    )
    detect.set_defaults(handler=_profile_detect)


def _profile_detect(args: argparse.Namespace) -> int:
    from agent.facts import collect_facts, load_facts_file
    from agent.profiles import default_profiles_dir, load_profiles
    from contract.profile_match import choose

    if args.facts is not None:
        facts = load_facts_file(args.facts)
        facts_source = f"recorded in {args.facts}"
    else:
        facts = collect_facts()
        facts_source = "read from this machine"
    profiles_dir: Path = args.profiles_dir or default_profiles_dir()
    choice = choose(load_profiles(profiles_dir), facts, args.profile)

    if args.json:
        document = detection_json(choice, facts, facts_source, profiles_dir)
        print(json.dumps(document, indent=2, ensure_ascii=False))
    elif args.explain:
        print(explain(choice, facts, facts_source, profiles_dir))
    else:
        print(f"{choice.profile.name} ({choice.how})")
    return 0


def explain(choice: Choice, facts: HardwareFacts, facts_source: str, profiles_dir: Path) -> str:
    """The facts, the chosen profile with its reasons and settings, and why the others lost."""
    rows = [
        ("architecture", facts.architecture),
        ("device-tree model", facts.device_tree_model or "-"),
        ("CPU model", facts.cpu_model or "-"),
        ("CPUs", str(facts.cpu_count)),
        ("memory", _memory(facts)),
        ("storage free", _mib(facts.storage_free_mb)),
        ("ONNX providers", ", ".join(facts.providers) or "-"),
    ]
    zones = sorted(facts.thermal_zones.items())
    rows += [
        ("thermal" if i == 0 else "", f"{path}  {celsius:.1f} C")
        for i, (path, celsius) in enumerate(zones)
    ] or [("thermal", "-")]
    lines = [f"Hardware facts ({facts_source})", *_rows(rows)]

    profile = choice.profile
    chosen = choice.chosen
    lines += [
        "",
        f"Profile: {profile.name} ({choice.how}, {chosen.points} points; "
        f"from {len(choice.scores)} profiles in {profiles_dir})",
        f"  {profile.description}",
    ]
    lines += [f"  {_MARKS[c.outcome]} {c.reason}" for c in chosen.criteria]
    budgets = profile.budgets
    settings = [
        (
            "budgets",
            f"model memory {budgets.model_memory_mb} MiB, storage {budgets.storage_mb} MiB, "
            f"{budgets.threads} threads",
        ),
        ("providers", ", ".join(profile.providers)),
        ("variants", ", ".join(profile.variant_preference)),
    ]
    if profile.thermal is not None:
        thermal = profile.thermal
        settings.append(
            (
                "thermal",
                f"{thermal.sensor}, throttle {thermal.throttle_c:g} C, "
                f"critical {thermal.critical_c:g} C",
            )
        )
    lines += _rows(settings)

    others = [s for s in choice.scores if s.name != profile.name]
    if others:
        lines += ["", "Other profiles"]
        table = [("PROFILE", "MATCHED", "POINTS", "WHY NOT CHOSEN")] + [
            (
                s.name,
                "yes" if s.matched else "no",
                str(s.points) if s.matched else "-",
                choice.lost_because(s),
            )
            for s in others
        ]
        widths = [max(len(row[i]) for row in table) for i in range(3)]
        lines += [
            f"  {name:<{widths[0]}}  {matched:<{widths[1]}}  {points:>{widths[2]}}  {why}"
            for name, matched, points, why in table
        ]
    return "\n".join(lines)


def detection_json(
    choice: Choice, facts: HardwareFacts, facts_source: str, profiles_dir: Path
) -> dict[str, Any]:
    """The detection as one JSON document (what ``--json`` prints)."""
    return {
        "profile": choice.profile.name,
        "how": choice.how,
        "points": choice.chosen.points,
        "facts_source": facts_source,
        "facts": facts.model_dump(mode="json"),
        "profiles_dir": str(profiles_dir),
        "document": choice.profile.model_dump(mode="json", by_alias=True),
        "scores": [
            {
                "name": s.name,
                "chosen": s.name == choice.profile.name,
                "matched": s.matched,
                "fallback": s.fallback,
                "points": s.points,
                "lost_because": choice.lost_because(s),
                "criteria": [c.model_dump(mode="json") for c in s.criteria],
            }
            for s in choice.scores
        ],
    }


_MARKS = {"met": "+", "failed": "-", "unknown": "?"}


def _rows(pairs: Sequence[tuple[str, str]]) -> list[str]:
    width = max((len(label) for label, _ in pairs), default=0)
    return [f"  {label:<{width}}  {value}" for label, value in pairs]


def _memory(facts: HardwareFacts) -> str:
    text = f"{facts.memory_total_mb} MiB total"
    if facts.memory_available_mb is not None:
        text += f", {facts.memory_available_mb} MiB available"
    return text


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value} MiB"


# Each registers one command group; add new groups here.
# --- run, status, config ------------------------------------------------------------------


def _config_argument(parser: argparse.ArgumentParser) -> None:
    from agent.config import DEFAULT_CONFIG_PATH

    parser.add_argument(
        "--config",
        type=Path,
        default=Path(DEFAULT_CONFIG_PATH),
        metavar="FILE",
        help=f"agent configuration (default {DEFAULT_CONFIG_PATH})",
    )


def add_daemon_commands(commands: Subcommands) -> None:
    """``run``, ``status`` and ``config check``."""
    run = commands.add_parser("run", help="run the agent daemon (systemd starts this)")
    _config_argument(run)
    run.set_defaults(handler=_run)

    status = commands.add_parser("status", help="applied generation, models and their health")
    _config_argument(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)

    config = commands.add_parser("config", help="agent configuration")
    actions = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate the file and print effective settings")
    _config_argument(check)
    check.set_defaults(handler=_config_check)


def _run(args: argparse.Namespace) -> int:
    import logging
    import os

    from agent.config import load_config
    from agent.daemon import Agent, make_api
    from agent.memory import cap_malloc_arenas

    cap_malloc_arenas(os.environ)
    config = load_config(args.config, os.environ)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    agent = Agent(config, environ=os.environ, api_factory=make_api)
    return agent.run_forever()


def _status(args: argparse.Namespace) -> int:
    import os

    from agent.config import load_config
    from agent.status import read_status, render_status

    config = load_config(args.config, os.environ)
    report = read_status(config)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render_status(report))
    return 0


def _config_check(args: argparse.Namespace) -> int:
    import os

    from agent.config import effective_settings, load_config

    config = load_config(args.config, os.environ)
    print(effective_settings(config))
    return 0


def add_install_commands(commands: Subcommands) -> None:
    """``install-service`` (agent/install.py)."""
    from agent.config import DEFAULT_CONFIG_PATH, DEFAULT_STATE_DIR

    install = commands.add_parser(
        "install-service",
        help="write the systemd unit, a configuration skeleton and the state directory",
        description="Write /etc/systemd/system/edgefleet-agent.service for this installation, "
        "a configuration skeleton when there is none, and the state directory.",
    )
    install.add_argument("--print", action="store_true", help="print them, write nothing")
    install.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        metavar="FILE",
        help="(default %(default)s)",
    )
    install.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help="(default %(default)s)",
    )
    install.add_argument("--device-id", metavar="ID", help="(default: the host name)")
    install.add_argument("--broker-url", metavar="URL", help="(default mqtt://localhost:1883)")
    install.add_argument("--executable", type=Path, metavar="PATH", help="(default: this one)")
    install.add_argument(
        "--root", type=Path, default=Path("/"), metavar="DIR", help="write under DIR instead of /"
    )
    install.set_defaults(handler=_install_service)


def _install_service(args: argparse.Namespace) -> int:
    from agent.install import install, plan_install, printed, report

    plan = plan_install(
        config_path=args.config,
        state_dir=args.state_dir,
        device_id=args.device_id,
        broker_url=args.broker_url,
        executable=args.executable,
    )
    if args.print:
        sys.stdout.write(printed(plan))
        return 0
    print(report(plan, install(plan, root=args.root), args.root))
    return 0


COMMAND_GROUPS: tuple[Callable[[Subcommands], None], ...] = (
    add_profile_commands,
    add_daemon_commands,
    add_install_commands,
)


if __name__ == "__main__":
    sys.exit(main())

"""``edgefleet-hub``: the operators' command line.

Each command group adds itself to the parser in an ``_add_<group>`` function and sets
``handler`` (a function of the parsed arguments returning the exit code). Any
``EdgefleetError`` a handler raises becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from contract import __version__
from contract.errors import EdgefleetError

PROG = "edgefleet-hub"
ERROR_EXIT = 2

Handler = Callable[[argparse.Namespace], int]


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


def build_parser() -> argparse.ArgumentParser:
    """The full parser; command groups register themselves here."""
    parser = argparse.ArgumentParser(prog=PROG, description="Manage an edgefleet fleet.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_schema(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (2 with one line on stderr for an error)."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except EdgefleetError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return ERROR_EXIT


if __name__ == "__main__":
    raise SystemExit(main())

"""JSON Schema export, the generated reference in docs/, and the `edgefleet-hub schema` CLI."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from test_messages import SAMPLES

from contract.messages import MESSAGE_TYPES, encode
from contract.topics import TOPICS
from hub.cli import main
from hub.schema_export import (
    JSON_SCHEMA_DIALECT,
    REFERENCE_COMMAND,
    REFERENCE_PATH,
    SchemaExportError,
    export_schemas,
    render_reference,
    schema_filename,
)

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_FILES = {
    "edgefleet.birth.v1.schema.json",
    "edgefleet.status.v1.schema.json",
    "edgefleet.telemetry.v1.schema.json",
    "edgefleet.state.v1.schema.json",
    "edgefleet.event.v1.schema.json",
    "edgefleet.desired.v1.schema.json",
    "edgefleet.cmd.v1.schema.json",
    "edgefleet.cmd_result.v1.schema.json",
    "edgefleet.hub_state.v1.schema.json",
}


def load(path: Path) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return value


def test_cli_exports_one_schema_per_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "schemas" / "v1"
    assert main(["schema", "export", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert f"wrote 9 schemas to {out}" in capsys.readouterr().out
    for model in MESSAGE_TYPES:
        schema = load(out / schema_filename(model))
        assert schema["$schema"] == JSON_SCHEMA_DIALECT
        assert schema["type"] == "object"
        assert schema["properties"]["schema"]["const"] == model.SCHEMA
        assert schema["required"][0] == "schema"
        assert schema["additionalProperties"] is True


def test_export_is_deterministic(tmp_path: Path) -> None:
    first = {p.name: p.read_bytes() for p in export_schemas(tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in export_schemas(tmp_path / "b")}
    assert first == second
    for name, data in first.items():
        text = data.decode()
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n", name


def test_samples_fit_their_schemas(tmp_path: Path) -> None:
    export_schemas(tmp_path)
    validator = None
    if importlib.util.find_spec("jsonschema") is not None:
        validator = importlib.import_module("jsonschema").Draft202012Validator
    for name, msg in SAMPLES.items():
        schema = load(tmp_path / schema_filename(type(msg)))
        doc = json.loads(encode(msg))
        assert set(schema["required"]) <= set(doc), name
        assert set(doc) <= set(schema["properties"]), name
        for key, value in doc.items():
            prop = schema["properties"][key]
            if "const" in prop:
                assert value == prop["const"]
            if "$ref" in prop:
                ref = prop["$ref"].removeprefix("#/$defs/")
                assert ref in schema["$defs"], (name, key)
        if validator is not None:
            validator.check_schema(schema)
            validator(schema).validate(doc)


def test_a_file_in_the_way_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    for target in (blocker, blocker / "below"):
        assert main(["schema", "export", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert err.startswith(f"edgefleet-hub: error: cannot write schemas to {target}")


def test_export_error_is_an_edgefleet_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SchemaExportError):
        export_schemas(blocker)


def test_cli_without_a_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2
    assert "usage: edgefleet-hub" in capsys.readouterr().err


def test_reference_names_every_topic_and_message() -> None:
    text = render_reference()
    for info in TOPICS:
        assert f"`{info.pattern}`" in text
    for model in MESSAGE_TYPES:
        assert f"### {model.SCHEMA}\n" in text
    for anchor in ("#desiredstate", "#modelspec", "#signature", "#latency"):
        assert f"### {anchor[1:]}".lower() in text.lower()


def test_cli_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "reference"]) == 0
    assert capsys.readouterr().out == render_reference()


def test_committed_reference_matches_the_models() -> None:
    committed = (ROOT / REFERENCE_PATH).read_text(encoding="utf-8")
    assert committed == render_reference(), (
        f"{REFERENCE_PATH} is out of date with contract/; regenerate it with "
        f"`{REFERENCE_COMMAND}` (or `python -m hub.cli schema reference > {REFERENCE_PATH}`)"
    )

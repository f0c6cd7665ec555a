"""Manifests and profiles from YAML: valid files load; every bad one is refused in one line
that names the file, the line, the field and what was expected."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from contract.errors import ManifestError
from contract.manifests import ModelSet, Policy
from contract.profile import FirmwareProfile
from contract.yaml_source import (
    format_field,
    load_document,
    load_model_set,
    load_policy,
    load_profile,
)

FIXTURES = Path(__file__).parent / "fixtures" / "manifests"

LOADERS: dict[str, Callable[[str, str], BaseModel]] = {
    "modelset": load_model_set,
    "policy": load_policy,
    "profile": load_profile,
}

MODELSET_HEAD = """\
schema: edgefleet.modelset/1
name: ocr
version: "1"
models:
"""


def read(name: str) -> tuple[str, str]:
    path = FIXTURES / name
    return path.read_text(), str(path)


class BadFixture:
    """A bad-input fixture: its header says which loader, field and expectation; the lines
    marked ``# <- error`` and ``# <- first`` are the error's line and the earlier one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.text = path.read_text()
        header: dict[str, str] = {}
        self.line: int | None = None
        first: int | None = None
        for number, line in enumerate(self.text.splitlines(), start=1):
            if line.startswith("# ") and ": " in line and self.line is None:
                key, _, value = line[2:].partition(": ")
                header.setdefault(key, value)
            if line.endswith("# <- error"):
                self.line = number
            if line.endswith("# <- first"):
                first = number
        assert self.line is not None, f"{path.name} marks no '# <- error' line"
        self.loader = LOADERS[header["load"]]
        self.field = header["field"]
        self.expected = header["expected"].replace("{first}", str(first))


BAD_FIXTURES = sorted(FIXTURES.glob("bad-*.yaml"))


def test_valid_model_set_loads() -> None:
    model_set = load_model_set(*read("modelset.yaml"))
    assert isinstance(model_set, ModelSet)
    assert [m.name for m in model_set.models] == ["ocr-det", "ocr-rec", "ocr-cls"]
    det = model_set.models[0]
    assert [v.precision for v in det.variants] == ["int8", "fp16", "fp32"]
    assert det.variants[0].requires.architectures == ["aarch64", "x86_64"]
    assert det.variants[2].requires.providers == ["CPUExecutionProvider"]
    assert det.inputs["x"].shape == [1, 3, 640, 640]
    assert det.golden is not None
    assert det.golden.rtol == pytest.approx(0.001)


def test_valid_policy_loads() -> None:
    policy = load_policy(*read("policy.yaml"))
    assert isinstance(policy, Policy)
    assert policy.selector.labels == {"site": "warehouse"}
    assert policy.model_set.version == "2024.06.1"
    assert policy.runtime.for_model("ocr-det").on_overload == "reject"
    assert policy.runtime.for_model("ocr-cls").on_overload == "queue"


def test_valid_profile_loads() -> None:
    profile = load_profile(*read("profile.yaml"))
    assert isinstance(profile, FirmwareProfile)
    assert profile.providers == ["VSINPUExecutionProvider", "CPUExecutionProvider"]
    assert profile.budgets.model_memory_mb == 1024
    assert profile.thermal is not None
    assert profile.thermal.critical_c == 90


def test_every_bad_input_rule_has_a_fixture() -> None:
    names = {path.name for path in BAD_FIXTURES}
    for required in (
        "bad-unknown-key.yaml",
        "bad-wrong-type.yaml",
        "bad-profile-negative-budget.yaml",
        "bad-duplicate-model.yaml",
        "bad-duplicate-variant.yaml",
        "bad-missing-hash.yaml",
        "bad-profile-duplicate-provider.yaml",
        "bad-duplicate-key.yaml",
        "bad-syntax.yaml",
    ):
        assert required in names


@pytest.mark.parametrize("path", BAD_FIXTURES, ids=lambda path: path.stem)
def test_bad_input_names_file_line_field_and_expectation(path: Path) -> None:
    bad = BadFixture(path)
    with pytest.raises(ManifestError) as caught:
        bad.loader(bad.text, str(path))
    error = caught.value
    assert (error.source, error.line, error.field, error.expected) == (
        str(path),
        bad.line,
        bad.field,
        bad.expected,
    )
    assert str(error) == f"{path}:{bad.line}: {bad.field}: {bad.expected}"
    assert "\n" not in str(error)


def test_empty_document_is_refused_without_a_line() -> None:
    with pytest.raises(ManifestError) as caught:
        load_model_set("# nothing here\n", "empty.yaml")
    assert str(caught.value) == "empty.yaml: (document): expected a mapping of keys, got nothing"


def test_unsafe_tag_is_refused() -> None:
    text = "schema: !!python/object/apply:os.system ['true']\n"
    with pytest.raises(ManifestError) as caught:
        load_model_set(text, "evil.yaml")
    assert caught.value.line == 1
    assert caught.value.field == "(yaml)"
    assert "could not determine a constructor" in caught.value.expected


def test_alias_bombs_and_deep_nesting_are_refused() -> None:
    levels = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    for level in range(1, 8):
        levels.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    bomb = "\n".join(levels) + "\nmodels: *a7\n"
    with pytest.raises(ManifestError, match="aliases expand to more than 100000 values"):
        load_model_set(bomb, "bomb.yaml")
    with pytest.raises(
        ManifestError, match=re.escape("x.yaml:1: (document): an alias refers to itself")
    ):
        load_model_set("models: &a [*a]\n", "x.yaml")
    with pytest.raises(ManifestError, match="nested too deeply"):
        load_model_set("models: " + "[" * 5000 + "]" * 5000, "deep.yaml")


def test_many_errors_report_the_typo_before_the_missing_field_it_causes() -> None:
    text = MODELSET_HEAD + ('  - name: det\n    version: "1"\n    priorty: 5\n    variants: 3\n')
    with pytest.raises(ManifestError) as caught:
        load_model_set(text, "m.yaml")
    assert caught.value.line == 7
    assert caught.value.field == "models[0].priorty"


def test_other_errors_are_reported_top_down() -> None:
    text = MODELSET_HEAD + (
        '  - name: Det\n    version: "1"\n    priority: high\n    variants: []\n'
    )
    with pytest.raises(ManifestError) as caught:
        load_model_set(text, "m.yaml")
    assert str(caught.value) == (
        "m.yaml:5: models[0].name: expected a name of lowercase letters, digits, '.', '_' "
        "or '-' (at most 64, starting with a letter or digit), got 'Det'"
    )


def test_anchors_and_merge_keys_resolve_lines() -> None:
    text = MODELSET_HEAD + (
        "  - &base\n"
        "    name: det\n"
        '    version: "1"\n'
        "    priority: 1\n"
        "    variants:\n"
        "      - name: v\n"
        "        precision: int8\n"
        f"        artifact: {{sha256: {'a' * 64}, size: 1}}\n"
        "        requires: {memory_mb: 1}\n"
        "  - <<: *base\n"
        "    name: Rec\n"
    )
    with pytest.raises(ManifestError) as caught:
        load_model_set(text, "m.yaml")
    assert caught.value.line == 15
    assert caught.value.field == "models[1].name"
    valid = load_model_set(text.replace("Rec", "rec"), "m.yaml")
    assert [m.name for m in valid.models] == ["det", "rec"]
    assert valid.models[1].variants == valid.models[0].variants


def test_non_string_key_is_refused() -> None:
    text = MODELSET_HEAD + (
        "  - name: det\n"
        '    version: "1"\n'
        "    priority: 1\n"
        "    inputs:\n"
        "      7: {shape: [1]}\n"
        "    variants: []\n"
    )
    with pytest.raises(ManifestError) as caught:
        load_model_set(text, "m.yaml")
    assert str(caught.value) == "m.yaml:9: models[0].inputs[7]: expected a string key, got 7"


def test_lax_mode_coerces_for_callers_that_ask() -> None:
    text = "model_memory_mb: '512'\nstorage_mb: 1\nthreads: 1\n"
    from contract.profile import Budgets

    with pytest.raises(ManifestError):
        load_document(text, "b.yaml", Budgets)
    assert load_document(text, "b.yaml", Budgets, strict=False).model_memory_mb == 512


def test_duplicate_names_are_refused_outside_yaml_too() -> None:
    model_set = load_model_set(*read("modelset.yaml"))
    data = model_set.model_dump(by_alias=True)
    data["models"].append(data["models"][0])
    with pytest.raises(ValidationError, match="duplicate model name 'ocr-det'"):
        ModelSet.model_validate(data)


def test_format_field() -> None:
    assert format_field(()) == "(document)"
    assert format_field(("models", 1, "variants", 0, "artifact", "sha256")) == (
        "models[1].variants[0].artifact.sha256"
    )
    assert format_field(("runtime", "models", "ocr.det", "queue_depth")) == (
        "runtime.models['ocr.det'].queue_depth"
    )

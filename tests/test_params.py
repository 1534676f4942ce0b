"""params.yaml: the repository's file is valid; every bad value stops a real stage with exit 2
and one line naming the key, before anything is written."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmnist.errors import ParamsError
from fmnist.params import load_params, schema, validate

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / "stages" / "preprocess.py"
BASE = load_params(REPO / "params.yaml")
BASE_TEXT = (REPO / "params.yaml").read_text(encoding="utf-8")
MAX_BATCH = schema()["properties"]["train"]["properties"]["batch_size"]["maximum"]


def _run_stage(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(STAGE)], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _assert_rejected(cwd: Path, *expected: str) -> str:
    """Exit 2, one stderr line holding every expected piece, no traceback, nothing written."""
    result = _run_stage(cwd)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("preprocess: params.yaml: ")
    for piece in expected:
        assert piece in lines[0]
    assert not (cwd / "data").exists()
    return lines[0]


def _with(path: str, value: Any) -> dict[str, Any]:
    params = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[last] = value
    return params


def _write(cwd: Path, params: Any) -> None:
    (cwd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def test_repository_params_are_valid() -> None:
    assert validate(copy.deepcopy(BASE)) == BASE
    assert set(BASE) == set(schema()["required"])


def test_rho_below_minimum_names_key_and_bound(tmp_path: Path) -> None:
    _write(tmp_path, _with("train.rho", -1))
    line = _assert_rejected(tmp_path)
    assert line == "preprocess: params.yaml: train.rho: -1 is less than the minimum of 0"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("train.lr", "fast", "train.lr: 'fast' is not of type 'number'"),
        ("train.batch_size", MAX_BATCH + 1,
         f"train.batch_size: {MAX_BATCH + 1} is greater than the maximum of {MAX_BATCH}"),
        # JSON Schema counts 42.0 as an integer; numpy's seeding does not (it was a traceback)
        ("seed", 42.0, "seed: 42.0 is not of type 'integer' (a whole number: write 42)"),
    ],
    ids=["type", "batch-limit", "whole-float"],
)
def test_bad_value_exits_2_naming_the_key(
    tmp_path: Path, key: str, value: Any, expected: str
) -> None:
    _write(tmp_path, _with(key, value))
    _assert_rejected(tmp_path, expected)


def _message(tmp_path: Path, params: Any) -> str:
    """The ParamsError of loading `params` from a file (in-process: cheaper than a stage run)."""
    _write(tmp_path, params)
    with pytest.raises(ParamsError) as exc:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(exc.value)
    return str(exc.value)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("train.lr", "1e-4",
         "train.lr: '1e-4' is not of type 'number' (YAML reads '1e-4' as text: write 1.0e-4)"),
        ("model.dropout", "0.1",
         "model.dropout: '0.1' is not of type 'number' (a number in quotes: write it without"),
        ("train.batch_size", 32.5, "train.batch_size: 32.5 is not of type 'integer'"),
        ("train.epochs", 2.0, "train.epochs: 2.0 is not of type 'integer' (a whole number: "
         "write 2)"),
        ("preprocess.train_subset", 1000.0, "preprocess.train_subset: 1000.0 is not of type "
         "'integer', 'null' (a whole number: write 1000)"),
        ("train.augment.flip", "yes", "train.augment.flip: 'yes' is not of type 'boolean'"),
        ("train.optimizer", "adam", "train.optimizer: 'adam' is not one of"),
        ("data.sources", [], "data.sources"),
        ("data.sources", ["/usr/share/datasets/fashion-mnist", "ftp://example.org/fm"],
         "data.sources.1: 'ftp://example.org/fm': only http:// and https:// URLs are fetched"),
        # download fetches "http://" as written: "HTTP://" would be looked for as a folder
        ("data.sources", ["HTTP://example.org/fm"], "data.sources.0: 'HTTP://example.org/fm': "
         "only http:// and https:// URLs are fetched"),
        ("tune.trials", "1e3", "tune.trials: '1e3' is not of type 'integer' (YAML reads '1e3' as "
         "text: write 1000)"),
        ("model.channels", [32, 0], "model.channels.1: 0 is less than the minimum of 1"),
        ("tune.space.lr", {"low": 0.1}, "tune.space.lr"),
        ("tune.space.lr", {"low": 0.3, "high": 0.1}, "tune.space.lr: low 0.3 > high 0.1"),
    ],
    ids=["yaml11-float", "quoted-number", "integer", "whole-float", "whole-float-or-null", "bool",
         "enum", "empty-list", "url-scheme", "url-scheme-case", "exponent-for-integer",
         "list-item", "range-entry", "low-high"],
)
def test_each_kind_of_bad_value_names_its_key(
    tmp_path: Path, key: str, value: Any, expected: str
) -> None:
    assert expected in _message(tmp_path, _with(key, value))


def test_unknown_key_is_named(tmp_path: Path) -> None:
    params = copy.deepcopy(BASE)
    params["train"]["rh0"] = params["train"].pop("rho")
    _write(tmp_path, params)
    _assert_rejected(tmp_path, "train.rh0: unknown key")


def test_missing_section_is_named(tmp_path: Path) -> None:
    params = copy.deepcopy(BASE)
    del params["model"]
    _write(tmp_path, params)
    _assert_rejected(tmp_path, "model: missing")


def test_an_experiment_override_changes_one_line_of_params_yaml(tmp_path: Path) -> None:
    """`dvc exp run -S train.rho=0.1` rewrites params.yaml with DVC's own YAML writer: the
    file is kept in that writer's layout, so the experiment's diff is the value it set."""
    from dvc.utils.serialize import modify_yaml

    copy_path = tmp_path / "params.yaml"
    copy_path.write_text(BASE_TEXT, encoding="utf-8")
    with modify_yaml(copy_path) as data:
        data["train"]["rho"] = 0.1
    after = copy_path.read_text(encoding="utf-8").splitlines()
    assert len(after) == len(BASE_TEXT.splitlines())
    changed = [(old, new) for old, new in zip(BASE_TEXT.splitlines(), after, strict=True)
               if old != new]
    assert changed == [("  rho: 0.05", "  rho: 0.1")]


def test_cross_field_rule_is_named(tmp_path: Path) -> None:
    params = _with("train.momentum", 0)
    params["train"]["nesterov"] = True
    assert "train.nesterov: needs train.momentum > 0" in _message(tmp_path, params)


def test_yaml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    lines = BASE_TEXT.splitlines(keepends=True)
    number = next(i for i, line in enumerate(lines, 1) if line.startswith("  rho:"))
    lines[number - 1] = "  rho: 0.05: 1\n"
    (tmp_path / "params.yaml").write_text("".join(lines), encoding="utf-8")
    _assert_rejected(tmp_path, f"YAML syntax error: line {number},")


def test_impossible_date_exits_2_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("seed: 2001-02-30\n", encoding="utf-8")
    _assert_rejected(tmp_path, "day is out of range")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("- seed\n- data\n", "expected a mapping"), ("[" * 1000, "nested too deeply"),
     ("# all commented out\n", "empty \\(expected the mapping")],
    ids=["list", "deep-nesting", "empty"],
)
def test_unusable_document_is_one_line(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(ParamsError, match=expected) as exc:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(exc.value)


def test_missing_params_file_exits_2(tmp_path: Path) -> None:
    result = _run_stage(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "preprocess: params.yaml: not found (run from the repository root)"
    )


def test_several_unknown_keys_of_mixed_types_are_one_line() -> None:
    params = copy.deepcopy(BASE)
    params["train"].update({1: "a", "zz": 2, None: 3})
    with pytest.raises(ParamsError, match=r"^params.yaml: train\.") as exc:
        validate(params)
    assert "\n" not in str(exc.value)


# --- fuzzing: nothing but a valid dict or one ParamsError line ----------------------------------

SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True) | st.text(max_size=6)
)
KEYS = st.text(max_size=6) | st.integers(-3, 3) | st.booleans() | st.none()
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=6,
)


def _only_dict_or_params_error(params: Any) -> None:
    try:
        result = validate(params)
    except ParamsError as exc:
        message = str(exc)
        assert message.startswith("params.yaml: ") and "\n" not in message
    else:
        assert isinstance(result, dict)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position in the tree: (path to a container, key or index in it)."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(
        node, list) else []
    for key, child in items:
        out.append(prefix + (key,))
        out.extend(_paths(child, prefix + (key,)))
    return out


BASE_PATHS = _paths(BASE)
FUZZ = settings(max_examples=150, deadline=None)


@FUZZ
@given(VALUES)
def test_random_structures_give_dict_or_params_error(params: Any) -> None:
    _only_dict_or_params_error(params)


@FUZZ
@given(st.data())
def test_mutated_repository_params_give_dict_or_params_error(data: st.DataObject) -> None:
    params = copy.deepcopy(BASE)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(BASE_PATHS))
        parent = params
        try:
            for key in path[:-1]:
                parent = parent[key]
            action = data.draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                parent[path[-1]] = data.draw(VALUES)
            elif action == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[data.draw(KEYS)] = data.draw(VALUES)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    _only_dict_or_params_error(params)


YAMLISH = st.text(
    alphabet=st.sampled_from(list("abcrho:-_ \n\t[]{},'\"#&*!|>%@`?.0123456789e+") + ["\x00"]),
    max_size=120,
)


def _load_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    try:
        result = load_params(path)
    except ParamsError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
    else:
        assert isinstance(result, dict)


@settings(FUZZ, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(YAMLISH | st.text(max_size=80))
def test_random_yaml_text_gives_dict_or_params_error(tmp_path: Path, text: str) -> None:
    _load_text(tmp_path / "params.yaml", text)


@settings(FUZZ, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.integers(0, len(BASE_TEXT)), length=st.integers(0, 40), insert=YAMLISH)
def test_damaged_repository_yaml_gives_dict_or_params_error(
    tmp_path: Path, start: int, length: int, insert: str
) -> None:
    _load_text(tmp_path / "params.yaml", BASE_TEXT[:start] + insert + BASE_TEXT[start + length:])


@pytest.mark.parametrize("key", ["train.rho", "train.lr"])
def test_nan_is_not_a_valid_number(key: str) -> None:
    params = _with(key, math.nan)  # YAML `.nan`
    with pytest.raises(ParamsError, match=key):
        validate(params)


def test_a_duplicate_key_is_refused_with_its_line(tmp_path: Path) -> None:
    text = (REPO / "params.yaml").read_text() + "seed: 3\n"
    path = tmp_path / "params.yaml"
    path.write_text(text)
    line = len(text.splitlines())
    with pytest.raises(ParamsError, match=rf"line {line}, column 1: duplicate key 'seed'"):
        load_params(path)


def test_an_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(levels) + "\n")  # 9^9 leaves once expanded
    with pytest.raises(ParamsError, match="anchors and aliases") as info:
        load_params(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("key", "value"), [("train.augment.flip", 1.0), ("model.channels", 32.0),
                                            ("train.nesterov", "0")],
                         ids=["float-for-bool", "float-for-list", "quoted-for-bool"])
def test_a_number_hint_is_given_only_where_a_number_belongs(
    tmp_path: Path, key: str, value: Any
) -> None:
    message = _message(tmp_path, _with(key, value))
    assert message.endswith("is not of type 'boolean'") or message.endswith(
        "is not of type 'array'"), message

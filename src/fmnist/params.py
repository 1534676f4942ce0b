"""Load params.yaml and validate it against the JSON Schema before any stage works."""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from fmnist.constants import PARAMS_FILE, URL_SCHEMES
from fmnist.errors import ParamsError


class _StrictLoader(yaml.SafeLoader):
    """YAML as DVC reads params.yaml, minus two traps: a duplicate key (PyYAML keeps the last,
    DVC rejects the file) and anchors/aliases (a nested "billion laughs" alias bomb expands
    without bound while the params are walked). Both are refused with the line they are on."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(event.start_mark, "anchors and aliases (&, *) are not allowed")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                continue  # unhashable: construct_mapping itself reports it
            if key in seen:
                raise _Refused(key_node.start_mark, f"duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Refused(yaml.YAMLError):
    def __init__(self, mark: Any, problem: str) -> None:
        super().__init__(problem)
        self.problem_mark, self.problem = mark, problem


def is_integer(value: Any) -> bool:
    """An int, not a float with no fraction: JSON Schema counts 16.0 as an integer, but
    range(), slicing and numpy's seeding refuse it (YAML reads `epochs: 16.0` as a float)."""
    return isinstance(value, int) and not isinstance(value, bool)


# The validator of params.yaml and of the model configs model files carry (fmnist.modelfile).
ParamsValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: is_integer(value)),
)


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The params schema: the one definition of every key, its range and its meaning."""
    text = resources.files("fmnist").joinpath("params_schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _name(key: Any) -> str:
    """A key as the message shows it: plain when printable, else its repr (never a newline)."""
    if isinstance(key, str):
        return key if key.isprintable() and key else repr(key)
    return str(key)  # list indices, and YAML's int/bool/null keys


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(_name(part) for part in error.absolute_path) or "(top level)"


def _describe(error: jsonschema.ValidationError) -> str:
    """One readable line for the most relevant schema violation."""
    path = _key_path(error)
    if error.validator == "additionalProperties":
        allowed = set(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - allowed, key=_name)  # keys of mixed types
        prefix = "" if path == "(top level)" else path + "."
        return f"{prefix}{_name(unknown[0])}: unknown key (allowed: {', '.join(sorted(allowed))})"
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        prefix = "" if path == "(top level)" else path + "."
        return f"{prefix}{missing[0]}: missing"
    if error.validator == "propertyNames":
        return f"{path}: {error.instance!r} is not a tunable train key"
    if error.validator == "oneOf" and isinstance(error.instance, dict):
        got = sorted(map(_name, error.instance))
        return f"{path}: give either 'choices' or 'low' and 'high' (got {got})"
    hint = number_hint(error.instance, error.validator_value) if error.validator == "type" else ""
    return f"{path}: {error.message}{hint}"


def number_hint(value: Any, expected: str | list[str]) -> str:
    """Where a number was expected, the usual ways of writing one wrong: a whole number with
    ".0", a quoted number, an exponent without a dot and a sign (YAML 1.1 reads 1e-4 as text)."""
    types = [expected] if isinstance(expected, str) else list(expected)
    integer, number = "integer" in types, "number" in types
    if isinstance(value, float) and value.is_integer() and integer:
        return f" (a whole number: write {int(value)})"
    if not isinstance(value, str) or not (integer or number):
        return ""
    try:
        parsed = float(value)
    except ValueError:
        return ""
    if not math.isfinite(parsed):
        return ""
    if not isinstance(yaml.safe_load(value), str):  # unquoted, YAML reads it as a number
        return " (a number in quotes: write it without them)"
    if integer and not number and parsed.is_integer():
        written = str(int(parsed))
    else:
        mantissa, exponent = f"{parsed:e}".split("e")
        mantissa = mantissa.rstrip("0") + ("0" if mantissa.rstrip("0").endswith(".") else "")
        written = f"{mantissa}e{int(exponent):+d}"
    return f" (YAML reads {value!r} as text: write {written})"


def _first_nan(node: Any, path: str = "") -> str | None:
    """Key path of the first NaN: JSON Schema's bounds compare False with NaN and let it pass."""
    if isinstance(node, float) and math.isnan(node):
        return path or "(top level)"
    if isinstance(node, dict):
        children = node.items()
    elif isinstance(node, list):
        children = enumerate(node)
    else:
        return None
    for key, child in children:
        found = _first_nan(child, f"{path}.{_name(key)}" if path else _name(key))
        if found:
            return found
    return None


def validate(params: Any, source: str = PARAMS_FILE) -> dict[str, Any]:
    """Raise ParamsError naming the key path and the problem; return params unchanged if valid."""
    nan_at = _first_nan(params)
    if nan_at is not None:
        raise ParamsError(f"{source}: {nan_at}: NaN is not allowed")
    validator = ParamsValidator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(params))
    if error is not None:
        raise ParamsError(f"{source}: {_describe(error)}")
    _check_cross_field(params, source)
    return params


def _check_cross_field(params: dict[str, Any], source: str) -> None:
    """Rules that JSON Schema cannot express (or not in a message a user reads)."""
    for index, place in enumerate(params["data"]["sources"]):
        scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", place)
        if scheme and scheme.group(1) not in URL_SCHEMES:  # download matches them exactly
            raise ParamsError(f"{source}: data.sources.{index}: {place!r}: only http:// and "
                              "https:// URLs are fetched (or give a local folder)")
    train = params["train"]
    if train["nesterov"] and train["momentum"] == 0:
        raise ParamsError(f"{source}: train.nesterov: needs train.momentum > 0")
    for key, entry in params["tune"]["space"].items():
        if "low" in entry and entry["low"] > entry["high"]:
            low, high = entry["low"], entry["high"]
            raise ParamsError(f"{source}: tune.space.{key}: low {low} > high {high}")
        if entry.get("log") and entry.get("low", 1) <= 0:
            raise ParamsError(f"{source}: tune.space.{key}: log scale needs low > 0")
    if params["tune"]["sampler"] == "grid":
        ranged = [k for k, e in params["tune"]["space"].items() if "choices" not in e]
        if ranged:
            raise ParamsError(f"{source}: tune.space.{ranged[0]}: the grid sampler needs 'choices'")


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Read and validate params.yaml; every failure is a one-line ParamsError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the repository root)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{path}: cannot read: {exc}") from None
    try:
        params = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as exc:
        mark = exc.problem_mark
        raise ParamsError(
            f"{path}: line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(f"{path}: YAML syntax error: {where}{problem}") from None
    except ValueError as exc:  # PyYAML's constructors: an impossible date such as 2001-02-30
        raise ParamsError(f"{path}: unreadable YAML value: {exc}") from None
    except RecursionError:
        raise ParamsError(f"{path}: YAML nested too deeply") from None
    if params is None:
        raise ParamsError(f"{path}: empty (expected the mapping of sections params.yaml holds)")
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    return validate(params, str(path))

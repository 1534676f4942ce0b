"""The README's params reference is generated from the schema and must not drift from it."""

from __future__ import annotations

from pathlib import Path

import yaml

from fmnist.params import schema
from fmnist.paramsdoc import BEGIN, END, render, updated_readme

REPO = Path(__file__).resolve().parents[1]


def _undocumented(node: dict, path: str = "") -> list[str]:
    missing = [] if node.get("description") or not path else [path]
    for key, child in node.get("properties", {}).items():
        missing += _undocumented(child, f"{path}.{key}" if path else key)
    return missing


def test_every_schema_key_has_a_description() -> None:
    assert _undocumented(schema()) == []


def test_reference_lists_every_params_key_with_its_default() -> None:
    table = render({**yaml.safe_load((REPO / "params.yaml").read_text()), "seed": 7})
    assert "| `seed` | `7` |" in table
    assert "| `train.rho` | `0.05` |" in table


def test_readme_reference_is_up_to_date() -> None:
    readme = (REPO / "README.md").read_text()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert BEGIN in readme and END in readme
    assert updated_readme(readme, params) == readme, "run: python -m fmnist.paramsdoc"

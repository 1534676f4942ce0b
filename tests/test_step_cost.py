"""bench/step_cost.py: times real training steps of params.yaml's model and the asked-for widths
and reports each against params.yaml's; a malformed width list is a one-line error."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from fmnist.params import load_params

REPO = Path(__file__).resolve().parents[1]


def _load_bench() -> Any:
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("step_cost", REPO / "bench" / "step_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


step_cost = _load_bench()


def test_reports_each_width_against_params_yaml_model(capsys: pytest.CaptureFixture) -> None:
    assert step_cost.main(["--channels", "8/8", "--warmup", "1", "--windows", "1",
                           "--steps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "ms per step" not in line]
    default = "/".join(str(c) for c in load_params(REPO / "params.yaml")["model"]["channels"])
    assert [r.split(" | ")[0] for r in rows] == [f"| {default} (params.yaml)", "| 8/8"]
    assert rows[0].endswith("| 1.00 |")
    assert float(rows[1].split(" | ")[-1].rstrip(" |")) > 0


def test_malformed_channels_is_a_one_line_error() -> None:
    with pytest.raises(SystemExit, match="--channels: expected e.g. 16/32/64"):
        step_cost.parse_channels("16/x")

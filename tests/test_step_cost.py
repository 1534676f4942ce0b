"""bench/step_cost.py: params.yaml's model is timed first and every other width is reported
against it; the timer trains real steps; a malformed width list is a one-line error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from project_files import load_bench_script
from torch import nn

from fmnist.accel import select_backend
from fmnist.model import build_model
from fmnist.params import load_params

REPO = Path(__file__).resolve().parents[1]
PARAMS = load_params(REPO / "params.yaml")
DEFAULT = [int(c) for c in PARAMS["model"]["channels"]]


step_cost = load_bench_script("step_cost")


def _widths(make_model: Any) -> list[int]:
    """The block widths of the model a step_cost factory builds."""
    convs = [m.out_channels for m in make_model().features if isinstance(m, nn.Conv2d)]
    return convs[::PARAMS["model"]["convs_per_block"]]


def _table(out: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in out.splitlines() if line.startswith("| ") and "ms per step" not in line]


@pytest.mark.usefixtures("torch_determinism_restored")
def test_default_first_and_ratios_against_it(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    built: list[list[int]] = []

    def fake_seconds(make_model: Any, *_: Any) -> float:
        built.append(_widths(make_model))
        return sum(built[-1]) * 1e-3

    monkeypatch.setattr(step_cost, "seconds_per_step", fake_seconds)
    default = "/".join(map(str, DEFAULT))
    assert step_cost.main(["--channels", f"8/8,{default},8/8,{2 * DEFAULT[0]}"]) == 0
    assert built == [DEFAULT, [8, 8], [2 * DEFAULT[0]]]
    printed = capsys.readouterr().out
    assert ", NaN fill off, " in printed.splitlines()[0]  # configure_torch's, on this CPU
    rows = _table(printed)
    assert [r[0] for r in rows] == [f"{default} (params.yaml)", "8/8", str(2 * DEFAULT[0])]
    assert [r[3] for r in rows] == ["1.00", f"{16 / sum(DEFAULT):.2f}",
                                    f"{2 * DEFAULT[0] / sum(DEFAULT):.2f}"]


@pytest.mark.usefixtures("torch_determinism_restored")
def test_without_batch_norm_times_each_model_again_without_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    built: list[tuple[list[int], bool]] = []

    def fake_seconds(make_model: Any, *_: Any) -> float:
        model = make_model()
        normalized = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        built.append((_widths(make_model), normalized))
        return (2.0 if normalized else 1.0) * 1e-3

    monkeypatch.setattr(step_cost, "seconds_per_step", fake_seconds)
    default = "/".join(map(str, DEFAULT))
    assert step_cost.main(["--channels", f"{default},8/8", "--without-batch-norm"]) == 0
    assert built == [(DEFAULT, True), (DEFAULT, False), ([8, 8], True), ([8, 8], False)]
    rows = _table(capsys.readouterr().out)
    assert [(r[0], r[3]) for r in rows] == [
        (f"{default} (params.yaml)", "1.00"), (f"{default}, no BatchNorm", "0.50"),
        ("8/8", "1.00"), ("8/8, no BatchNorm", "0.50")]


def test_without_batch_norm_on_a_model_without_it_is_a_usage_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    params = {**PARAMS, "model": {**PARAMS["model"], "batch_norm": False}}
    monkeypatch.setattr(step_cost, "load_params", lambda _path: params)
    with pytest.raises(SystemExit) as exit_info:
        step_cost.main(["--channels", "8/8", "--without-batch-norm"])
    assert exit_info.value.code == 2
    assert "--without-batch-norm: params.yaml's model.batch_norm is false" in (
        capsys.readouterr().err)


def test_timer_trains_the_given_width() -> None:
    backend = select_backend({**PARAMS["ipex"], "enabled": False})
    seconds = step_cost.seconds_per_step(
        lambda: build_model({**PARAMS["model"], "channels": [4]}), backend, 8,
        warmup=1, windows=1, steps=1)
    assert 0 < seconds < 60


def test_parse_channels() -> None:
    assert step_cost.parse_channels("16/32,32/64,") == [[16, 32], [32, 64]]


@pytest.mark.parametrize("text", ["16/x", "16/-32", "0/16", ""])
def test_malformed_channels_is_a_one_line_error(text: str) -> None:
    with pytest.raises(SystemExit, match="--channels: expected e.g. 16/32/64"):
        step_cost.parse_channels(text)


def test_markdown_out_appends_each_run_with_its_command(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    monkeypatch.setattr(step_cost, "seconds_per_step",
                        lambda make_model, *_: sum(_widths(make_model)) * 1e-3)
    out = tmp_path / "step_cost.md"
    out.write_text("# Step cost\n")
    for width in ("8/8", "4/4"):
        assert step_cost.main(["--channels", width, "--markdown-out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Step cost\n")  # what was there stays
    assert text.count("| channels | ms per step |") == 2
    first, second = text.index("--channels 8/8"), text.index("--channels 4/4")
    assert first < text.index("| 8/8 |") < second < text.index("| 4/4 |")


def test_nan_fill_pairs_alternate_on_and_off_and_restore_the_switch(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    seen: list[tuple[bool, list[int]]] = []
    # ms: the widths table 9 and 9, then on 2 off 1, off 2 on 4, on 3 off 6
    costs = iter([9e-3, 9e-3, 2e-3, 1e-3, 2e-3, 4e-3, 3e-3, 6e-3])

    def fake_seconds(make_model: Any, *_: Any) -> float:
        seen.append((torch.utils.deterministic.fill_uninitialized_memory, _widths(make_model)))
        return next(costs)

    monkeypatch.setattr(step_cost, "seconds_per_step", fake_seconds)
    # keep the fill on through main (as on a non-CPU device), so that its restore shows
    monkeypatch.setattr(step_cost, "configure_torch", lambda threads: None)
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    out = tmp_path / "step_cost.md"
    assert step_cost.main(["--channels", "8/8", "--nan-fill-pairs", "3",
                           "--markdown-out", str(out)]) == 0
    # the widths table (params.yaml's model, then 8/8), then params.yaml's model in pairs
    assert [fill for fill, _ in seen[2:]] == [True, False, False, True, True, False]
    assert [widths for _, widths in seen] == [DEFAULT, [8, 8]] + [DEFAULT] * 6
    assert torch.utils.deterministic.fill_uninitialized_memory is True  # restored
    printed = capsys.readouterr().out
    assert ", NaN fill on, " in printed.splitlines()[0]  # what the widths table ran with
    rows = {r[0]: r for r in _table(printed) if r[0].startswith(("on", "off"))}
    assert rows["on"][1:] == ["3.0", "2.0, 4.0, 3.0", "1.000"]
    assert rows["off"][1:] == ["2.0", "1.0, 2.0, 6.0", "0.667"]
    assert "Off / on per pair: 0.500, 0.500, 2.000 (median 0.500)." in printed
    assert out.read_text().count("| NaN fill |") == 1


def test_nan_fill_pairs_restore_the_switch_when_a_step_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = iter([1e-3, 1e-3])

    def fails_third(*_: Any) -> float:
        return next(calls)  # StopIteration on the third call: the second pair's "off" step

    monkeypatch.setattr(step_cost, "seconds_per_step", fails_third)
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    with pytest.raises(StopIteration):
        step_cost.nan_fill_pairs(lambda: None, None, 8, 2, 1, 1, 1)  # type: ignore[arg-type]
    assert torch.utils.deterministic.fill_uninitialized_memory is True


def test_negative_nan_fill_pairs_is_a_one_line_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        step_cost.main(["--channels", "8/8", "--nan-fill-pairs", "-1"])
    assert "--nan-fill-pairs: expected 0 or more, got -1" in capsys.readouterr().err

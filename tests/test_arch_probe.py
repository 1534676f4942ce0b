"""bench/arch_probe.py: the early-pool model runs each block's second conv at half resolution,
its multiply-adds are counted right, `fit` trains it only while the probe says so, and the
table pairs each seed with the default's run of the same class, dtype and seed."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from project_files import load_bench_script
from torch import nn

import fmnist.train as train_module
from fmnist.constants import CLASS_NAMES
from fmnist.data import Prepared, Split
from fmnist.params import load_params
from fmnist.train import fit

REPO = Path(__file__).resolve().parents[1]
PARAMS = load_params(REPO / "params.yaml")

probe = load_bench_script("arch_probe")


def _split(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    return Split(images=rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
                 labels=np.arange(n, dtype=np.int64) % 3)


DATA = Prepared(train=_split(64, 0), val=_split(32, 1), test=_split(32, 2),
                class_names=CLASS_NAMES)


def _conv_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """(output side, output channels) of every conv, in order, for one image."""
    sizes: list[tuple[int, int]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append((o.shape[-1], o.shape[1])))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    return sizes


def test_each_blocks_second_conv_runs_at_half_resolution() -> None:
    model = probe.make_model("2/3/4", {"dropout": 0.0, "hidden": 5})
    assert _conv_sizes(model) == [(28, 2), (14, 2), (14, 3), (7, 3), (7, 4), (3, 4)]
    assert model(torch.zeros(6, 1, 28, 28)).shape == (6, 10)


def test_flip_tta_averages_the_image_and_its_mirror() -> None:
    torch.manual_seed(0)
    model = probe.make_model("2/3/4", {"dropout": 0.0, "hidden": 5}).eval()
    x = torch.rand(3, 1, 28, 28) * 255
    plain, mirrored = model(x), model(x.flip(-1))
    model.flip_tta = True
    assert torch.allclose(model(x), (plain + mirrored) / 2)


def test_fit_trains_the_arch_only_inside_building() -> None:
    params = copy.deepcopy(PARAMS)
    params["model"].update(hidden=8)
    params["train"].update(batch_size=32, epochs=1, threads=1, ema_decay=0.9)  # EMA copy too
    params["ipex"].update(enabled=False, dtype="float32")
    original = train_module.build_model
    with probe.building("2/3/4"):
        model = fit(DATA, params, progress=False).model
    assert isinstance(model, probe.EarlyPoolCNN)
    assert _conv_sizes(model)[-1] == (3, 4)
    assert train_module.build_model is original
    with pytest.raises(RuntimeError), probe.building("2/3/4"):
        raise RuntimeError
    assert train_module.build_model is original


@pytest.mark.parametrize("text", ["32/64", "32/x/128", "0/64/128", "32/64/128/256"])
def test_a_malformed_arch_is_a_one_line_error(text: str) -> None:
    with pytest.raises(SystemExit, match="expected three widths"):
        probe.parse_arch(text)


def _run(seed: int, acc: float, **extra: Any) -> dict[str, Any]:
    return {"recipe": probe.DEFAULT_RECIPE, "recipe_hash": "h", "seed": seed,
            "cpu_class": "AMX", "dtype": "bfloat16", "threads": 2, "isa_limit": "",
            "allocator": "kept", "train_seconds": 100.0 + seed, "test_acc": acc - 0.002,
            "test_acc_flip_tta": acc, **extra}


def test_summary_pairs_each_seed_with_the_default_of_its_class_and_seed() -> None:
    runs = [_run(0, 0.9410, arch="32/64/128", multiply_adds=13e6),
            _run(1, 0.9420, arch="32/64/128", multiply_adds=13e6)]
    baseline = [_run(0, 0.9400), _run(1, 0.9390), _run(2, 0.9000),
                # not pairs: another class, dtype, recipe, params.yaml (hash) or thread count
                _run(0, 0.5, cpu_class="AVX2"), _run(0, 0.5, dtype="float32"),
                _run(0, 0.5, recipe="late-q16"), _run(1, 0.5, recipe_hash="old"),
                _run(1, 0.5, threads=1)]
    row = next(line for line in probe.summary(runs, [], baseline).splitlines()
               if "| 32/64/128 |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:] == ["13.0", "2", "94.15% ± 0.07% (94.10%)", "93.95%", "+0.20 (2 seeds)",
                         "100-101"]
    scratch = [{**runs[0], "source": "scratch"}, runs[1]]  # accuracy counts, seconds do not
    row = next(line for line in probe.summary(scratch, [], baseline).splitlines()
               if "| 32/64/128 |" in line)
    assert row.endswith("| +0.20 (2 seeds) | 101 |")


def test_step_costs_show_the_spread_of_each_model_per_class() -> None:
    entry = {"cpu_class": "AMX", "isa_limit": "", "allocator": "kept", "dtype": "bfloat16",
             "multiply_adds": 1e6, "ms_per_step": 10.0, "ratio": 1.0}
    steps = [{**entry, "arch": "params.yaml"}, {**entry, "arch": "2/3/4", "ratio": 1.5},
             {**entry, "arch": "2/3/4", "ratio": 1.2, "ms_per_step": 12.0},
             {**entry, "arch": "2/3/4", "ratio": 0.9, "allocator": "default"}]
    rows = [line for line in probe.summary([], steps, []).splitlines() if "| 2/3/4 |" in line]
    assert rows == ["| AMX, bfloat16 | 2/3/4 | 1.0 | 2 | 10.0-12.0 | 1.20-1.50 |",
                    "| AMX, default malloc, bfloat16 | 2/3/4 | 1.0 | 1 | 10.0 | 0.90 |"]


def test_main_resumes_past_stored_runs(monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    trained: list[tuple[str, int]] = []

    def fake_run_one(data: Any, params: dict[str, Any], recipe: str) -> dict[str, Any]:
        model = train_module.build_model(params["model"])
        trained.append((type(model).__name__, params["seed"]))
        planned = probe.tta.planned_run(recipe, params, "float32", 2)
        return {**planned, "train_seconds": 1.0, "test_acc": 0.9, "test_acc_flip_tta": 0.91}

    monkeypatch.setattr(probe.tta, "run_one", fake_run_one)
    monkeypatch.setattr(probe, "load_prepared", lambda path: DATA)
    monkeypatch.setattr(probe, "dtype_name", lambda dtype: "float32")
    store, table = tmp_path / "arch_probe.json", tmp_path / "arch_probe.md"
    files = ["--json", str(store), "--markdown", str(table)]
    monkeypatch.setattr(probe.tta, "RUNS_FILE", tmp_path / "none.json")  # no baseline runs
    assert probe.main(["--archs", "2/3/4,2/ 3/4", "--seeds", "0,1", *files]) == 0
    assert [seed for _, seed in trained] == [0, 1]  # one spelling, one model
    assert probe.main(["--archs", "2/3/4,3/4/5", "--seeds", "0,1,2", *files]) == 0
    assert [seed for _, seed in trained[2:]] == [2, 0, 1, 2]
    runs = json.loads(store.read_text())["runs"]
    assert [(r["arch"], r["seed"]) for r in runs] == [
        ("2/3/4", 0), ("2/3/4", 1), ("2/3/4", 2), ("3/4/5", 0), ("3/4/5", 1), ("3/4/5", 2)]
    assert runs[-1]["model"] == {"early_pool_channels": [3, 4, 5]}
    assert {name for name, _ in trained} == {"EarlyPoolCNN"}
    assert "| 3/4/5 |" in table.read_text()

"""bench/time_to_accuracy.py, training nothing but one tiny run (what a run records): a run on a
CPU posing as a lesser one is kept apart from a run on the real one (its key, its table row and
its frontier), and a run in another dtype than params.yaml's (`--dtype`) trains in that dtype
and is neither marked as the default nor held to a budget the issue does not set for it."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from project_files import load_bench_script

from fmnist.constants import CLASS_NAMES
from fmnist.data import Prepared, Split
from fmnist.errors import ParamsError
from fmnist.flops import Cost
from fmnist.params import load_params

REPO = Path(__file__).resolve().parents[1]


bench = load_bench_script("time_to_accuracy")
# the recipe that is params.yaml (seed aside): the one the table marks as the default
DEFAULT_RECIPES = [name for name, recipe in bench.RECIPES.items()
                   if bench.is_default(load_params(REPO / "params.yaml"), recipe)]
assert len(DEFAULT_RECIPES) == 1, f"params.yaml is not exactly one recipe: {DEFAULT_RECIPES}"
DEFAULT_RECIPE = DEFAULT_RECIPES[0]


def _run(isa_limit: str | None, test_acc: float, seconds: float,
         allocator: str | None = "kept") -> dict[str, Any]:
    run = {"recipe": "late-b16", "recipe_hash": "abc", "seed": 0, "cpu_class": "AVX2",
           "dtype": "float32", "threads": 2, "train_seconds": seconds, "test_acc": test_acc,
           "test_acc_flip_tta": test_acc, "val_acc": test_acc, "images_per_s_median": 1.0}
    if isa_limit is not None:
        run["isa_limit"] = isa_limit
    if allocator is not None:
        run["allocator"] = allocator
    return run


def test_isa_limit_names_the_variables_that_are_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in bench.ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    assert bench.isa_limit() == ""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert bench.isa_limit() == "ONEDNN_MAX_CPU_ISA=AVX2"


def test_an_emulated_run_does_not_stand_for_a_run_on_the_real_class() -> None:
    real = _run("", 0.94, 600, allocator=None)
    older_real = _run(None, 0.94, 600, allocator=None)  # older than both fields
    # same allocator field as the real runs: only the ISA limit tells the keys apart
    emulated = _run("ONEDNN_MAX_CPU_ISA=AVX2", 0.93, 590, allocator=None)
    assert bench.run_key(real) == bench.run_key(older_real)  # old runs: on the real class
    assert bench.run_key(emulated) != bench.run_key(real)


def test_emulated_and_real_runs_get_their_own_rows_and_frontiers() -> None:
    base = load_params(REPO / "params.yaml")
    rows = bench.summarize([_run("", 0.94, 600), _run("ATEN_CPU_CAPABILITY=avx2", 0.93, 590)],
                           base)
    assert sorted(r["cpu_class"] for r in rows) == ["AVX2", "AVX2 (emulated)"]
    # each is alone in its class, so each is on its own frontier: the faster emulated run
    # does not push the real one off it
    assert all(r["frontier"] for r in rows)
    assert "AVX2 (emulated)" in bench.markdown(rows)


def test_runs_with_the_page_faulting_malloc_are_timed_apart() -> None:
    """Runs older than fmnist.allocator paid ~18,000 page faults a step: same accuracy, other
    seconds, so neither their key nor their row is shared with newer runs."""
    base = load_params(REPO / "params.yaml")
    older, newer = _run("", 0.94, 800, allocator=None), _run("", 0.94, 570)
    assert bench.run_key(older) != bench.run_key(newer)
    assert bench.run_key(older) == bench.run_key(_run("", 0.94, 800, allocator="default"))
    rows = bench.summarize([older, newer], base)
    assert sorted(r["cpu_class"] for r in rows) == ["AVX2", "AVX2, default malloc"]
    assert {r["train_seconds_mean"] for r in rows} == {800, 570}


def test_a_row_pooling_runs_with_the_nan_fill_on_and_off_shows_both_costs() -> None:
    """The fill costs time, not accuracy: one row, pooled, with each state's seconds beside."""
    base = load_params(REPO / "params.yaml")
    older = _run("", 0.94, 340)  # older than the field: it ran with the fill on
    newer = [{**_run("", 0.95, seconds), "seed": seed, "nan_fill": False}
             for seed, seconds in ((1, 300), (2, 310))]
    (row,) = bench.summarize([older, *newer], base)
    assert row["seeds"] == [0, 1, 2]
    assert row["train_seconds_mean"] == pytest.approx(950 / 3)
    assert row["train_seconds_by_fill"] == pytest.approx({"on": 340, "off": 305})
    assert "| 317 (fill on 340, off 305) |" in bench.markdown([row])
    (alone,) = bench.summarize(newer, base)  # one state only: nothing to split
    assert alone["train_seconds_by_fill"] is None
    assert "| 305 |" in bench.markdown([alone])


def test_a_key_added_at_its_absent_value_keeps_the_recipe_hash() -> None:
    """Stored runs are found again after params.yaml gains model.pool_ceil_mode: false."""
    base = load_params(REPO / "params.yaml")
    params = bench.recipe_params(base, bench.RECIPES["late-e16"], 0)
    without = {**params, "model": {k: v for k, v in params["model"].items()
                                   if k != "pool_ceil_mode"}}
    assert bench.recipe_hash(params) == bench.recipe_hash(without)
    ceil = {**params, "model": {**params["model"], "pool_ceil_mode": True}}
    assert bench.recipe_hash(ceil) != bench.recipe_hash(params)


def test_dtype_overrides_params_ipex_dtype_and_only_that() -> None:
    base = load_params(REPO / "params.yaml")
    forced = bench.with_dtype(base, "float32")
    assert forced["ipex"]["dtype"] == "float32"
    assert {k: v for k, v in forced.items() if k != "ipex"} == {
        k: v for k, v in base.items() if k != "ipex"}
    assert base["ipex"]["dtype"] == "auto"  # params.yaml's own copy is left alone
    assert bench.with_dtype(base, None) is base
    with pytest.raises(ParamsError, match="ipex.dtype: 'float16'"):
        bench.with_dtype(base, "float16")


def _default_run(cpu: str, dtype: str) -> dict[str, Any]:
    return {**_run("", 0.94, 230), "recipe": DEFAULT_RECIPE, "cpu_class": cpu, "dtype": dtype}


def test_the_default_mark_and_the_budget_follow_the_dtype_params_yaml_trains_in() -> None:
    base = load_params(REPO / "params.yaml")
    assert base["ipex"]["dtype"] == "auto"
    rows = {(r["cpu_class"], r["dtype"]): r for r in bench.summarize(
        [_default_run("AMX", "bfloat16"), _default_run("AMX", "float32"),
         _default_run("AVX2", "float32")], base)}
    assert rows["AMX", "bfloat16"]["default"] and rows["AVX2", "float32"]["default"]
    assert not rows["AMX", "float32"]["default"]  # auto trains bf16 there
    assert rows["AMX", "bfloat16"]["budget_s"] == bench.BUDGET_S["bfloat16"]
    assert rows["AVX2", "float32"]["budget_s"] == bench.BUDGET_S["float32"]
    assert rows["AMX", "float32"]["budget_s"] is None  # the float32 budget is an AVX2 CPU's
    forced = bench.with_dtype(base, "float32")
    assert bench.params_dtype(forced, "AMX") == "float32"


def test_dtype_reaches_the_training_run_and_the_table_keeps_params_yaml_s_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained: list[dict[str, Any]] = []

    def fake_run_one(data: Any, params: dict[str, Any], recipe: str) -> dict[str, Any]:
        trained.append(params)
        return {**_default_run("AMX", params["ipex"]["dtype"]), "recipe": recipe,
                "recipe_hash": bench.recipe_hash(params)}

    monkeypatch.setattr(bench, "run_one", fake_run_one)
    monkeypatch.setattr(bench, "load_prepared", lambda path: None)
    monkeypatch.setattr(bench, "configure_torch", lambda threads: None)
    monkeypatch.setattr(bench, "figure", lambda rows, path: None)
    out = tmp_path / "runs.json"
    assert bench.main(["--recipes", DEFAULT_RECIPE, "--seeds", "0", "--default-seeds", "1",
                       "--dtype", "float32", "--json", str(out),
                       "--markdown", str(tmp_path / "table.md")]) == 0
    assert [p["ipex"]["dtype"] for p in trained] == ["float32"]
    assert bench.stored_runs(out)[0]["dtype"] == "float32"
    # the run is params.yaml's recipe, but not in the dtype params.yaml trains in on AMX
    assert f"| AMX | float32 | {DEFAULT_RECIPE}" in (tmp_path / "table.md").read_text()
    assert "*" not in (tmp_path / "table.md").read_text().splitlines()[-1]


def test_a_run_records_the_nan_fill_it_trained_with(keep_nan_fill_on: Callable[[], None]) -> None:
    """Real (tiny) runs: the record says whether the fill was on, so runs from before
    configure_torch turned it off can be told apart from runs after it."""
    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        labels = np.arange(n, dtype=np.int64) % 2
        images = rng.integers(0, 50, size=(n, 28, 28), dtype=np.uint8)
        images[labels == 1, 10:18, 4:24] = 220
        return Split(images=images, labels=labels)

    data = Prepared(train=split(64), val=split(32), test=split(32), class_names=CLASS_NAMES)
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["model"].update(channels=[4], convs_per_block=1, hidden=8)
    params["train"].update(epochs=1, batch_size=32, threads=1, sam_start=0.0, ema_decay=0.0)
    params["ipex"].update(enabled=False, dtype="float32")
    torch.utils.deterministic.fill_uninitialized_memory = True  # as torch would leave it
    run = bench.run_one(data, params, "tiny")
    assert run["nan_fill"] is False  # configure_torch's on a CPU
    assert run["recipe"] == "tiny" and run["dtype"] == "float32"
    assert 0.0 <= run["test_acc"] <= 1.0 and len(run["epoch_seconds"]) == 1
    keep_nan_fill_on()
    assert bench.run_one(data, params, "tiny")["nan_fill"] is True


# --- the compute floor ---------------------------------------------------------------------------


def _train(**changes: Any) -> dict[str, Any]:
    return {"optimizer": "sam", "epochs": 2, "batch_size": 128, "sam_start": 0.0,
            "sam_every": 1, **changes}


def test_sam_images_are_counted_step_by_step_as_fit_runs_them() -> None:
    train_images = 54_000  # preprocess's split of the 60,000 at val_fraction 0.1
    # 422 steps an epoch, the last of 112 images
    assert bench.sam_images(_train(), train_images) == 2 * 54_000
    assert bench.sam_images(_train(sam_start=1.0), train_images) == 0
    assert bench.sam_images(_train(sam_start=0.5), train_images) == 54_000  # the second epoch
    # steps 422, 425, ..., 842 of 844: 141 full batches, the epoch's short last one not among them
    assert bench.sam_images(_train(sam_start=0.5, sam_every=3), train_images) == 141 * 128
    assert bench.sam_images(_train(optimizer="sgd"), train_images) == 0  # no SAM steps at all


def test_the_floor_counts_each_image_s_step_and_the_validation_forward() -> None:
    cost = Cost(forward=10, plain_step=29, sam_step=58)
    plain = bench.training_flops(cost, _train(sam_start=1.0), 0.1)
    assert plain == 2 * (2 * 54_000 * 29 + 2 * 6_000 * 10)
    half = bench.training_flops(cost, _train(sam_start=0.5), 0.1)
    assert half == 2 * (54_000 * 29 + 54_000 * 58 + 2 * 6_000 * 10)


def test_roofs_come_from_the_throughput_results_and_the_higher_one_wins(tmp_path: Path) -> None:
    def write(name: str, cpu: str, fp32: float, bf16: float | None, threads: int = 2) -> None:
        (tmp_path / name).write_text(json.dumps(
            {"machine": {"cpu_class": cpu}, "threads": threads,
             "roofline": {"gflops_fp32": fp32, "gflops_bf16": bf16}}))

    write("throughput.json", "AVX2", 190.0, None)
    write("throughput_avx2.json", "AVX2", 150.0, None)  # read last
    write("throughput_avx2_1.json", "AVX2", 95.0, None, threads=1)
    write("throughput_avx512_bf16.json", "AVX512_BF16", 200.0, 400.0)
    (tmp_path / "throughput_avx512_bf16_repeats.json").write_text('{"runs": []}')
    assert bench.measured_roofs(tmp_path) == {
        ("AVX2", "float32", 2): 190.0, ("AVX2", "float32", 1): 95.0,
        ("AVX512_BF16", "float32", 2): 200.0, ("AVX512_BF16", "bfloat16", 2): 400.0}


def _sized_run(recipe: str, channels: list[int], seconds: float, isa_limit: str = "",
               threads: int = 2) -> dict[str, Any]:
    model = {"channels": channels, "convs_per_block": 2, "batch_norm": True, "dropout": 0.1,
             "hidden": 512}
    return {**_run(isa_limit, 0.94, seconds), "recipe": recipe, "model": model,
            "threads": threads, "train": _train(epochs=16, sam_start=0.75)}


def test_a_recipe_whose_floor_is_over_a_budget_is_marked_and_its_share_shown() -> None:
    base = load_params(REPO / "params.yaml")
    roofs = {("AVX2", "float32", 2): 200.0, ("AVX512_BF16", "bfloat16", 2): 400.0}
    small = _sized_run("late-e16", [16, 32, 64, 128], 600)
    wide = _sized_run("late-h16", [32, 64, 128, 256], 2_000)
    emulated = _sized_run("late-e16", [16, 32, 64, 128], 590, "ONEDNN_MAX_CPU_ISA=AVX2")
    one_thread = {**_sized_run("late-e16", [16, 32, 64, 128], 1_100, threads=1), "seed": 1}
    rows = {(r["recipe"], r["cpu_class"]): r
            for r in bench.summarize([small, wide, emulated], base, roofs)}
    e16, h16 = rows["late-e16", "AVX2"], rows["late-h16", "AVX2"]
    assert h16["multiply_adds"] > 3.9 * e16["multiply_adds"]  # twice the width: ~4x
    assert e16["floor_s"] == pytest.approx(e16["train_tflops"] * 1e12 / 200e9)
    assert rows["late-e16", "AVX2 (emulated)"]["floor_s"] is None  # no roof of a posed class
    # a roof measured at 2 threads says nothing of a 1-thread run
    (alone,) = bench.summarize([one_thread], base, roofs)
    assert alone["floor_s"] is None
    capacity = bench.budget_capacity(base, roofs)
    text = bench.markdown(list(rows.values()), capacity)
    share = e16["floor_s"] / 600
    assert f"| {e16['floor_s']:,.0f} ({share:.0%}) |" in text
    floor_rows = {line.split(" | ")[0]: line for line in text.splitlines()
                  if line.startswith("| late-")}
    over = h16["budget_floors_s"]["AVX2", "float32"] / bench.BUDGET_S["float32"] - 1
    assert f"**over by {over:.0%}**" in floor_rows["| late-h16"]
    assert floor_rows["| late-h16"].count("**over by") == 2
    assert "**over" not in floor_rows["| late-e16"]
    # the capacity is the model size whose floor is the budget exactly
    macs = capacity["AVX2", "float32"]
    unit = Cost(forward=1, plain_step=3, sam_step=6)
    assert macs * bench.training_flops(unit, base["train"], 0.1) / 200e9 == pytest.approx(
        bench.BUDGET_S["float32"])
    # and at the best share of the roof a run on that class reached: late-h16's, here
    best = max(r["floor_s"] / r["train_seconds_mean"] for r in (e16, h16))
    assert best == h16["floor_s"] / 2_000
    assert (f"AVX2 float32 {macs / 1e6:.1f}M multiply-adds at 100% of the roof, "
            f"{best * macs / 1e6:.1f}M at the best share of it a run reached there "
            f"({best:.0%})") in text


def test_the_floor_section_shows_the_row_with_the_most_seeds() -> None:
    base = load_params(REPO / "params.yaml")
    three = [{**_sized_run("late-e16", [16, 32, 64, 128], 600), "seed": s,
              "test_acc_flip_tta": 0.94} for s in range(3)]
    one = {**_sized_run("late-e16", [16, 32, 64, 128], 300), "cpu_class": "AVX512_BF16",
           "dtype": "bfloat16", "test_acc_flip_tta": 0.95}
    text = bench.markdown(bench.summarize([*three, one], base, {}), {})
    (line,) = [line for line in text.splitlines() if line.startswith("| late-e16 |")]
    assert line.endswith("| 94.00% (AVX2, float32, 3 seeds) |")

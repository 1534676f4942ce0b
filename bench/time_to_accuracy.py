"""Time to accuracy: test accuracy against train-stage seconds for candidate training recipes.

Run from the repository root, after `dvc repro preprocess`:

    python bench/time_to_accuracy.py                        # every recipe, seed 0; default x3
    python bench/time_to_accuracy.py --recipes late-b12 --seeds 0,1,2
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/time_to_accuracy.py \
        --recipes default                                   # this machine as an AVX2-only CPU
    python bench/time_to_accuracy.py --recipes late-h16 --dtype float32  # float32 on a bf16 CPU

Each run is the train stage's own `fit` on the full prepared training split (validation every
epoch, as the stage does) in the dtype params.yaml's `ipex.dtype` picks on this CPU
(`--dtype` overrides it), then the float32 model is scored on the test split, plain and with
flip test-time augmentation; the table's headline is the one evaluate reports
(`evaluate.flip_tta`). Results are keyed by the recipe's
params (a hash), seed, CPU class, dtype and threads, and appended to
`bench/results/time_to_accuracy.json` as each run ends, so an interrupted benchmark resumes
where it stopped and results from other machines accumulate.
The Markdown table and the figure (accuracy against seconds, Pareto frontier, the params.yaml
default marked) are rebuilt from all stored runs.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmnist.accel import BF16_NATIVE_CLASSES, cpu_class, dtype_name, select_backend
from fmnist.allocator import KEPT, OWN, keep_freed_memory
from fmnist.atomic import write_json, write_text
from fmnist.constants import PREPARED_FILE, TRAIN_IMAGES
from fmnist.data import load_prepared
from fmnist.flops import Cost, cost
from fmnist.inference import predict_logits
from fmnist.model import build_model, model_config
from fmnist.params import load_params, schema, validate
from fmnist.preprocess import split_sizes
from fmnist.reproducibility import configure_torch, nan_fill
from fmnist.train import fit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RUNS_FILE = RESULTS / "time_to_accuracy.json"
TARGET_ACCURACY = 0.945
# The budgets for the train stage, by dtype: float32 on a 2-core AVX2-only CPU,
# bfloat16 on 2 cores with native bf16.
BUDGET_S = {"float32": 15 * 60, "bfloat16": 6 * 60}
SMALL = {"channels": [16, 32, 64], "convs_per_block": 2}
MEDIUM = {"channels": [24, 48, 96], "convs_per_block": 2}
WIDE_SHALLOW = {"channels": [32, 64, 128], "convs_per_block": 1}
LARGE = {"channels": [32, 64, 128], "convs_per_block": 2}
SMALL_DEEP = {"channels": [16, 32, 64, 128], "convs_per_block": 2}
SMALL_DEEP_CEIL = {**SMALL_DEEP, "pool_ceil_mode": True}
WIDE_TAIL = {"channels": [16, 32, 96, 192], "convs_per_block": 2}
WIDE_MIDDLE = {"channels": [16, 48, 96, 192], "convs_per_block": 2}
WIDE_HEAD = {"channels": [32, 32, 64, 128], "convs_per_block": 2}
LARGE_DEEP = {"channels": [32, 64, 128, 256], "convs_per_block": 2}
LARGE_TAIL = {"channels": [16, 64, 128, 256], "convs_per_block": 2}
WIDE_14 = {"channels": [16, 64, 64, 128], "convs_per_block": 2}
WIDE_HEAD_LAYER = {**SMALL_DEEP, "hidden": 2048}
CROP_2 = {"augment": {"flip": True, "crop_padding": 2}}
FLIP_ONLY = {"augment": {"flip": True, "crop_padding": 0}}
NO_DROPOUT = {"dropout": 0.0}
HALF_WEIGHT_DECAY = {"weight_decay": 2.5e-4}


@dataclass(frozen=True)
class Recipe:
    """What differs from params.yaml: model keys and train keys."""

    description: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


def _late(epochs: int, sam_start: float = 0.5, ema: float = 0.999) -> dict[str, Any]:
    return {"epochs": epochs, "sam_start": sam_start, "ema_decay": ema, "sam_every": 1}


RECIPES = {
    "full-b8": Recipe("16/32/64 x2, 8 epochs, SAM every step",
                      SMALL, {"epochs": 8, "sam_start": 0.0, "ema_decay": 0.0, "sam_every": 1}),
    "late-b12": Recipe("16/32/64 x2, 12 epochs, SAM in the second half, EMA", SMALL, _late(12)),
    "late-b16": Recipe("16/32/64 x2, 16 epochs, SAM in the last quarter, EMA",
                       SMALL, _late(16, 0.75)),
    "late-e12": Recipe("16/32/64/128 x2 (4 blocks), 12 epochs, SAM in the second half, EMA",
                       SMALL_DEEP, _late(12)),
    "late-e16": Recipe("16/32/64/128 x2 (4 blocks), 16 epochs, SAM in the last quarter, EMA",
                       SMALL_DEEP, _late(16, 0.75)),
    "late-e20": Recipe("16/32/64/128 x2 (4 blocks), 20 epochs, SAM in the last quarter, EMA",
                       SMALL_DEEP, _late(20, 0.75)),
    "late-e24": Recipe("16/32/64/128 x2 (4 blocks), 24 epochs, SAM in the last quarter, EMA",
                       SMALL_DEEP, _late(24, 0.75)),
    "late-f16": Recipe("16/32/64/128 x2 (4 blocks), ceil-mode pooling (7->4->2), 16 epochs, SAM "
                       "in the last quarter, EMA", SMALL_DEEP_CEIL, _late(16, 0.75)),
    "late-g16": Recipe("16/32/96/192 x2 (4 blocks, wider at 7x7 and 3x3), 16 epochs, SAM in the "
                       "last quarter, EMA", WIDE_TAIL, _late(16, 0.75)),
    "late-p16": Recipe("16/32/64/128 x2 (4 blocks), crops padded by 2, 16 epochs, SAM in the last "
                       "quarter, EMA", SMALL_DEEP, {**_late(16, 0.75), **CROP_2}),
    "late-n16": Recipe("16/32/64/128 x2 (4 blocks), flips only (no crops), 16 epochs, SAM in the "
                       "last quarter, EMA", SMALL_DEEP, {**_late(16, 0.75), **FLIP_ONLY}),
    "late-n20": Recipe("16/32/64/128 x2 (4 blocks), flips only (no crops), 20 epochs, SAM in the "
                       "last quarter, EMA", SMALL_DEEP, {**_late(20, 0.75), **FLIP_ONLY}),
    "late-q16": Recipe("16/32/64/128 x2 (4 blocks), batch 64 (twice the steps), 16 epochs, SAM in "
                       "the last quarter, EMA", SMALL_DEEP, {**_late(16, 0.75), "batch_size": 64}),
    "late-r16": Recipe("16/32/64/128 x2 (4 blocks), no dropout, weight decay 2.5e-4, 16 epochs, "
                       "SAM in the last quarter, EMA", {**SMALL_DEEP, **NO_DROPOUT},
                       {**_late(16, 0.75), **HALF_WEIGHT_DECAY}),
    "late-t16": Recipe("16/32/64/128 x2 (4 blocks), flips only, no dropout, weight decay 2.5e-4, "
                       "16 epochs, SAM in the last quarter, EMA", {**SMALL_DEEP, **NO_DROPOUT},
                       {**_late(16, 0.75), **FLIP_ONLY, **HALF_WEIGHT_DECAY}),
    "late-j16": Recipe("16/48/96/192 x2 (4 blocks, wider from 14x14 on), 16 epochs, SAM in the "
                       "last quarter, EMA", WIDE_MIDDLE, _late(16, 0.75)),
    "late-k16": Recipe("16/48/96/192 x2 (4 blocks, wider from 14x14 on), flips only, no dropout, "
                       "weight decay 2.5e-4, 16 epochs, SAM in the last quarter, EMA",
                       {**WIDE_MIDDLE, **NO_DROPOUT},
                       {**_late(16, 0.75), **FLIP_ONLY, **HALF_WEIGHT_DECAY}),
    "late-m16": Recipe("32/32/64/128 x2 (4 blocks, wider at 28x28), 16 epochs, SAM in the last "
                       "quarter, EMA", WIDE_HEAD, _late(16, 0.75)),
    "late-h16": Recipe("32/64/128/256 x2 (4 blocks, twice the default's width), 16 epochs, SAM "
                       "in the last quarter, EMA", LARGE_DEEP, _late(16, 0.75)),
    "late-u16": Recipe("16/64/128/256 x2 (4 blocks, twice the default's width from 14x14 on), 16 "
                       "epochs, SAM in the last quarter, EMA", LARGE_TAIL, _late(16, 0.75)),
    "late-x16": Recipe("16/64/64/128 x2 (4 blocks, twice the default's width at 14x14 only), 16 "
                       "epochs, SAM in the last quarter, EMA", WIDE_14, _late(16, 0.75)),
    "late-y16": Recipe("16/64/64/128 x2 (4 blocks, twice the default's width at 14x14 only), flips "
                       "only, no dropout, weight decay 2.5e-4, 16 epochs, SAM in the last quarter, "
                       "EMA", {**WIDE_14, **NO_DROPOUT},
                       {**_late(16, 0.75), **FLIP_ONLY, **HALF_WEIGHT_DECAY}),
    "late-v16": Recipe("16/32/64/128 x2 (4 blocks), hidden layer 2048 (4x), 16 epochs, SAM in "
                       "the last quarter, EMA", WIDE_HEAD_LAYER, _late(16, 0.75)),
    "late-w16": Recipe("32/64/128/256 x2 (4 blocks, twice the default's width), flips only, no "
                       "dropout, weight decay 2.5e-4, 16 epochs, SAM in the last quarter, EMA",
                       {**LARGE_DEEP, **NO_DROPOUT},
                       {**_late(16, 0.75), **FLIP_ONLY, **HALF_WEIGHT_DECAY}),
    "late-h12": Recipe("32/64/128/256 x2 (4 blocks, twice the default's width), 12 epochs, SAM in "
                       "the last quarter, EMA", LARGE_DEEP, _late(12, 0.75)),
    "late-h8": Recipe("32/64/128/256 x2 (4 blocks, twice the default's width), 8 epochs, SAM in "
                      "the last quarter, EMA", LARGE_DEEP, _late(8, 0.75)),
    "late-d12": Recipe("32/64/128 x1, 12 epochs, SAM in the second half, EMA",
                       WIDE_SHALLOW, _late(12)),
    "late-c10": Recipe("24/48/96 x2, 10 epochs, SAM in the second half, EMA", MEDIUM, _late(10)),
    "late-a8": Recipe("32/64/128 x2, 8 epochs, SAM in the last 40%, EMA", LARGE, _late(8, 0.6)),
    "late-a12": Recipe("32/64/128 x2, 12 epochs, SAM in the last 40%, EMA",
                       LARGE, _late(12, 0.6)),
    "full-a20": Recipe("32/64/128 x2, 20 epochs, SAM every step (the first baseline)",
                       LARGE, {"epochs": 20, "sam_start": 0.0, "ema_decay": 0.0,
                               "sam_every": 1}),
}


def recipe_params(base: dict[str, Any], recipe: Recipe, seed: int) -> dict[str, Any]:
    params = copy.deepcopy(base)
    params["seed"] = seed
    params["model"].update(recipe.model)
    params["train"].update(recipe.train)
    return validate(params, f"recipe {recipe.description!r}")


def is_default(base: dict[str, Any], recipe: Recipe) -> bool:
    """The recipe *is* params.yaml (seed aside): the default the table marks."""
    return all(base["model"][k] == v for k, v in recipe.model.items()) and all(
        base["train"][k] == v for k, v in recipe.train.items()
    )


def with_dtype(base: dict[str, Any], dtype: str | None) -> dict[str, Any]:
    """params.yaml with `--dtype` as its ipex.dtype: e.g. a recipe's float32 accuracy measured on
    a CPU whose `auto` is bf16 (its seconds are still this CPU's, not an AVX2 one's)."""
    if dtype is None:
        return base
    return validate({**base, "ipex": {**base["ipex"], "dtype": dtype}}, f"--dtype {dtype}")


def params_dtype(params: dict[str, Any], cpu: str) -> str:
    """The dtype params.yaml's train stage trains in on CPU class `cpu`."""
    requested = params["ipex"]["dtype"]
    if requested != "auto":
        return requested
    return "bfloat16" if cpu in BF16_NATIVE_CLASSES else "float32"


def budget_seconds(cpu: str, dtype: str) -> int | None:
    """The issue's train-stage budget for runs of this CPU class and dtype; none for pairings it
    sets none for (float32 on a bf16 CPU, emulated bf16 on an AVX2 one)."""
    if dtype == "bfloat16" and cpu in BF16_NATIVE_CLASSES:
        return BUDGET_S["bfloat16"]
    if dtype == "float32" and cpu == "AVX2":
        return BUDGET_S["float32"]
    return None


def stored_runs(path: Path) -> list[dict[str, Any]]:
    """The runs a results file holds (this script's or a probe's); none before the first."""
    return json.loads(path.read_text())["runs"] if path.exists() else []


def recipe_hash(params: dict[str, Any]) -> str:
    """What the run trained with, seed aside: a changed recipe is a new result."""
    # model_config leaves out optional keys at their absent value (pool_ceil_mode: false), so
    # a recipe hashes as it did before such a key existed
    relevant = {"model": model_config(params["model"]), "train": params["train"]}
    text = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# Environment variables that make a CPU pose as a lesser one (the Xeon run as an AVX2-only CPU):
# such a run estimates the other class; it is not a measurement on it.
ISA_LIMITS = ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def isa_limit() -> str:
    """'' on a CPU running as itself, else the limiting variables as `NAME=value ...`."""
    return " ".join(f"{name}={os.environ[name]}" for name in ISA_LIMITS if os.environ.get(name))


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo), for telling machines of one class apart."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or "unknown"


# How glibc's malloc ran (fmnist.allocator): runs older than the field page-faulted their
# activations in every step, so their seconds are not comparable with newer ones.
ALLOCATOR_KEPT, ALLOCATOR_DEFAULT = KEPT, OWN


def allocator(run: dict[str, Any]) -> str:
    return run.get("allocator", ALLOCATOR_DEFAULT)


def run_key(run: dict[str, Any]) -> str:
    """Runs older than the isa_limit field were all on CPUs running as themselves but one,
    which the JSON marks by hand."""
    fields = [str(run[k]) for k in ("recipe", "recipe_hash", "seed", "cpu_class", "dtype",
                                    "threads")]
    kept = [] if allocator(run) == ALLOCATOR_DEFAULT else [allocator(run)]
    return "|".join([*fields, run.get("isa_limit", ""), *kept])


def planned_run(recipe: str, params: dict[str, Any], dtype: str, threads: int) -> dict[str, Any]:
    """The fields `run_key` reads, for a run about to start here (to skip one already stored)."""
    return {"recipe": recipe, "recipe_hash": recipe_hash(params), "seed": params["seed"],
            "cpu_class": cpu_class(), "dtype": dtype, "threads": threads,
            "isa_limit": isa_limit(),
            "allocator": ALLOCATOR_KEPT if keep_freed_memory() else ALLOCATOR_DEFAULT}


def ran_with_nan_fill(run: dict[str, Any]) -> bool:
    """Runs older than the `nan_fill` field ran with deterministic mode's NaN fill on."""
    return run.get("nan_fill", True)


def seconds_by_fill(members: list[dict[str, Any]]) -> dict[str, float] | None:
    """Mean train seconds of a row's runs with the NaN fill on and off, when it pools both
    (the fill costs time, not accuracy: one row, both costs shown); None otherwise."""
    split = {state: [m["train_seconds"] for m in members if ran_with_nan_fill(m) == fill]
             for state, fill in (("on", True), ("off", False))}
    if not all(split.values()):
        return None
    return {state: statistics.fmean(seconds) for state, seconds in split.items()}


def class_label(run: dict[str, Any]) -> str:
    """The CPU class a table row names; an ISA-limited run says it was one, and a run with
    glibc's page-faulting default malloc says so too."""
    label = f"{run['cpu_class']} (emulated)" if run.get("isa_limit") else run["cpu_class"]
    return label if allocator(run) == ALLOCATOR_KEPT else f"{label}, default malloc"


# --- the compute floor ----------------------------------------------------------------------------
# How fast a recipe could train at best: its matmul work (fmnist.flops: direct convolutions and
# linear layers) at 100% of the matmul rate bench/throughput.py measured on the class (a
# 2048x2048 matmul through torch, at the same threads). A recipe whose floor is over a budget
# cannot fit it on that class with these kernels' best matmul rate and direct convolutions
# (Winograd-style convolutions, which multiply less, are not counted); one under it may or may
# not fit.

# The classes the issue sets budgets for, in the dtype each is held to, on its 2 cores.
BUDGET_CLASSES = (("AVX2", "float32"), ("AVX512_BF16", "bfloat16"))
BUDGET_THREADS = 2


def sam_images(train: dict[str, Any], train_images: int) -> int:
    """Training images that go through a SAM step: the steps from `sam_start` on, every
    `sam_every`-th, counted as fit counts them (a short last batch in each epoch); none but
    with SAM as the optimizer."""
    if train.get("optimizer", "sam") != "sam":
        return 0
    batch = train["batch_size"]
    per_epoch = -(-train_images // batch)
    last_batch = train_images - (per_epoch - 1) * batch
    steps = train["epochs"] * per_epoch
    sam_from = round(train["sam_start"] * train["epochs"] * per_epoch)  # fit's formula
    return sum(last_batch if step % per_epoch == per_epoch - 1 else batch
               for step in range(sam_from, steps, train["sam_every"]))


def training_flops(model_cost: Cost, train: dict[str, Any], val_fraction: float) -> float:
    """Matmul FLOPs of one full training run: each training image's plain step per epoch, a
    SAM step instead where SAM runs, and the per-epoch validation's forward. BatchNorm,
    pooling and the optimizer are left out: a floor."""
    # every stored run trained on the full training split
    train_images, val_images = split_sizes(TRAIN_IMAGES, val_fraction)
    sam = sam_images(train, train_images)
    plain = train["epochs"] * train_images - sam
    validation = train["epochs"] * val_images
    macs = (plain * model_cost.plain_step + sam * model_cost.sam_step
            + validation * model_cost.forward)
    return 2.0 * macs


def measured_roofs(results: Path) -> dict[tuple[str, str, int], float]:
    """(CPU class, dtype, threads) -> matmul GFLOP/s from bench/throughput.py's result files;
    the higher one where there are several (a floor must not overstate the cost)."""
    roofs: dict[tuple[str, str, int], float] = {}
    for path in sorted(results.glob("throughput*.json")):
        result = json.loads(path.read_text())
        if "roofline" not in result or "machine" not in result:
            continue  # a file of repeats, not one measurement
        for dtype, key in (("float32", "gflops_fp32"), ("bfloat16", "gflops_bf16")):
            gflops = result["roofline"].get(key)
            if gflops:
                where = (result["machine"]["cpu_class"], dtype, result["threads"])
                roofs[where] = max(gflops, roofs.get(where, 0.0))
    return roofs


def floor_seconds(flops: float, roofs: dict[tuple[str, str, int], float], cpu: str | None,
                  dtype: str, threads: int) -> float | None:
    """Seconds at 100% of the class's measured roof; None where none was measured."""
    gflops = roofs.get((cpu, dtype, threads)) if cpu else None
    return flops / (gflops * 1e9) if gflops else None


def run_one(data: Any, params: dict[str, Any], recipe: str) -> dict[str, Any]:
    """One train-stage-equivalent run and its float32 test accuracy."""
    start = time.perf_counter()
    result = fit(data, params, progress=True)
    seconds = time.perf_counter() - start
    logits = predict_logits(result.model, data.test.images, batch_size=1000)
    test_acc = float(np.mean(logits.argmax(axis=1) == data.test.labels))
    # with evaluate.flip_tta: the model as evaluate and export ship it
    result.model.flip_tta = True
    tta_logits = predict_logits(result.model, data.test.images, batch_size=1000)
    tta_acc = float(np.mean(tta_logits.argmax(axis=1) == data.test.labels))
    backend = result.backend
    return {
        "recipe": recipe,
        "recipe_hash": recipe_hash(params),
        "seed": params["seed"],
        "cpu_class": cpu_class(),
        "isa_limit": isa_limit(),
        "allocator": ALLOCATOR_KEPT if keep_freed_memory() else ALLOCATOR_DEFAULT,
        # deterministic mode's NaN fill as fit left it (configure_torch: off on a CPU since
        # 2026-12-05; runs without the field ran with it on; the four AMX runs that ran with it
        # off before the field existed, late-e16's and late-x16's seeds 3-4, were given it)
        "nan_fill": nan_fill(),
        "cpu_model": cpu_model(),
        "dtype": dtype_name(backend.dtype),
        "threads": torch.get_num_threads(),
        "torch_version": str(torch.__version__),
        "train_seconds": seconds,
        "epoch_seconds": result.timing["epoch_seconds"],
        "images_per_s_median": result.timing["images_per_s_median"],
        "val_acc": result.metrics["val_acc"],
        "train_acc": result.metrics.get("train_acc"),  # the last epoch's, for telling overfitting
        "test_acc": test_acc,
        "test_acc_flip_tta": tta_acc,
        "model": model_config(params["model"]),
        "train": {k: params["train"][k] for k in
                  ("optimizer", "epochs", "sam_start", "sam_every", "ema_decay", "rho", "lr",
                   "batch_size", "weight_decay", "label_smoothing", "augment")},
    }


# --- summarizing ---------------------------------------------------------------------------------


def shipped_accuracy(run: dict[str, Any], flip_tta: bool) -> float:
    """What evaluate would report for the run's model (older runs lack the TTA number)."""
    if flip_tta and run.get("test_acc_flip_tta") is not None:
        return run["test_acc_flip_tta"]
    return run["test_acc"]


def summarize(runs: list[dict[str, Any]], base: dict[str, Any],
              roofs: dict[tuple[str, str, int], float] | None = None) -> list[dict[str, Any]]:
    """One row per (CPU class, dtype, recipe): seeds, mean/std/min accuracy, mean seconds, the
    budget, and whether it is on that class's Pareto frontier (no other row both faster and more
    accurate). `base` is params.yaml (without --dtype): its evaluate.flip_tta decides the accuracy
    shown, its recipe and dtype the default's mark. With `roofs` (measured_roofs), each row's
    compute floor on its own class and on the two budget classes."""
    flip_tta = base["evaluate"]["flip_tta"]
    roofs = roofs or {}
    val_fraction = base["preprocess"]["val_fraction"]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((class_label(run), run["dtype"], run["recipe"]), []).append(run)
    rows = []
    for (cpu, dtype, name), members in sorted(groups.items()):
        accs = [shipped_accuracy(m, flip_tta) for m in members]
        recipe = RECIPES.get(name)
        cpu_class_of_runs = members[0]["cpu_class"]
        latest = members[-1]  # what the recipe trains now, for its FLOPs
        model_cost = (cost(build_model(latest["model"]))
                      if "model" in latest and "train" in latest else None)
        flops = training_flops(model_cost, latest["train"], val_fraction) if model_cost else None
        # a CPU posing as a lesser class has no measured roof of that class
        own_class = None if latest.get("isa_limit") else cpu_class_of_runs
        rows.append({
            "cpu_class": cpu, "dtype": dtype, "recipe": name,
            "train_tflops": flops / 1e12 if flops else None,
            "multiply_adds": model_cost.forward if model_cost else None,
            "floor_s": (floor_seconds(flops, roofs, own_class, dtype, latest["threads"])
                        if flops else None),
            "budget_floors_s": {(c, d): floor_seconds(flops, roofs, c, d, BUDGET_THREADS)
                                if flops else None for c, d in BUDGET_CLASSES},
            "description": recipe.description if recipe else name,
            "seeds": sorted(m["seed"] for m in members),
            "test_acc_mean": statistics.fmean(accs),
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "test_acc_min": min(accs),
            "plain_acc_mean": statistics.fmean(m["test_acc"] for m in members),
            "val_acc_mean": statistics.fmean(m["val_acc"] for m in members),
            "train_seconds_mean": statistics.fmean(m["train_seconds"] for m in members),
            "train_seconds_by_fill": seconds_by_fill(members),
            "images_per_s": statistics.fmean(m["images_per_s_median"] for m in members),
            # params.yaml's recipe in the dtype params.yaml trains in on that class
            "default": bool(recipe and is_default(base, recipe))
            and dtype == params_dtype(base, cpu_class_of_runs),
            "budget_s": budget_seconds(cpu_class_of_runs, dtype),
        })
    for row in rows:
        where = (row["cpu_class"], row["dtype"])
        peers = [r for r in rows if (r["cpu_class"], r["dtype"]) == where]
        row["frontier"] = not any(
            p["train_seconds_mean"] <= row["train_seconds_mean"]
            and p["test_acc_mean"] >= row["test_acc_mean"]
            and p is not row
            and (p["train_seconds_mean"], p["test_acc_mean"])
            != (row["train_seconds_mean"], row["test_acc_mean"])
            for p in peers
        )
    return rows


def budget_capacity(base: dict[str, Any], roofs: dict[tuple[str, str, int], float]
                    ) -> dict[tuple[str, str], float]:
    """(CPU class, dtype) -> the most multiply-adds per image a model may have for params.yaml's
    schedule (epochs, batch, SAM phase) to train within the class's budget at 100% of its roof
    (the first layer's saved input gradient, under 0.5% of a step here, left out)."""
    unit = Cost(forward=1, plain_step=3, sam_step=6)
    per_forward_flop = training_flops(unit, base["train"], base["preprocess"]["val_fraction"])
    return {(cpu, dtype): BUDGET_S[dtype] * roofs[cpu, dtype, BUDGET_THREADS] * 1e9
            / per_forward_flop for cpu, dtype in BUDGET_CLASSES
            if (cpu, dtype, BUDGET_THREADS) in roofs}


def most_seeds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the most seeds (the better mean among rows with as many)."""
    return max(rows, key=lambda r: (len(r["seeds"]), r["test_acc_mean"]))


def floor_section(rows: list[dict[str, Any]],
                  capacity: dict[tuple[str, str], float]) -> list[str]:
    """Each recipe's floor on the two budget classes: which recipes cannot fit them at the
    measured matmul rate."""
    by_recipe: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["train_tflops"] is not None:
            by_recipe.setdefault(r["recipe"], []).append(r)
    heads = [f"{cpu} {dtype} floor s (budget {BUDGET_S[dtype]:,} s)"
             for cpu, dtype in BUDGET_CLASSES]
    lines = [
        "",
        "## The compute floor against the budgets",
        "",
        "Each recipe's matmul FLOPs (`fmnist.flops`: direct convolutions and linear layers, 3 "
        "passes per training image and step but the first layer's input gradient, twice that "
        "on SAM steps, the per-epoch validation's forward; BatchNorm, pooling and the "
        "optimizer left out) at 100% of the matmul rate `bench/throughput.py` measured on each "
        f"budget class at {BUDGET_THREADS} threads (a 2048x2048 matmul through torch; `floor s` "
        "in the table above: the same on the row's own class, with the share of it the run "
        "reached). A recipe over a budget here cannot fit it on that class at that rate with "
        "direct convolutions; one under it may or may not. The roofs and the runs come from "
        "different sessions of each class, whose VMs differ by 10-30%: read a margin smaller "
        "than that as undecided. Accuracy: the recipe's row with the most seeds on any class "
        "(the better mean among rows with as many).",
        "",
        f"| recipe | M multiply-adds | training TFLOP | {' | '.join(heads)} | test acc |",
        "|---|---:|---:|" + "---:|" * len(heads) + "---|",
    ]
    for name, members in sorted(by_recipe.items(), key=lambda item: item[1][0]["train_tflops"]):
        r, best = members[0], most_seeds(members)
        floors = []
        for cpu, dtype in BUDGET_CLASSES:
            seconds = r["budget_floors_s"][cpu, dtype]
            over = seconds is not None and seconds > BUDGET_S[dtype]
            floors.append("-" if seconds is None else f"{seconds:,.0f}" + (
                f" **over by {seconds / BUDGET_S[dtype] - 1:.0%}**" if over else ""))
        lines.append(
            f"| {name} | {r['multiply_adds'] / 1e6:.1f} | {r['train_tflops']:,.1f} | "
            f"{' | '.join(floors)} | {best['test_acc_mean']:.2%} ({best['cpu_class']}, "
            f"{best['dtype']}, {plural(len(best['seeds']), 'seed')}) |"
        )
    if capacity:
        lines += ["", "On params.yaml's schedule (a shorter one allows a larger model), the most "
                  "a model may cost per image to fit a budget: " + "; ".join(
                      capacity_phrase(where, macs, rows) for where, macs in capacity.items())
                  + "."]
    return lines


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def capacity_phrase(where: tuple[str, str], macs: float, rows: list[dict[str, Any]]) -> str:
    """The class's capacity at the roof and at the best share of it any of its runs reached."""
    shares = [r["floor_s"] / r["train_seconds_mean"] for r in rows
              if (r["cpu_class"], r["dtype"]) == where and r["floor_s"] is not None]
    phrase = f"{where[0]} {where[1]} {macs / 1e6:.1f}M multiply-adds at 100% of the roof"
    if shares:
        phrase += (f", {max(shares) * macs / 1e6:.1f}M at the best share of it a run reached "
                   f"there ({max(shares):.0%})")
    return phrase


def markdown(rows: list[dict[str, Any]],
             capacity: dict[tuple[str, str], float] | None = None) -> str:
    lines = [
        "# Time to accuracy",
        "",
        "Generated by `python bench/time_to_accuracy.py` from `time_to_accuracy.json`. Seconds: "
        "the train stage's `fit` (training plus per-epoch validation), 2 threads unless noted; "
        "accuracy: the float32 model on the 10,000 test images, with flip test-time "
        "augmentation where evaluate.flip_tta is on (`plain`: without it; runs older than "
        "the TTA measurement count their plain number). `*` marks the params.yaml "
        "default (in the dtype it trains in on that class), `F` the Pareto frontier of its CPU "
        "class and dtype (by mean seconds). A row that pools runs with deterministic mode's "
        "NaN fill of new tensors on (runs before 2026-12-05) and off shows each one's mean "
        "seconds after the pooled one. Budgets: "
        f"{BUDGET_S['float32'] // 60} min float32 on an AVX2-only CPU, "
        f"{BUDGET_S['bfloat16'] // 60} min with native bf16; target {TARGET_ACCURACY:.1%}.",
        "",
        "| CPU class | dtype | recipe | seeds | test acc mean ± std (min) | plain | val acc "
        "| train s | images/s | floor s (share) | |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        marks = ("*" if r["default"] else "") + ("F" if r["frontier"] else "")
        seconds = f"{r['train_seconds_mean']:,.0f}"
        if r.get("train_seconds_by_fill"):
            seconds += " (fill on {on:,.0f}, off {off:,.0f})".format(**r["train_seconds_by_fill"])
        floor = ("-" if r["floor_s"] is None else
                 f"{r['floor_s']:,.0f} ({r['floor_s'] / r['train_seconds_mean']:.0%})")
        lines.append(
            f"| {r['cpu_class']} | {r['dtype']} | {r['recipe']}: {r['description']} "
            f"| {len(r['seeds'])} | {r['test_acc_mean']:.2%} ± {r['test_acc_std']:.2%} "
            f"({r['test_acc_min']:.2%}) | {r['plain_acc_mean']:.2%} | {r['val_acc_mean']:.2%} "
            f"| {seconds} | {r['images_per_s']:,.0f} | {floor} | {marks} |"
        )
    if any(r["train_tflops"] is not None for r in rows):
        lines += floor_section(rows, capacity or {})
    return "\n".join(lines) + "\n"


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted({(r["cpu_class"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(1, len(classes), figsize=(6 * len(classes), 4.5), squeeze=False)
    for ax, (cpu, dtype) in zip(axes[0], classes, strict=True):
        mine = [r for r in rows if (r["cpu_class"], r["dtype"]) == (cpu, dtype)]
        for r in mine:
            ax.errorbar(r["train_seconds_mean"], 100 * r["test_acc_mean"],
                        yerr=100 * r["test_acc_std"], fmt="*" if r["default"] else "o",
                        markersize=14 if r["default"] else 6,
                        color="tab:red" if r["default"] else "tab:blue", capsize=3)
            ax.annotate(r["recipe"], (r["train_seconds_mean"], 100 * r["test_acc_mean"]),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)
            if r["floor_s"] is not None:  # where the run would sit at 100% of the roof
                ax.plot([r["floor_s"], r["train_seconds_mean"]], [100 * r["test_acc_mean"]] * 2,
                        ":", color="grey", lw=0.8)
                ax.plot(r["floor_s"], 100 * r["test_acc_mean"], "o", mfc="none", color="grey",
                        markersize=5)
        front = sorted((r for r in mine if r["frontier"]), key=lambda r: r["train_seconds_mean"])
        ax.plot([r["train_seconds_mean"] for r in front],
                [100 * r["test_acc_mean"] for r in front], "--", color="grey", label="frontier")
        ax.axhline(100 * TARGET_ACCURACY, color="tab:green", lw=1, label="target")
        if mine[0]["budget_s"] is not None:
            ax.axvline(mine[0]["budget_s"], color="tab:orange", lw=1, label="budget")
        ax.set(xlabel="train stage seconds", ylabel="test accuracy (%)",
               title=f"{cpu}, {dtype}, 2 threads (* = default)")
        if any(r["floor_s"] is not None for r in mine):
            ax.plot([], [], "o", mfc="none", color="grey", markersize=5,
                    label="at 100% of the roof")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the command ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"comma-separated, from: {', '.join(RECIPES)}, or 'default' "
                        "(the recipe params.yaml holds)")
    parser.add_argument("--seeds", default="0", help="seeds for every recipe (comma-separated)")
    parser.add_argument("--default-seeds", type=int, default=3,
                        help="the params.yaml default runs seeds 0..N-1")
    parser.add_argument("--threads", type=int, default=2)
    dtypes = schema()["properties"]["ipex"]["properties"]["dtype"]["enum"]  # ipex.dtype's values
    parser.add_argument("--dtype", choices=dtypes,
                        help="train in this dtype instead of params.yaml's ipex.dtype")
    parser.add_argument("--data", default=str(ROOT / PREPARED_FILE))
    parser.add_argument("--json", default=str(RUNS_FILE))
    parser.add_argument("--markdown", default=str(RESULTS / "time_to_accuracy.md"))
    parser.add_argument("--figure", default=str(RESULTS / "time_to_accuracy.png"),
                        help="generated, not committed")
    parser.add_argument("--report-only", action="store_true", help="rebuild table and figure")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params_yaml = load_params(ROOT / "params.yaml")
    base = with_dtype(params_yaml, args.dtype)
    store = Path(args.json)
    runs = stored_runs(store)
    if not args.report_only:
        names = [n.strip() for n in args.recipes.split(",") if n.strip()]
        defaults = [n for n, r in RECIPES.items() if is_default(base, r)]
        names = [d for n in names for d in (defaults if n == "default" else [n])]
        unknown = [n for n in names if n not in RECIPES]
        if unknown:
            print(f"time_to_accuracy: unknown recipe {unknown[0]!r}", file=sys.stderr)
            return 2
        seeds = [int(s) for s in args.seeds.split(",")]
        configure_torch(args.threads)
        dtype = dtype_name(select_backend(base["ipex"], base["train"]["device"]).dtype)
        data = load_prepared(args.data)
        done = {run_key(r) for r in runs if "recipe_hash" in r}
        for name in names:
            wanted = sorted(set(seeds) | (set(range(args.default_seeds))
                                          if is_default(base, RECIPES[name]) else set()))
            for seed in wanted:
                params = recipe_params(base, RECIPES[name], seed)
                if run_key(planned_run(name, params, dtype, args.threads)) in done:
                    continue
                print(f"time_to_accuracy: {name} seed {seed} ({cpu_class()}, {dtype})",
                      file=sys.stderr, flush=True)
                runs.append(run_one(data, params, name))
                write_json(store, {"runs": runs})
                print(f"time_to_accuracy: {name} seed {seed}: test "
                      f"{runs[-1]['test_acc']:.4f} in {runs[-1]['train_seconds']:.0f} s",
                      file=sys.stderr, flush=True)
    roofs = measured_roofs(RESULTS)
    rows = summarize(runs, params_yaml, roofs)
    report = markdown(rows, budget_capacity(params_yaml, roofs))
    write_text(args.markdown, report)
    if rows:
        figure(rows, Path(args.figure))
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training-lever probe: do cutout, weight decay off BatchNorm and biases, alternating flips or
another train.* value lift a time_to_accuracy recipe at the same cost? A measurement for
issue 14, not a pipeline feature.

Run from the repository root, after `dvc repro preprocess`:

    python bench/lever_probe.py --levers cutout,no-decay,alt-flips --seeds 0
    python bench/lever_probe.py --levers train.rho=0.1,train.lr=0.2 --recipe late-k16

Levers (each alone, on top of `--recipe`, late-k16 by default: the best recipe near the
budgets, 16/48/96/192 with flips only, no dropout, weight decay 2.5e-4):
- `cutout`: a 10x10 square of each training image set to the background (raw 0), centred on
  a random pixel (so partly outside the image near the edges), on half the images, after the
  recipe's flips and crops (DeVries & Taylor 2017; random erasing, Zhong et al. 2020, reports
  gains on Fashion-MNIST);
- `no-decay`: no weight decay on BatchNorm's weights and biases or on layer biases (ndim <= 1),
  the recipe's on every conv and linear weight ("bag of tricks", He et al. 2019);
- `alt-flips`: the first epoch flips at random; from the second on, an image is flipped when
  its own bit XOR the epoch's parity is 1, so it alternates from then on (between the first and
  second epoch it keeps or changes at random; the CIFAR-10 speedruns alternate from the first).
  An image's own bit is the parity of its pixel sum, which flips do not change, so it needs a
  recipe that flips and does not crop;
- `train.KEY=VALUE`: params.yaml's train.KEY set to VALUE (YAML), validated like params.yaml
  (not the run settings threads, device, compile and distributed; `--levers` splits on commas,
  so a VALUE cannot hold one).
Each run is `time_to_accuracy.run_one` (the train stage's own `fit`) with `fmnist.train`'s
`augment_batch` or `build_optimizer` swapped while it runs, so the library stays unchanged
until a lever earns a param.

Runs go to bench/results/lever_probe.json as each ends (keyed like time_to_accuracy's, plus
the lever's spec: its name and settings, or the override's key and value), so the probe
resumes, and a lever whose settings change is a new lever. The table (lever_probe.md) pairs
each seed with time_to_accuracy.json's run of the same recipe, CPU class, dtype, threads and
seed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import time_to_accuracy as tta  # noqa: E402  (bench scripts share one definition)

import fmnist.train as train_module  # noqa: E402
from fmnist.accel import Backend, cpu_class, dtype_name, prepare_training, select_backend  # noqa: E402
from fmnist.atomic import write_json, write_text  # noqa: E402
from fmnist.data import augment_batch, load_prepared  # noqa: E402
from fmnist.errors import ParamsError  # noqa: E402
from fmnist.params import load_params, validate  # noqa: E402
from fmnist.reproducibility import configure_torch  # noqa: E402
from fmnist.sam import SAM  # noqa: E402

DEFAULT_RECIPE = "late-k16"
CUTOUT_SIZE = 10
CUTOUT_PROBABILITY = 0.5
LEVERS = {
    "cutout": f"cutout {CUTOUT_SIZE}x{CUTOUT_SIZE} on {CUTOUT_PROBABILITY:.0%} of the images",
    "no-decay": "no weight decay on BatchNorm and biases",
    "alt-flips": "alternating flips after the first epoch",
}
# What a named lever's runs are keyed and grouped by: bump it when the lever's code changes.
LEVER_SPECS = {
    "cutout": f"cutout:{CUTOUT_SIZE}x{CUTOUT_SIZE}:p{CUTOUT_PROBABILITY}",
    "no-decay": "no-decay:ndim<=1",
    "alt-flips": "alt-flips:pixel-sum-parity-xor-epoch,random-first-epoch",
}
OVERRIDE_PREFIX = "train."
RUN_SETTINGS = ("threads", "device", "compile", "distributed")  # not a recipe's to change


def cutout(x: torch.Tensor, generator: torch.Generator, size: int = CUTOUT_SIZE,
           probability: float = CUTOUT_PROBABILITY) -> torch.Tensor:
    """Zero (background) a size x size square around a random pixel of some images."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=generator)
    cx = torch.randint(0, w, (b,), generator=generator)
    chosen = torch.rand(b, generator=generator) < probability
    top, left = (cy - size // 2)[:, None], (cx - size // 2)[:, None]
    rows, cols = torch.arange(h)[None, :], torch.arange(w)[None, :]
    in_rows = (rows >= top) & (rows < top + size)
    in_cols = (cols >= left) & (cols < left + size)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & chosen[:, None, None]
    return x.masked_fill(mask[:, None], 0.0).contiguous()


def alternating_flip_augment(steps_per_epoch: int) -> Any:
    """An augment_batch whose flips alternate per image after a random first epoch. Epochs are
    counted by calls, so the run must not resume from a checkpoint (the probe's never do)."""
    calls = 0

    def augment(x: torch.Tensor, *, flip: bool, crop_padding: int,
                generator: torch.Generator) -> torch.Tensor:
        nonlocal calls
        epoch, calls = calls // steps_per_epoch, calls + 1
        if epoch == 0 or not flip:
            return augment_batch(x, flip=flip, crop_padding=crop_padding, generator=generator)
        own_bit = (x.sum(dim=(1, 2, 3)).long() % 2).bool()  # raw pixels: integers
        flipped = own_bit ^ bool(epoch % 2)
        return torch.where(flipped[:, None, None, None], x.flip(3), x).contiguous()

    return augment


def build_optimizer_without_norm_decay(
    model: nn.Module, train: dict[str, Any], backend: Backend
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """fmnist.train.build_optimizer with two groups: ndim > 1 decays, ndim <= 1 does not."""
    decayed = [p for p in model.parameters() if p.ndim > 1]
    exempt = [p for p in model.parameters() if p.ndim <= 1]
    base = torch.optim.SGD([{"params": decayed}, {"params": exempt, "weight_decay": 0.0}],
                           lr=train["lr"], momentum=train["momentum"],
                           nesterov=train["nesterov"], weight_decay=train["weight_decay"])
    model, base = prepare_training(model, base, backend)
    if train["optimizer"] == "sgd":
        return model, base
    return model, SAM(model.parameters(), base, rho=train["rho"], adaptive=train["adaptive"],
                      eta=train["asam_eta"])


def parse_override(lever: str) -> tuple[str, Any] | None:
    """(key, value) of `train.KEY=VALUE`; None for a named lever."""
    if not lever.startswith(OVERRIDE_PREFIX):
        return None
    key, sep, value = lever[len(OVERRIDE_PREFIX):].partition("=")
    if not sep or not key:
        raise SystemExit(f"lever_probe: lever {lever!r}: expected train.KEY=VALUE")
    return key, yaml.safe_load(value)


def lever_spec(lever: str) -> str:
    """One spelling per lever and setting: `train.rho=.1` is `train.rho=0.1`."""
    override = parse_override(lever)
    if override is None:
        return LEVER_SPECS[lever]
    key, value = override
    return f"{OVERRIDE_PREFIX}{key}={json.dumps(value, sort_keys=True)}"


def check_levers(levers: list[str]) -> None:
    for lever in levers:
        if lever not in LEVERS and parse_override(lever) is None:
            raise SystemExit(f"lever_probe: unknown lever {lever!r}; known: "
                             f"{', '.join(LEVERS)}, or train.KEY=VALUE")


def lever_params(base: dict[str, Any], recipe: str, seed: int, lever: str) -> dict[str, Any]:
    params = tta.recipe_params(base, tta.RECIPES[recipe], seed)
    override = parse_override(lever)
    if override is not None:
        key, value = override
        if key not in params["train"] or key in RUN_SETTINGS:
            reason = "a run setting" if key in RUN_SETTINGS else "not in params.yaml"
            raise SystemExit(f"lever_probe: lever {lever!r}: train.{key} is {reason}")
        params = copy.deepcopy(params)
        params["train"][key] = value
        try:
            params = validate(params, f"lever_probe: lever {lever!r}")
        except ParamsError as error:
            raise SystemExit(str(error)) from None
    elif lever == "alt-flips" and (params["train"]["augment"]["crop_padding"]
                                   or not params["train"]["augment"]["flip"]):
        raise SystemExit(f"lever_probe: alt-flips needs a recipe that flips and does not crop "
                         f"({recipe}: {params['train']['augment']}; a crop would change the "
                         "pixel sum that keys an image)")
    return params


@contextlib.contextmanager
def applying(lever: str, params: dict[str, Any], train_images: int) -> Iterator[None]:
    """fmnist.train's `fit` trains with `lever` while this is open."""
    originals = (train_module.augment_batch, train_module.build_optimizer)
    if lever == "cutout":
        def with_cutout(x: torch.Tensor, *, flip: bool, crop_padding: int,
                        generator: torch.Generator) -> torch.Tensor:
            x = augment_batch(x, flip=flip, crop_padding=crop_padding, generator=generator)
            return cutout(x, generator)
        train_module.augment_batch = with_cutout
    elif lever == "alt-flips":
        steps = math.ceil(train_images / params["train"]["batch_size"])
        train_module.augment_batch = alternating_flip_augment(steps)
    elif lever == "no-decay":
        train_module.build_optimizer = build_optimizer_without_norm_decay
    try:
        yield
    finally:
        train_module.augment_batch, train_module.build_optimizer = originals


def lever_key(run: dict[str, Any]) -> str:
    return f"{tta.run_key(run)}|{run['lever_spec']}"


def base_hash(run: dict[str, Any]) -> str:
    """The recipe's hash without the lever (time_to_accuracy's runs have no lever)."""
    return run.get("base_recipe_hash", run["recipe_hash"])


def pairing_key(run: dict[str, Any]) -> tuple[str, str, str, str, int, int]:
    """The recipe itself, on one class, dtype, threads and seed."""
    return (tta.class_label(run), run["dtype"], run["recipe"], base_hash(run), run["threads"],
            run["seed"])


def describe(run: dict[str, Any]) -> str:
    """LEVERS' words for a run of the lever's current settings, else the stored spec."""
    if LEVER_SPECS.get(run["lever"]) == run["lever_spec"]:
        return LEVERS[run["lever"]]
    return run["lever_spec"]


def summary(runs: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> str:
    """Lever rows, each paired by seed with time_to_accuracy's run of its recipe."""
    recipe_acc = {pairing_key(r): r for r in baseline if r.get("test_acc_flip_tta") is not None}
    groups: dict[tuple[str, str, str, str, str], list[dict[str, Any]]] = {}
    versions: dict[str, set[str]] = {}
    for run in runs:
        key = (tta.class_label(run), run["dtype"], run["recipe"], base_hash(run),
               run["lever_spec"])
        groups.setdefault(key, []).append(run)
        versions.setdefault(run["recipe"], set()).add(base_hash(run))
    lines = [
        "# Training-lever probe",
        "",
        "Generated by `python bench/lever_probe.py` from `lever_probe.json`. Every run trains a "
        "time_to_accuracy recipe with one lever; seconds: the train stage's `fit`; accuracy: "
        "the float32 model on the 10,000 test images with flip TTA (`plain`: without it); "
        "paired: the lever minus time_to_accuracy.json's run of the same recipe, CPU class, "
        "dtype, threads and seed (flip TTA; plain in brackets). One seed is no evidence of a "
        "gain: compare with the recipe's spread over seeds in time_to_accuracy.md. A recipe "
        "run at more than one version (params.yaml or the recipe changed) names its hash.",
        "",
        "| CPU class | dtype | recipe | lever | seeds | test acc mean (min) | plain | "
        "paired with the recipe | train s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for (label, dtype, recipe, version, _), group in sorted(groups.items()):
        named = recipe if len(versions[recipe]) == 1 else f"{recipe} ({version})"
        accs = [r["test_acc_flip_tta"] for r in group]
        plain = statistics.fmean(r["test_acc"] for r in group)
        pairs = [(r, recipe_acc[pairing_key(r)]) for r in group if pairing_key(r) in recipe_acc]
        if pairs:
            tta_gain = statistics.fmean(r["test_acc_flip_tta"] - b["test_acc_flip_tta"]
                                        for r, b in pairs)
            plain_gain = statistics.fmean(r["test_acc"] - b["test_acc"] for r, b in pairs)
            paired = (f"{tta_gain * 100:+.2f} ({plain_gain * 100:+.2f}), "
                      f"{len(pairs)} seed{'s' * (len(pairs) > 1)}")
        else:
            paired = "-"
        seconds = [r["train_seconds"] for r in group]
        low, high = f"{min(seconds):.0f}", f"{max(seconds):.0f}"
        lines.append(
            f"| {label} | {dtype} | {named} | {describe(group[0])} | {len(group)} | "
            f"{statistics.fmean(accs):.2%} ({min(accs):.2%}) | {plain:.2%} | {paired} | "
            f"{low if low == high else f'{low}-{high}'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", default=",".join(LEVERS),
                        help=f"comma-separated, from: {', '.join(LEVERS)}, or train.KEY=VALUE")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(tta.RECIPES))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=str(ROOT / tta.PREPARED_FILE))
    parser.add_argument("--json", default=str(tta.RESULTS / "lever_probe.json"))
    parser.add_argument("--markdown", default=str(tta.RESULTS / "lever_probe.md"))
    args = parser.parse_args(argv)
    levers = [lever.strip() for lever in args.levers.split(",") if lever.strip()]
    check_levers(levers)
    by_spec: dict[str, str] = {}
    for lever in levers:  # one run per setting: train.rho=.1 is train.rho=0.1
        by_spec.setdefault(lever_spec(lever), lever)
    args.levers = list(by_spec.values())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = load_params(ROOT / "params.yaml")
    store = Path(args.json)
    runs = json.loads(store.read_text())["runs"] if store.exists() else []
    seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",")))
    planned = [(lever, seed, lever_params(base, args.recipe, seed, lever))
               for lever in args.levers for seed in seeds]  # every lever checked before a run
    configure_torch(args.threads)
    dtype = dtype_name(select_backend(base["ipex"], base["train"]["device"]).dtype)
    done = {lever_key(r) for r in runs}
    data = None
    for lever, seed, params in planned:
        if lever_key({**tta.planned_run(args.recipe, params, dtype, args.threads),
                      "lever_spec": lever_spec(lever)}) in done:
            continue
        data = data or load_prepared(args.data)
        print(f"lever_probe: {args.recipe} + {lever}, seed {seed} ({cpu_class()}, {dtype})",
              file=sys.stderr, flush=True)
        with applying(lever, params, len(data.train.labels)):
            run = tta.run_one(data, params, args.recipe)
        recipe_only = tta.recipe_params(base, tta.RECIPES[args.recipe], seed)
        runs.append({**run, "lever": lever, "lever_spec": lever_spec(lever),
                     "base_recipe_hash": tta.recipe_hash(recipe_only)})
        write_json(store, {"runs": runs})
        print(f"lever_probe: {lever} seed {seed}: test {run['test_acc_flip_tta']:.4f} "
              f"(plain {run['test_acc']:.4f}) in {run['train_seconds']:.0f} s",
              file=sys.stderr, flush=True)
    if runs:
        table = summary(runs, tta.stored_runs(tta.RUNS_FILE))
        write_text(args.markdown, table)
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Architecture probe: do VGG blocks that pool after their *first* conv (the second conv runs at
half resolution, as in the CIFAR-10 speedruns' networks) buy more accuracy per multiply-add than
params.yaml's blocks, which pool after both? A measurement for issue 14, not a pipeline feature.

Run from the repository root, after `dvc repro preprocess`:

    python bench/arch_probe.py --archs 32/64/128 --seeds 0,1,2
    python bench/arch_probe.py --archs 32/64/128,24/48/96 --step-cost     # step times only
    MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \
        python bench/arch_probe.py --archs 32/64/128,24/48/96 --step-cost # as an AVX2-only CPU

An arch `a/b/c` is three blocks: conv 1->a at 28x28, pool, conv a->a at 14x14; conv a->b,
pool, conv b->b at 7x7; conv b->c, pool, conv c->c at 3x3 (3x3 convolutions with BatchNorm and
ReLU), then params.yaml's classifier on the flattened 3x3 map; flip TTA as fmnist.model's CNN.
Each run is `time_to_accuracy.run_one` of params.yaml's training recipe (the train stage's own
`fit`, its epochs, late SAM, EMA and augmentation) with `fmnist.train.build_model` swapped for
this model while it runs, so the library stays unchanged until the result earns a param.

Runs go to bench/results/arch_probe.json as each ends (keyed like time_to_accuracy's, plus the
arch), so the probe resumes; `--step-cost` stores plain-SGD step times (params.yaml's model
first, the ratio is what carries between machines of a class) instead of training. The table
(arch_probe.md) pairs each arch's seeds with time_to_accuracy.json's default runs of the same
CPU class, dtype, recipe hash, threads and seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import step_cost  # noqa: E402  (bench scripts share one definition)
import time_to_accuracy as tta  # noqa: E402

import fmnist.train as train_module  # noqa: E402
from fmnist.accel import cpu_class, dtype_name, select_backend  # noqa: E402
from fmnist.allocator import keep_freed_memory  # noqa: E402
from fmnist.atomic import write_json, write_text  # noqa: E402
from fmnist.constants import IMAGE_SIZE, INPUT_SHAPE, NUM_CLASSES  # noqa: E402
from fmnist.data import load_prepared  # noqa: E402
from fmnist.flops import multiply_adds  # noqa: E402
from fmnist.model import CNN, Normalize, build_model  # noqa: E402
from fmnist.params import load_params  # noqa: E402
from fmnist.reproducibility import configure_torch, nan_fill  # noqa: E402

DEFAULT_RECIPE = "late-e16"  # params.yaml's training recipe, the one every arch trains with


class EarlyPoolCNN(CNN):
    """Inherits CNN's forward, so flip TTA and normalization are exactly the shipped model's;
    builds its own layers here rather than as a `model.*` option, so the library and the
    committed dvc.lock stay as they are unless the layout wins."""

    def __init__(self, channels: list[int], dropout: float, hidden: int) -> None:
        nn.Module.__init__(self)  # CNN's own __init__ builds the other layout
        self.flip_tta = False
        self.temperature = 1.0
        self.normalize = Normalize()
        layers: list[nn.Module] = []
        in_channels, size = INPUT_SHAPE[0], IMAGE_SIZE
        for out_channels in channels:
            layers += _conv_bn_relu(in_channels, out_channels)
            layers.append(nn.MaxPool2d(2))
            size //= 2
            layers += _conv_bn_relu(out_channels, out_channels)
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(in_channels * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, NUM_CLASSES),
        )


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def parse_arch(text: str) -> list[int]:
    """The three block widths of `a/b/c`; a one-line exit otherwise."""
    try:
        channels = [int(c) for c in text.split("/")]
    except ValueError:
        channels = []
    if len(channels) != 3 or min(channels) < 1:
        raise SystemExit(f"arch_probe: arch {text!r}: expected three widths, e.g. 32/64/128")
    return channels


def make_model(arch: str, params_model: dict[str, Any]) -> nn.Module:
    return EarlyPoolCNN(parse_arch(arch), float(params_model["dropout"]),
                        int(params_model["hidden"]))


@contextlib.contextmanager
def building(arch: str) -> Iterator[None]:
    """fmnist.train's `fit` trains `arch` while this is open."""
    original = train_module.build_model
    train_module.build_model = lambda config: make_model(arch, config)
    try:
        yield
    finally:
        train_module.build_model = original


def canonical(arch: str) -> str:
    """One spelling per model (`32/ 64/128` is `32/64/128`), for keys and table rows."""
    return "/".join(map(str, parse_arch(arch)))


def measure_step_costs(base: dict[str, Any], archs: list[str], dtype: str,
                       threads: int) -> list[dict[str, Any]]:
    """Step times as step_cost.py takes them: glibc's malloc keeping freed memory, as `fit`."""
    allocator = tta.ALLOCATOR_KEPT if keep_freed_memory() else tta.ALLOCATOR_DEFAULT
    backend = select_backend({**base["ipex"], "enabled": False}, base["train"]["device"])
    batch = base["train"]["batch_size"]
    models = {"params.yaml": lambda: build_model(base["model"])}
    models.update({arch: (lambda a=arch: make_model(a, base["model"])) for arch in archs})
    out, default_seconds = [], None
    for name, factory in models.items():
        seconds = step_cost.seconds_per_step(factory, backend, batch, warmup=40, windows=5,
                                             steps=20)
        default_seconds = default_seconds or seconds  # params.yaml's model runs first
        out.append({"cpu_class": cpu_class(), "isa_limit": tta.isa_limit(),
                    "allocator": allocator, "nan_fill": nan_fill(), "dtype": dtype,
                    "threads": threads,
                    "cpu_model": tta.cpu_model(), "torch_version": torch.__version__,
                    "arch": name, "batch": batch,
                    "multiply_adds": multiply_adds(factory()), "ms_per_step": seconds * 1000,
                    "ratio": seconds / default_seconds})
        print(f"arch_probe: {name}: {seconds * 1000:.1f} ms per plain step "
              f"({out[-1]['ratio']:.2f}x params.yaml's model)", file=sys.stderr, flush=True)
    return out


def arch_key(run: dict[str, Any]) -> str:
    return f"{tta.run_key(run)}|{canonical(run['arch'])}"


def pairing_key(run: dict[str, Any]) -> tuple[str, str, str, int, int]:
    """Runs of one recipe (params.yaml's, by hash), machine class, dtype, threads and seed."""
    return (tta.class_label(run), run["dtype"], run["recipe_hash"], run["threads"], run["seed"])


def grouped_step_costs(steps: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Every measurement of each model per machine class and dtype, in measuring order: the
    spread between runs is the VM's, and the table shows it rather than one draw."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for entry in steps:
        key = (tta.class_label(entry), entry["dtype"], entry["arch"])
        groups.setdefault(key, []).append(entry)
    return groups


def _span(values: list[float], digits: int) -> str:
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}-{high}"


def summary(runs: list[dict[str, Any]], steps: list[dict[str, Any]],
            baseline: list[dict[str, Any]]) -> str:
    """Arch rows, then the step costs; `baseline`: time_to_accuracy's runs, whose default
    (params.yaml's recipe) each arch seed is paired with."""
    default_acc = {pairing_key(r): r["test_acc_flip_tta"] for r in baseline
                   if r["recipe"] == DEFAULT_RECIPE and r.get("test_acc_flip_tta") is not None}
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        key = (tta.class_label(run), run["dtype"], canonical(run["arch"]), run["recipe_hash"])
        groups.setdefault(key, []).append(run)
    lines = [
        "# Architecture probe: pooling after each block's first conv",
        "",
        "Generated by `python bench/arch_probe.py` from `arch_probe.json`. Every run trains "
        f"params.yaml's recipe ({DEFAULT_RECIPE}) with the model swapped; seconds: the train "
        "stage's `fit`; accuracy: the float32 model on the 10,000 test images with flip TTA "
        "(`plain`: without it); paired: the arch minus time_to_accuracy.json's default on the "
        "same CPU class, dtype, recipe and seed. Runs imported from a scratch copy of the probe "
        "(`source` in the JSON) count for accuracy, not for seconds.",
        "",
        "| CPU class | dtype | arch (early pooling) | M multiply-adds | seeds | "
        "test acc mean ± std (min) | plain | paired with the default | train s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (label, dtype, arch, _), group in sorted(groups.items()):
        accs = [r["test_acc_flip_tta"] for r in group]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        plain = statistics.fmean(r["test_acc"] for r in group)
        pairs = [r["test_acc_flip_tta"] - default_acc[pairing_key(r)] for r in group
                 if pairing_key(r) in default_acc]
        seeds = f"{len(pairs)} seed{'s' * (len(pairs) > 1)}"
        paired = f"{statistics.fmean(pairs) * 100:+.2f} ({seeds})" if pairs else "-"
        timed = [r["train_seconds"] for r in group if not r.get("source")]
        low, high = (f"{f(timed):.0f}" if timed else "-" for f in (min, max))
        lines.append(
            f"| {label} | {dtype} | {arch} | {group[0]['multiply_adds'] / 1e6:.1f} | "
            f"{len(group)} | {statistics.fmean(accs):.2%} ± {std:.2%} ({min(accs):.2%}) | "
            f"{plain:.2%} | {paired} | {low if low == high else f'{low}-{high}'} |")
    if steps:
        lines += ["", "Plain SGD step (forward, loss, backward, update) on random images, "
                  "median of 5 windows of 20 steps after 40, against params.yaml's model in "
                  "the same process:", "",
                  "| CPU class, dtype | model | M multiply-adds | runs | ms per step | "
                  "x params.yaml's |", "|---|---|---:|---:|---:|---:|"]
        for (label, dtype, arch), group in grouped_step_costs(steps).items():
            lines.append(f"| {label}, {dtype} | {arch} | {group[0]['multiply_adds'] / 1e6:.1f} | "
                         f"{len(group)} | {_span([e['ms_per_step'] for e in group], 1)} | "
                         f"{_span([e['ratio'] for e in group], 2)} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="32/64/128",
                        help="comma-separated archs, each three block widths joined by '/'")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--step-cost", action="store_true",
                        help="measure plain-step times instead of training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=str(ROOT / tta.PREPARED_FILE))
    parser.add_argument("--json", default=str(tta.RESULTS / "arch_probe.json"))
    parser.add_argument("--markdown", default=str(tta.RESULTS / "arch_probe.md"))
    args = parser.parse_args(argv)
    args.archs = list(dict.fromkeys(canonical(a) for a in args.archs.split(",") if a))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = load_params(ROOT / "params.yaml")
    if not tta.is_default(base, tta.RECIPES[DEFAULT_RECIPE]):
        raise SystemExit(f"arch_probe: params.yaml's training recipe is no longer "
                         f"{DEFAULT_RECIPE}; update DEFAULT_RECIPE")
    store = Path(args.json)
    stored = json.loads(store.read_text()) if store.exists() else {}
    runs, steps = stored.get("runs", []), stored.get("step_costs", [])
    configure_torch(args.threads)
    dtype = dtype_name(select_backend(base["ipex"], base["train"]["device"]).dtype)
    if args.step_cost:
        steps += measure_step_costs(base, args.archs, dtype, torch.get_num_threads())
        write_json(store, {"runs": runs, "step_costs": steps})
    else:
        done = {arch_key(r) for r in runs}
        data = None
        for arch in args.archs:
            for seed in dict.fromkeys(int(s) for s in args.seeds.split(",")):
                params = tta.recipe_params(base, tta.RECIPES[DEFAULT_RECIPE], seed)
                planned = {**tta.planned_run(DEFAULT_RECIPE, params, dtype, args.threads),
                           "arch": arch}
                if arch_key(planned) in done:
                    continue
                data = data or load_prepared(args.data)
                print(f"arch_probe: {arch} seed {seed} ({cpu_class()}, {dtype})",
                      file=sys.stderr, flush=True)
                with building(arch):
                    run = tta.run_one(data, params, DEFAULT_RECIPE)
                model = {"early_pool_channels": parse_arch(arch)}  # not a params.model
                size = multiply_adds(make_model(arch, params["model"]))
                runs.append({**run, "arch": arch, "model": model, "multiply_adds": size})
                write_json(store, {"runs": runs, "step_costs": steps})
    baseline = tta.stored_runs(tta.RUNS_FILE)
    if runs or steps:
        table = summary(runs, steps, baseline)
        write_text(args.markdown, table)
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

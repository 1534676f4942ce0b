"""Step cost of candidate model widths, relative to params.yaml's model, on this CPU.

Run from the repository root:

    python bench/step_cost.py --channels 16/32/64/128,32/64/128/256
    python bench/step_cost.py --channels ... --markdown-out bench/results/step_cost.md
    python bench/step_cost.py --channels 16/32/64/128 --without-batch-norm
    MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \
        python bench/step_cost.py --channels ...          # this machine as an AVX2-only CPU

Why: a time-to-accuracy run costs minutes; what a wider model would cost on the *other* CPU
class (float32 on AVX2 against bf16 with AMX or avx512_bf16) is a ratio of step times, and the
ratio, unlike the seconds, carries from one machine of a class to another. Each model runs a
plain SGD training step (forward, loss, backward, update; SAM's step is two of them) on a batch
of random images in the dtype params.yaml's `ipex.dtype` picks here (native backend, no IPEX),
channels_last, with glibc's malloc keeping freed memory as training does (the header says when
it could not); the median of timed windows after a warm-up is reported, params.yaml's model
first. `--markdown-out` appends the run (its command, header and table) to a Markdown file,
so the measurements of several classes accumulate in one generated file.

`--nan-fill-pairs N` adds params.yaml's model timed with deterministic mode's NaN fill of
`torch.empty`'s tensors (torch.utils.deterministic.fill_uninitialized_memory: torch turns it on
with deterministic mode; `configure_torch` turns it off on a CPU since 2026-12-05) on and off,
in N interleaved pairs so the VM's drift falls on both: what turning it off saves on this class.
The header says whether the widths table ran with it on or off.

`--without-batch-norm` adds each model without its BatchNorm layers (`model.batch_norm:
false`, so its convolutions get biases): what normalization costs of the step on this class,
memory-bound kernels that gain nothing from the matmul units (the README's roofline section).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fmnist.accel import Backend, autocast, cpu_class, dtype_name, select_backend
from fmnist.allocator import keep_freed_memory
from fmnist.atomic import write_text
from fmnist.constants import IMAGE_SIZE, NUM_CLASSES
from fmnist.model import build_model
from fmnist.params import load_params
from fmnist.reproducibility import configure_torch, nan_fill

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from time_to_accuracy import isa_limit  # noqa: E402  (bench scripts share one definition)


def parse_channels(text: str) -> list[list[int]]:
    error = SystemExit(f"step_cost: --channels: expected e.g. 16/32/64,32/64/128, got {text!r}")
    try:
        models = [[int(c) for c in model.split("/")] for model in text.split(",") if model]
    except ValueError:
        raise error from None
    if not models or any(c < 1 for model in models for c in model):
        raise error
    return models


def seconds_per_step(make_model: Callable[[], nn.Module], backend: Backend, batch: int,
                     warmup: int, windows: int, steps: int) -> float:
    """Median seconds of a plain SGD step of the model `make_model()` builds (seeded)."""
    torch.manual_seed(0)
    model = make_model().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    images = (torch.rand(batch, 1, IMAGE_SIZE, IMAGE_SIZE) * 255).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(backend):
            loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def nan_fill_pairs(make_model: Callable[[], nn.Module], backend: Backend, batch: int,
                   pairs: int, warmup: int, windows: int, steps: int) -> dict[bool, list[float]]:
    """Seconds per step with the NaN fill on and off, pair by pair, the order alternating so
    that drift within a pair falls on either side; the switch is restored."""
    before = torch.utils.deterministic.fill_uninitialized_memory
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for pair in range(pairs):
            for fill in ((True, False) if pair % 2 == 0 else (False, True)):
                torch.utils.deterministic.fill_uninitialized_memory = fill
                times[fill].append(seconds_per_step(make_model, backend, batch, warmup,
                                                    windows, steps))
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = before
    return times


def nan_fill_table(times: dict[bool, list[float]]) -> list[str]:
    """Each side's median and pairs, then the pairs' own off/on ratios (what pairing buys)."""
    on = statistics.median(times[True])
    lines = ["", f"params.yaml's model, deterministic mode's NaN fill on and off in "
                 f"{len(times[True])} interleaved pairs:", "",
             "| NaN fill | ms per step (median) | each pair | x fill on |", "|---|---:|---|---:|"]
    for fill, label in ((True, "on"), (False, "off")):
        median = statistics.median(times[fill])
        each = ", ".join(f"{t * 1000:.1f}" for t in times[fill])
        lines.append(f"| {label} | {median * 1000:.1f} | {each} | {median / on:.3f} |")
    ratios = [off / on for on, off in zip(times[True], times[False], strict=True)]
    lines += ["", f"Off / on per pair: {', '.join(f'{r:.3f}' for r in ratios)} "
                  f"(median {statistics.median(ratios):.3f})."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", required=True,
                        help="comma-separated models, each its block widths joined by '/'")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads, as time_to_accuracy.py runs (0: torch default)")
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed window")
    parser.add_argument("--nan-fill-pairs", type=int, default=0,
                        help="also time params.yaml's model with deterministic mode's NaN fill "
                             "on and off, this many interleaved pairs")
    parser.add_argument("--without-batch-norm", action="store_true",
                        help="also time each model without its BatchNorm layers")
    parser.add_argument("--markdown-out", type=Path,
                        help="append this run's command, header and table to this file")
    args = parser.parse_args(argv)
    if args.nan_fill_pairs < 0:
        parser.error(f"--nan-fill-pairs: expected 0 or more, got {args.nan_fill_pairs}")
    params = load_params(ROOT / "params.yaml")
    if args.without_batch_norm and not params["model"]["batch_norm"]:
        parser.error("--without-batch-norm: params.yaml's model.batch_norm is false already")
    configure_torch(args.threads)
    kept = keep_freed_memory()
    backend = select_backend({**params["ipex"], "enabled": False}, params["train"]["device"])
    batch = params["train"]["batch_size"]
    default = [int(c) for c in params["model"]["channels"]]
    requested = [m for m in parse_channels(args.channels) if m != default]
    models = [default, *[list(m) for m in dict.fromkeys(map(tuple, requested))]]
    limit = isa_limit()
    malloc = "glibc malloc keeps freed memory" if kept else "malloc as it is (not glibc's, or set)"
    fill = "on" if nan_fill() else "off"
    lines = [f"CPU class {cpu_class()}{' (' + limit + ')' if limit else ''}, "
             f"{dtype_name(backend.dtype)}, {torch.get_num_threads()} threads, batch {batch}, "
             f"{malloc}, NaN fill {fill}, torch {torch.__version__}: plain SGD step, "
             "median of windows", "",
             "| channels | ms per step | images/s | x params.yaml's model |",
             "|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    base = 0.0
    with_bn = params["model"]["batch_norm"]
    normalizations = (True, False) if args.without_batch_norm else (with_bn,)
    for channels in models:
        for batch_norm in normalizations:
            config = {**params["model"], "channels": channels, "batch_norm": batch_norm}
            seconds = seconds_per_step(lambda config=config: build_model(config), backend,
                                       batch, args.warmup, args.windows, args.steps)
            base = base or seconds  # the default runs first
            mark = " (params.yaml)" if channels == default and batch_norm == with_bn else ""
            mark += ", no BatchNorm" if with_bn and not batch_norm else ""
            lines.append(f"| {'/'.join(map(str, channels))}{mark} | {seconds * 1000:.1f} | "
                         f"{batch / seconds:,.0f} | {seconds / base:.2f} |")
            print(lines[-1], flush=True)
    if args.nan_fill_pairs > 0:
        times = nan_fill_pairs(lambda: build_model(params["model"]), backend, batch,
                               args.nan_fill_pairs, args.warmup, args.windows, args.steps)
        table = nan_fill_table(times)
        lines += table
        print("\n".join(table), flush=True)
    if args.markdown_out is not None:
        command = " ".join(["python bench/step_cost.py", *(argv if argv is not None
                                                            else sys.argv[1:])])
        before = args.markdown_out.read_text() if args.markdown_out.exists() else ""
        write_text(args.markdown_out, before + f"\n`{command}`\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

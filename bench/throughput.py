"""SAM training throughput on this CPU: a seed-style baseline against our native and IPEX paths.

Run from the repository root:  python bench/throughput.py [--markdown-out bench/results.md]

Every row trains the same model (params.yaml's) with SAM over SGD on the same data (the prepared
HDF5 when present, else random uint8 images) and reports the median images/s over several timed
windows after a warm-up (a process's first ~60 steps run about 2x slower). Our rows run the
project's own epoch loop (`fmnist.train.train_one_epoch`, hence `sam_step` and the batch
augmentation); the baseline is the usual tutorial pipeline: a per-sample Dataset doing
ToTensor/Normalize in Python, a DataLoader, batch 64, fp32, NCHW.

The table also shows how close each row is to this machine's matmul roofline, and a short
fixed-budget training compares test accuracy across dtypes, so speed is never bought with
accuracy. IPEX rows run in the IPEX venv (scripts/ipex-env.sh); from the main environment they
are run there in a subprocess when .venv-ipex exists, and marked n/a otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fmnist.accel import Backend, cpu_bf16_native, cpu_class, ipex_status, select_backend
from fmnist.allocator import applied, keep_freed_memory
from fmnist.constants import NORM_MEAN, NORM_STD, PREPARED_FILE
from fmnist.errors import FmnistError
from fmnist.flops import cost
from fmnist.model import build_model
from fmnist.params import load_params
from fmnist.reproducibility import configure_torch, nan_fill, seed_everything

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IPEX_PYTHON = ROOT / ".venv-ipex" / "bin" / "python"
BASELINE_BATCH = 64
SYNTHETIC_TRAIN = 20_000


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    dtype: str  # "float32" | "bfloat16"
    ipex: bool = False
    compile: bool = False


ROWS = {
    row.name: row
    for row in (
        Row("baseline", "seed-style: per-sample Dataset + DataLoader, fp32, batch 64", "float32"),
        Row("native_fp32", "native fp32, channels_last, BatchIterator", "float32"),
        Row("native_bf16", "native bf16 autocast", "bfloat16"),
        Row("native_compile", "native bf16 + torch.compile", "bfloat16", compile=True),
        Row("ipex_fp32", "IPEX fp32", "float32", ipex=True),
        Row("ipex_bf16", "IPEX bf16", "bfloat16", ipex=True),
    )
}
ACCURACY_ROWS = ("native_fp32", "native_bf16", "ipex_bf16")
EMULATED_NOTE = "bf16 is emulated on this CPU ({}): skipped (--emulated-bf16 runs it anyway)"


@dataclass
class Result:
    """One row's measurement; images_per_s is None when the row could not run (see note)."""

    images_per_s: float | None = None
    windows: list[float] | None = None
    end_to_end_images_per_s: float | None = None
    first_step_s: float | None = None
    final_loss: float | None = None
    note: str = ""


# --- data ---------------------------------------------------------------------------------------


def load_data(path: Path) -> tuple[Any, str]:
    """(fmnist.data.Prepared or None, description); random uint8 images when no prepared file."""
    if path.exists():
        from fmnist.data import load_prepared

        return load_prepared(path), f"prepared data {path}"
    return None, f"random uint8 images ({SYNTHETIC_TRAIN:,}; no {path})"


def train_arrays(data: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if data is not None:
        return np.asarray(data.train.images), np.asarray(data.train.labels)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(SYNTHETIC_TRAIN, 28, 28), dtype=np.uint8)
    return images, rng.integers(0, 10, size=SYNTHETIC_TRAIN).astype(np.int64)


# --- the seed-style baseline --------------------------------------------------------------------


def to_tensor(image: Any) -> torch.Tensor:
    """torchvision's ToTensor for a PIL image: HWC uint8 -> CHW float in [0, 1]."""
    array = np.array(image, np.uint8, copy=True)
    tensor = torch.from_numpy(array).view(image.size[1], image.size[0], len(image.getbands()))
    return tensor.permute((2, 0, 1)).contiguous().to(dtype=torch.float32).div(255)


def normalize(
    tensor: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """torchvision's Normalize (not in place): per-channel (x - mean) / std."""
    tensor = tensor.clone()
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


class SeedStyleDataset(torch.utils.data.Dataset):
    """What torchvision's FashionMNIST + Compose([ToTensor(), Normalize()]) does per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        image = Image.fromarray(self.images[index])  # torchvision hands out PIL images
        x = normalize(to_tensor(image), (NORM_MEAN,), (NORM_STD,))
        return x, int(self.labels[index])


def forever(loader: torch.utils.data.DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def run_baseline(images: np.ndarray, labels: np.ndarray, params: dict, args: Any) -> Result:
    """The tutorial loop: SAM's two passes per batch, loss.item() per step, nothing else."""
    from fmnist.sam import SAM

    train = params["train"]
    seed_everything(params["seed"])
    start = time.perf_counter()
    model = build_model(params["model"])
    model.normalize = nn.Identity()  # the dataset normalizes, as in the seed code
    model.train()
    optimizer = SAM(
        model.parameters(),
        torch.optim.SGD,
        rho=train["rho"],
        lr=train["lr"],
        momentum=train["momentum"],
        nesterov=train["nesterov"],
        weight_decay=train["weight_decay"],
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=train["label_smoothing"])
    loader = torch.utils.data.DataLoader(
        SeedStyleDataset(images, labels),
        batch_size=BASELINE_BATCH,
        shuffle=True,
        num_workers=0,
        drop_last=True,
        generator=torch.Generator().manual_seed(params["seed"]),
    )
    batches = forever(loader)

    def steps(n: int) -> tuple[int, float]:
        seen, loss_sum = 0, 0.0
        for _ in range(n):
            x, y = next(batches)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.first_step(zero_grad=True)
            loss_fn(model(x), y).backward()
            optimizer.second_step(zero_grad=True)
            loss_sum += loss.item()
            seen += len(y)
        return seen, loss_sum / n

    # Same images per window as our rows (twice the steps at half the batch).
    per_window = max(1, args.steps_per_window * args.batch_size // BASELINE_BATCH)
    first = time.perf_counter()
    images_done, _ = steps(1)
    first_step_s = time.perf_counter() - first
    images_done += steps(max(0, args.warmup * args.batch_size // BASELINE_BATCH - 1))[0]
    rates, loss = [], float("nan")
    for _ in range(args.windows):
        t0 = time.perf_counter()
        seen, loss = steps(per_window)
        rates.append(seen / (time.perf_counter() - t0))
        images_done += seen
    return finish(rates, images_done, time.perf_counter() - start, first_step_s, loss)


# --- our rows: the project's own epoch loop ------------------------------------------------------


def run_ours(row: Row, images: np.ndarray, labels: np.ndarray, params: dict, args: Any) -> Result:
    """Windows of `train_one_epoch` over consecutive slices of the training images."""
    from fmnist.data import BatchIterator
    from fmnist.runtime import Runtime
    from fmnist.train import build_optimizer, train_one_epoch

    train = {**params["train"], "optimizer": "sam", "batch_size": args.batch_size}
    try:
        backend = select_backend(
            {"enabled": row.ipex, "dtype": row.dtype}, "cpu", compile=row.compile
        )
    except FmnistError as exc:
        return Result(note=str(exc))
    seed_everything(params["seed"])
    start = time.perf_counter()
    model, optimizer = build_optimizer(build_model(params["model"]), train, backend)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=train["label_smoothing"])
    generator = torch.Generator().manual_seed(params["seed"])
    offset = 0

    def steps(n: int, epoch: int) -> Any:
        nonlocal offset
        count = n * args.batch_size
        if offset + count > len(labels):
            offset = 0
        part = slice(offset, offset + count)
        offset += count
        loader = BatchIterator(
            images[part],
            labels[part],
            args.batch_size,
            shuffle=True,
            seed=params["seed"],
            drop_last=True,
        )
        loader.set_epoch(epoch)
        return train_one_epoch(
            model,
            optimizer,
            None,
            loader,
            Runtime(backend),
            loss_fn=loss_fn,
            augment=train["augment"],
            generator=generator,
            sam_every=1,
            first_step=0,
            progress=False,
        )

    first_step_s = steps(1, 0).seconds  # includes torch.compile's compilation
    images_done = args.batch_size + steps(max(1, args.warmup - 1), 1).images
    rates, loss = [], float("nan")
    for window in range(args.windows):
        stats = steps(args.steps_per_window, 2 + window)
        rates.append(stats.images / stats.seconds)
        images_done += stats.images
        loss = stats.loss
    result = finish(rates, images_done, time.perf_counter() - start, first_step_s, loss)
    if backend.ipex_version:
        result.note = f"IPEX {backend.ipex_version}"
    return result


def finish(
    rates: list[float], images: int, seconds: float, first_step_s: float, loss: float
) -> Result:
    return Result(
        images_per_s=statistics.median(rates),
        windows=rates,
        end_to_end_images_per_s=images / seconds,
        first_step_s=first_step_s,
        final_loss=loss,
        note="" if np.isfinite(loss) else "loss not finite",
    )


# --- the hardware limit ---------------------------------------------------------------------------


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 8) -> float:
    """Median GFLOP/s of an n x n matmul: the practical compute roof of this CPU for dtype."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(dtype)
    b = torch.randn(n, n, generator=generator).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


# --- accuracy after a fixed short budget ----------------------------------------------------------


def run_accuracy(row: Row, data: Any, params: dict, args: Any) -> dict[str, Any]:
    """Test accuracy after `args.accuracy_epochs` epochs on a stratified subset (fit's own path)."""
    from fmnist.train import evaluate_split, fit

    run_params = {
        **params,
        "ipex": {"enabled": row.ipex, "dtype": row.dtype},
        "train": {**params["train"], "epochs": args.accuracy_epochs, "compile": False},
    }
    try:
        start = time.perf_counter()
        result = fit(data, run_params, train_subset=args.accuracy_subset, progress=False)
    except FmnistError as exc:
        return {"note": str(exc)}
    native = Backend("native", result.backend.dtype, torch.device("cpu"))
    _, test_acc = evaluate_split(result.model, data.test, native)
    return {
        "test_acc": test_acc,
        "val_acc": result.history[-1]["val_acc"],
        "seconds": time.perf_counter() - start,
        "train_examples": result.metrics["train_examples"],
    }


# --- running and reporting ------------------------------------------------------------------------


def measure(names: list[str], args: Any) -> dict[str, Any]:
    """Rows and accuracy runs this interpreter can do; IPEX rows go to the IPEX venv if needed."""
    params = load_params(ROOT / "params.yaml")
    configure_torch(args.threads)
    keep_freed_memory()  # as the train stage runs
    data, data_note = load_data(Path(args.data))
    images, labels = train_arrays(data, params["seed"])
    ipex_here = ipex_status()[0] is not None
    delegated = [n for n in names if ROWS[n].ipex and not ipex_here]
    results: dict[str, Any] = {"rows": {}, "accuracy": {}, "data": data_note}
    skipped = set()
    if not (cpu_bf16_native() or args.emulated_bf16):
        skipped = {n for n in names if ROWS[n].dtype == "bfloat16"}
    for name in sorted(skipped, key=names.index):
        results["rows"][name] = asdict(Result(note=EMULATED_NOTE.format(cpu_class())))
    delegated = [n for n in delegated if n not in skipped]
    for name in names:
        if name in delegated or name in skipped:
            continue
        row = ROWS[name]
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        if name == "baseline":
            result = run_baseline(images, labels, params, args)
        else:
            result = run_ours(row, images, labels, params, args)
        results["rows"][name] = asdict(result)
    if args.accuracy and data is not None:
        for name in names:
            if name in ACCURACY_ROWS and name not in delegated and name not in skipped:
                print(f"bench: accuracy {name} ...", file=sys.stderr, flush=True)
                results["accuracy"][name] = run_accuracy(ROWS[name], data, params, args)
    if delegated:
        merge(results, delegate(delegated, args))
    return results


def delegate(names: list[str], args: Any) -> dict[str, Any]:
    """Run IPEX rows with the IPEX venv's interpreter; n/a rows when there is none."""
    python = Path(args.ipex_python)
    why = f"no IPEX here ({ipex_status()[1]}) and no {python}; run scripts/ipex-env.sh"
    if not python.exists():
        return {"rows": {n: asdict(Result(note=why)) for n in names}, "accuracy": {}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ipex.json"
        command = [
            str(python),
            str(Path(__file__).resolve()),
            "--rows",
            ",".join(names),
            "--windows",
            str(args.windows),
            "--steps-per-window",
            str(args.steps_per_window),
            "--warmup",
            str(args.warmup),
            "--threads",
            str(args.threads),
            "--batch-size",
            str(args.batch_size),
            "--data",
            str(args.data),
            "--accuracy-epochs",
            str(args.accuracy_epochs),
            "--accuracy-subset",
            str(args.accuracy_subset),
            "--no-roofline",
            "--json-out",
            str(out),
        ] + ([] if args.accuracy else ["--no-accuracy"]) + (
            ["--emulated-bf16"] if args.emulated_bf16 else []
        )
        print(f"bench: {', '.join(names)} in {python} ...", file=sys.stderr, flush=True)
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        if run.returncode != 0 or not out.exists():
            tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
            note = f"IPEX venv run failed: {tail}"
            return {"rows": {n: asdict(Result(note=note)) for n in names}, "accuracy": {}}
        return json.loads(out.read_text())


def merge(results: dict[str, Any], other: dict[str, Any]) -> None:
    results["rows"].update(other["rows"])
    results["accuracy"].update(other["accuracy"])
    if "versions" in other:
        results["ipex_versions"] = other["versions"]


def machine() -> dict[str, Any]:
    model_name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return {"cpu": model_name, "cores": os.cpu_count(), "isa": isa, "cpu_class": cpu_class(),
            "bf16_native": cpu_bf16_native(), "malloc_keeps_freed": applied(),
            "nan_fill": nan_fill()}  # as configure_torch left it (bench/README: older reports)


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(results: dict[str, Any], names: list[str], args: Any) -> str:
    """The results as Markdown: setup line, throughput table, targets, accuracy table."""
    rows, roof = results["rows"], results.get("roofline")
    base = rows.get("baseline", {}).get("images_per_s")
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, CPU class {m['cpu_class']} (bf16 "
        f"{'native' if m['bf16_native'] else 'emulated'}), {m['cores']} cores "
        f"({', '.join(m['isa']) or 'no AVX-512'}), "
        f"{results['threads']} threads; torch {results['torch']}"
        + (
            f", IPEX rows on torch/IPEX {results['ipex_versions']}"
            if "ipex_versions" in results
            else ""
        )
        + (". glibc malloc keeps freed blocks (fmnist.allocator)"
           if m.get("malloc_keeps_freed") else ". Default malloc")
        + (", NaN fill off" if m.get("nan_fill") is False else "")
        + f". Load average (1 min) {results['load_before']:.2f} before, "
        f"{results['load_after']:.2f} after. Data: {results['data']}.",
        "",
        f"Median of {args.windows} windows of {args.steps_per_window} SAM steps "
        f"(batch {args.batch_size}; baseline batch {BASELINE_BATCH}, same images per window) "
        f"after {args.warmup} warm-up steps. End-to-end counts the warm-up and, for "
        "torch.compile, the compilation.",
        "",
    ]
    if roof:
        bf16_roof = roof["roof_bf16"] is not None
        lines += [
            f"Roofline: {roof['gflops_fp32']:,.0f} GFLOP/s fp32, "
            + (f"{roof['gflops_bf16']:,.0f} GFLOP/s bf16" if bf16_roof
               else "bf16 not measured (emulated here)")
            + " (2048x2048 matmul); "
            f"model {roof['forward_mflops']:.1f} MFLOP forward per image, "
            f"a SAM step {roof['sam_mflops'] / roof['forward_mflops']:.2f}x that "
            f"(fmnist.flops) = {roof['sam_mflops']:.0f} MFLOP per image -> at most "
            f"{roof['roof_fp32']:,.0f} images/s fp32"
            + (f", {roof['roof_bf16']:,.0f} images/s bf16." if bf16_roof else "."),
            "",
        ]
    lines += [
        "| row | images/s | x baseline | % of roofline (own dtype) | % of bf16 roofline "
        "| end-to-end images/s | first step s | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in names:
        row, r = ROWS[name], rows.get(name, {})
        ips = r.get("images_per_s")
        ratio = f"{ips / base:.2f}" if ips and base else "n/a"
        own = bf16 = "n/a"
        if ips and roof:
            key = "roof_bf16" if row.dtype == "bfloat16" else "roof_fp32"
            if roof[key]:
                own = f"{100 * ips / roof[key]:.1f}"
            if roof["roof_bf16"]:
                bf16 = f"{100 * ips / roof['roof_bf16']:.1f}"
        lines.append(
            f"| {name}: {row.label} | {fmt(ips)} | {ratio} | {own} | {bf16} "
            f"| {fmt(r.get('end_to_end_images_per_s'))} | {fmt(r.get('first_step_s'), '.2f')} "
            f"| {r.get('note', '')} |"
        )
    lines += ["", *targets(rows, base), ""]
    accuracy = results["accuracy"]
    if accuracy:
        lines += [
            f"Accuracy after {args.accuracy_epochs} epochs on a stratified "
            f"{args.accuracy_subset:,}-image training subset (params.yaml otherwise):",
            "",
            "| row | test acc | val acc | seconds | note |",
            "|---|---:|---:|---:|---|",
        ]
        for name in names:
            if name in accuracy:
                a = accuracy[name]
                lines.append(
                    f"| {name} | {fmt(a.get('test_acc'), '.4f')} | {fmt(a.get('val_acc'), '.4f')}"
                    f" | {fmt(a.get('seconds'), '.0f')} | {a.get('note', '')} |"
                )
    elif args.accuracy:
        lines.append("Accuracy: skipped (needs the prepared data: `dvc repro preprocess`).")
    return "\n".join(lines) + "\n"


def targets(rows: dict[str, Any], base: float | None) -> list[str]:
    """The project's speed targets, met or not."""
    rates = {n: r["images_per_s"] for n, r in rows.items() if r.get("images_per_s")}
    lines = []
    ours = {n: v for n, v in rates.items() if n != "baseline"}
    if base and ours:
        best = max(ours, key=ours.get)
        ratio = ours[best] / base
        lines.append(
            f"- Best path >= 3x baseline: {'met' if ratio >= 3 else 'NOT met'} "
            f"({best}, {ratio:.2f}x)."
        )
    fp32 = rates.get("native_fp32")
    for name in ("native_bf16", "ipex_bf16"):
        if fp32 and name in rates:
            ratio = rates[name] / fp32
            lines.append(
                f"- {name} >= 1.5x native_fp32: {'met' if ratio >= 1.5 else 'NOT met'} "
                f"({ratio:.2f}x)."
            )
    return lines


def roofline(params: dict) -> dict[str, float]:
    model_cost = cost(build_model(params["model"]))
    forward = 2 * model_cost.forward
    sam = 2 * model_cost.sam_step
    fp32 = matmul_gflops(torch.float32)
    # Emulated bf16 matmuls take minutes on an AVX2-only CPU and bound nothing we run there.
    bf16 = matmul_gflops(torch.bfloat16) if cpu_bf16_native() else None
    return {
        "gflops_fp32": fp32,
        "gflops_bf16": bf16,
        "forward_mflops": forward / 1e6,
        "sam_mflops": sam / 1e6,
        "roof_fp32": fp32 * 1e9 / sam,
        "roof_bf16": bf16 * 1e9 / sam if bf16 else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"comma-separated, from: {', '.join(ROWS)} (default: all)",
    )
    parser.add_argument("--windows", type=int, default=5, help="timed windows per row")
    parser.add_argument("--steps-per-window", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=60, help="untimed steps before the windows")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="our rows' batch (default: params.yaml train.batch_size)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--data", default=str(ROOT / PREPARED_FILE))
    parser.add_argument(
        "--accuracy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train briefly per dtype and report test accuracy",
    )
    parser.add_argument("--accuracy-epochs", type=int, default=2)
    parser.add_argument("--accuracy-subset", type=int, default=12_000)
    parser.add_argument(
        "--ipex-python",
        default=str(DEFAULT_IPEX_PYTHON),
        help="interpreter of the IPEX venv, for IPEX rows when IPEX is not here",
    )
    parser.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--emulated-bf16",
        action="store_true",
        help="run bf16 rows even where bf16 is emulated (many times slower than fp32)",
    )
    parser.add_argument("--markdown-out", help="also write the Markdown report to this file")
    parser.add_argument("--json-out", help="write the raw results as JSON to this file")
    args = parser.parse_args(argv)
    unknown = [n for n in args.rows.split(",") if n not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown row {unknown[0]!r} (choose from {', '.join(ROWS)})")
    if min(args.windows, args.steps_per_window, args.warmup + 1) < 1:
        parser.error("--windows and --steps-per-window must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.rows.split(",")
    params = load_params(ROOT / "params.yaml")
    if args.batch_size is None:
        args.batch_size = params["train"]["batch_size"]
    load_before = os.getloadavg()[0]
    results = measure(names, args)
    configure_torch(args.threads)
    if args.roofline:
        print("bench: matmul roofline ...", file=sys.stderr, flush=True)
        results["roofline"] = roofline(params)
    version = ipex_status()[0]
    results.update(
        machine=machine(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        load_before=load_before,
        load_after=os.getloadavg()[0],
        versions=f"{torch.__version__}/{version}" if version else torch.__version__,
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1, sort_keys=True))
    report = markdown(results, names, args)
    if args.markdown_out:
        from fmnist.atomic import write_text

        write_text(args.markdown_out, report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The comparison the project exists for: SAM vs SGD, float32 vs bfloat16, native vs IPEX, rho.

Each configuration is a real DVC experiment (`dvc exp run --temp -S ...`, the workspace is left
alone), so every row can be inspected later with `dvc exp show` / `dvc metrics diff`. The script
reads each experiment's committed metrics files and writes a Markdown table and two figures:

    python bench/compare.py                # default epochs from params.yaml
    python bench/compare.py --epochs 5     # a cheaper grid; every row uses the same epochs
    python bench/compare.py --report-only  # redraw from bench/results/compare.json

IPEX rows run when a Python with IPEX is given (`--ipex-python .venv-ipex/bin/python`, made by
`bash scripts/ipex-env.sh`); otherwise they are listed as not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fmnist.accel import cpu_bf16_native

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
RHO_SWEEP = (0.0, 0.02, 0.05, 0.1, 0.2)
BASE_RHO = 0.05


@dataclass(frozen=True)
class Config:
    name: str
    optimizer: str
    dtype: str
    backend: str  # native | ipex
    rho: float = BASE_RHO

    def set_params(self, epochs: int | None) -> list[str]:
        sets = [
            f"train.optimizer={self.optimizer}",
            f"train.rho={self.rho}",
            f"ipex.dtype={self.dtype}",
            f"ipex.enabled={'true' if self.backend == 'ipex' else 'false'}",
        ]
        if epochs is not None:
            sets.append(f"train.epochs={epochs}")
        return [arg for s in sets for arg in ("-S", s)]


def grid() -> list[Config]:
    """bf16 rows only where this CPU computes bf16 natively (emulated, it is ~8x slower)."""
    dtypes = ("float32", "bfloat16") if cpu_bf16_native() else ("float32",)
    configs = [
        Config(f"cmp-{opt}-{dtype[:4]}-{backend}", opt, dtype, backend)
        for backend in ("native", "ipex")
        for opt in ("sgd", "sam")
        for dtype in dtypes
    ]
    configs += [
        Config(f"cmp-rho{rho:g}", "sam", dtypes[-1], "native", rho)
        for rho in RHO_SWEEP
        if rho != BASE_RHO  # the grid's sam/native row in that dtype is rho 0.05
    ]
    return configs


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout


def _exp_ref(name: str) -> str | None:
    refs = _git("for-each-ref", "--format=%(refname)", "refs/exps").split()
    matches = [ref for ref in refs if ref.rsplit("/", 1)[-1] == name]
    return matches[-1] if matches else None


def _read_json(ref: str, path: str) -> dict:
    return json.loads(_git("show", f"{ref}:{path}"))


def run_experiment(config: Config, epochs: int | None, python_dir: Path | None) -> dict:
    """Run one configuration as a DVC experiment up to evaluate; return its numbers."""
    if _exp_ref(config.name):
        subprocess.run(["dvc", "exp", "remove", config.name], cwd=REPO, check=True)
    env = dict(os.environ)
    if python_dir is not None:  # the stage commands say `python`: pick the IPEX environment
        env["PATH"] = f"{python_dir}{os.pathsep}{env['PATH']}"
    cmd = ["dvc", "exp", "run", "--temp", "-n", config.name, *config.set_params(epochs),
           "evaluate"]
    print(f"compare: {config.name}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    ref = _exp_ref(config.name)
    if ref is None:
        raise SystemExit(f"compare: {config.name}: experiment ran but no ref was found")
    train = _read_json(ref, "reports/train/metrics.json")
    timing = _read_json(ref, "reports/train/timing.json")
    evaluate = _read_json(ref, "reports/evaluate/metrics.json")
    return {
        "name": config.name,
        "optimizer": config.optimizer,
        "dtype": config.dtype,
        "backend": config.backend,
        "rho": config.rho,
        "epochs": train.get("epochs"),
        "test_acc": evaluate["accuracy"],
        "macro_f1": evaluate["f1_macro"],
        "mean_iou": evaluate["iou_mean"],
        "images_per_s": timing["images_per_s_median"],
        "wall_s": timing["train_seconds"],
    }


def markdown_table(rows: list[dict]) -> str:
    head = ("| run | optimizer | dtype | backend | rho | epochs | test acc | macro F1 "
            "| mean IoU | train img/s | wall s |")
    lines = [head, "|" + " --- |" * 11]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['name']} | {r['optimizer']} | {r['dtype']} | {r['backend']} "
                         f"| {r['rho']:g} | | not run: {r['skipped']} | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['optimizer']} | {r['dtype']} | {r['backend']} | {r['rho']:g} "
            f"| {r['epochs']} | {100 * r['test_acc']:.2f}% | {r['macro_f1']:.4f} "
            f"| {r['mean_iou']:.4f} | {r['images_per_s']:,.0f} | {r['wall_s']:,.0f} |"
        )
    return "\n".join(lines)


def draw(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in rows if not r.get("skipped")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sweep = sorted(
        (r for r in ran if r["optimizer"] == "sam" and r["dtype"] == "bfloat16"
         and r["backend"] == "native"),
        key=lambda r: r["rho"],
    )
    left.plot([r["rho"] for r in sweep], [100 * r["test_acc"] for r in sweep], "o-")
    left.set(xlabel="rho (SAM radius; 0 = SGD's update at SAM's cost)",
             ylabel="test accuracy (%)", title="Accuracy vs rho (SAM, bf16, native)")
    left.grid(alpha=0.3)
    for r in ran:
        if r["name"].startswith("cmp-rho"):
            continue
        marker = "o" if r["optimizer"] == "sam" else "s"
        colour = "tab:blue" if r["dtype"] == "bfloat16" else "tab:orange"
        face = colour if r["backend"] == "native" else "none"
        right.scatter(r["images_per_s"], 100 * r["test_acc"], marker=marker,
                      edgecolors=colour, facecolors=face, s=70)
        right.annotate(r["name"].removeprefix("cmp-"), (r["images_per_s"], 100 * r["test_acc"]),
                       fontsize=7, xytext=(4, 3), textcoords="offset points")
    right.set(xlabel="training images/s", ylabel="test accuracy (%)",
              title="Accuracy vs throughput (o SAM, ▪ SGD; blue bf16, filled native)")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads"


def write_report(rows: list[dict], epochs: int | None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compare.json").write_text(json.dumps({"epochs": epochs, "machine": machine(),
                                                      "rows": rows}, indent=2) + "\n")
    draw(rows, RESULTS / "compare.png")
    text = (f"Machine: {machine()}. Epochs per run: {epochs or 'params.yaml default'}.\n\n"
            + markdown_table(rows) + "\n")
    (RESULTS / "compare.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--ipex-python", type=Path, default=None,
                        help="python of an environment with IPEX (scripts/ipex-env.sh)")
    parser.add_argument("--only", default="", help="comma-separated run names to (re)run")
    parser.add_argument("--report-only", action="store_true", help="redraw from compare.json")
    args = parser.parse_args()

    if args.report_only:
        saved = json.loads((RESULTS / "compare.json").read_text())
        write_report(saved["rows"], saved["epochs"])
        return
    previous = {}
    if (RESULTS / "compare.json").exists():
        saved = json.loads((RESULTS / "compare.json").read_text())["rows"]
        previous = {r["name"]: r for r in saved}
    only = set(filter(None, args.only.split(",")))
    rows = []
    for config in grid():
        base = {"name": config.name, "optimizer": config.optimizer, "dtype": config.dtype,
                "backend": config.backend, "rho": config.rho}
        if only and config.name not in only:
            rows.append(previous.get(config.name, {**base, "skipped": "not selected"}))
            continue
        python_dir = None
        if config.backend == "ipex":
            if args.ipex_python is None or not args.ipex_python.exists():
                rows.append({**base, "skipped": "no IPEX environment (--ipex-python)"})
                continue
            python_dir = args.ipex_python.absolute().parent
        rows.append(run_experiment(config, args.epochs, python_dir))
        write_report(rows, args.epochs)  # keep what is done if a later run fails
    write_report(rows, args.epochs)


if __name__ == "__main__":
    main()

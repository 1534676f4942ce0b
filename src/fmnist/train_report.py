"""The train stage's report files, split by who reads them.

metrics.json holds the final losses and validation accuracy (what `dvc exp show` lists),
timing.json the two throughput numbers, run.json everything descriptive (backend, CPU class,
versions, per-epoch timings) that a reviewer reads but never compares as a column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fmnist import allocator
from fmnist.accel import backend_description, machine_description
from fmnist.atomic import write_json
from fmnist.reproducibility import nan_fill
from fmnist.train import FitResult

METRICS_FILE = "metrics.json"
TIMING_FILE = "timing.json"
RUN_FILE = "run.json"


def training_record(result: FitResult, world_size: int) -> dict[str, Any]:
    """What the model file carries about its training: final metrics and backend."""
    return {"metrics": result.metrics, "backend": {**backend_description(result.backend),
                                                   "world_size": world_size}}


def write_train_reports(
    out_dir: str | Path, result: FitResult, *, world_size: int, stage_seconds: float
) -> None:
    """metrics.json, timing.json and run.json into `out_dir` (the stage's staging folder)."""
    out = Path(out_dir)
    m = result.metrics
    write_json(out / METRICS_FILE, {key: m[key] for key in ("train_loss", "val_loss", "val_acc")})
    write_json(out / TIMING_FILE, {
        "images_per_s": result.timing["images_per_s_mean"],
        "train_seconds": result.timing["train_seconds"],
    })
    write_json(out / RUN_FILE, {
        "quality": m,
        "backend": training_record(result, world_size)["backend"],
        "timing": {**result.timing, "stage_seconds": stage_seconds},
        "machine": {**machine_description(result.backend), "allocator": allocator.label(),
                    "nan_fill": nan_fill()},
    })

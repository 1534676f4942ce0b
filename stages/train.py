"""Stage train: prepared data -> models/model.pth, per-epoch curves, metrics and timing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fmnist.accel import backend_metrics, machine_description
from fmnist.atomic import write_json
from fmnist.checkpoint import remove_checkpoint
from fmnist.constants import MODEL_FILE, PREPARED_FILE, TRAIN_CHECKPOINT, TRAIN_REPORT_DIR
from fmnist.data import load_prepared
from fmnist.distributed import init_from_env, maybe_relaunch_under_torchrun
from fmnist.modelfile import save_model
from fmnist.stage import run_stage
from fmnist.train import fit

TIMING_FILE = Path(TRAIN_REPORT_DIR) / "timing.json"


def main(params: dict[str, Any]) -> None:
    if maybe_relaunch_under_torchrun(params):  # train.distributed: the ranks did the work
        return
    start = time.perf_counter()
    data = load_prepared(PREPARED_FILE)
    with init_from_env(params["train"]) as dist:
        live = open_live() if dist.is_main else None
        result = fit(data, params, checkpoint_path=Path(TRAIN_CHECKPOINT), live=live, dist=dist)
    if not dist.is_main:
        return
    backend = backend_metrics(result.backend)
    backend["world_size"] = dist.world_size
    save_model(
        result.model,
        params["model"],
        MODEL_FILE,
        extra={"training": {"metrics": result.metrics, "backend": backend}},
    )
    # metrics.json: quality and backend only; throughput goes to timing.json.
    live.summary.pop("timing", None)
    live.summary["epochs"] = result.metrics["epochs"]
    live.summary["backend"] = backend
    live.end()
    seconds = time.perf_counter() - start
    write_json(
        TIMING_FILE,
        {**result.timing, "stage_seconds": seconds, **machine_description(result.backend)},
    )
    remove_checkpoint(TRAIN_CHECKPOINT)
    m = result.metrics
    ranks = f" on {dist.world_size} ranks" if dist.enabled else ""
    print(
        f"train: {m['epochs']} epochs with the {backend['backend']} backend in {backend['dtype']}"
        f" on CPU class {backend['cpu_class']}{ranks}: val accuracy {m['val_acc']:.4f}, "
        f"{result.timing['images_per_s_mean']:,.0f} images/s, {seconds:.0f} s -> {MODEL_FILE}"
    )


def open_live() -> Any:
    """dvclive writes reports/train/plots/metrics/** (per-epoch curves) and metrics.json;
    dvc.yaml stays hand-written (dvcyaml=False) and DVC, not dvclive, records experiments."""
    from dvclive import Live  # imports DVC: only when the stage really runs

    return Live(TRAIN_REPORT_DIR, dvcyaml=False, save_dvc_exp=False, report=None)


if __name__ == "__main__":
    run_stage("train", main)

"""Stage train: prepared data -> models/model.pth and reports/train/, published together.

dvclive writes the per-epoch curves into a staging folder; the model file and the whole
reports/train folder replace the previous ones together, only when training finished, so a
failure, Ctrl-C or SIGTERM at any moment leaves the previous model and its reports.
"""

from __future__ import annotations

from fmnist.signals import handle_signals_while_importing

STAGE = "train"
if __name__ == "__main__":  # a script, not a spawned worker's or a test's import
    handle_signals_while_importing(STAGE)  # first: Ctrl-C during the imports below is one line too

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from fmnist.atomic import publishing
from fmnist.checkpoint import remove_checkpoint
from fmnist.constants import MODEL_FILE, PREPARED_FILE, TRAIN_CHECKPOINT, TRAIN_REPORT_DIR
from fmnist.data import load_prepared
from fmnist.distributed import init_from_env, maybe_relaunch_under_torchrun
from fmnist.modelfile import save_model
from fmnist.stage import run_stage
from fmnist.train import fit
from fmnist.train_report import training_record, write_train_reports


def main(params: dict[str, Any]) -> None:
    if maybe_relaunch_under_torchrun(params):  # train.distributed: the ranks did the work
        return
    start = time.perf_counter()
    data = load_prepared(PREPARED_FILE)
    with init_from_env(params["train"]) as dist:
        with publishing() if dist.is_main else nullcontext() as outputs:
            reports = outputs.folder(TRAIN_REPORT_DIR) if dist.is_main else None
            live = open_live(reports) if dist.is_main else None
            result = fit(data, params, checkpoint_path=Path(TRAIN_CHECKPOINT), live=live,
                         dist=dist)
            if not dist.is_main:
                return
            live.end()
            write_train_reports(reports, result, world_size=dist.world_size,
                                stage_seconds=time.perf_counter() - start)
            save_model(result.model, params["model"], outputs.file(MODEL_FILE),
                       extra={"training": training_record(result, dist.world_size)})
    remove_checkpoint(TRAIN_CHECKPOINT)
    m = result.metrics
    backend = training_record(result, dist.world_size)["backend"]
    ranks = f" on {dist.world_size} ranks" if dist.enabled else ""
    print(
        f"train: {m['epochs']} epochs with the {backend['backend']} backend in {backend['dtype']}"
        f" on CPU class {backend['cpu_class']}{ranks}: val accuracy {m['val_acc']:.4f}, "
        f"{result.timing['images_per_s_mean']:,.0f} images/s, "
        f"{time.perf_counter() - start:.0f} s -> {MODEL_FILE}"
    )


def open_live(out_dir: Path) -> Any:
    """dvclive writes the per-epoch curves under out_dir/plots/metrics/; dvc.yaml stays
    hand-written (dvcyaml=False) and DVC, not dvclive, records experiments."""
    from dvclive import Live  # imports DVC: only when the stage really runs

    return Live(str(out_dir), dvcyaml=False, save_dvc_exp=False, report=None)


if __name__ == "__main__":
    run_stage(STAGE, main)

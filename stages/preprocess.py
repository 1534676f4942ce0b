"""preprocess stage: data/raw -> data/prepared/fashion_mnist.h5 (uint8 train/val/test)."""

from fmnist.signals import handle_signals_while_importing

STAGE = "preprocess"
if __name__ == "__main__":  # a script, not a spawned worker's or a test's import
    handle_signals_while_importing(STAGE)  # first: Ctrl-C during the imports below is one line too

from pathlib import Path
from typing import Any

from fmnist.atomic import publish_dir
from fmnist.constants import PREPARED_FILE, RAW_DIR
from fmnist.preprocess import prepare
from fmnist.stage import run_stage


def main(params: dict[str, Any]) -> None:
    cfg = params["preprocess"]
    prepared = Path(PREPARED_FILE)
    with publish_dir(prepared.parent) as staging:
        sizes = prepare(
            RAW_DIR,
            staging / prepared.name,
            val_fraction=cfg["val_fraction"],
            train_subset=cfg["train_subset"],
            seed=params["seed"],
            label_noise=cfg["label_noise"],
        )
    print("preprocess: " + ", ".join(f"{name} {n:,}" for name, n in sizes.items()))


if __name__ == "__main__":
    run_stage(STAGE, main)

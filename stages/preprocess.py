"""preprocess stage: data/raw -> data/prepared/fashion_mnist.h5 (uint8 train/val/test)."""

from typing import Any

from fmnist.constants import PREPARED_FILE, RAW_DIR
from fmnist.preprocess import prepare
from fmnist.stage import run_stage


def main(params: dict[str, Any]) -> None:
    cfg = params["preprocess"]
    sizes = prepare(
        RAW_DIR,
        PREPARED_FILE,
        val_fraction=cfg["val_fraction"],
        train_subset=cfg["train_subset"],
        seed=params["seed"],
    )
    print("preprocess: " + ", ".join(f"{name} {n:,}" for name, n in sizes.items()))


if __name__ == "__main__":
    run_stage("preprocess", main)

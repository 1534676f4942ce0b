"""Stage evaluate: the trained model on the test split -> metrics, plots, figures, report."""

from __future__ import annotations

from fmnist.signals import handle_signals_while_importing

STAGE = "evaluate"
if __name__ == "__main__":  # a script, not a spawned worker's or a test's import
    handle_signals_while_importing(STAGE)  # first: Ctrl-C during the imports below is one line too

import time
from typing import Any

from fmnist.constants import EVALUATE_DIR
from fmnist.evaluate import run
from fmnist.stage import run_stage


def main(params: dict[str, Any]) -> None:
    start = time.perf_counter()
    evaluation = run(params)
    m = evaluation.metrics
    print(
        f"evaluate: {m['n_samples']:,} test images with {evaluation.backend_label}: "
        f"accuracy {m['accuracy']:.4f}, macro F1 {m['f1_macro']:.4f}, "
        f"log loss {m['log_loss']:.4f}, ECE {m['ece']:.4f} ({m['ece_calibrated']:.4f} at "
        f"temperature {m['temperature']:.3g}, fitted on the validation split) "
        f"in {time.perf_counter() - start:.1f} s -> {EVALUATE_DIR}/"
    )


if __name__ == "__main__":
    run_stage(STAGE, main)

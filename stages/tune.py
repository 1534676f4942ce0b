"""Tune stage: search train hyperparameters with Optuna, confirm the best candidates with new
seeds, and report what (if anything) to apply.

It never changes params.yaml or models/: apply the result with the printed `dvc exp run`.
"""

import time

from fmnist.signals import handle_signals_while_importing

STAGE = "tune"
if __name__ == "__main__":  # a script, not a spawned worker's or a test's import
    handle_signals_while_importing(STAGE)  # first: Ctrl-C during the imports below is one line too

from fmnist.stage import run_stage


def main(params: dict) -> None:
    from fmnist.constants import TUNE_DIR
    from fmnist.data import load_prepared
    from fmnist.tune import run_study
    from fmnist.tune_confirm import DEFAULT_LABEL, run_confirmation
    from fmnist.tune_report import exp_run_command, write_reports

    data = load_prepared()
    started = time.perf_counter()
    study = run_study(data, params)
    searched = time.perf_counter()
    confirmation = run_confirmation(data, params, study)
    seconds = {"search": searched - started, "confirm": time.perf_counter() - searched}
    summary = write_reports(study, params, TUNE_DIR, confirmation, seconds)
    print(f"tune: {summary['trials_complete']} complete, {summary['trials_pruned']} pruned, "
          f"{summary['compute_saved_fraction']:.0%} of the epochs saved")
    if confirmation is None:
        print(f"tune: best val_acc {summary['best_val_acc']:.4f} (one run, not confirmed): "
              f"apply with: {summary['command']}")
        return
    print(f"tune: confirmed with seeds {confirmation.seeds}: {confirmation.verdict}")
    if confirmation.beats_default:
        print(f"tune: apply with: {summary['command']}")
    elif confirmation.best.label != DEFAULT_LABEL:
        print(f"tune: to try {confirmation.best.label} anyway: "
              f"{exp_run_command(confirmation.best.values)}")


if __name__ == "__main__":
    run_stage(STAGE, main)

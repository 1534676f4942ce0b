"""Tune stage: search train hyperparameters with Optuna and report the best values.

It never changes params.yaml or models/: apply the result with the printed `dvc exp run`.
"""

from fmnist.stage import run_stage


def main(params: dict) -> None:
    from fmnist.constants import TUNE_DIR
    from fmnist.data import load_prepared
    from fmnist.tune import run_study
    from fmnist.tune_confirm import run_confirmation
    from fmnist.tune_report import write_reports

    data = load_prepared()
    study = run_study(data, params)
    confirmation = run_confirmation(data, params, study)
    summary = write_reports(study, params, TUNE_DIR, confirmation)
    print(f"tune: best val_acc {summary['best_val_acc']:.4f}: {summary['best_params']['train']}; "
          f"{summary['trials_complete']} complete, {summary['trials_pruned']} pruned, "
          f"{summary['compute_saved_fraction']:.0%} of the epochs saved")
    if confirmation is None:
        print(f"tune: apply with: {summary['command']}")
    elif confirmation.beats_default:
        print(f"tune: confirmed with seeds {confirmation.seeds}: {confirmation.verdict}")
        print(f"tune: apply with: {summary['command']}")
    else:
        print(f"tune: confirmed with seeds {confirmation.seeds}: {confirmation.verdict}; "
              f"to try {confirmation.best.label} anyway: {summary['command']}")


if __name__ == "__main__":
    run_stage("tune", main)

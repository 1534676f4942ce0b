"""The search: grid coverage, best values, pruning, resuming and shared workers, on tiny data."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from project_files import write_prepared

from fmnist.accel import cpu_class
from fmnist.constants import CLASS_NAMES, TUNE_STUDY_DIR
from fmnist.data import Prepared, Split
from fmnist.errors import ParamsError
from fmnist.params import load_params
from fmnist.tune import (
    STUDY_DB,
    check_space,
    grid_points,
    make_sampler,
    open_storage,
    run_study,
    storage_url,
    study_name,
    suggest,
)
from fmnist.tune_report import exp_run_command, summary_metrics, write_reports

REPO = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 300
GRID = {"lr": {"choices": [0.05, 0.1]}, "rho": {"choices": [0.0, 0.1]}}


def _split(n: int, seed: int) -> Split:
    """Learnable images: each class is a bright square at its own place, over noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 10
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        images[i, 4 + 12 * row: 12 + 12 * row, 1 + 5 * col: 6 + 5 * col] = 230
    return Split(images=images, labels=labels)


DATA = Prepared(train=_split(300, 0), val=_split(100, 1), test=_split(50, 2),
                class_names=CLASS_NAMES)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny_params(**tune: Any) -> dict[str, Any]:
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["model"].update(channels=[4], convs_per_block=1, hidden=16, dropout=0.0)
    params["train"].update(batch_size=64, threads=1, rho=0.05, lr=0.1)
    params["ipex"].update(enabled=False, dtype="float32")
    params["tune"].update(sampler="random", pruner="none", trials=3, epochs=2,
                          train_subset=200, seed=0, storage=None, workers=1,
                          space={"lr": {"low": 0.02, "high": 0.2, "log": True},
                                 "rho": {"low": 0.0, "high": 0.2},
                                 "batch_size": {"choices": [32, 64]}})
    params["tune"].update(tune)
    return params


def _key(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True)


class PruneOddTrials(optuna.pruners.BasePruner):
    """Prunes trials 1, 3, ... at their first report: a pruning decision known in advance."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number % 2 == 1


def test_grid_sampler_visits_every_point_exactly_once(tmp_path: Path) -> None:
    params = tiny_params(sampler="grid", trials=50, space=GRID)
    study = run_study(DATA, params, study_dir=tmp_path, progress=False)
    visited = sorted(_key(t.params) for t in study.trials)
    assert visited == sorted(_key(p) for p in grid_points(GRID))
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}


def test_best_params_match_the_best_trial(tmp_path: Path) -> None:
    params = tiny_params(trials=3)
    study = run_study(DATA, params, study_dir=tmp_path / "study", progress=False)
    out = tmp_path / "reports"
    summary = write_reports(study, params, out)

    best = max(study.trials, key=lambda t: t.value)
    assert yaml.safe_load((out / "best_params.yaml").read_text()) == {"train": best.params}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_val_acc"] == best.value
    assert summary["command"] == exp_run_command(best.params)
    assert f"-S train.batch_size={best.params['batch_size']}" in summary["command"]
    assert summary["command"] in (out / "report.md").read_text()
    vs_rho = json.loads((out / "plots" / "vs_rho.json").read_text())
    assert [r["rho"] for r in vs_rho] == [t.params["rho"] for t in study.trials]
    history = json.loads((out / "plots" / "history.json").read_text())
    assert history[-1]["best_so_far"] == best.value
    for name in ("history.png", "val_acc_vs_rho.png", "val_acc_vs_lr.png"):
        assert (out / "figures" / name).stat().st_size > 0
    assert len((out / "trials.csv").read_text().splitlines()) == 1 + 3


def test_run_json_says_how_long_each_part_took_and_on_what_machine(tmp_path: Path) -> None:
    params = tiny_params(trials=1)
    study = run_study(DATA, params, study_dir=tmp_path / "study", progress=False)
    write_reports(study, params, tmp_path / "timed", seconds={"search": 1.5, "confirm": 0.25})
    run = json.loads((tmp_path / "timed" / "run.json").read_text())
    assert run["timing"] == {"search_seconds_this_run": 1.5, "confirm_seconds_this_run": 0.25}
    assert run["machine"]["cpu_class"] == cpu_class()
    write_reports(study, params, tmp_path / "untimed")  # a test's or a tool's call: no timings
    assert "timing" not in json.loads((tmp_path / "untimed" / "run.json").read_text())


def test_a_key_outside_the_space_is_plotted_at_its_fixed_value(tmp_path: Path) -> None:
    params = tiny_params(trials=1, space={"lr": {"choices": [0.1]}})
    study = run_study(DATA, params, study_dir=tmp_path / "study", progress=False)
    write_reports(study, params, tmp_path / "reports")
    vs_rho = json.loads((tmp_path / "reports" / "plots" / "vs_rho.json").read_text())
    assert vs_rho == [{"rho": 0.05, "trial": 0, "value": study.trials[0].value}]


def test_a_pruned_trial_is_marked_pruned_and_its_epochs_saved(tmp_path: Path) -> None:
    params = tiny_params(trials=3)
    study = run_study(DATA, params, study_dir=tmp_path, pruner=PruneOddTrials(), progress=False)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert [t.user_attrs["epochs_run"] for t in study.trials] == [2, 1, 2]
    metrics = summary_metrics(study, params)
    assert (metrics["trials_pruned"], metrics["epochs_run"], metrics["epochs_full_search"]) == (
        1, 5, 6)
    assert metrics["compute_saved_fraction"] == pytest.approx(1 / 6)


def test_study_resumes_without_repeating_finished_trials(tmp_path: Path) -> None:
    first = run_study(DATA, tiny_params(sampler="random", trials=2), study_dir=tmp_path,
                      progress=False)
    before = [(t.number, t.params, t.datetime_start) for t in first.trials]
    again = run_study(DATA, tiny_params(sampler="random", trials=4), study_dir=tmp_path,
                      progress=False)
    assert again.study_name == first.study_name
    assert [(t.number, t.params, t.datetime_start) for t in again.trials[:2]] == before
    assert len(again.trials) == 4
    assert _key(again.trials[2].params) != _key(again.trials[0].params)


def test_a_trial_killed_mid_run_is_run_again_on_resume(tmp_path: Path) -> None:
    params = tiny_params(sampler="grid", trials=2, space=GRID)
    study = run_study(DATA, params, study_dir=tmp_path, progress=False)
    # A worker killed mid-trial leaves it RUNNING with its grid point taken.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "heartbeat ... used with optimize"
        abandoned = optuna.load_study(study_name=study.study_name,
                                      storage=open_storage(storage_url(None, tmp_path)),
                                      sampler=make_sampler(params["tune"], 0)).ask()
    suggest(abandoned, GRID)

    study = run_study(DATA, tiny_params(sampler="grid", trials=4, space=GRID),
                      study_dir=tmp_path, progress=False)
    assert study.trials[abandoned.number].state == TrialState.FAIL
    complete = sorted(_key(t.params) for t in study.trials if t.state == TrialState.COMPLETE)
    assert complete == sorted(_key(p) for p in grid_points(GRID))


def test_changed_params_start_a_new_study_budget_changes_do_not() -> None:
    params = tiny_params()
    name = study_name(params, DATA)
    assert study_name(tiny_params(trials=9, workers=2, storage="sqlite:///x.db"), DATA) == name
    assert study_name(tiny_params(epochs=3), DATA) != name
    changed = tiny_params()
    changed["train"]["momentum"] = 0.8
    assert study_name(changed, DATA) != name
    other_data = Prepared(train=_split(300, 5), val=DATA.val, test=DATA.test,
                          class_names=CLASS_NAMES)
    assert study_name(params, other_data) != name


def test_editing_the_code_a_trial_runs_starts_a_new_study(tmp_path: Path, edit_source) -> None:
    params = tiny_params(sampler="grid", trials=2, space={"lr": {"choices": [0.05, 0.1]}})
    first = run_study(DATA, params, study_dir=tmp_path, progress=False)
    again = run_study(DATA, params, study_dir=tmp_path, progress=False)
    assert again.study_name == first.study_name  # same code: resumed, nothing new to run
    edit_source("sam.py")
    edited = run_study(DATA, params, study_dir=tmp_path, progress=False)
    assert edited.study_name != first.study_name
    assert sum(t.state == TrialState.COMPLETE for t in edited.trials) == 2
    edit_source("figures.py")  # a module no trial imports
    assert study_name(params, DATA) == edited.study_name


def test_a_combination_invalid_together_is_refused_before_training(tmp_path: Path) -> None:
    params = tiny_params(space={"nesterov": {"choices": [False, True]},
                                "momentum": {"choices": [0.9, 0.0]}})
    params["train"].update(nesterov=False, momentum=0.9)
    with pytest.raises(ParamsError, match=r"combination momentum=0.0, nesterov=True"):
        run_study(DATA, params, study_dir=tmp_path, progress=False)
    assert not (tmp_path / "optuna.db").exists() or not optuna.get_all_study_summaries(
        storage_url(None, tmp_path))


def test_a_whole_float_bound_of_an_integer_key_is_refused_with_the_integer_to_write() -> None:
    params = tiny_params(space={"batch_size": {"low": 32.0, "high": 64}})
    with pytest.raises(ParamsError, match=r"tune\.space\.batch_size\.low: batch_size needs an "
                                          r"integer \(a whole number: write 32\)$"):
        check_space(params)


@pytest.mark.parametrize(("choices", "refused"), [([64, 0], "0"), ([64.0], "64.0")],
                         ids=["out-of-range", "whole-float"])
def test_a_choice_outside_the_train_schema_is_refused_before_training(
    tmp_path: Path, choices: list[Any], refused: str
) -> None:
    # 64.0 passed the schema once (JSON Schema's integer) and failed a trial with a TypeError
    params = tiny_params(space={"batch_size": {"choices": choices}})
    with pytest.raises(ParamsError, match=rf"tune\.space\.batch_size: value {refused} "):
        run_study(DATA, params, study_dir=tmp_path, progress=False)


def test_two_worker_processes_share_the_grid_without_duplicates(tmp_path: Path) -> None:
    # Twelve points: enough work that the later-starting worker still finds some left.
    space = {"lr": {"choices": [0.03, 0.05, 0.1]}, "rho": {"choices": [0.0, 0.1]},
             "batch_size": {"choices": [32, 64]}}
    params = tiny_params(sampler="grid", trials=50, space=space, workers=2)
    study = run_study(DATA, params, study_dir=tmp_path, progress=False)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(_key(t.params) for t in complete) == sorted(_key(p) for p in grid_points(space))
    assert len({t.user_attrs["worker"] for t in complete}) == 2


def _tune_worker(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fmnist.cli", "tune-worker", *args], cwd=root,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=WORKER_TIMEOUT_S)


def test_a_worker_started_from_the_command_line_joins_the_stage_study(tmp_path: Path) -> None:
    """`fmnist tune-worker` (another machine's worker): from a project root it finds the
    stage's study, runs the trials a raised budget adds, and refuses a study of other params."""
    write_prepared(tmp_path, DATA)
    params = tiny_params(trials=1)
    first = run_study(DATA, params, study_dir=tmp_path / TUNE_STUDY_DIR, progress=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(trials=3)))

    url = storage_url(None, tmp_path / TUNE_STUDY_DIR)
    joined = _tune_worker(tmp_path, "--storage", url, "--study", first.study_name)
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert f"tune: worker on study {first.study_name}" in joined.stdout
    study = optuna.load_study(study_name=first.study_name, storage=url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    workers = [t.user_attrs["worker"] for t in study.trials]
    assert workers[1] == workers[2] != workers[0]  # the new process ran both new trials

    # params.yaml edited since (another study name): a refused --study adds no study of its own
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(trials=3, seed=1)))
    absent = _tune_worker(tmp_path, "--study", "fmnist-000000000000")
    assert absent.returncode == 1
    assert absent.stderr.strip().splitlines() == [
        f"tune: study fmnist-000000000000: not in {url} (it holds: {first.study_name})"]
    assert optuna.get_all_study_names(url) == [first.study_name]
    refused = _tune_worker(tmp_path, "--study", first.study_name)
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1
    assert refused.stderr.startswith(f"tune: study {first.study_name}: params.yaml or the "
                                     "prepared data differ from it (they give fmnist-")
    assert optuna.get_all_study_names(url) == [first.study_name]


def test_a_study_asked_for_where_no_tune_ran_leaves_no_database_behind(tmp_path: Path) -> None:
    write_prepared(tmp_path, DATA)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(trials=1)))
    absent = _tune_worker(tmp_path, "--study", "fmnist-000000000000")
    assert absent.returncode == 1
    database = (tmp_path / TUNE_STUDY_DIR).resolve() / STUDY_DB
    assert absent.stderr.strip().splitlines() == [
        f"tune: study fmnist-000000000000: no study here yet ({database} does not exist; the "
        "tune stage creates it)"]
    assert not (tmp_path / TUNE_STUDY_DIR).exists()


# --- confirmation of the best with new seeds ----------------------------------------------------


def test_paired_interval_matches_a_hand_computation() -> None:
    from fmnist.tune_confirm import paired_interval

    # diffs 0.01, 0.03: mean 0.02, sd 0.0141421, t(0.975, 1) = 12.7062
    lo, hi = paired_interval([0.01, 0.03])
    half = 12.7062047 * 0.0141421356 / 2**0.5
    assert lo == pytest.approx(0.02 - half, abs=1e-6) and hi == pytest.approx(0.02 + half, abs=1e-6)
    # picked as the best of 2 candidates: t(1 - 0.025 / 2, 1) = 25.4517
    lo2, _ = paired_interval([0.01, 0.03], comparisons=2)
    assert lo2 == pytest.approx(0.02 - 25.4516986 * 0.0141421356 / 2**0.5, abs=1e-6)


def test_two_seeds_that_agree_exactly_are_not_a_zero_width_interval() -> None:
    from fmnist.tune_confirm import paired_interval

    lo, hi = paired_interval([1 / 6000, 1 / 6000], resolution=1 / 6000)
    assert lo < 0 < hi  # one validation image of spread: no "beyond noise" from two ties


def test_verdict_says_plainly_whether_the_best_beats_the_default() -> None:
    from fmnist.tune_confirm import DEFAULT_LABEL, Candidate, verdict_of

    trial = Candidate(label="trial 3", values={"lr": 0.2}, val_acc=[0.9, 0.91])
    default = Candidate(label=DEFAULT_LABEL, values={"lr": 0.1}, val_acc=[0.9, 0.9])
    assert "beats the default beyond seed noise" in verdict_of(trial, (0.001, 0.02))
    assert "within seed noise" in verdict_of(trial, (-0.01, 0.02))
    assert "keep params.yaml" in verdict_of(default, (0.0, 0.0))


def test_confirmation_reruns_the_top_distinct_trials_and_the_default_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fmnist import train as train_module
    from fmnist.tune_confirm import DEFAULT_LABEL, run_confirmation

    params = tiny_params(trials=3, confirm={"candidates": 2, "seeds": 2})
    study = run_study(DATA, params, study_dir=tmp_path, progress=False)
    first = run_confirmation(DATA, params, study, progress=False)
    assert first is not None and first.seeds == [params["seed"] + 1, params["seed"] + 2]
    labels = [c.label for c in first.candidates]
    assert labels[0] == DEFAULT_LABEL and len(labels) == 3
    assert first.candidates[0].values == {k: params["train"][k] for k in sorted(GRID_KEYS)}
    assert all(len(c.val_acc) == 2 for c in first.candidates)
    assert first.best.mean == max(c.mean for c in first.candidates)
    # best_params.yaml names params.yaml unless the winner beats it beyond noise
    out = tmp_path / "reports"
    write_reports(study, params, out, first)
    saved = yaml.safe_load((out / "best_params.yaml").read_text())
    named = first.best.values if first.beats_default else first.candidates[0].values
    assert saved["train"] == named and saved["best_candidate"]["train"] == first.best.values
    assert saved["confirmation"]["verdict"] == first.verdict
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_val_acc"] == pytest.approx(
        (first.best if first.beats_default else first.candidates[0]).mean)
    # every run is stored in the study: a second confirmation trains nothing
    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a stored confirmation run was trained again")

    monkeypatch.setattr(train_module, "fit", no_training)
    again = run_confirmation(DATA, params, study, progress=False)
    assert again == first


GRID_KEYS = ("lr", "rho", "batch_size")


def test_budget_line_counts_trials_and_confirmation_in_train_stage_runs() -> None:
    from fmnist.tune import budget_line

    params = tiny_params(trials=8, epochs=None, confirm={"candidates": 2, "seeds": 2},
                         pruner="successive_halving")
    params["train"]["epochs"] = 16
    # a train-stage run: 16 x (54,000 + 6,000 / 3) image-equivalents; a trial scores
    # validation at its rungs (4, 12) and the last epoch, a confirmation run at the last only:
    # (8 x (16 x 4,000 + 3 x 2,000) + 6 x (16 x 4,000 + 2,000)) / (16 x 56,000) = 1.07
    line = budget_line(params, 4000, 54000, 6000)
    assert "8 trials of up to 16 epochs" in line and "6 confirmation runs" in line
    assert "about 1.1 train-stage runs before pruning" in line and "pruning stops" in line
    params["tune"]["pruner"] = "none"
    assert "(no pruning)" in budget_line(params, 4000, 54000, 6000)
    # a warm-up as long as the horizon leaves no rung before the last epoch
    params["tune"]["pruner"] = "successive_halving"
    params["train"]["schedule"].update(name="onecycle", pct_start=0.99)
    assert "(no pruning)" in budget_line(params, 4000, 54000, 6000)


# --- pruning rungs and the candidates they leave --------------------------------------------------


def test_the_first_rung_is_the_end_of_the_one_cycle_warm_up() -> None:
    from fmnist.tune import make_pruner

    params = tiny_params(pruner="successive_halving", epochs=16)
    params["train"]["schedule"].update(name="onecycle", pct_start=0.25)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(params))
    for _ in range(3):
        good = study.ask()
        for epoch in range(1, 17):
            good.report(0.9, epoch)
            good.should_prune()
        study.tell(good, 0.9)
    poor = study.ask()
    decisions = []
    for epoch in range(1, 5):
        poor.report(0.5, epoch)
        decisions.append(poor.should_prune())
    # still warming up at epochs 1-3: nothing is judged before the peak learning rate
    assert decisions == [False, False, False, True]


def _finished(study: optuna.Study, lr: float, curve: list[float], pruned: bool) -> None:
    distributions = {"lr": optuna.distributions.FloatDistribution(0.01, 0.3, log=True)}
    study.add_trial(optuna.trial.create_trial(
        params={"lr": lr}, distributions=distributions,
        state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
        value=None if pruned else curve[-1],
        intermediate_values={epoch: v for epoch, v in enumerate(curve, start=1)},
        user_attrs={"epochs_run": len(curve)}))


def test_candidates_are_the_trials_run_furthest_then_the_best_where_they_stopped() -> None:
    from fmnist.tune_confirm import top_trials, trial_label

    study = optuna.create_study(direction="maximize")
    _finished(study, 0.03, [0.80, 0.85, 0.90, 0.91], pruned=False)   # 0: ran to the end
    _finished(study, 0.10, [0.80, 0.86], pruned=True)                # 1: stopped at 2
    _finished(study, 0.20, [0.90, 0.95], pruned=True)                # 2: stopped at 2, best there
    _finished(study, 0.05, [0.99], pruned=True)                      # 3: stopped at 1
    _finished(study, 0.20, [0.70, 0.94], pruned=True)                # 4: trial 2's values again
    assert [t.number for t in top_trials(study, 3)] == [0, 2, 1]
    assert [t.number for t in top_trials(study, 3, exclude={"lr": 0.03})] == [2, 1, 3]
    assert top_trials(study, 0) == []
    assert [trial_label(t, 4) for t in top_trials(study, 2)] == [
        "trial 0", "trial 2 (stopped at epoch 2)"]


def test_a_confirmation_with_few_finished_trials_still_confirms_the_candidates_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fmnist import train as train_module
    from fmnist.tune_confirm import DEFAULT_LABEL, run_confirmation

    params = tiny_params(trials=2, confirm={"candidates": 2, "seeds": 2})
    study = run_study(DATA, params, study_dir=tmp_path, pruner=PruneOddTrials(), progress=False)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    real_fit, histories = train_module.fit, []

    def recording_fit(*args: Any, **kwargs: Any) -> Any:
        result = real_fit(*args, **kwargs)
        histories.append(result.history)
        return result

    monkeypatch.setattr(train_module, "fit", recording_fit)
    confirmation = run_confirmation(DATA, params, study, progress=False)
    assert confirmation is not None
    # a confirmation run uses its last epoch's score only, and scores no other
    assert len(histories) == 6 and all(
        [np.isnan(e["val_acc"]) for e in h] == [True, False] for h in histories)
    assert [c.label for c in confirmation.candidates] == [
        DEFAULT_LABEL, "trial 0", "trial 1 (stopped at epoch 1)"]
    write_reports(study, params, tmp_path / "reports", confirmation)
    report = (tmp_path / "reports" / "report.md").read_text()
    assert "| trial 1 (stopped at epoch 1) |" in report
    table = report[report.index("## Top"):]
    assert [line.split("|")[1].strip() for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| trial")] == ["0", "1"]


def test_trials_score_validation_only_at_their_rungs_and_the_real_pruner_stops_them_there(
    tmp_path: Path
) -> None:
    params = tiny_params(trials=4, epochs=4, pruner="successive_halving")
    params["train"]["schedule"].update(name="onecycle", pct_start=0.5)  # first rung: epoch 2
    study = run_study(DATA, params, study_dir=tmp_path, progress=False)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, "these seeds prune trial 3 at the rung"
    for t in study.trials:
        ran = t.user_attrs["epochs_run"]
        assert (ran, sorted(t.intermediate_values)) == ((2, [2]) if t in pruned else (4, [2, 4]))
    assert all(t.value == t.intermediate_values[4] for t in study.trials if t not in pruned)

"""Name a best only after running it again: the search's top candidates and the current
params.yaml values are each trained with `tune.confirm.seeds` new seeds at the full horizon,
and the best is compared with the default seed by seed, with a 95% t interval.

A search's best trial is the luckiest of many noisy runs (a 6,000-image validation split has a
standard error of about 0.3 points); re-running it with other seeds is what tells a real gain
from the winner's curse. Every finished run is stored in the study at once, so an interrupted
confirmation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState
from scipy import stats

from fmnist.tune import horizon, trial_params

ATTR_PREFIX = "confirm:"
DEFAULT_LABEL = "params.yaml"


@dataclass(frozen=True)
class Candidate:
    label: str  # "params.yaml", "trial N" or "trial N (stopped at epoch E)"
    values: dict[str, Any]
    val_acc: list[float]  # one per confirmation seed, in seed order

    @property
    def mean(self) -> float:
        return float(np.mean(self.val_acc))


@dataclass(frozen=True)
class Confirmation:
    seeds: list[int]
    candidates: list[Candidate]  # the default first
    best: Candidate
    diff_mean: float  # best - default, mean over seeds
    diff_ci95: tuple[float, float]
    verdict: str

    @property
    def beats_default(self) -> bool:
        return self.best.label != DEFAULT_LABEL and self.diff_ci95[0] > 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "seeds": self.seeds,
            "candidates": [
                {"label": c.label, "values": c.values, "val_acc": c.val_acc,
                 "val_acc_mean": round(c.mean, 6)}
                for c in self.candidates
            ],
            "best": self.best.label,
            "best_minus_default": {"mean": round(self.diff_mean, 6),
                                   "ci95": [round(x, 6) for x in self.diff_ci95]},
            "verdict": self.verdict,
        }


def _store_key(values: dict[str, Any], seed: int) -> str:
    """A short study attribute key (RDB storages cap keys at 512 characters)."""
    text = json.dumps({"values": values, "seed": seed}, sort_keys=True)
    return ATTR_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:32]


def confirm_seeds(params: dict[str, Any]) -> list[int]:
    """New seeds, never the search's own: params seed + 1, + 2, ..."""
    return [params["seed"] + 1 + i for i in range(params["tune"]["confirm"]["seeds"])]


def furthest(trial: FrozenTrial) -> tuple[int, float]:
    """(epochs a trial ran, its validation accuracy then): a finished trial at its last
    epoch, a pruned one at the rung that stopped it."""
    if not trial.intermediate_values:
        return (0, trial.value if trial.value is not None else -math.inf)
    epoch = max(trial.intermediate_values)
    return (epoch, trial.intermediate_values[epoch])


def ranked_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Complete and pruned trials, the furthest-run first, then by validation accuracy there
    (ties: earlier first). Successive halving lets about one trial in 3^rungs finish, so the
    candidates cannot be the finished trials alone: the ones the pruner kept longest come next,
    compared where they stopped."""
    trials = [t for t in study.get_trials(deepcopy=False,
                                          states=(TrialState.COMPLETE, TrialState.PRUNED))
              if not t.user_attrs.get("surplus")]
    return sorted(trials, key=lambda t: (-furthest(t)[0], -furthest(t)[1], t.number))


def top_trials(study: optuna.Study, k: int,
               exclude: dict[str, Any] | None = None) -> list[FrozenTrial]:
    """The k best trials (`ranked_trials`) with distinct values other than `exclude` (the
    default's)."""
    chosen: list[FrozenTrial] = []
    for t in ranked_trials(study):
        if len(chosen) == k:
            break
        if t.params != exclude and all(t.params != c.params for c in chosen):
            chosen.append(t)
    return chosen


def trial_label(trial: FrozenTrial, epochs: int) -> str:
    """"trial 3", or "trial 5 (stopped at epoch 12)" for a pruned one."""
    ran = furthest(trial)[0]
    return f"trial {trial.number}" if ran >= epochs else \
        f"trial {trial.number} (stopped at epoch {ran})"


def paired_interval(diffs: list[float], *, comparisons: int = 1,
                    resolution: float = 0.0) -> tuple[float, float]:
    """95% t interval of the mean of paired differences (one per seed), Bonferroni-widened
    for `comparisons` candidates (the best was picked among them on these same seeds), with
    the spread floored at `resolution` (one validation image): two seeds that happen to agree
    exactly are not a zero-width interval."""
    n = len(diffs)
    mean = float(np.mean(diffs))
    if n < 2:
        return (-math.inf, math.inf)
    quantile = float(stats.t.ppf(1 - 0.025 / max(1, comparisons), n - 1))
    spread = max(float(np.std(diffs, ddof=1)), resolution)
    half = quantile * spread / math.sqrt(n)
    return (mean - half, mean + half)


def verdict_of(best: Candidate, interval: tuple[float, float]) -> str:
    if best.label == DEFAULT_LABEL:
        return "the default is the best candidate: keep params.yaml"
    if interval[0] > 0:
        return "the best beats the default beyond seed noise (95% interval above 0)"
    return ("the default is within seed noise of the best (95% interval includes 0): "
            "keep params.yaml")


def run_confirmation(data: Any, params: dict[str, Any], study: optuna.Study, *,
                     progress: bool = True) -> Confirmation | None:
    """Train every candidate with every confirmation seed (resuming from the study's store)
    and compare; None when tune.confirm.candidates is 0."""
    from fmnist.train import fit  # heavy; only when confirming

    tune = params["tune"]
    k = tune["confirm"]["candidates"]
    if k == 0:
        return None
    seeds = confirm_seeds(params)
    default = {key: params["train"][key] for key in sorted(tune["space"])}
    entries = [(DEFAULT_LABEL, default)]
    entries += [(trial_label(t, horizon(params)), dict(sorted(t.params.items())))
                for t in top_trials(study, k, exclude=default)]
    stored = study.user_attrs
    candidates = []
    for label, values in entries:
        accs = []
        for seed in seeds:
            key = _store_key(values, seed)
            if key not in stored:
                run = trial_params(params, values)
                run["seed"] = seed
                result = fit(data, run, train_subset=tune["train_subset"], progress=False,
                             scored_epochs=())  # only the last epoch's score is used
                study.set_user_attr(key, {"values": values, "seed": seed,
                                          "val_acc": float(result.metrics["val_acc"])})
                stored = study.user_attrs
                if progress:
                    print(f"tune: confirm {label} seed {seed}: val_acc "
                          f"{stored[key]['val_acc']:.4f} ({horizon(params)} epochs)", flush=True)
            accs.append(float(stored[key]["val_acc"]))
        candidates.append(Candidate(label=label, values=values, val_acc=accs))
    best = max(candidates, key=lambda c: (c.mean, c.label == DEFAULT_LABEL))
    diffs = [b - d for b, d in zip(best.val_acc, candidates[0].val_acc, strict=True)]
    interval = paired_interval(diffs, comparisons=len(candidates) - 1,
                               resolution=1 / len(data.val.labels))
    return Confirmation(seeds=seeds, candidates=candidates, best=best,
                        diff_mean=float(np.mean(diffs)), diff_ci95=interval,
                        verdict=verdict_of(best, interval))

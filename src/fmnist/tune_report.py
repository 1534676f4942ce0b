"""What a finished search leaves behind: the trials table, the best values under their
params.yaml keys, the `dvc exp run` command that applies them, metrics, plot data and figures."""

from __future__ import annotations

import csv
import io
import shlex
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from fmnist.accel import machine_description, select_backend
from fmnist.atomic import atomic_path, publish_dir, write_json, write_text
from fmnist.constants import TUNE_DIR
from fmnist.errors import FmnistError
from fmnist.tune import horizon, rungs
from fmnist.tune_confirm import Confirmation, furthest, ranked_trials

TOP_TRIALS = 10


def reported_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Every trial by number, less the bookkeeping ones a worker gave up before training."""
    trials = study.get_trials(deepcopy=False)
    return sorted((t for t in trials if not t.user_attrs.get("surplus")), key=lambda t: t.number)


def best_trial(study: optuna.Study) -> FrozenTrial:
    complete = [t for t in reported_trials(study) if t.state == TrialState.COMPLETE]
    if not complete:
        raise FmnistError(f"tune: study {study.study_name}: no trial completed "
                          "(all pruned or failed); raise tune.trials or use tune.pruner: none")
    # Highest value; the earliest trial wins a tie, so the choice does not depend on timing.
    return max(complete, key=lambda t: (t.value, -t.number))


def best_params(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """The best trial's values under their params.yaml keys: {"train": {...}}."""
    return {"train": dict(sorted(best_trial(study).params.items()))}


def yaml_scalar(value: Any) -> str:
    """A value as DVC's `-S` (YAML 1.1) reads it back: 1e-05 must be written 1.0e-05."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"
        return text
    return str(value)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else yaml_scalar(value)


def exp_run_command(values: dict[str, Any]) -> str:
    """`dvc exp run -S train.KEY=VALUE ...`: reruns train, evaluate and export with them."""
    args = [shlex.quote(f"train.{key}={yaml_scalar(values[key])}") for key in sorted(values)]
    return "dvc exp run " + " ".join(f"-S {arg}" for arg in args)


def summary_metrics(study: optuna.Study, params: dict[str, Any]) -> dict[str, Any]:
    """Quality of the search and the compute pruning saved (no timings: they vary run to run)."""
    trials = reported_trials(study)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    run = sum(int(t.user_attrs.get("epochs_run", 0)) for t in finished)
    full = len(finished) * horizon(params)
    return {
        "best_val_acc": best_trial(study).value,
        "trials_complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "trials_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "epochs_run": run,
        "epochs_full_search": full,
        "compute_saved_fraction": 1.0 - run / full if full else 0.0,
    }


def trials_csv(study: optuna.Study) -> str:
    """number, one column per searched key, state, value, duration_s, epochs_run."""
    trials = reported_trials(study)
    keys = sorted({k for t in trials for k in t.params})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["number", *keys, "state", "value", "duration_s", "epochs_run"])
    for t in trials:
        # A failed trial's end is when a later run found it dead: its span means nothing.
        ran = t.duration is not None and t.state != TrialState.FAIL
        duration = t.duration.total_seconds() if ran else None
        writer.writerow([
            t.number, *(t.params.get(k, "") for k in keys), t.state.name,
            "" if t.value is None else t.value,
            "" if duration is None else f"{duration:.2f}", t.user_attrs.get("epochs_run", 0),
        ])
    return out.getvalue()


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in reported_trials(study) if t.state == TrialState.COMPLETE]


def history_records(study: optuna.Study) -> list[dict[str, Any]]:
    """{trial, value, best_so_far} for each complete trial, in trial order."""
    records, best = [], None
    for t in _complete(study):
        best = t.value if best is None else max(best, t.value)
        records.append({"trial": t.number, "value": t.value, "best_so_far": best})
    return records


def versus_records(study: optuna.Study, params: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """{key, value, trial} per complete trial; a key outside the space shows its fixed value."""
    fixed = params["train"][key]
    return [{key: t.params.get(key, fixed), "value": t.value, "trial": t.number}
            for t in _complete(study)]


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})


def write_figures(study: optuna.Study, params: dict[str, Any], out_dir: Path) -> None:
    """history.png, val_acc_vs_rho.png, val_acc_vs_lr.png (log x); no pyplot global state."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    history = history_records(study)
    pruned = [t for t in reported_trials(study)
              if t.state == TrialState.PRUNED and t.value is not None]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot([r["trial"] for r in history], [r["value"] for r in history], "o",
            label="complete trial")
    if pruned:
        ax.plot([t.number for t in pruned], [t.value for t in pruned], "x", color="grey",
                label="pruned (val acc when stopped)")
    ax.step([r["trial"] for r in history], [r["best_so_far"] for r in history], where="post",
            color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel="validation accuracy", title="Optimization history")
    ax.legend(loc="best")
    _save(fig, out_dir / "history.png")

    for key, log in (("rho", False), ("lr", True)):
        records = versus_records(study, params, key)
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        ax.scatter([r[key] for r in records], [r["value"] for r in records])
        for r in records:
            ax.annotate(str(r["trial"]), (r[key], r["value"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        fixed = "" if key in params["tune"]["space"] else " (fixed, not searched)"
        ax.set(xlabel=key + fixed, ylabel="validation accuracy",
               title=f"Validation accuracy vs {key}")
        _save(fig, out_dir / f"val_acc_vs_{key}.png")


def report_markdown(study: optuna.Study, params: dict[str, Any], metrics: dict[str, Any],
                    command: str, confirmation: Confirmation | None = None) -> str:
    tune = params["tune"]
    best = best_trial(study)
    named = best.params if confirmation is None else (
        confirmation.best.values if confirmation.beats_default else None)
    subset = (f"{tune['train_subset']} training images (stratified)" if tune["train_subset"]
              else "the whole training split")
    lines = [
        "# Hyperparameter search",
        "",
        f"Study `{study.study_name}`: sampler `{tune['sampler']}`, pruner `{tune['pruner']}`"
        f"{rung_note(params)}, "
        f"{horizon(params)} epochs per trial run to the end (pruned ones stop earlier) on "
        f"{subset}; "
        "objective: validation accuracy after the last epoch. The test split is never used.",
        "",
        "| | |",
        "|---|---|",
        f"| the search's best validation accuracy (one run) | {best.value:.4f} "
        f"(trial {best.number}) |",
        f"| trials complete / pruned | {metrics['trials_complete']} / {metrics['trials_pruned']} |",
        f"| epochs run / without pruning | {metrics['epochs_run']} / "
        f"{metrics['epochs_full_search']} ({metrics['compute_saved_fraction']:.0%} saved) |",
        "",
        *confirmation_lines(confirmation),
        *named_best_lines(named, params, command),
        "",
        f"## Top {TOP_TRIALS} trials",
        "",
        "The furthest-run first (the confirmation draws its candidates in this order), then by "
        "validation accuracy at the last epoch a trial ran:",
        "",
    ]
    keys = sorted(best.params)
    lines += ["| trial | " + " | ".join(keys) + " | epochs | val acc |",
              "|---" * (len(keys) + 3) + "|"]
    for t in ranked_trials(study)[:TOP_TRIALS]:
        cells = " | ".join(_short(t.params.get(k, "")) for k in keys)
        epochs, value = furthest(t)
        lines.append(f"| {t.number} | {cells} | {epochs} | {value:.4f} |")
    lines += ["", "All trials: `trials.csv`; figures: `figures/`.", ""]
    return "\n".join(lines)


def rung_note(params: dict[str, Any]) -> str:
    """" (rungs at epochs 4, 12)" for successive halving and hyperband (its brackets' rungs
    are among these), else nothing."""
    if params["tune"]["pruner"] not in ("successive_halving", "hyperband") or not rungs(params):
        return ""
    return " (rungs at epochs " + ", ".join(str(r) for r in rungs(params)) + ")"


def named_best_lines(named: dict[str, Any] | None, params: dict[str, Any],
                     command: str) -> list[str]:
    """The values to apply and the command, or plainly that there is nothing to apply."""
    if named is None:
        return ["Nothing to apply: params.yaml stays.", ""]
    return [
        "## Best values",
        "",
        "| key | best | params.yaml now |",
        "|---|---|---|",
        *(f"| train.{k} | {_short(v)} | {_short(params['train'][k])} |"
          for k, v in sorted(named.items())),
        "",
        "Apply them (reruns train, evaluate and export; the search itself is not rerun):",
        "",
        "```",
        command,
        "```",
    ]


def confirmation_lines(confirmation: Confirmation | None) -> list[str]:
    """The confirmation table and its verdict, said plainly."""
    if confirmation is None:
        return ["Not confirmed with other seeds (tune.confirm.candidates: 0): the best trial "
                "is one noisy run.", ""]
    seeds = ", ".join(str(s) for s in confirmation.seeds)
    lines = [
        "## Confirmation with new seeds",
        "",
        f"Each candidate trained again with seeds {seeds}, at the full horizon. The interval "
        "covers seed noise on the same validation split, widened (Bonferroni) for picking the "
        "best among the candidates on these seeds:",
        "",
        "| candidate | values | val acc per seed | mean |",
        "|---|---|---|---:|",
    ]
    for c in confirmation.candidates:
        values = ", ".join(f"{k}={_short(v)}" for k, v in c.values.items())
        accs = ", ".join(f"{a:.4f}" for a in c.val_acc)
        lines.append(f"| {c.label} | {values} | {accs} | {c.mean:.4f} |")
    lo, hi = confirmation.diff_ci95
    lines += [
        "",
        f"Best: **{confirmation.best.label}**; best minus params.yaml: "
        f"{confirmation.diff_mean:+.4f} (95% interval {lo:+.4f} to {hi:+.4f}). "
        f"Verdict: {confirmation.verdict}.",
        "",
    ]
    return lines


def write_reports(study: optuna.Study, params: dict[str, Any],
                  out_dir: str | Path = TUNE_DIR,
                  confirmation: Confirmation | None = None,
                  seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """Publish every tune output at once; returns the summary plus the `dvc exp run` command.

    metrics.json holds the one number to compare (the best validation accuracy); the search's
    bookkeeping (trials, pruning, compute saved), the confirmation and, with `seconds` (what
    each part took in this run: a resumed search's earlier trials are not in it), the machine
    that timed them go to run.json. With a confirmation, the best named is the confirmed one,
    and best_params.yaml carries its interval against params.yaml.
    """
    best = best_params(study)
    summary = summary_metrics(study, params)
    if confirmation is not None:
        # Named best: the confirmed winner if it beats params.yaml beyond noise, else params.yaml
        # itself (the winner is kept as `best_candidate`, for whoever wants to try it).
        chosen = confirmation.best if confirmation.beats_default else confirmation.candidates[0]
        best = {"train": dict(chosen.values), "confirmation": confirmation.as_dict(),
                "best_candidate": {"label": confirmation.best.label,
                                   "train": dict(confirmation.best.values)}}
        summary["search_best_val_acc"] = summary["best_val_acc"]
        summary["best_val_acc"] = chosen.mean  # over the confirmation seeds, not one lucky run
        summary["confirmation"] = confirmation.as_dict()
    command = exp_run_command(best["train"])
    with publish_dir(out_dir) as staging:
        write_text(staging / "trials.csv", trials_csv(study))
        write_text(staging / "best_params.yaml", yaml.safe_dump(best, sort_keys=True))
        write_json(staging / "metrics.json", {"best_val_acc": summary["best_val_acc"]})
        run = {k: v for k, v in summary.items() if k != "best_val_acc"}
        if seconds is not None:
            run["timing"] = {f"{part}_seconds_this_run": value for part, value in seconds.items()}
            backend = select_backend(params["ipex"], params["train"]["device"])
            # threads: the confirmation's; the search's workers split the cores between them
            run["machine"] = {**machine_description(backend),
                              "search_workers": params["tune"]["workers"]}
        write_json(staging / "run.json", run)
        write_json(staging / "plots" / "history.json", history_records(study))
        for key in ("rho", "lr"):
            write_json(staging / "plots" / f"vs_{key}.json", versus_records(study, params, key))
        write_figures(study, params, staging / "figures")
        write_text(staging / "report.md",
                   report_markdown(study, params, summary, command, confirmation))
    return {**summary, "command": command, "best_params": best}

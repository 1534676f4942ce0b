"""Hyperparameter search with Optuna: each trial is one short `fit` on a stratified training
subset, scored on the validation split (never the test split), and stored in a database so an
interrupted search resumes and several worker processes, on one machine or many, share it.

Start more workers on the same study (from the repository root, same params.yaml and data):
    fmnist tune-worker --storage URL [--study NAME]
(`python -m fmnist.tune worker` is the same without handling a signal during its imports.)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import socket
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from fmnist.accel import runtime_identity, select_backend
from fmnist.constants import TUNE_STUDY_DIR
from fmnist.errors import FmnistError, ParamsError, first_line
from fmnist.params import is_integer, number_hint, schema, validate
from fmnist.sources import code_digest
from fmnist.train import fit

if TYPE_CHECKING:
    from fmnist.data import Prepared

# Bump when the objective changes meaning: old studies then stop being resumed.
STUDY_FORMAT = 1
STUDY_DB = "optuna.db"
# The tune section's budget and plumbing keys: they do not change what a trial computes.
NOT_STUDY_KEYS = ("trials", "workers", "storage", "confirm")
# train keys that a trial sets itself, whatever params.yaml says.
TRIAL_SET_KEYS = ("epochs", "distributed", "sam_sync_first_step")
# A worker that dies (kill -9, power loss) leaves a RUNNING trial; heartbeats let other workers
# mark it failed after the grace period, so its slot (and grid point) is run again.
# The grace is long: a worker starved of CPU must not be declared dead while it trains.
HEARTBEAT_S = 30
GRACE_S = 300
SQLITE_TIMEOUT_S = 120
ACTIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
FINISHED_OK = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_COMBINATIONS = 4096
# Successive halving keeps the best third of the trials at each rung.
REDUCTION_FACTOR = 3


class _Surplus(Exception):
    """Raised by a trial created after the study already had its budget (a race between workers)."""


# --- search space -----------------------------------------------------------------------------


def _is_int_key(key: str) -> bool:
    return schema()["properties"]["train"]["properties"][key].get("type") == "integer"


def check_space(params: dict[str, Any]) -> None:
    """Fail before any training if a value the search can pick makes invalid train params."""
    for key, entry in params["tune"]["space"].items():
        where = f"tune.space.{key}"
        if "choices" in entry:
            candidates = list(entry["choices"])
        else:
            candidates = [entry["low"], entry["high"]]
            kind = schema()["properties"]["train"]["properties"][key].get("type")
            if kind not in ("integer", "number"):
                raise ParamsError(f"params.yaml: {where}: {key} is not numeric: give 'choices'")
            if entry.get("log") and entry.get("step") is not None:
                raise ParamsError(f"params.yaml: {where}: 'log' and 'step' cannot be combined")
            if kind == "integer":
                for name in ("low", "high", "step"):
                    value = entry.get(name)
                    if value is not None and not is_integer(value):
                        raise ParamsError(f"params.yaml: {where}.{name}: {key} needs an "
                                          f"integer{number_hint(value, 'integer')}")
        for value in candidates:
            try:
                validate(trial_params(params, {key: value}))
            except ParamsError as exc:
                raise ParamsError(f"params.yaml: {where}: value {value!r} is invalid: "
                                  f"{str(exc).split(': ', 1)[-1]}") from None
    check_combinations(params)


def check_combinations(params: dict[str, Any]) -> None:
    """Values valid one by one can be invalid together (nesterov with momentum 0): try every
    combination of the choices and range ends (up to MAX_COMBINATIONS) before any trial runs."""
    space = params["tune"]["space"]
    keys = sorted(space)
    ends = [list(space[k]["choices"]) if "choices" in space[k]
            else [space[k]["low"], space[k]["high"]] for k in keys]
    for combo in itertools.islice(itertools.product(*ends), MAX_COMBINATIONS):
        values = dict(zip(keys, combo, strict=True))
        try:
            validate(trial_params(params, values))
        except ParamsError as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise ParamsError(f"params.yaml: tune.space: the combination {shown} is invalid: "
                              f"{str(exc).split(': ', 1)[-1]}") from None


def suggest(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The trial's values: categorical for `choices`, int for integer train keys, else float."""
    values: dict[str, Any] = {}
    for key in sorted(space):
        entry = space[key]
        if "choices" in entry:
            values[key] = trial.suggest_categorical(key, list(entry["choices"]))
        elif _is_int_key(key):
            values[key] = trial.suggest_int(key, int(entry["low"]), int(entry["high"]),
                                            step=int(entry.get("step") or 1),
                                            log=bool(entry.get("log", False)))
        else:
            values[key] = trial.suggest_float(key, float(entry["low"]), float(entry["high"]),
                                              step=entry.get("step"),
                                              log=bool(entry.get("log", False)))
    return values


def grid_points(space: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every combination of the `choices` (the grid sampler's search space)."""
    keys = sorted(space)
    return [dict(zip(keys, combo, strict=True))
            for combo in itertools.product(*(space[k]["choices"] for k in keys))]


def target_trials(tune: dict[str, Any]) -> int:
    """How many finished (complete or pruned) trials the study should hold."""
    if tune["sampler"] == "grid":
        return min(tune["trials"], len(grid_points(tune["space"])))
    return tune["trials"]


def horizon(params: dict[str, Any]) -> int:
    """Epochs of a trial run to the end: tune.epochs, or (null) the train stage's own schedule,
    so that a trial's learning-rate schedule and late SAM are the ones the default runs."""
    epochs = params["tune"]["epochs"]
    return int(params["train"]["epochs"] if epochs is None else epochs)


def trial_params(params: dict[str, Any], values: dict[str, Any], *,
                 threads: int | None = None) -> dict[str, Any]:
    """params.yaml with the trial's values in `train`, `horizon` epochs, single process."""
    out = copy.deepcopy(params)
    out["train"].update(values)
    out["train"]["epochs"] = horizon(params)
    out["train"]["distributed"] = False
    if threads is not None and out["train"]["threads"] == 0:
        out["train"]["threads"] = threads
    return out


def budget_line(params: dict[str, Any], train_size: int, full_train_size: int,
                val_size: int = 0) -> str:
    """What the search will cost, in runs of the train stage, printed before it starts.

    A validation pass is a forward pass, counted as a third of a training image; the train stage
    scores every epoch, a trial only its `scored_epochs` and the last, a confirmation run the last.
    """
    tune = params["tune"]
    epochs = horizon(params)
    stage = params["train"]["epochs"] * (full_train_size + val_size / 3)

    def run_cost(scored: int) -> float:
        return (epochs * train_size + scored * val_size / 3) / stage

    trial_scores = len(set(scored_epochs(params)) | {epochs})
    confirm = tune["confirm"]
    confirm_runs = (confirm["candidates"] + 1) * confirm["seeds"] if confirm["candidates"] else 0
    trials = target_trials(tune)
    # no epoch to judge before the last (e.g. a warm-up as long as the horizon): no pruning
    pruning = ("pruning stops most of them early" if scored_epochs(params)
               else "no pruning")
    total = trials * run_cost(trial_scores) + confirm_runs * run_cost(1)
    return (f"tune: budget: {trials} trials of up to {epochs} epochs on "
            f"{train_size:,} images ({pruning}) + {confirm_runs} confirmation runs: about "
            f"{total:.1f} train-stage runs before pruning")


# --- study identity and storage ---------------------------------------------------------------


def data_fingerprint(data: Prepared) -> str:
    """Hash of the train and val splits a trial reads (the test split plays no part)."""
    digest = hashlib.blake2b(digest_size=16)
    for split in (data.train, data.val):
        for array in (split.images, split.labels):
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.data)
    return digest.hexdigest()


def study_name(params: dict[str, Any], data: Prepared) -> str:
    """Same name for the same search on the same data: a rerun resumes, a change starts anew."""
    tune = {k: v for k, v in params["tune"].items() if k not in NOT_STUDY_KEYS}
    fixed = {k: v for k, v in params["train"].items()
             if k not in params["tune"]["space"] and k not in TRIAL_SET_KEYS}
    identity = {
        "format": STUDY_FORMAT, "seed": params["seed"], "model": params["model"],
        "ipex": params["ipex"], "train": fixed, "tune": tune, "data": data_fingerprint(data),
        "horizon": horizon(params),
        # the code a trial runs, and the dtype `ipex.dtype: auto` resolves to on this machine
        "code": code_digest("fmnist.tune"), "runtime": trial_runtime(params),
    }
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return "fmnist-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def trial_runtime(params: dict[str, Any]) -> str:
    """Backend, device and dtype a trial runs with on this machine (what `auto` resolves to)."""
    return runtime_identity(select_backend(params["ipex"], params["train"]["device"]))


def default_storage(study_dir: str | Path = TUNE_STUDY_DIR) -> Path:
    """The SQLite file a study lives in without tune.storage."""
    return Path(study_dir).resolve() / STUDY_DB


def storage_url(storage: str | None, study_dir: str | Path = TUNE_STUDY_DIR) -> str:
    """tune.storage, or an SQLite file under checkpoints/tune/ (kept across runs, not DVC's)."""
    if storage:
        return storage
    path = default_storage(study_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def safe_url(url: str) -> str:
    """The URL with any password masked, for messages and reports."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is reported by open_storage
        return url


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; SQLite waits for locks instead of failing at once."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                              heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S)
    except Exception as exc:  # noqa: BLE001 - driver and connection errors vary by database
        raise FmnistError(f"tune.storage {safe_url(url)}: cannot open: {_problem(exc)}") from None


def _problem(exc: BaseException) -> str:
    """The first line of a storage error, with SQLite's full-disk code said the usual way."""
    line = first_line(exc)
    if "database or disk is full" in line:  # SQLITE_FULL
        return f"No space left on device ({line})"
    return line


def make_sampler(tune: dict[str, Any], seed: int) -> optuna.samplers.BaseSampler:
    if tune["sampler"] == "grid":
        space = {k: list(v["choices"]) for k, v in tune["space"].items()}
        # Every worker must shuffle the grid identically: grid ids index the shuffled list.
        return optuna.samplers.GridSampler(space, seed=tune["seed"])
    if tune["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = max(2, min(10, tune["trials"] // 3))
    return optuna.samplers.TPESampler(n_startup_trials=startup, seed=seed)


def first_rung(params: dict[str, Any]) -> int:
    """Epoch of the pruner's first rung: the end of the one-cycle warm-up (epoch 1 for other
    schedules). Before the peak the ranking is one of warm-up speed, not of where a trial ends:
    in the study-grade search every trial with lr <= 0.04 trailed every trial with lr >= 0.1
    after epoch 1 of 16, and successive halving stopped all of them there but the first."""
    schedule = params["train"]["schedule"]
    epochs = horizon(params)
    if schedule["name"] != "onecycle":
        return 1
    return max(1, min(epochs, math.ceil(schedule["pct_start"] * epochs - 1e-9)))


def rungs(params: dict[str, Any]) -> list[int]:
    """Epochs at which successive halving ranks the trials (before the last epoch)."""
    out, epoch = [], first_rung(params)
    while epoch < horizon(params):
        out.append(epoch)
        epoch *= REDUCTION_FACTOR
    return out


def scored_epochs(params: dict[str, Any]) -> list[int]:
    """Epochs after which a trial scores the validation split: where its pruner looks (fit
    always scores the last). Scoring every epoch cost a third of the default search."""
    pruner = params["tune"]["pruner"]
    if pruner in ("successive_halving", "hyperband"):  # hyperband's brackets share these rungs
        return rungs(params)
    if pruner == "median":
        return list(range(first_rung(params), horizon(params)))
    return []


def make_pruner(params: dict[str, Any]) -> optuna.pruners.BasePruner:
    """successive_halving: from the first rung (the warm-up's end) up to the full horizon, a
    trial goes on past each rung (4, 12 epochs of 16) only while in the best third there;
    hyperband runs several such brackets with later first rungs (safer for slow starters,
    saves less with few trials)."""
    tune = params["tune"]
    if tune["pruner"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=first_rung(params))
    if tune["pruner"] == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_rung(params),
                                                      reduction_factor=REDUCTION_FACTOR)
    if tune["pruner"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first_rung(params),
                                              max_resource=horizon(params),
                                              reduction_factor=REDUCTION_FACTOR)
    return optuna.pruners.NopPruner()


def _sampler_seed(tune_seed: int, existing: int, worker: int) -> int:
    """Distinct per worker and per resume point, so no two start from the same random stream."""
    return int(np.random.SeedSequence([tune_seed, existing, worker]).generate_state(1)[0])


# --- the objective ----------------------------------------------------------------------------


def _counts(trials: Sequence[FrozenTrial]) -> dict[TrialState, int]:
    out = dict.fromkeys(TrialState, 0)
    for t in trials:
        if not t.user_attrs.get("surplus"):
            out[t.state] += 1
    return out


class Objective:
    """One trial: fit with the trial's values, report val accuracy where the pruner looks,
    prune if hopeless."""

    def __init__(self, data: Prepared, params: dict[str, Any], target: int, threads: int | None,
                 scored: list[int] | None):
        self.data, self.params, self.target, self.threads = data, params, target, threads
        self.scored = scored  # epochs to score (None: every one), see scored_epochs
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.surplus = False

    def __call__(self, trial: optuna.Trial) -> float:
        earlier = [t for t in trial.study.get_trials(deepcopy=False, states=ACTIVE)
                   if t.number < trial.number and not t.user_attrs.get("surplus")]
        if len(earlier) >= self.target:
            trial.set_user_attr("surplus", True)
            self.surplus = True
            raise _Surplus(f"trial {trial.number}: budget already taken")
        tune = self.params["tune"]
        values = suggest(trial, tune["space"])
        params = trial_params(self.params, values, threads=self.threads)
        epochs = horizon(self.params)
        seen: list[float] = []
        trial.set_user_attr("epochs_run", 0)
        trial.set_user_attr("worker", self.worker)

        def on_epoch_end(epoch: int, stats: dict[str, float]) -> None:
            trial.set_user_attr("epochs_run", epoch)
            if math.isnan(stats["val_acc"]):  # not scored: no rung here
                return
            seen.append(float(stats["val_acc"]))
            trial.report(seen[-1], epoch)  # the pruner's rungs are epochs
            # Pruning after the last epoch saves nothing and throws a finished result away.
            if epoch < epochs and trial.should_prune():
                raise optuna.TrialPruned(f"val_acc {seen[-1]:.4f} after epoch {epoch}")

        fit(self.data, params, epochs=epochs, train_subset=tune["train_subset"],
            on_epoch_end=on_epoch_end, progress=False, scored_epochs=self.scored)
        if not seen:
            raise FmnistError(f"tune: trial {trial.number}: fit reported no epoch")
        return seen[-1]


def format_trial(trial: FrozenTrial, epochs: int) -> str:
    """One progress line: number, state, value, epochs run, values."""
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    values = " ".join(f"{k}={_short(v)}" for k, v in sorted(trial.params.items()))
    run = trial.user_attrs.get("epochs_run", 0)
    return f"tune: trial {trial.number:3d} {trial.state.name:8s} val_acc={value} " \
           f"epochs={run}/{epochs} {values}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --- workers ----------------------------------------------------------------------------------


def work(data: Prepared, params: dict[str, Any], url: str, name: str, *, worker: int = 0,
         threads: int | None = None, pruner: optuna.pruners.BasePruner | None = None,
         progress: bool = True) -> None:
    """Run trials of the study until it holds its budget of finished or running trials."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    tune = params["tune"]
    target = target_trials(tune)
    storage = open_storage(url)
    study = optuna.load_study(study_name=name, storage=storage)
    seed = _sampler_seed(tune["seed"], len(study.get_trials(deepcopy=False)), worker)
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=make_sampler(tune, seed),
                              pruner=pruner if pruner is not None else make_pruner(params))
    # a pruner passed in (tests) may look at any epoch
    objective = Objective(data, params, target, threads,
                          scored_epochs(params) if pruner is None else None)

    def report(study: optuna.Study, trial: FrozenTrial) -> None:
        if progress and not trial.user_attrs.get("surplus"):
            print(format_trial(trial, horizon(params)), flush=True)

    while True:
        counts = _counts(study.get_trials(deepcopy=False))
        busy = sum(counts[s] for s in (*FINISHED_OK, TrialState.RUNNING))
        if busy >= target:
            return
        study.optimize(objective, n_trials=1, catch=(_Surplus,), callbacks=[report])
        if objective.surplus:
            return


def _worker_process(data: Prepared, params: dict[str, Any], url: str, name: str, worker: int,
                    threads: int | None, pruner: Any, progress: bool) -> None:
    """Entry of a spawned local worker: expected failures print one line, exit 1."""
    try:
        work(data, params, url, name, worker=worker, threads=threads, pruner=pruner,
             progress=progress)
    except FmnistError as exc:
        print(f"tune worker {worker}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def open_study(params: dict[str, Any], data: Prepared, *,
               study_dir: str | Path = TUNE_STUDY_DIR) -> tuple[optuna.Study, str, str]:
    """Create or load the study for these params and data: (study, storage URL, study name)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    check_space(params)
    url = storage_url(params["tune"]["storage"], study_dir)
    name = study_name(params, data)
    study = optuna.create_study(study_name=name, storage=open_storage(url),
                                direction="maximize", load_if_exists=True)
    return study, url, name


def _release_dead_trials(study: optuna.Study, own_storage: bool) -> None:
    """A local run killed mid-trial left RUNNING trials: nobody else uses our SQLite file."""
    if not own_storage:
        return  # other machines may be running them: heartbeats decide
    storage = study._storage  # optuna has no public "fail this trial" for another process's trial
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def _requeue_failed_grid_points(study: optuna.Study, tune: dict[str, Any]) -> int:
    """Queue again the grid points whose only trials failed (a killed run): Optuna's grid
    sampler counts a failed point as visited and would never return to it."""
    if tune["sampler"] != "grid":
        return 0
    space = {k: list(tune["space"][k]["choices"]) for k in sorted(tune["space"])}

    def grid_id(trial: FrozenTrial) -> int | None:
        attrs = trial.system_attrs
        return attrs.get("grid_id") if attrs.get("search_space") == space else None

    trials = study.get_trials(deepcopy=False)
    covered = {grid_id(t) for t in trials if t.state in ACTIVE}
    failed = sorted({grid_id(t) for t in trials if t.state == TrialState.FAIL} - covered - {None})
    for point in failed:
        # A waiting trial that carries its grid id: the sampler maps the id back to the values.
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, system_attrs={"grid_id": point, "search_space": space}))
    return len(failed)


def run_study(data: Prepared, params: dict[str, Any], *, study_dir: str | Path = TUNE_STUDY_DIR,
              pruner: optuna.pruners.BasePruner | None = None,
              progress: bool = True) -> optuna.Study:
    """Run (or resume) the search: only the trials the study still lacks are run.

    `pruner` replaces tune.pruner (tests force pruning with it).
    """
    try:
        return _run_study(data, params, study_dir=study_dir, pruner=pruner, progress=progress)
    except optuna.exceptions.StorageInternalError as exc:  # read-only folder, full disk
        url = safe_url(storage_url(params["tune"]["storage"], study_dir))
        problem = _problem(exc.__cause__ or exc)
        raise FmnistError(f"tune.storage {url}: cannot write the study: {problem}") from None


def _run_study(data: Prepared, params: dict[str, Any], *, study_dir: str | Path,
               pruner: optuna.pruners.BasePruner | None, progress: bool) -> optuna.Study:
    tune = params["tune"]
    study, url, name = open_study(params, data, study_dir=study_dir)
    _release_dead_trials(study, own_storage=tune["storage"] is None)
    _requeue_failed_grid_points(study, tune)
    target = target_trials(tune)
    done = _counts(study.get_trials(deepcopy=False))
    finished = done[TrialState.COMPLETE] + done[TrialState.PRUNED]
    workers = tune["workers"]
    if progress:
        full = len(data.train.labels)
        subset = tune["train_subset"]
        print(budget_line(params, min(subset or full, full), full, len(data.val.labels)),
              flush=True)
        print(f"tune: study {name} in {safe_url(url)}: {finished} of {target} trials finished, "
              f"{max(0, target - finished)} to run on {workers} worker(s)", flush=True)
    if finished < target:
        if workers == 1:
            work(data, params, url, name, pruner=pruner, progress=progress)
        else:
            _run_local_workers(data, params, url, name, pruner=pruner, progress=progress)
    return optuna.load_study(study_name=name, storage=open_storage(url))


def _run_local_workers(data: Prepared, params: dict[str, Any], url: str, name: str, *,
                       pruner: Any, progress: bool) -> None:
    workers = params["tune"]["workers"]
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker_process,
                             args=(data, params, url, name, i, threads, pruner, progress))
             for i in range(workers)]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()
    failed = [i for i, proc in enumerate(procs) if proc.exitcode != 0]
    if failed:
        code = procs[failed[0]].exitcode
        raise FmnistError(f"tune: worker {failed[0]} failed (exit code {code})")


# --- `fmnist tune-worker` (`python -m fmnist.tune worker`) ----------------------------------


def _cli_worker(params: dict[str, Any], storage: str | None, study: str | None) -> None:
    from fmnist.data import load_prepared

    if storage:
        params = {**params, "tune": {**params["tune"], "storage": storage}}
    data = load_prepared()
    if study is not None and study != study_name(params, data):
        _refuse_study(study, params, data)  # before open_study adds a study of these params
    _, url, name = open_study(params, data)
    print(f"tune: worker on study {name} in {safe_url(url)}", flush=True)
    work(data, params, url, name, worker=os.getpid())


def _refuse_study(study: str, params: dict[str, Any], data: Prepared) -> None:
    """The one line for a --study that is not this params.yaml's: absent, or another's."""
    if not params["tune"]["storage"] and not default_storage().exists():
        # opening it would create the file (and its folder) only to say it is empty
        raise FmnistError(f"study {study}: no study here yet ({default_storage()} does not "
                          "exist; the tune stage creates it)")
    url = storage_url(params["tune"]["storage"])
    names = sorted(optuna.get_all_study_names(storage=open_storage(url)))
    if study not in names:
        raise FmnistError(f"study {study}: not in {safe_url(url)} (it holds: "
                          f"{', '.join(names) or 'no study'})")
    raise FmnistError(f"study {study}: params.yaml or the prepared data differ from it "
                      f"(they give {study_name(params, data)})")


def main(argv: list[str] | None = None) -> None:
    """`fmnist tune-worker` and `python -m fmnist.tune worker [--storage URL] [--study NAME]`:
    one more worker."""
    parser = argparse.ArgumentParser(prog="python -m fmnist.tune")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run trials of the shared study until its budget is met")
    worker.add_argument("--storage", help="database URL (default: tune.storage, else the "
                                          "SQLite file under checkpoints/tune/)")
    worker.add_argument("--study", help="study name to join; refuses if params.yaml differs")
    args = parser.parse_args(argv)

    from fmnist.stage import run_stage

    run_stage("tune", lambda params: _cli_worker(params, args.storage, args.study))


if __name__ == "__main__":
    main()

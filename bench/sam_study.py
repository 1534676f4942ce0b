"""SAM study: what SAM buys over SGD, measured with real DVC experiments (issue 15, item 1).

Run from the repository root of a clean checkout (committed code: queued experiments run the
committed tree, see below):

    python bench/sam_study.py --dry-run                 # the plan, its cost, the dvc commands
    python bench/sam_study.py                           # every row; resumes from the JSON
    python bench/sam_study.py --rows paired,noise --seeds 0,1,2
    python bench/sam_study.py --summarize-only          # rebuild the table and the figure
    python bench/sam_study.py --smoke --rows sam,sgd --seeds 0   # a minute: tiny data, 1 epoch

Every run is `dvc exp run --queue evaluate -n ss-<row>-s<seed>-<token> -S ...` (download,
preprocess, train, evaluate; never tune or export) on top of params.yaml; the queue then runs
one experiment at a time (`dvc queue start -j 1`: the seconds are part of the result). As each
experiment finishes, its files are read from its experiment commit (reports/evaluate/
metrics.json, reports/train/{metrics,timing,run}.json, params.yaml) and the run is written at
once into `bench/results/sam_study.json`, keyed by row, seed, CPU class, dtype, threads and
model (a study rerun for a new default model adds its runs beside the old model's). A
rerun skips what the JSON holds (local experiment refs need not survive), unless the params the
run recorded no longer match what the row asks for now (then it is stale and runs again).
Rows whose params coincide (SAM and rho 0.05) share one experiment. Each run also keeps its
plain-epoch speed (the images/s of its epochs without a SAM step, from dvclive's per-epoch
file), the machine's speed on the day: runs recorded before it was kept get it from their
experiment commit where this clone still has one.

The seed also draws the train/validation split and the label noise, so SAM and SGD are compared
per seed: the table's intervals are paired t intervals over seeds.

Queued experiments are git stashes of the tracked files: uncommitted edits would be run (and
stashed and restored under the feet of whoever makes them), untracked files would be missing.
Hence the clean-checkout check (`--allow-dirty` to override). The queue worker gets
PYTHONPATH=src so each experiment imports the fmnist package of its own snapshot, not the
editable install's working tree.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's fmnist, as the experiments import it

from fmnist import signals  # noqa: E402
from fmnist.allocator import KEPT  # noqa: E402
from fmnist.atomic import write_json, write_text  # noqa: E402
from fmnist.constants import TRAIN_IMAGES  # noqa: E402
from fmnist.errors import FmnistError  # noqa: E402
from fmnist.model import (  # noqa: E402
    CONFIG_KEYS,
    FLIP_TTA,
    POOL_CEIL_MODE,
    TEMPERATURE,
    model_config,
)
from fmnist.params import load_params, validate  # noqa: E402
from fmnist.preprocess import split_sizes  # noqa: E402

RESULTS = ROOT / "bench" / "results"
NAME_PREFIX = "ss"
NAME_RE = re.compile(rf"^{NAME_PREFIX}-(?P<row>.+)-s(?P<seed>\d+)-(?P<token>[0-9a-f]{{6}})$")
OVERHEAD_S = 60.0  # per experiment besides training (DVC, preprocess, evaluate), until measured
# Tiny data, one epoch, no flip TTA: the whole mechanism in about half a minute per experiment.
SMOKE = {"preprocess.train_subset": 1000, "train.epochs": 1, "evaluate.flip_tta": False}
# What a run's recorded params are compared on (the thread count is part of the key instead).
RELEVANT = ("seed", "preprocess", "model", "train", "evaluate")
IGNORED = {"train.threads", "evaluate.batch_size"}
METRICS = (("accuracy", "test accuracy"), ("f1_macro", "macro F1"), ("ece", "ECE"))
# dvclive's per-epoch training speed, in every experiment commit: the machine's speed probe.
SPEED_TSV = "reports/train/plots/metrics/timing/images_per_s.tsv"


# --- rows --------------------------------------------------------------------------------------


def equal_compute_epochs(train: dict[str, Any]) -> int:
    """SGD epochs with as many forward/backward passes as SAM: a SAM step costs two passes and
    runs every `sam_every`-th step from `sam_start` of the schedule on. Rounded half up."""
    return math.floor(passes({**train, "optimizer": "sam"}) + 0.5)


def passes(train: dict[str, Any]) -> float:
    """Forward/backward passes over the training split, in epochs."""
    epochs = train["epochs"]
    if train["optimizer"] != "sam":
        return float(epochs)
    return epochs * (1 + (1 - train["sam_start"]) / train["sam_every"])


@dataclass(frozen=True)
class Row:
    description: str
    group: str
    overrides: Callable[[dict[str, Any]], dict[str, Any]]  # params.yaml -> `-S` overrides


def _fixed(**dotted: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    values = {key.replace("__", "."): value for key, value in dotted.items()}
    return lambda base: dict(values)


RHOS = (0.0, 0.02, 0.05, 0.1, 0.2)
ROWS: dict[str, Row] = {
    "sam": Row("SAM, params.yaml rho", "paired", _fixed(train__optimizer="sam")),
    "sgd": Row("SGD, same epochs", "paired", _fixed(train__optimizer="sgd")),
    "sgd-compute": Row(
        "SGD, as many forward/backward passes as SAM", "paired",
        lambda base: {"train.optimizer": "sgd",
                      "train.epochs": equal_compute_epochs(base["train"])}),
    **{f"rho-{rho:g}": Row(f"SAM, rho {rho:g}", "sweep",
                           _fixed(train__optimizer="sam", train__rho=rho)) for rho in RHOS},
    "asam": Row("ASAM (adaptive), rho 1.0", "asam",
                _fixed(train__optimizer="sam", train__adaptive=True, train__rho=1.0)),
    **{f"{opt}-noise{pct}": Row(f"{opt.upper()}, {pct}% label noise", "noise",
                                _fixed(train__optimizer=opt,
                                       preprocess__label_noise=pct / 100))
       for pct in (20, 40) for opt in ("sam", "sgd")},
}
# Seeds 0..N-1 by group unless --seeds names them.
DEFAULT_SEEDS = {"paired": 3, "noise": 3, "sweep": 1, "asam": 1}
# (label, SAM row, SGD row): the paired differences the table reports.
PAIRS = (
    ("SAM − SGD, equal epochs, clean labels", "sam", "sgd"),
    ("SAM − SGD, equal compute, clean labels", "sam", "sgd-compute"),
    ("SAM − SGD, 20% label noise", "sam-noise20", "sgd-noise20"),
    ("SAM − SGD, 40% label noise", "sam-noise40", "sgd-noise40"),
    *((f"SAM rho {rho:g} − SGD, equal epochs, clean labels", f"rho-{rho:g}", "sgd")
      for rho in RHOS),
    ("ASAM rho 1.0 − SGD, equal epochs, clean labels", "asam", "sgd"),
)


def select_rows(spec: str) -> list[str]:
    """`all`, group names (paired, sweep, asam, noise) and row names, comma-separated."""
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "all":
            found = list(ROWS)
        elif item in ROWS:
            found = [item]
        else:
            found = [name for name, row in ROWS.items() if row.group == item]
        if not found:
            raise FmnistError(f"unknown row {item!r} (rows: {', '.join(ROWS)}; groups: all, "
                              f"{', '.join(DEFAULT_SEEDS)})")
        names += [n for n in found if n not in names]
    return names


# --- params ------------------------------------------------------------------------------------


def set_dotted(params: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    if last not in node:
        raise FmnistError(f"{key}: no such param in params.yaml")
    node[last] = value


def with_overrides(base: dict[str, Any], overrides: dict[str, Any], what: str) -> dict[str, Any]:
    params = copy.deepcopy(base)
    for key, value in overrides.items():
        set_dotted(params, key, value)
    return validate(params, what)


def relevant(params: dict[str, Any]) -> dict[str, Any]:
    return {key: copy.deepcopy(params[key]) for key in RELEVANT if key in params}


def differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, on the keys both sides have: a param added or removed
    since a run was recorded does not make it stale, a changed value does. The model is
    compared as the model file stores it, so a run recorded before an optional model key existed
    (pool_ceil_mode) counts as that key at its off value, not as any value."""
    rest = [k for k in stored.keys() & wanted.keys() if k != "model"]
    changed = _differences({k: stored[k] for k in rest}, {k: wanted[k] for k in rest})
    if "model" in stored and "model" in wanted and (
            comparable_model(stored["model"]) != comparable_model(wanted["model"])):
        changed.append("model")
    return changed


def _differences(stored: Any, wanted: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(wanted, dict):
        return [d for key in stored.keys() & wanted.keys()
                if f"{prefix}{key}" not in IGNORED
                for d in _differences(stored[key], wanted[key], f"{prefix}{key}.")]
    return [] if stored == wanted else [prefix.rstrip(".")]


def cli_value(value: Any) -> str:
    """A value as `-S key=value` parses it back (YAML-like)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value) if isinstance(value, float) else str(value)


# --- the plan ----------------------------------------------------------------------------------


@dataclass
class Job:
    """One experiment; several rows share it when their params coincide."""

    rows: list[str]
    seed: int
    overrides: dict[str, Any]  # dotted -> value, the seed included
    params: dict[str, Any]  # params.yaml with the overrides
    machine: dict[str, Any]  # predicted cpu_class, dtype, threads
    name: str = ""

    @property
    def row(self) -> str:
        return self.rows[0]

    def set_args(self) -> list[str]:
        return [arg for key, value in self.overrides.items()
                for arg in ("-S", f"{key}={cli_value(value)}")]


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    held: int = 0  # (row, seed) already in the JSON
    stale: list[str] = field(default_factory=list)  # "row seed N: key, key" rerun
    copies: list[dict[str, Any]] = field(default_factory=list)  # same params, another row


def run_key(run: dict[str, Any]) -> str:
    fields = [str(run[k]) for k in ("row", "seed", "cpu_class", "dtype", "threads")]
    return "|".join([*fields, model_key(run["params"]["model"])])


def comparable_model(params_model: dict[str, Any]) -> dict[str, Any]:
    """The model as its file stores it (optional keys at their off value left out), plus any
    params.model key model_config does not know yet, so a future knob still tells runs apart."""
    known = {*CONFIG_KEYS, POOL_CEIL_MODE, FLIP_TTA, TEMPERATURE}
    return {**{k: v for k, v in params_model.items() if k not in known},
            **model_config(params_model)}


def model_key(params_model: dict[str, Any]) -> str:
    return json.dumps(comparable_model(params_model), sort_keys=True, separators=(",", ":"))


def model_label(params_model: dict[str, Any]) -> str:
    config = model_config(params_model)
    text = "/".join(str(c) for c in config["channels"]) + f" x{config['convs_per_block']}"
    text += ", ceil-mode pooling" if config.get("pool_ceil_mode") else ""
    text += "" if config["batch_norm"] else ", no BatchNorm"
    return text + f", dropout {config['dropout']:g}, hidden {config['hidden']}"


def make_plan(base: dict[str, Any], rows: list[str], seeds: dict[str, list[int]],
              machine: Callable[[dict[str, Any]], dict[str, Any]], runs: list[dict[str, Any]],
              extra: dict[str, Any] | None = None) -> Plan:
    """What is left to run: (row, seed) pairs without a current result in `runs`, grouped into
    one job per distinct set of params. `extra` overrides go under every row (smoke, threads);
    `machine(params)` predicts the key's cpu_class/dtype/threads."""
    extra = extra or {}
    start = with_overrides(base, extra, "params.yaml with the study's overrides")
    plan = Plan()
    by_key = {run_key(r): r for r in runs}
    jobs: dict[str, Job] = {}
    for row in rows:
        for seed in seeds[row]:
            overrides = {**extra, **ROWS[row].overrides(start), "seed": seed}
            params = with_overrides(base, overrides, f"row {row}, seed {seed}")
            where = machine(params)
            key = run_key({"row": row, "seed": seed, **where, "params": params})
            wanted = relevant(params)
            stored = by_key.get(key)
            if stored is not None:
                changed = differences(stored.get("params", {}), wanted)
                if not changed:
                    plan.held += 1
                    continue
                plan.stale.append(f"{row} seed {seed}: {', '.join(changed)}")
            twin = next((r for r in runs if r["row"] != row and r["seed"] == seed
                         and all(r[k] == where[k] for k in where)
                         and not differences(r.get("params", {}), wanted)
                         and not differences(wanted, r.get("params", {}))), None)
            if twin is not None:
                plan.copies.append({**twin, "row": row, "same_run_as": twin["row"]})
                continue
            ident = json.dumps([wanted, where], sort_keys=True)
            if ident in jobs:
                jobs[ident].rows.append(row)
            else:
                jobs[ident] = Job([row], seed, overrides, params, where)
    plan.jobs = list(jobs.values())
    return plan


def predict_machine(params: dict[str, Any]) -> dict[str, Any]:
    """The key the train stage will record on this machine: CPU class, dtype, threads."""
    import torch

    from fmnist.accel import cpu_class, dtype_name, select_backend

    backend = select_backend(params["ipex"], params["train"]["device"],
                             params["train"]["compile"])
    threads = params["train"]["threads"] or torch.get_num_threads()
    return {"cpu_class": cpu_class(), "dtype": dtype_name(backend.dtype), "threads": threads}


# --- the estimate ------------------------------------------------------------------------------


def train_images(params: dict[str, Any]) -> float:
    full, _ = split_sizes(TRAIN_IMAGES, params["preprocess"]["val_fraction"])
    subset = params["preprocess"]["train_subset"]
    return float(min(subset, full) if subset else full)


def seconds_per_pass(base: dict[str, Any], where: dict[str, Any], study: list[dict[str, Any]],
                     tta: list[dict[str, Any]]) -> tuple[float | None, str]:
    """Train seconds per epoch-pass over 1 image, from this study's runs on this CPU class and
    dtype, else the time-to-accuracy runs of the params.yaml model and schedule."""
    model = model_config(base["model"])
    mine = [r for r in study if (r["cpu_class"], r["dtype"]) == (where["cpu_class"],
                                                                 where["dtype"])
            and model_key(r["params"]["model"]) == model_key(base["model"])]
    # timed with fmnist.allocator's setting where there are such runs (run.json records it)
    mine = [r for r in mine if r.get("allocator") == KEPT] or mine
    if mine:
        rates = [r["train_seconds"] / (r["passes"] * train_images(r["params"])) for r in mine]
        return statistics.median(rates), f"{len(mine)} runs of this study"
    keys = ("epochs", "sam_start", "sam_every", "ema_decay", "rho", "lr", "batch_size", "augment")
    # runs recorded before `augment` was stored all trained with params.yaml's augmentation
    same = [r for r in tta if (r["cpu_class"], r["dtype"]) == (where["cpu_class"], where["dtype"])
            and model_config(r["model"]) == model
            and all(r["train"].get(k, base["train"][k] if k == "augment" else None)
                    == base["train"][k] for k in keys)]
    # runs timed with fmnist.allocator's setting, where there are any (older runs page-faulted)
    kept = [r for r in same if r.get("allocator") == KEPT]
    if not same:
        return None, "no time_to_accuracy run of the default on this CPU class and dtype"
    full = train_images({"preprocess": {**base["preprocess"], "train_subset": None}})
    rates = [r["train_seconds"] / (passes({**r["train"], "optimizer": "sam"}) * full)
             for r in kept or same]
    source = f"{len(kept or same)} time_to_accuracy runs of the default"
    if not kept:
        source += (" (timed before fmnist.allocator, with the default or a user-chosen malloc: "
                   "glibc's default page-faults, so likely an overestimate)")
    return statistics.median(rates), source


def overhead_seconds(study: list[dict[str, Any]], where: dict[str, Any]) -> float:
    extra = [max(r["wall_seconds"] - r["train_seconds"], 0.0) for r in study
             if r.get("wall_seconds") and (r["cpu_class"], r["dtype"]) == (where["cpu_class"],
                                                                           where["dtype"])]
    return statistics.median(extra) if extra else OVERHEAD_S


def estimate(jobs: list[Job], rate: float | None, overhead: float) -> float | None:
    if rate is None:
        return None
    return sum(rate * passes(j.params["train"]) * train_images(j.params) + overhead
               for j in jobs)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes} min"


# --- DVC ---------------------------------------------------------------------------------------


class Experiments:
    """The few DVC and git commands the study needs, run in the repository `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
                    # stage commands say `python`: this interpreter; its package: the snapshot's
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "PYTHONPATH": os.pathsep.join(
                        ["src", *filter(None, [os.environ.get("PYTHONPATH")])])}

    def _run(self, *args: str, check: bool = True) -> str:
        # Files, not pipes: `dvc queue start` leaves a worker daemon holding its output open,
        # and reading a pipe to its end would wait for the whole queue. A stop signal waits for
        # the command: killed midway, `dvc exp run --queue` can leave a half stash or a lock.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
                signals.deferred():
            proc = subprocess.run(args, cwd=self.root, env=self.env, stdout=out, stderr=err,
                                  stdin=subprocess.DEVNULL, text=True)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if check and proc.returncode != 0:
            lines = (stderr or stdout).strip().splitlines() or ["(no output)"]
            raise FmnistError(f"{' '.join(args[:4])} ...: {lines[-1]}")
        return stdout

    def dvc(self, *args: str, check: bool = True) -> str:
        return self._run(sys.executable, "-m", "dvc", *args, check=check)

    def git(self, *args: str) -> str:
        return self._run("git", *args)

    def dirty(self) -> list[str]:
        """Changed or untracked paths a queued experiment would run with or miss."""
        lines = self.git("status", "--porcelain").splitlines()
        return [line[3:] for line in lines if not line[3:].startswith("bench/results/")]

    def queue(self, job: Job) -> None:
        self.dvc("exp", "run", "--queue", "evaluate", "-n", job.name, *job.set_args())

    def start(self) -> None:
        self.dvc("queue", "start", "-j", "1")

    def status(self) -> tuple[dict[str, str], int]:
        """Task name -> Queued/Running/Success/Failed, and the number of active workers."""
        text = self.dvc("queue", "status")
        return parse_queue_status(text)

    def refs(self) -> dict[str, tuple[str, str]]:
        """Finished experiments: name -> (commit, baseline commit), newest last.
        DVC names them refs/exps/<baseline[:2]>/<baseline[2:]>/<name>."""
        out = self.git("for-each-ref", "--sort=committerdate",
                       "--format=%(objectname) %(refname)", "refs/exps/")
        found = {}
        for line in out.splitlines():
            sha, ref = line.split(" ", 1)
            parts = ref.split("/")
            if len(parts) == 5:
                found[parts[4]] = (sha, parts[2] + parts[3])
        return found

    def show(self, rev: str, path: str) -> str | None:
        """`path` as commit `rev` holds it; None if either is gone."""
        try:
            proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=self.root,
                                  capture_output=True, text=True)
        except OSError:  # no git: the study's JSON alone still summarizes
            return None
        return proc.stdout if proc.returncode == 0 else None

    def files(self, rev: str) -> dict[str, Any]:
        out: dict[str, Any] = {"train_speed": self.show(rev, SPEED_TSV)}
        for key, path in EXPERIMENT_FILES.items():
            text = self.show(rev, path)
            if text is None:
                if key in ("evaluate", "train_timing", "params"):
                    raise FmnistError(f"experiment {rev[:7]}: no {path}")
                out[key] = {}
            else:
                out[key] = yaml.safe_load(text) if path.endswith(".yaml") else json.loads(text)
        return out

    def log_tail(self, name: str, lines: int = 5) -> str:
        text = self.dvc("queue", "logs", name, check=False)
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, names: Iterable[str], status: dict[str, str]) -> None:
        queued = [n for n in names if status.get(n) == "Queued"]
        running = [n for n in names if status.get(n) == "Running"]
        if queued:
            self.dvc("queue", "remove", *queued, check=False)
        if running:
            self.dvc("queue", "kill", *running, check=False)


EXPERIMENT_FILES = {
    "evaluate": "reports/evaluate/metrics.json",
    "train_metrics": "reports/train/metrics.json",
    "train_timing": "reports/train/timing.json",
    "train_run": "reports/train/run.json",
    "params": "params.yaml",
}


def parse_queue_status(text: str) -> tuple[dict[str, str], int]:
    """`dvc queue status`'s table: `Task Name Created Status` rows, then `Worker status: N
    active, M idle`."""
    tasks: dict[str, str] = {}
    workers = 0
    for line in text.splitlines():
        found = re.match(r"Worker status:\s*(\d+) active", line.strip())
        if found:
            workers = int(found.group(1))
            continue
        parts = line.split()
        if len(parts) >= 4 and parts[0] != "Task":
            tasks[parts[1]] = parts[-1]
    return tasks, workers


def plain_images_per_s(tsv: str | None, train: dict[str, Any]) -> float | None:
    """Median images/s of the epochs wholly before the SAM phase (every epoch of SGD): the
    same work in every row, so it tells a run made on a slow day from a dear recipe."""
    if not tsv:
        return None
    try:
        table = list(csv.DictReader(io.StringIO(tsv), delimiter="\t"))
        speeds = {int(row["step"]): float(row["images_per_s"]) for row in table}
    except (KeyError, TypeError, ValueError):  # not dvclive's step/images_per_s table
        return None
    plain = (math.floor(train["sam_start"] * train["epochs"] + 1e-9)
             if train["optimizer"] == "sam" else train["epochs"])
    values = [v for step, v in speeds.items() if step < plain]
    return statistics.median(values) if values else None


def fill_speeds(runs: list[dict[str, Any]], show: Callable[[str, str], str | None]) -> int:
    """Give the runs recorded without `plain_images_per_s` their speed, where this clone still
    holds their experiment commit; the number filled."""
    filled = 0
    for run in runs:
        if run.get("plain_images_per_s") is not None or not run.get("exp_rev"):
            continue
        speed = plain_images_per_s(show(run["exp_rev"], SPEED_TSV), run["params"]["train"])
        if speed is not None:
            run["plain_images_per_s"] = speed
            filled += 1
    return filled


def run_speed(run: dict[str, Any]) -> float | None:
    """The run's plain-epoch speed; for SGD runs recorded without it, the mean speed (every
    SGD epoch is plain)."""
    if run.get("plain_images_per_s") is not None:
        return run["plain_images_per_s"]
    return run["images_per_s"] if run["params"]["train"]["optimizer"] == "sgd" else None


def entry_from_files(files: dict[str, Any], job: Job, *, rev: str, baseline: str,
                     dirty: bool, wall_seconds: float | None) -> dict[str, Any]:
    """One experiment's record: its key (as the run measured it), test metrics, timing,
    the params it ran with, and where to find it."""
    machine = files.get("train_run", {}).get("machine", {})
    timing = files["train_timing"]
    params = files["params"]
    return {
        "row": job.row,
        "seed": params["seed"],
        "cpu_class": machine.get("cpu_class", job.machine["cpu_class"]),
        "dtype": machine.get("dtype", job.machine["dtype"]),
        "threads": machine.get("threads", job.machine["threads"]),
        "torch_version": machine.get("torch_version"),
        "allocator": machine.get("allocator"),
        "test": {k: v for k, v in files["evaluate"].items()
                 if isinstance(v, int | float) and not isinstance(v, bool)},
        "val_acc": files.get("train_metrics", {}).get("val_acc"),
        "train_seconds": timing["train_seconds"],
        "images_per_s": timing["images_per_s"],
        "plain_images_per_s": plain_images_per_s(files.get("train_speed"), params["train"]),
        "wall_seconds": wall_seconds,
        "passes": passes(params["train"]),
        "overrides": job.overrides,
        "params": relevant(params),
        "experiment": job.name,
        "exp_rev": rev,
        "baseline_rev": baseline,
        "dirty": dirty,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def record(runs: list[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """`runs` with `entry` in place of any run of the same key."""
    return [r for r in runs if run_key(r) != run_key(entry)] + [entry]


# --- running -----------------------------------------------------------------------------------


@dataclass
class Progress:
    total: int
    done: int = 0
    failed: list[str] = field(default_factory=list)


def run_jobs(exps: Experiments, jobs: list[Job], store: Path, runs: list[dict[str, Any]], *,
             dirty: bool, poll_s: float, status_s: float) -> Progress:
    """Queue the jobs (or adopt this study's experiments already finished or queued), run the
    queue, and record each experiment in `store` the moment it finishes."""
    progress = Progress(len(jobs))
    walls: list[float] = []
    finished = exps.refs()
    tasks, workers = exps.status()
    pending: dict[str, Job] = {}

    def save(job: Job, rev: str, baseline: str, wall: float | None) -> bool:
        """Record the finished experiment; False if it is not what the job asks for (an
        earlier invocation's experiment, `wall` None, made with other params or elsewhere)."""
        nonlocal runs
        files = exps.files(rev)
        entry = entry_from_files(files, job, rev=rev, baseline=baseline, dirty=dirty,
                                 wall_seconds=wall)
        moved = [k for k in job.machine if entry[k] != job.machine[k]]
        changed = differences(entry["params"], relevant(job.params))
        if wall is None and (moved or changed):
            return False
        if moved:
            print(f"sam_study: warning: {job.name} ran with "
                  + ", ".join(f"{k} {entry[k]} (expected {job.machine[k]})" for k in moved),
                  file=sys.stderr)
        if changed:
            print(f"sam_study: {job.name}: params differ from the plan ({', '.join(changed)}); "
                  "not recorded", file=sys.stderr)
            return False
        for row in job.rows:
            runs = record(runs, {**entry, "row": row,
                                 **({"same_run_as": job.row} if row != job.row else {})})
        write_json(store, {"runs": runs})
        progress.done += 1
        test = entry["test"]
        rows = "+".join(job.rows)
        wall_text = ""
        if wall:
            walls.append(wall)
            left = progress.total - progress.done - len(progress.failed)
            wall_text = (f", {duration(wall)} wall"
                         + (f", ~{duration(statistics.fmean(walls) * left)} left" if left else ""))
        print(f"sam_study: [{progress.done}/{progress.total}] {rows} seed {job.seed}: "
              f"test accuracy {test.get('accuracy', math.nan):.4f}, macro F1 "
              f"{test.get('f1_macro', math.nan):.4f}, ECE {test.get('ece', math.nan):.4f}, "
              f"train {entry['train_seconds']:.1f} s{wall_text} ({job.name})", flush=True)
        return True

    try:
        _queue_and_wait(exps, jobs, pending, finished, tasks, workers, save,
                        poll_s=poll_s, status_s=status_s, progress=progress)
    except KeyboardInterrupt:
        with signals.deferred():  # a second Ctrl+C or a runner's repeated SIGTERM waits too
            tasks, _ = exps.status()
            exps.stop(pending, tasks)
            print(f"sam_study: interrupted: removed {len(pending)} queued or running "
                  "experiment(s) of this study; what finished is in the JSON, rerun to resume",
                  file=sys.stderr)
        raise
    return progress


def _queue_and_wait(exps: Experiments, jobs: list[Job], pending: dict[str, Job],
                    finished: dict[str, tuple[str, str]], tasks: dict[str, str], workers: int,
                    save: Callable[[Job, str, str, float | None], bool], *, poll_s: float,
                    status_s: float, progress: Progress) -> None:
    """Adopt or queue every job (into `pending` before it is queued, so a stop removes it),
    start the queue and save each experiment as it finishes."""
    for job in jobs:
        mine = [n for n in [*finished, *tasks] if _belongs(n, job)]
        done = [n for n in mine if n in finished]
        # a previous invocation's experiment, still in the local refs (another model's runs of
        # the same row and seed may be there too: save refuses those)
        saved = False
        for name in reversed(done):
            job.name = name
            if save(job, *finished[name], None):
                saved = True
                break
        if saved:
            continue
        waiting = [n for n in mine if tasks.get(n) in ("Queued", "Running")]
        if waiting:
            job.name = waiting[0]
            print(f"sam_study: {job.name} is already in the queue: waiting for it", flush=True)
            pending[job.name] = job
        else:
            job.name = f"{NAME_PREFIX}-{job.row}-s{job.seed}-{secrets.token_hex(3)}"
            pending[job.name] = job
            exps.queue(job)
    if not pending:
        return
    others = [n for n, s in tasks.items() if s in ("Queued", "Running") and n not in pending]
    if others:
        print(f"sam_study: note: the queue also holds {len(others)} other experiment(s) "
              f"({', '.join(others[:3])}...): they run first or in between", file=sys.stderr)
    if workers:
        print("sam_study: note: a queue worker is already running: it runs the experiments "
              "without this script's PYTHONPATH=src (the installed fmnist)", file=sys.stderr)
    exps.start()
    since = time.monotonic()
    last_status = time.monotonic()
    stalled = 0
    while pending:
        time.sleep(poll_s)
        finished = exps.refs()
        for name in [n for n in pending if n in finished]:
            now = time.monotonic()
            if not save(pending.pop(name), *finished[name], now - since):
                progress.failed.append(name)
            since = now
        if not pending or time.monotonic() - last_status < status_s:
            continue
        last_status = time.monotonic()
        tasks, workers = exps.status()
        finished = exps.refs()
        for name in [n for n in pending if tasks.get(n) in ("Failed", "Success")
                     and n not in finished]:
            pending.pop(name)
            progress.failed.append(name)
            print(f"sam_study: {name} failed:\n{exps.log_tail(name)}", file=sys.stderr)
            since = time.monotonic()
        running = any(tasks.get(n) == "Running" for n in pending)
        stalled = 0 if (workers or running or not pending) else stalled + 1
        if stalled == 1:
            exps.start()
        elif stalled >= 3:
            raise FmnistError(f"the DVC queue stopped with {len(pending)} experiment(s) "
                              "of this study waiting (see `dvc queue status`); rerun to "
                              "resume")


def _belongs(name: str, job: Job) -> bool:
    found = NAME_RE.match(name)
    return bool(found) and found["row"] == job.row and int(found["seed"]) == job.seed


# --- summarizing -------------------------------------------------------------------------------


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """Mean and two-sided t interval of the mean; None below two values."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    mean = statistics.fmean(values)
    half = t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(
        len(values))
    return mean, mean - half, mean + half


def paired(runs: list[dict[str, Any]], a: str, b: str, metric: str) -> list[float]:
    """Per seed: row a's metric minus row b's (seeds both hold)."""
    first = {r["seed"]: r["test"][metric] for r in runs if r["row"] == a and metric in r["test"]}
    second = {r["seed"]: r["test"][metric] for r in runs if r["row"] == b and metric in r["test"]}
    return [first[s] - second[s] for s in sorted(first.keys() & second.keys())]


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (CPU class, dtype, model): one entry per row (mean, std, n of each metric) and the
    pairs."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        model = model_key(run["params"]["model"])
        groups.setdefault((run["cpu_class"], run["dtype"], model), []).append(run)
    out = []
    for (cpu, dtype, _model), members in sorted(groups.items()):
        order = [r for r in ROWS if any(m["row"] == r for m in members)]
        order += sorted({m["row"] for m in members} - set(order))
        rows = []
        for name in order:
            mine = sorted((m for m in members if m["row"] == name), key=lambda m: m["seed"])
            stats = {}
            for metric, _ in METRICS:
                values = [m["test"][metric] for m in mine if metric in m["test"]]
                if values:
                    stats[metric] = (statistics.fmean(values),
                                     statistics.stdev(values) if len(values) > 1 else None)
            train = mine[-1]["params"]["train"]
            speeds = [s for s in map(run_speed, mine) if s is not None]
            rows.append({
                "row": name, "seeds": [m["seed"] for m in mine], "stats": stats,
                "description": ROWS[name].description if name in ROWS else name,
                "setting": setting(mine[-1]["params"]),
                "epochs": train["epochs"], "passes": mine[-1]["passes"],
                "train_seconds": statistics.fmean(m["train_seconds"] for m in mine),
                "plain_speed": (statistics.fmean(speeds), len(speeds)) if speeds else None,
            })
        pairs = []
        # a row copied from another (rho-0.05 from sam) would repeat that row's pair
        originals = [m for m in members if not m.get("same_run_as")]
        for label, a, b in PAIRS:
            diffs = {metric: paired(originals, a, b, metric) for metric, _ in METRICS}
            if diffs["accuracy"]:
                pairs.append({"label": label, "a": a, "b": b, "n": len(diffs["accuracy"]),
                              "diffs": diffs,
                              "intervals": {m: t_interval(d) for m, d in diffs.items()}})
        out.append({"cpu_class": cpu, "dtype": dtype, "runs": members,
                    "model": model_label(members[-1]["params"]["model"]),
                    "rows": rows, "pairs": pairs,
                    "threads": sorted({m["threads"] for m in members}),
                    "baselines": sorted({m["baseline_rev"][:10] for m in members
                                         if m.get("baseline_rev")})})
    return out


def setting(params: dict[str, Any]) -> str:
    train = params["train"]
    text = train["optimizer"].upper()
    if train["optimizer"] == "sam":
        text += f" rho {train['rho']:g}" + (" adaptive" if train.get("adaptive") else "")
    text += f", {train['epochs']} ep"
    noise = params.get("preprocess", {}).get("label_noise", 0)
    if noise:
        text += f", noise {noise:.0%}"
    subset = params.get("preprocess", {}).get("train_subset")
    if subset:
        text += f", {subset:,} images"
    return text


def _pct(mean: float, std: float | None) -> str:
    return f"{mean:.2%}" + (f" ± {std:.2%}" if std is not None else "")


def _points(interval: tuple[float, float, float] | None, diffs: list[float]) -> str:
    if interval is None:
        return f"{100 * diffs[0]:+.2f} (1 seed, no interval)" if diffs else "n/a"
    mean, low, high = (100 * v for v in interval)
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def _speed(row: dict[str, Any], seeds: int) -> str:
    if row["plain_speed"] is None:
        return "n/a"
    mean, known = row["plain_speed"]
    return f"{mean:,.0f}" + (f" ({known} of {seeds})" if known < seeds else "")


def markdown(summary: list[dict[str, Any]], source: str = "sam_study.json") -> str:
    lines = [
        "# SAM study",
        "",
        f"Generated by `python bench/sam_study.py` from `{source}`: every run is a "
        "`dvc exp run --queue evaluate` experiment on top of params.yaml at the commit the "
        "JSON names (`baseline_rev`, with the run's `-S` overrides). Metrics: the test split "
        "(10,000 images) as the evaluate stage reports it; mean ± sample standard deviation "
        "over seeds. The seed also draws the train/validation split and the label noise, so "
        "SAM and SGD are compared per seed: Δ is SAM − SGD in percentage points, the mean "
        "over seeds with a two-sided 95% t interval (paired). Lower ECE is better. Passes: "
        "forward/backward passes over the training split in epochs (a SAM step costs two). "
        "Plain img/s: the training speed of the epochs without a SAM step, the same work in "
        "every row, so it measures the machine on the day (this VM's speed varies between "
        "sessions): compare train seconds only between rows of similar plain speed. The mean "
        "over the seeds whose per-epoch speeds are still known (k of n otherwise); for SGD, "
        "the run's mean speed where they are not.",
    ]
    for group in summary:
        threads = ", ".join(str(t) for t in group["threads"])
        lines += [
            "",
            f"## CPU class {group['cpu_class']}, training dtype {group['dtype']}, "
            f"{threads} thread(s), model {group['model']}",
            "",
            f"Code: {', '.join(group['baselines']) or 'unknown'}.",
            "",
            "| row | what | run as | seeds | passes (epochs) | test accuracy | macro F1 | ECE "
            "| train s | plain img/s |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in group["rows"]:
            cells = [_pct(*r["stats"][m]) if m in r["stats"] else "n/a" for m, _ in METRICS]
            lines.append(f"| {r['row']} | {r['description']} | {r['setting']} "
                         f"| {len(r['seeds'])} | {r['passes']:g} | {' | '.join(cells)} "
                         f"| {r['train_seconds']:,.0f} | {_speed(r, len(r['seeds']))} |")
        if group["pairs"]:
            lines += [
                "",
                "| paired comparison | seeds | Δ test accuracy [95% CI] | Δ macro F1 [95% CI] "
                "| Δ ECE [95% CI] |",
                "|---|---:|---:|---:|---:|",
            ]
            for p in group["pairs"]:
                cells = [_points(p["intervals"][m], p["diffs"][m]) for m, _ in METRICS]
                lines.append(f"| {p['label']} ({p['a']} − {p['b']}) | {p['n']} "
                             f"| {' | '.join(cells)} |")
    if not summary:
        lines += ["", "No runs yet."]
    return "\n".join(lines) + "\n"


def sweep_points(runs: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(rho, test accuracy %) of the clean SAM runs, each run once: a row copied from another
    (rho-0.05 from sam, `same_run_as`) would draw its seeds twice."""
    return sorted((m["params"]["train"]["rho"], 100 * m["test"]["accuracy"]) for m in runs
                  if (m["row"].startswith("rho-") or m["row"] == "sam")
                  and not m.get("same_run_as"))


def figure(summary: list[dict[str, Any]], path: Path) -> None:
    """Per CPU class and dtype: accuracy per row (seeds as dots), the rho sweep, and the paired
    differences with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(summary), 3, figsize=(17, 4.8 * len(summary)), squeeze=False)
    for (ax_rows, ax_rho, ax_pairs), group in zip(axes, summary, strict=True):
        mine = group["runs"]
        names = [r["row"] for r in group["rows"]]
        for i, r in enumerate(group["rows"]):
            seeds = [100 * m["test"]["accuracy"] for m in mine if m["row"] == r["row"]]
            ax_rows.plot(seeds, [i] * len(seeds), "o", color="tab:blue", alpha=0.5)
            mean, std = r["stats"]["accuracy"]
            ax_rows.errorbar(100 * mean, i, xerr=100 * (std or 0), fmt="|", color="black",
                             markersize=14, capsize=3)
        ax_rows.set_yticks(range(len(names)), names)
        ax_rows.invert_yaxis()
        ax_rows.set(xlabel="test accuracy (%)", title="per row: seeds and mean ± std")
        sweep = sweep_points(mine)
        if sweep:
            ax_rho.plot(*zip(*sweep, strict=True), "o", color="tab:blue", alpha=0.5,
                        label="SAM (seeds)")
            rhos = sorted({rho for rho, _ in sweep})
            means = [statistics.fmean(a for r, a in sweep if r == rho) for rho in rhos]
            ax_rho.plot(rhos, means, "-", color="tab:blue", label="SAM (mean)")
        for row, style in (("sgd", "tab:red"), ("sgd-compute", "tab:orange")):
            accs = [100 * m["test"]["accuracy"] for m in mine if m["row"] == row]
            if accs:
                ax_rho.axhline(statistics.fmean(accs), color=style, lw=1, label=row)
        asam = [100 * m["test"]["accuracy"] for m in mine if m["row"] == "asam"]
        if asam:
            ax_rho.axhline(statistics.fmean(asam), color="tab:green", ls="--", lw=1,
                           label="asam (rho 1.0)")
        ax_rho.set(xlabel="rho", ylabel="test accuracy (%)", title="rho sweep (clean labels)")
        ax_rho.legend(fontsize=8)
        for i, p in enumerate(group["pairs"]):
            interval = p["intervals"]["accuracy"]
            diffs = [100 * d for d in p["diffs"]["accuracy"]]
            ax_pairs.plot(diffs, [i] * len(diffs), "o", color="tab:blue", alpha=0.5)
            if interval is not None:
                mean, low, high = (100 * v for v in interval)
                ax_pairs.errorbar(mean, i, xerr=[[mean - low], [high - mean]], fmt="s",
                                  color="black", capsize=4)
        ax_pairs.axvline(0, color="grey", lw=1)
        ax_pairs.set_yticks(range(len(group["pairs"])),
                            [p["label"].removeprefix("SAM − SGD, ")
                             .removesuffix(", equal epochs, clean labels")
                             for p in group["pairs"]])
        ax_pairs.invert_yaxis()
        ax_pairs.set(xlabel="SAM (or a variant) − SGD test accuracy (points)",
                     title="paired by seed: mean, 95% t CI")
        where = f"{group['cpu_class']}, {group['dtype']}, {group['model'].split(',')[0]}: "
        for ax in (ax_rows, ax_rho, ax_pairs):
            ax.set_title(where + ax.get_title(), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(runs: list[dict[str, Any]], source: Path, markdown_path: Path,
           figure_path: Path) -> str:
    summary = summarize(runs)
    text = markdown(summary, source.name)
    write_text(markdown_path, text)
    if summary:
        figure(summary, figure_path)
    return text


# --- the command -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="all",
                        help=f"comma-separated rows ({', '.join(ROWS)}) or groups (all, "
                        f"{', '.join(DEFAULT_SEEDS)}); default all")
    parser.add_argument("--seeds", help="seeds for every chosen row, e.g. 0,1,2 (default: "
                        + ", ".join(f"{g} 0..{n - 1}" for g, n in DEFAULT_SEEDS.items()) + ")")
    parser.add_argument("--threads", type=int,
                        help="train.threads for every run (default: params.yaml's)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny runs (" + ", ".join(f"{k}={cli_value(v)}" for k, v in
                                                      SMOKE.items()) + ") into *_smoke files")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan, its estimated cost and the dvc commands; run "
                        "nothing")
    parser.add_argument("--summarize-only", action="store_true",
                        help="rebuild the table and the figure from the JSON")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="queue even with uncommitted or untracked files (not reproducible)")
    parser.add_argument("--poll-seconds", type=float, default=10.0)
    parser.add_argument("--json", help="default bench/results/sam_study.json")
    parser.add_argument("--markdown", help="default bench/results/sam_study.md")
    parser.add_argument("--figure", help="default bench/results/sam_study.png (not committed)")
    args = parser.parse_args(argv)
    stem = "sam_study_smoke" if args.smoke else "sam_study"
    args.json = Path(args.json or RESULTS / f"{stem}.json")
    args.markdown = Path(args.markdown or RESULTS / f"{stem}.md")
    args.figure = Path(args.figure or RESULTS / f"{stem}.png")
    return args


def seeds_for(rows: list[str], spec: str | None) -> dict[str, list[int]]:
    if spec:
        seeds = sorted({int(s) for s in spec.split(",") if s.strip()})
        return {row: seeds for row in rows}
    return {row: list(range(DEFAULT_SEEDS[ROWS[row].group])) for row in rows}


def load_runs(path: Path, what: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text(encoding="utf-8"))["runs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FmnistError(f"{path}: not a {what} results file ({exc})") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (kill, a CI timeout) and SIGINT (Ctrl+C, also in a script's background job where
    # bash would have it ignored) stop the study alike: run_jobs removes its experiments
    signals.install()
    try:
        return _main(args)
    except FmnistError as exc:
        print(f"sam_study: {exc}", file=sys.stderr)
        return 2
    except signals.Interrupted as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _main(args: argparse.Namespace) -> int:
    runs = load_runs(args.json, "sam_study")
    filled = fill_speeds(runs, Experiments(ROOT).show)
    if filled and not args.dry_run:
        write_json(args.json, {"runs": runs})
        print(f"sam_study: plain-epoch speed of {filled} earlier run(s) read from their "
              "experiment commits", file=sys.stderr)
    if args.summarize_only:
        print(report(runs, args.json, args.markdown, args.figure))
        return 0
    base = load_params(ROOT / "params.yaml")
    rows = select_rows(args.rows)
    extra = {**(SMOKE if args.smoke else {}),
             **({"train.threads": args.threads} if args.threads is not None else {})}
    plan = make_plan(base, rows, seeds_for(rows, args.seeds), predict_machine, runs, extra)
    for copied in plan.copies:
        runs = record(runs, copied)
    if plan.copies and not args.dry_run:
        write_json(args.json, {"runs": runs})
    where = plan.jobs[0].machine if plan.jobs else predict_machine(base)
    tta = load_runs(RESULTS / "time_to_accuracy.json", "time_to_accuracy")
    rate, source = seconds_per_pass(base, where, runs, tta)
    overhead = overhead_seconds(runs, where)
    total = estimate(plan.jobs, rate, overhead)
    for line in plan.stale:
        print(f"sam_study: stale, runs again: {line}", file=sys.stderr)
    print(f"sam_study: {len(plan.jobs)} experiment(s) to run on {where['cpu_class']}, "
          f"{where['dtype']}, {where['threads']} thread(s) ({plan.held} held in "
          f"{args.json.name}, {len(plan.copies)} copied from a row with the same params); "
          f"estimated {duration(total)} "
          f"({source}{'' if rate is None else f'; + {overhead:.0f} s per experiment'})",
          flush=True)
    if args.dry_run:
        for job in plan.jobs:
            print(f"  {'+'.join(job.rows)} seed {job.seed}: dvc exp run --queue evaluate "
                  f"{' '.join(job.set_args())}")
        return 0
    progress = Progress(0)
    if plan.jobs:
        exps = Experiments(ROOT)
        dirty = exps.dirty()
        if dirty and not args.allow_dirty:
            raise FmnistError(
                f"uncommitted or untracked files ({', '.join(dirty[:3])}"
                f"{', ...' if len(dirty) > 3 else ''}): queued experiments run the tracked "
                "files of a git stash; commit first, or pass --allow-dirty")
        progress = run_jobs(exps, plan.jobs, args.json, runs, dirty=bool(dirty),
                            poll_s=args.poll_seconds, status_s=max(6 * args.poll_seconds, 15))
        runs = load_runs(args.json, "sam_study")
    print(report(runs, args.json, args.markdown, args.figure))
    if progress.failed:
        print(f"sam_study: {len(progress.failed)} experiment(s) failed: "
              f"{', '.join(progress.failed)}; rerun to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

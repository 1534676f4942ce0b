"""bench/sam_study.py: the plan, the resume, the paired statistics and the report without DVC;
one end-to-end smoke run with real `dvc exp run --queue` experiments."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from project_files import load_bench_script

from fmnist import signals
from fmnist.params import load_params

REPO = Path(__file__).resolve().parents[1]
DEBIAN_DATA = Path("/usr/share/datasets/fashion-mnist")
HERE = {"cpu_class": "AMX", "dtype": "bfloat16", "threads": 2}


study = load_bench_script("sam_study")


@pytest.fixture
def base() -> dict[str, Any]:
    """params.yaml with the schedule these tests reason about."""
    params = load_params(REPO / "params.yaml")
    params["seed"] = 42
    params["preprocess"].update(train_subset=None, label_noise=0.0)
    params["train"].update(optimizer="sam", rho=0.05, adaptive=False, epochs=16,
                           sam_start=0.75, sam_every=1, threads=0)
    return params


def here(params: dict[str, Any]) -> dict[str, Any]:
    return dict(HERE)


def stored_run(job: Any, row: str, accuracy: float = 0.93, **machine: Any) -> dict[str, Any]:
    """What the study records for a finished experiment of `job`, as `row`."""
    files = {
        "evaluate": {"accuracy": accuracy, "f1_macro": accuracy - 0.001, "ece": 0.05},
        "train_metrics": {"val_acc": accuracy},
        "train_timing": {"train_seconds": 250.0, "images_per_s": 3000.0},
        "train_run": {"machine": {**HERE, **machine}},
        "params": job.params,
    }
    entry = study.entry_from_files(files, job, rev="ab" * 20, baseline="cd" * 20, dirty=False,
                                   wall_seconds=300.0)
    return {**entry, "row": row}


# --- rows and params ---------------------------------------------------------------------------


@pytest.mark.parametrize(("epochs", "sam_start", "sam_every", "expected"), [
    (16, 0.75, 1, 20),  # the default: SAM in the last quarter costs a quarter more
    (8, 0.0, 1, 16),  # SAM every step doubles the passes
    (10, 0.5, 2, 13),  # 12.5 rounds half up
    (12, 1.0, 1, 12),  # no SAM step at all
])
def test_equal_compute_epochs_counts_two_passes_per_sam_step(
    epochs: int, sam_start: float, sam_every: int, expected: int
) -> None:
    train = {"epochs": epochs, "sam_start": sam_start, "sam_every": sam_every}
    assert study.equal_compute_epochs(train) == expected


def test_equal_compute_row_reads_the_schedule_from_params(base: dict[str, Any]) -> None:
    base["train"].update(epochs=12, sam_start=0.5)
    plan = study.make_plan(base, ["sgd-compute"], {"sgd-compute": [0]}, here, [])
    [job] = plan.jobs
    assert job.overrides["train.epochs"] == 18
    assert job.overrides["train.optimizer"] == "sgd"
    assert job.params["train"]["epochs"] == 18


def test_equal_compute_under_smoke_uses_the_smoke_epochs(base: dict[str, Any]) -> None:
    plan = study.make_plan(base, ["sgd-compute"], {"sgd-compute": [0]}, here, [],
                           extra={"train.epochs": 4})
    assert plan.jobs[0].params["train"]["epochs"] == 5


def test_rows_and_groups_select_in_table_order() -> None:
    assert study.select_rows("sam,sgd") == ["sam", "sgd"]
    assert study.select_rows("noise") == ["sam-noise20", "sgd-noise20", "sam-noise40",
                                          "sgd-noise40"]
    assert study.select_rows("sweep") == ["rho-0", "rho-0.02", "rho-0.05", "rho-0.1", "rho-0.2"]
    assert study.select_rows("all") == list(study.ROWS)
    with pytest.raises(study.FmnistError, match="unknown row 'adam'"):
        study.select_rows("sam,adam")


def test_default_seeds_three_for_comparisons_one_for_the_sweep() -> None:
    seeds = study.seeds_for(["sam", "sgd-compute", "sgd-noise40", "rho-0.2", "asam"], None)
    assert seeds == {"sam": [0, 1, 2], "sgd-compute": [0, 1, 2], "sgd-noise40": [0, 1, 2],
                     "rho-0.2": [0], "asam": [0]}
    assert study.seeds_for(["rho-0"], "3,1") == {"rho-0": [1, 3]}


def test_label_noise_and_asam_rows_set_their_params(base: dict[str, Any]) -> None:
    plan = study.make_plan(base, ["sgd-noise40", "asam"], {"sgd-noise40": [1], "asam": [0]},
                           here, [])
    noisy, asam = plan.jobs
    assert noisy.params["preprocess"]["label_noise"] == 0.4
    assert noisy.params["train"]["optimizer"] == "sgd" and noisy.params["seed"] == 1
    assert asam.params["train"]["adaptive"] is True and asam.params["train"]["rho"] == 1.0
    assert "-S" in asam.set_args() and "train.adaptive=true" in asam.set_args()


# --- the plan: resume from the JSON ------------------------------------------------------------


def test_resume_skips_what_the_json_holds(base: dict[str, Any]) -> None:
    first = study.make_plan(base, ["sam", "sgd"], {"sam": [0, 1], "sgd": [0, 1]}, here, [])
    assert [(j.row, j.seed) for j in first.jobs] == [("sam", 0), ("sam", 1), ("sgd", 0),
                                                     ("sgd", 1)]
    runs = [stored_run(first.jobs[0], "sam"), stored_run(first.jobs[3], "sgd")]
    again = study.make_plan(base, ["sam", "sgd"], {"sam": [0, 1], "sgd": [0, 1]}, here, runs)
    assert [(j.row, j.seed) for j in again.jobs] == [("sam", 1), ("sgd", 0)]
    assert again.held == 2 and again.stale == []


def test_a_run_on_another_cpu_class_or_thread_count_is_not_held(base: dict[str, Any]) -> None:
    [job] = study.make_plan(base, ["sam"], {"sam": [0]}, here, []).jobs
    for machine in ({"cpu_class": "AVX2"}, {"threads": 1}, {"dtype": "float32"}):
        runs = [stored_run(job, "sam", **machine)]
        assert len(study.make_plan(base, ["sam"], {"sam": [0]}, here, runs).jobs) == 1


def test_a_run_with_changed_params_is_stale_and_runs_again(base: dict[str, Any]) -> None:
    [job] = study.make_plan(base, ["sam"], {"sam": [0]}, here, []).jobs
    old = stored_run(job, "sam")
    old["params"]["train"]["epochs"] = 12
    plan = study.make_plan(base, ["sam"], {"sam": [0]}, here, [old])
    assert len(plan.jobs) == 1
    assert plan.stale == ["sam seed 0: train.epochs"]


def test_a_param_added_since_the_run_does_not_make_it_stale(base: dict[str, Any]) -> None:
    [job] = study.make_plan(base, ["sam"], {"sam": [0]}, here, []).jobs
    old = stored_run(job, "sam")
    del old["params"]["train"]["adaptive"]  # as if recorded before the key existed
    old["params"]["train"]["retired_key"] = 1  # or after one was removed
    plan = study.make_plan(base, ["sam"], {"sam": [0]}, here, [old])
    assert plan.jobs == [] and plan.held == 1


def test_a_run_from_before_an_optional_model_key_is_that_key_off(base: dict[str, Any]) -> None:
    """A run recorded before model.pool_ceil_mode existed trained floor-mode pooling: it holds
    the default's result, not a ceil-mode study's."""
    [job] = study.make_plan(base, ["sam"], {"sam": [0]}, here, []).jobs
    old = stored_run(job, "sam")
    del old["params"]["model"]["pool_ceil_mode"]
    assert study.make_plan(base, ["sam"], {"sam": [0]}, here, [old]).held == 1
    ceil = {**base, "model": {**base["model"], "pool_ceil_mode": True}}
    plan = study.make_plan(ceil, ["sam"], {"sam": [0]}, here, [old])
    assert len(plan.jobs) == 1 and plan.held == 0 and plan.copies == []
    # nor is it the twin of another row's ceil-mode run with otherwise equal params
    plan = study.make_plan(ceil, ["rho-0.05"], {"rho-0.05": [0]}, here, [old])
    assert len(plan.jobs) == 1 and plan.copies == []


def test_a_new_default_model_adds_runs_beside_the_old_models(base: dict[str, Any]) -> None:
    """Rerunning the study after the default model changed keeps the old model's runs (their
    own key, their own table section) instead of replacing them."""
    [job] = study.make_plan(base, ["sam"], {"sam": [0]}, here, []).jobs
    old = stored_run(job, "sam", accuracy=0.93)
    wider = {**base, "model": {**base["model"], "channels": [16, 32, 96, 192]}}
    plan = study.make_plan(wider, ["sam"], {"sam": [0]}, here, [old])
    [new_job] = plan.jobs
    assert plan.stale == []
    runs = study.record([old], stored_run(new_job, "sam", accuracy=0.94))
    assert len(runs) == 2
    sections = study.summarize(runs)
    assert [g["model"].split(",")[0] for g in sections] == ["16/32/64/128 x2", "16/32/96/192 x2"]
    assert "model 16/32/96/192 x2" in study.markdown(sections)


def test_rows_with_the_same_params_share_one_experiment(base: dict[str, Any]) -> None:
    plan = study.make_plan(base, ["sam", "rho-0.05", "rho-0.1"],
                           {"sam": [0], "rho-0.05": [0], "rho-0.1": [0]}, here, [])
    assert [j.rows for j in plan.jobs] == [["sam", "rho-0.05"], ["rho-0.1"]]


def test_a_stored_run_with_the_same_params_is_copied_not_rerun(base: dict[str, Any]) -> None:
    [job] = study.make_plan(base, ["sam"], {"sam": [0]}, here, []).jobs
    plan = study.make_plan(base, ["rho-0.05"], {"rho-0.05": [0]}, here,
                           [stored_run(job, "sam")])
    assert plan.jobs == []
    [copied] = plan.copies
    assert copied["row"] == "rho-0.05" and copied["same_run_as"] == "sam"


def test_record_replaces_the_run_of_the_same_key(base: dict[str, Any]) -> None:
    [job] = study.make_plan(base, ["sam"], {"sam": [0]}, here, []).jobs
    runs = study.record([stored_run(job, "sam", 0.90)], stored_run(job, "sam", 0.95))
    assert [r["test"]["accuracy"] for r in runs] == [0.95]


# --- the paired statistics ---------------------------------------------------------------------


def test_paired_interval_matches_a_hand_computation() -> None:
    # SAM 93.0, 94.0, 95.0 and SGD 92.0, 92.5, 94.5 on seeds 0..2: differences 1.0, 1.5, 0.5
    # points, mean 1.0, sample std 0.5, t(0.975, 2) = 4.302653, half width 4.302653 * 0.5 /
    # sqrt(3) = 1.242069 points.
    runs = [{"row": row, "seed": seed, "test": {"accuracy": acc}}
            for row, accs in (("sam", (0.930, 0.940, 0.950)), ("sgd", (0.920, 0.925, 0.945)))
            for seed, acc in enumerate(accs)]
    diffs = study.paired(runs, "sam", "sgd", "accuracy")
    assert diffs == pytest.approx([0.010, 0.015, 0.005])
    mean, low, high = study.t_interval(diffs)
    assert mean == pytest.approx(0.010)
    assert low == pytest.approx(0.010 - 0.01242069, abs=1e-7)
    assert high == pytest.approx(0.010 + 0.01242069, abs=1e-7)


def test_pairs_match_by_seed_and_drop_unpaired_seeds() -> None:
    runs = [{"row": "sgd", "seed": 2, "test": {"accuracy": 0.90}},
            {"row": "sam", "seed": 0, "test": {"accuracy": 0.95}},
            {"row": "sam", "seed": 2, "test": {"accuracy": 0.91}},
            {"row": "sgd", "seed": 0, "test": {"accuracy": 0.92}},
            {"row": "sgd", "seed": 1, "test": {"accuracy": 0.99}}]
    assert study.paired(runs, "sam", "sgd", "accuracy") == pytest.approx([0.03, 0.01])


def test_no_interval_from_a_single_seed() -> None:
    assert study.t_interval([0.01]) is None


# --- the report --------------------------------------------------------------------------------


def _three_seed_runs(base: dict[str, Any]) -> list[dict[str, Any]]:
    plan = study.make_plan(base, ["sam", "sgd", "rho-0.2"],
                           {"sam": [0, 1, 2], "sgd": [0, 1, 2], "rho-0.2": [0]}, here, [])
    accuracy = {("sam", 0): 0.930, ("sam", 1): 0.940, ("sam", 2): 0.950,
                ("sgd", 0): 0.920, ("sgd", 1): 0.925, ("sgd", 2): 0.945, ("rho-0.2", 0): 0.91}
    return [stored_run(j, j.row, accuracy[j.row, j.seed]) for j in plan.jobs]


def test_markdown_shows_rows_pairs_and_the_machine(base: dict[str, Any]) -> None:
    text = study.markdown(study.summarize(_three_seed_runs(base)))
    assert "## CPU class AMX, training dtype bfloat16, 2 thread(s)" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| ")}
    assert "| 3 | 20 | 94.00% ± 1.00% |" in rows["sam"]
    assert "| 3 | 16 | 93.00% ± 1.32% |" in rows["sgd"]
    assert "| 1 | 20 | 91.00% |" in rows["rho-0.2"]  # one seed: no spread shown
    [pair] = [line for line in text.splitlines() if line.startswith("| SAM − SGD")]
    assert "equal epochs" in pair and "| 3 | +1.00 [-0.24, +2.24] |" in pair
    assert "equal compute" not in text  # no sgd-compute runs yet: no empty comparison


def test_sweep_rows_are_paired_with_sgd_once(base: dict[str, Any]) -> None:
    runs = _three_seed_runs(base)
    # rho-0.05 as the study stores it: sam's runs copied under another name (same params)
    runs += [{**r, "row": "rho-0.05", "same_run_as": "sam"} for r in runs if r["row"] == "sam"]
    labels = [p["label"] for p in study.summarize(runs)[0]["pairs"]]
    assert "SAM rho 0.2 − SGD, equal epochs, clean labels" in labels
    assert not any("rho 0.05" in label for label in labels)  # same numbers as SAM − SGD
    text = study.markdown(study.summarize(runs))
    [line] = [ln for ln in text.splitlines() if ln.startswith("| SAM rho 0.2 − SGD")]
    assert "| 1 | -1.00 (1 seed, no interval) |" in line


def test_the_rho_sweep_draws_a_copied_run_once(base: dict[str, Any]) -> None:
    runs = _three_seed_runs(base)
    runs += [{**r, "row": "rho-0.05", "same_run_as": "sam"} for r in runs if r["row"] == "sam"]
    points = study.sweep_points(runs)
    sam_rho = base["train"]["rho"]
    assert sorted(a for rho, a in points if rho == sam_rho) == pytest.approx([93.0, 94.0, 95.0])
    assert [a for rho, a in points if rho == 0.2] == pytest.approx([91.0])


def _speed_tsv(plain: list[float], sam: list[float]) -> str:
    lines = ["step\timages_per_s"] + [f"{i}\t{v}" for i, v in enumerate(plain + sam)]
    return "\n".join(lines) + "\n"


def test_plain_speed_is_the_median_of_the_epochs_before_the_sam_phase(
    base: dict[str, Any]
) -> None:
    # 12 plain epochs (sam_start 0.75 of 16), then 4 at SAM's half speed
    tsv = _speed_tsv([1000.0] * 6 + [2000.0] * 5 + [1900.0], [500.0] * 4)
    assert study.plain_images_per_s(tsv, base["train"]) == pytest.approx(1450.0)
    sgd = {**base["train"], "optimizer": "sgd"}  # every epoch is plain
    assert study.plain_images_per_s(tsv, sgd) == pytest.approx(1000.0)
    from_start = {**base["train"], "sam_start": 0.0}
    assert study.plain_images_per_s(tsv, from_start) is None
    assert study.plain_images_per_s(None, base["train"]) is None
    with_time = "timestamp\tstep\timages_per_s\n1.5\t0\t900.0\n"  # column order: by name
    assert study.plain_images_per_s(with_time, sgd) == pytest.approx(900.0)
    assert study.plain_images_per_s("not\ta speed file\nx\ty\n", sgd) is None


def test_a_recorded_run_keeps_its_plain_speed(base: dict[str, Any]) -> None:
    [job] = study.make_plan(base, ["sam"], {"sam": [0]}, here, []).jobs
    files = {"evaluate": {"accuracy": 0.9}, "train_timing": {"train_seconds": 1.0,
                                                              "images_per_s": 1.0},
             "train_run": {"machine": dict(HERE)}, "params": job.params,
             "train_speed": _speed_tsv([1800.0] * 12, [900.0] * 4)}
    entry = study.entry_from_files(files, job, rev="ab" * 20, baseline="cd" * 20,
                                   dirty=False, wall_seconds=None)
    assert entry["plain_images_per_s"] == pytest.approx(1800.0)


def test_fill_speeds_reads_the_experiment_commits_of_runs_without_one(
    base: dict[str, Any]
) -> None:
    runs = _three_seed_runs(base)
    sam = [r for r in runs if r["row"] == "sam"]
    sam[0]["exp_rev"], sam[1]["exp_rev"] = "kept", "gone"
    sam[2]["plain_images_per_s"] = 1234.0
    asked = []

    def show(rev: str, path: str) -> str | None:
        asked.append(rev)
        assert path == study.SPEED_TSV
        return _speed_tsv([1800.0] * 12, [900.0] * 4) if rev == "kept" else None

    for r in runs:
        if r["row"] != "sam":
            r["exp_rev"] = "gone"
    assert study.fill_speeds(runs, show) == 1
    assert [r.get("plain_images_per_s") for r in sam] == [1800.0, None, 1234.0]
    assert "kept" in asked and len(asked) == len(runs) - 1  # a run with its speed: not read


def test_markdown_shows_the_plain_speed_and_how_many_seeds_it_covers(
    base: dict[str, Any]
) -> None:
    runs = _three_seed_runs(base)
    sam = [r for r in runs if r["row"] == "sam"]
    sam[0]["plain_images_per_s"], sam[1]["plain_images_per_s"] = 1800.0, 1000.0
    rows = {line.split("|")[1].strip(): line
            for line in study.markdown(study.summarize(runs)).splitlines()
            if line.startswith("| ")}
    assert rows["sam"].endswith("| 1,400 (2 of 3) |")
    assert rows["sgd"].endswith("| 3,000 |")  # SGD: the mean speed stands in
    assert rows["rho-0.2"].endswith("| n/a |")


def test_markdown_of_no_runs_says_so() -> None:
    assert "No runs yet." in study.markdown([])


def test_summarize_only_rebuilds_table_and_figure(base: dict[str, Any], tmp_path: Path) -> None:
    store = tmp_path / "sam_study.json"
    store.write_text(json.dumps({"runs": _three_seed_runs(base)}))
    out_md, out_png = tmp_path / "sam_study.md", tmp_path / "sam_study.png"
    assert study.main(["--summarize-only", "--json", str(store), "--markdown", str(out_md),
                       "--figure", str(out_png)]) == 0
    assert "SAM − SGD, equal epochs" in out_md.read_text()
    assert out_png.read_bytes().startswith(b"\x89PNG")


# --- the DVC side, without DVC ------------------------------------------------------------------


def test_queue_status_table_is_parsed() -> None:
    text = ("Task     Name                   Created    Status\n"
            "31c61e8  ss-sam-s0-0a1b2c       09:49 AM   Success\n"
            "e42f11c  ss-sgd-s0-0a1b2c       09:49 AM   Running\n"
            "f00ba12  ss-rho-0.1-s0-0a1b2c   Dec 01     Failed\n"
            "\nWorker status: 1 active, 0 idle\n")
    tasks, workers = study.parse_queue_status(text)
    assert tasks == {"ss-sam-s0-0a1b2c": "Success", "ss-sgd-s0-0a1b2c": "Running",
                     "ss-rho-0.1-s0-0a1b2c": "Failed"}
    assert workers == 1
    assert study.NAME_RE.match("ss-rho-0.1-s0-0a1b2c")["row"] == "rho-0.1"


def test_entry_keys_by_what_the_run_measured(base: dict[str, Any]) -> None:
    [job] = study.make_plan(base, ["sgd"], {"sgd": [1]}, here, []).jobs
    entry = stored_run(job, "sgd", cpu_class="AVX2", threads=1)
    assert (entry["cpu_class"], entry["dtype"], entry["threads"]) == ("AVX2", "bfloat16", 1)
    assert entry["seed"] == 1 and entry["passes"] == 16
    assert entry["overrides"] == {"train.optimizer": "sgd", "seed": 1}


class FakeExperiments:
    """Finishes one queued experiment per poll; notes what the JSON held at each read."""

    def __init__(self, base: dict[str, Any], store: Path) -> None:
        self.base, self.store = base, store
        self.queued: list[str] = []
        self.params: dict[str, dict[str, Any]] = {}
        self.polls = 0
        self.seen_in_json: list[int] = []

    def queue(self, job: Any) -> None:
        self.queued.append(job.name)
        self.params[job.name] = job.params

    def start(self) -> None:
        pass

    def status(self) -> tuple[dict[str, str], int]:
        return {n: "Queued" for n in self.queued}, 1

    def refs(self) -> dict[str, tuple[str, str]]:
        self.polls += 1
        return {name: (f"{i:040x}", "cd" * 20)
                for i, name in enumerate(self.queued[: self.polls - 1])}

    def files(self, rev: str) -> dict[str, Any]:
        held = json.loads(self.store.read_text())["runs"] if self.store.exists() else []
        self.seen_in_json.append(len(held))
        name = self.queued[int(rev, 16)]
        return {"evaluate": {"accuracy": 0.9, "f1_macro": 0.9, "ece": 0.05},
                "train_metrics": {}, "train_timing": {"train_seconds": 1.0,
                                                       "images_per_s": 1.0},
                "train_run": {"machine": dict(HERE)}, "params": self.params[name]}


def test_each_experiment_is_written_as_it_finishes(base: dict[str, Any], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    plan = study.make_plan(base, ["sam", "sgd"], {"sam": [0], "sgd": [0]}, here, [])
    store = tmp_path / "sam_study.json"
    exps = FakeExperiments(base, store)
    progress = study.run_jobs(exps, plan.jobs, store, [], dirty=False, poll_s=0, status_s=60)
    assert progress.done == 2 and progress.failed == []
    assert exps.seen_in_json == [0, 1]  # the first was on disk before the second was read
    runs = json.loads(store.read_text())["runs"]
    assert {(r["row"], r["seed"]) for r in runs} == {("sam", 0), ("sgd", 0)}
    out = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] for line in out] == ["sam_study: [1/2", "sam_study: [2/2"]


def test_a_finished_experiment_of_an_earlier_invocation_is_collected_not_rerun(
    base: dict[str, Any], tmp_path: Path
) -> None:
    plan = study.make_plan(base, ["sam"], {"sam": [0]}, here, [])
    store = tmp_path / "sam_study.json"
    exps = FakeExperiments(base, store)
    exps.queued = ["ss-sam-s0-abcdef"]
    exps.params["ss-sam-s0-abcdef"] = plan.jobs[0].params
    exps.polls = 1  # its ref exists already
    progress = study.run_jobs(exps, plan.jobs, store, [], dirty=False, poll_s=0, status_s=60)
    assert progress.done == 1 and exps.queued == ["ss-sam-s0-abcdef"]  # nothing new queued
    [run] = json.loads(store.read_text())["runs"]
    assert run["experiment"] == "ss-sam-s0-abcdef" and run["baseline_rev"] == "cd" * 20


# --- end to end: real DVC experiments ----------------------------------------------------------

GIT_ENV = {
    "GIT_AUTHOR_NAME": "e2e",
    "GIT_AUTHOR_EMAIL": "e2e@example.invalid",
    "GIT_COMMITTER_NAME": "e2e",
    "GIT_COMMITTER_EMAIL": "e2e@example.invalid",
}


def _project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: what a commit of the work tree would hold."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    names = [name for name in out.split("\0") if name and (REPO / name).is_file()]
    return [*names, "scripts/plots/offline.html"]  # generated, ignored, used by dvc plots


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **GIT_ENV, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(not DEBIAN_DATA.is_dir(),
                    reason="needs the Debian package dataset-fashion-mnist (scripts/install.sh)")
def test_smoke_study_queues_real_experiments_and_a_rerun_runs_nothing(tmp_path: Path) -> None:
    repo = tmp_path / "project"
    for name in _project_files():
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["sources"] = [str(DEBIAN_DATA)]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(repo, "git", "init", "-q", "-b", "main")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "project")  # `dvc exp` needs a commit
    command = (sys.executable, "bench/sam_study.py", "--smoke", "--rows", "sam,sgd",
               "--seeds", "0", "--poll-seconds", "2")

    first = _run(repo, *command)
    assert "2 experiment(s) to run" in first.stdout
    assert "[1/2]" in first.stdout and "[2/2]" in first.stdout
    store = repo / "bench" / "results" / "sam_study_smoke.json"
    runs = json.loads(store.read_text())["runs"]
    assert sorted((r["row"], r["seed"]) for r in runs) == [("sam", 0), ("sgd", 0)]
    head = _run(repo, "git", "rev-parse", "HEAD").stdout.strip()
    for run in runs:
        assert 0 <= run["test"]["accuracy"] <= 1 and "ece" in run["test"]
        assert run["baseline_rev"] == head
        assert run["params"]["preprocess"]["train_subset"] == 1000
        assert run["params"]["train"]["optimizer"] == run["row"]
        # the result is a real experiment: its commit holds the metrics the JSON copied
        shown = _run(repo, "git", "show", f"{run['exp_rev']}:reports/evaluate/metrics.json")
        assert json.loads(shown.stdout)["accuracy"] == run["test"]["accuracy"]
    # written as each experiment finished, not all at the end of the queue
    assert runs[0]["finished"] != runs[1]["finished"]
    assert (repo / "bench" / "results" / "sam_study_smoke.md").is_file()
    refs = _run(repo, "git", "for-each-ref", "refs/exps/").stdout.splitlines()
    assert len(refs) == 2

    again = _run(repo, *command)
    assert "0 experiment(s) to run" in again.stdout
    assert _run(repo, "git", "for-each-ref", "refs/exps/").stdout.splitlines() == refs
    assert json.loads(store.read_text())["runs"] == runs
    assert all(math.isfinite(r["train_seconds"]) for r in runs)


def _timed_default(base: dict[str, Any], seconds: float, **train: Any) -> dict[str, Any]:
    """A time_to_accuracy run of params.yaml's model and schedule, as that bench stores it."""
    keys = ("epochs", "sam_start", "sam_every", "ema_decay", "rho", "lr", "batch_size")
    return {"cpu_class": HERE["cpu_class"], "dtype": HERE["dtype"], "allocator": "kept",
            "model": study.model_config(base["model"]), "train_seconds": seconds,
            "train": {**{k: base["train"][k] for k in keys}, **train}}


def test_the_estimate_uses_only_runs_of_the_default_recipe(base: dict[str, Any]) -> None:
    """A run with other augmentation (another recipe) does not time the default; a run stored
    before `augment` was recorded does."""
    other = {**base["train"]["augment"], "crop_padding": base["train"]["augment"]["crop_padding"]
             + 1}
    runs = [_timed_default(base, 500.0), _timed_default(base, 900.0, augment=other)]
    rate, source = study.seconds_per_pass(base, HERE, [], runs)
    assert source.startswith("1 time_to_accuracy run")
    assert rate == pytest.approx(500.0 / (study.passes(base["train"]) * study.train_images(
        {"preprocess": {**base["preprocess"], "train_subset": None}})))


# --- stopping: Ctrl+C, kill, a background job's SIGINT --------------------------------------

STOP_PROBE = """
import importlib.util, os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # what bash does to a script's background jobs
spec = importlib.util.spec_from_file_location("sam_study", sys.argv[1])
study = importlib.util.module_from_spec(spec)
sys.modules["sam_study"] = study
spec.loader.exec_module(study)
def stopped_midway(args):
    os.kill(os.getpid(), int(sys.argv[2]))
    time.sleep(10)
    return 0
study._main = stopped_midway
sys.exit(study.main(["--dry-run"]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_kill_and_a_background_sigint_stop_the_study_with_the_shells_status(signum: int) -> None:
    proc = subprocess.run([sys.executable, "-c", STOP_PROBE, str(REPO / "bench" / "sam_study.py"),
                           str(int(signum))], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 128 + signum, proc.stderr


@pytest.fixture
def stop_handlers(signal_state_restored: None) -> Any:
    signals.install()
    yield


class StoppedExperiments(FakeExperiments):
    """A stop signal arrives while queueing the `stop_at_queue`-th job, or at a poll; what the
    cleanup asked to remove is noted."""

    def __init__(self, base: dict[str, Any], store: Path, *, stop_at_queue: int = 0,
                 stop_at_poll: int = 0, again_in_cleanup: bool = False) -> None:
        super().__init__(base, store)
        self.stop_at_queue, self.stop_at_poll = stop_at_queue, stop_at_poll
        self.again_in_cleanup = again_in_cleanup
        self.removed: list[str] = []

    def queue(self, job: Any) -> None:
        with signals.deferred():  # as Experiments._run runs every dvc command
            if len(self.queued) + 1 == self.stop_at_queue:
                os.kill(os.getpid(), signal.SIGTERM)
            super().queue(job)

    def refs(self) -> dict[str, tuple[str, str]]:
        if self.polls + 1 == self.stop_at_poll:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().refs()

    def stop(self, names: Any, status: dict[str, str]) -> None:
        if self.again_in_cleanup:
            os.kill(os.getpid(), signal.SIGTERM)
        self.removed = [n for n in names if status.get(n) in ("Queued", "Running")]


@pytest.mark.parametrize("where", [{"stop_at_queue": 2}, {"stop_at_poll": 2},
                                   {"stop_at_poll": 2, "again_in_cleanup": True}])
def test_a_stop_removes_every_queued_experiment_of_the_study(
    base: dict[str, Any], tmp_path: Path, stop_handlers: Any, where: dict[str, Any]
) -> None:
    plan = study.make_plan(base, ["sam", "sgd"], {"sam": [0, 1], "sgd": [0]}, here, [])
    exps = StoppedExperiments(base, tmp_path / "sam_study.json", **where)
    with pytest.raises(KeyboardInterrupt):
        study.run_jobs(exps, plan.jobs, tmp_path / "sam_study.json", [], dirty=False, poll_s=0,
                       status_s=60)
    # the job being queued when the signal came counts too: dvc finished queueing it first
    assert len(exps.queued) == (2 if "stop_at_queue" in where else 3)
    assert exps.removed == exps.queued


def test_a_dvc_command_finishes_before_a_stop_interrupts(tmp_path: Path,
                                                         stop_handlers: Any) -> None:
    with pytest.raises(KeyboardInterrupt):
        study.Experiments(tmp_path)._run("sh", "-c", "kill -TERM $PPID; sleep 1; touch done")
    assert (tmp_path / "done").exists()

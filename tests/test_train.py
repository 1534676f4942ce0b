"""Training on tiny synthetic data: it learns, it is deterministic, it resumes exactly."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from project_files import write_prepared

from fmnist import allocator
from fmnist.accel import cpu_class, select_backend
from fmnist.checkpoint import load_checkpoint
from fmnist.constants import CLASS_NAMES
from fmnist.data import Prepared, Split
from fmnist.model import build_model
from fmnist.modelfile import read_model_file
from fmnist.params import load_params
from fmnist.reproducibility import configure_torch
from fmnist.train import build_optimizer, fit

REPO = Path(__file__).resolve().parents[1]


def _split(n: int, seed: int) -> Split:
    """Three classes anyone can tell apart, flip-invariant: bright top, bottom or centre band."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 3
    images = rng.integers(0, 50, size=(n, 28, 28), dtype=np.uint8)
    rows = {0: slice(2, 10), 1: slice(18, 26), 2: slice(10, 18)}
    for i, label in enumerate(labels):
        images[i, rows[int(label)], 4:24] = rng.integers(180, 256)
    return Split(images=images, labels=labels)


DATA = Prepared(
    train=_split(256, 0), val=_split(96, 1), test=_split(48, 2), class_names=CLASS_NAMES
)


def tiny_params(**train: Any) -> dict[str, Any]:
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["model"].update(channels=[4, 8], convs_per_block=1, hidden=16, dropout=0.1)
    params["train"].update(batch_size=32, epochs=2, threads=1, lr=0.05, device="cpu")
    params["ipex"].update(enabled=False, dtype="float32")
    # SAM from the first step and no weight average, whatever params.yaml's default recipe says
    params["train"].update(sam_start=0.0, ema_decay=0.0)
    params["train"].update(train)
    return params


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _quality(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in e.items() if k not in ("seconds", "images_per_s")} for e in history]


def test_training_learns_separable_classes() -> None:
    result = fit(DATA, tiny_params(epochs=3), progress=False)
    assert result.metrics["val_acc"] >= 0.9  # chance is 1/3
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    assert not result.model.training
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert set(result.timing) >= {"train_seconds", "images_per_s_mean", "epoch_seconds"}
    assert "images_per_s" not in result.metrics and "seconds" not in result.metrics


def test_rerun_gives_bit_identical_weights_and_metrics() -> None:
    a = fit(DATA, tiny_params(), progress=False)
    b = fit(DATA, tiny_params(), progress=False)
    assert _same_weights(a.model, b.model)
    assert _quality(a.history) == _quality(b.history)
    assert a.metrics == b.metrics


def test_training_skips_the_nan_fill_of_new_tensors_and_loses_no_bit(
    keep_nan_fill_on: Callable[[], None],
) -> None:
    # deterministic mode fills every new tensor with NaN: a debugging aid, slow, changes no result
    params = tiny_params(epochs=3, ema_decay=0.9, sam_start=0.5)
    default = fit(DATA, params, progress=False)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory is False
    keep_nan_fill_on()
    filled = fit(DATA, params, progress=False)
    assert _same_weights(default.model, filled.model)
    assert _quality(default.history) == _quality(filled.history)
    assert default.metrics == filled.metrics


@pytest.mark.usefixtures("torch_determinism_restored")
def test_configure_torch_turns_the_nan_fill_off_on_the_cpu_only() -> None:
    configure_torch(1, torch.device("meta"))  # any non-CPU device: the fill as torch sets it
    assert torch.utils.deterministic.fill_uninitialized_memory is True
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    configure_torch(1)  # no device: the CPU
    assert torch.utils.deterministic.fill_uninitialized_memory is False
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    configure_torch(1, torch.device("meta"))
    assert torch.utils.deterministic.fill_uninitialized_memory is True
    configure_torch(1, torch.device("cpu"))
    assert torch.utils.deterministic.fill_uninitialized_memory is False


def test_scoring_fewer_epochs_skips_their_validation_and_changes_nothing_else() -> None:
    # EMA on: the scored model is the weight average, which must not move when not scored
    params = tiny_params(epochs=3, ema_decay=0.9)
    every = fit(DATA, params, progress=False)
    seen: list[tuple[int, float]] = []
    last_only = fit(DATA, params, progress=False, scored_epochs=(),
                    on_epoch_end=lambda epoch, stats: seen.append((epoch, stats["val_acc"])))
    assert _same_weights(every.model, last_only.model)
    assert [e for e, _ in seen] == [1, 2, 3]
    assert all(np.isnan(v) for _, v in seen[:2]) and seen[2][1] == every.metrics["val_acc"]
    assert last_only.metrics["best_val_acc"] == every.metrics["val_acc"]
    second = fit(DATA, params, progress=False, scored_epochs=[2])
    assert [np.isnan(e["val_acc"]) for e in second.history] == [True, False, False]
    assert second.history[1]["val_acc"] == every.history[1]["val_acc"]


def test_other_seed_gives_other_weights() -> None:
    params = tiny_params()
    params["seed"] = 7
    assert not _same_weights(fit(DATA, tiny_params(), progress=False).model,
                             fit(DATA, params, progress=False).model)


@pytest.mark.parametrize("late", [{}, {"sam_start": 0.5, "ema_decay": 0.9}],
                         ids=["sam-every-2", "late-sam-and-ema"])
def test_resume_from_epoch_one_checkpoint_ends_with_same_weights(
    tmp_path: Path, late: dict[str, float]
) -> None:
    path, kept = tmp_path / "train.ckpt", tmp_path / "after_epoch_1.ckpt"

    def keep_first(epoch: int, stats: dict[str, float]) -> None:
        if epoch == 1:
            shutil.copy(path, kept)

    params = tiny_params(epochs=3, optimizer="sam", sam_every=2, augment={"flip": True,
                                                                          "crop_padding": 2},
                         **late)
    full = fit(DATA, params, checkpoint_path=path, on_epoch_end=keep_first, progress=False)
    shutil.copy(kept, path)  # as if the run had been killed during epoch 2
    epochs_run: list[int] = []
    resumed = fit(DATA, params, checkpoint_path=path, progress=False,
                  on_epoch_end=lambda epoch, stats: epochs_run.append(epoch))
    assert epochs_run == [2, 3]
    assert _same_weights(full.model, resumed.model)
    assert _quality(full.history) == _quality(resumed.history)


CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np, torch
from fmnist.constants import CLASS_NAMES
from fmnist.data import Prepared, Split
from fmnist.train import fit

torch.set_num_threads(1)
work = Path(sys.argv[1])
arrays = np.load(work / "data.npz")
split = lambda name: Split(images=arrays[name + "_x"], labels=arrays[name + "_y"])
data = Prepared(train=split("train"), val=split("val"), test=split("test"),
                class_names=CLASS_NAMES)
params = json.loads((work / "params.json").read_text())
stall = sys.argv[2] == "stall"

def on_epoch_end(epoch, stats):
    if stall and epoch == 1:
        (work / "epoch1.done").touch()
        time.sleep(600)  # killed here

result = fit(data, params, checkpoint_path=work / "train.ckpt", on_epoch_end=on_epoch_end,
             progress=False)
torch.save(result.model.state_dict(), work / "final.pt")
"""


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    params = tiny_params(epochs=2)
    np.savez(tmp_path / "data.npz", **{f"{name}_{kind}": getattr(getattr(DATA, name), attr)
                                      for name in ("train", "val", "test")
                                      for kind, attr in (("x", "images"), ("y", "labels"))})
    (tmp_path / "params.json").write_text(json.dumps(params))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path), "stall"], env=env)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "epoch1.done").exists():
            assert child.poll() is None, "child died before its first epoch ended"
            assert time.monotonic() < deadline, "child never finished epoch 1"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert (tmp_path / "train.ckpt").exists() and not (tmp_path / "final.pt").exists()

    rerun = subprocess.run([sys.executable, str(script), str(tmp_path), "go"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    resumed = torch.load(tmp_path / "final.pt", weights_only=True)
    uninterrupted = fit(DATA, params, progress=False).model.state_dict()
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_checkpoint_from_other_params_is_discarded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "train.ckpt"
    fit(DATA, tiny_params(epochs=1, lr=0.2), checkpoint_path=path, progress=False)
    assert path.exists()
    capsys.readouterr()
    epochs_run: list[int] = []
    params = tiny_params(epochs=1)
    resumed = fit(DATA, params, checkpoint_path=path, progress=False,
                  on_epoch_end=lambda epoch, stats: epochs_run.append(epoch))
    assert "train: checkpoint from other params, data or code, starting fresh" in \
        capsys.readouterr().err
    assert epochs_run == [1]
    assert _same_weights(resumed.model, fit(DATA, params, progress=False).model)


def test_checkpoint_from_other_code_is_discarded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit_source
) -> None:
    path = tmp_path / "train.ckpt"
    params = tiny_params(epochs=2)
    with pytest.raises(_Stop):  # killed after epoch 1: its checkpoint stays
        fit(DATA, params, checkpoint_path=path, progress=False,
            on_epoch_end=lambda epoch, stats: _stop_after_first(epoch))
    assert path.exists()
    edit_source("sam.py")
    capsys.readouterr()
    epochs_run: list[int] = []
    fit(DATA, params, checkpoint_path=path, progress=False,
        on_epoch_end=lambda epoch, stats: epochs_run.append(epoch))
    assert "starting fresh" in capsys.readouterr().err
    assert epochs_run == [1, 2]


class _Stop(Exception):
    pass


def _stop_after_first(epoch: int) -> None:
    if epoch == 1:
        raise _Stop


def test_fit_says_which_backend_dtype_and_cpu_class_it_chose(
    capsys: pytest.CaptureFixture[str],
) -> None:
    params = tiny_params(epochs=1)
    params["ipex"]["dtype"] = "auto"
    result = fit(DATA, params, progress=True)
    expected = "bfloat16" if result.backend.bf16 else "float32"
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("train: native"))
    assert f"in {expected} (ipex.dtype auto" in line and f"CPU {cpu_class()}" in line


def test_checkpoint_holds_optimizer_scheduler_and_rng_states(tmp_path: Path) -> None:
    path = tmp_path / "train.ckpt"
    params = tiny_params(epochs=1)
    fit(DATA, params, checkpoint_path=path, progress=False)
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 1 and len(raw["history"]) == 1
    assert {"model", "optimizer", "scheduler", "rng", "fingerprint"} <= set(raw)
    assert {"python", "numpy", "torch", "generators"} <= set(raw["rng"])
    assert "augment" in raw["rng"]["generators"]
    assert load_checkpoint(path, raw["fingerprint"]) is not None


def test_sam_starting_after_the_last_step_is_plain_sgd() -> None:
    sgd = fit(DATA, tiny_params(optimizer="sgd", epochs=2), progress=False)
    never = fit(DATA, tiny_params(optimizer="sam", sam_start=1.0, epochs=2), progress=False)
    assert _same_weights(sgd.model, never.model)


def test_late_sam_is_sgd_first_then_sam() -> None:
    sgd = fit(DATA, tiny_params(optimizer="sgd", epochs=2), progress=False)
    full = fit(DATA, tiny_params(optimizer="sam", epochs=2), progress=False)
    late = fit(DATA, tiny_params(optimizer="sam", sam_start=0.5, epochs=2), progress=False)
    # epoch 1 of 2 is all SGD: its validation numbers are SGD's exactly
    assert late.history[0]["val_acc"] == sgd.history[0]["val_acc"]
    assert late.history[0]["val_loss"] == sgd.history[0]["val_loss"]
    assert not _same_weights(late.model, sgd.model)
    assert not _same_weights(late.model, full.model)


def test_is_sam_step_counts_from_sam_start() -> None:
    from fmnist.sam import SAM
    from fmnist.train import is_sam_step

    sam = SAM([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    steps = [s for s in range(12) if is_sam_step(sam, s, sam_from=5, sam_every=3)]
    assert steps == [5, 8, 11]
    assert not is_sam_step(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 5, 0, 1)


def test_ema_model_is_the_saved_one_and_the_average_of_the_weights() -> None:
    from fmnist.ema import WeightAverage

    plain = fit(DATA, tiny_params(epochs=2), progress=False)
    averaged = fit(DATA, tiny_params(epochs=2, ema_decay=0.9), progress=False)
    assert not _same_weights(plain.model, averaged.model)
    # the validation numbers are the averaged model's, and it still learns
    assert averaged.history[-1]["val_acc"] >= 0.9

    source = torch.nn.Sequential(torch.nn.Linear(2, 3, bias=False), torch.nn.BatchNorm1d(3))
    ema = WeightAverage(copy.deepcopy(source), source, decay=0.5)
    start = source[0].weight.detach().clone()
    with torch.no_grad():
        source[0].weight.add_(1.0)
    source.train()(torch.randn(4, 2))  # moves the BN statistics and counts one batch
    ema.update()  # step 1: decay min(0.5, 2/11) = 2/11
    torch.testing.assert_close(ema.model[0].weight, start * (2 / 11) + (start + 1.0) * (9 / 11))
    torch.testing.assert_close(ema.model[1].running_mean, source[1].running_mean * (9 / 11))
    assert ema.model[1].num_batches_tracked.item() == 1  # integer buffers are copied


def test_sgd_and_sam_both_learn_and_differ() -> None:
    sgd = fit(DATA, tiny_params(optimizer="sgd", epochs=3), progress=False)
    sam = fit(DATA, tiny_params(optimizer="sam", epochs=3), progress=False)
    assert sgd.metrics["val_acc"] >= 0.9 and sam.metrics["val_acc"] >= 0.9
    assert not _same_weights(sgd.model, sam.model)


def test_sam_every_second_step_differs_from_every_step() -> None:
    every = fit(DATA, tiny_params(sam_every=1), progress=False)
    second = fit(DATA, tiny_params(sam_every=2), progress=False)
    assert second.metrics["val_acc"] > 0.5
    assert not _same_weights(every.model, second.model)


def test_with_rho_zero_sam_steps_equal_plain_steps() -> None:
    """rho=0: the second pass sees the same weights and (replayed) dropout mask as the first,
    so SAM steps and plain steps agree and sam_every cannot matter."""
    a = fit(DATA, tiny_params(rho=0.0, sam_every=1, epochs=1), progress=False)
    b = fit(DATA, tiny_params(rho=0.0, sam_every=1000, epochs=1), progress=False)
    for (key, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                           strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_both_dtypes_train_and_weights_stay_float32(dtype: str) -> None:
    params = tiny_params(epochs=3)
    params["ipex"]["dtype"] = dtype
    result = fit(DATA, params, progress=False)
    assert result.metrics["val_acc"] >= 0.9
    assert result.backend.dtype == getattr(torch, dtype)
    assert all(v.dtype == torch.float32 for v in result.model.state_dict().values()
               if v.is_floating_point())


def test_step_schedule_decays_once_per_epoch() -> None:
    schedule = {"name": "step", "pct_start": 0.25, "step_size": 1, "gamma": 0.5}
    result = fit(DATA, tiny_params(epochs=3, lr=0.08, schedule=schedule), progress=False)
    assert [e["lr"] for e in result.history] == pytest.approx([0.08, 0.04, 0.02])


def test_constant_schedule_keeps_the_learning_rate() -> None:
    schedule = {"name": "constant", "pct_start": 0.25, "step_size": 1, "gamma": 0.5}
    result = fit(DATA, tiny_params(lr=0.03, schedule=schedule), progress=False)
    assert [e["lr"] for e in result.history] == [0.03, 0.03]


def test_onecycle_ends_near_zero_learning_rate() -> None:
    result = fit(DATA, tiny_params(epochs=2, lr=0.1), progress=False)
    assert result.history[0]["lr"] > 0.01 and result.history[-1]["lr"] < 1e-3


def test_onecycle_with_a_one_step_warm_up_trains() -> None:
    # 128 examples in batches of 32: 4 steps, and 0.25 of them is the one step at which
    # OneCycleLR's warm-up phase has zero length (a 2-trial tune on a small slice hit it).
    params = tiny_params(epochs=1, lr=0.1, schedule={"name": "onecycle", "pct_start": 0.25,
                                                     "step_size": 1, "gamma": 0.5})
    result = fit(DATA, params, train_subset=128, progress=False)
    assert result.metrics["epochs"] == 1 and np.isfinite(result.metrics["train_loss"])


def test_train_subset_trains_on_fewer_examples() -> None:
    result = fit(DATA, tiny_params(epochs=1), train_subset=60, progress=False)
    assert result.metrics["train_examples"] == 60
    assert fit(DATA, tiny_params(epochs=1), progress=False).metrics["train_examples"] == 256


def test_on_epoch_end_gets_stats_and_may_stop_training() -> None:
    calls: list[tuple[int, dict[str, float]]] = []

    class Stop(Exception):
        pass

    def on_epoch_end(epoch: int, stats: dict[str, float]) -> None:
        calls.append((epoch, stats))
        raise Stop

    with pytest.raises(Stop):
        fit(DATA, tiny_params(epochs=3), on_epoch_end=on_epoch_end, progress=False)
    assert [epoch for epoch, _ in calls] == [1]
    assert set(calls[0][1]) == {"train_loss", "train_acc", "val_loss", "val_acc", "lr",
                                "images_per_s"}


def _load_stage():
    spec = importlib.util.spec_from_file_location("train_stage", REPO / "stages" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_writes_model_curves_metrics_and_timing_and_resumes_curves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_prepared(tmp_path, DATA)
    monkeypatch.chdir(tmp_path)
    for variable in (allocator.PRELOAD_VARIABLE, allocator.TUNABLES_VARIABLE,
                     *allocator.USER_SETTINGS):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(allocator, "_applied", None)  # as in a fresh train-stage process
    stage = _load_stage()
    params = tiny_params(epochs=2)
    stage.main(params)
    assert f"on CPU class {cpu_class()}" in capsys.readouterr().out

    payload = read_model_file("models/model.pth")
    assert payload["model_config"]["channels"] == [4, 8]
    # metrics.json and timing.json: a few numbers for `dvc exp show`; run.json: the rest.
    metrics = json.loads(Path("reports/train/metrics.json").read_text())
    assert set(metrics) == {"train_loss", "val_loss", "val_acc"}
    timing = json.loads(Path("reports/train/timing.json").read_text())
    assert set(timing) == {"images_per_s", "train_seconds"} and timing["images_per_s"] > 0
    run = json.loads(Path("reports/train/run.json").read_text())
    assert run["quality"]["epochs"] == 2 and run["quality"]["val_acc"] == metrics["val_acc"]
    assert run["backend"]["backend"] == "native" and run["backend"]["dtype"] == "float32"
    assert len(run["timing"]["epoch_seconds"]) == 2
    # a timing names the machine it came from
    assert run["machine"]["cpu_class"] == cpu_class() and run["machine"]["dtype"] == "float32"
    assert run["machine"]["threads"] == 1 and isinstance(run["machine"]["cpu_bf16_native"], bool)
    # how malloc ran shapes the seconds: on glibc, with nobody else's allocator settings, `fit`
    # pinned the thresholds
    on_glibc = platform.libc_ver()[0] == allocator.GLIBC
    assert run["machine"]["allocator"] == (allocator.KEPT if on_glibc else allocator.OWN)
    assert run["machine"]["nan_fill"] is False  # configure_torch's on a CPU
    assert [p.name for p in Path("reports").iterdir()] == ["train"]  # no staging folder left
    plots = Path("reports/train/plots/metrics")
    for name in ("train/loss.tsv", "train/acc.tsv", "val/loss.tsv", "val/acc.tsv", "lr.tsv",
                 "timing/images_per_s.tsv"):
        rows = (plots / name).read_text().splitlines()
        assert rows[0].split("\t") == ["step", Path(name).stem], name
        assert [r.split("\t")[0] for r in rows[1:]] == ["0", "1"], name
    assert not Path("checkpoints/train.ckpt").exists()

    # A run killed after epoch 1 of 3: the resumed stage replays epoch 1 into fresh curves.
    params3 = tiny_params(epochs=3)
    kept = tmp_path / "after_epoch_1.ckpt"

    def keep_first(epoch: int, stats: dict[str, float]) -> None:
        if epoch == 1:
            shutil.copy("checkpoints/train.ckpt", kept)

    fit(DATA, params3, checkpoint_path=Path("checkpoints/train.ckpt"), on_epoch_end=keep_first,
        progress=False)
    shutil.copy(kept, "checkpoints/train.ckpt")
    stage.main(params3)
    rows = (plots / "val/acc.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["0", "1", "2"]
    assert json.loads(Path("reports/train/run.json").read_text())["quality"]["epochs"] == 3


def test_checkpoint_with_right_fingerprint_but_wrong_tensors_starts_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "train.ckpt"
    params = tiny_params(epochs=2)
    with pytest.raises(_Stop):
        fit(DATA, params, checkpoint_path=checkpoint, progress=False,
            on_epoch_end=lambda epoch, stats: _stop_after_first(epoch))
    state = torch.load(checkpoint, weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 3)  # the fingerprint still matches
    torch.save(state, checkpoint)
    capsys.readouterr()

    resumed = fit(DATA, params, checkpoint_path=checkpoint, progress=False)
    message = capsys.readouterr().err
    assert f"checkpoint {checkpoint} does not fit this run" in message
    assert "starting fresh" in message and "Traceback" not in message
    fresh = fit(DATA, params, progress=False)
    assert _same_weights(resumed.model, fresh.model)
    assert _quality(resumed.history) == _quality(fresh.history)


def test_asam_eta_from_params_reaches_the_optimizer() -> None:
    params = tiny_params(optimizer="sam", adaptive=True, asam_eta=0.25)
    model = build_model(params["model"])
    _, optimizer = build_optimizer(model, params["train"], select_backend(params["ipex"], "cpu"))
    assert optimizer.param_groups[0]["eta"] == 0.25 and optimizer.param_groups[0]["adaptive"]

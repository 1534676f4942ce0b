"""Data-parallel training: 2 gloo ranks over loopback agree with each other and with 1 process.

Ranks are real processes (torch.multiprocessing, spawn) joined through a TCP store on
127.0.0.1; the data and model are tiny so the whole file takes well under a minute.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from project_files import write_prepared
from torch import nn

from fmnist.constants import CLASS_NAMES
from fmnist.data import Prepared, Split
from fmnist.distributed import (
    DistContext,
    init_from_env,
    maybe_relaunch_under_torchrun,
    rank_seed,
    torchrun_args,
)
from fmnist.errors import FmnistError
from fmnist.params import load_params
from fmnist.train import fit

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
TIMEOUT_S = 180


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
    params["model"].update(channels=[4], convs_per_block=1, hidden=16, dropout=0.1,
                           batch_norm=True)
    params["train"].update(batch_size=32, epochs=2, threads=1, lr=0.05, device="cpu",
                           distributed=True, compile=False)
    params["ipex"].update(enabled=False, dtype="float32")
    params["train"].update(sam_start=0.0, ema_decay=0.0)
    params["train"].update(train)
    return params


def one_step_params(sync_first: bool) -> dict[str, Any]:
    """One SAM step on one global batch of 32, nothing random, no batch statistics: N ranks
    with a synced first pass must then take exactly one process's step (up to rounding)."""
    params = tiny_params(
        epochs=1, sam_sync_first_step=sync_first, rho=0.5, lr=0.5, momentum=0.0,
        nesterov=False, weight_decay=0.0, label_smoothing=0.0,
        augment={"flip": False, "crop_padding": 0},
        schedule={"name": "constant", "pct_start": 0.25, "step_size": 1, "gamma": 0.5},
    )
    params["model"].update(batch_norm=False, dropout=0.0)
    return params


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# --- running ranks as processes ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank: int, port: int, params: dict[str, Any]) -> DistContext:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), GLOO_SOCKET_IFNAME="lo")
    dist = init_from_env(params["train"])
    assert dist.enabled and dist.rank == rank and dist.backend == "gloo"
    return dist


def _run_ranks(worker: Any, *args: Any) -> None:
    """worker(rank, port, *args) on WORLD spawned processes; fails on an error or a hang."""
    context = mp.start_processes(worker, args=(_free_port(), *args), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks still running after {TIMEOUT_S} s (a collective hung?)")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _quality(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in e.items() if k not in ("seconds", "images_per_s")} for e in history]


def _train_and_resume(rank: int, port: int, out: Path) -> None:
    """A 2-epoch SAM run with BN, dropout and augmentation, then a resume from epoch 1."""
    params = tiny_params()
    ckpt, kept = out / "train.ckpt", out / "after_epoch_1.ckpt"
    with _join_group(rank, port, params) as dist:

        def keep_first(epoch: int, stats: dict[str, float]) -> None:
            if epoch == 1 and dist.is_main:
                kept.write_bytes(ckpt.read_bytes())

        full = fit(DATA, params, checkpoint_path=ckpt, on_epoch_end=keep_first, progress=False,
                   dist=dist)
        dist.barrier()
        if dist.is_main:  # as if killed during epoch 2
            ckpt.write_bytes(kept.read_bytes())
        dist.barrier()
        epochs_run: list[int] = []
        resumed = fit(DATA, params, checkpoint_path=ckpt, progress=False, dist=dist,
                      on_epoch_end=lambda epoch, stats: epochs_run.append(epoch))
        torch.save({"full": _state(full.model), "resumed": _state(resumed.model),
                    "history": full.history, "resumed_history": resumed.history,
                    "epochs_run": epochs_run}, out / f"rank{rank}.pt")


def test_two_ranks_end_with_identical_weights_and_resume_exactly(tmp_path: Path) -> None:
    _run_ranks(_train_and_resume, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert _same(r0["full"], r1["full"])  # bitwise, BN running statistics included
    assert _quality(r0["history"]) == _quality(r1["history"])  # reduced metrics agree
    first, last = r0["history"][0], r0["history"][-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["val_acc"] > 0.5  # chance is 1/3
    assert r0["epochs_run"] == r1["epochs_run"] == [2]
    assert _same(r0["resumed"], r0["full"]) and _same(r1["resumed"], r1["full"])
    assert _quality(r0["resumed_history"]) == _quality(r0["history"])


def _counted_all_reduce(calls, bucket):  # noqa: ANN001 (DDP checks the hook's annotations)
    """A DDP communication hook: the default gradient average, counting its all-reduces."""
    calls["all_reduce"] += 1
    tensor = bucket.buffer().div_(WORLD)
    work = torch.distributed.all_reduce(tensor, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _sam_step_all_reduces(dist: DistContext) -> dict[str, int]:
    """All-reduce calls of one SAM step with and without no_sync around the first pass."""
    from fmnist.accel import select_backend
    from fmnist.model import build_model
    from fmnist.runtime import Runtime
    from fmnist.sam import SAM
    from fmnist.train import sam_step

    params = one_step_params(False)
    backend = select_backend(params["ipex"])
    model = build_model(params["model"])
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    net = dist.wrap(model)
    counter = {"all_reduce": 0}
    net.register_comm_hook(counter, _counted_all_reduce)
    x = torch.from_numpy(DATA.train.images[:16]).float().unsqueeze(1)
    y = torch.from_numpy(DATA.train.labels[:16])
    calls = {}
    for name, synced in (("synced", True), ("local", False)):
        before = counter["all_reduce"]
        runtime = Runtime(backend, dist, sync_first_pass=synced)
        sam_step(net, optimizer, x, y, nn.CrossEntropyLoss(), runtime)
        calls[name] = counter["all_reduce"] - before
    return calls


def _one_step(rank: int, port: int, out: Path) -> None:
    params = one_step_params(True)
    with _join_group(rank, port, params) as dist:
        synced = fit(DATA, params, train_subset=32, progress=False, dist=dist)
        local = fit(DATA, one_step_params(False), train_subset=32, progress=False, dist=dist)
        torch.save({"synced": _state(synced.model), "local": _state(local.model),
                    "synced_history": synced.history, "calls": _sam_step_all_reduces(dist)},
                   out / f"rank{rank}.pt")


def test_synced_first_pass_matches_one_process_and_local_first_pass_skips_an_all_reduce(
    tmp_path: Path,
) -> None:
    _run_ranks(_one_step, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    single = fit(DATA, one_step_params(True), train_subset=32, progress=False,
                 dist=DistContext())
    assert single.history[0]["epoch"] == 1 and len(single.history) == 1
    reference = _state(single.model)
    for rank in (r0, r1):
        for key, value in reference.items():
            torch.testing.assert_close(rank["synced"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert r0["synced_history"][0]["train_loss"] == pytest.approx(
        single.history[0]["train_loss"], rel=1e-6)
    assert _same(r0["local"], r1["local"])
    # m-sharpness: each rank's own ascent direction gives a visibly different step
    gap = max((r0["local"][k] - reference[k]).abs().max().item() for k in reference)
    assert gap > 1e-3
    assert r0["calls"] == r1["calls"] == {"synced": 2, "local": 1}


# --- single process: no process group, no launcher ---------------------------------------------


def test_without_torchrun_every_collective_is_a_no_op() -> None:
    dist = init_from_env({"distributed": True, "device": "cpu"}, env={})
    assert (dist.rank, dist.world_size, dist.is_main, dist.enabled) == (0, 1, True, False)
    model = nn.Linear(2, 2)
    t = torch.arange(3.0)
    assert dist.all_reduce_sum(t) is t
    assert dist.wrap(model) is model
    assert isinstance(dist.no_sync(model), nullcontext)
    assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.all_gather_object(3) == [3]
    dist.barrier()
    dist.shutdown()


def test_distributed_false_under_torchrun_trains_alone_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    dist = init_from_env({"distributed": False, "device": "cpu"}, env=env)
    assert dist.world_size == 1 and dist.is_main
    assert "train.distributed is false" in capsys.readouterr().err


def test_bad_launcher_environment_is_one_line_error() -> None:
    with pytest.raises(FmnistError, match="WORLD_SIZE='two'"):
        init_from_env({"distributed": True, "device": "cpu"}, env={"WORLD_SIZE": "two"})
    with pytest.raises(FmnistError, match="RANK=5"):
        init_from_env({"distributed": True, "device": "cpu"},
                      env={"WORLD_SIZE": "2", "RANK": "5"})


def test_rank_zero_draws_the_single_process_stream_and_other_ranks_their_own() -> None:
    assert rank_seed(42, 0) == 42
    seeds = {rank_seed(42, rank) for rank in range(1, 5)}
    assert len(seeds) == 4 and 42 not in seeds
    assert rank_seed(42, 1) == rank_seed(42, 1) != rank_seed(43, 1)
    assert all(0 <= s < 2**63 for s in seeds)


def test_relaunch_is_a_standalone_torchrun_unless_multi_node_is_configured() -> None:
    assert torchrun_args(["stages/train.py"], {}) == [
        "--standalone", "--nproc_per_node=2", "stages/train.py"]
    assert torchrun_args(["s.py"], {"NPROC_PER_NODE": "4"}) == [
        "--standalone", "--nproc_per_node=4", "s.py"]
    multi = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "10.0.0.8"}
    assert torchrun_args(["s.py"], multi) == ["--nproc_per_node=2", "s.py"]
    with pytest.raises(FmnistError, match="NPROC_PER_NODE='zero'"):
        torchrun_args(["s.py"], {"NPROC_PER_NODE": "zero"})


def test_no_relaunch_when_distributed_is_false_or_already_launched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not maybe_relaunch_under_torchrun(tiny_params(distributed=False), ["nothing.py"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not maybe_relaunch_under_torchrun(tiny_params(distributed=True), ["nothing.py"])


# --- the stage: python stages/train.py becomes torchrun, rank 0 writes the outputs -------------


@pytest.mark.slow
def test_stage_relaunches_under_torchrun_and_rank_zero_writes_outputs(tmp_path: Path) -> None:
    write_prepared(tmp_path, DATA)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(epochs=1)))
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK") and not k.startswith("PET_")}
    env.update(NPROC_PER_NODE="2", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONUNBUFFERED="1")
    run = subprocess.run([sys.executable, str(REPO / "stages" / "train.py")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "torchrun --standalone --nproc_per_node=2" in run.stderr
    assert run.stdout.count("train: 1 epochs") == 1  # only rank 0 reports
    run_record = json.loads((tmp_path / "reports/train/run.json").read_text())
    assert run_record["quality"]["epochs"] == 1 and run_record["backend"]["world_size"] == 2
    assert (tmp_path / "models/model.pth").is_file()
    assert not (tmp_path / "checkpoints/train.ckpt").exists()

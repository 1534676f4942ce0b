"""Training: a plain loop in the style of PyTorch's MNIST example.

`train_one_epoch` runs the batches (SAM's two passes, or a plain step), `evaluate_split`
scores a split, and `fit` wires model, optimizer, schedule, checkpoints and logging together.
Same params, seed, machine and thread count give the same weights, bit for bit, also when a
killed run is resumed from its last checkpoint.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fmnist import signals
from fmnist.accel import (
    Backend,
    describe,
    prepare_training,
    runtime_identity,
    select_backend,
    unwrap,
)
from fmnist.allocator import keep_freed_memory
from fmnist.checkpoint import (
    array_digest,
    discard_checkpoint,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from fmnist.data import BatchIterator, Prepared, Split, augment_batch
from fmnist.distributed import DistContext, rank_seed, single_process
from fmnist.ema import WeightAverage
from fmnist.inference import predict_logits
from fmnist.model import build_model
from fmnist.modelfile import plain_state_dict
from fmnist.preprocess import stratified_indices
from fmnist.reproducibility import configure_torch, rng_states, seed_everything, set_rng_states
from fmnist.runtime import Runtime
from fmnist.sam import SAM, disable_running_stats, same_rng
from fmnist.sources import code_digest

EVAL_BATCH_SIZE = 1000
# The augmentation generator's seed is the run's seed plus this, so it never shares a stream
# with the shuffling generators (seed + epoch).
AUGMENT_SEED_OFFSET = 1_000_003
PER_BATCH_SCHEDULES = ("onecycle", "cosine")
# What loading a checkpoint's state into freshly built objects raises when the state does not
# fit them (missing keys, other shapes or types).
UNRESTORABLE = (RuntimeError, KeyError, ValueError)

EpochCallback = Callable[[int, dict[str, float]], None]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FitResult:
    """The trained model (plain nn.Module, fp32, CPU, eval mode) and what the run measured."""

    model: nn.Module
    history: list[dict[str, float]]
    metrics: dict[str, float]
    timing: dict[str, Any]
    backend: Backend


@dataclass
class EpochStats:
    """`loss` is the plain cross-entropy of the training batches (as the model was when it
    saw them), without label smoothing, so that it reads on the same scale as val loss."""

    loss: float
    acc: float
    lr: float
    images: int
    seconds: float


# --- building blocks ---------------------------------------------------------------------------


def build_optimizer(
    model: nn.Module, train: dict[str, Any], backend: Backend
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Plain SGD -> backend preparation (IPEX gets the plain SGD) -> SAM around the result."""
    base = torch.optim.SGD(
        model.parameters(),
        lr=train["lr"],
        momentum=train["momentum"],
        nesterov=train["nesterov"],
        weight_decay=train["weight_decay"],
    )
    model, base = prepare_training(model, base, backend)
    if train["optimizer"] == "sgd":
        return model, base
    optimizer = SAM(model.parameters(), base, rho=train["rho"], adaptive=train["adaptive"],
                    eta=train["asam_eta"])
    return model, optimizer


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: dict[str, Any], steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """onecycle and cosine step once per batch, step once per epoch, constant never.

    onecycle keeps train.momentum fixed (no momentum cycling), so the params mean what they say.
    The scheduler drives the base optimizer, whose param_groups SAM shares.
    """
    optimizer = base_optimizer(optimizer)
    schedule = train["schedule"]
    total = train["epochs"] * steps_per_epoch
    name = schedule["name"]
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=train["lr"],
            total_steps=total,
            pct_start=onecycle_pct_start(schedule["pct_start"], total),
            cycle_momentum=False,
        )
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=schedule["step_size"], gamma=schedule["gamma"]
        )
    return None


def onecycle_pct_start(pct_start: float, total_steps: int) -> float:
    """pct_start, moved off the one value OneCycleLR divides by zero at.

    OneCycleLR's warm-up phase ends at step pct_start * total - 1; when that is exactly 0
    (e.g. 4 steps at 0.25: a short tune trial) its first phase has zero length and it raises
    ZeroDivisionError. Then warm up for 1.5 steps instead, which keeps both phases non-empty.
    """
    if total_steps >= 2 and abs(pct_start * total_steps - 1) < 1e-9:
        return 1.5 / total_steps
    return pct_start


def base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that takes the actual steps: SAM's base optimizer, or the optimizer itself."""
    return optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer


def subset_split(split: Split, n: int | None, seed: int) -> Split:
    """A stratified subset of n examples (tune's short trials); None or n >= len keeps all."""
    if n is None or n >= len(split.labels):
        return split
    index = stratified_indices(split.labels, n, seed)
    return Split(images=split.images[index], labels=split.labels[index])


# --- one step, one epoch, one evaluation --------------------------------------------------------


def sam_step(
    model: nn.Module,
    optimizer: SAM,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    runtime: Runtime,
) -> torch.Tensor:
    """SAM's two passes: ascend to the worst nearby weights, then descend with that gradient.

    Both passes autocast alike and share one dropout mask; BN running statistics come from the
    first pass only. `runtime.first_pass` wraps the first forward *and* backward: under DDP it
    is `no_sync`, so each rank ascends along its own shard's gradient (m-sharpness).
    Returns the first pass's logits (the epoch's accuracy and plain loss come from them).
    """
    with same_rng(runtime.device) as replay:
        with runtime.first_pass(model):
            with runtime.autocast():
                logits = model(x)
                loss = loss_fn(logits, y)
            loss.backward()
        optimizer.first_step(zero_grad=True)
        with replay(), disable_running_stats(model), runtime.autocast():
            loss_fn(model(x), y).backward()
    optimizer.second_step(zero_grad=True)
    return logits.detach()


def plain_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    runtime: Runtime,
) -> torch.Tensor:
    """One ordinary step of `optimizer` (plain SGD, or SAM's base optimizer between SAM steps);
    returns its logits."""
    with runtime.autocast():
        logits = model(x)
        loss = loss_fn(logits, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return logits.detach()


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    loader: BatchIterator,
    runtime: Runtime,
    *,
    loss_fn: LossFn,
    augment: dict[str, Any],
    generator: torch.Generator,
    sam_every: int,
    first_step: int,
    sam_from: int = 0,
    ema: WeightAverage | None = None,
    desc: str = "",
    progress: bool = True,
) -> EpochStats:
    """One pass over the loader; `scheduler` (if any) steps after every batch, `ema` (if any)
    averages the weights after every step.

    Step number `first_step + i` decides SAM or plain: plain before step `sam_from`, then a SAM
    step every `sam_every` steps. Loss, accuracy and images are summed over the runtime's ranks.
    """
    model.train()
    total_loss = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    seen = 0
    lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress)
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(bar):
        signals.check()  # an interrupt a finalizer swallowed still stops training here
        x = augment_batch(
            x, flip=augment["flip"], crop_padding=augment["crop_padding"], generator=generator
        )
        x, y = runtime.batch(x, y)
        lr = optimizer.param_groups[0]["lr"]
        if is_sam_step(optimizer, first_step + i, sam_from, sam_every):
            logits = sam_step(model, optimizer, x, y, loss_fn, runtime)
        else:
            logits = plain_step(model, base_optimizer(optimizer), x, y, loss_fn, runtime)
        if ema is not None:
            ema.update()
        if scheduler is not None:
            scheduler.step()
        # Plain cross-entropy, not the (label-smoothed) training loss: comparable to val loss.
        total_loss += F.cross_entropy(logits.float(), y, reduction="sum").double().cpu()
        correct += (logits.argmax(dim=1) == y).sum().cpu()
        seen += len(y)
        if progress and (i % 20 == 0 or i == len(loader) - 1):
            bar.set_postfix(
                loss=f"{total_loss.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}",
                refresh=False,
            )
    bar.close()
    seconds = time.perf_counter() - start
    # float64 sums: exact for the counts, the same bytes on every rank.
    totals = runtime.all_reduce_sum(torch.stack([total_loss, correct.double(),
                                              torch.tensor(seen, dtype=torch.float64)]))
    total, hits, seen = totals[0].item(), totals[1].item(), int(totals[2].item())
    return EpochStats(
        loss=total / max(seen, 1),
        acc=hits / max(seen, 1),
        lr=lr,
        images=seen,
        seconds=seconds,
    )


def is_sam_step(optimizer: torch.optim.Optimizer, step: int, sam_from: int, sam_every: int) -> bool:
    """SAM from step `sam_from` on (late-phase SAM), every `sam_every`-th step; plain before."""
    return isinstance(optimizer, SAM) and step >= sam_from and (step - sam_from) % sam_every == 0


def evaluate_split(
    model: nn.Module, split: Split, backend: Backend, *, batch_size: int = EVAL_BATCH_SIZE
) -> tuple[float, float]:
    """(mean cross-entropy without label smoothing, accuracy) of the model on a split."""
    logits = torch.from_numpy(
        predict_logits(model, split.images, batch_size=batch_size, backend=backend)
    )
    labels = torch.as_tensor(np.asarray(split.labels), dtype=torch.int64)
    loss = F.cross_entropy(logits.double(), labels).item()
    acc = (logits.argmax(dim=1) == labels).double().mean().item()
    return loss, acc


# --- the run ------------------------------------------------------------------------------------


def fit(
    data: Prepared,
    params: dict[str, Any],
    *,
    epochs: int | None = None,
    train_subset: int | None = None,
    on_epoch_end: EpochCallback | None = None,
    checkpoint_path: Path | None = None,
    live: Any = None,
    progress: bool = True,
    dist: DistContext | None = None,
    scored_epochs: Collection[int] | None = None,
) -> FitResult:
    """Train params["model"] with params["train"] on data.train, validating on data.val.

    `epochs` and `train_subset` override params (tune's short trials). After each epoch: the
    checkpoint is written (if `checkpoint_path`), the epoch is logged to `live` (a dvclive.Live),
    then `on_epoch_end(epoch_number, stats)` runs (1-based; it may raise to stop training).
    A matching checkpoint at `checkpoint_path` is resumed from, and its history replayed to `live`.

    Under torchrun, `dist` (see fmnist.distributed) makes this one rank of a DDP run: its share
    of every global batch, metrics summed over ranks, and rank 0 alone writing the checkpoint,
    logging to `live` and showing progress. Every rank returns the same model and history.

    `scored_epochs` (1-based) limits the validation pass to those epochs and the last; the others
    get NaN val_loss/val_acc. Tune scores only where its pruner looks: a pass over the 6,000
    validation images costs half an epoch on its 4,000 training images. None: every epoch.
    """
    dist = dist or single_process()
    progress = progress and dist.is_main
    train = dict(params["train"])
    if epochs is not None:
        train["epochs"] = epochs
    seed = params["seed"]
    backend = select_backend(params["ipex"], train["device"], train["compile"])
    if dist.enabled:
        backend = replace(backend, device=dist.device)
    configure_torch(train["threads"], backend.device)
    keep_freed_memory()
    if progress:
        print(f"train: {describe(backend, params['ipex']['dtype'])}", file=sys.stderr, flush=True)
    seed_everything(seed)

    train_split = subset_split(data.train, train_subset, seed)
    model = build_model(params["model"])
    model, optimizer = build_optimizer(model, train, backend)
    ema = None
    if train["ema_decay"] > 0:
        average = build_model(params["model"]).to(backend.device, memory_format=torch.channels_last)
        ema = WeightAverage(average, unwrap(model), train["ema_decay"])
    if dist.rank:  # same initial weights everywhere, a dropout stream of each rank's own
        torch.manual_seed(rank_seed(seed, dist.rank))
    net = dist.wrap(model)
    runtime = Runtime(backend, dist, sync_first_pass=train["sam_sync_first_step"])
    loader = BatchIterator(
        train_split.images, train_split.labels, train["batch_size"], shuffle=True, seed=seed,
        rank=dist.rank, world_size=dist.world_size,
    )
    steps_per_epoch = len(loader)
    sam_from = round(train["sam_start"] * train["epochs"] * steps_per_epoch)
    scheduler = build_scheduler(optimizer, train, steps_per_epoch)
    per_batch = train["schedule"]["name"] in PER_BATCH_SCHEDULES
    per_batch_scheduler = scheduler if per_batch else None
    per_epoch_scheduler = None if per_batch else scheduler
    generator = torch.Generator().manual_seed(rank_seed(seed, dist.rank) + AUGMENT_SEED_OFFSET)
    generators = {"augment": generator}
    loss_fn = nn.CrossEntropyLoss(label_smoothing=train["label_smoothing"])

    history: list[dict[str, float]] = []
    print_ = tqdm.write if progress else (lambda _message: None)
    run_id = ""
    if checkpoint_path is not None:
        shape: dict[str, Any] = {"train_subset": train_subset, "world_size": dist.world_size}
        if scored_epochs is not None:  # a resumed history must be scored alike
            shape["scored_epochs"] = sorted(scored_epochs)
        run_id = fingerprint(
            {**params, "train": {**train, **shape}},
            array_digest(train_split.images, train_split.labels, data.val.images, data.val.labels),
            code=code_digest("fmnist.train"),
            runtime=runtime_identity(backend),
        )
        # Rank 0 reads the checkpoint (and reports on it); every rank resumes from its copy.
        state = dist.broadcast_object(
            load_checkpoint(checkpoint_path, run_id) if dist.is_main else None
        )
        if state is not None:
            problem = None
            try:
                history = restore(state, model, optimizer, scheduler, generators,
                                  rank=dist.rank, ema=ema)
            except UNRESTORABLE as exc:  # right fingerprint, wrong tensors: tampered or a bug
                problem = _one_line(exc)
            problems = [p for p in dist.all_gather_object(problem) if p]  # the ranks agree
            if problems:
                # A failed load_state_dict may have half-filled the model: build all anew.
                if dist.is_main:
                    discard_checkpoint(checkpoint_path, problems[0])
                dist.barrier()
                return fit(data, params, epochs=epochs, train_subset=train_subset,
                           on_epoch_end=on_epoch_end, checkpoint_path=checkpoint_path,
                           live=live, progress=progress, dist=dist,
                           scored_epochs=scored_epochs)
            if dist.is_main:
                print(f"train: resuming after epoch {len(history)} from {checkpoint_path}",
                      file=sys.stderr, flush=True)
    live = live if dist.is_main else None
    if live is not None:
        for entry in history:
            log_epoch(live, entry)

    wall_start = time.perf_counter()
    for epoch in range(len(history), train["epochs"]):
        loader.set_epoch(epoch)
        stats = train_one_epoch(
            net,
            optimizer,
            per_batch_scheduler,
            loader,
            runtime,
            loss_fn=loss_fn,
            augment=train["augment"],
            generator=generator,
            sam_every=train["sam_every"],
            first_step=epoch * steps_per_epoch,
            sam_from=sam_from,
            ema=ema,
            desc=f"epoch {epoch + 1}/{train['epochs']}",
            progress=progress,
        )
        if per_epoch_scheduler is not None:
            per_epoch_scheduler.step()
        dist.broadcast_buffers(model)  # the ranks' BN statistics differ after their last batch
        if ema is not None:
            dist.broadcast_buffers(ema.model)
        if scored_epochs is None or epoch + 1 in scored_epochs or epoch + 1 == train["epochs"]:
            val_loss, val_acc = evaluate_split(ema.model if ema else model, data.val, backend)
        else:
            val_loss = val_acc = math.nan
        entry = {
            "epoch": epoch + 1,
            "train_loss": stats.loss,
            "train_acc": stats.acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": stats.lr,
            "images_per_s": stats.images / stats.seconds if stats.seconds > 0 else 0.0,
            "seconds": stats.seconds,
        }
        history.append(entry)
        print_(
            f"epoch {epoch + 1}/{train['epochs']}: train loss {stats.loss:.4f} "
            f"acc {stats.acc:.4f}, val loss {val_loss:.4f} acc {val_acc:.4f}, "
            f"lr {stats.lr:.4g}, {entry['images_per_s']:,.0f} images/s"
        )
        if checkpoint_path is not None:
            rank_rngs = dist.all_gather_object(rng_states(generators))
            if dist.is_main:
                state = snapshot(model, optimizer, scheduler, generators, history, ema=ema)
                state["rank_rng"] = rank_rngs[1:]
                save_checkpoint(checkpoint_path, run_id, state)
        if live is not None:
            log_epoch(live, entry)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, epoch_stats(entry))
    wall_seconds = time.perf_counter() - wall_start

    final = build_model(params["model"])
    final.load_state_dict(plain_state_dict(ema.model if ema else unwrap(model)))
    final.eval()
    return FitResult(
        model=final,
        history=history,
        metrics=quality_metrics(history, len(train_split.labels)),
        timing=timing_summary(history, wall_seconds),
        backend=backend,
    )


def snapshot(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    generators: dict[str, torch.Generator],
    history: list[dict[str, float]],
    *,
    ema: WeightAverage | None = None,
) -> dict[str, Any]:
    """Everything the next epoch depends on (SAM's state_dict is its base optimizer's).

    Holds this process's random streams; under DDP, fit adds the other ranks' as `rank_rng`.
    """
    return {
        "epoch": len(history),
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_states(generators),
        "history": history,
        "ema": ema.state_dict() if ema is not None else None,
    }


def restore(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    generators: dict[str, torch.Generator],
    *,
    rank: int = 0,
    ema: WeightAverage | None = None,
) -> list[dict[str, float]]:
    """Load a snapshot() into freshly built objects; returns the finished epochs' history.

    `rank` > 0 takes its own random streams from `rank_rng` (rank 0's are `rng`).
    """
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_states(state["rng"] if rank == 0 else state["rank_rng"][rank - 1], generators)
    if ema is not None:
        ema.load_state_dict(state["ema"])
    return [dict(entry) for entry in state["history"]]


def epoch_stats(entry: dict[str, float]) -> dict[str, float]:
    """What on_epoch_end receives."""
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s")
    return {key: entry[key] for key in keys}


def log_epoch(live: Any, entry: dict[str, float]) -> None:
    """One dvclive step: quality curves, the learning rate, and throughput under timing/."""
    live.log_metric("train/loss", entry["train_loss"])
    live.log_metric("train/acc", entry["train_acc"])
    live.log_metric("val/loss", entry["val_loss"])
    live.log_metric("val/acc", entry["val_acc"])
    live.log_metric("lr", entry["lr"])
    live.log_metric("timing/images_per_s", entry["images_per_s"])
    live.next_step()


def quality_metrics(history: list[dict[str, float]], train_examples: int) -> dict[str, float]:
    """Final-epoch quality numbers (no timings: those differ between identical runs)."""
    if not history:
        return {"epochs": 0, "train_examples": train_examples}
    last = history[-1]
    return {
        "epochs": int(last["epoch"]),
        "train_examples": train_examples,
        "train_loss": last["train_loss"],
        "train_acc": last["train_acc"],
        "val_loss": last["val_loss"],
        "val_acc": last["val_acc"],
        "best_val_acc": max((entry["val_acc"] for entry in history
                             if not math.isnan(entry["val_acc"])), default=math.nan),
    }


def timing_summary(history: list[dict[str, float]], wall_seconds: float) -> dict[str, Any]:
    """Seconds and throughput; epochs run before a resume keep their measured times."""
    seconds = [entry["seconds"] for entry in history]
    rates = [entry["images_per_s"] for entry in history]
    return {
        "train_seconds": sum(seconds),
        "wall_seconds_this_run": wall_seconds,
        "epoch_seconds": seconds,
        "images_per_s": rates,
        "images_per_s_mean": float(np.mean(rates)) if rates else 0.0,
        "images_per_s_median": float(np.median(rates)) if rates else 0.0,
    }


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """torch's load errors span lines ("Error(s) in loading state_dict...:\n\tsize mismatch")."""
    text = " ".join(str(exc).split())
    text = text if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

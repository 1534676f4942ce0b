"""Data-parallel training under torchrun: one process per rank, DDP, SAM-aware.

`train.batch_size` is the *global* batch: each of the `world_size` ranks trains on its
contiguous share of every batch of the same seeded permutation (`BatchIterator(rank=,
world_size=)`), and DDP averages the gradients, so the learning rate needs no scaling: the
optimizer sees the same global batch as a single process does. Every rank seeds alike, so
initial weights agree (DDP also broadcasts rank 0's); augmentation and dropout draw from
per-rank streams (`rank_seed`). Rank 0 alone writes the model, reports, checkpoints and
dvclive logs; every rank can resume because rank 0 reads the checkpoint and broadcasts it.

SAM under DDP: the first (ascent) pass runs inside `no_sync(model)` - its forward too, since
DDP prepares the gradient reduction in forward - so each rank perturbs its weights with its
own shard's gradient and gradient norm (the paper's m-sharpness, m = the per-rank batch) and
one all-reduce per step is saved. `train.sam_sync_first_step: true` all-reduces the first pass
as well; then N ranks take the same steps as one process with the same global batch (up to
float rounding, and with batch norm computing per-rank batch statistics).

Launching: `init_from_env` reads what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT); without it, or with `train.distributed: false`, it gives a single-process
context whose methods do nothing. `maybe_relaunch_under_torchrun` lets `python stages/train.py`
(DVC's command) run itself under torchrun when `train.distributed` is true.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shlex
import signal
import sys
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fmnist.accel import resolve_device
from fmnist.errors import FmnistError

CCL_PACKAGE = "oneccl_bindings_for_pytorch"
DEFAULT_NPROC_PER_NODE = 2
# torchrun's own process-count words (besides a positive integer).
NPROC_WORDS = ("auto", "cpu", "gpu", "xpu")
# torchrun reads each of its options from PET_<OPTION> when the option is not given; any of
# these means a rendezvous is configured, so no --standalone.
MULTI_NODE_ENV = ("PET_RDZV_ENDPOINT", "PET_MASTER_ADDR", "PET_MASTER_PORT")


@dataclass
class DistContext:
    """Who this process is among the ranks, and the few collectives training needs.

    The single-process context (world_size 1) has the same methods; they do nothing, so the
    training loop calls them unconditionally.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # the process group's backend; None when single-process
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # init_from_env created the process group, shutdown destroys it

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes outputs, checkpoints and logs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (every rank gets the same bytes); a copy-free no-op
        single-process."""
        if not self.enabled:
            return tensor
        on_device = tensor.to(self.device)
        torch_dist.all_reduce(on_device, op=torch_dist.ReduceOp.SUM)
        return on_device.to(tensor.device)

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` from rank `src` on every rank (pickled; tensors come back on the CPU)."""
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

        DDP syncs buffers at the start of each synced forward, so after the last step of an
        epoch the ranks' running statistics can differ; evaluation and checkpoints need them equal.
        """
        if not self.enabled:
            return
        for buffer in model.buffers():
            on_device = buffer.detach().to(self.device)
            torch_dist.broadcast(on_device, src=0)
            with torch.no_grad():
                buffer.copy_(on_device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around `model` (already on its device); `model` itself
        single-process. The wrapper broadcasts rank 0's weights and buffers at construction."""
        if not self.enabled:
            return model
        device_ids = [self.device.index] if self.device.type in ("cuda", "xpu") else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        """DDP's no_sync (no gradient all-reduce; forward and backward must both be inside);
        a nullcontext for a model that is not DDP."""
        if isinstance(model, DistributedDataParallel):
            return model.no_sync()
        return nullcontext()

    def shutdown(self) -> None:
        """Destroy the process group if this context created it (idempotent)."""
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
        self.owns_group = False

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def single_process() -> DistContext:
    return DistContext()


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """torchrun (or any env:// launcher) set WORLD_SIZE for this process."""
    env = os.environ if env is None else env
    return "WORLD_SIZE" in env


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise FmnistError(f"environment {name}={value!r}: expected an integer") from None


def init_from_env(
    params_train: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> DistContext:
    """The process group torchrun described in the environment, or a single-process context.

    Single-process when train.distributed is false or WORLD_SIZE is absent or 1. Backend:
    nccl on CUDA, xccl on XPU, ccl on CPU when oneccl_bindings_for_pytorch imports, else gloo.
    A process group that already exists is reused (and left alone by shutdown).
    """
    env = os.environ if env is None else env
    world_size = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    if not params_train["distributed"]:
        if world_size > 1 and rank == 0:
            print(
                f"train: WORLD_SIZE={world_size} but train.distributed is false: "
                "every process trains alone (set train.distributed: true to share the work)",
                file=sys.stderr,
                flush=True,
            )
        return single_process()
    if world_size <= 1:
        return single_process()
    local_rank = _env_int(env, "LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise FmnistError(f"environment RANK={rank}: expected 0..{world_size - 1}")
    device = resolve_device(params_train["device"])
    if device.type in ("cuda", "xpu"):
        getattr(torch, device.type).set_device(local_rank)
        device = torch.device(device.type, local_rank)
    if torch_dist.is_initialized():
        return DistContext(
            rank=torch_dist.get_rank(),
            world_size=torch_dist.get_world_size(),
            local_rank=local_rank,
            backend=str(torch_dist.get_backend()),
            device=device,
        )
    backend = process_group_backend(device)
    try:
        torch_dist.init_process_group(
            backend=backend, init_method="env://", rank=rank, world_size=world_size
        )
    except (ValueError, RuntimeError) as exc:  # e.g. MASTER_ADDR missing, store unreachable
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FmnistError(f"cannot join the {backend} process group: {first}") from None
    return DistContext(rank, world_size, local_rank, backend, device, owns_group=True)


def process_group_backend(device: torch.device) -> str:
    """nccl (CUDA), xccl (XPU), ccl (CPU with oneCCL bindings importable), else gloo."""
    if device.type == "cuda":
        return "nccl"
    if device.type == "xpu":
        return "xccl"
    if importlib.util.find_spec(CCL_PACKAGE) is not None:
        try:  # like IPEX, the bindings are built for one torch version: importing may raise
            importlib.import_module(CCL_PACKAGE)
        except Exception as exc:
            print(
                f"train: {CCL_PACKAGE} does not import ({type(exc).__name__}), using gloo",
                file=sys.stderr,
                flush=True,
            )
        else:
            return "ccl"
    return "gloo"


def rank_seed(seed: int, rank: int) -> int:
    """A seed for rank `rank`'s own random stream: `seed` itself on rank 0 (so a single
    process draws exactly what it always drew), independent streams on the other ranks."""
    if rank == 0:
        return seed
    state = np.random.SeedSequence([seed, rank]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1  # 62 bits: fits manual_seed


# --- launching ---------------------------------------------------------------------------------


def nproc_per_node(env: Mapping[str, str]) -> str:
    """Processes on this machine: NPROC_PER_NODE, else torchrun's PET_NPROC_PER_NODE, else 2."""
    value = env.get("NPROC_PER_NODE") or env.get("PET_NPROC_PER_NODE")
    if value is None:
        return str(DEFAULT_NPROC_PER_NODE)
    if value in NPROC_WORDS or (value.isdigit() and int(value) >= 1):
        return value
    raise FmnistError(
        f"environment NPROC_PER_NODE={value!r}: expected a positive integer or one of "
        f"{', '.join(NPROC_WORDS)}"
    )


def multi_node(env: Mapping[str, str]) -> bool:
    """torchrun's multi-node settings are in the environment (PET_NNODES > 1, a rendezvous
    endpoint or a master address): no --standalone then."""
    nnodes = env.get("PET_NNODES", "1")
    return nnodes not in ("1", "1:1") or any(env.get(name) for name in MULTI_NODE_ENV)


def torchrun_args(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """torchrun's command line for `argv`: `[--standalone] --nproc_per_node=N argv...`.

    --standalone (a private rendezvous on localhost) unless torchrun's PET_* variables describe
    a multi-node job; torchrun reads those itself.
    """
    args = [] if multi_node(env) else ["--standalone"]
    return [*args, f"--nproc_per_node={nproc_per_node(env)}", *argv]


def torchrun_env(env: Mapping[str, str]) -> dict[str, str]:
    """OMP_NUM_THREADS shares this machine's cores between the ranks unless already set
    (torchrun would set 1 and print a warning)."""
    out = dict(env)
    nproc = nproc_per_node(env)
    if "OMP_NUM_THREADS" not in out and nproc.isdigit():
        out["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(nproc)))
    return out


def run_torchrun(args: Sequence[str]) -> None:
    """torchrun with these arguments, in this process; a failed rank is one FmnistError line.

    Called in-process rather than exec'ed so that a rank's failure (already reported by that
    rank in one line) does not end in the launcher's traceback. Ctrl-C stops every rank.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    try:
        torchrun.run(torchrun.parse_args(list(args)))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise FmnistError(
            f"torchrun: rank {rank} failed with exit code {failure.exitcode} "
            f"({len(exc.failures)} of the ranks stopped; messages above)"
        ) from None
    except RendezvousError as exc:
        raise FmnistError(f"torchrun: rendezvous failed: {type(exc).__name__}: {exc}") from None
    except SignalException as exc:
        if exc.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise FmnistError(f"torchrun: stopped by {signal.Signals(exc.sigval).name}") from None


def maybe_relaunch_under_torchrun(
    params: Mapping[str, Any], argv: Sequence[str] | None = None, *, name: str = "train"
) -> bool:
    """With train.distributed true and no launcher around: run this same command under
    torchrun (the ranks redo the work) and return True once every rank has finished.
    Otherwise do nothing and return False.

    So DVC's `python stages/train.py` runs NPROC_PER_NODE ranks (default 2) on this machine,
    or the node of a multi-node job that torchrun's PET_* variables describe.
    """
    if not params["train"]["distributed"] or launched_by_torchrun():
        return False
    args = torchrun_args(list(sys.argv if argv is None else argv), os.environ)
    os.environ.update(torchrun_env(os.environ))  # inherited by the ranks
    print(f"{name}: train.distributed is true: torchrun {shlex.join(args)}",
          file=sys.stderr, flush=True)
    run_torchrun(args)
    return True

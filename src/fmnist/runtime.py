"""Where and how the training loop runs, as one object it asks: device, autocast, DDP.

The loop used to receive the backend (device, dtype, IPEX) and the DDP context separately and
call helpers of both a dozen times per step. `Runtime` answers those questions in one place, so
the loop reads as the algorithm and a new backend or launcher changes this file, not the loop.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fmnist.accel import Backend, autocast
from fmnist.distributed import DistContext, single_process


@dataclass(frozen=True)
class Runtime:
    """`backend` says where and in which dtype; `dist` which rank of how many. With
    `sync_first_pass` false, SAM's first pass skips DDP's all-reduce (per-rank m-sharpness)."""

    backend: Backend
    dist: DistContext = field(default_factory=single_process)
    sync_first_pass: bool = False

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def autocast(self) -> AbstractContextManager[Any]:
        """The backend's autocast (bf16) or nothing (float32), around forward and loss."""
        return autocast(self.backend)

    def first_pass(self, model: nn.Module) -> AbstractContextManager[Any]:
        """Around SAM's first forward and backward: DDP's no_sync unless the pass is synced."""
        return nullcontext() if self.sync_first_pass else self.dist.no_sync(model)

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the device, images channels_last (the layout the model was prepared in)."""
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.dist.all_reduce_sum(tensor)

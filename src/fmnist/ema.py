"""An exponential moving average of the model's weights, the one that is validated and saved.

Averaging the last few thousand steps' weights smooths out the noise of SGD's last steps, so
a short schedule ends nearer the accuracy of a long one. The BatchNorm running statistics are
averaged too (they belong to the averaged weights), integer buffers are copied.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

WARMUP = 10  # decay_t = min(decay, (1 + t) / (WARMUP + t)): early averages forget the init


class WeightAverage:
    """`update(model)` after every optimizer step; `model` is the average (eval mode, CPU
    or the source's device, same structure as the source)."""

    def __init__(self, source: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"WeightAverage: decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.steps = 0
        self.model = copy.deepcopy(source).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        ours, theirs = self.model.state_dict(), source.state_dict()
        floats = [k for k, v in ours.items() if v.is_floating_point()]
        self._avg = [ours[k] for k in floats]
        self._src = [theirs[k] for k in floats]
        self._int_pairs = [(ours[k], theirs[k]) for k in ours if k not in set(floats)]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (WARMUP + self.steps))
        torch._foreach_lerp_(self._avg, self._src, 1.0 - decay)
        for mine, theirs in self._int_pairs:
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.model.load_state_dict(state["model"])  # copies into the tensors we lerp

"""An exponential moving average of the model's weights, the one that is validated and saved.

Averaging the last few thousand steps' weights smooths out the noise of SGD's last steps, so
a short schedule ends nearer the accuracy of a long one. The BatchNorm running statistics are
averaged too (they belong to the averaged weights), integer buffers are copied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

WARMUP = 10  # decay_t = min(decay, (1 + t) / (WARMUP + t)): early averages forget the init


class WeightAverage:
    """The average lives in `model`, a plain float32 module of the trained architecture (on
    the training device); `update()` after every optimizer step folds `source` in.

    The source's weights are read through `state_dict()` at every update, not cached: a backend
    that prepacks weights (IPEX) hands out fresh plain copies there, never its live storage.
    """

    def __init__(self, model: nn.Module, source: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"WeightAverage: decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.steps = 0
        self.source = source
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.load_state_dict(source.state_dict())
        state = self.model.state_dict()  # tensors sharing storage with self.model
        self._floats = [k for k, v in state.items() if v.is_floating_point()]
        self._average = [state[k] for k in self._floats]
        self._copied = [(k, v) for k, v in state.items() if not v.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (WARMUP + self.steps))
        current = self.source.state_dict()
        latest = [current[k].to(a.dtype) for k, a in zip(self._floats, self._average, strict=True)]
        torch._foreach_lerp_(self._average, latest, 1.0 - decay)
        for key, mine in self._copied:
            mine.copy_(current[key])

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.model.load_state_dict(state["model"])  # copies into the tensors we lerp

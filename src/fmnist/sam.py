"""Sharpness-Aware Minimization (Foret et al., ICLR 2021) around any torch optimizer.

The interface follows the widely used PyTorch SAM (`first_step`, `second_step`, `step(closure)`),
with the guarantees that implementation lacks, each in one named place:

- exact restore: `first_step` keeps a copy of the weights and `second_step` copies it back
  (subtracting the perturbation leaves bf16 rounding errors and, under IPEX weight prepacking,
  is not seen by the forward pass);
- one global gradient norm, accumulated in float32 whatever the gradients' dtype;
- `state_dict` carries the base optimizer's state (momentum), so resumed runs continue exactly;
- `disable_running_stats` and `same_rng` keep BatchNorm statistics and dropout masks of the
  second (perturbed) pass identical to what a plain step would see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

_EPS = 1e-12


class SAM(torch.optim.Optimizer):
    """SAM over `base_optimizer`: a class built over the same params, or a ready instance.

    Pass an instance when something else must build the base optimizer (ipex.optimize fuses
    only a plain SGD, never a wrapper); SAM then drives that instance's param groups.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if rho < 0:
            raise ValueError(f"SAM: rho must be >= 0, got {rho}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        if isinstance(base_optimizer, torch.optim.Optimizer):
            self.base_optimizer = base_optimizer
        else:
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self._share_param_groups()
        self._perturbed = False

    def _share_param_groups(self) -> None:
        """One list of groups for SAM and base: LR schedulers on either reach the real step."""
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            group.setdefault("rho", self.defaults["rho"])
            group.setdefault("adaptive", self.defaults["adaptive"])
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w + e(w), e(w) = rho g/||g|| (ASAM: rho w^2 g/||w g||), keeping w to restore."""
        if self._perturbed:
            raise RuntimeError("SAM.first_step called twice without second_step in between")
        grad_norm = self._grad_norm()
        # A zero or non-finite norm gives no direction: stay put rather than write NaN.
        usable = bool(torch.isfinite(grad_norm)) and float(grad_norm) > 0
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + _EPS)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["original"] = p.detach().clone()
                if usable:
                    e_w = p.grad.float() * scale
                    if group["adaptive"]:
                        e_w = e_w * p.float().square()
                    p.add_(e_w.to(p.dtype))
        self._perturbed = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore every perturbed weight exactly, then step the base optimizer."""
        if not self._perturbed:
            raise RuntimeError("SAM.second_step called without a first_step before it")
        self._restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _restore(self) -> None:
        # Every parameter perturbed in first_step, whether or not it has a gradient now.
        for group in self.param_groups:
            for p in group["params"]:
                original = self.state[p].pop("original", None)
                if original is not None:
                    p.copy_(original)
        self._perturbed = False

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> None:  # type: ignore[override]
        """Both passes; `closure` recomputes the loss and calls backward (the gradient at w
        must already be computed, as with the two-call API)."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and gradients")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()

    def _grad_norm(self) -> torch.Tensor:
        """One global L2 norm over all gradients (not per tensor), accumulated in float32."""
        norms = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                if group["adaptive"]:
                    g = g * p.float().abs()
                norms.append(torch.linalg.vector_norm(g))
        if not norms:
            return torch.zeros(())
        device = norms[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (momentum buffers, groups incl. rho): all a resume needs."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self._share_param_groups()  # loading replaced the base optimizer's group list


@contextmanager
def disable_running_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm uses batch statistics but updates no buffer (not even num_batches_tracked).

    Setting momentum to 0 is not enough: num_batches_tracked would still count the pass.
    """
    switched = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


@contextmanager
def same_rng() -> Iterator[Callable[[], AbstractContextManager[None]]]:
    """Give the second pass the first pass's random numbers (the same dropout mask).

    Usage: `with same_rng() as replay: <first pass>; with replay(): <second pass>`. After the
    replayed block the generator continues where the first pass left it, so a SAM step draws
    as many random numbers as a plain step.
    """
    start = torch.get_rng_state()

    @contextmanager
    def replay() -> Iterator[None]:
        after_first_pass = torch.get_rng_state()
        torch.set_rng_state(start)
        try:
            yield
        finally:
            torch.set_rng_state(after_first_pass)

    yield replay

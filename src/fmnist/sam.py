"""Sharpness-Aware Minimization (Foret et al., ICLR 2021) around any torch optimizer.

The interface follows the widely used PyTorch SAM (davda54/sam: `first_step`, `second_step`,
`step(closure)`), with the guarantees that implementation lacks, each in one named place:

- exact restore (`_restore`): `first_step` keeps a copy of the weights and `second_step` copies
  it back (subtracting the perturbation leaves bf16 rounding errors and, under IPEX weight
  prepacking, is not seen by the forward pass);
- one global gradient norm (`_grad_norm`), accumulated in at least float32 whatever the
  gradients' dtype;
- `state_dict` carries the base optimizer's state (momentum), so resumed runs continue exactly;
- `disable_running_stats` and `same_rng` make the second (perturbed) pass leave BatchNorm
  statistics alone and draw the first pass's dropout mask.

The training loop, for one SAM step:

    with same_rng() as replay:
        loss_fn(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        with replay(), disable_running_stats(model):
            loss_fn(model(x), y).backward()
    optimizer.second_step(zero_grad=True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn


class SAM(torch.optim.Optimizer):
    """SAM over `base_optimizer`: a class built over the same params, or a ready instance.

    Pass an instance when something else must build the base optimizer (ipex.optimize fuses
    only a plain SGD, never a wrapper); SAM then drives that instance's param groups, and
    `params` should be the same parameters. Either way `self.param_groups` *is* the base
    optimizer's list, so an LR scheduler on SAM changes the lr the base optimizer uses.
    `rho`, `adaptive` and `eta` may differ per param group.

    `adaptive` is ASAM (Kwon et al., ICML 2021): the neighbourhood is scaled element-wise by
    T = |w| + eta, so e(w) = rho T^2 g / ||T g||. `eta` (the paper's 0.01) keeps zero-valued
    weights perturbed. Unlike the paper, which leaves biases unscaled, T applies to every
    parameter (SAM sees tensors, not names). ASAM's rho is of order 0.5-2, not SAM's 0.05.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        if rho < 0:
            raise ValueError(f"SAM: rho must be >= 0, got {rho}")
        if eta < 0:
            raise ValueError(f"SAM: eta must be >= 0, got {eta}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eta=eta, **base_kwargs))
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"SAM: {sorted(base_kwargs)} would be ignored: the base optimizer is "
                    "already built (give them to its constructor)"
                )
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
            group.setdefault("eta", self.defaults["eta"])
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w + e(w), e(w) = rho g/||g|| (ASAM: rho T^2 g/||T g||, T = |w| + eta),
        keeping w to restore."""
        if self._perturbed:
            raise RuntimeError("SAM.first_step called twice without second_step in between")
        grad_norm = self._grad_norm()
        norm = float(grad_norm)
        usable = 0 < norm < float("inf")  # zero, inf or NaN: no direction, so stay put
        for group in self.param_groups:
            scale = group["rho"] / grad_norm
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.detach().clone()
                if usable:
                    e_w = _wide(p.grad) * scale
                    if group["adaptive"]:
                        e_w = e_w * _asam_scale(p, group["eta"]).square()
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
        self._opt_called = True  # an LR scheduler on SAM sees this as the optimizer's step
        if zero_grad:
            self.zero_grad()

    def _restore(self) -> None:
        """Copy back the saved weights: bit-exact, and seen by modules that prepacked them."""
        # Every parameter perturbed in first_step, whether or not it has a gradient now.
        for group in self.param_groups:
            for p in group["params"]:
                old_p = self.state[p].pop("old_p", None)
                if old_p is not None:
                    p.copy_(old_p)
        self._perturbed = False

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """Both steps around `closure`, which recomputes the loss and calls backward.

        As in davda54/sam, the gradient at w must already be computed when step is called.
        """
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and gradients")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def _grad_norm(self) -> torch.Tensor:
        """One global L2 norm over all gradients (not per tensor), accumulated in >= float32."""
        norms = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = _wide(p.grad)
                if group["adaptive"]:
                    g = g * _asam_scale(p, group["eta"])
                norms.append(torch.linalg.vector_norm(g))
        if not norms:
            return torch.zeros(())
        device = norms[0].device  # the parameters' device
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (momentum buffers, groups incl. rho): all a resume needs."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self._share_param_groups()  # loading replaced the base optimizer's group list


def _asam_scale(p: torch.Tensor, eta: float) -> torch.Tensor:
    """ASAM's T = |w| + eta, element-wise, in at least float32."""
    return _wide(p).abs() + eta


def _wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in at least float32 (bf16/fp16 gradients lose the norm; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@contextmanager
def disable_running_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm normalizes with batch statistics but updates no buffer, for the second pass.

    Setting momentum to 0 (davda54's bypass_bn) is not enough: num_batches_tracked would still
    count the pass. In train mode, track_running_stats=False means batch statistics and no
    buffer updates; in eval mode it changes nothing. The flags come back even on an exception.
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
def same_rng(
    device: torch.device | str | None = None,
) -> Iterator[Callable[[], AbstractContextManager[None]]]:
    """Give the second pass the first pass's random numbers (the same dropout mask).

    Usage: `with same_rng(device) as replay: <first pass>; with replay(): <second pass>`. After
    the replayed block the generators continue where the first pass left them, so a SAM step
    draws as many random numbers as a plain step. Replays torch's default CPU generator and,
    for an accelerator `device` (cuda, xpu, ...), that device's generator, which is what
    dropout draws from there; without it rho=0 would no longer match SGD on a GPU.
    """
    streams = rng_streams(device)
    start = [get() for get, _ in streams]

    @contextmanager
    def replay() -> Iterator[None]:
        after_first_pass = [get() for get, _ in streams]
        for (_, set_state), state in zip(streams, start, strict=True):
            set_state(state)
        try:
            yield
        finally:
            for (_, set_state), state in zip(streams, after_first_pass, strict=True):
                set_state(state)

    yield replay


RngStream = tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None]]


def rng_streams(device: torch.device | str | None = None) -> list[RngStream]:
    """(get_state, set_state) of the CPU generator, plus the accelerator's for such a device."""
    streams: list[RngStream] = [(torch.get_rng_state, torch.set_rng_state)]
    device = torch.device(device) if device is not None else None
    if device is not None and device.type not in ("cpu", "meta"):
        module = torch.get_device_module(device.type)
        index = device.index if device.index is not None else module.current_device()
        streams.append((
            lambda: module.get_rng_state(index),
            lambda state: module.set_rng_state(state, index),
        ))
    return streams

"""The matmul work of a model, counted one way for every benchmark (the roofline, the compute
floor of a recipe, the architecture probe): the multiply-adds of its convolutions and linear
layers, the only layers a matmul unit speeds up.

Training a step costs about three forwards: the forward, then the gradient with respect to each
layer's input and to its weights, each as large as the forward. The first layer's input is the
image, whose gradient nobody needs, so that layer costs two. A SAM step is two such passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fmnist.constants import INPUT_SHAPE

PASSES_PER_STEP = 3  # forward, input gradient, weight gradient
SAM_PASSES = 2  # SAM's ascent pass, then the descent pass


def layer_multiply_adds(model: nn.Module) -> list[int]:
    """Multiply-adds per image of each convolution and linear layer, in the order they run; one
    view of the image whatever flip_tta says (what a training step computes)."""
    counts: list[int] = []

    def count(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            counts.append(output[0].numel() * module.in_channels // module.groups * kernel)
        elif isinstance(module, nn.Linear):
            counts.append(module.in_features * module.out_features)

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            one_view = getattr(model, "_logits", model)
            device = next(model.parameters()).device
            one_view(torch.zeros(1, *INPUT_SHAPE, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return counts


def multiply_adds(model: nn.Module) -> int:
    """Per image, one forward."""
    return sum(layer_multiply_adds(model))


@dataclass(frozen=True)
class Cost:
    """Multiply-adds per image: one forward, one plain training step, one SAM step."""

    forward: int
    plain_step: int
    sam_step: int


def cost(model: nn.Module) -> Cost:
    """The model's Cost: every layer's three passes per step but the first layer's input
    gradient; a SAM step two such passes."""
    layers = layer_multiply_adds(model)
    forward = sum(layers)
    plain = PASSES_PER_STEP * forward - (layers[0] if layers else 0)
    return Cost(forward, plain, SAM_PASSES * plain)

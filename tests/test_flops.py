"""fmnist.flops: the matmul work every benchmark counts (roofline, compute floor, probes)."""

from __future__ import annotations

from pathlib import Path

from fmnist.flops import cost, layer_multiply_adds, multiply_adds
from fmnist.model import build_model
from fmnist.params import load_params

REPO = Path(__file__).resolve().parents[1]
PARAMS = load_params(REPO / "params.yaml")


def _model(channels: list[int], convs_per_block: int, **extra: object) -> object:
    return build_model({**PARAMS["model"], "channels": channels,
                        "convs_per_block": convs_per_block, "hidden": 5, **extra})


def test_multiply_adds_counts_every_conv_and_linear_layer_once_per_image() -> None:
    # 28x28: 1->2, 2->2; pool; 14x14: 2->3, 3->3; pool to 7x7 -> 147 -> 5 -> 10
    convs = 9 * (784 * 1 * 2 + 784 * 2 * 2 + 196 * 2 * 3 + 196 * 3 * 3)
    model = _model([2, 3], 2)
    assert multiply_adds(model) == convs + 147 * 5 + 5 * 10
    # one view, whatever evaluate's flip TTA would run
    assert multiply_adds(_model([2, 3], 2, flip_tta=True)) == convs + 147 * 5 + 5 * 10
    assert layer_multiply_adds(_model([2], 1)) == [14_112, 1_960, 50]


def test_a_step_is_three_passes_but_the_image_s_gradient_and_sam_two_steps() -> None:
    model = _model([2], 1)
    model_cost = cost(model)
    assert model_cost.forward == 14_112 + 2_010
    # the first conv (14,112) forward and weight gradient only; the rest (2,010) three passes
    assert model_cost.plain_step == 2 * 14_112 + 3 * 2_010 == 34_254
    assert model_cost.sam_step == 68_508
    assert model.training  # counting leaves the model as it found it

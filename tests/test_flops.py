"""fmnist.flops: the matmul work every benchmark counts (roofline, compute floor, probes)."""

from __future__ import annotations

from pathlib import Path

from project_files import load_bench_script

from fmnist.flops import layer_multiply_adds, multiply_adds, step_multiply_adds
from fmnist.model import build_model
from fmnist.params import load_params

REPO = Path(__file__).resolve().parents[1]
PARAMS = load_params(REPO / "params.yaml")
probe = load_bench_script("arch_probe")


def test_multiply_adds_counts_every_conv_and_linear_layer() -> None:
    model = probe.make_model("2/3/4", {"dropout": 0.0, "hidden": 5})
    convs = 9 * (784 * 2 * 1 + 196 * 2 * 2 + 196 * 3 * 2 + 49 * 3 * 3 + 49 * 4 * 3 + 9 * 4 * 4)
    assert multiply_adds(model) == convs + 36 * 5 + 5 * 10
    model.flip_tta = True  # one view is counted, whatever evaluate would run
    assert multiply_adds(model) == convs + 36 * 5 + 5 * 10
    default = build_model({**PARAMS["model"], "channels": [2], "convs_per_block": 1,
                           "hidden": 5, "flip_tta": True})
    assert layer_multiply_adds(default) == [9 * 784 * 2, 2 * 14 * 14 * 5, 5 * 10]


def test_a_step_is_three_passes_but_the_image_s_gradient_and_sam_two_steps() -> None:
    model = build_model({**PARAMS["model"], "channels": [2], "convs_per_block": 1, "hidden": 5})
    first, *rest = layer_multiply_adds(model)
    assert step_multiply_adds(model, sam=False) == 2 * first + 3 * sum(rest)
    assert step_multiply_adds(model, sam=True) == 2 * (2 * first + 3 * sum(rest))
    assert model.training  # counting leaves the model as it found it

"""The IPEX backend, with real IPEX: run by `bash scripts/ipex-env.sh` in a torch 2.8 venv.

Skipped, with the reason shown, wherever intel_extension_for_pytorch does not import with the
running torch (the main environment's torch 2.13 among them).
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fmnist.accel import (
    IPEX_DIST,
    Backend,
    autocast,
    cpu_bf16_native,
    cpu_class,
    ipex_status,
    select_backend,
)
from fmnist.errors import FmnistError
from fmnist.model import build_model
from fmnist.modelfile import plain_state_dict, save_model
from fmnist.params import load_params
from fmnist.runtime import Runtime

IPEX_VERSION, IPEX_PROBLEM = ipex_status()
pytestmark = [
    pytest.mark.ipex,
    pytest.mark.skipif(IPEX_VERSION is None, reason=f"IPEX unavailable: {IPEX_PROBLEM}"),
]

ROOT = Path(__file__).resolve().parents[1]
MODEL = {
    "channels": [8, 16],
    "convs_per_block": 1,
    "batch_norm": True,
    "dropout": 0.1,
    "hidden": 32,
}
SGD_SAM = {
    "optimizer": "sam",
    "rho": 0.05,
    "adaptive": False,
    "asam_eta": 0.01,
    "lr": 0.05,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5.0e-4,
}
NATIVE_BF16 = pytest.mark.skipif(
    not cpu_bf16_native(),
    reason=f"bf16 is emulated on this CPU ({cpu_class()}): IPEX cannot prepack bf16 weights "
    "without avx512_bf16, AMX or avx_ne_convert",
)
DTYPES = ["float32", pytest.param("bfloat16", marks=NATIVE_BF16)]


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 28, 28) noise with a bright horizontal band whose row is the class (0..9)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 10
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 4 + 2 * label : 6 + 2 * label, 3:25] = 230
    return images, labels


def batch(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(images).unsqueeze(1).float().contiguous(memory_format=torch.channels_last)
    return x, torch.from_numpy(labels)


def ipex_backend(dtype: str) -> Backend:
    backend = select_backend({"enabled": True, "dtype": dtype})
    assert backend.name == "ipex"
    return backend


def ipex_sam(dtype: str, lr: float) -> tuple[nn.Module, Any, Backend]:
    """A seeded model and SAM(SGD) prepared for IPEX the way training does it."""
    from fmnist.train import build_optimizer

    backend = ipex_backend(dtype)
    torch.manual_seed(0)
    model, optimizer = build_optimizer(build_model(MODEL), {**SGD_SAM, "lr": lr}, backend)
    return model, optimizer, backend


def train_steps(model: nn.Module, optimizer: Any, backend: Backend, steps: int) -> None:
    from fmnist.train import sam_step

    images, labels = separable(64 * steps, seed=1)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for i in range(steps):
        x, y = batch(images[64 * i : 64 * (i + 1)], labels[64 * i : 64 * (i + 1)])
        sam_step(model, optimizer, x, y, loss_fn, Runtime(backend))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights and BN statistics as its state_dict shows them (fp32 copies)."""
    return {
        key: value.detach().float().clone()
        for key, value in model.state_dict().items()
        if not key.endswith("num_batches_tracked")
    }


def eval_logits(model: nn.Module, x: torch.Tensor, backend: Backend) -> torch.Tensor:
    """What the forward pass computes (IPEX bf16 models need autocast in eval mode too)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(backend):
        logits = model(x).float()
    model.train(was_training)
    return logits


def test_select_backend_true_gives_ipex_with_its_version() -> None:
    backend = select_backend({"enabled": True, "dtype": "auto"})
    assert backend.name == "ipex"
    assert backend.bf16 == cpu_bf16_native()
    assert backend.ipex_version == importlib.metadata.version(IPEX_DIST)
    assert backend.ipex_version.startswith(".".join(torch.__version__.split(".")[:2]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sam_step_with_zero_lr_restores_weights_exactly(dtype: str) -> None:
    model, optimizer, backend = ipex_sam(dtype, lr=0.0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0  # running stats stay put, so eval logits compare exactly
    x, y = batch(*separable(64, seed=2))
    loss_fn = nn.CrossEntropyLoss()
    before, logits_before = snapshot(model), eval_logits(model, x, backend)

    with autocast(backend):
        loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.first_step(zero_grad=True)
    perturbed = snapshot(model)
    assert any(not torch.equal(perturbed[k], before[k]) for k in before)
    assert not torch.equal(eval_logits(model, x, backend), logits_before)  # forward sees it
    with autocast(backend):
        loss_fn(model(x), y).backward()
    optimizer.second_step(zero_grad=True)

    after = snapshot(model)
    assert after.keys() == before.keys()
    changed = [key for key in before if not torch.equal(after[key], before[key])]
    assert changed == []
    assert torch.equal(eval_logits(model, x, backend), logits_before)


@pytest.mark.skipif(cpu_bf16_native(), reason="this CPU computes bf16 natively")
def test_explicit_bf16_under_ipex_without_native_bf16_is_one_line_error() -> None:
    with pytest.raises(FmnistError, match="ipex.dtype: bfloat16 under IPEX") as info:
        select_backend({"enabled": True, "dtype": "bfloat16"})
    assert "\n" not in str(info.value)


@NATIVE_BF16
def test_short_training_under_ipex_bf16_learns() -> None:
    from fmnist.data import Prepared, Split
    from fmnist.train import fit

    params = load_params(ROOT / "params.yaml")
    params["model"] = MODEL
    params["train"].update(
        epochs=3, batch_size=32, lr=0.05, threads=1, augment={"flip": False, "crop_padding": 0}
    )
    params["ipex"] = {"enabled": True, "dtype": "bfloat16"}
    splits = [Split(*separable(n, seed)) for n, seed in ((320, 3), (100, 4), (100, 5))]
    data = Prepared(*splits, class_names=tuple(str(i) for i in range(10)))

    result = fit(data, params, progress=False)

    assert result.backend.name == "ipex" and result.backend.bf16
    losses = [entry["train_loss"] for entry in result.history]
    assert losses[-1] < losses[0]
    assert result.history[-1]["val_acc"] > 0.5  # chance is 0.1


@pytest.mark.parametrize("dtype", DTYPES)
def test_ipex_state_dict_loads_into_plain_model_with_same_predictions(dtype: str) -> None:
    from fmnist.inference import predict_logits

    model, optimizer, backend = ipex_sam(dtype, lr=0.05)
    train_steps(model, optimizer, backend, steps=8)
    images, _ = separable(200, seed=6)
    ipex_logits = predict_logits(model, images, batch_size=100, backend=backend)

    plain = build_model(MODEL)
    plain.load_state_dict(plain_state_dict(model))
    native = Backend("native", backend.dtype, backend.device)
    plain_logits = predict_logits(plain, images, batch_size=100, backend=native)

    assert np.array_equal(plain_logits.argmax(1), ipex_logits.argmax(1))
    atol = 1e-4 if dtype == "float32" else 0.1
    np.testing.assert_allclose(plain_logits, ipex_logits, atol=atol, rtol=0)


def main_torch_python() -> str | None:
    """The venv's base interpreter when it runs fmnist on another torch (the main env's)."""
    base = getattr(sys, "_base_executable", None)
    if base is None or sys.prefix == sys.base_prefix:  # not in a venv
        return None
    probe = subprocess.run(
        [base, "-c", "import fmnist, torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0 or probe.stdout.strip() == torch.__version__:
        return None
    return base


@NATIVE_BF16
def test_ipex_trained_model_file_predicts_the_same_under_main_torch(tmp_path: Path) -> None:
    from fmnist.inference import predict_logits

    python = main_torch_python()
    if python is None:
        pytest.skip("no base interpreter with fmnist on another torch version")
    model, optimizer, backend = ipex_sam("bfloat16", lr=0.05)
    train_steps(model, optimizer, backend, steps=8)
    images, _ = separable(200, seed=7)
    expected = predict_logits(model, images, batch_size=100, backend=backend).argmax(1)
    save_model(model, MODEL, tmp_path / "model.pth")
    np.save(tmp_path / "images.npy", images)

    script = (
        "import json, sys, numpy as np, torch\n"
        "from fmnist.accel import Backend\n"
        "from fmnist.inference import predict_logits\n"
        "from fmnist.loading import load_model\n"
        "model = load_model(sys.argv[1])\n"
        "backend = Backend('native', torch.bfloat16, torch.device('cpu'))\n"
        "logits = predict_logits(model, np.load(sys.argv[2]), batch_size=100, backend=backend)\n"
        "print(json.dumps(logits.argmax(1).tolist()))\n"
    )
    run = subprocess.run(
        [python, "-c", script, str(tmp_path / "model.pth"), str(tmp_path / "images.npy")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == expected.tolist()

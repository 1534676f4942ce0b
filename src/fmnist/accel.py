"""Where the model runs and in which dtype: native PyTorch (default) or Intel Extension for PyTorch.

Native PyTorch is the maintained path: channels_last, bf16 autocast, optional torch.compile.
IPEX is optional and stays behind the functions marked "IPEX seam" below: `ipex_status` checks
the torch version IPEX was built for *before* importing it (IPEX 2.8 under torch 2.13 dies with
AttributeError on import), and `ipex.enabled: false` means it is never imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from fmnist.errors import FmnistError

IPEX_DIST = "intel_extension_for_pytorch"
IPEX_INSTALL_HINT = "install it with `bash scripts/ipex-env.sh` (a torch 2.8 + IPEX 2.8 venv)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ACCELERATORS = ("cuda", "xpu")


@dataclass
class Backend:
    """How training and inference run: `name` is "native" or "ipex"."""

    name: str
    dtype: torch.dtype
    device: torch.device
    compile: bool = False
    ipex_version: str | None = None

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16


def select_backend(
    ipex_params: dict[str, Any], train_device: str = "cpu", compile: bool = False
) -> Backend:
    """The backend for params["ipex"], train.device and train.compile.

    ipex.enabled: "auto" uses IPEX when it imports with this torch on the CPU; true requires it
    (FmnistError naming what is missing); false never imports it.
    """
    dtype = DTYPES[ipex_params["dtype"]]
    device = resolve_device(train_device)
    enabled = ipex_params["enabled"]
    if enabled is False or (enabled == "auto" and device.type != "cpu"):
        return Backend("native", dtype, device, compile)
    if device.type != "cpu":
        raise FmnistError(
            f"ipex.enabled: true needs train.device cpu (got {device.type}); "
            "set ipex.enabled to auto or false"
        )
    version, problem = ipex_status()
    if version is None:
        if enabled is True:
            raise FmnistError(f"ipex.enabled: true, but {problem}; {IPEX_INSTALL_HINT}")
        return Backend("native", dtype, device, compile)
    return Backend("ipex", dtype, device, compile, ipex_version=version)


def resolve_device(train_device: str) -> torch.device:
    """train.device -> torch.device; an accelerator asked for but absent is an FmnistError."""
    if train_device == "cpu":
        return torch.device("cpu")
    if train_device == "auto":
        for kind in ACCELERATORS:
            if _accelerator_available(kind):
                return torch.device(kind)
        return torch.device("cpu")
    if train_device not in ACCELERATORS:
        raise FmnistError(f"train.device: unknown device {train_device!r}")
    if not _accelerator_available(train_device):
        raise FmnistError(
            f"train.device: {train_device} asked for, but this torch ({torch.__version__}) "
            f"sees no {train_device} device; use cpu or auto"
        )
    return torch.device(train_device)


def _accelerator_available(kind: str) -> bool:
    module = getattr(torch, kind, None)
    return bool(module is not None and module.is_available())


def prepare_training(
    model: nn.Module, optimizer: torch.optim.Optimizer, backend: Backend
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Move the model to the backend's device and memory format; IPEX-optimize it if asked.

    Give the *plain* base optimizer (torch.optim.SGD), never a SAM wrapper: IPEX deep-copies
    and fuses exact optimizer types only. Use the returned objects, and build SAM around the
    returned optimizer. Weights stay float32 (bf16 is autocast only). Native: the same
    Parameter objects are kept, so the optimizer stays valid.
    """
    model = model.to(backend.device, memory_format=torch.channels_last)
    model.train()
    if backend.name == "ipex":
        model, optimizer = ipex_optimize_training(model, optimizer, backend.dtype)
    if backend.compile:
        model = torch.compile(model)
    return model, optimizer


def prepare_inference(model: nn.Module, backend: Backend) -> nn.Module:
    """Eval mode on the backend's device, channels_last; IPEX-optimized when the backend is IPEX.

    IPEX bf16 models must also run under `autocast(backend)` at inference.
    """
    model = model.to(backend.device, memory_format=torch.channels_last).eval()
    if backend.name == "ipex":
        model = ipex_optimize_inference(model, backend.dtype)
    if backend.compile:
        model = torch.compile(model)
    return model


def autocast(backend: Backend) -> AbstractContextManager:
    """bf16 autocast on the backend's device, or nothing for float32."""
    if backend.bf16:
        return torch.autocast(device_type=backend.device.type, dtype=torch.bfloat16)
    return nullcontext()


def backend_metrics(backend: Backend) -> dict[str, Any]:
    """Numbers DVC can diff (0/1 flags) plus readable strings describing the backend."""
    return {
        "backend_ipex": int(backend.name == "ipex"),
        "dtype_bf16": int(backend.bf16),
        "compiled": int(backend.compile),
        "device_cuda": int(backend.device.type == "cuda"),
        "device_xpu": int(backend.device.type == "xpu"),
        "backend": backend.name,
        "dtype": str(backend.dtype).removeprefix("torch."),
        "device": backend.device.type,
        "torch_version": str(torch.__version__),
        "ipex_version": backend.ipex_version or "none",
    }


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a torch.compile wrapper (state_dict keys without `_orig_mod.`)."""
    return getattr(model, "_orig_mod", model)


# --- IPEX seam: every line that touches intel_extension_for_pytorch is below -----------------


def _major_minor(version: str) -> tuple[int, ...]:
    parts = version.split("+")[0].split(".")[:2]
    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in parts)


def ipex_installed_version() -> str | None:
    """IPEX's version from its package metadata (no import), or None if not installed."""
    try:
        return importlib.metadata.version(IPEX_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def ipex_status() -> tuple[str | None, str]:
    """(version, "") when IPEX imports with this torch, else (None, why not).

    The torch major.minor check comes first: IPEX's wheel does not declare its torch
    requirement, and a mismatched import prints an error and raises AttributeError.
    """
    version = ipex_installed_version()
    if version is None:
        return None, f"{IPEX_DIST} is not installed"
    if _major_minor(version) != _major_minor(torch.__version__):
        wanted = ".".join(str(n) for n in _major_minor(version))
        return None, (
            f"{IPEX_DIST} {version} needs torch {wanted}.*, this is torch {torch.__version__}"
        )
    try:
        importlib.import_module(IPEX_DIST)
    except Exception as exc:  # AttributeError, RuntimeError, ...: not only ImportError
        return None, f"import {IPEX_DIST} {version} failed: {type(exc).__name__}: {exc}"
    return version, ""


def _ipex() -> Any:
    module = sys.modules.get(IPEX_DIST)
    if module is None:  # only reached through a Backend that ipex_status() approved
        module = importlib.import_module(IPEX_DIST)
    return module


def ipex_optimize_training(
    model: nn.Module, optimizer: torch.optim.Optimizer, dtype: torch.dtype
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """ipex.optimize on the model and the plain base optimizer; returns IPEX's copies."""
    if type(optimizer) is not torch.optim.SGD:
        raise TypeError(
            f"ipex_optimize_training needs a plain torch.optim.SGD, got {type(optimizer).__name__}"
            " (wrap the returned optimizer in SAM afterwards)"
        )
    return _ipex().optimize(model, optimizer=optimizer, dtype=dtype)


def ipex_optimize_inference(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """ipex.optimize for inference (eval mode, no optimizer)."""
    return _ipex().optimize(model.eval(), dtype=dtype)

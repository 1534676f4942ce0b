"""Where the model runs and in which dtype: native PyTorch (default) or Intel Extension for PyTorch.

Native PyTorch is the maintained path: channels_last, bf16 autocast, optional torch.compile.
IPEX is optional and stays behind the functions marked "IPEX seam" below: `ipex_status` checks
the torch version IPEX was built for *before* importing it (IPEX 2.8 under torch 2.13 dies with
AttributeError on import), and `ipex.enabled: false` means it is never imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
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
AUTO_DTYPE = "auto"
ACCELERATORS = ("cuda", "xpu")
# Measured on a Zen 3 (AVX2 only): one 3x3 conv, forward+backward, 1,311 ms in emulated bf16
# against 153 ms in float32.
EMULATED_BF16_SLOWDOWN = "about 8x"
X86_MACHINES = ("x86_64", "amd64", "i386", "i686")


@dataclass(frozen=True)
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


FLOAT32_CPU = Backend("native", torch.float32, torch.device("cpu"))
BFLOAT16_CPU = Backend("native", torch.bfloat16, torch.device("cpu"))


def select_backend(
    ipex_params: dict[str, Any], train_device: str = "cpu", compile: bool = False
) -> Backend:
    """The backend for params["ipex"], train.device and train.compile.

    ipex.enabled: "auto" uses IPEX when it imports with this torch on the CPU; true requires it
    (FmnistError naming what is missing); false never imports it. ipex.dtype: see `resolve_dtype`.
    """
    device = resolve_device(train_device)
    enabled = ipex_params["enabled"]
    name, version = "native", None
    if enabled is True or (enabled == "auto" and device.type == "cpu"):
        if device.type != "cpu":
            raise FmnistError(
                f"ipex.enabled: true needs train.device cpu (got {device.type}); "
                "set ipex.enabled to auto or false"
            )
        version, problem = ipex_status()
        if version is None and enabled is True:
            raise FmnistError(f"ipex.enabled: true, but {problem}; {IPEX_INSTALL_HINT}")
        if version is not None:
            name = "ipex"
    dtype = resolve_dtype(ipex_params["dtype"], device, ipex=name == "ipex")
    return Backend(name, dtype, device, compile, ipex_version=version)


def resolve_dtype(requested: str, device: torch.device, *, ipex: bool = False) -> torch.dtype:
    """ipex.dtype -> the compute dtype on `device`.

    `auto`: bfloat16 where the hardware computes it natively (`bf16_native`), else float32.
    An explicit `bfloat16` where it is only emulated still runs, with one line on stderr
    (several times slower than float32); under IPEX it is an FmnistError, since IPEX cannot
    prepack bf16 weights on such a CPU.
    """
    if requested == "float32":
        return torch.float32
    native = bf16_native(device)
    if requested == AUTO_DTYPE:
        return torch.bfloat16 if native else torch.float32
    if not native:
        where = f"this CPU ({cpu_class()})" if device.type == "cpu" else f"this {device.type}"
        if ipex:
            raise FmnistError(
                f"ipex.dtype: bfloat16 under IPEX needs native bf16 (avx512_bf16, AMX or "
                f"avx_ne_convert), {where} has none; set ipex.dtype to auto or float32"
            )
        _warn_once(
            f"ipex.dtype: bfloat16 is emulated on {where}: expect it {EMULATED_BF16_SLOWDOWN} "
            "slower than float32 (ipex.dtype: auto picks float32 here)"
        )
    return torch.bfloat16


def bf16_native(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware (not by emulation)."""
    if device.type == "cpu":
        return cpu_bf16_native()
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    module = getattr(torch, device.type, None)
    check = getattr(module, "is_bf16_supported", None)
    return bool(check()) if callable(check) else False


@lru_cache(maxsize=1)
def cpu_bf16_native() -> bool:
    """oneDNN runs bf16 kernels, and on x86 the CPU has bf16 instructions to run them with.

    oneDNN alone also says yes on AVX-512 CPUs without avx512_bf16, where it emulates; it says
    no under ONEDNN_MAX_CPU_ISA=AVX2, which makes this machine behave as an AVX2-only one.
    """
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if platform.machine().lower() not in X86_MACHINES:
        return True
    return bool(
        torch.cpu._is_avx512_bf16_supported()
        or torch.cpu._is_amx_tile_supported()
        or "avx_ne_convert" in _cpu_flags()
    )


# cpu_class()'s names for the CPUs that compute bf16 natively; any other CPU is named by
# torch's kernel capability.
AMX, AVX512_BF16, AVX_NE_CONVERT = "AMX", "AVX512_BF16", "AVX_NE_CONVERT"
BF16_NATIVE_CLASSES = (AMX, AVX512_BF16, AVX_NE_CONVERT)


@lru_cache(maxsize=1)
def cpu_class() -> str:
    """The CPU's class as timings name it: AMX, AVX512_BF16 or AVX_NE_CONVERT where bf16 is
    native, else torch's kernel capability (AVX2, AVX512, DEFAULT, SVE256, ...)."""
    if cpu_bf16_native() and platform.machine().lower() in X86_MACHINES:
        if torch.cpu._is_amx_tile_supported():
            return AMX
        if torch.cpu._is_avx512_bf16_supported():
            return AVX512_BF16
        return AVX_NE_CONVERT
    return str(torch.backends.cpu.get_cpu_capability())


def machine_description(backend: Backend | None = None) -> dict[str, Any]:
    """What a timing must carry to mean something: CPU class, bf16 support, threads, dtype."""
    out: dict[str, Any] = {
        "cpu_class": cpu_class(),
        "cpu_bf16_native": cpu_bf16_native(),
        "threads": torch.get_num_threads(),
        "torch_version": str(torch.__version__),
    }
    if backend is not None:
        out.update(device=backend.device.type, dtype=dtype_name(backend.dtype))
    return out


def runtime_identity(backend: Backend) -> str:
    """What `auto` settings resolved to, for fingerprints: backend, versions, device, dtype."""
    ipex = f"+ipex{backend.ipex_version}" if backend.ipex_version else ""
    return (
        f"{backend.name}/torch{torch.__version__}{ipex}/{backend.device.type}/"
        f"{dtype_name(backend.dtype)}"
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(message, file=sys.stderr, flush=True)


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


def backend_description(backend: Backend) -> dict[str, Any]:
    """What a run ran on, for run.json and the model file (not a metric: DVC lists no strings)."""
    return {
        "backend": backend.name,
        "dtype": dtype_name(backend.dtype),
        "device": backend.device.type,
        "compiled": backend.compile,
        "cpu_class": cpu_class(),
        "cpu_bf16_native": cpu_bf16_native(),
        "torch_version": str(torch.__version__),
        "ipex_version": backend.ipex_version or "none",
    }


def describe(backend: Backend, requested_dtype: str) -> str:
    """One line for the log: backend, dtype and why, the CPU class, threads."""
    why = f"ipex.dtype {requested_dtype}"
    if requested_dtype == AUTO_DTYPE:
        native = bf16_native(backend.device)
        why += f": bf16 {'native' if native else 'not native'} here"
    where = f"CPU {cpu_class()}" if backend.device.type == "cpu" else str(backend.device)
    return (
        f"{backend.name} backend in {dtype_name(backend.dtype)} ({why}) on {where}, "
        f"{torch.get_num_threads()} threads"
    )


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

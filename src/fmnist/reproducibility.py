"""Same params, seed, machine and thread count -> the same weights, bit for bit.

Seeds every RNG the training touches, asks torch for deterministic kernels, and captures or
restores all RNG states so a resumed run continues exactly where the killed one stopped.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (dropout and initialization use torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_torch(threads: int, device: torch.device | None = None) -> None:
    """Deterministic algorithms; intra-op threads from train.threads (0 keeps torch's default).

    warn_only: the CPU kernels this model uses are deterministic; on an accelerator an op
    without a deterministic kernel warns instead of stopping the run.
    On a CPU, deterministic mode's NaN fill of what torch.empty-style allocations return is off:
    a debugging aid that costs 5-7% of a plain training step (bench/results/step_cost.md). With
    it off, a small model trains to the same weights bit for bit (tests/test_train.py) and the
    committed baseline to the same metrics as with it on. On any other device it is on (torch's
    default), as no kernel there was checked.
    """
    on_cpu = device is None or device.type == "cpu"
    if device is not None and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=not on_cpu)
    torch.utils.deterministic.fill_uninitialized_memory = not on_cpu
    if threads > 0:
        torch.set_num_threads(threads)


def nan_fill() -> bool:
    """Whether deterministic mode's NaN fill is on now: run reports record it beside the
    allocator, as it changes the seconds, not the weights."""
    return bool(torch.utils.deterministic.fill_uninitialized_memory)


def rng_states(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG state as plain types and tensors (loadable with torch.load(weights_only=True))."""
    numpy_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": numpy_state[0],
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(
    states: dict[str, Any], generators: dict[str, torch.Generator] | None = None
) -> None:
    """Restore what rng_states() captured, including the named generators."""
    random.setstate(_as_python_state(states["python"]))
    np_state = states["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    for name, generator in (generators or {}).items():
        generator.set_state(states["generators"][name])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_python_state(state: Any) -> tuple:
    """random.setstate needs tuples; a saved state may come back with lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)

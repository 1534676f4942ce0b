"""Resume state of a training run: written atomically after every epoch, used only if it matches.

A checkpoint holds everything the next epoch depends on (weights, optimizer with SAM's base
state, scheduler, every RNG state, history), so a run killed after epoch k and resumed ends
with the same weights as an uninterrupted one. Its fingerprint is a hash of what shapes the
training (seed, model, train, ipex, the dtype `auto` resolved to, the data itself, and the code
that trains); a checkpoint from other params, data or code is ignored.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmnist.atomic import write_bytes
from fmnist.modelfile import torch_bytes

FORMAT = "fmnist-train-checkpoint"
FORMAT_VERSION = 1


def array_digest(*arrays: np.ndarray) -> str:
    """SHA-256 over the shapes, dtypes and bytes of the arrays (cheap next to one epoch)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def fingerprint(params: dict[str, Any], data_digest: str, *, code: str, runtime: str) -> str:
    """Hash of the params that affect training, the data's and the code's digests, and what
    the run really ran on (`auto` backend, device and dtype differ from machine to machine)."""
    relevant = {key: params[key] for key in ("seed", "model", "train", "ipex")}
    relevant.update(data=data_digest, code=code, runtime=runtime)
    text = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(path: str | Path, fingerprint: str, state: dict[str, Any]) -> None:
    """Write {format, fingerprint, **state} atomically: a kill mid-write keeps the previous one."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fingerprint}
    payload.update(state)
    # Serialized in memory first: torch.save meeting a full disk raises a RuntimeError that
    # names no file; a plain write raises the OSError that `atomic` turns into one line.
    write_bytes(path, torch_bytes(payload))


def load_checkpoint(path: str | Path, fingerprint: str) -> dict[str, Any] | None:
    """The stored state if `path` holds a checkpoint with this fingerprint, else None.

    A missing file is silent; an unreadable or foreign one is reported in one line and ignored.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file must not stop training
        _say(f"checkpoint {path} unreadable ({type(exc).__name__}), starting fresh")
        return None
    if (
        not isinstance(payload, dict)
        or payload.get("format") != FORMAT
        or payload.get("format_version") != FORMAT_VERSION
    ):
        _say(f"checkpoint {path} is not a train checkpoint of this version, starting fresh")
        return None
    if payload.get("fingerprint") != fingerprint:
        _say("checkpoint from other params, data or code, starting fresh")
        return None
    return payload


def discard_checkpoint(path: str | Path, why: str) -> None:
    """A checkpoint that passed the fingerprint check yet cannot be restored: say so, delete."""
    _say(f"checkpoint {path} does not fit this run ({why}), starting fresh")
    remove_checkpoint(path)


def remove_checkpoint(path: str | Path) -> None:
    """Delete the checkpoint after a finished run (its results are in the model file)."""
    Path(path).unlink(missing_ok=True)


def _say(message: str) -> None:
    print(f"train: {message}", file=sys.stderr, flush=True)

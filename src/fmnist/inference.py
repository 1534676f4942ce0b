"""Batched logits for uint8 images: the one forward pass that evaluate, export and predict share."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import nn

from fmnist.accel import Backend, autocast
from fmnist.constants import IMAGE_SIZE, NUM_CLASSES
from fmnist.errors import FmnistError


def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    *,
    batch_size: int,
    backend: Backend | None = None,
) -> np.ndarray:
    """Logits, float32 (N, classes), of raw uint8 images (N, 28, 28).

    The model runs in eval mode under `inference_mode`, with the backend's autocast (a bf16
    backend measures the model as bf16 training saw it; evaluate's headline metrics use float32,
    as export ships it) and channels_last input. Without a backend: float32 on the CPU. The
    model's train/eval mode is restored after.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise FmnistError(f"images: expected a uint8 numpy array, got {_describe(images)}")
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise FmnistError(
            f"images: expected shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}), got {images.shape}"
        )
    if batch_size < 1:
        raise FmnistError(f"batch_size: must be >= 1, got {batch_size}")
    device = backend.device if backend is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    batches: list[np.ndarray] = []
    try:
        with torch.inference_mode(), _autocast(backend):
            for start in range(0, len(images), batch_size):
                x = torch.from_numpy(images[start : start + batch_size]).to(device)
                x = x.unsqueeze(1).float().contiguous(memory_format=torch.channels_last)
                batches.append(model(x).float().cpu().numpy())
    finally:
        model.train(was_training)
    if not batches:
        return np.zeros((0, NUM_CLASSES), dtype=np.float32)
    return np.concatenate(batches).astype(np.float32, copy=False)


def _autocast(backend: Backend | None) -> AbstractContextManager:
    return nullcontext() if backend is None else autocast(backend)


def _describe(value: object) -> str:
    dtype = getattr(value, "dtype", None)
    return f"{type(value).__name__} of {dtype}" if dtype is not None else type(value).__name__

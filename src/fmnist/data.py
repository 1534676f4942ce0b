"""The prepared HDF5, read whole into memory, and batches cut from it with tensor ops.

Fashion-MNIST fits in memory (47 MB as uint8), so a per-sample Dataset/DataLoader would only
add Python work per image: batches are index gathers on one tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from fmnist.constants import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, PREPARED_FILE, SPLITS
from fmnist.errors import FmnistError


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, 28, 28), raw pixels
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Prepared:
    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...] = CLASS_NAMES


def _read_split(file: h5py.File, name: str, path: Path) -> Split:
    group = file.get(name)
    if not isinstance(group, h5py.Group) or not all(
        isinstance(group.get(key), h5py.Dataset) for key in ("images", "labels")
    ):
        raise FmnistError(f"{path}: split {name!r} is missing (rerun preprocess)")
    images, labels = group["images"], group["labels"]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE,) * 2:
        raise FmnistError(
            f"{path}: {name}/images has shape {images.shape} {images.dtype}, "
            f"expected (N, {IMAGE_SIZE}, {IMAGE_SIZE}) uint8"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise FmnistError(
            f"{path}: {name}/labels has shape {labels.shape}, expected ({images.shape[0]},)"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise FmnistError(f"{path}: {name}/labels has dtype {labels.dtype}, expected integers")
    labels_np = labels[()].astype(np.int64)
    if labels_np.size and (labels_np.min() < 0 or labels_np.max() >= NUM_CLASSES):
        raise FmnistError(
            f"{path}: {name}/labels out of range: found {labels_np.min()}..{labels_np.max()}, "
            f"expected 0..{NUM_CLASSES - 1}"
        )
    return Split(images=images[()], labels=labels_np)


def load_prepared(path: str | Path = PREPARED_FILE) -> Prepared:
    """All three splits, validated: a bad file is a one-line FmnistError, not a crash later."""
    path = Path(path)
    if not path.is_file():
        raise FmnistError(f"{path}: not found (run: dvc repro preprocess)")
    try:
        with h5py.File(path, "r") as file:
            splits = {name: _read_split(file, name, path) for name in SPLITS}
            names = file.attrs.get("class_names")
    except OSError as exc:
        raise FmnistError(f"{path}: not a readable HDF5 file ({exc})") from None
    class_names = CLASS_NAMES
    if names is not None:
        try:
            class_names = tuple(json.loads(names) if isinstance(names, str) else map(str, names))
        except (ValueError, TypeError):
            raise FmnistError(f"{path}: unreadable class_names attribute {names!r}") from None
        if len(class_names) != NUM_CLASSES:
            raise FmnistError(f"{path}: {len(class_names)} class names, expected {NUM_CLASSES}")
    return Prepared(class_names=class_names, **splits)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator that depends on (seed, epoch) only: a resumed run replays the same order."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


class BatchIterator:
    """Batches of (float32 raw pixels (B,1,28,28), int64 labels) from in-memory arrays.

    Keeps the last partial batch unless `drop_last`. Under DDP each rank takes its contiguous
    share of every global batch (`batch_size` is global); with fewer examples than ranks in
    the last batch, that batch is dropped on every rank so all ranks step together.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < world_size:
            raise FmnistError(f"batch size {batch_size} is smaller than the {world_size} ranks")
        self.images = torch.as_tensor(np.asarray(images)).unsqueeze(1)  # uint8 (N,1,28,28)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if len(self.images) != len(self.labels):
            raise FmnistError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(len(self.labels), self.batch_size)
        keep_rest = rest > 0 and not self.drop_last and rest >= self.world_size
        return full + int(keep_rest)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=epoch_generator(self.seed, self.epoch))
        else:
            order = torch.arange(n)
        for b in range(len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.world_size > 1:
                batch = torch.tensor_split(batch, self.world_size)[self.rank]
            yield self.images[batch].float(), self.labels[batch]


def augment_batch(
    x: torch.Tensor, *, flip: bool, crop_padding: int, generator: torch.Generator
) -> torch.Tensor:
    """Per-image random horizontal flips and random crops after zero padding, whole batch."""
    if flip:
        flipped = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(flipped[:, None, None, None], x.flip(3), x)
    if crop_padding > 0:
        b, _, h, w = x.shape
        padded = F.pad(x, (crop_padding,) * 4)  # 0 is the background of raw pixels
        dy = torch.randint(0, 2 * crop_padding + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * crop_padding + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
        batch = torch.arange(b)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    return x.contiguous()

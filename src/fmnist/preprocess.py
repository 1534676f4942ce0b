"""Raw IDX files -> one HDF5 with uint8 train/val/test splits, stratified and seeded."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fmnist.atomic import write_bytes
from fmnist.constants import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, RAW_FILES
from fmnist.errors import FmnistError
from fmnist.idx import read_idx

# The label-noise generator's stream: seeded with the run's seed but never the split's stream.
LABEL_NOISE_STREAM = 7


def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of n examples whose class counts are proportional (each within 1)."""
    labels = np.asarray(labels)
    if not 0 <= n <= len(labels):
        raise FmnistError(f"cannot take {n} of {len(labels)} examples")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    take = np.floor(exact).astype(np.int64)
    # Largest remainders get the examples that rounding down left over.
    for i in np.argsort(-(exact - take), kind="stable")[: n - take.sum()]:
        take[i] += 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def split_sizes(images: int, val_fraction: float) -> tuple[int, int]:
    """(training, validation) images that `images` training images split into."""
    val = round(images * val_fraction)
    return images - val, val


def split_train_val(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): a stratified validation share, drawn with `seed`."""
    val = stratified_indices(labels, split_sizes(len(labels), val_fraction)[1], seed)
    train = np.setdiff1d(np.arange(len(labels)), val, assume_unique=True)
    return train, val


def _load_pair(raw_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = raw_dir / RAW_FILES[f"{split}_images"]
    labels_path = raw_dir / RAW_FILES[f"{split}_labels"]
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE,) * 2:
        raise FmnistError(
            f"{images_path}: images of shape {images.shape} {images.dtype}, "
            f"expected (N, {IMAGE_SIZE}, {IMAGE_SIZE}) uint8"
        )
    if len(images) == 0:
        raise FmnistError(f"{images_path}: no images")
    if labels.ndim != 1 or len(labels) != len(images):
        raise FmnistError(
            f"{labels_path}: {labels.shape} labels for {len(images)} images in {images_path.name}"
        )
    if labels.dtype.kind not in "iu":  # astype(int64) would silently truncate 1.5 to 1
        raise FmnistError(f"{labels_path}: labels of dtype {labels.dtype}, expected integers")
    out_of_range = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if out_of_range.size:
        raise FmnistError(
            f"{labels_path}: label {out_of_range[0]} out of range 0..{NUM_CLASSES - 1}"
        )
    return images, labels.astype(np.int64)


def with_label_noise(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, int]:
    """(labels with round(fraction * n) of them, chosen with `seed`, moved to a uniformly drawn
    *other* class, how many): symmetric noise whose rate is exactly the fraction asked for."""
    count = round(fraction * len(labels))
    if count == 0:
        return labels, 0
    rng = np.random.default_rng([seed, LABEL_NOISE_STREAM])
    chosen = rng.choice(len(labels), size=count, replace=False)
    noisy = labels.copy()
    shift = rng.integers(1, NUM_CLASSES, size=count)  # 1..9: never the true class
    noisy[chosen] = (labels[chosen] + shift) % NUM_CLASSES
    return noisy, count


def prepare(
    raw_dir: str | Path,
    out_path: str | Path,
    *,
    val_fraction: float,
    train_subset: int | None,
    seed: int,
    label_noise: float = 0.0,
) -> dict[str, int]:
    """Write the prepared HDF5 atomically; returns the split sizes."""
    raw_dir = Path(raw_dir)
    train_images, train_labels = _load_pair(raw_dir, "train")
    test_images, test_labels = _load_pair(raw_dir, "test")
    train_idx, val_idx = split_train_val(train_labels, val_fraction, seed)
    if len(val_idx) == 0 or len(train_idx) == 0:
        empty = "val" if len(train_idx) else "train"
        raise FmnistError(
            f"{raw_dir / RAW_FILES['train_images']}: val_fraction {val_fraction} of "
            f"{len(train_labels)} images leaves an empty {empty} split"
        )
    if train_subset is not None and train_subset < len(train_idx):
        keep = stratified_indices(train_labels[train_idx], train_subset, seed)
        train_idx = train_idx[keep]
    noisy_labels, flipped = with_label_noise(train_labels[train_idx], label_noise, seed)
    splits = {
        "train": (train_images[train_idx], noisy_labels),
        "val": (train_images[val_idx], train_labels[val_idx]),
        "test": (test_images, test_labels),
    }
    sizes = {name: len(labels) for name, (_, labels) in splits.items()}
    attrs: dict[str, Any] = {
        "class_names": json.dumps(list(CLASS_NAMES)),
        "split_sizes": json.dumps(sizes),
        "seed": seed,
        "val_fraction": val_fraction,
        "train_subset": -1 if train_subset is None else train_subset,
        "label_noise": label_noise,
        "labels_flipped": flipped,
    }
    # Built in memory, then written by Python: h5py meeting a full disk mid-write can crash
    # the interpreter, a plain write fails with an OSError that names the file.
    buffer = io.BytesIO()
    # track_times=False: no timestamps, so the same inputs give the same bytes.
    with h5py.File(buffer, "w", track_order=False) as file:
        for name, (images, labels) in splits.items():
            group = file.create_group(name, track_order=False)
            group.create_dataset("images", data=images, track_times=False,
                                 compression="gzip", compression_opts=4, shuffle=True,
                                 chunks=(min(len(images), 1024) or 1, IMAGE_SIZE, IMAGE_SIZE))
            group.create_dataset("labels", data=labels, track_times=False)
        file.attrs.update(attrs)
    write_bytes(out_path, buffer.getbuffer())
    return sizes

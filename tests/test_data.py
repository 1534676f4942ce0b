"""The prepared file is validated on load; batches cover each example once, in a seeded order."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmnist.constants import CLASS_NAMES, RAW_FILES
from fmnist.data import BatchIterator, augment_batch, load_prepared
from fmnist.errors import FmnistError
from fmnist.idx import write_idx
from fmnist.preprocess import prepare

torch.set_num_threads(1)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def _write_h5(path: Path, skip: str = "", **override: np.ndarray) -> Path:
    """A prepared-style file; override e.g. val_images=..., test_labels=..."""
    arrays = {}
    for i, split in enumerate(("train", "val", "test")):
        arrays[f"{split}_images"] = _images(12, i)
        arrays[f"{split}_labels"] = np.arange(12, dtype=np.int64) % 10
    arrays.update(override)
    with h5py.File(path, "w") as file:
        for split in ("train", "val", "test"):
            if split == skip:
                continue
            file.create_dataset(f"{split}/images", data=arrays[f"{split}_images"])
            file.create_dataset(f"{split}/labels", data=arrays[f"{split}_labels"])
    return path


def _assert_one_line_naming(exc: pytest.ExceptionInfo[FmnistError], path: Path) -> None:
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_load_prepared_returns_what_prepare_wrote(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    train_images, test_images = _images(100, 1), _images(20, 2)
    write_idx(raw / RAW_FILES["train_images"], train_images)
    write_idx(raw / RAW_FILES["train_labels"], (np.arange(100) % 10).astype(np.uint8))
    write_idx(raw / RAW_FILES["test_images"], test_images)
    write_idx(raw / RAW_FILES["test_labels"], (np.arange(20) % 10).astype(np.uint8))
    prepare(raw, tmp_path / "p.h5", val_fraction=0.2, train_subset=None, seed=0)

    data = load_prepared(tmp_path / "p.h5")

    assert (len(data.train), len(data.val), len(data.test)) == (80, 20, 20)
    assert data.class_names == CLASS_NAMES
    for split in (data.train, data.val, data.test):
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (28, 28)
        assert split.labels.dtype == np.int64
    np.testing.assert_array_equal(data.test.images, test_images)
    np.testing.assert_array_equal(data.test.labels, np.arange(20) % 10)


@pytest.mark.parametrize(
    ("skip", "override", "why"),
    [
        ("val", {}, "'val' is missing"),
        ("", {"train_images": np.zeros((12, 28, 27), np.uint8)}, "train/images has shape"),
        ("", {"val_images": np.zeros((12, 28, 28), np.float32)}, "float32"),
        ("", {"test_labels": np.full(12, 10, np.int64)}, "test/labels out of range"),
        ("", {"test_labels": np.full(12, -1, np.int64)}, "test/labels out of range"),
        ("", {"train_labels": np.zeros(12, np.float64)}, "expected integers"),
        ("", {"val_labels": np.zeros(11, np.int64)}, "val/labels has shape"),
    ],
    ids=["missing-split", "shape", "dtype", "label-10", "label-negative", "float-labels", "count"],
)
def test_load_prepared_rejects_a_bad_file_naming_it(
    tmp_path: Path, skip: str, override: dict[str, np.ndarray], why: str
) -> None:
    path = _write_h5(tmp_path / "bad.h5", skip, **override)
    with pytest.raises(FmnistError, match=why) as exc:
        load_prepared(path)
    _assert_one_line_naming(exc, path)


def test_load_prepared_rejects_a_file_that_is_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "fashion_mnist.h5"
    path.write_text("split,images\n")
    with pytest.raises(FmnistError, match="HDF5") as exc:
        load_prepared(path)
    _assert_one_line_naming(exc, path)


def test_load_prepared_names_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.h5"
    with pytest.raises(FmnistError, match="not found") as exc:
        load_prepared(path)
    _assert_one_line_naming(exc, path)


def test_load_prepared_rejects_a_split_that_is_not_a_group(tmp_path: Path) -> None:
    path = _write_h5(tmp_path / "bad.h5", skip="test")
    with h5py.File(path, "a") as file:
        file.create_dataset("test", data=np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(FmnistError, match="'test'") as exc:
        load_prepared(path)
    _assert_one_line_naming(exc, path)


def test_load_prepared_rejects_unreadable_class_names(tmp_path: Path) -> None:
    path = _write_h5(tmp_path / "bad.h5")
    with h5py.File(path, "a") as file:
        file.attrs["class_names"] = "[not json"
    with pytest.raises(FmnistError, match="class") as exc:
        load_prepared(path)
    _assert_one_line_naming(exc, path)


def _epoch(it: BatchIterator, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it.set_epoch(epoch)
    return list(it)


def _indexed(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels are the example's index, so batches show exactly which examples they hold."""
    return _images(n), np.arange(n, dtype=np.int64)


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_example_exactly_once_per_epoch_including_the_last_partial_batch(
    shuffle: bool,
) -> None:
    images, ids = _indexed(23)
    it = BatchIterator(images, ids, 5, shuffle=shuffle, seed=1)
    batches = _epoch(it, 3)
    assert len(it) == len(batches) == 5
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(23))
    assert (seen.tolist() == list(range(23))) is not shuffle


def test_drop_last_drops_only_the_partial_batch() -> None:
    images, ids = _indexed(23)
    it = BatchIterator(images, ids, 5, shuffle=True, seed=1, drop_last=True)
    batches = _epoch(it)
    assert len(it) == len(batches) == 4
    assert all(len(y) == 5 for _, y in batches)
    assert len(set(torch.cat([y for _, y in batches]).tolist())) == 20


def test_batches_are_float32_raw_pixels_and_int64_labels() -> None:
    images, ids = _indexed(10)
    batches = list(BatchIterator(images, torch.as_tensor(ids), 4, shuffle=True, seed=0))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape == (len(y), 1, 28, 28)
        assert y.dtype == torch.int64
        expected = torch.as_tensor(images[y.numpy()]).float().unsqueeze(1)
        assert torch.equal(x, expected)  # raw 0..255: normalization is the model's job
        assert x.max() > 1


def test_same_seed_and_epoch_same_order_other_epoch_or_seed_other_order() -> None:
    images, ids = _indexed(64)

    def order(seed: int, epoch: int) -> list[int]:
        it = BatchIterator(images, ids, 16, shuffle=True, seed=seed)
        return torch.cat([y for _, y in _epoch(it, epoch)]).tolist()

    assert order(5, 2) == order(5, 2)
    assert order(5, 2) != order(5, 3)
    assert order(5, 2) != order(6, 2)
    resumed = BatchIterator(images, ids, 16, shuffle=True, seed=5)
    _epoch(resumed, 0)
    assert torch.cat([y for _, y in _epoch(resumed, 2)]).tolist() == order(5, 2)


@pytest.mark.parametrize(("n", "batch_size"), [(23, 6), (24, 6), (40, 8)])
def test_ranks_together_take_exactly_each_global_batch(n: int, batch_size: int) -> None:
    images, ids = _indexed(n)
    whole = _epoch(BatchIterator(images, ids, batch_size, shuffle=True, seed=3), 1)
    ranks = [
        _epoch(BatchIterator(images, ids, batch_size, shuffle=True, seed=3, rank=rank,
                             world_size=2), 1)
        for rank in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(whole)
    for step, (_, y) in enumerate(whole):
        parts = [rank[step] for rank in ranks]
        assert all(len(part_y) > 0 for _, part_y in parts)
        assert torch.equal(torch.cat([part_y for _, part_y in parts]), y)
        assert torch.equal(torch.cat([part_x for part_x, _ in parts]), whole[step][0])


def _asymmetric(b: int) -> torch.Tensor:
    """Images with distinct pixels and a non-zero border: flips and shifts always show."""
    return torch.arange(b * 28 * 28, dtype=torch.float32).reshape(b, 1, 28, 28) % 251 + 1


def test_augment_is_deterministic_given_the_generator() -> None:
    x = _asymmetric(32)

    def run(seed: int) -> torch.Tensor:
        return augment_batch(x, flip=True, crop_padding=2,
                             generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_flip_only_mirrors_some_images() -> None:
    x = _asymmetric(64)
    out = augment_batch(x, flip=True, crop_padding=0, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    same = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 0 < sum(mirrored) < 64


def _shift(img: torch.Tensor, dy: int, dx: int, pad: int) -> torch.Tensor:
    padded = F.pad(img, (pad,) * 4)
    return padded[:, pad + dy : pad + dy + 28, pad + dx : pad + dx + 28]


def test_crop_keeps_shape_and_shifts_content_within_the_padding() -> None:
    pad = 3
    x = _asymmetric(64)
    out = augment_batch(x, flip=False, crop_padding=pad,
                        generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    shifts = []
    for o, i in zip(out, x, strict=True):
        found = [
            (dy, dx)
            for dy in range(-pad, pad + 1)
            for dx in range(-pad, pad + 1)
            if torch.equal(o, _shift(i, dy, dx, pad))
        ]
        assert len(found) == 1
        shifts.append(found[0])
    assert {dy for dy, _ in shifts} == set(range(-pad, pad + 1))
    assert {dx for _, dx in shifts} == set(range(-pad, pad + 1))


def test_no_augmentation_changes_nothing_and_draws_nothing() -> None:
    x = _asymmetric(8)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    out = augment_batch(x, flip=False, crop_padding=0, generator=generator)
    assert torch.equal(out, x)
    assert torch.equal(generator.get_state(), state)

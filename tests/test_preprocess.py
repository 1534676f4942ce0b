"""Preprocess: stratified, seeded, disjoint splits in one deterministic HDF5 with a fixed layout."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmnist.constants import CLASS_NAMES, RAW_FILES
from fmnist.errors import FmnistError
from fmnist.idx import write_idx
from fmnist.preprocess import prepare, split_sizes, split_train_val, stratified_indices

# Unbalanced on purpose: proportional rounding has something to get wrong.
CLASS_COUNTS = [50, 40, 35, 30, 30, 30, 25, 25, 20, 15]
N_TRAIN, N_TEST = sum(CLASS_COUNTS), 50


def _train_labels() -> np.ndarray:
    labels = np.repeat(np.arange(10), CLASS_COUNTS)
    return np.random.default_rng(123).permutation(labels).astype(np.uint8)


def _tagged_images(n: int, offset: int = 0) -> np.ndarray:
    """Image i carries its own index in two pixels, so any split can be traced to the source."""
    images = np.random.default_rng(n).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    ids = np.arange(n) + offset
    images[:, 0, 0], images[:, 0, 1] = ids % 256, ids // 256
    return images


def _source_ids(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0].astype(np.int64) + 256 * images[:, 0, 1].astype(np.int64)


def _write_raw(raw: Path, **override: np.ndarray) -> Path:
    arrays = {
        "train_images": _tagged_images(N_TRAIN),
        "train_labels": _train_labels(),
        "test_images": _tagged_images(N_TEST, offset=1000),
        "test_labels": (np.arange(N_TEST) % 10).astype(np.uint8),
    }
    arrays.update(override)
    raw.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        write_idx(raw / RAW_FILES[key], array)
    return raw


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return _write_raw(tmp_path / "raw")


def _read(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with h5py.File(path, "r") as file:
        return {s: (file[s]["images"][()], file[s]["labels"][()]) for s in ("train", "val", "test")}


def _assert_proportional(chosen: np.ndarray, population: np.ndarray) -> None:
    n = len(chosen)
    for c in np.unique(population):
        expected = np.sum(population == c) * n / len(population)
        got = np.sum(chosen == c)
        assert np.floor(expected) <= got <= np.ceil(expected), (c, got, expected)


@pytest.mark.parametrize(("fraction", "n_val"), [(0.1, 30), (0.25, 75), (0.5, 150)])
def test_val_size_follows_val_fraction(fraction: float, n_val: int) -> None:
    train, val = split_train_val(_train_labels(), fraction, seed=0)
    assert (len(train), len(val)) == (N_TRAIN - n_val, n_val)


def test_val_split_is_stratified() -> None:
    labels = _train_labels()
    _, val = split_train_val(labels, 0.1, seed=3)
    _assert_proportional(labels[val], labels)


def test_train_and_val_are_disjoint_and_cover_the_training_set() -> None:
    train, val = split_train_val(_train_labels(), 0.2, seed=5)
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(N_TRAIN))


def test_same_seed_same_split_other_seed_other_split() -> None:
    labels = _train_labels()
    first, again, other = (split_train_val(labels, 0.1, seed) for seed in (7, 7, 8))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


@settings(max_examples=200, deadline=None)
@given(
    labels=st.lists(st.integers(0, 9), min_size=1, max_size=200),
    share=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_stratified_indices_are_sorted_unique_and_proportional(
    labels: list[int], share: float, seed: int
) -> None:
    labels_np = np.array(labels)
    n = int(round(share * len(labels_np)))
    chosen = stratified_indices(labels_np, n, seed)
    assert len(chosen) == n
    assert np.all(np.diff(chosen) > 0)
    assert chosen.dtype.kind == "i" and (n == 0 or 0 <= chosen.min() <= chosen.max() < len(labels))
    _assert_proportional(labels_np[chosen], labels_np)


def test_stratified_indices_rejects_more_than_available() -> None:
    with pytest.raises(FmnistError, match="cannot take 11 of 10"):
        stratified_indices(np.zeros(10, dtype=np.int64), 11, 0)


def test_prepared_file_has_the_documented_layout_and_attrs(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared" / "fashion_mnist.h5"
    sizes = prepare(raw, out, val_fraction=0.1, train_subset=None, seed=1)
    assert sizes == {"train": 270, "val": 30, "test": 50}
    with h5py.File(out, "r") as file:
        assert sorted(file) == ["test", "train", "val"]
        for split, n in sizes.items():
            assert file[split]["images"].dtype == np.uint8
            assert file[split]["images"].shape == (n, 28, 28)
            assert file[split]["labels"].dtype == np.int64
            assert file[split]["labels"].shape == (n,)
        assert json.loads(file.attrs["class_names"]) == list(CLASS_NAMES)
        assert json.loads(file.attrs["split_sizes"]) == sizes
        assert file.attrs["seed"] == 1
        assert file.attrs["val_fraction"] == 0.1
    splits = _read(out)
    np.testing.assert_array_equal(splits["test"][0], _tagged_images(N_TEST, offset=1000))
    np.testing.assert_array_equal(splits["test"][1], np.arange(N_TEST) % 10)


def test_prepared_splits_keep_each_image_with_its_label(raw: Path, tmp_path: Path) -> None:
    prepare(raw, tmp_path / "p.h5", val_fraction=0.2, train_subset=None, seed=4)
    splits = _read(tmp_path / "p.h5")
    train_ids, val_ids = _source_ids(splits["train"][0]), _source_ids(splits["val"][0])
    assert np.intersect1d(train_ids, val_ids).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_ids, val_ids])), np.arange(N_TRAIN))
    labels = _train_labels()
    for split, ids in (("train", train_ids), ("val", val_ids)):
        np.testing.assert_array_equal(splits[split][1], labels[ids])
        np.testing.assert_array_equal(splits[split][0], _tagged_images(N_TRAIN)[ids])
    _assert_proportional(splits["val"][1], labels)


def test_train_subset_is_stratified_and_excludes_val(raw: Path, tmp_path: Path) -> None:
    full = tmp_path / "full.h5"
    small = tmp_path / "small.h5"
    prepare(raw, full, val_fraction=0.1, train_subset=None, seed=2)
    sizes = prepare(raw, small, val_fraction=0.1, train_subset=100, seed=2)
    assert sizes == {"train": 100, "val": 30, "test": 50}
    before, after = _read(full), _read(small)
    _assert_proportional(after["train"][1], before["train"][1])
    assert np.isin(_source_ids(after["train"][0]), _source_ids(before["train"][0])).all()
    np.testing.assert_array_equal(after["val"][0], before["val"][0])


def test_train_subset_larger_than_train_keeps_everything(raw: Path, tmp_path: Path) -> None:
    sizes = prepare(raw, tmp_path / "p.h5", val_fraction=0.1, train_subset=10_000, seed=0)
    assert sizes["train"] == 270


def test_same_seed_gives_byte_identical_file(raw: Path, tmp_path: Path) -> None:
    first, second, other = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"
    prepare(raw, first, val_fraction=0.1, train_subset=120, seed=9)
    prepare(raw, second, val_fraction=0.1, train_subset=120, seed=9)
    prepare(raw, other, val_fraction=0.1, train_subset=120, seed=10)
    assert first.read_bytes() == second.read_bytes()
    assert not np.array_equal(_read(first)["val"][0], _read(other)["val"][0])


@pytest.mark.parametrize(
    ("override", "bad_file", "why"),
    [
        ({"train_labels": _train_labels()[:-1]}, "train_labels", "labels for 300 images"),
        ({"test_labels": np.full(N_TEST, 10, dtype=np.uint8)}, "test_labels", "label 10"),
        ({"train_labels": _train_labels().astype(np.int8) - 1}, "train_labels", "label -1"),
        ({"test_labels": np.full(N_TEST, 1.5, dtype=np.float32)}, "test_labels", "float32"),
        ({"test_images": np.zeros((N_TEST, 27, 28), np.uint8)}, "test_images", "27, 28"),
        ({"test_images": np.zeros((N_TEST, 28, 28), np.int32)}, "test_images", "int32"),
        ({"test_images": np.zeros((0, 28, 28), np.uint8),
          "test_labels": np.zeros(0, np.uint8)}, "test_images", "no images"),
    ],
    ids=["count", "label-10", "label-negative", "float-labels", "shape", "dtype", "empty"],
)
def test_malformed_raw_input_is_one_line_error_naming_the_file(
    tmp_path: Path, override: dict[str, np.ndarray], bad_file: str, why: str
) -> None:
    raw = _write_raw(tmp_path / "raw", **override)
    out = tmp_path / "out" / "p.h5"
    with pytest.raises(FmnistError, match=why) as exc:
        prepare(raw, out, val_fraction=0.1, train_subset=None, seed=0)
    assert RAW_FILES[bad_file] in str(exc.value) and "\n" not in str(exc.value)
    assert not out.exists()


def test_missing_raw_file_is_named(tmp_path: Path) -> None:
    raw = _write_raw(tmp_path / "raw")
    (raw / RAW_FILES["test_images"]).unlink()
    with pytest.raises(FmnistError, match=RAW_FILES["test_images"]):
        prepare(raw, tmp_path / "p.h5", val_fraction=0.1, train_subset=None, seed=0)


def test_too_small_a_val_share_is_an_error_not_an_empty_split(tmp_path: Path) -> None:
    raw = _write_raw(tmp_path / "raw")
    with pytest.raises(FmnistError, match="val"):
        prepare(raw, tmp_path / "p.h5", val_fraction=0.001, train_subset=None, seed=0)
    assert not (tmp_path / "p.h5").exists()


def test_label_noise_moves_exactly_that_fraction_of_train_labels_to_other_classes(
    raw: Path, tmp_path: Path
) -> None:
    prepare(raw, tmp_path / "clean.h5", val_fraction=0.1, train_subset=None, seed=3)
    prepare(raw, tmp_path / "noisy.h5", val_fraction=0.1, train_subset=None, seed=3,
            label_noise=0.4)
    clean, noisy = _read(tmp_path / "clean.h5"), _read(tmp_path / "noisy.h5")
    for split in ("train", "val", "test"):  # same images, same order
        np.testing.assert_array_equal(clean[split][0], noisy[split][0])
    for split in ("val", "test"):  # evaluation stays clean
        np.testing.assert_array_equal(clean[split][1], noisy[split][1])
    changed = clean["train"][1] != noisy["train"][1]
    assert changed.sum() == round(0.4 * 270)  # never "flipped" to the same class
    assert noisy["train"][1].min() >= 0 and noisy["train"][1].max() < 10
    with h5py.File(tmp_path / "noisy.h5", "r") as file:
        assert file.attrs["label_noise"] == 0.4 and file.attrs["labels_flipped"] == 108
    prepare(raw, tmp_path / "other.h5", val_fraction=0.1, train_subset=None, seed=3,
            label_noise=0.4)
    assert (tmp_path / "other.h5").read_bytes() == (tmp_path / "noisy.h5").read_bytes()
    prepare(raw, tmp_path / "seed4.h5", val_fraction=0.1, train_subset=None, seed=4,
            label_noise=0.4)
    clean4 = prepare(raw, tmp_path / "clean4.h5", val_fraction=0.1, train_subset=None, seed=4)
    assert clean4 == {"train": 270, "val": 30, "test": 50}
    moved4 = _read(tmp_path / "seed4.h5")["train"][1] != _read(tmp_path / "clean4.h5")["train"][1]
    assert moved4.sum() == 108 and not np.array_equal(moved4, changed)


def test_split_sizes_are_what_the_split_draws() -> None:
    labels = np.repeat(np.arange(10), 7)
    train, val = split_train_val(labels, 0.15, seed=0)
    assert (len(train), len(val)) == split_sizes(70, 0.15) == (60, 10)

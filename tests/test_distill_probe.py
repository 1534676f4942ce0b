"""bench/distill_probe.py: the student's loss mixes in the teacher's logits of the very images in
each batch, alpha 0 is the train stage's training bit for bit, and fmnist.train is left as it
was found."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from project_files import load_bench_script

import fmnist.train as train_module
from fmnist.constants import CLASS_NAMES
from fmnist.data import Prepared, Split
from fmnist.params import load_params
from fmnist.train import fit

REPO = Path(__file__).resolve().parents[1]

probe = load_bench_script("distill_probe")


def _split(n: int, seed: int) -> Split:
    """Random images, so that every image is its own key; labels 0-2."""
    rng = np.random.default_rng(seed)
    return Split(images=rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
                 labels=np.arange(n, dtype=np.int64) % 3)


DATA = Prepared(train=_split(96, 0), val=_split(32, 1), test=_split(32, 2),
                class_names=CLASS_NAMES)


def _params() -> dict[str, Any]:
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["model"].update(channels=[4, 8], convs_per_block=1, hidden=16)
    # plain steps in the first epoch, SAM steps (two losses each) in the second
    params["train"].update(batch_size=32, epochs=2, threads=1, sam_start=0.5, ema_decay=0.0)
    params["ipex"].update(enabled=False, dtype="float32")
    return params


def _one_hot_teacher(split: Split) -> probe.TeacherTargets:
    return probe.TeacherTargets(split.images, 10.0 * np.eye(10)[split.labels])


def test_alpha_zero_is_the_label_smoothed_cross_entropy() -> None:
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    loss = probe.distill_loss(logits, labels, torch.randn(8, 10), label_smoothing=0.1,
                              alpha=0.0, temperature=4.0)
    assert torch.equal(loss, F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_the_soft_term_is_zero_only_where_the_student_agrees_with_the_teacher() -> None:
    teacher, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    agree = probe.distill_loss(teacher, labels, teacher, label_smoothing=0.0, alpha=1.0,
                               temperature=2.0)
    disagree = probe.distill_loss(-teacher, labels, teacher, label_smoothing=0.0, alpha=1.0,
                                  temperature=2.0)
    assert agree.abs().item() < 1e-6 < disagree.item()


def test_every_loss_sees_the_teacher_logits_of_its_own_batch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    real = probe.distill_loss

    def checking(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor,
                 **kwargs: Any) -> torch.Tensor:
        seen.append(len(teacher) == len(labels) and torch.equal(teacher.argmax(1), labels))
        return real(logits, labels, teacher, **kwargs)

    monkeypatch.setattr(probe, "distill_loss", checking)
    original = train_module.augment_batch, train_module.nn
    with probe.distilling(_one_hot_teacher(DATA.train), alpha=0.5, temperature=4.0):
        fit(DATA, _params(), progress=False)
    # 3 plain steps, then 3 SAM steps of 2 passes each, every one with its batch's teacher rows
    assert seen == [True] * 9
    assert (train_module.augment_batch, train_module.nn) == original


def test_a_batch_finds_each_images_own_teacher_row() -> None:
    rows = np.random.default_rng(3).normal(size=(len(DATA.train.labels), 10))
    targets = probe.TeacherTargets(DATA.train.images, rows)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:32]
    batch = torch.as_tensor(DATA.train.images)[order].unsqueeze(1).float()  # as BatchIterator
    targets.look_up(batch)
    assert torch.equal(targets.current, torch.as_tensor(rows, dtype=torch.float32)[order])


def test_alpha_zero_trains_bit_identical_to_the_train_stage() -> None:
    """In float32 (the probe's bf16 runs autocast alike, but are not compared here)."""
    plain = fit(DATA, _params(), progress=False).model.state_dict()
    with probe.distilling(_one_hot_teacher(DATA.train), alpha=0.0, temperature=4.0):
        probed = fit(DATA, _params(), progress=False).model.state_dict()
    with probe.distilling(_one_hot_teacher(DATA.train), alpha=0.5, temperature=4.0):
        distilled = fit(DATA, _params(), progress=False).model.state_dict()
    assert all(torch.equal(plain[k], probed[k]) for k in plain)
    assert not all(torch.equal(plain[k], distilled[k]) for k in plain)

"""bench/lever_probe.py: cutout blanks one square on the chosen images, alternating flips flip
each image every other epoch, no-decay exempts exactly BatchNorm and biases, `fit` trains with a
lever only while the probe says so, bad levers are one-line errors, and the table pairs each
seed with its recipe's run."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from project_files import load_bench_script

import fmnist.train as train_module
from fmnist.accel import select_backend
from fmnist.constants import CLASS_NAMES
from fmnist.data import Prepared, Split, augment_batch
from fmnist.model import build_model
from fmnist.params import load_params
from fmnist.sam import SAM
from fmnist.train import fit

REPO = Path(__file__).resolve().parents[1]
PARAMS = load_params(REPO / "params.yaml")

probe = load_bench_script("lever_probe")


def _split(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    return Split(images=rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
                 labels=np.arange(n, dtype=np.int64) % 3)


DATA = Prepared(train=_split(64, 0), val=_split(32, 1), test=_split(32, 2),
                class_names=CLASS_NAMES)


def _images(n: int) -> torch.Tensor:
    return torch.arange(1, n * 784 + 1, dtype=torch.float32).reshape(n, 1, 28, 28) % 251 + 1


def test_cutout_blanks_one_size_by_size_square_on_the_chosen_images() -> None:
    x = _images(64)
    out = probe.cutout(x, torch.Generator().manual_seed(0), size=6, probability=0.5)
    blanked = (out == 0).sum(dim=(1, 2, 3))
    assert 10 < int((blanked > 0).sum()) < 54  # about half the images
    assert int(blanked.max()) == 36  # a whole square where it fits inside the image
    for image, count in zip(out, blanked, strict=True):
        rows, cols = torch.nonzero(image[0] == 0, as_tuple=True)
        if count:  # one rectangle (clipped at the edges), the rest untouched
            assert count == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert rows.max() - rows.min() < 6 and cols.max() - cols.min() < 6
    assert torch.equal(out[blanked == 0], x[blanked == 0])
    assert torch.equal(probe.cutout(x, torch.Generator().manual_seed(0), probability=0.0), x)


def test_alternating_flips_flip_each_image_every_other_epoch_after_a_random_first() -> None:
    x, steps = _images(8), 2
    augment = probe.alternating_flip_augment(steps)
    generator = torch.Generator().manual_seed(0)
    flipped = []
    for _ in range(4 * steps):  # epochs 0..3, the same batch each step
        out = augment(x, flip=True, crop_padding=0, generator=generator)
        flipped.append(torch.all(out == x.flip(3), dim=(1, 2, 3)))
    first = augment_batch(x, flip=True, crop_padding=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(flipped[0], torch.all(first == x.flip(3), dim=(1, 2, 3)))
    for epoch in (1, 2):
        assert torch.equal(flipped[epoch * steps], flipped[epoch * steps + 1])  # fixed per epoch
        assert torch.all(flipped[epoch * steps] ^ flipped[(epoch + 1) * steps])  # then the others
    assert 0 < int(flipped[steps].sum()) < 8


def test_applying_alt_flips_counts_epochs_in_the_recipes_batches() -> None:
    params = _tiny_params()  # batch 32: 64 training images are 2 steps, 70 are 3
    x = _images(8)
    own_bit = (x.sum(dim=(1, 2, 3)).long() % 2).bool()
    generator = torch.Generator().manual_seed(0)
    for images, steps in ((64, 2), (70, 3)):
        with probe.applying("alt-flips", params, images):
            flips = [torch.all(train_module.augment_batch(
                x, flip=True, crop_padding=0, generator=generator) == x.flip(3), dim=(1, 2, 3))
                for _ in range(3 * steps)]
        for step in range(steps, 3 * steps):  # epochs 1 and 2
            assert torch.equal(flips[step], own_bit ^ bool(step // steps % 2))


def test_no_decay_exempts_exactly_batchnorm_and_biases() -> None:
    model = build_model({**PARAMS["model"], "channels": [2, 3], "hidden": 5})
    train = {**PARAMS["train"], "weight_decay": 1e-3}
    backend = select_backend({"enabled": False, "dtype": "float32"})
    model, optimizer = probe.build_optimizer_without_norm_decay(model, train, backend)
    assert isinstance(optimizer, SAM)
    decayed, exempt = optimizer.param_groups
    assert decayed["weight_decay"] == 1e-3 and exempt["weight_decay"] == 0.0
    assert {p.ndim for p in decayed["params"]} == {2, 4}
    assert {p.ndim for p in exempt["params"]} == {1}
    assert len(decayed["params"]) + len(exempt["params"]) == len(list(model.parameters()))
    _, sgd = probe.build_optimizer_without_norm_decay(model, {**train, "optimizer": "sgd"},
                                                      backend)
    assert isinstance(sgd, torch.optim.SGD)


def _tiny_params() -> dict[str, Any]:
    params = copy.deepcopy(PARAMS)
    params["model"].update(channels=[2, 3], hidden=8)
    params["train"].update(batch_size=32, epochs=1, threads=1, ema_decay=0.0)
    params["ipex"].update(enabled=False, dtype="float32")
    return params


def test_fit_trains_with_the_lever_only_inside_applying() -> None:
    params = _tiny_params()
    params["train"]["weight_decay"] = 0.05  # large enough to show on BatchNorm's weights
    originals = (train_module.augment_batch, train_module.build_optimizer)
    plain = fit(DATA, params, progress=False).model.state_dict()
    with probe.applying("cutout", params, len(DATA.train.labels)):
        assert train_module.augment_batch is not originals[0]
        cut = fit(DATA, params, progress=False).model.state_dict()
    assert (train_module.augment_batch, train_module.build_optimizer) == originals
    assert not torch.equal(plain["features.0.weight"], cut["features.0.weight"])
    again = fit(DATA, params, progress=False).model.state_dict()
    assert torch.equal(plain["features.0.weight"], again["features.0.weight"])
    with probe.applying("no-decay", params, len(DATA.train.labels)):
        exempt = fit(DATA, params, progress=False).model.state_dict()
    batch_norm_weight = "features.1.weight"
    assert not torch.equal(plain[batch_norm_weight], exempt[batch_norm_weight])
    with pytest.raises(RuntimeError), probe.applying("no-decay", params, 64):
        assert train_module.build_optimizer is probe.build_optimizer_without_norm_decay
        raise RuntimeError
    assert (train_module.augment_batch, train_module.build_optimizer) == originals


def test_an_override_lever_sets_and_validates_one_train_key() -> None:
    params = probe.lever_params(PARAMS, "late-k16", 3, "train.rho=0.1")
    assert params["train"]["rho"] == 0.1 and params["seed"] == 3
    assert params["model"]["channels"] == [16, 48, 96, 192]
    assert probe.lever_params(PARAMS, "late-k16", 3, "cutout")["train"]["rho"] == \
        PARAMS["train"]["rho"]


@pytest.mark.parametrize(("lever", "message"), [
    ("train.nope=1", "train.nope is not in params.yaml"),
    ("train.threads=1", "train.threads is a run setting"),
    ("train.rho=-1", "lever 'train.rho=-1'"),
    ("train.rho", "expected train.KEY=VALUE"),
])
def test_a_bad_override_is_a_one_line_error(lever: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        probe.lever_params(PARAMS, "late-k16", 0, lever)


def test_alternating_flips_refuse_a_recipe_with_crops_and_unknown_levers_fail_early() -> None:
    with pytest.raises(SystemExit, match="needs a recipe that flips and does not crop"):
        probe.lever_params(PARAMS, "late-e16", 0, "alt-flips")
    no_flips = copy.deepcopy(PARAMS)
    no_flips["train"]["augment"] = {"flip": False, "crop_padding": 0}
    with pytest.raises(SystemExit, match="needs a recipe that flips"):
        probe.lever_params(no_flips, "late-e16", 0, "alt-flips")
    with pytest.raises(SystemExit, match="unknown lever 'mixup'"):
        probe.parse_args(["--levers", "cutout,mixup"])


def test_a_lever_is_keyed_by_its_settings() -> None:
    assert probe.lever_spec("train.rho=.1") == probe.lever_spec("train.rho=0.1")
    assert probe.lever_spec("cutout") == f"cutout:{probe.CUTOUT_SIZE}x{probe.CUTOUT_SIZE}:" \
        f"p{probe.CUTOUT_PROBABILITY}"
    assert len({probe.lever_spec(lever) for lever in probe.LEVERS}) == len(probe.LEVERS)


def _run(seed: int, acc: float, **extra: Any) -> dict[str, Any]:
    return {"recipe": "late-k16", "recipe_hash": "h", "seed": seed, "cpu_class": "AMX",
            "dtype": "bfloat16", "threads": 2, "isa_limit": "", "allocator": "kept",
            "train_seconds": 100.0 + seed, "test_acc": acc - 0.003, "test_acc_flip_tta": acc,
            **extra}


def test_summary_pairs_each_seed_with_its_recipes_run() -> None:
    cutout = {"lever": "cutout", "lever_spec": probe.lever_spec("cutout")}
    rho = {"lever": "train.rho=.1", "lever_spec": "train.rho=0.1"}
    runs = [_run(0, 0.9410, **cutout), _run(1, 0.9420, **cutout),
            _run(0, 0.9450, **rho, recipe_hash="h2", base_recipe_hash="h"),
            # another version of the recipe: a row of its own
            _run(1, 0.9000, **cutout, recipe_hash="v2")]
    baseline = [_run(0, 0.9400), _run(1, 0.9390), _run(2, 0.9000),
                # not pairs: another class, dtype, recipe, recipe hash or thread count
                _run(0, 0.5, cpu_class="AVX2"), _run(0, 0.5, dtype="float32"),
                _run(0, 0.5, recipe="late-e16"), _run(1, 0.5, recipe_hash="old"),
                _run(1, 0.5, threads=1)]
    lines = probe.summary(runs, baseline).splitlines()
    cutout = next(line for line in lines if "| cutout 10x10" in line)
    cells = [c.strip() for c in cutout.strip("|").split("|")]
    assert cells[4:] == ["2", "94.15% (94.10%)", "93.85%", "+0.20 (+0.20), 2 seeds", "100-101"]
    rho = next(line for line in lines if "| train.rho=0.1 |" in line)
    assert rho.endswith("| +0.50 (+0.50), 1 seed | 100 |")
    versions = [line for line in lines if "| cutout 10x10" in line]
    assert [line.split("|")[3].strip() for line in versions] == ["late-k16 (h)", "late-k16 (v2)"]
    stale = probe.summary([_run(0, 0.9, lever="cutout", lever_spec="cutout:8x8:p1.0")], [])
    assert "| cutout:8x8:p1.0 |" in stale


def test_main_resumes_past_stored_runs(monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    trained: list[tuple[str, int, bool]] = []

    def fake_run_one(data: Any, params: dict[str, Any], recipe: str) -> dict[str, Any]:
        patched = train_module.augment_batch is not augment_batch
        trained.append((recipe, params["seed"], patched))
        planned = probe.tta.planned_run(recipe, params, "float32", 2)
        return {**planned, "train_seconds": 1.0, "test_acc": 0.9, "test_acc_flip_tta": 0.91}

    monkeypatch.setattr(probe.tta, "run_one", fake_run_one)
    monkeypatch.setattr(probe, "load_prepared", lambda path: DATA)
    monkeypatch.setattr(probe, "dtype_name", lambda dtype: "float32")
    monkeypatch.setattr(probe.tta, "RUNS_FILE", tmp_path / "none.json")  # no baseline runs
    store, table = tmp_path / "lever_probe.json", tmp_path / "lever_probe.md"
    files = ["--json", str(store), "--markdown", str(table)]
    assert probe.main(["--levers", "cutout,cutout", "--seeds", "0,1", *files]) == 0
    assert trained == [("late-k16", 0, True), ("late-k16", 1, True)]
    assert probe.main(["--levers", "cutout,train.rho=0.1", "--seeds", "1,2", *files]) == 0
    assert trained[2:] == [("late-k16", 2, True), ("late-k16", 1, False), ("late-k16", 2, False)]
    # same recipe hash and seed as a stored cutout run, another lever: trained, not skipped
    assert probe.main(["--levers", "no-decay,train.rho=.1", "--seeds", "1", *files]) == 0
    assert probe.parse_args(["--levers", "train.rho=.1,train.rho=0.1,cutout"]).levers == [
        "train.rho=.1", "cutout"]
    assert trained[5:] == [("late-k16", 1, False)]
    runs = json.loads(store.read_text())["runs"]
    assert [(r["lever"], r["seed"]) for r in runs] == [
        ("cutout", 0), ("cutout", 1), ("cutout", 2), ("train.rho=0.1", 1), ("train.rho=0.1", 2),
        ("no-decay", 1)]
    assert runs[-2]["recipe_hash"] != runs[-2]["base_recipe_hash"] == runs[0]["recipe_hash"]
    assert "| train.rho=0.1 |" in table.read_text()
    with pytest.raises(SystemExit, match="train.nope is not"):  # before any run starts
        probe.main(["--levers", "cutout,train.nope=1", "--seeds", "3", *files])
    assert len(trained) == 6

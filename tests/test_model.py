"""The CNN and its file format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fmnist.errors import FmnistError
from fmnist.loading import load_model
from fmnist.model import Normalize, build_model, model_config, shipped_config
from fmnist.modelfile import read_model_file, save_model

CONFIG = {
    "channels": [4, 8], "convs_per_block": 2, "batch_norm": True, "dropout": 0.25, "hidden": 16
}


def _mark(path: str) -> None:
    """What a malicious pickle would run on load; the test checks it never does."""
    Path(path).write_text("code ran")


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_mark, (str(self.marker),))


def _model(config: dict = CONFIG, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(config)


def test_normalize_maps_raw_pixels_to_minus_one_one() -> None:
    out = Normalize()(torch.tensor([0.0, 127.5, 255.0]))
    assert out.tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "config",
    [
        CONFIG,
        {"channels": [3], "convs_per_block": 1, "batch_norm": False, "dropout": 0.0, "hidden": 5},
        {"channels": [2, 2, 2, 2], "convs_per_block": 1, "batch_norm": True, "dropout": 0.5,
         "hidden": 3},
    ],
)
def test_model_maps_raw_images_to_ten_logits(config: dict) -> None:
    model = _model(config).eval()
    assert model(torch.full((3, 1, 28, 28), 255.0)).shape == (3, 10)


def test_model_config_shapes_the_layers() -> None:
    model = _model()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    pools = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert [c.out_channels for c in convs] == [4, 4, 8, 8]
    assert len(norms) == 4 and len(pools) == 2
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8 * 7 * 7, 16), (16, 10)]


def test_first_layer_normalizes_so_raw_input_is_expected() -> None:
    model = _model().eval()
    assert isinstance(next(iter(model.children())), Normalize)
    raw = torch.randint(0, 256, (2, 1, 28, 28)).float()
    manual = model.classifier(model.features((raw / 255 - 0.5) / 0.5))
    assert torch.equal(model(raw), manual)


def test_same_seed_same_initial_weights_other_seed_differs() -> None:
    a, b, c = _model(seed=1), _model(seed=1), _model(seed=2)
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), key
    assert not torch.equal(a.features[0].weight, c.features[0].weight)


def test_model_file_round_trip_loads_with_weights_only(tmp_path: Path) -> None:
    model = _model().to(memory_format=torch.channels_last)
    model.features[1].running_mean.fill_(0.25)
    path = tmp_path / "model.pth"
    save_model(model, CONFIG, path, extra={"note": "hello"})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "fmnist-model" and raw["format_version"] == 1
    assert raw["model_config"] == CONFIG and raw["note"] == "hello"
    assert raw["normalization"] == {"mean": 0.5, "std": 0.5} and raw["input_shape"] == [1, 28, 28]
    assert all(t.is_contiguous() for t in raw["state_dict"].values())
    loaded = load_model(path)
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(2, 1, 28, 28) * 255
    assert torch.equal(loaded.to(memory_format=torch.channels_last)(x), model.eval()(x))
    assert read_model_file(path)["class_names"][0] == "T-shirt/top"


def test_model_file_with_pickled_object_is_refused_without_running_it(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    save_model(_model(), CONFIG, path)
    payload = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    payload["evil"] = Payload(marker)
    torch.save(payload, path)
    with pytest.raises(FmnistError, match="pickled object") as info:
        load_model(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_model_file_for_other_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    save_model(_model(), CONFIG, path)
    payload = torch.load(path, weights_only=True)
    payload["model_config"] = {**CONFIG, "hidden": 32}
    torch.save(payload, path)
    with pytest.raises(FmnistError, match="trained with a different model config"):
        load_model(path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty or truncated"),
        (b"not a model at all, just text", "corrupt"),
    ],
)
def test_corrupt_model_file_is_one_line_error(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(FmnistError, match=problem) as info:
        load_model(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_model_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    save_model(_model(), CONFIG, path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(FmnistError, match="corrupt"):
        load_model(path)


def test_foreign_torch_file_is_not_ours(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    torch.save(_model().state_dict(), path)
    with pytest.raises(FmnistError, match="not an fmnist model file"):
        load_model(path)


def test_missing_model_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FmnistError, match="not found"):
        load_model(tmp_path / "nope.pth")


def test_flip_tta_averages_image_and_mirror_in_eval_mode_only() -> None:
    torch.manual_seed(0)
    plain = build_model(CONFIG).eval()
    tta = build_model(shipped_config(CONFIG, flip_tta=True)).eval()
    tta.load_state_dict(plain.state_dict())
    x = torch.rand(6, 1, 28, 28) * 255
    with torch.no_grad():
        torch.testing.assert_close(tta(x), (plain(x) + plain(x.flip(-1))) / 2)
        tta.train()
        plain.train()
        torch.manual_seed(1)
        train_out = tta(x)
        torch.manual_seed(1)
        torch.testing.assert_close(train_out, plain(x))  # training never sees the mirror


def test_flip_tta_is_stored_only_when_on() -> None:
    assert "flip_tta" not in model_config(CONFIG)
    assert shipped_config(CONFIG, flip_tta=True)["flip_tta"] is True
    assert shipped_config(shipped_config(CONFIG, True), False) == model_config(CONFIG)


def test_same_weights_give_the_same_file_bytes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(CONFIG)
    save_model(model, CONFIG, tmp_path / "a" / "model.pth")
    save_model(model, CONFIG, tmp_path / "b" / "model.pth")
    first = (tmp_path / "a" / "model.pth").read_bytes()
    assert first == (tmp_path / "b" / "model.pth").read_bytes()
    assert b".model.pth." not in first  # no temporary file name inside the archive


@pytest.mark.parametrize("change", [{"channels": [-4, 8]}, {"channels": [10**9]},
                                    {"hidden": "512"}, {"dropout": 2.0},
                                    {"hidden": 512.0}])  # an integer to JSON Schema, not to torch
def test_a_model_config_params_yaml_could_not_hold_is_refused_in_one_line(
    tmp_path: Path, change: dict
) -> None:
    path = tmp_path / "model.pth"
    save_model(build_model(CONFIG), CONFIG, path)
    payload = torch.load(path, weights_only=True)
    payload["model_config"].update(change)
    torch.save(payload, path)
    with pytest.raises(FmnistError, match="invalid model config") as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    model = build_model(CONFIG)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    save_model(model, CONFIG, tmp_path / "model.pth")
    with pytest.raises(FmnistError, match="non-finite values in .*refused"):
        load_model(tmp_path / "model.pth")


def test_a_pickled_object_is_named_as_such(tmp_path: Path) -> None:
    torch.save({"format": "fmnist-model", "payload": Path("x")}, tmp_path / "model.pth")
    with pytest.raises(FmnistError, match="pickled object"):
        load_model(tmp_path / "model.pth")


def test_ceil_mode_pooling_keeps_the_last_row_and_column_of_odd_maps() -> None:
    """Four blocks on 28x28: floor pooling drops odd maps' last row and column (7x7 -> 3x3, and
    the last block's 3x3 -> 1x1 reads 4 of 9 positions); ceil pooling keeps them (7 -> 4 -> 2)."""
    deep = {**CONFIG, "channels": [4, 4, 4, 4]}
    x = torch.rand(1, 1, 28, 28) * 255
    for ceil_mode, size, reaches_logits in ((False, 1, False), (True, 2, True)):
        model = _model({**deep, "pool_ceil_mode": ceil_mode}).eval()
        assert model.features(x).shape[-2:] == (size, size)
        last_block = model.features[:-1](x)  # what the last pooling reads
        changed = last_block.clone()
        changed[..., -1, -1] += 10.0  # its bottom-right position
        head = torch.nn.Sequential(model.features[-1], model.classifier)
        assert (not torch.equal(head(last_block), head(changed))) is reaches_logits


def test_ceil_mode_is_stored_only_when_on_and_survives_the_model_file(tmp_path: Path) -> None:
    assert "pool_ceil_mode" not in model_config({**CONFIG, "pool_ceil_mode": False})
    config = {**CONFIG, "channels": [4, 4, 4], "pool_ceil_mode": True}
    model = _model(config).eval()
    save_model(model, config, tmp_path / "model.pth")
    loaded = load_model(tmp_path / "model.pth")
    assert loaded.features[-1].ceil_mode is True
    x = torch.rand(2, 1, 28, 28) * 255
    assert torch.equal(loaded(x), model(x))

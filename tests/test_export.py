"""Exported files: each one reloads, reproduces the model's logits, and refuses damage."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from project_files import write_prepared

import fmnist
from fmnist import export, pt2, signals
from fmnist.constants import CALIBRATION_FILE, CLASS_NAMES
from fmnist.data import Prepared, Split
from fmnist.errors import FmnistError
from fmnist.h5weights import FORMAT, load_h5_model, save_h5
from fmnist.inference import predict_logits
from fmnist.model import build_model
from fmnist.modelfile import save_model

torch.set_num_threads(1)

CONFIG = {
    "channels": [4, 8],
    "convs_per_block": 1,
    "batch_norm": True,
    "dropout": 0.25,
    "hidden": 16,
}


def _trained_like_model(seed: int = 0) -> torch.nn.Module:
    """A tiny model whose BN buffers are not at their defaults (as after training)."""
    torch.manual_seed(seed)
    model = build_model(CONFIG)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 1, 28, 28) * 255)
    return model.eval()


def _images(n: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def _logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    return predict_logits(model, images, batch_size=16)


def test_pth_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    model = _trained_like_model()
    save_model(model, CONFIG, tmp_path / "model.pth")
    payload = torch.load(tmp_path / "model.pth", weights_only=True)
    assert payload["class_names"] == list(CLASS_NAMES)
    reloaded = fmnist.load_model(str(tmp_path / "model.pth"))
    np.testing.assert_array_equal(_logits(reloaded, _images()), _logits(model, _images()))


def test_h5_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    model = _trained_like_model()
    save_h5(model, CONFIG, tmp_path / "weights.h5")
    for reloaded in (
        fmnist.load_model(str(tmp_path / "weights.h5")),
        load_h5_model(tmp_path / "weights.h5"),
    ):
        assert not reloaded.training
        np.testing.assert_array_equal(_logits(reloaded, _images()), _logits(model, _images()))


def test_h5_layout_is_readable_with_bare_h5py(tmp_path: Path) -> None:
    model = _trained_like_model()
    save_h5(model, CONFIG, tmp_path / "weights.h5")
    state = model.state_dict()
    with h5py.File(tmp_path / "weights.h5", "r") as f:
        assert isinstance(f["features/0"], h5py.Group)
        assert isinstance(f["features/0/weight"], h5py.Dataset)
        for key, tensor in state.items():  # every parameter and buffer, BN statistics included
            data = f[key.replace(".", "/")][()]
            np.testing.assert_array_equal(data, tensor.numpy())
        assert f["features/1/num_batches_tracked"][()] == 3
        assert f["features/1/running_var"].dtype == np.float32
        attrs = f.attrs
        assert attrs["format"] == FORMAT
        assert attrs["format_version"] == 2
        assert json.loads(attrs["model_config"]) == CONFIG
        assert json.loads(attrs["state_dict_keys"]) == list(state)
        assert list(attrs["class_names"]) == list(CLASS_NAMES)
        assert list(attrs["input_shape"]) == [1, 28, 28]
        assert (attrs["normalization_mean"], attrs["normalization_std"]) == (0.5, 0.5)
        assert "/ 255" in attrs["normalization"]
        assert attrs["dtype"] == "float32"
        assert attrs["torch_version"] == str(torch.__version__)
        assert attrs["h5py_version"] == h5py.__version__
        assert attrs["fmnist_version"] == fmnist.__version__


def test_h5_rewrite_is_byte_identical(tmp_path: Path) -> None:
    model = _trained_like_model()
    save_h5(model, CONFIG, tmp_path / "a.h5")
    save_h5(model, CONFIG, tmp_path / "b.h5")
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_truncated_h5_gives_one_line_error(tmp_path: Path) -> None:
    save_h5(_trained_like_model(), CONFIG, tmp_path / "weights.h5")
    data = (tmp_path / "weights.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(FmnistError, match=r"cut\.h5: truncated HDF5 file$"):
        fmnist.load_model(str(tmp_path / "cut.h5"))


@pytest.mark.parametrize("edit", [
    lambda config: {**config, "channels": [-4, 8]},
    lambda config: {**config, "hidden": 10**12},
    lambda config: {**config, "dropout": 0.3},  # valid, yet not what the weights were saved with
])
def test_h5_with_an_edited_model_config_is_refused_before_anything_is_built(
    tmp_path: Path, edit: Any
) -> None:
    save_h5(_trained_like_model(), CONFIG, tmp_path / "weights.h5")
    with h5py.File(tmp_path / "weights.h5", "r+") as f:
        config = json.loads(f.attrs["model_config"])
        f.attrs["model_config"] = json.dumps(edit(config), sort_keys=True)
    with pytest.raises(FmnistError, match=r"weights\.h5: corrupt or edited \(config and weights"):
        fmnist.load_model(str(tmp_path / "weights.h5"))


def test_h5_with_altered_weights_is_refused(tmp_path: Path) -> None:
    save_h5(_trained_like_model(), CONFIG, tmp_path / "weights.h5")
    with h5py.File(tmp_path / "weights.h5", "r+") as f:
        f["classifier/2/weight"][0, 0] += 1.0
    with pytest.raises(FmnistError, match="checksum mismatch"):
        fmnist.load_model(str(tmp_path / "weights.h5"))


@pytest.mark.parametrize("content", [b"", b"just text\n"])
def test_non_hdf5_file_named_h5_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "x.h5").write_bytes(content)
    with pytest.raises(FmnistError, match=r"x\.h5: "):
        fmnist.load_model(str(tmp_path / "x.h5"))


def test_foreign_hdf5_file_is_refused(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "data.h5", "w") as f:  # e.g. the prepared dataset
        f["test/images"] = np.zeros((2, 28, 28), np.uint8)
    with pytest.raises(FmnistError, match="not an fmnist weights file"):
        fmnist.load_model(str(tmp_path / "data.h5"))


class Smuggled:
    """A custom class: a model file holding an instance of it must not be unpickled."""

    def __init__(self) -> None:
        self.value = 1


def test_pth_holding_a_pickled_object_is_refused(tmp_path: Path) -> None:
    model = _trained_like_model()
    payload = {
        "format": "fmnist-model",
        "format_version": 1,
        "model_config": CONFIG,
        "state_dict": model.state_dict(),
        "class_names": list(CLASS_NAMES),
        "extra": Smuggled(),
    }
    torch.save(payload, tmp_path / "tampered.pth")
    with pytest.raises(FmnistError, match="pickled object"):
        fmnist.load_model(str(tmp_path / "tampered.pth"))


def test_pt2_runs_with_torch_alone_and_matches(tmp_path: Path) -> None:
    model = _trained_like_model()
    export.export_program(model, tmp_path / "model.pt2")
    program = torch.export.load(tmp_path / "model.pt2").module()
    for batch in (1, 5):  # the batch dimension is dynamic, 1 included
        x = torch.from_numpy(_images(batch)).unsqueeze(1).float()
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x), rtol=0, atol=1e-5)


def test_pt2_carries_the_class_names_and_the_temperature(tmp_path: Path) -> None:
    model = _trained_like_model()
    export.export_program(model, tmp_path / "model.pt2", {**CONFIG, "temperature": 1.75})
    program = fmnist.load_model(str(tmp_path / "model.pt2"))
    assert program.temperature == 1.75
    assert program.config["class_names"] == list(CLASS_NAMES)
    assert program.config["model_config"]["channels"] == CONFIG["channels"]
    extra = {pt2.CONFIG_FILE: ""}  # torch alone reads it too
    torch.export.load(tmp_path / "model.pt2", extra_files=extra)
    assert json.loads(extra[pt2.CONFIG_FILE])["model_config"]["temperature"] == 1.75


def test_export_refuses_to_write_a_pt2_that_loading_would_refuse(tmp_path: Path) -> None:
    with pytest.raises(FmnistError, match="no usable temperature"):
        export.export_program(_trained_like_model(), tmp_path / "model.pt2",
                              {**CONFIG, "temperature": -1.0})
    assert list(tmp_path.iterdir()) == []


def test_pt2_rewrite_is_byte_identical(tmp_path: Path) -> None:
    model = _trained_like_model()
    export.export_program(model, tmp_path / "a.pt2")
    export.export_program(model, tmp_path / "b.pt2")
    assert (tmp_path / "a.pt2").read_bytes() == (tmp_path / "b.pt2").read_bytes()


class Plant:
    """Unpickling this creates `marker`: the stand-in for code a tampered file runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


ROOT = "archive/"  # the root folder torch.export.save gives an archive written to a buffer
SAMPLE_INPUTS_REFUSED = r"holds pickled objects \(data/sample_inputs/model\.pt\)"


def _torch_save_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes], add: dict[str, bytes]) -> Path:
    """A copy of the archive `src` with members replaced and added (names below the root)."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for info in old.infolist():
            name = info.filename[len(ROOT) :]
            new.writestr(info.filename, replace.get(name, old.read(info)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a duplicate name is one of the tamperings
            for name, data in add.items():
                new.writestr(ROOT + name, data)
    return dst


def _program_json(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read(ROOT + pt2.PROGRAM))


@pytest.fixture
def clean_pt2(tmp_path: Path) -> Path:
    export.export_program(_trained_like_model(), tmp_path / "model.pt2", CONFIG)
    return tmp_path / "model.pt2"


def test_exported_pt2_has_no_pickled_member(clean_pt2: Path) -> None:
    with zipfile.ZipFile(clean_pt2) as archive:
        members = {info.filename[len(ROOT) :]: archive.read(info) for info in archive.infolist()}
    assert members[pt2.SAMPLE_INPUTS] == b""  # torch.export.save pickles example inputs here
    for config_name in pt2.PAYLOADS:
        entries = json.loads(members[config_name])["config"].values()
        assert all(entry["use_pickle"] is False for entry in entries)
    for name, data in members.items():
        assert not data.startswith(b"PK"), name  # no nested torch.save zip (data.pkl)
        assert not data.startswith(b"\x80"), name  # no pickle protocol header
    assert _program_json(clean_pt2)["guards_code"] == []
    pt2.check_archive(clean_pt2.read_bytes(), clean_pt2)


def test_export_refuses_a_program_with_pickled_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = torch.export.save

    def save_with_example_inputs(program: torch.export.ExportedProgram, f, **kwargs) -> None:
        program.example_inputs = ((torch.zeros(2, 1, 28, 28),), {})  # torch's default
        real_save(program, f, **kwargs)

    monkeypatch.setattr(torch.export, "save", save_with_example_inputs)
    with pytest.raises(FmnistError, match=SAMPLE_INPUTS_REFUSED):
        export.export_program(_trained_like_model(), tmp_path / "model.pt2")
    assert list(tmp_path.iterdir()) == []


def test_pt2_loads_like_the_pth_and_gives_the_same_logits(tmp_path: Path, clean_pt2: Path) -> None:
    model = _trained_like_model()
    save_model(model, CONFIG, tmp_path / "model.pth")
    program = fmnist.load_model(str(clean_pt2))
    assert isinstance(program, torch.nn.Module) and not program.training
    assert program.eval() is program  # predict_logits switches modes; the program stays eval
    for n in (1, 40):
        images = _images(n)
        expected = _logits(fmnist.load_model(str(tmp_path / "model.pth")), images)
        got = _logits(program, images)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        assert (got.argmax(1) == expected.argmax(1)).all()
    with pytest.raises(NotImplementedError, match="inference-only"):
        program.train()


def test_plain_torch_export_load_runs_a_tampered_sample_inputs_member(
    tmp_path: Path, clean_pt2: Path
) -> None:
    """The threat: why fmnist.load_model checks the archive before torch opens it."""
    marker = tmp_path / "ran"
    evil = {pt2.SAMPLE_INPUTS: _torch_save_bytes((Plant(marker),))}
    tampered = _rewrite(clean_pt2, tmp_path / "tampered.pt2", evil, {})
    with contextlib.suppress(Exception):
        torch.export.load(tampered)
    assert marker.exists()


def _tamper_sample_inputs(src: Path, dst: Path, marker: Path) -> Path:
    return _rewrite(src, dst, {pt2.SAMPLE_INPUTS: _torch_save_bytes((Plant(marker),))}, {})


def _tamper_weight(src: Path, dst: Path, marker: Path) -> Path:
    """weight_0 as a torch.save pickle, its config entry saying so (torch.load, no weights_only)."""
    with zipfile.ZipFile(src) as archive:
        config_name = next(iter(pt2.PAYLOADS))
        config = json.loads(archive.read(ROOT + config_name))
    for entry in config["config"].values():
        if entry["path_name"] == "weight_0":
            entry["use_pickle"] = True
    replace = {
        config_name: json.dumps(config).encode(),
        "data/weights/weight_0": _torch_save_bytes(Plant(marker)),
    }
    return _rewrite(src, dst, replace, {})


def _tamper_legacy_weights(src: Path, dst: Path, marker: Path) -> Path:
    """A protocol 0 pickle (no header) where torch looks for legacy weights."""
    return _rewrite(src, dst, {}, {"data/weights/model.pt": pickle.dumps(Plant(marker), 0)})


def _tamper_twin(src: Path, dst: Path, marker: Path) -> Path:
    """A second sample-inputs member: zip readers disagree on which of the two counts."""
    return _rewrite(src, dst, {}, {pt2.SAMPLE_INPUTS: _torch_save_bytes((Plant(marker),))})


def _tamper_program(src: Path, dst: Path, marker: Path, key: str) -> Path:
    code = f"open({str(marker)!r}, 'w')"
    program = _program_json(src)
    if key == "guards_code":  # exec'd as Python on the first call, given example inputs
        program["guards_code"] = [f"{code} is not None"]
    else:  # every expr_str goes through sympy.sympify, i.e. eval
        text = json.dumps(program)
        symbol = "Symbol('s77', positive=True, integer=True)"
        assert symbol in text
        program = json.loads(text.replace(symbol, f"{symbol} + 0 * len(str({code}))", 1))
    return _rewrite(src, dst, {pt2.PROGRAM: json.dumps(program).encode()}, {})


def _tamper_config(text: bytes) -> Any:
    return lambda src, dst, marker: _rewrite(src, dst, {pt2.CONFIG: text}, {})


def _tamper_bytes(before: bytes, after: bytes) -> Any:
    """Bytes around the archive: Python's zipfile still reads it, shifting its offsets."""
    def tamper(src: Path, dst: Path, marker: Path) -> Path:
        dst.write_bytes(before + src.read_bytes() + after)
        return dst
    return tamper


BAD_TEMPERATURE = r"extra/fmnist\.json has no usable temperature \({}; expected a number in "
TAMPERINGS = {
    "config_not_json": (_tamper_config(b"temperature = 2"),
                        r"extra/fmnist\.json is not valid JSON"),
    "config_utf16": (_tamper_config('{"model_config": {}}'.encode("utf-16")),
                     r"extra/fmnist\.json is not valid JSON"),
    "config_huge": (_tamper_config(b'{"x": "' + b"a" * pt2.MAX_CONFIG_BYTES + b'"}'),
                    r"extra/fmnist\.json is over 65,536 bytes, refused"),
    "config_model_config": (_tamper_config(b'{"model_config": [1]}'),
                            r"extra/fmnist\.json: model_config is not a JSON object"),
    **{f"temperature_{name}": (_tamper_config(b'{"model_config": {"temperature": %s}}' % raw),
                               BAD_TEMPERATURE.format(shown))
       for name, raw, shown in (
           ("nan", b"NaN", "nan"), ("inf", b"1e999", "inf"), ("string", b'"2"', "'2'"),
           ("bool", b"true", "True"), ("tiny", b"0.01", r"0\.01"),
           ("huge_int", b"1" + b"0" * 400, "1" + "0" * 39))},
    "prepended": (_tamper_bytes(b"JUNK" * 8, b""),
                  r"bytes before its first member or after its end record, refused"),
    "appended": (_tamper_bytes(b"", b"JUNK" * 8),
                 r"bytes before its first member or after its end record, refused"),
    "sample_inputs": (_tamper_sample_inputs, SAMPLE_INPUTS_REFUSED),
    "weight": (_tamper_weight, r"holds pickled objects \(data/weights/weight_0\)"),
    "legacy_weights": (_tamper_legacy_weights, r"unexpected member data/weights/model\.pt"),
    "twin": (_tamper_twin, r"member archive/data/sample_inputs/model\.pt appears twice"),
    "expr_str": (
        lambda src, dst, marker: _tamper_program(src, dst, marker, "expr_str"),
        r"models/model\.json holds a shape formula that is not plain sympy",
    ),
    "guards_code": (
        lambda src, dst, marker: _tamper_program(src, dst, marker, "guards_code"),
        r"models/model\.json holds guards code \(Python\)",
    ),
}


@pytest.mark.parametrize("kind", sorted(TAMPERINGS))
def test_tampered_pt2_is_refused_in_one_line_before_torch_opens_it(
    tmp_path: Path, clean_pt2: Path, kind: str
) -> None:
    tamper, message = TAMPERINGS[kind]
    marker = tmp_path / "ran"
    tampered = tamper(clean_pt2, tmp_path / "tampered.pt2", marker)
    with pytest.raises(FmnistError, match=r"^model file .*tampered\.pt2: " + message) as error:
        model = fmnist.load_model(str(tampered))
        model(torch.zeros(2, 1, 28, 28))  # guards code would run here
    assert "\n" not in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"just text\n"])
def test_non_zip_file_named_pt2_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "x.pt2").write_bytes(content)
    with pytest.raises(FmnistError, match=r"x\.pt2: not a zip archive"):
        fmnist.load_model(str(tmp_path / "x.pt2"))


def test_pth_renamed_to_pt2_is_refused_as_pickled(tmp_path: Path) -> None:
    save_model(_trained_like_model(), CONFIG, tmp_path / "model.pt2")
    with pytest.raises(FmnistError, match=r"holds pickled objects \(data\.pkl\)"):
        fmnist.load_model(str(tmp_path / "model.pt2"))


@pytest.mark.parametrize(
    "formula",
    [
        "Symbol('s77', positive=True, integer=True)",
        "Mul(Integer(784), Symbol('s77', positive=True, integer=True))",
        "FloorDiv(Add(Symbol('s0', integer=True), Integer(-1)), Integer(2))",
    ],
)
def test_shape_formulas_torch_writes_are_plain(formula: str) -> None:
    assert pt2._plain_formula(formula)


@pytest.mark.parametrize(
    "formula",
    [
        "__import__('os').system('true')",
        "Symbol('s0').__class__",
        "Integer(9) ** Integer(9) ** Integer(9)",
        "Symbol('s0', **{'positive': True})",
        "Symbol(open('x'))",
        "lambda: 0",
    ],
)
def test_other_shape_formulas_are_refused(formula: str) -> None:
    assert not pt2._plain_formula(formula)


def _run(model: torch.nn.Module, out: Path, **overrides) -> export.ExportResult:
    options = {"onnx": False, "parity_atol": 1e-5, "benchmark_batch_size": 16} | overrides
    return export.run_export(model, CONFIG, _images(), out, **options)


def test_run_export_publishes_every_format_with_parity(tmp_path: Path) -> None:
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "stale.txt").write_text("from an old run")
    result = _run(_trained_like_model(), tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "model.pt2",
        "model.pth",
        "weights.h5",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging folder left
    metrics = result.metrics
    assert metrics["parity_ok"] is True and metrics["parity_samples"] == 40
    for fmt in ("pth", "h5", "pt2"):
        info = metrics["formats"][fmt]
        assert info["bytes"] == (tmp_path / "export" / export.FILES[fmt]).stat().st_size
        assert info["max_abs_diff"] <= 1e-5
        assert info["agreement"] == 1.0 and info["predictions_identical"] is True
        speed = result.timing["formats"][fmt]
        assert speed["single_images_per_s"] > 0 and speed["batched_images_per_s"] > 0
    assert metrics["formats"]["pth"]["max_abs_diff"] == 0.0


def test_parity_failure_names_the_format_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = export.load_runner

    def drifting(fmt: str, path: Path) -> export.Runner:
        runner = real(fmt, path)
        if fmt != "pt2":
            return runner
        return lambda images, batch_size: runner(images, batch_size) + np.float32(1e-3)

    monkeypatch.setattr(export, "load_runner", drifting)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "previous.txt").write_text("kept")
    with pytest.raises(FmnistError, match=r"parity: pt2 \(model\.pt2\) max abs logit diff 0\.001"):
        _run(_trained_like_model(), tmp_path / "export")
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["previous.txt"]


def test_onnx_requested_without_the_packages_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "ONNX_PACKAGES", ("fmnist_no_such_onnx_package",))
    with pytest.raises(FmnistError, match=r"export\.onnx .*pip install -e \.\[onnx\]$"):
        _run(_trained_like_model(), tmp_path / "export", onnx=True)
    assert not (tmp_path / "export").exists()


@pytest.mark.skipif(export.missing_onnx_package() is not None, reason="onnx extra not installed")
def test_onnx_export_matches_under_onnxruntime(tmp_path: Path) -> None:
    result = _run(_trained_like_model(), tmp_path / "export", onnx=True)
    assert (tmp_path / "export" / "model.onnx").is_file()
    assert result.metrics["formats"]["onnx"]["predictions_identical"] is True
    assert result.metrics["formats"]["onnx"]["max_abs_diff"] <= 1e-5


REPO = Path(__file__).resolve().parents[1]


STAGE_TEMPERATURE = 0.8  # as if evaluate had fitted it


def _stage_workspace(root: Path, *, onnx: bool = False) -> None:
    """A repository-like folder: params.yaml, a tiny trained model, a small prepared file."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["export"].update(onnx=onnx, parity_samples=30, benchmark_batch_size=8)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    save_model(_trained_like_model(), CONFIG, root / "models" / "model.pth")
    rng = np.random.default_rng(0)
    splits = {name: Split(images=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                          labels=np.arange(n, dtype=np.int64) % 10)
              for name, n in (("train", 50), ("val", 20), ("test", 40))}
    write_prepared(root, Prepared(**splits), val_fraction=0.1)
    calibration = root / CALIBRATION_FILE
    calibration.parent.mkdir(parents=True)
    calibration.write_text(json.dumps({"temperature": STAGE_TEMPERATURE}))


def _stage(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / "export.py")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.skipif(importlib.util.find_spec("fmnist.data") is None, reason="fmnist.data missing")
def test_export_stage_writes_files_and_reports(tmp_path: Path) -> None:
    _stage_workspace(tmp_path)
    done = _stage(tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "model.pt2",
        "model.pth",
        "weights.h5",
    ]
    metrics = json.loads((tmp_path / "reports" / "export" / "parity.json").read_text())
    timing = json.loads((tmp_path / "reports" / "export" / "timing.json").read_text())
    assert metrics["parity_ok"] is True and metrics["parity_samples"] == 30
    assert set(metrics["formats"]) == set(timing["formats"]) == {"pth", "h5", "pt2"}
    # evaluate.flip_tta (on in params.yaml) travels in every exported file's config
    images = np.random.default_rng(3).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    trained = _trained_like_model().eval()
    with torch.no_grad():
        x = torch.from_numpy(images).float().unsqueeze(1)
        expected = ((trained(x) + trained(x.flip(-1))) / 2).numpy()
    for name in ("model.pth", "weights.h5"):
        shipped = fmnist.load_model(str(tmp_path / "export" / name))
        assert shipped.flip_tta is True
        assert shipped.temperature == STAGE_TEMPERATURE  # evaluate's fit ships with the model
        np.testing.assert_allclose(predict_logits(shipped, images, batch_size=5), expected,
                                   atol=1e-5, rtol=0)
    first = (tmp_path / "reports" / "export" / "parity.json").read_bytes()
    assert _stage(tmp_path).returncode == 0
    assert (tmp_path / "reports" / "export" / "parity.json").read_bytes() == first


@pytest.mark.skipif(importlib.util.find_spec("fmnist.data") is None, reason="fmnist.data missing")
def test_export_stage_refuses_a_foreign_model_in_one_line(tmp_path: Path) -> None:
    _stage_workspace(tmp_path)
    (tmp_path / "models" / "model.pth").write_text("not a model")
    done = _stage(tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("export: model file models/model.pth: ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "export").exists()
    assert not (tmp_path / "reports" / "export").exists()


@pytest.mark.parametrize("drift", [np.float32(2e-5), np.float32("nan")])
def test_check_parity_refuses_drift_beyond_atol_and_nan(drift: np.float32) -> None:
    reference = np.eye(3, 10, dtype=np.float32)
    result = export.compare(reference, reference + drift)
    with pytest.raises(FmnistError, match=r"parity: onnx \(model\.onnx\) max abs logit diff"):
        export.check_parity("onnx", Path("model.onnx"), result, 1e-5)


def test_a_fifo_named_pt2_is_refused_without_reading_it(tmp_path: Path) -> None:
    fifo = tmp_path / "model.pt2"
    os.mkfifo(fifo)  # reading it would block forever
    with pytest.raises(FmnistError, match=r"model\.pt2: not a regular file"):
        fmnist.load_model(str(fifo))


class _InterruptsItsTrace(torch.nn.Module):
    """Sends this process SIGINT from inside torch.export's trace, then records how far it got."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        os.kill(os.getpid(), signal.SIGINT)
        _TRACE_EVENTS.append("forward finished")
        return x.flatten(1)[:, :10]


_TRACE_EVENTS: list[str] = []


@pytest.mark.usefixtures("signal_state_restored")
def test_a_signal_during_the_pt2_trace_waits_for_the_trace_to_end(tmp_path: Path) -> None:
    """An interrupt raised inside the trace (Python called from torch's C++ dispatcher) can
    abort the whole process with SIGABRT; the stage must instead end with its one line."""
    _TRACE_EVENTS.clear()
    signals.install()
    with pytest.raises(signals.Interrupted):
        export.export_program(_InterruptsItsTrace(), tmp_path / "model.pt2")
    assert _TRACE_EVENTS and all(e == "forward finished" for e in _TRACE_EVENTS)
    assert not list(tmp_path.iterdir()), "nothing is written when the export is interrupted"

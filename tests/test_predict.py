"""`fmnist predict`: image files in, class names and probabilities out, one line per bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmnist import cli, predict, signals
from fmnist.constants import CLASS_NAMES
from fmnist.errors import FmnistError
from fmnist.export import export_program
from fmnist.h5weights import save_h5
from fmnist.inference import predict_logits
from fmnist.model import build_model
from fmnist.modelfile import save_model
from fmnist.predict import MAX_IMAGE_PIXELS, load_classifier, load_image, to_model_input

torch.set_num_threads(1)

CONFIG = {
    "channels": [4, 8],
    "convs_per_block": 1,
    "batch_norm": True,
    "dropout": 0.0,
    "hidden": 16,
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(CONFIG).eval()


def _garment_like(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 28, 28): light blobs on black, like test images, different per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    images = []
    for _ in range(n):
        cy, cx, ry, rx = (
            rng.uniform(9, 19),
            rng.uniform(9, 19),
            rng.uniform(4, 12),
            rng.uniform(3, 12),
        )
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        texture = rng.integers(60, 256, (28, 28))
        images.append(np.where(blob, texture, 0).astype(np.uint8))
    return np.stack(images)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fmnist.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _bomb_png(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height pixels."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # chunk type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    save_model(_model(), CONFIG, folder / "model.pth")
    save_h5(_model(), CONFIG, folder / "weights.h5")
    export_program(_model(), folder / "model.pt2", CONFIG)
    return {"pth": folder / "model.pth", "h5": folder / "weights.h5", "pt2": folder / "model.pt2"}


SAVERS = {"pth": save_model, "h5": save_h5, "pt2": lambda m, c, p: export_program(m, p, c)}
FILE_NAMES = {"pth": "model.pth", "h5": "weights.h5", "pt2": "model.pt2"}


@pytest.mark.parametrize("fmt", ["pth", "h5", "pt2"])
def test_png_predictions_match_predict_logits_on_the_arrays(
    tmp_path: Path, model_files: dict[str, Path], fmt: str
) -> None:
    images = _garment_like(12)
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(image, "L").save(files[-1])
    logits = predict_logits(_model(), images, batch_size=8)
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()

    done = _cli(
        "predict", *map(str, files), "--model", str(model_files[fmt]), "--json", "--top-k", "2"
    )

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["errors"] == []
    assert [p["file"] for p in result["predictions"]] == [str(f) for f in files]
    for row, prediction in zip(probs, result["predictions"], strict=True):
        top = prediction["top_k"]
        assert len(top) == 2
        assert top[0]["index"] == int(row.argmax())
        assert top[0]["class"] == CLASS_NAMES[int(row.argmax())]
        assert top[0]["probability"] == pytest.approx(row.max(), abs=1e-5)


@pytest.mark.parametrize("fmt", ["pth", "h5", "pt2"])
def test_probabilities_are_calibrated_by_the_temperature_the_model_file_carries(
    tmp_path: Path, fmt: str
) -> None:
    calibrated = {**CONFIG, "temperature": 0.25}
    path = tmp_path / FILE_NAMES[fmt]
    SAVERS[fmt](_model(), calibrated, path)
    image = _garment_like(1, seed=5)
    Image.fromarray(image[0], "L").save(tmp_path / "x.png")
    logits = torch.from_numpy(predict_logits(_model(), image, batch_size=1)).double()
    expected = torch.softmax(logits / 0.25, dim=1).numpy()[0]

    done = _cli("predict", str(tmp_path / "x.png"), "--model", str(path), "--json")
    assert done.returncode == 0, done.stderr
    top = json.loads(done.stdout)["predictions"][0]["top_k"][0]
    assert top["probability"] == pytest.approx(expected.max(), abs=1e-5)
    assert abs(expected.max() - torch.softmax(logits, 1).numpy().max()) > 1e-3  # T mattered


def test_negative_temperature_in_a_model_file_is_refused(tmp_path: Path) -> None:
    save_model(_model(), {**CONFIG, "temperature": -1.0}, tmp_path / "model.pth")
    with pytest.raises(FmnistError, match="temperature"):
        load_classifier(tmp_path / "model.pth")


def test_a_pt2_without_class_names_asks_to_be_re_exported(tmp_path: Path) -> None:
    export_program(_model(), tmp_path / "model.pt2")  # as exports before the JSON member
    done = _cli("predict", str(tmp_path / "model.pt2"), "--model", str(tmp_path / "model.pt2"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"fmnist predict: model file {tmp_path / 'model.pt2'}: no class-name list in "
        "extra/fmnist.json (a .pt2 exported before it carried one?): re-export it "
        "(dvc repro export)"
    ]


def test_text_output_names_the_top_classes(tmp_path: Path, model_files: dict[str, Path]) -> None:
    Image.fromarray(_garment_like(1)[0], "L").save(tmp_path / "shirt.png")
    done = _cli(
        "predict", str(tmp_path / "shirt.png"), "--model", str(model_files["pth"]), "--top-k", "3"
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith(f"{tmp_path / 'shirt.png'}: ")
    assert sum(name in line for name in CLASS_NAMES) >= 3 and line.count("%") == 3


def test_each_bad_image_gets_one_line_and_the_rest_are_classified(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(_garment_like(1)[0], "L").save(good)
    missing = tmp_path / "missing.png"
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    truncated = tmp_path / "cut.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noise, "L").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    bomb = tmp_path / "bomb.png"
    _bomb_png(bomb, 20000, 20000)

    done = _cli(
        "predict",
        str(missing),
        str(text),
        str(good),
        str(truncated),
        str(bomb),
        "--model",
        str(model_files["pth"]),
    )

    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 4
    assert "missing.png: no such file" in errors[0]
    assert "notes.png: not an image" in errors[1]
    assert "cut.png: corrupt or truncated image" in errors[2]
    assert "bomb.png: image too large" in errors[3]
    assert done.stdout.startswith(f"{good}: ")


def _dds_with_unknown_pixel_format(path: Path) -> None:
    """A DDS file (named .png): Pillow's DDS decoder raises NotImplementedError on it."""
    header = struct.pack("<4sIIIIIII", b"DDS ", 124, 0x1007, 4, 4, 0, 0, 0) + b"\0" * 44
    pixel_format = struct.pack("<II4sIIIII", 32, 0x4, b"ZZZZ", 0, 0, 0, 0, 0)
    caps = struct.pack("<IIIII", 0x1000, 0, 0, 0, 0)
    path.write_bytes(header + pixel_format + caps + b"\0" * 64)


def test_a_decoder_failure_or_a_fifo_is_that_files_error_only(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    good, good2 = tmp_path / "good.png", tmp_path / "good2.png"
    Image.fromarray(_garment_like(1)[0], "L").save(good)
    Image.fromarray(_garment_like(2)[1], "L").save(good2)
    dds = tmp_path / "dds.png"
    _dds_with_unknown_pixel_format(dds)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes

    done = _cli("predict", str(good), str(dds), str(fifo), str(good2),
                "--model", str(model_files["pth"]))

    assert done.returncode == 1 and "Traceback" not in done.stderr
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 2
    assert "dds.png: cannot decode image (NotImplementedError" in errors[0]
    assert "pipe.png: not a regular file" in errors[1]
    classified = done.stdout.strip().splitlines()
    assert classified[0].startswith(f"{good}: ") and any(
        line.startswith(f"{good2}: ") for line in classified)


@pytest.mark.parametrize("content", [b"not a model\n", b""])
def test_model_file_that_is_not_ours_exits_2_with_one_line(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "model.pth").write_bytes(content)
    Image.fromarray(_garment_like(1)[0], "L").save(tmp_path / "a.png")
    done = _cli("predict", str(tmp_path / "a.png"), "--model", str(tmp_path / "model.pth"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert f"model file {tmp_path / 'model.pth'}" in done.stderr
    assert done.stdout == ""


@pytest.mark.skipif(shutil.which("fmnist") is None, reason="console script not installed")
def test_console_script_reports_a_missing_model(tmp_path: Path) -> None:
    Image.fromarray(_garment_like(1)[0], "L").save(tmp_path / "a.png")
    done = subprocess.run(
        ["fmnist", "predict", str(tmp_path / "a.png"), "--model", str(tmp_path / "none.pth")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"fmnist predict: model file {tmp_path / 'none.pth'}: not found"


def test_large_image_is_fitted_centred_keeping_its_aspect_ratio() -> None:
    canvas = np.zeros((300, 400), dtype=np.uint8)
    canvas[100:150, 50:250] = 200  # a 200 x 50 light bar off-centre
    fitted = to_model_input(Image.fromarray(canvas, "L"))
    assert fitted.shape == (28, 28) and fitted.dtype == np.uint8
    rows = np.flatnonzero(fitted.max(axis=1) > 100)
    cols = np.flatnonzero(fitted.max(axis=0) > 100)
    assert (cols.min(), cols.max()) == (0, 27)  # longer side fills the width
    assert 6 <= len(rows) <= 8  # 50/200 of 28 = 7 rows
    assert abs((rows.min() + rows.max()) / 2 - 13.5) <= 1  # centred vertically


def test_invert_turns_dark_on_light_into_light_on_dark() -> None:
    photo = np.full((60, 60), 255, dtype=np.uint8)
    photo[15:45, 20:40] = 30  # a dark garment on white
    fitted = to_model_input(Image.fromarray(photo, "L").convert("RGB"), invert=True)
    assert fitted[0, 0] == 0 and fitted[14, 14] > 200


def test_28x28_images_pass_through_unchanged() -> None:
    image = _garment_like(1)[0]
    np.testing.assert_array_equal(to_model_input(Image.fromarray(image, "L")), image)


def test_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    _bomb_png(tmp_path / "big.png", side, side)
    with pytest.raises(FmnistError, match=r"big\.png: image too large"):
        load_image(tmp_path / "big.png")


def test_phone_photo_is_turned_upright_by_its_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), "white").save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg").size == (20, 40)


def test_class_names_from_a_model_file_cannot_drive_the_terminal(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    save_model(_model(), CONFIG, path)
    payload = torch.load(path, weights_only=True)
    payload["class_names"][0] = "\x1b[31mred\x07"
    torch.save(payload, path)
    classifier = load_classifier(path)
    assert classifier.class_names[0] == "\\x1b[31mred\\x07"
    assert all(name.isprintable() for name in classifier.class_names)


@pytest.mark.usefixtures("signal_state_restored")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_a_library_swallowed_still_ends_predict_in_one_line_without_results(
    tmp_path: Path, model_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], signum: int,
) -> None:
    """A signal whose exception a finalizer ate (h5py's do) while the model loads: no results
    are printed, the exit code is the signal's, and the handlers are put back afterwards."""
    image = tmp_path / "shirt.png"
    Image.fromarray(_garment_like(1)[0], "L").save(image)
    real_load = predict.load_classifier

    def load_swallowing_a_signal(path: str) -> object:
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises here
        except KeyboardInterrupt:
            pass  # as a finalizer would
        return real_load(path)

    monkeypatch.setattr(predict, "load_classifier", load_swallowing_a_signal)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    status = cli.main(["predict", str(image), "--model", str(model_files["pth"])])

    out, err = capsys.readouterr()
    assert status == 128 + signum
    assert out == ""
    assert err.strip().splitlines() == [
        f"fmnist predict: interrupted ({signal.Signals(signum).name})"]
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert signals.received() is None  # the next command starts afresh


def test_file_names_print_with_undecodable_bytes_and_control_characters_escaped(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    """A name that is not UTF-8 must not crash a strict UTF-8 stdout, nor one with a newline or
    an escape sequence split a result line or colour the terminal; --json stays valid UTF-8."""
    folder = os.fsencode(tmp_path)
    odd = [os.fsdecode(folder + b"/bad\xff.png"), os.fsdecode(folder + b"/new\nline\x1b[31m.png")]
    for name in odd:
        Image.fromarray(_garment_like(1)[0], "L").save(name)
    missing = os.fsdecode(folder + b"/gone\x07\xfe.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    shown = [f"{tmp_path}/bad\\xff.png", f"{tmp_path}/new\\nline\\x1b[31m.png"]

    def predict(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fmnist.cli", "predict", *odd, missing,
                               "--model", str(model_files["pth"]), *extra],
                              capture_output=True, text=True, timeout=300, env=env)

    done = predict()
    assert done.returncode == 1, done.stderr
    assert [line.split(": ")[0] for line in done.stdout.splitlines()] == shown
    assert done.stderr.splitlines() == [
        f"fmnist predict: {tmp_path}/gone\\x07\\xfe.png: no such file"]
    document = json.loads(predict("--json").stdout)
    assert [p["file"] for p in document["predictions"]] == [
        f"{tmp_path}/bad\\xff.png", f"{tmp_path}/new\nline\x1b[31m.png"]  # exact where it can be
    assert document["errors"][0]["file"] == f"{tmp_path}/gone\x07\\xfe.png"


def test_a_reader_that_went_away_ends_predict_quietly(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    """`fmnist predict *.png | head -1`: no BrokenPipeError traceback, the shell's SIGPIPE code."""
    Image.fromarray(_garment_like(1)[0], "L").save(tmp_path / "a.png")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fmnist.cli", "predict", str(tmp_path / "a.png"), "--model",
         str(model_files["pth"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # buffered, as for a user (CI sets PYTHONUNBUFFERED): the write fails at a flush
        env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
             "OMP_NUM_THREADS": "1"},
    )
    proc.stdout.close()  # the reader is gone before predict writes its first line
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 128 + signal.SIGPIPE, err
    assert err == ""


def test_an_empty_model_path_is_a_usage_error(tmp_path: Path) -> None:
    Image.fromarray(_garment_like(1)[0], "L").save(tmp_path / "a.png")
    done = _cli("predict", str(tmp_path / "a.png"), "--model", "")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("argument --model: empty path")


def test_an_onnx_model_is_refused_naming_what_runs_it(tmp_path: Path) -> None:
    """export.onnx writes model.onnx next to the others; predict reads the other three."""
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")  # an ONNX header's start
    Image.fromarray(_garment_like(1)[0], "L").save(tmp_path / "a.png")
    done = _cli("predict", str(tmp_path / "a.png"), "--model", str(tmp_path / "model.onnx"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"fmnist predict: model file {tmp_path / 'model.onnx'}: an ONNX model, which fmnist "
        "predict does not run (onnxruntime does); give it the .pth, .h5 or .pt2 export"]


@pytest.mark.parametrize("top_k", ["0", "11", "three"])
def test_a_top_k_outside_the_classes_is_a_usage_error(tmp_path: Path, top_k: str) -> None:
    """--top-k 11 used to show the 10 classes there are without a word."""
    Image.fromarray(_garment_like(1)[0], "L").save(tmp_path / "a.png")
    done = _cli("predict", str(tmp_path / "a.png"), "--top-k", top_k)
    assert done.returncode == 2
    expected = (f"not an integer: {top_k!r}" if top_k == "three"
                else f"must be 1 to 10 (the classes there are), got {top_k}")
    assert done.stderr.strip().splitlines()[-1].endswith(f"argument --top-k: {expected}")


def test_classify_refuses_a_top_k_the_model_cannot_give(model_files: dict[str, Path]) -> None:
    classifier = load_classifier(model_files["pth"])
    image = np.zeros((28, 28), dtype=np.uint8)
    assert len(predict.classify(classifier, [image], top_k=10)[0]) == 10
    for top_k in (0, 11):
        with pytest.raises(FmnistError, match=f"top_k {top_k}: must be 1 to 10"):
            predict.classify(classifier, [image], top_k=top_k)

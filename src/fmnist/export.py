"""Export the trained model to portable files and prove each one reproduces the model's logits.

Formats (file names inside the export folder):
- `model.pth`  the project's model file (modelfile.save_model): tensors and plain types only,
  `torch.load(path, weights_only=True)` reads it, `fmnist.load_model(path)` rebuilds the model.
- `weights.h5` the same weights as plain HDF5 (h5weights.py documents the layout).
- `model.pt2`  a self-contained program (torch.export) with no pickled member (pt2.py), its
  class names and model config (temperature included) in the JSON member extra/fmnist.json:
  `fmnist.load_model(path)` checks the archive before torch opens it; x float32
  (B, 1, 28, 28) raw 0..255 pixels, any B >= 1. Without this package,
  `torch.export.load(path).module()(x)` runs it too, but runs whatever a tampered file holds.
- `model.onnx` only with params export.onnx (needs the `onnx` extra); input `pixels`, output
  `logits`, dynamic batch.

Every file is written into a staging folder, reloaded the way a user would load it and run on
test images; only when every format matches the in-memory model (max |logit diff| <= atol and
identical predictions) does the staging folder replace the export folder.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fmnist import load_model, signals
from fmnist.atomic import Publication, atomic_path, publishing
from fmnist.constants import CLASS_NAMES, INPUT_SHAPE, NUM_CLASSES, ONNX_SUFFIX
from fmnist.errors import FmnistError, first_line
from fmnist.h5weights import save_h5
from fmnist.inference import predict_logits
from fmnist.model import model_config
from fmnist.modelfile import save_model
from fmnist.pt2 import program_bytes

FILES: dict[str, str] = {
    "pth": "model.pth",
    "h5": "weights.h5",
    "pt2": "model.pt2",
    "onnx": f"model{ONNX_SUFFIX}",
}
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
ONNX_INSTALL = "pip install -e .[onnx]"
MAX_BATCH = 65536
SINGLE_IMAGE_SAMPLES = 200  # batch-1 timing uses at most this many images
BENCHMARK_ROUNDS = 3

# images uint8 (N, 28, 28), batch size -> logits float32 (N, 10)
Runner = Callable[[np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class ExportResult:
    """`metrics` is reports/export/parity.json (deterministic), `timing` is timing.json."""

    metrics: dict[str, Any]
    timing: dict[str, Any]
    files: dict[str, Path]


def missing_onnx_package() -> str | None:
    """The first ONNX package that does not import, or None when ONNX export can run."""
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except Exception:  # a broken install is as missing as an absent one
            return name
    return None


def require_onnx() -> None:
    missing = missing_onnx_package()
    if missing is not None:
        raise FmnistError(
            f"export.onnx is true but the package '{missing}' is not installed: {ONNX_INSTALL}"
        )


def frozen_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU eval-mode copy: what every format is exported from and compared with."""
    return copy.deepcopy(model).float().cpu().eval()


def _example_input() -> tuple[torch.Tensor]:
    # Batch 2, not 1: torch.export specializes a size-1 dimension to the constant 1.
    return (torch.zeros((2, *INPUT_SHAPE), dtype=torch.float32),)


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


def export_program(
    model: nn.Module, path: str | Path, config: dict[str, Any] | None = None
) -> None:
    """Write a torch.export program (.pt2) with a dynamic batch dimension, atomically; `config`
    (the model config, temperature included) and the class names go in as its fmnist.json.

    The archive is checked before it is written: no pickled member, nothing fmnist.load_model
    would refuse (pt2.check_archive). Tracing runs Python from inside torch's C++ dispatcher,
    where an interrupt raised mid-way aborts the process (SIGABRT, a C++ stack trace), so a
    signal waits for the trace to end.
    """
    try:
        with signals.deferred():
            program = torch.export.export(
                frozen_copy(model), _example_input(), dynamic_shapes=_dynamic_batch()
            )
    except Exception as exc:  # torch raises many types; say which format failed
        raise FmnistError(f"{path}: torch.export failed: {first_line(exc)}") from None
    shipped = None if config is None else {"class_names": list(CLASS_NAMES),
                                            "model_config": model_config(config)}
    data = program_bytes(program, path, shipped)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def export_onnx(model: nn.Module, path: str | Path) -> None:
    """Write an ONNX model (dynamo exporter, dynamic batch), atomically; needs the onnx extra."""
    require_onnx()
    try:
        with _quiet_onnx_exporter():
            program = torch.onnx.export(
                frozen_copy(model),
                _example_input(),
                dynamo=True,
                dynamic_shapes=_dynamic_batch(),
                input_names=["pixels"],
                output_names=["logits"],
                verbose=False,
            )
    except Exception as exc:
        raise FmnistError(f"{path}: ONNX export failed: {first_line(exc)}") from None
    with atomic_path(path) as tmp:
        tmp.write_bytes(program.model_proto.SerializeToString())


def write_artifacts(
    model: nn.Module, config: dict[str, Any], folder: str | Path, *, onnx: bool
) -> dict[str, Path]:
    """Every format into `folder`; returns format -> path."""
    folder = Path(folder)
    model = frozen_copy(model)
    files = {name: folder / FILES[name] for name in ("pth", "h5", "pt2")}
    save_model(model, config, files["pth"])
    save_h5(model, config, files["h5"])
    export_program(model, files["pt2"], config)
    if onnx:
        files["onnx"] = folder / FILES["onnx"]
        export_onnx(model, files["onnx"])
    return files


def load_runner(fmt: str, path: str | Path) -> Runner:
    """Load a file the way its users would, as a function from uint8 images to logits."""
    path = Path(path)
    if fmt in ("pth", "h5", "pt2"):
        model = load_model(path)
        return lambda images, batch_size: predict_logits(model, images, batch_size=batch_size)
    if fmt == "onnx":
        require_onnx()
        import onnxruntime

        try:
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise FmnistError(f"{path}: onnxruntime cannot load it: {first_line(exc)}") from None
        name = session.get_inputs()[0].name
        return _batched(lambda x: session.run(None, {name: x})[0])
    raise ValueError(f"unknown export format {fmt!r}")


def compare(reference: np.ndarray, logits: np.ndarray) -> dict[str, Any]:
    """Max |logit difference| (exact) and prediction agreement against the reference."""
    if logits.shape != reference.shape:
        return {"max_abs_diff": float("inf"), "agreement": 0.0, "predictions_identical": False}
    same = reference.argmax(axis=1) == logits.argmax(axis=1)
    diff = np.abs(reference.astype(np.float64) - logits.astype(np.float64))
    return {
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "agreement": float(same.mean()) if same.size else 1.0,
        "predictions_identical": bool(same.all()),
    }


def check_parity(fmt: str, path: Path, result: dict[str, Any], atol: float) -> None:
    """FmnistError naming the format and the difference when a file does not match."""
    if not result["max_abs_diff"] <= atol:  # NaN fails too
        raise FmnistError(
            f"parity: {fmt} ({path.name}) max abs logit diff {result['max_abs_diff']:.3g} "
            f"> export.parity_atol {atol:g}"
        )
    if not result["predictions_identical"]:
        raise FmnistError(
            f"parity: {fmt} ({path.name}) predictions differ on "
            f"{1 - result['agreement']:.2%} of the images"
        )


def images_per_second(
    runner: Runner, images: np.ndarray, batch_size: int, *, rounds: int = BENCHMARK_ROUNDS
) -> float:
    """Throughput at `batch_size`: best of `rounds` passes after a warm-up batch.

    The best pass, as timeit does: on a shared machine the slower ones measure the neighbours.
    """
    if batch_size == 1:
        images = images[:SINGLE_IMAGE_SAMPLES]
    elif len(images) < batch_size:
        images = np.resize(images, (batch_size, *images.shape[1:]))
    runner(images[:batch_size], batch_size)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        runner(images, batch_size)
        best = min(best, time.perf_counter() - start)
    return len(images) / max(best, 1e-9)


def run_export(
    model: nn.Module,
    config: dict[str, Any],
    images: np.ndarray,
    out_dir: str | Path,
    *,
    onnx: bool,
    parity_atol: float,
    benchmark_batch_size: int,
    publication: Publication | None = None,
) -> ExportResult:
    """Export, reload, compare with `model` on `images`, time, then publish `out_dir` at once.

    The files are staged in `publication` (the caller's, to publish them with other outputs;
    else one of its own, committed before returning). On any failure nothing is published
    and `out_dir` is left as it was.
    """
    if onnx:
        require_onnx()
    out_dir = Path(out_dir)
    model = frozen_copy(model)
    reference = predict_logits(model, images, batch_size=benchmark_batch_size)
    formats: dict[str, Any] = {}
    speed: dict[str, Any] = {}
    with nullcontext(publication) if publication else publishing() as outputs:
        staging = outputs.folder(out_dir)
        files = write_artifacts(model, config, staging, onnx=onnx)
        for fmt, path in files.items():
            runner = load_runner(fmt, path)
            result = compare(reference, runner(images, benchmark_batch_size))
            check_parity(fmt, path, result, parity_atol)
            formats[fmt] = {
                "bytes": path.stat().st_size,
                "max_abs_diff": _significant(result["max_abs_diff"]),
                "agreement": round(result["agreement"], 6),
                "predictions_identical": result["predictions_identical"],
            }
            speed[fmt] = {
                "single_images_per_s": round(images_per_second(runner, images, 1), 1),
                "batched_images_per_s": round(
                    images_per_second(runner, images, benchmark_batch_size), 1
                ),
            }
    published = {fmt: out_dir / path.name for fmt, path in files.items()}
    metrics = {
        "parity_ok": True,
        "parity_samples": int(len(images)),
        "parity_atol": parity_atol,
        "formats": formats,
    }
    timing = {
        "threads": torch.get_num_threads(),
        "benchmark_batch_size": benchmark_batch_size,
        "single_image_samples": min(len(images), SINGLE_IMAGE_SAMPLES),
        "rounds": BENCHMARK_ROUNDS,
        "load_average_1m": _load_average(),  # other work on the machine skews the timings
        "formats": speed,
    }
    return ExportResult(metrics=metrics, timing=timing, files=published)


def _batched(forward: Callable[[np.ndarray], np.ndarray]) -> Runner:
    """A Runner from a function of float32 (B, 1, 28, 28) raw pixels to logits."""

    def run(images: np.ndarray, batch_size: int) -> np.ndarray:
        outputs = [np.zeros((0, NUM_CLASSES), dtype=np.float32)]
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = images[start : start + batch_size, None].astype(np.float32)
                outputs.append(np.asarray(forward(x), dtype=np.float32))
        return np.concatenate(outputs)

    return run


@contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """The dynamo exporter logs optional-op warnings (torchvision) and FutureWarnings."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def _significant(value: float, digits: int = 3) -> float:
    """Rounded to `digits` significant digits, so last-bit noise does not change metrics."""
    return float(f"{value:.{digits}g}")

"""Classify image files (PNG, JPEG, ... any size or mode) with a trained or exported model.

Images are made to look like Fashion-MNIST before the model sees them:
1. decode with Pillow (truncated files and images over MAX_IMAGE_PIXELS are refused) and
   turn upright by the EXIF orientation,
2. convert to 8-bit grayscale ("L"); with `invert`, negate it (Fashion-MNIST shows light
   objects on a dark background; photos of clothes usually show dark objects on light),
3. an image already 28x28 is used as it is; any other size is trimmed to the bounding box of
   the non-background pixels (> TRIM_THRESHOLD), resized (Lanczos) so its longer side is 28
   pixels, keeping the aspect ratio, and centred on a black 28x28 canvas,
4. raw 0..255 pixels go to the model (its first layer normalizes).

Inversion is not guessed: a wrong guess silently turns a shirt into a bag. Instead each
result says whether the image's border looks light (`light_background`), and the command line
suggests --invert when it does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch import nn

from fmnist.constants import IMAGE_SIZE, NUM_CLASSES, ONNX_SUFFIX, PT2_SUFFIX
from fmnist.errors import FmnistError, first_line
from fmnist.inference import predict_logits
from fmnist.modelfile import H5_SUFFIXES, model_from_payload, read_model_file

MAX_IMAGE_PIXELS = 40_000_000  # 40 megapixels: any camera photo; decompression bombs fail
TRIM_THRESHOLD = 25  # pixels above this (after inversion) belong to the object
LIGHT_BORDER = 128  # mean border brightness above this suggests a dark-on-light photo
BATCH_SIZE = 256


@dataclass(frozen=True)
class Classifier:
    """A model and the class names stored with it."""

    model: nn.Module
    class_names: tuple[str, ...]
    source: Path


@dataclass(frozen=True)
class Prediction:
    file: str
    top_k: list[tuple[str, int, float]]  # (class name, class index, probability)
    inverted: bool
    light_background: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "inverted": self.inverted,
            "light_background": self.light_background,
            "top_k": [
                {"class": name, "index": index, "probability": round(prob, 6)}
                for name, index, prob in self.top_k
            ],
        }


def load_classifier(path: str | Path) -> Classifier:
    """The model (eval mode) and its class names from a .pth, .h5 or .pt2 file of this project."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ONNX_SUFFIX:
        raise FmnistError(f"model file {path}: an ONNX model, which fmnist predict does not run "
                          "(onnxruntime does); give it the .pth, .h5 or .pt2 export")
    if suffix == PT2_SUFFIX:
        from fmnist import pt2  # torch.export, only for a .pt2

        model: nn.Module = pt2.load_program(path)
        payload = model.config
        if not isinstance(payload.get("class_names"), list):
            raise FmnistError(f"model file {path}: no class-name list in {pt2.CONFIG} (a .pt2 "
                              "exported before it carried one?): re-export it (dvc repro export)")
    else:
        if suffix in H5_SUFFIXES:
            from fmnist.h5weights import read_h5_file

            payload = read_h5_file(path)
        else:
            payload = read_model_file(path)
        model = model_from_payload(payload, path)
    names = tuple(printable(str(name)) for name in payload["class_names"])
    if len(names) != NUM_CLASSES:
        raise FmnistError(f"model file {path}: {len(names)} class names, expected {NUM_CLASSES}")
    return Classifier(model=model, class_names=names, source=path)


def printable(text: str) -> str:
    """`text` with control characters escaped: a model file must not drive the terminal."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in as_text(text))


def as_text(name: str) -> str:
    """A file name (or a message holding one) as valid Unicode: the bytes of a name that are
    not UTF-8, which os.fsdecode keeps as lone surrogates that no output encodes, as \\xNN."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate os.fsdecode does not make
        raw = name.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def load_image(path: str | Path) -> Image.Image:
    """A fully decoded image in mode "L"; FmnistError (one line) for anything unusable."""
    path = Path(path)
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if not path.exists():
        raise FmnistError(f"{path}: no such file")
    if path.is_dir():
        raise FmnistError(f"{path}: is a directory")
    if not path.is_file():  # a FIFO would block the read forever, a device never end
        raise FmnistError(f"{path}: not a regular file (FIFO, socket or device), refused")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_size(path, image.size)
                image.load()
                return _to_gray(ImageOps.exif_transpose(image))  # phone photos: upright
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise FmnistError(
            f"{path}: image too large (over {MAX_IMAGE_PIXELS:,} pixels), refused"
        ) from None
    except UnidentifiedImageError:
        raise FmnistError(f"{path}: not an image Pillow can read") from None
    except FmnistError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise FmnistError(f"{path}: corrupt or truncated image ({first_line(exc)})") from None
    except Exception as exc:  # a decoder's own failure (e.g. NotImplementedError): this file's
        raise FmnistError(
            f"{path}: cannot decode image ({type(exc).__name__}: {first_line(exc)})"
        ) from None


def to_model_input(image: Image.Image, *, invert: bool = False) -> np.ndarray:
    """uint8 (28, 28), light object on a dark background, like a Fashion-MNIST image."""
    gray = image if image.mode == "L" else image.convert("L")
    if invert:
        gray = ImageOps.invert(gray)
    if gray.size == (IMAGE_SIZE, IMAGE_SIZE):
        return np.asarray(gray, dtype=np.uint8).copy()
    box = gray.point(lambda p: 255 if p > TRIM_THRESHOLD else 0).getbbox()
    if box is not None:
        gray = gray.crop(box)
    width, height = gray.size
    scale = IMAGE_SIZE / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    gray = gray.resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    canvas.paste(gray, ((IMAGE_SIZE - size[0]) // 2, (IMAGE_SIZE - size[1]) // 2))
    return np.asarray(canvas, dtype=np.uint8).copy()


def has_light_background(image: Image.Image) -> bool:
    """Whether the one-pixel border is mostly light: a hint that --invert is needed."""
    pixels = np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return bool(border.mean() > LIGHT_BORDER)


def classify(
    classifier: Classifier, images: list[np.ndarray], *, top_k: int
) -> list[list[tuple[str, int, float]]]:
    """Top-k (class, index, probability) per image, highest first, in one batched pass;
    probabilities are softmax(logits / the model's temperature)."""
    if not images:
        return []
    logits = predict_logits(classifier.model, np.stack(images), batch_size=BATCH_SIZE)
    # calibrated: the temperature evaluate fitted travels in the exported model's config
    logits = logits.astype(np.float64) / classifier.model.temperature
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    if not 1 <= top_k <= probs.shape[1]:
        raise FmnistError(f"top_k {top_k}: must be 1 to {probs.shape[1]} (the model's classes)")
    ranked = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    return [
        [(classifier.class_names[i], int(i), float(row[i])) for i in order]
        for row, order in zip(probs, ranked, strict=True)
    ]


def _to_gray(image: Image.Image) -> Image.Image:
    """Mode "L"; transparent pixels become white (the usual look of a cut-out product photo)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        return Image.fromarray(np.clip(array / peak * 255, 0, 255).astype(np.uint8), "L")
    return image.convert("L")


def _check_size(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise FmnistError(f"{path}: image has no pixels ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise FmnistError(
            f"{path}: image too large ({width}x{height}, over {MAX_IMAGE_PIXELS:,} pixels), refused"
        )

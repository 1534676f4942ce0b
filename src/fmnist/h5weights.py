"""The model's weights as plain HDF5, readable with h5py alone, loadable by fmnist.load_model.

Layout (format "fmnist-weights-h5", version 2):

- Every tensor of the model's state_dict (parameters and buffers, BatchNorm running statistics
  and `num_batches_tracked` included) is one dataset. Its state_dict key is split at the last
  dot: the part before is a group path (dots become slashes), the part after is the dataset
  name. `features.0.weight` -> group `features/0`, dataset `weight`;
  `classifier.5.bias` -> `classifier/5/bias`. Floating tensors are float32, integer buffers
  int64 (scalar datasets for `num_batches_tracked`); shapes are PyTorch's (conv weights are
  out_channels x in_channels x 3 x 3, linear weights out_features x in_features).
- Root attributes: `format`, `format_version`, `model_config` (JSON: params["model"]; with
  `"pool_ceil_mode": true` each 2x2 max pool rounds odd sizes up, MaxPool2d(2, ceil_mode=True):
  7 -> 4 -> 2; plus `"flip_tta": true` when the model averages its logits over the image and
  its left-right mirror: compute (f(x) + f(flip(x))) / 2 then, and `"temperature": T` when
  evaluate fitted one on the validation split: probabilities are softmax(logits / T)),
  `state_dict_keys` (JSON list, in the model's order), `class_names` (array of str, index =
  logit), `input_shape` [1, 28, 28], `input_dtype` "float32", `input_range` [0, 255],
  `normalization_mean` 0.5, `normalization_std` 0.5, `normalization` (the formula: the model's
  first layer computes (x / 255 - 0.5) / 0.5, so feed raw pixels), `dtype` "float32",
  `torch_version`, `h5py_version`, `hdf5_version`, `fmnist_version`, and `weights_sha256`
  (SHA-256 over the `model_config` JSON text, the `class_names` as a JSON list, then key by key
  in `state_dict_keys` order: the key, dtype, shape and the raw little-endian bytes; see
  `weights_digest`) so a damaged or edited file is refused, not half-loaded. Version 1 files
  (whose checksum left the config out) are refused: re-export them.

No timestamps are stored (track_times=False), so the same weights give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from fmnist import __version__
from fmnist.atomic import write_bytes
from fmnist.constants import CLASS_NAMES, INPUT_SHAPE, NORM_MEAN, NORM_STD
from fmnist.errors import FmnistError
from fmnist.model import model_config
from fmnist.modelfile import model_from_payload, plain_state_dict

FORMAT = "fmnist-weights-h5"
FORMAT_VERSION = 2
NORMALIZATION_FORMULA = (
    "x = (pixel / 255 - 0.5) / 0.5, computed by the model's first layer: feed raw 0..255 pixels"
)


def dataset_path(key: str) -> str:
    """`features.0.weight` -> `features/0/weight`: groups per layer, dataset per tensor."""
    return key.replace(".", "/")


def weights_digest(
    state: dict[str, torch.Tensor], config_text: str, class_names: list[str]
) -> str:
    """SHA-256 of the config, the class names and the tensors in order: detects damage that
    HDF5 itself does not, and an edited config (which decides what gets built) too."""
    digest = hashlib.sha256()
    digest.update(f"model_config|{config_text}|".encode())
    digest.update(f"class_names|{json.dumps(class_names)}|".encode())
    for key, tensor in state.items():
        array = np.ascontiguousarray(tensor.numpy())
        header = f"{key}|{array.dtype.str}|{list(array.shape)}|"
        digest.update(header.encode("utf-8"))
        digest.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return digest.hexdigest()


def save_h5(model: nn.Module, config: dict[str, Any], path: str | Path) -> None:
    """Write every state_dict tensor and the metadata to rebuild the model, atomically.

    Built in memory, then written by Python: h5py meeting a full disk mid-write can crash the
    interpreter; a plain write fails with an OSError naming the file.
    """
    state = plain_state_dict(model)
    strings = h5py.string_dtype()
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", libver="earliest") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        config_text = json.dumps(model_config(config), sort_keys=True)
        f.attrs["model_config"] = config_text
        f.attrs["state_dict_keys"] = json.dumps(list(state))
        f.attrs.create("class_names", np.array(CLASS_NAMES, dtype=object), dtype=strings)
        f.attrs["input_shape"] = np.array(INPUT_SHAPE, dtype=np.int64)
        f.attrs["input_dtype"] = "float32"
        f.attrs["input_range"] = np.array([0, 255], dtype=np.int64)
        f.attrs["normalization_mean"] = NORM_MEAN
        f.attrs["normalization_std"] = NORM_STD
        f.attrs["normalization"] = NORMALIZATION_FORMULA
        f.attrs["dtype"] = "float32"
        f.attrs["torch_version"] = str(torch.__version__)
        f.attrs["h5py_version"] = h5py.__version__
        f.attrs["hdf5_version"] = h5py.version.hdf5_version
        f.attrs["fmnist_version"] = __version__
        f.attrs["weights_sha256"] = weights_digest(state, config_text, list(CLASS_NAMES))
        for key, tensor in state.items():
            f.create_dataset(dataset_path(key), data=tensor.numpy(), track_times=False)
    write_bytes(path, buffer.getbuffer())


def read_h5_file(path: str | Path) -> dict[str, Any]:
    """The same payload as modelfile.read_model_file, from an .h5 weights file."""
    path = Path(path)
    if not path.exists():
        raise FmnistError(f"model file {path}: not found")
    if path.is_dir():
        raise FmnistError(f"model file {path}: is a directory")
    try:
        with h5py.File(path, "r") as f:
            return _read_open_file(f, path)
    except FmnistError:
        raise
    except Exception as exc:  # h5py raises OSError, KeyError, ValueError, ... on damaged files
        raise FmnistError(f"model file {path}: {_h5_problem(exc)}") from None


def load_h5_model(path: str | Path) -> nn.Module:
    """The model, in eval mode, rebuilt from an .h5 weights file written by save_h5."""
    return model_from_payload(read_h5_file(path), path)


def _read_open_file(f: h5py.File, path: Path) -> dict[str, Any]:
    if _text(f.attrs.get("format")) != FORMAT:
        raise FmnistError(f"model file {path}: not an fmnist weights file (no format '{FORMAT}')")
    version = f.attrs.get("format_version")
    if version is None or int(version) != FORMAT_VERSION:
        raise FmnistError(
            f"model file {path}: format version {version} (this fmnist reads {FORMAT_VERSION})"
        )
    try:
        config_text = _text(f.attrs["model_config"])
        config = json.loads(config_text)
        keys = json.loads(_text(f.attrs["state_dict_keys"]))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise FmnistError(f"model file {path}: unreadable metadata ({exc})") from None
    if not isinstance(config, dict) or not isinstance(keys, list):
        raise FmnistError(f"model file {path}: model_config or state_dict_keys malformed")
    state: dict[str, torch.Tensor] = {}
    for key in keys:
        node = f.get(dataset_path(str(key)))
        if not isinstance(node, h5py.Dataset):
            raise FmnistError(f"model file {path}: dataset {dataset_path(str(key))} missing")
        state[key] = torch.from_numpy(np.array(node[()]))
    class_names = [_text(name) for name in f.attrs.get("class_names", CLASS_NAMES)]
    if _text(f.attrs.get("weights_sha256")) != weights_digest(state, config_text, class_names):
        raise FmnistError(
            f"model file {path}: corrupt or edited (config and weights checksum mismatch)"
        )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": config,
        "state_dict": state,
        "class_names": class_names,
        "normalization": {
            "mean": float(f.attrs.get("normalization_mean", NORM_MEAN)),
            "std": float(f.attrs.get("normalization_std", NORM_STD)),
        },
        "input_shape": [int(n) for n in f.attrs.get("input_shape", INPUT_SHAPE)],
    }


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


def _h5_problem(exc: Exception) -> str:
    """One line for why h5py could not read the file."""
    text = str(exc)
    if "truncated file" in text:
        return "truncated HDF5 file"
    if "file signature not found" in text:
        return "not an HDF5 file"
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"corrupt HDF5 file ({first})"

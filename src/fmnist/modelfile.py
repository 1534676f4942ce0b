"""The trained model on disk: plain types and fp32 tensors, loadable with weights_only=True.

A model file carries its own model config, class names and normalization, so it can be
rebuilt without params.yaml. Loading never unpickles code: torch.load(weights_only=True)
refuses pickled objects, and that refusal becomes a one-line FmnistError.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import jsonschema
import torch
from torch import nn

from fmnist.atomic import write_bytes
from fmnist.constants import (
    CLASS_NAMES,
    INPUT_SHAPE,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    NORM_MEAN,
    NORM_STD,
)
from fmnist.errors import FmnistError
from fmnist.model import FLIP_TTA, TEMPERATURE, build_model, model_config
from fmnist.params import ParamsValidator, schema

FORMAT = "fmnist-model"
FORMAT_VERSION = 1
H5_SUFFIXES = (".h5", ".hdf5")


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 (floating tensors), contiguous CPU copies of the weights and buffers."""
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu")
        if value.is_floating_point():
            value = value.float()
        state[key] = value.contiguous().clone()
    return state


def save_model(
    model: nn.Module,
    config: dict[str, Any],
    path: str | Path,
    *,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the model atomically as a dict of plain types and tensors (see read_model_file)."""
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": model_config(config),
        "state_dict": plain_state_dict(model),
        "class_names": list(CLASS_NAMES),
        "normalization": {"mean": NORM_MEAN, "std": NORM_STD},
        "input_shape": list(INPUT_SHAPE),
    }
    reserved = set(payload) & set(extra or {})
    if reserved:
        raise ValueError(f"save_model: extra may not override {sorted(reserved)}")
    payload.update(extra or {})
    write_bytes(path, torch_bytes(payload))


def torch_bytes(payload: dict[str, Any]) -> bytes:
    """torch.save's bytes, the same for the same payload: saved to a path, torch's zip would
    name its records after the (random) temporary file, so identical weights made new bytes
    and `dvc repro --force` reran evaluate and export."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def read_model_file(path: str | Path) -> dict[str, Any]:
    """The validated payload of a .pth model file; FmnistError if it is not one of ours."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FmnistError(f"model file {path}: not found") from None
    except IsADirectoryError:
        raise FmnistError(f"model file {path}: is a directory") from None
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise FmnistError(f"model file {path}: {_load_problem(exc)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FmnistError(f"model file {path}: not an fmnist model file (no format '{FORMAT}')")
    if payload.get("format_version") != FORMAT_VERSION:
        raise FmnistError(
            f"model file {path}: format version {payload.get('format_version')!r} "
            f"(this fmnist reads {FORMAT_VERSION})"
        )
    for key, kind in (("model_config", dict), ("state_dict", dict), ("class_names", list)):
        if not isinstance(payload.get(key), kind):
            raise FmnistError(f"model file {path}: '{key}' missing or not a {kind.__name__}")
    return payload


def model_from_payload(payload: dict[str, Any], source: str | Path) -> nn.Module:
    """Rebuild the model from its stored config and load the weights (eval mode).

    The config is checked against the params schema first (a file is input too: a huge
    `channels` must not become a petabyte allocation), and non-finite weights are refused.
    """
    check_model_config(payload["model_config"], source)
    try:
        model = build_model(payload["model_config"])
    except (FmnistError, TypeError, ValueError, KeyError) as exc:
        raise FmnistError(f"model file {source}: unusable model config: {exc}") from None
    check_state_dict(model, payload["state_dict"], source)
    check_finite(payload["state_dict"], source)
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def check_model_config(config: Any, source: str | Path) -> None:
    """FmnistError (one line) unless `config` is a model section params.yaml could hold."""
    section = dict(schema()["properties"]["model"])
    section["properties"] = {
        **section["properties"],
        FLIP_TTA: {"type": "boolean"},
        TEMPERATURE: {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": MAX_TEMPERATURE},
    }
    error = jsonschema.exceptions.best_match(ParamsValidator(section).iter_errors(config))
    if error is not None:
        where = ".".join(str(part) for part in error.absolute_path) or "model_config"
        raise FmnistError(f"model file {source}: invalid model config: {where}: {error.message}")


def check_finite(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """A model with NaN or infinite weights predicts nothing meaningful: refuse it."""
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise FmnistError(f"model file {source}: non-finite values in {key}, refused")


def check_state_dict(model: nn.Module, state: dict[str, Any], source: str | Path) -> None:
    """FmnistError when the weights do not fit the model built from the config."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problem = ""
    if missing:
        problem = f"missing {missing[0]}" + (f" (+{len(missing) - 1} more)" if missing[1:] else "")
    elif unexpected:
        problem = f"unexpected {unexpected[0]}"
    else:
        for key, tensor in expected.items():
            value = state[key]
            if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                problem = f"{key} has shape {shape}, the model needs {tuple(tensor.shape)}"
                break
    if problem:
        raise FmnistError(
            f"model file {source} was trained with a different model config: {problem}"
        )


def _load_problem(exc: Exception) -> str:
    """One line for why torch.load refused the file."""
    text = str(exc)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"holds a pickled object ({refused.group(1)}); refusing to load it"
    if "Weights only load failed" in text:
        return "holds pickled objects that a weights-only load refuses; refusing to load it"
    if isinstance(exc, EOFError):
        return "empty or truncated file"
    return f"corrupt or not a torch file ({type(exc).__name__})"

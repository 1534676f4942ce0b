"""The CNN: VGG-style blocks of 3x3 convolutions, then two fully connected layers.

Normalization lives here and nowhere else: the first layer maps raw 0..255 pixels to [-1, 1],
so the stage, evaluation, exported files and `fmnist predict` all feed the same raw values.
Flip test-time augmentation lives here too (config `flip_tta`, eval mode only), so the
exported files and `fmnist predict` compute exactly what evaluate reports.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fmnist.constants import IMAGE_SIZE, INPUT_SHAPE, NORM_MEAN, NORM_STD, NUM_CLASSES
from fmnist.errors import FmnistError

CONFIG_KEYS = ("channels", "convs_per_block", "batch_norm", "dropout", "hidden")
# Optional (absent = false, how older model files were built): pool with ceil_mode, so an odd
# map keeps its last row and column (7x7 -> 4x4) instead of dropping them (7x7 -> 3x3).
POOL_CEIL_MODE = "pool_ceil_mode"
# Absent from older model files, and from params.yaml's model section: evaluate and export set it.
FLIP_TTA = "flip_tta"
# Config key of the temperature evaluate fits on the validation split: the model still returns
# logits; its probabilities are softmax(logits / temperature) (see fmnist.calibration).
TEMPERATURE = "temperature"


class Normalize(nn.Module):
    """Raw pixels 0..255 -> (x / 255 - NORM_MEAN) / NORM_STD, i.e. [-1, 1]. No parameters."""

    def __init__(self, mean: float = NORM_MEAN, std: float = NORM_STD) -> None:
        super().__init__()
        self.mean = float(mean)
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x / 255.0 - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"x / 255, mean={self.mean}, std={self.std}"


class CNN(nn.Module):
    """normalize -> features (conv blocks) -> classifier (dropout, hidden, dropout, logits)."""

    def __init__(
        self,
        channels: list[int],
        convs_per_block: int,
        batch_norm: bool,
        dropout: float,
        hidden: int,
        flip_tta: bool = False,
        temperature: float = 1.0,
        pool_ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        self.flip_tta = flip_tta
        self.temperature = temperature
        self.normalize = Normalize()
        layers: list[nn.Module] = []
        in_channels, size = INPUT_SHAPE[0], IMAGE_SIZE
        for out_channels in channels:
            for _ in range(convs_per_block):
                # A bias before batch norm is cancelled by its mean subtraction.
                layers.append(
                    nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm)
                )
                if batch_norm:
                    layers.append(nn.BatchNorm2d(out_channels))
                layers.append(nn.ReLU(inplace=True))
                in_channels = out_channels
            layers.append(nn.MaxPool2d(2, ceil_mode=pool_ceil_mode))
            size = -(-size // 2) if pool_ceil_mode else size // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(in_channels * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits; in eval mode with flip_tta, the mean of the image's and its mirror's."""
        if self.flip_tta and not self.training:
            # two passes, not one over a doubled batch: torch.export keeps the batch dynamic
            return (self._logits(x) + self._logits(x.flip(-1))) / 2
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))

    def extra_repr(self) -> str:
        return f"flip_tta={self.flip_tta}, temperature={self.temperature}"


def build_model(config: dict[str, Any]) -> nn.Module:
    """The CNN described by params["model"], initialized from torch's (seeded) global RNG.

    Input: float32 (B, 1, 28, 28) raw pixel values 0..255; output: logits (B, 10).
    """
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise FmnistError(f"model config: missing key {missing[0]!r}")
    return CNN(
        channels=[int(c) for c in config["channels"]],
        convs_per_block=int(config["convs_per_block"]),
        batch_norm=bool(config["batch_norm"]),
        dropout=float(config["dropout"]),
        hidden=int(config["hidden"]),
        flip_tta=bool(config.get(FLIP_TTA, False)),
        temperature=float(config.get(TEMPERATURE, 1.0)),
        pool_ceil_mode=bool(config.get(POOL_CEIL_MODE, False)),
    )


def shipped_config(
    config: dict[str, Any], flip_tta: bool, temperature: float | None = None
) -> dict[str, Any]:
    """The config of the model that evaluate scores and export ships: the trained one's, with
    evaluate.flip_tta applied (and, in export, evaluate's fitted temperature)."""
    extra: dict[str, Any] = {FLIP_TTA: flip_tta}
    if temperature is not None:
        extra[TEMPERATURE] = temperature
    return model_config({**config, **extra})


def model_config(params_model: dict[str, Any]) -> dict[str, Any]:
    """The plain-typed copy of params["model"] that model files store (`flip_tta` and
    `pool_ceil_mode` only when on, `temperature` only when not 1, so files without them keep
    their bytes and older readers keep reading them)."""
    config = {
        "channels": [int(c) for c in params_model["channels"]],
        "convs_per_block": int(params_model["convs_per_block"]),
        "batch_norm": bool(params_model["batch_norm"]),
        "dropout": float(params_model["dropout"]),
        "hidden": int(params_model["hidden"]),
    }
    if params_model.get(POOL_CEIL_MODE):
        config[POOL_CEIL_MODE] = True
    if params_model.get(FLIP_TTA):
        config[FLIP_TTA] = True
    if params_model.get(TEMPERATURE, 1.0) != 1.0:
        config[TEMPERATURE] = float(params_model[TEMPERATURE])
    return config

"""`fmnist.load_model`: a model file of either format back to a model.

The one module that knows both formats, so that `modelfile` (.pth) and `h5weights` (.h5, built
on modelfile's payload checks) never import each other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fmnist.h5weights import load_h5_model
from fmnist.modelfile import H5_SUFFIXES, model_from_payload, read_model_file


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """The model in eval mode, from a .pth file or an .h5 weights file."""
    path = Path(path)
    if path.suffix.lower() in H5_SUFFIXES:
        model = load_h5_model(path)
    else:
        model = model_from_payload(read_model_file(path), path)
    return model.to(map_location).eval()

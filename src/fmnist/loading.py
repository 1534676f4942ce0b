"""`fmnist.load_model`: a model file of any format back to a model.

The one module that knows every format, so that `modelfile` (.pth), `h5weights` (.h5, built
on modelfile's payload checks) and `pt2` (.pt2, checked before torch opens it) never import
each other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fmnist import pt2
from fmnist.constants import PT2_SUFFIX
from fmnist.h5weights import load_h5_model
from fmnist.modelfile import H5_SUFFIXES, model_from_payload, read_model_file


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """The model in eval mode, from a .pth file, an .h5 weights file or a .pt2 program.

    A .pt2 comes back as a `pt2.ProgramModel`: same input (raw pixels) and logits, but
    inference-only; its archive is refused if it holds anything the export does not write.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == PT2_SUFFIX:
        return pt2.load_program(path, map_location=map_location)
    if suffix in H5_SUFFIXES:
        model = load_h5_model(path)
    else:
        model = model_from_payload(read_model_file(path), path)
    return model.to(map_location).eval()

"""Fashion-MNIST CNN trained with Sharpness-Aware Minimization, as a DVC pipeline."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["FmnistError", "__version__", "load_model"]

from fmnist.errors import FmnistError


def load_model(path: str, **kwargs: Any):  # noqa: ANN201 - torch is imported lazily
    """The model, in eval mode, from a .pth, .h5 or .pt2 file written by this project."""
    from fmnist.loading import load_model as _load_model

    return _load_model(path, **kwargs)

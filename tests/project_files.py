"""Helpers for tests that run the real stages in a project copy (test_e2e, test_failures) or
the benchmark scripts under bench/."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from fmnist.constants import PREPARED_FILE, SPLITS

if TYPE_CHECKING:
    from fmnist.data import Prepared

REPO = Path(__file__).resolve().parents[1]

PUBLISHED_TOPS = ("data", "models", "reports", "export")


def deep_update(target: dict, changes: dict) -> None:
    """Apply nested `changes` to a params dict in place (a slice of params.yaml)."""
    for key, value in changes.items():
        if isinstance(value, dict):
            deep_update(target[key], value)
        else:
            target[key] = value


def write_prepared(root: Path, data: Prepared, *, seed: int = 0,
                   val_fraction: float = 0.25) -> Path:
    """`data` as preprocess lays out the prepared file under a project root `root`."""
    import h5py

    path = root / PREPARED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for name in SPLITS:
            split = getattr(data, name)
            f[f"{name}/images"] = split.images
            f[f"{name}/labels"] = split.labels
        f.attrs["class_names"] = list(data.class_names)
        f.attrs["split_sizes"] = json.dumps({name: len(getattr(data, name)) for name in SPLITS})
        f.attrs["seed"] = seed
        f.attrs["val_fraction"] = val_fraction
    return path


def published_outputs(root: Path) -> dict[str, bytes]:
    """Every file the stages publish, by path (checkpoints/ is resume state, not an output)."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for top in PUBLISHED_TOPS
        for path in sorted((root / top).rglob("*"))
        if path.is_file()
    }


def load_bench_script(name: str) -> ModuleType:
    """bench/<name>.py as the module `name` (bench/ is scripts, not a package); registered in
    sys.modules so its dataclasses and pickles resolve, and so scripts sharing it get this one."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

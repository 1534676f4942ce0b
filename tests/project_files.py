"""Helpers for tests that run the real stages in a project copy (test_e2e, test_failures) or
the benchmark scripts under bench/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]

PUBLISHED_TOPS = ("data", "models", "reports", "export")


def deep_update(target: dict, changes: dict) -> None:
    """Apply nested `changes` to a params dict in place (a slice of params.yaml)."""
    for key, value in changes.items():
        if isinstance(value, dict):
            deep_update(target[key], value)
        else:
            target[key] = value


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

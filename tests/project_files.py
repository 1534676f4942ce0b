"""Helpers for tests that run the real stages in a project copy (test_e2e, test_failures)."""

from __future__ import annotations

from pathlib import Path

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

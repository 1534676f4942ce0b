"""Fixtures shared by several test files."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fmnist import sources


@pytest.fixture
def edit_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """`edit_source("sam.py")` appends a comment to that package file, as far as the code
    digests can tell: they read a copy of the package, so the real files stay untouched."""
    copy = tmp_path / "package-copy"
    shutil.copytree(sources.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(sources, "PACKAGE_DIR", copy)
    sources.source_closure.cache_clear()

    def edit(name: str) -> None:
        path = copy / name
        path.write_text(path.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")

    yield edit
    sources.source_closure.cache_clear()

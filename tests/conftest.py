"""Fixtures shared by several test files."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

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


@pytest.fixture
def torch_determinism_restored() -> Iterator[None]:
    """Put torch's process-wide determinism switches and thread count back as the test found
    them (configure_torch, which fit calls, sets them for the whole process)."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory, torch.get_num_threads())
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.utils.deterministic.fill_uninitialized_memory = saved[2]
    torch.set_num_threads(saved[3])


@pytest.fixture
def keep_nan_fill_on(
    torch_determinism_restored: None, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], None]:
    """`keep_nan_fill_on()`: from then on, fit's configure_torch leaves deterministic mode's NaN
    fill of new tensors on, as torch sets it (configure_torch turns it off on a CPU)."""
    from fmnist import train

    configure = train.configure_torch

    def configure_with_fill(*args: object, **kwargs: object) -> None:
        configure(*args, **kwargs)
        torch.utils.deterministic.fill_uninitialized_memory = True
        assert torch.empty(4).isnan().all()  # the fill is really on

    def keep_on() -> None:
        monkeypatch.setattr(train, "configure_torch", configure_with_fill)

    return keep_on


@pytest.fixture
def signal_state_restored() -> Iterator[None]:
    """Put the SIGINT/SIGTERM handlers, sys.unraisablehook (signals.install wraps it) and
    fmnist.signals' record back as the test found them."""
    from fmnist import signals

    with signals.restored():
        yield

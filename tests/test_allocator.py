"""fmnist.allocator: freed activations are reused, not page-faulted in again every step."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from fmnist import allocator

# A fresh process runs training steps of the project's model and counts the minor page faults
# of each timed step (glibc's thresholds are process-wide and adapt as blocks are freed). The
# default's typical (median) step is the reference. With the thresholds kept, most steps must
# stay far below it: a spike or two (a block re-faulted after warm-up, the VM's own paging) is
# not what the setting is about, but a partial regression is: with the mmap threshold pinned and
# the trim threshold left at glibc's default, 5 or more of the 9 steps page-fault (measured).
QUIET_STEPS_KEPT = 6
FAULTS_PROBE = """
import json, resource, sys
import torch
from torch.nn import functional as F
from fmnist.allocator import keep_freed_memory
from fmnist.model import build_model
applied = keep_freed_memory() if sys.argv[1] == "kept" else False
torch.manual_seed(0)
torch.set_num_threads(1)
model = build_model({"channels": [16, 32], "convs_per_block": 2, "batch_norm": True,
                     "dropout": 0.0, "hidden": 32}).to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x = (torch.rand(128, 1, 28, 28) * 255).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (128,))
def step():
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(8):
    step()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": sorted(faults)}))
"""


def probe(mode: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items()
           if k not in (allocator.PRELOAD_VARIABLE, allocator.TUNABLES_VARIABLE,
                        *allocator.USER_SETTINGS)}
    proc = subprocess.run([sys.executable, "-c", FAULTS_PROBE, mode], capture_output=True,
                          text=True, timeout=120, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != allocator.GLIBC, reason="glibc's mallopt only")
def test_training_steps_stop_page_faulting_their_activations() -> None:
    default = probe("default")["faults"]
    typical = default[len(default) // 2]
    if typical < 500:
        pytest.skip(f"this glibc keeps freed blocks already ({typical} faults per step)")
    kept = probe("kept")
    assert kept["applied"] is True
    # a step's activations are a few MB: ~1,000+ pages faulted in again by default
    quiet = [faults for faults in kept["faults"] if faults < typical / 10]
    assert len(quiet) >= QUIET_STEPS_KEPT, (kept["faults"], default)


def test_off_glibc_nothing_is_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator._set_thresholds() is False


def test_thresholds_are_set_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(allocator, "_set_thresholds", lambda: calls.append(1) or True)
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True
    assert calls == [1]


@pytest.mark.parametrize("name, value", [
    ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"),
    ("MALLOC_MMAP_THRESHOLD_", "131072"),
    ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"),
])
def test_an_allocator_chosen_by_the_user_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    for variable in (allocator.PRELOAD_VARIABLE, allocator.TUNABLES_VARIABLE,
                     *allocator.USER_SETTINGS):
        monkeypatch.delenv(variable, raising=False)
    assert allocator.allocator_chosen_elsewhere() is False
    monkeypatch.setenv(name, value)
    assert allocator.allocator_chosen_elsewhere() is True
    assert allocator._set_thresholds() is False


class FakeLibc:
    """Stands in for ctypes.CDLL(None): records mallopt's calls, answers `answer`."""

    def __init__(self, answer: int) -> None:
        self.calls: list[tuple[int, int]] = []

        def mallopt(param: int, value: int) -> int:  # a function: ctypes sets argtypes on it
            self.calls.append((param, value))
            return answer

        self.mallopt = mallopt


def _on_glibc(monkeypatch: pytest.MonkeyPatch, libc: FakeLibc) -> None:
    for variable in (allocator.PRELOAD_VARIABLE, allocator.TUNABLES_VARIABLE,
                     *allocator.USER_SETTINGS):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: (allocator.GLIBC, "2.36"))
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)


def test_on_glibc_both_thresholds_are_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = FakeLibc(answer=1)
    _on_glibc(monkeypatch, libc)
    assert allocator._set_thresholds() is True
    assert libc.calls == [(allocator.M_MMAP_THRESHOLD, 32 * 1024 * 1024),
                          (allocator.M_TRIM_THRESHOLD, 2**31 - 1)]


@pytest.mark.parametrize("answer", [0, -1])
def test_a_rejected_or_foreign_mallopt_is_not_reported_as_applied(
    monkeypatch: pytest.MonkeyPatch, answer: int
) -> None:
    _on_glibc(monkeypatch, FakeLibc(answer=answer))
    assert allocator._set_thresholds() is False


@pytest.mark.skipif(platform.libc_ver()[0] != allocator.GLIBC, reason="glibc's mallopt only")
def test_this_glibc_accepts_the_thresholds() -> None:
    """The real mallopt, in a fresh process: both values are within what glibc accepts."""
    env = {k: v for k, v in os.environ.items()
           if k not in (allocator.PRELOAD_VARIABLE, allocator.TUNABLES_VARIABLE,
                        *allocator.USER_SETTINGS)}
    code = "from fmnist.allocator import keep_freed_memory; print(keep_freed_memory())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True, env=env)
    assert proc.stdout.strip() == "True"

"""Keep freed activation memory in the process instead of handing it back to the kernel.

A training step allocates and frees the same few-MB activation tensors every batch. glibc's
malloc serves blocks that large with fresh `mmap`s (and trims its heap top) by default, so each
step page-faults its activations in again: about 18,000 minor faults per batch of 128 on a
2-core Zen 3, a third of the step's time. Pinning glibc's mmap and trim thresholds makes the
freed blocks reusable: the same weights, bit for bit, about 1.4x the images per second there
(bench/results: `allocator` in the time-to-accuracy runs). Off glibc (macOS, musl), under a
preloaded allocator or with glibc's malloc settings in the environment, nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MALLOPT_OK = 1
# glibc's largest accepted mmap threshold on 64-bit (HEAP_MAX_SIZE / 2): blocks up to 32 MiB
# (a batch of 128 at 28x28x16 in float32 is 6.4 MB) come from the reusable heap.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
# Never give the heap's free top back: a training process's peak is reached again next batch.
TRIM_THRESHOLD_BYTES = 2**31 - 1
GLIBC = "glibc"
# Someone chose the allocator already: a preloaded one (tcmalloc, jemalloc: glibc's thresholds
# would not apply, or its mallopt is a stub) or glibc's own settings from the environment.
PRELOAD_VARIABLE = "LD_PRELOAD"
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
TUNABLES_VARIABLE, TUNABLES_PREFIX = "GLIBC_TUNABLES", "glibc.malloc."

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds once per process (the train stage, each DDP rank and tune
    worker calls it through `fit`); True where they are in effect."""
    global _applied
    if _applied is None:
        _applied = _set_thresholds()
    return _applied


def applied() -> bool:
    """Whether keep_freed_memory() changed this process's malloc (no side effect)."""
    return bool(_applied)


# How a timed run's malloc ran, as run.json and the benchmarks record it: with the thresholds
# pinned, or as the allocator in place behaves on its own (glibc's page-faulting default, or one
# the user chose).
KEPT, OWN = "kept", "default"


def label() -> str:
    return KEPT if applied() else OWN


def allocator_chosen_elsewhere() -> bool:
    if "malloc" in os.environ.get(PRELOAD_VARIABLE, ""):
        return True
    if any(os.environ.get(name) for name in USER_SETTINGS):
        return True
    return TUNABLES_PREFIX in os.environ.get(TUNABLES_VARIABLE, "")


def _set_thresholds() -> bool:
    if platform.libc_ver()[0] != GLIBC or allocator_chosen_elsewhere():
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # glibc's mallopt returns 1 on success and 0 on a rejected value; anything else is not
    # glibc's answer (a stub), so not a success either.
    return (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == MALLOPT_OK
            and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == MALLOPT_OK)

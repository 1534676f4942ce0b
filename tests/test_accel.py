"""Backend selection: native by default, IPEX only when asked and importable, devices checked."""

from __future__ import annotations

import importlib.abc
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from fmnist import accel
from fmnist.accel import (
    IPEX_DIST,
    autocast,
    backend_description,
    prepare_training,
    select_backend,
)
from fmnist.errors import FmnistError
from fmnist.model import build_model

CONFIG = {"channels": [4], "convs_per_block": 1, "batch_norm": True, "dropout": 0.0, "hidden": 8}
IPEX_WORKS = accel.ipex_status()[0] is not None


class ImportRecorder(importlib.abc.MetaPathFinder):
    """Records every attempt to import a module (it finds nothing itself)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        self.names.append(fullname)
        return None


@pytest.fixture
def imports() -> Iterator[ImportRecorder]:
    recorder = ImportRecorder()
    sys.meta_path.insert(0, recorder)
    accel.ipex_status.cache_clear()
    try:
        yield recorder
    finally:
        sys.meta_path.remove(recorder)
        accel.ipex_status.cache_clear()


def test_ipex_disabled_never_tries_to_import_ipex(imports: ImportRecorder) -> None:
    sys.modules.pop(IPEX_DIST, None)
    backend = select_backend({"enabled": False, "dtype": "bfloat16"})
    assert backend.name == "native" and backend.dtype == torch.bfloat16
    assert IPEX_DIST not in imports.names
    assert IPEX_DIST not in sys.modules
    assert accel.ipex_status.cache_info().misses == 0  # not even probed


@pytest.mark.skipif(IPEX_WORKS, reason="IPEX works here")
def test_ipex_auto_without_working_ipex_is_native() -> None:
    backend = select_backend({"enabled": "auto", "dtype": "float32"})
    assert backend.name == "native" and backend.ipex_version is None
    assert IPEX_DIST not in sys.modules


@pytest.mark.skipif(IPEX_WORKS, reason="IPEX works here")
def test_ipex_required_but_missing_is_one_line_error_with_install_hint() -> None:
    with pytest.raises(FmnistError, match="ipex-env.sh") as info:
        select_backend({"enabled": True, "dtype": "bfloat16"})
    message = str(info.value)
    assert "\n" not in message and IPEX_DIST in message


@pytest.mark.parametrize("device", ["cuda", "xpu"])
def test_absent_accelerator_asked_for_is_an_error(device: str) -> None:
    if getattr(torch, device).is_available():
        pytest.skip(f"{device} present")
    with pytest.raises(FmnistError, match=f"train.device: {device}"):
        select_backend({"enabled": False, "dtype": "float32"}, train_device=device)


def test_auto_device_without_accelerator_is_cpu() -> None:
    if torch.cuda.is_available() or torch.xpu.is_available():
        pytest.skip("accelerator present")
    assert select_backend({"enabled": False, "dtype": "float32"}, "auto").device.type == "cpu"


def test_major_minor_reads_local_versions() -> None:
    assert accel._major_minor("2.8.0+cpu") == (2, 8)
    assert accel._major_minor("2.13.0") == (2, 13)
    assert accel._major_minor("2.8.10.post2") == (2, 8)


def test_backend_description_names_backend_dtype_device_and_cpu() -> None:
    described = backend_description(
        select_backend({"enabled": False, "dtype": "bfloat16"}, "cpu", True)
    )
    assert described["backend"] == "native" and described["dtype"] == "bfloat16"
    assert described["compiled"] is True and described["device"] == "cpu"
    assert described["ipex_version"] == "none"
    assert described["cpu_class"] == accel.cpu_class()
    assert described["cpu_bf16_native"] is accel.cpu_bf16_native()
    assert described["torch_version"] == torch.__version__


def test_auto_dtype_is_bf16_exactly_where_this_cpu_computes_it_natively() -> None:
    backend = select_backend({"enabled": False, "dtype": "auto"})
    assert backend.bf16 == accel.cpu_bf16_native()
    flags = accel._cpu_flags()
    native_flags = {"avx512_bf16", "amx_bf16", "avx_ne_convert"}
    if platform.machine() == "x86_64" and flags and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert accel.cpu_bf16_native() == bool(native_flags & flags)
    if not accel.cpu_bf16_native():
        assert accel.cpu_class() == torch.backends.cpu.get_cpu_capability()
    elif "amx_bf16" in flags:
        assert accel.cpu_class() == "AMX"
    elif "avx512_bf16" in flags:
        assert accel.cpu_class() == "AVX512_BF16"


AVX2_PROBE = """
import json, sys
from fmnist import accel
from fmnist.errors import FmnistError
cpu = accel.resolve_device("cpu")
out = {"class": accel.cpu_class(), "native": accel.cpu_bf16_native(),
       "auto": str(accel.resolve_dtype("auto", cpu)),
       "explicit": str(accel.resolve_dtype("bfloat16", cpu))}
try:
    accel.resolve_dtype("bfloat16", cpu, ipex=True)
except FmnistError as exc:
    out["ipex_error"] = str(exc)
print(json.dumps(out))
"""


def test_an_avx2_only_cpu_gets_float32_and_a_warning_for_explicit_bf16() -> None:
    # ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN (and so this machine) an AVX2-only CPU.
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    proc = subprocess.run([sys.executable, "-c", AVX2_PROBE], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    out = json.loads(proc.stdout)
    assert out["class"] == "AVX2" and out["native"] is False
    assert out["auto"] == "torch.float32" and out["explicit"] == "torch.bfloat16"
    warning = proc.stderr.strip().splitlines()
    assert len(warning) == 1 and "emulated" in warning[0] and "AVX2" in warning[0]
    assert "\n" not in out["ipex_error"] and "ipex.dtype" in out["ipex_error"]


def test_float32_and_native_bf16_say_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    cpu = torch.device("cpu")
    assert accel.resolve_dtype("float32", cpu) == torch.float32
    if accel.cpu_bf16_native():
        assert accel.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert capsys.readouterr().err == ""


def test_autocast_is_bf16_only_for_bfloat16() -> None:
    a, b = torch.rand(4, 4), torch.rand(4, 4)
    with autocast(select_backend({"enabled": False, "dtype": "bfloat16"})):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(select_backend({"enabled": False, "dtype": "float32"})):
        assert (a @ b).dtype == torch.float32


def test_native_prepare_training_keeps_the_optimizers_parameters() -> None:
    model = build_model(CONFIG)
    before = list(model.parameters())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    prepared, optimizer = prepare_training(
        model, sgd, select_backend({"enabled": False, "dtype": "float32"})
    )
    assert optimizer is sgd
    assert all(p is q for p, q in zip(prepared.parameters(), before, strict=True))
    assert prepared.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.dtype == torch.float32 for p in prepared.parameters())


def test_ipex_is_never_given_an_optimizer_wrapper() -> None:
    model = build_model(CONFIG)

    class Wrapped(torch.optim.SGD):
        pass

    with pytest.raises(TypeError, match="plain torch.optim.SGD"):
        accel.ipex_optimize_training(model, Wrapped(model.parameters(), lr=0.1), torch.float32)


@pytest.mark.ipex
@pytest.mark.skipif(not IPEX_WORKS, reason="needs a working intel_extension_for_pytorch")
@pytest.mark.skipif(not accel.cpu_bf16_native(), reason="IPEX bf16 needs native bf16")
def test_ipex_backend_prepares_plain_sgd_and_keeps_fp32_weights() -> None:
    from fmnist.sam import SAM

    backend = select_backend({"enabled": True, "dtype": "bfloat16"})
    assert backend.name == "ipex" and backend.ipex_version
    torch.manual_seed(0)
    model = build_model(CONFIG)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, sgd = prepare_training(model, sgd, backend)
    sam = SAM(model.parameters(), sgd, rho=0.05)
    x, y = torch.rand(8, 1, 28, 28) * 255, torch.randint(0, 10, (8,))
    for step in (sam.first_step, sam.second_step):
        with autocast(backend):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        step(zero_grad=True)
    state = model.state_dict().values()
    assert all(v.dtype == torch.float32 for v in state if v.is_floating_point())

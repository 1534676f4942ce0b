"""The .pt2 model file (torch.export): written without pickles, opened only after a check.

`torch.export.load` runs what a tampered archive holds, in three places:
- pickles: the example inputs (`data/sample_inputs/model.pt`, a torch.save zip: torch
  retries with weights_only=False when the safe load fails), tensor subclasses (`use_pickle`
  payloads), custom objects (`custom_obj_*`, `opaque_obj_*`) and legacy `.pt` weights;
- shape formulas: every `expr_str` of the program's JSON goes through sympy.sympify (eval);
- guards: `guards_code` lines are exec'd as Python (on the first call of `.module()`'s
  result, when the archive has example inputs).

So the export drops the example inputs before saving (the archive then has no pickled
member at all), and every archive, written or read, must hold only what that export writes:
the fixed metadata, the program and payload configs as JSON, raw tensor payloads (bytes torch
reads with frombuffer, never unpickles), an empty sample-inputs member, shape formulas built
from sympy constructors and literals, and no guards code. Anything else is refused in one line
before torch sees the file; the bytes checked are the bytes torch loads, read once.

The program computes logits only; what a user of the file needs beside them (the class names,
the model config with the temperature evaluate fitted) travels as one JSON extra file,
`extra/fmnist.json`, which only fmnist reads.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export.pt2_archive import constants as layout

from fmnist import signals
from fmnist.constants import MAX_TEMPERATURE, MIN_TEMPERATURE
from fmnist.errors import FmnistError, first_line
from fmnist.model import TEMPERATURE

MODEL = "model"  # torch.export.save names its one program "model"
PROGRAM = layout.MODELS_FILENAME_FORMAT.format(MODEL)
SAMPLE_INPUTS = layout.SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL)
# payload config -> the folder and file-name prefix of its raw tensors
PAYLOADS = {
    layout.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL): (
        layout.WEIGHTS_DIR,
        layout.WEIGHT_FILENAME_PREFIX,
    ),
    layout.CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL): (
        layout.CONSTANTS_DIR,
        layout.TENSOR_CONSTANT_FILENAME_PREFIX,
    ),
}
# written by torch's zip writer; read as text or not at all
METADATA = frozenset({
    layout.ARCHIVE_FORMAT_PATH,
    layout.ARCHIVE_VERSION_PATH,
    "byteorder",
    ".data/version",
    ".data/serialization_id",
})
# torch.export's extra file with the class names and model config (JSON, never executed)
CONFIG_FILE = "fmnist.json"
CONFIG = layout.EXTRA_DIR + CONFIG_FILE
MAX_CONFIG_BYTES = 64 * 1024  # the export writes about 300 bytes
EXPECTED = METADATA | {PROGRAM, SAMPLE_INPUTS, CONFIG, *PAYLOADS}
# what sympy.srepr writes for the shapes of a model with a dynamic batch; no Pow (9**9**9)
FORMULA_FUNCTIONS = frozenset({
    "Symbol", "Integer", "Add", "Mul", "Max", "Min", "FloorDiv", "CleanDiv", "Mod", "PythonMod",
})
FORMULA_NODES = (ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword,
                 ast.UnaryOp, ast.USub)
MAX_FORMULA_CHARS = 1000
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
PICKLE_PROTOCOLS = frozenset({2, 3, 4, 5})  # 0 and 1 have no header: the layout check finds them


class ProgramModel(nn.Module):
    """A loaded .pt2 program as a model like the others: raw pixels (B, 1, 28, 28) -> logits.

    torch.export's module refuses train() and eval(); the program was traced in eval mode
    (dropout off, batch-norm statistics frozen), so eval is what it always is.
    """

    def __init__(self, program: nn.Module, config: dict[str, Any] | None = None,
                 temperature: float = 1.0) -> None:
        super().__init__()
        self.program = program
        self.training = False
        # `config` is the archive's fmnist.json ({} for an archive written without one)
        self.config = config or {}
        self.temperature = temperature

    def train(self, mode: bool = True) -> ProgramModel:
        if mode:
            raise NotImplementedError("a .pt2 program is inference-only (traced in eval mode)")
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def program_bytes(
    program: torch.export.ExportedProgram, source: str | Path, config: dict[str, Any] | None = None
) -> bytes:
    """The archive of `program` with `config` as its fmnist.json, checked; its example inputs
    are dropped (torch pickles them).

    Saved through a buffer: a path would put the file name into the archive (its root
    folder), and the same model would not give the same bytes.
    """
    program.example_inputs = None
    buffer = io.BytesIO()
    extra = None
    if config is not None:
        extra = {CONFIG_FILE: json.dumps(config, sort_keys=True, allow_nan=False)}
    torch.export.save(program, buffer, extra_files=extra)
    data = buffer.getvalue()
    shipped_temperature(check_archive(data, source), source)  # what load_program would refuse
    return data


def load_program(path: str | Path, *, map_location: str | torch.device = "cpu") -> ProgramModel:
    """The program of a .pt2 file, opened with torch.export.load only after check_archive."""
    path = Path(path)
    if path.exists() and not (path.is_file() or path.is_dir()):  # a FIFO would hang the read
        raise FmnistError(f"model file {path}: not a regular file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FmnistError(f"model file {path}: not found") from None
    except IsADirectoryError:
        raise FmnistError(f"model file {path}: is a directory") from None
    except OSError as exc:
        raise FmnistError(f"model file {path}: cannot read: {exc.strerror or exc}") from None
    config = check_archive(data, path)
    temperature = shipped_temperature(config, path)
    try:
        # Loading runs Python from inside torch's C++ code, where an interrupt raised mid-way
        # aborts the process: a signal waits for the load to end.
        with signals.deferred():
            program = torch.export.load(io.BytesIO(data))
            if torch.device(map_location).type != "cpu":
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, map_location)
            module = program.module()
    except Exception as exc:  # torch raises many types; the file passed the layout check
        problem = first_line(exc)
        raise FmnistError(f"model file {path}: cannot load the program: {problem}") from None
    return ProgramModel(module, config, temperature)


def shipped_temperature(config: dict[str, Any], source: str | Path) -> float:
    """The temperature in the archive's model config (1.0 where none was fitted, or where the
    archive has no fmnist.json), within the bounds evaluate fits it in."""
    model_config = config.get("model_config", {})
    if not isinstance(model_config, dict):
        raise FmnistError(f"model file {source}: {CONFIG}: model_config is not a JSON object")
    value = model_config.get(TEMPERATURE, 1.0)
    # the chained comparison is exact for huge integers and false for NaN
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        MIN_TEMPERATURE <= value <= MAX_TEMPERATURE
    ):
        raise FmnistError(
            f"model file {source}: {CONFIG} has no usable temperature "
            f"({_shown(repr(value)[:40])}; expected a number in [{MIN_TEMPERATURE}, "
            f"{MAX_TEMPERATURE}]), refused"
        )
    return float(value)


def check_archive(data: bytes, source: str | Path) -> dict[str, Any]:
    """FmnistError (one line) unless `data` holds only what fmnist's export writes, no pickles.
    Returns the archive's fmnist.json ({} when it has none)."""
    members = _members(data, source)
    raw = _raw_payloads(members, source)
    if members.get(SAMPLE_INPUTS):
        raise _pickled(source, SAMPLE_INPUTS)
    for name, blob in members.items():
        if name not in raw and _looks_pickled(blob):
            raise _pickled(source, name)
    unexpected = sorted(set(members) - EXPECTED - raw)
    if unexpected:
        name = _shown(unexpected[0])
        raise FmnistError(f"model file {source}: unexpected member {name}, refused")
    if PROGRAM not in members:
        raise FmnistError(f"model file {source}: not a torch.export program (no {PROGRAM})")
    _check_program(members[PROGRAM], source)
    if CONFIG not in members:
        return {}
    if len(members[CONFIG]) > MAX_CONFIG_BYTES:
        raise FmnistError(f"model file {source}: {CONFIG} is over {MAX_CONFIG_BYTES:,} bytes, "
                          "refused")
    return _json(members[CONFIG], CONFIG, source)


def _members(data: bytes, source: str | Path) -> dict[str, bytes]:
    """Member name (below the archive's root folder) -> bytes; one root, no twins, stored only.

    Duplicate names and members outside the root would let this check and torch's own zip
    reader see different files; so would bytes before the first member or after the end
    record (Python's zipfile shifts every offset past prepended bytes, torch's reader need not).
    Compression is refused because torch never writes it (and a zip bomb needs it).
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
        end = zipfile._EndRecData(io.BytesIO(data))  # the end record as stored (zip64 resolved)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError):
        raise FmnistError(f"model file {source}: not a zip archive (torch.export .pt2)") from None
    if (end is None or not data.startswith(b"PK\x03\x04")
            or end[zipfile._ECD_LOCATION] != len(data) - zipfile.sizeEndCentDir
            or archive.start_dir != end[zipfile._ECD_OFFSET]):
        raise FmnistError(f"model file {source}: bytes before its first member or after its end "
                          "record, refused")
    if not infos or "/" not in infos[0].filename:
        raise FmnistError(f"model file {source}: not a torch.export archive (no root folder)")
    root = infos[0].filename.split("/", 1)[0] + "/"
    members: dict[str, bytes] = {}
    for info in infos:
        name, shown = info.filename, _shown(info.filename)
        if not name.startswith(root) or name == root:
            raise FmnistError(f"model file {source}: member {shown} is outside {_shown(root)}")
        if name[len(root) :] in members:
            raise FmnistError(f"model file {source}: member {shown} appears twice, refused")
        if info.compress_type != zipfile.ZIP_STORED:
            raise FmnistError(f"model file {source}: member {shown} is compressed, refused")
        try:
            members[name[len(root) :]] = archive.read(info)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise FmnistError(f"model file {source}: member {shown}: {first_line(exc)}") from None
    return members


def _raw_payloads(members: dict[str, bytes], source: str | Path) -> set[str]:
    """The members the payload configs name as raw tensors; a pickled entry is refused."""
    raw: set[str] = set()
    for config_name, (folder, prefix) in PAYLOADS.items():
        if config_name not in members:
            continue
        config = _json(members[config_name], config_name, source).get("config")
        if not isinstance(config, dict):
            raise FmnistError(f"model file {source}: {config_name} has no 'config' mapping")
        for entry in config.values():
            file_name = entry.get("path_name") if isinstance(entry, dict) else None
            if not isinstance(file_name, str) or not NAME.fullmatch(file_name):
                raise FmnistError(f"model file {source}: {config_name} names no usable file")
            if entry.get("use_pickle") is not False or not file_name.startswith(prefix):
                raise _pickled(source, folder + file_name)
            raw.add(folder + file_name)
    return raw


def _check_program(blob: bytes, source: str | Path) -> None:
    """No guards code, and every shape formula one that sympify can evaluate harmlessly."""
    program = _json(blob, PROGRAM, source)
    if program.get("guards_code", []) != []:
        raise FmnistError(f"model file {source}: {PROGRAM} holds guards code (Python), refused")
    pending: list[Any] = [program]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if "expr_str" in item and not _plain_formula(item["expr_str"]):
                raise FmnistError(
                    f"model file {source}: {PROGRAM} holds a shape formula that is not plain "
                    f"sympy ({_shown(str(item['expr_str'])[:60])}), refused"
                )
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


def _plain_formula(text: Any) -> bool:
    """Whether `text` is a formula as sympy.srepr writes it: known constructors and literals."""
    if not isinstance(text, str) or len(text) > MAX_FORMULA_CHARS:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    for node in ast.walk(tree):
        if not isinstance(node, FORMULA_NODES):
            return False
        if isinstance(node, ast.Call) and not isinstance(node.func, ast.Name):
            return False
        if isinstance(node, ast.Name) and node.id not in FORMULA_FUNCTIONS:
            return False
        if isinstance(node, ast.keyword) and (node.arg is None or not NAME.fullmatch(node.arg)):
            return False
        if isinstance(node, ast.Constant) and not (
            type(node.value) in (int, bool)
            or (isinstance(node.value, str) and NAME.fullmatch(node.value))
        ):
            return False
    return True


def _looks_pickled(blob: bytes) -> bool:
    """A pickle with a protocol header, or a torch.save zip (its objects are in data.pkl)."""
    if len(blob) >= 2 and blob[0] == 0x80 and blob[1] in PICKLE_PROTOCOLS:
        return True
    if not blob.startswith(b"PK\x03\x04"):
        return False
    try:
        return any(n.endswith(".pkl") for n in zipfile.ZipFile(io.BytesIO(blob)).namelist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError):
        return True  # a broken zip where a torch.save would be: refuse it as one


def _json(blob: bytes, name: str, source: str | Path) -> dict[str, Any]:
    """A JSON object in UTF-8 (what torch decodes; json.loads alone would take UTF-16 too)."""
    try:
        value = json.loads(blob.decode("utf-8"))
    except (ValueError, RecursionError):
        raise FmnistError(f"model file {source}: {name} is not valid JSON") from None
    if not isinstance(value, dict):
        raise FmnistError(f"model file {source}: {name} is not a JSON object")
    return value


def _pickled(source: str | Path, member: str) -> FmnistError:
    return FmnistError(f"model file {source}: holds pickled objects ({member}) and was refused")


def _shown(text: str) -> str:
    """`text` from the file with control characters escaped: one line, no terminal codes."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)

"""The IDX format of (Fashion-)MNIST, read and written directly (no torchvision).

Header: two zero bytes, a type code, the number of dimensions, then one big-endian uint32 per
dimension; the data follows with no padding. Anything else is a one-line FmnistError.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from fmnist.errors import FmnistError

# Type codes of the IDX spec -> big-endian numpy dtypes.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dtype.newbyteorder(">") if dtype.itemsize > 1 else dtype: code
          for code, dtype in IDX_DTYPES.items()}
MAX_ELEMENTS = 1 << 31  # no real IDX file is larger; a corrupt header must not allocate terabytes


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FmnistError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise FmnistError(f"{path}: truncated gzip stream") from None
    except (OSError, zlib.error) as exc:
        raise FmnistError(f"{path}: corrupt gzip data ({exc})") from None


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode one IDX payload; validates magic, type, dimensions and exact length."""
    if len(data) < 4:
        raise FmnistError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise FmnistError(f"{name}: bad IDX magic {data[:4].hex()} (expected 0000xxyy)")
    if code not in IDX_DTYPES:
        raise FmnistError(f"{name}: unknown IDX type code 0x{code:02x}")
    if ndim == 0:
        raise FmnistError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise FmnistError(f"{name}: truncated IDX header ({len(data)} of {header} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = math.prod(shape)  # Python ints: np.prod would wrap 65536**4 round to 0
    # numpy also refuses (0, 2**31, 2**31): bound the non-zero dimensions too.
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise FmnistError(f"{name}: IDX header declares an implausible shape {shape}")
    dtype = IDX_DTYPES[code]
    expected = header + count * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes after the data"
        raise FmnistError(
            f"{name}: {what}: {len(data)} bytes, header {shape} needs {expected}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header, count=count).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file, gzip-compressed or not."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def encode_idx(array: np.ndarray) -> bytes:
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in _CODES:
        raise FmnistError(f"IDX cannot store dtype {array.dtype}")
    if not 1 <= array.ndim <= 255 or max(array.shape) >= 1 << 32:
        raise FmnistError(f"IDX cannot store shape {array.shape}")
    header = struct.pack(">HBB", 0, _CODES[dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write `array` as IDX; gzip when the name ends in .gz (or when `compress` says so)."""
    path = Path(path)
    data = encode_idx(array)
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)

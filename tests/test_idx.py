"""IDX files: what we write reads back; anything malformed is a one-line FmnistError naming it."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmnist.errors import FmnistError
from fmnist.idx import encode_idx, parse_idx, read_idx, write_idx

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _header(code: int, shape: tuple[int, ...], magic: int = 0) -> bytes:
    return struct.pack(">HBB", magic, code, len(shape)) + struct.pack(f">{len(shape)}I", *shape)


def _assert_names_file(exc: pytest.ExceptionInfo[FmnistError], path: Path) -> None:
    message = str(exc.value)
    assert str(path) in message
    assert "\n" not in message


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_uint8_images_round_trip(tmp_path: Path, suffix: str) -> None:
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    path = tmp_path / f"images-idx3-ubyte{suffix}"
    write_idx(path, images)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(path)
    assert back.dtype == np.uint8 and back.shape == (7, 28, 28)
    np.testing.assert_array_equal(back, images)


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_int32_vector_round_trip_is_big_endian_on_disk(tmp_path: Path, suffix: str) -> None:
    values = np.array([0, 1, -2, 2**31 - 1, -(2**31)], dtype=np.int32)
    path = tmp_path / f"values{suffix}"
    write_idx(path, values)
    raw = read_idx(path)
    assert raw.dtype == np.int32 and raw.dtype.isnative
    np.testing.assert_array_equal(raw, values)
    data = gzip.decompress(path.read_bytes()) if suffix else path.read_bytes()
    assert data[:8] == _header(0x0C, (5,))
    assert data[8:12] == b"\x00\x00\x00\x00" and data[12:16] == b"\x00\x00\x00\x01"


def test_written_gzip_is_reproducible(tmp_path: Path) -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "a.gz", images)
    write_idx(tmp_path / "b.gz", images)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


def test_unsupported_dtype_and_zero_dims_cannot_be_written() -> None:
    with pytest.raises(FmnistError, match="int64"):
        encode_idx(np.zeros(3, dtype=np.int64))
    with pytest.raises(FmnistError):
        encode_idx(np.array(5, dtype=np.uint8))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (_header(0x08, (2,), magic=0x0801) + b"\x00\x00", "magic"),
        (_header(0x07, (2,)) + b"\x00\x00", "type code 0x07"),
        (struct.pack(">HBB", 0, 0x08, 0), "0 dimensions"),
        (b"\x00\x00", "too short"),
        (_header(0x08, (2, 3, 4))[:10], "truncated IDX header"),
        (_header(0x08, (2, 3)) + b"\x00" * 5, "truncated"),
        (_header(0x08, (2, 3)) + b"\x00" * 7, "trailing bytes"),
        (_header(0x0C, (2,)) + b"\x00" * 7, "truncated"),
    ],
    ids=["bad-magic", "type-code", "zero-dims", "short", "header", "data", "trailing", "int32"],
)
@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gz"])
def test_malformed_file_is_one_line_error_naming_it(
    tmp_path: Path, data: bytes, why: str, compressed: bool
) -> None:
    path = tmp_path / "bad-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(data) if compressed else data)
    with pytest.raises(FmnistError, match=why) as exc:
        read_idx(path)
    _assert_names_file(exc, path)


def test_truncated_gzip_stream_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cut.gz"
    data = gzip.compress(encode_idx(np.zeros((20, 28, 28), dtype=np.uint8)))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FmnistError, match="truncated gzip stream") as exc:
        read_idx(path)
    _assert_names_file(exc, path)


def test_corrupt_gzip_is_named(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.gz"
    data = bytearray(gzip.compress(np.random.default_rng(0).bytes(5000)))
    data[20:60] = b"\xff" * 40
    path.write_bytes(bytes(data))
    with pytest.raises(FmnistError, match="gzip") as exc:
        read_idx(path)
    _assert_names_file(exc, path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.gz"
    with pytest.raises(FmnistError, match="cannot read") as exc:
        read_idx(path)
    _assert_names_file(exc, path)


def test_overflowing_shape_is_an_error_not_a_crash() -> None:
    # 65536**4 == 2**64 wraps to 0 in int64 arithmetic: a header with no data would "match".
    with pytest.raises(FmnistError, match="implausible"):
        parse_idx(_header(0x08, (65536, 65536, 65536, 65536)), "huge")


def _only_array_or_error(data: bytes, name: str = "fuzz") -> None:
    try:
        result = parse_idx(data, name)
    except FmnistError as exc:
        assert name in str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(result, np.ndarray)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_give_array_or_error(data: bytes) -> None:
    _only_array_or_error(data)


@FUZZ
@given(st.binary(max_size=300))
def test_random_gzip_files_give_array_or_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.gz"
    for blob in (gzip.compress(data), b"\x1f\x8b" + data, gzip.compress(data)[: len(data) // 2]):
        path.write_bytes(blob)
        try:
            result = read_idx(path)
        except FmnistError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
        else:
            assert isinstance(result, np.ndarray)


@FUZZ
@given(
    magic=st.sampled_from([0, 0, 0, 1, 0x0800]),
    code=st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0x0A, 0xFF]),
    shape=st.lists(
        st.one_of(st.integers(0, 5), st.sampled_from([65536, 2**31, 2**32 - 1])),
        max_size=6,
    ),
    payload=st.binary(max_size=200),
)
def test_random_headers_with_payloads_give_array_or_error(
    magic: int, code: int, shape: list[int], payload: bytes
) -> None:
    _only_array_or_error(_header(code, tuple(shape), magic) + payload)


@settings(max_examples=100, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    dtype=st.sampled_from(["u1", "i1", "<i2", ">i4", "<f4", ">f8"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_supported_array_round_trips(shape: list[int], dtype: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    array = rng.integers(-100, 100, size=shape).astype(dtype)
    back = parse_idx(encode_idx(array))
    assert back.shape == array.shape and back.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(back, array)

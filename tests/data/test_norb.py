"""NORB binary-matrix reader/writer: files written byte by byte in the real format, and errors naming the file."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from capsnets.data import read_norb, write_norb
from capsnets.data.norb import iter_norb, read_norb_header
from capsnets.errors import DataError

MAGIC = {  # the format's type codes (REFERENCES.md, Sec. 3)
    torch.uint8: 0x1E3D4C55,
    torch.int32: 0x1E3D4C54,
    torch.float32: 0x1E3D4C51,
    torch.float64: 0x1E3D4C53,
    torch.int16: 0x1E3D4C56,
}
NUMPY = {torch.uint8: "u1", torch.int32: "<i4", torch.float32: "<f4", torch.float64: "<f8", torch.int16: "<i2"}


def norb_bytes(values: np.ndarray, magic: int, dims: list[int] | None = None, ndim: int | None = None) -> bytes:
    """A NORB matrix built by hand (independently of write_norb): magic, ndim, max(3, ndim) dims, data."""
    ndim = values.ndim if ndim is None else ndim
    dims = dims if dims is not None else list(values.shape) + [1] * (3 - values.ndim)
    return struct.pack(f"<2i{len(dims)}i", magic, ndim, *dims) + values.tobytes()


def put(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


@pytest.mark.parametrize("name", ["m.mat", "m.mat.gz"])
@pytest.mark.parametrize("dtype", list(MAGIC))
@pytest.mark.parametrize("shape", [(7,), (7, 4), (3, 2, 5, 5)])
def test_reads_hand_written_files(tmp_path: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    values = (np.arange(np.prod(shape)) % 97 - (0 if dtype == torch.uint8 else 40)).reshape(shape)
    array = values.astype(NUMPY[dtype])
    path = put(tmp_path / name, norb_bytes(array, MAGIC[dtype]))
    out = read_norb(path)
    assert out.dtype == dtype and tuple(out.shape) == shape  # padding dims of ndim < 3 dropped
    assert np.array_equal(out.numpy(), array)
    assert read_norb_header(path) == (dtype, shape)


def test_smallnorb_like_headers(tmp_path: Path) -> None:
    """cat: ndim 1 stored as [N, 1, 1]; info: ndim 2 stored as [N, 4, 1]; dat: ndim 4, four dims."""
    cat = write_norb(tmp_path / "cat.mat", torch.tensor([0, 4, 2], dtype=torch.int32))
    info = write_norb(tmp_path / "info.mat", torch.zeros(3, 4, dtype=torch.int32))
    dat = write_norb(tmp_path / "dat.mat.gz", torch.zeros(3, 2, 96, 96, dtype=torch.uint8))
    assert struct.unpack("<5i", cat.read_bytes()[:20]) == (0x1E3D4C54, 1, 3, 1, 1)
    assert struct.unpack("<5i", info.read_bytes()[:20]) == (0x1E3D4C54, 2, 3, 4, 1)
    assert struct.unpack("<6i", gzip.decompress(dat.read_bytes())[:24]) == (0x1E3D4C55, 4, 3, 2, 96, 96)
    assert read_norb(cat).tolist() == [0, 4, 2] and read_norb(info).shape == (3, 4)
    assert read_norb(dat).shape == (3, 2, 96, 96)


@pytest.mark.parametrize("dtype", list(MAGIC))
@pytest.mark.parametrize("gz", [False, True])
def test_round_trip(tmp_path: Path, dtype: torch.dtype, gz: bool) -> None:
    x = (torch.rand(5, 3, 2) * 200 - (0 if dtype == torch.uint8 else 100)).to(dtype)
    path = write_norb(tmp_path / ("x.mat.gz" if gz else "x.mat"), x)
    assert path.read_bytes().startswith(b"\x1f\x8b") == gz
    assert torch.equal(read_norb(path), x)


def test_zero_dim_and_empty(tmp_path: Path) -> None:
    assert read_norb(write_norb(tmp_path / "s.mat", np.float32(2.5))).item() == 2.5
    assert read_norb(write_norb(tmp_path / "e.mat", torch.zeros(0, 4, dtype=torch.int32))).shape == (0, 4)


def test_iter_norb_chunks(tmp_path: Path) -> None:
    x = torch.randint(0, 256, (10, 2, 4, 4), dtype=torch.uint8)
    chunks = list(iter_norb(write_norb(tmp_path / "x.mat.gz", x), chunk_rows=4))
    assert [c.shape[0] for c in chunks] == [4, 4, 2] and torch.equal(torch.cat(chunks), x)


def test_gz_written_deterministically(tmp_path: Path) -> None:
    x = torch.arange(50, dtype=torch.int32)
    first, second = write_norb(tmp_path / "a" / "x.mat.gz", x), write_norb(tmp_path / "b" / "x.mat.gz", x)
    assert first.read_bytes() == second.read_bytes()


def test_write_rejects_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int64"):
        write_norb(tmp_path / "x.mat", torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("name", ["dat.mat", "dat.mat.gz"])
def test_truncated_data(tmp_path: Path, name: str) -> None:
    payload = norb_bytes(np.zeros((5, 2, 8, 8), dtype="u1"), MAGIC[torch.uint8])[:-10]
    path = put(tmp_path / name, payload)
    with pytest.raises(DataError, match="truncated") as info:
        read_norb(path)
    assert str(path) in str(info.value) and "640" in str(info.value) and "630" in str(info.value)


def test_truncated_header(tmp_path: Path) -> None:
    path = put(tmp_path / "h.mat", struct.pack("<3i", MAGIC[torch.int32], 2, 5))  # dims cut short
    with pytest.raises(DataError, match="truncated") as info:
        read_norb(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    path = tmp_path / "c.mat.gz"
    path.write_bytes(gzip.compress(norb_bytes(np.arange(1000, dtype="<i4"), MAGIC[torch.int32]))[:-30])
    with pytest.raises(DataError, match="gzip") as info:
        read_norb(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["bad.mat", "bad.mat.gz"])
def test_wrong_magic(tmp_path: Path, name: str) -> None:
    path = put(tmp_path / name, norb_bytes(np.zeros(4, dtype="u1"), 0x00000803))  # an IDX-like magic
    with pytest.raises(DataError, match="magic") as info:
        read_norb(path)
    assert str(path) in str(info.value) and "0x1E3D4C55" in str(info.value)


def test_longer_than_header(tmp_path: Path) -> None:
    path = put(tmp_path / "long.mat", norb_bytes(np.zeros(4, dtype="u1"), MAGIC[torch.uint8]) + b"\x00")
    with pytest.raises(DataError, match="longer") as info:
        read_norb(path)
    assert str(path) in str(info.value)


def test_bad_dims(tmp_path: Path) -> None:
    path = put(tmp_path / "dims.mat", norb_bytes(np.zeros(4, dtype="u1"), MAGIC[torch.uint8], dims=[4, 2, 1]))
    with pytest.raises(DataError, match="unused") as info:  # ndim 1 but a padding dim is not 1
        read_norb(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_norb(tmp_path / "nope.mat")

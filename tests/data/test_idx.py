"""IDX reader/writer: round trips, and errors that name the file."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from capsnets.data import read_idx, write_idx
from capsnets.errors import DataError


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_round_trip_images(tmp_path: Path, name: str) -> None:
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    path = write_idx(tmp_path / name, images)
    raw = path.read_bytes()
    assert raw.startswith(b"\x1f\x8b") == name.endswith(".gz")
    header = (gzip.decompress(raw) if name.endswith(".gz") else raw)[:16]
    assert struct.unpack(">4i", header) == (2051, 7, 28, 28)  # big-endian magic, count, rows, cols
    out = read_idx(path, expected_ndim=3)
    assert out.dtype == torch.uint8 and torch.equal(out, images)


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip_labels_from_numpy(tmp_path: Path, gz: bool) -> None:
    labels = np.arange(13, dtype=np.int64) % 10  # integer arrays are accepted and stored as bytes
    path = write_idx(tmp_path / ("labels" + (".gz" if gz else "")), labels)
    assert struct.unpack(">2i", (gzip.decompress(path.read_bytes()) if gz else path.read_bytes())[:8]) == (2049, 13)
    assert read_idx(path, expected_ndim=1).tolist() == labels.tolist()


def test_gz_written_deterministically(tmp_path: Path) -> None:
    x = torch.arange(100, dtype=torch.uint8)
    assert write_idx(tmp_path / "a" / "x.gz", x).read_bytes() == write_idx(tmp_path / "b" / "x.gz", x).read_bytes()


def test_write_rejects_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_idx(tmp_path / "x", np.array([0, 300]))


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file(tmp_path: Path, gz: bool) -> None:
    path = write_idx(tmp_path / "imgs", torch.zeros(5, 28, 28, dtype=torch.uint8))
    payload = path.read_bytes()[:-100]
    if gz:
        path = tmp_path / "imgs.gz"
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value) and "3920" in str(info.value)  # expected bytes 5*28*28


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "imgs.gz", torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "bogus-idx3-ubyte"
    path.write_bytes(struct.pack(">4i", 0x1E3D4C55, 1, 2, 2) + bytes(4))  # a NORB magic, not IDX
    with pytest.raises(DataError, match="magic") as info:
        read_idx(path)
    assert str(path) in str(info.value) and "2051" in str(info.value)


def test_wrong_ndim_names_expected_magic(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels", torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(DataError, match="2051") as info:
        read_idx(path, expected_ndim=3)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nope")

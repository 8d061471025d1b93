"""Reader and writer for the IDX format of MNIST and Fashion-MNIST.

Layout (LeCun et al., http://yann.lecun.com/exdb/mnist/): a big-endian int32 magic
``0x0000TTNN`` (TT = element type, 0x08 for uint8; NN = number of dimensions), then NN
big-endian int32 sizes, then the elements in C order. MNIST images use magic 2051
(0x00000803: count, rows, cols) and labels magic 2049 (0x00000801: count). Files are often
gzipped; the reader detects gzip from its magic bytes, so the file name does not matter.
Every failure raises :class:`~capsnets.errors.DataError` naming the file, what was
expected and what was found.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsnets.errors import DataError

__all__ = ["IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "read_idx", "write_idx"]

IDX_UBYTE = 0x08  # element type code of unsigned bytes, the only type MNIST uses
IDX_LABELS_MAGIC = (IDX_UBYTE << 8) | 1  # 2049
IDX_IMAGES_MAGIC = (IDX_UBYTE << 8) | 3  # 2051
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """Return the decompressed content of ``path`` (plain or gzip)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise DataError(f"IDX file {path} does not exist.") from err
    except OSError as err:
        raise DataError(f"Cannot read IDX file {path}: {err}.") from err
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(
            f"IDX file {path} is a corrupt or truncated gzip archive ({err}); "
            f"expected a complete .gz file. Fix: download or copy the file again."
        ) from err


def read_idx(path: str | Path, *, expected_ndim: int | None = None) -> torch.Tensor:
    """Read an IDX file of unsigned bytes into a uint8 tensor shaped by its header.

    Args:
        path: plain or gzipped IDX file.
        expected_ndim: if given, the number of dimensions the header must declare
            (3 for images -> magic 2051, 1 for labels -> magic 2049).

    Returns:
        uint8 tensor, e.g. (N, rows, cols) for images or (N,) for labels.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"IDX file {path} is truncated: expected at least a 4-byte header, found {len(data)} bytes.")
    (magic,) = struct.unpack(">i", data[:4])
    dtype_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if magic >> 16 != 0 or dtype_code != IDX_UBYTE or ndim == 0:
        raise DataError(
            f"IDX file {path} has magic number {magic} (0x{magic & 0xFFFFFFFF:08X}); expected an unsigned-byte IDX "
            f"magic such as {IDX_IMAGES_MAGIC} (images) or {IDX_LABELS_MAGIC} (labels). Is it an MNIST-format file?"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        want = (IDX_UBYTE << 8) | expected_ndim
        raise DataError(
            f"IDX file {path} has {ndim} dimension(s) (magic {magic}); expected {expected_ndim} (magic {want}). "
            f"Are the images and labels files swapped?"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file {path} is truncated: expected a {header}-byte header, found {len(data)} bytes.")
    dims = struct.unpack(f">{ndim}i", data[4:header])
    if any(d < 0 for d in dims):
        raise DataError(f"IDX file {path} declares negative dimensions {dims}.")
    expected, found = math.prod(dims), len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise DataError(
            f"IDX file {path} is {what}: header dims {tuple(dims)} need {expected} data bytes, found {found}. "
            f"Fix: download or copy the file again."
        )
    array = np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(dims)
    return torch.from_numpy(array.copy())  # copy: own writable memory, not a view of `data`


def write_idx(path: str | Path, values: torch.Tensor | np.ndarray | Any) -> Path:
    """Write ``values`` (uint8, any ndim >= 1) as an IDX file; gzip it when ``path`` ends in ``.gz``.

    The gzip header carries no timestamp, so equal inputs give byte-identical files.
    """
    path = Path(path)
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"write_idx needs an array with 1..255 dimensions, got shape {array.shape}.")
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255 or not np.all(array == np.round(array))):
            raise ValueError(f"write_idx writes unsigned bytes; the {array.dtype} values are not all integers 0..255.")
        array = array.astype(np.uint8)
    header = struct.pack(f">i{array.ndim}i", (IDX_UBYTE << 8) | array.ndim, *array.shape)
    return write_payload(path, header + np.ascontiguousarray(array).tobytes(), compresslevel=9)


def write_payload(path: Path, payload: bytes, *, compresslevel: int) -> Path:
    """Write ``payload`` to ``path``, gzipped when it ends in .gz, reproducibly (no timestamp in the header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        buffer = io.BytesIO()
        with gzip.GzipFile(filename=path.stem, mode="wb", fileobj=buffer, compresslevel=compresslevel, mtime=0) as gz:
            gz.write(payload)
        payload = buffer.getvalue()
    path.write_bytes(payload)
    return path

"""Reader and writer for the NORB binary-matrix format (``.mat`` / ``.mat.gz``), and smallNORB's decoding.

Layout (LeCun, Huang & Bottou 2004, https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/), all
little-endian: an int32 magic giving the element type (0x1E3D4C55 uint8, 0x1E3D4C54 int32,
0x1E3D4C51 float32, 0x1E3D4C53 float64, 0x1E3D4C56 int16), an int32 ``ndim``, then
``max(3, ndim)`` int32 dims (those past ``ndim`` are 1 and are dropped here), then the
elements in C order. Gzip is detected from the magic bytes, not the name. Every failure
raises :class:`~capsnets.errors.DataError` naming the file, what was expected and what was
found. :func:`iter_norb` streams rows in chunks, so a 448 MB ``dat`` file is never decoded
to float at once.

smallNORB ships each part as ``dat`` uint8 (N, 2, 96, 96) stereo pairs, ``cat`` int32 (N,)
(stored with dims [N, 1, 1]) and ``info`` int32 (N, 4) = (instance, elevation index 0-8,
azimuth 0, 2, ..., 34 (x 10 degrees), lighting 0-5). :func:`preprocess_smallnorb` turns one
part into the tensors of Hinton, Sabour & Frosst (2018), "Experiments": 48x48, standardised per image.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from capsnets.data.idx import write_payload
from capsnets.errors import DataError

__all__ = [
    "INFO_LIMITS",
    "NORB_MAGIC",
    "iter_norb",
    "preprocess_smallnorb",
    "read_norb",
    "read_norb_header",
    "standardize_images",
    "write_norb",
]

NORB_MAGIC: dict[int, np.dtype] = {  # magic -> little-endian element type
    0x1E3D4C55: np.dtype("u1"),
    0x1E3D4C54: np.dtype("<i4"),
    0x1E3D4C51: np.dtype("<f4"),
    0x1E3D4C53: np.dtype("<f8"),
    0x1E3D4C56: np.dtype("<i2"),
}
_MAGIC_OF: dict[np.dtype, int] = {dtype.newbyteorder("<"): magic for magic, dtype in NORB_MAGIC.items()}
_GZIP_MAGIC = b"\x1f\x8b"
INFO_LIMITS = {"instance": 10, "elevation": 9, "azimuth": 35, "lighting": 6}  # smallNORB info columns: bounds
NUM_CATEGORIES = 5  # smallNORB categories: animal, human, airplane, truck, car
_MAX_NDIM = 64  # sanity bound: a corrupt header must not make us read gigabytes of "dims"


def _open(path: Path) -> IO[bytes]:
    """Open ``path`` for reading, transparently decompressing gzip (detected from its magic bytes)."""
    try:
        with path.open("rb") as probe:
            is_gzip = probe.read(2) == _GZIP_MAGIC
        return gzip.open(path, "rb") if is_gzip else path.open("rb")
    except FileNotFoundError as err:
        raise DataError(f"NORB file {path} does not exist.") from err
    except OSError as err:
        raise DataError(f"Cannot read NORB file {path}: {err}.") from err


def _corrupt(path: Path, err: BaseException) -> DataError:
    return DataError(
        f"NORB file {path} is a corrupt or truncated gzip archive ({err}); expected a complete file. "
        f"Fix: download or copy it again."
    )


def _read_exact(stream: IO[bytes], path: Path, n: int, what: str) -> bytes:
    try:
        data = stream.read(n)
    except (EOFError, OSError, zlib.error) as err:
        raise _corrupt(path, err) from err
    if len(data) < n:
        raise DataError(f"NORB file {path} is truncated: expected {n} bytes of {what}, found {len(data)}.")
    return data


def _parse_header(stream: IO[bytes], path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    magic, ndim = struct.unpack("<2i", _read_exact(stream, path, 8, "header (magic, ndim)"))
    if magic not in NORB_MAGIC:
        known = ", ".join(f"0x{m:08X} ({d.name})" for m, d in NORB_MAGIC.items())
        raise DataError(
            f"NORB file {path} has magic number 0x{magic & 0xFFFFFFFF:08X}; expected one of {known}. "
            f"Is it a NORB binary-matrix (.mat) file?"
        )
    if not 0 <= ndim <= _MAX_NDIM:
        raise DataError(f"NORB file {path} declares ndim={ndim}; expected 0..{_MAX_NDIM}. The header is corrupt.")
    stored = max(3, ndim)  # the format always stores at least 3 dims
    dims = struct.unpack(f"<{stored}i", _read_exact(stream, path, 4 * stored, f"{stored} dims"))
    if any(d < 0 for d in dims) or any(d != 1 for d in dims[ndim:]):
        raise DataError(f"NORB file {path} declares dims {list(dims)} for ndim={ndim}; expected sizes >= 0, unused 1.")
    return NORB_MAGIC[magic], tuple(dims[:ndim])


def read_norb_header(path: str | Path) -> tuple[torch.dtype, tuple[int, ...]]:
    """Return the element type and the ``ndim`` dims declared by a NORB file's header."""
    path = Path(path)
    with _open(path) as stream:
        dtype, shape = _parse_header(stream, path)
    return torch.from_numpy(np.empty(0, dtype)).dtype, shape


def iter_norb(path: str | Path, *, chunk_rows: int = 1024) -> Iterator[torch.Tensor]:
    """Yield the rows of a NORB matrix as tensors of up to ``chunk_rows`` rows along dim 0.

    The full byte count is checked: a truncated file raises after its last complete chunk,
    a file longer than its header says raises at the end.
    """
    path = Path(path)
    with _open(path) as stream:
        dtype, shape = _parse_header(stream, path)
        if not shape:  # a 0-d matrix: one element
            yield _chunk(stream, path, dtype, (), 0, 1)
        else:
            for start in range(0, shape[0], chunk_rows):
                yield _chunk(stream, path, dtype, shape, start, min(chunk_rows, shape[0] - start))
        if _read_trailing(stream, path):
            expected = math.prod(shape) * dtype.itemsize
            raise DataError(
                f"NORB file {path} is longer than its header says: dims {list(shape)} need {expected} data bytes, "
                f"found more. Fix: download or copy the file again."
            )


def _read_trailing(stream: IO[bytes], path: Path) -> bytes:
    try:
        return stream.read(1)
    except (EOFError, OSError, zlib.error) as err:
        raise _corrupt(path, err) from err


def _chunk(
    stream: IO[bytes], path: Path, dtype: np.dtype, shape: tuple[int, ...], start: int, rows: int
) -> torch.Tensor:
    """Read ``rows`` rows (from row ``start``) of a matrix of ``shape`` into a new tensor."""
    row_shape = shape[1:]
    count = rows * math.prod(row_shape)
    out = np.empty(count, dtype=dtype)
    view, got = memoryview(out).cast("B"), 0
    try:
        while got < out.nbytes:  # decode straight into `out`: no intermediate bytes object
            n = stream.readinto(view[got:])
            if not n:
                break
            got += n
    except (EOFError, OSError, zlib.error) as err:
        raise _corrupt(path, err) from err
    if got < out.nbytes:
        expected = math.prod(shape) * dtype.itemsize if shape else dtype.itemsize
        found = start * math.prod(row_shape) * dtype.itemsize + got
        raise DataError(
            f"NORB file {path} is truncated: header dims {list(shape)} ({dtype.name}) need {expected} data bytes, "
            f"found {found}. Fix: download or copy the file again."
        )
    native = out.astype(dtype.newbyteorder("="), copy=False)  # no copy on little-endian machines
    return torch.from_numpy(native.reshape((rows, *row_shape) if shape else ()))


def read_norb(path: str | Path) -> torch.Tensor:
    """Read a whole NORB matrix (plain or gzipped) into a tensor of its declared type and ``ndim`` dims."""
    path = Path(path)
    dtype, shape = read_norb_header(path)
    chunks = list(iter_norb(path, chunk_rows=max(shape[0], 1) if shape else 1))
    return chunks[0] if chunks else torch.empty(shape, dtype=dtype)


def write_norb(path: str | Path, values: torch.Tensor | np.ndarray | Any) -> Path:
    """Write ``values`` (uint8, int16, int32, float32 or float64) as a NORB matrix; gzip when ``path`` ends in ``.gz``.

    Dims are padded with 1s to at least 3, as the format requires; the gzip header carries
    no timestamp, so equal inputs give byte-identical files.
    """
    path = Path(path)
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in _MAGIC_OF:
        raise ValueError(f"write_norb supports {[d.name for d in NORB_MAGIC.values()]}, got {array.dtype}.")
    dims = list(array.shape) + [1] * (3 - array.ndim)  # unused trailing dims are 1
    header = struct.pack(f"<2i{len(dims)}i", _MAGIC_OF[dtype], array.ndim, *dims)
    return write_payload(path, header + np.ascontiguousarray(array, dtype=dtype).tobytes(), compresslevel=6)


def standardize_images(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per image and channel of ``x`` (B, C, H, W), like tf.image.per_image_standardization."""
    mean = x.mean(dim=(-2, -1), keepdim=True)  # (B, C, 1, 1)
    std = x.std(dim=(-2, -1), keepdim=True, unbiased=False)  # (B, C, 1, 1)
    return (x - mean) / std.clamp_min(1.0 / math.sqrt(x.shape[-2] * x.shape[-1]))  # floor: blank images stay 0


def preprocess_smallnorb(files: dict[str, Path], resize: int, *, chunk_rows: int = 1024) -> dict[str, torch.Tensor]:
    """Read one part's ``dat``/``cat``/``info`` files; downsample and standardise the images chunk by chunk.

    Returns ``images`` float16 (N, 2, resize, resize), ``labels`` int64 (N,), ``info`` int64 (N, 4).
    """
    dtype, shape = read_norb_header(files["dat"])
    if dtype != torch.uint8 or len(shape) != 4 or tuple(shape[1:]) != (2, 96, 96):
        raise DataError(f"smallNORB file {files['dat']} holds {dtype} {list(shape)}; expected uint8 [N, 2, 96, 96].")
    n = shape[0]
    labels, info = read_norb(files["cat"]), read_norb(files["info"])
    if tuple(labels.shape) != (n,) or tuple(info.shape) != (n, 4):
        raise DataError(
            f"smallNORB files {files['cat']} and {files['info']} hold {list(labels.shape)} and {list(info.shape)}; "
            f"expected [{n}] and [{n}, 4] to match the {n} images of {files['dat']}."
        )
    if n and (int(labels.min()) < 0 or int(labels.max()) >= NUM_CATEGORIES):
        found = f"{int(labels.min())}..{int(labels.max())}"
        raise DataError(f"smallNORB file {files['cat']} holds labels {found}; expected 0..{NUM_CATEGORIES - 1}.")
    bad = (info < 0) | (info >= torch.tensor(list(INFO_LIMITS.values()), dtype=info.dtype))  # (N, 4)
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0])
        raise DataError(
            f"smallNORB file {files['info']} row {row} is {info[row].tolist()}; expected (instance < 10, "
            f"elevation < 9, azimuth < 35, lighting < 6)."
        )
    images = torch.empty((n, 2, resize, resize), dtype=torch.float16)
    start = 0
    for chunk in iter_norb(files["dat"], chunk_rows=chunk_rows):  # (b, 2, 96, 96) uint8: bounded memory
        small = F.interpolate(chunk.float(), size=(resize, resize), mode="area")  # (b, 2, R, R) box average
        images[start : start + chunk.shape[0]] = standardize_images(small).half()
        start += chunk.shape[0]
    return {"images": images, "labels": labels.long(), "info": info.long()}

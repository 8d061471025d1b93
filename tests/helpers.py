"""Helpers shared by the tests: running the real CLIs, small model overrides."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from capsnets.data import write_norb
from capsnets.data.idx import write_idx
from capsnets.nn import ClassCapsules, ConvCapsules, build_routing
from capsnets.utils.allocator import without_allocator

ROOT = Path(__file__).resolve().parents[1]

# a CapsNet small enough for CPU tests (same architecture, fewer channels/capsules)
SMALL_DR_CAPS = [
    "model.net.conv1_channels=16",
    "model.net.primary_types=4",
    "model.net.primary_dim=4",
    "model.net.class_dim=8",
    "model.net.decoder_hidden=[32,64]",
]


# --- matrix-capsule layers with EM routing -------------------------------------------


def em(out_types: int, *, impl: str = "fused", role: str = "hidden", **settings):
    return build_routing({"name": "em", "impl": impl, **settings}, kind="matrix", out_types=out_types, role=role)


def conv_layer(
    in_types: int,
    out_types: int,
    kernel_size: int,
    stride: int,
    *,
    impl: str = "fused",
    pose: str = "matrix",
    **settings,
) -> ConvCapsules:
    """A ConvCapsules layer with EM routing (``settings`` of the routing)."""
    return ConvCapsules(
        in_types=in_types,
        out_types=out_types,
        kernel_size=kernel_size,
        stride=stride,
        pose=pose,
        routing=em(out_types, impl=impl, **settings),
    )


def class_layer(
    in_types: int,
    num_classes: int,
    *,
    impl: str = "fused",
    coordinate_addition: bool = True,
    pose: str = "matrix",
    **settings,
) -> ClassCapsules:
    return ClassCapsules(
        in_types=in_types,
        num_classes=num_classes,
        coordinate_addition=coordinate_addition,
        pose=pose,
        routing=em(num_classes, impl=impl, role="class", **settings),
    )


def final_assignments(layer, *args):
    """Run ``layer`` recording its routing; returns the outputs and the last iteration's R (B, P, K, T_in, T_out).

    The E-step after the last M-step is skipped, so the R the last M-step used is the final one."""
    layer.routing.record_trace = True
    try:
        out = layer(*args)
        return out, layer.routing.trace.assignments[-1]
    finally:
        layer.routing.record_trace = False


def hermetic_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI test: no W&B credentials or mode from the developer's shell (so runs
    go offline under the test's tmp dir, never online), and none of the allocator set-up ``make test`` ran
    pytest under (so ``train.py`` chooses its allocator itself, as from a user's shell), plus ``extra``."""
    env = {k: v for k, v in without_allocator(os.environ).items() if not k.startswith("WANDB_")}
    env.update({"NETRC": os.devnull, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", "COLUMNS": "200"})
    env.update(extra)
    return env


def run_cli(
    script: str, *overrides: str, cwd: Path = ROOT, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python <script> overrides...`` exactly as a user would, returning the finished process.
    ``script`` is a file under the repository root, or ``-m <module>`` (a console script's module).
    ``env``: extra environment variables (e.g. ``{"WANDB_MODE": "disabled"}``)."""
    env = hermetic_env(**(env or {}))
    target = script.split() if script.startswith("-m ") else [str(ROOT / script)]
    return subprocess.run(
        [sys.executable, *target, *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- tiny data files in the real formats ------------------------------------------


def write_tiny_mnist(root: Path, n_train: int = 96, n_test: int = 32, gz: bool = True) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = (torch.rand(n, 28, 28, generator=g) * 60).to(torch.uint8)
        images[torch.arange(n), 4 + labels * 2, 4:24] = 255  # a class-dependent bar
        write_idx(raw / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte{suffix}", labels.to(torch.uint8))


# smallNORB (Hinton et al. 2018 protocol): a tiny fake in the real NORB binary-matrix format
N = 54  # examples per part: every azimuth 3x, every elevation 6x
INSTANCES = {"training": (4, 6, 7, 8, 9), "testing": (0, 1, 2, 3, 5)}
PREFIX = {
    "training": "smallnorb-5x46789x9x18x6x2x96x96-training",
    "testing": "smallnorb-5x01235x9x18x6x2x96x96-testing",
}


def fake_part(part: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random stereo images (N, 2, 96, 96) uint8, labels (N,) int32, info (N, 4) int32 spanning all viewpoints."""
    i = torch.arange(N)
    instance = torch.tensor(INSTANCES[part])[i % 5]
    info = torch.stack([instance, (i // 6) % 9, 2 * (i % 18), i % 6], dim=1).int()  # (N, 4)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (N, 2, 96, 96), generator=g, dtype=torch.uint8)
    return images, (i % 5).int(), info


def write_fake_smallnorb(data_dir: Path, *, gz: bool = True, seed: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
    folder = data_dir / "smallnorb"
    parts = {}
    for k, part in enumerate(("training", "testing")):
        parts[part] = fake_part(part, seed + k)
        for kind, tensor in zip(("dat", "cat", "info"), parts[part]):
            write_norb(folder / f"{PREFIX[part]}-{kind}.mat{'.gz' if gz else ''}", tensor)
    return parts


def shapes_part(part: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Learnable smallNORB-format images: 5 classes of simple shapes (square, disk, cross, horizontal bar,
    ring) of random size and position on noise, the same shape in both cameras, shifted 2 px between them.

    Returns images (n, 2, 96, 96) uint8, labels (n,) int32, info (n, 4) int32 with distinct viewpoints.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 5
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    images = torch.empty(n, 2, 96, 96, dtype=torch.uint8)
    for k in range(n):
        size = 14 + 14 * torch.rand((), generator=g)  # half-size in px
        cy, cx = (30 + 36 * torch.rand(2, generator=g)).tolist()
        dy, dx = (yy - cy).abs(), (xx - cx).abs()
        r = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
        mask = {
            0: (dy < size) & (dx < size),
            1: r < size,
            2: ((dy < size / 4) & (dx < size)) | ((dx < size / 4) & (dy < size)),
            3: (dy < size / 3) & (dx < size * 1.2),
            4: (r < size) & (r > size * 0.6),
        }[int(labels[k])]
        noise = torch.rand(96, 96, generator=g) * 60
        left = noise + 170 * mask
        images[k, 0] = left.clamp(0, 255).to(torch.uint8)
        images[k, 1] = torch.roll(left, shifts=2, dims=1).clamp(0, 255).to(torch.uint8)
    i = torch.arange(n)
    instance = torch.tensor(INSTANCES[part])[(i // 5) % 5]
    info = torch.stack([instance, (i // 25) % 9, 2 * ((i // 225) % 18), (i // 4050) % 6], dim=1).int()
    return images, labels.int(), info


def write_shapes_smallnorb(data_dir: Path, *, n_train: int = 300, n_test: int = 100, seed: int = 0) -> None:
    """smallNORB files (real binary-matrix format, gzipped) of :func:`shapes_part` images."""
    folder = data_dir / "smallnorb"
    for part, n, s in (("training", n_train, seed), ("testing", n_test, seed + 1)):
        for kind, tensor in zip(("dat", "cat", "info"), shapes_part(part, n, s)):
            write_norb(folder / f"{PREFIX[part]}-{kind}.mat.gz", tensor)


class Probe(L.LightningModule):
    """Linear classifier that records what each stage receives, ``seen[stage] = (shape[1:], dtype, min, max)``;
    multi-crop batches (B, n, C, S, S) are scored per crop and averaged over dim 1."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(in_features, num_classes)
        self.seen: dict[str, tuple[tuple[int, ...], torch.dtype, float, float]] = {}

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        self.seen[stage] = (tuple(x.shape[1:]), x.dtype, x.min().item(), x.max().item())
        scores = self.fc(x.flatten(-3))  # (B, K) or (B, n, K)
        return torch.nn.functional.cross_entropy(scores if scores.dim() == 2 else scores.mean(1), y)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar, model summary or sanity check; ``kwargs`` on top."""
    settings = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(**{**settings, **kwargs})


def last_metric(run_dir: Path, name: str) -> float:
    """The last logged value of ``name`` in a run's CSV metrics."""
    with open(next(run_dir.glob("csv/version_*/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    values = [float(r[name]) for r in rows if r.get(name) not in (None, "")]
    assert values, f"{name} not logged"
    return values[-1]


def synthetic_run(tmp_path: Path, name: str, *extra: str, model: Sequence[str] = tuple(SMALL_DR_CAPS)) -> list[str]:
    """train.py overrides: the small CapsNet (or ``model``'s overrides) on synthetic data, one epoch of 128 samples,
    run folder tmp_path/name."""
    return [
        "data=synthetic",
        *model,
        "trainer=cpu",
        "trainer.max_epochs=1",
        "data.num_train=128",
        "data.num_val=64",
        "data.num_test=64",
        f"paths.log_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / name}",
        *extra,
    ]

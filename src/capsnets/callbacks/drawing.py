"""Rendering for :class:`~capsnets.callbacks.pictures.PicturesCallback`: tensors in, RGB pictures out.

Every function returns a ``uint8`` array (H, W, 3), which is written as PNG and handed to the
loggers unchanged. Image grids are tiled with ``torchvision.utils.make_grid`` (no plotting);
charts use matplotlib's object-oriented API on an Agg canvas: no display, no pyplot figure
registry, so nothing stays open after a picture is rendered.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid

from capsnets.callbacks.routing_stats import LayerRoutingStats

GRID_PAD = 2  # pixels between tiles of an image grid (white)
CHAR_INCHES = 0.08  # width of one tick-label character at matplotlib's default font size, for margins


# --- image grids -----------------------------------------------------------------------------


def display_images(x: torch.Tensor, *, scale: int = 1) -> torch.Tensor:
    """Images (N, C, H, W) of any dtype and range -> RGB (N, 3, H*scale, W'*scale) floats in [0, 1].

    uint8 is divided by 255; floats outside [0, 1] (standardised smallNORB) are min-max scaled
    per image. One channel is shown grey, three as RGB, any other number (stereo pairs) as grey
    panels side by side, so W' = C * W then.
    """
    x = x.detach().cpu()
    x = x.float() / 255.0 if not torch.is_floating_point(x) else x.float()
    if x.numel() and (x.min() < 0 or x.max() > 1):
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        high = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - low) / (high - low).clamp_min(1e-12)
    n, c, h, w = x.shape
    if c != 3:
        x = x.permute(0, 2, 1, 3).reshape(n, 1, h, c * w).expand(n, 3, h, c * w)  # channels side by side
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # nearest-neighbour zoom
    return x


def grid_to_array(grid: torch.Tensor) -> np.ndarray:
    """(3, H, W) floats in [0, 1] -> (H, W, 3) uint8."""
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def reconstruction_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, *, scale: int = 1) -> np.ndarray:
    """Top row the inputs (N, C, H, W), bottom row their reconstructions, column by column."""
    tiles = torch.cat([display_images(inputs, scale=scale), display_images(reconstructions, scale=scale)])
    return grid_to_array(make_grid(tiles, nrow=inputs.shape[0], padding=GRID_PAD, pad_value=1.0))


def perturbation_grid(images: torch.Tensor, *, scale: int = 1) -> np.ndarray:
    """Decoded perturbations (S, D, T, C, H, W) -> one D x T block per sample, blocks side by side.

    Row d of a block: capsule dimension d shifted by each of the T offsets, left to right
    (Sabour et al. 2017, Fig. 4); the middle column of an odd T is the unperturbed capsule.
    """
    s, d, t = images.shape[:3]
    blocks = []
    for sample in images:  # (D, T, C, H, W)
        tiles = display_images(sample.flatten(0, 1), scale=scale)  # (D*T, 3, H, W), row-major
        blocks.append(make_grid(tiles, nrow=t, padding=GRID_PAD, pad_value=1.0))  # (3, rows, cols)
    gap = torch.ones(3, blocks[0].shape[1], 4 * GRID_PAD)  # wider white gap between samples
    joined = [piece for block in blocks for piece in (block, gap)][:-1]
    return grid_to_array(torch.cat(joined, dim=2))


# --- charts ----------------------------------------------------------------------------------


def new_figure(
    width: float,
    height: float,
    dpi: int,
    *,
    left: float = 0.6,
    right: float = 0.2,
    bottom: float = 0.5,
    top: float = 0.4,
    wspace: float = 0.3,
    hspace: float = 0.3,
):  # -> matplotlib.figure.Figure
    """A matplotlib Figure on its own Agg canvas (not registered with pyplot).

    Margins are given in inches and fixed: matplotlib's constrained layout would place the text
    itself, but costs about 40% more time per picture.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=wspace,
        hspace=hspace,
    )
    return fig


def label_inches(labels: Sequence[str]) -> float:
    """Room that the longest of ``labels`` takes as a tick label, in inches."""
    return CHAR_INCHES * max((len(label) for label in labels), default=1)


def figure_to_array(fig) -> np.ndarray:  # noqa: ANN001 - matplotlib Figure
    """Render ``fig`` and return its pixels (H, W, 3) uint8; the figure is cleared afterwards."""
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    fig.clear()
    return pixels


def class_labels(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    """The given names when there is one per class, else ``0 .. K-1``."""
    if class_names is not None and len(class_names) == num_classes:
        return [str(name) for name in class_names]
    return [str(k) for k in range(num_classes)]


def confusion_matrix_figure(
    counts: torch.Tensor, *, class_names: Sequence[str] | None = None, title: str = "", dpi: int = 80
) -> np.ndarray:
    """Confusion matrix (K, K), rows = true class, columns = predicted class.

    Colour is the row-normalised rate (each true class sums to 1); the cells show the counts
    (up to 20 classes). The title gives the accuracy and the number of examples.
    """
    counts = counts.detach().cpu().to(torch.float64)
    k = counts.shape[0]
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    total = int(counts.sum())
    accuracy = float(counts.diagonal().sum() / max(total, 1))
    labels = class_labels(k, class_names)
    rotate = max(map(len, labels)) > 3
    side = min(3.0 + 0.45 * k, 12.0)
    fig = new_figure(
        side + 1.4,
        side + 0.4,
        dpi,
        left=0.55 + label_inches(labels),
        right=0.1,
        bottom=0.55 + (label_inches(labels) if rotate else 0.15),
        top=0.35,
    )
    ax = fig.add_subplot()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    ax.set_xticks(range(k), labels, rotation=90 if rotate else 0)
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}  accuracy {accuracy:.2%} of {total}".strip(), fontsize=9)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j] > 0:
                    color = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7, color=color)
    return figure_to_array(fig)


def routing_figure(stats: Sequence[LayerRoutingStats], *, title: str = "", dpi: int = 80) -> np.ndarray:
    """One row per routing layer. Left: child entropy per iteration (mean and 10-90% band) with
    the uniform split's entropy dashed; right: histograms of each child's largest coupling or
    assignment, one outline per iteration."""
    fig = new_figure(
        9.0, 2.6 * len(stats) + 0.4, dpi, left=0.65, bottom=0.5, top=0.55 if title else 0.3, wspace=0.25, hspace=0.5
    )
    axes = fig.subplots(len(stats), 2, squeeze=False)
    for (ax_entropy, ax_hist), layer in zip(axes, stats):
        its = np.arange(1, layer.iterations + 1)
        quantiles = np.stack([np.percentile(e.numpy(), [10, 90]) for e in layer.entropy])  # (T, 2)
        ax_entropy.fill_between(its, quantiles[:, 0], quantiles[:, 1], alpha=0.25, label="10-90% of children")
        ax_entropy.plot(its, layer.mean_entropy(), marker="o", label="mean")
        ax_entropy.axhline(layer.mean_uniform(), linestyle="--", color="grey", label="uniform split (mean)")
        ax_entropy.set_xticks(its)
        ax_entropy.set_ylim(0, float(layer.uniform.max()) * 1.05 + 1e-6)
        ax_entropy.set_xlabel("routing iteration")
        ax_entropy.set_ylabel("entropy (nats)")
        ax_entropy.set_title(f"{layer.name}: entropy of each child's routing", fontsize=9)
        ax_entropy.legend(fontsize=7, loc="lower left")
        for t, largest in enumerate(layer.largest):
            ax_hist.hist(largest.numpy(), bins=40, range=(0.0, 1.0), histtype="step", label=f"iteration {t + 1}")
        ax_hist.set_xlabel("largest coupling / assignment of a child")
        ax_hist.set_ylabel("children")
        ax_hist.set_title(f"{layer.name}: assignment histogram", fontsize=9)
        ax_hist.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return figure_to_array(fig)


def class_activations_figure(
    activations: torch.Tensor,
    labels: torch.Tensor,
    *,
    per_iteration: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    title: str = "",
    dpi: int = 80,
) -> np.ndarray:
    """EM class-capsule activations of the fixed images.

    Left: activations (N, K) as a heat map, one row per image, the true class circled. Right
    (when ``per_iteration`` (T, N, K) is given): the mean activation of the true class and of
    the other classes after each routing iteration's M-step.
    """
    activations = activations.detach().float().cpu()
    labels = labels.detach().cpu()
    n, k = activations.shape
    names = class_labels(k, class_names)
    panels = 2 if per_iteration is not None else 1
    rows = [f"#{i} ({names[int(y)]})" for i, y in enumerate(labels)]
    rotate = max(map(len, names)) > 3
    fig = new_figure(
        2.6 + label_inches(rows) + 0.4 * k + 3.8 * (panels - 1),
        1.6 + 0.3 * n,
        dpi,
        left=0.3 + label_inches(rows),
        bottom=0.55 + (label_inches(names) if rotate else 0.15),
        top=0.55 if title else 0.3,
        wspace=0.35,
    )
    axes = fig.subplots(1, panels, squeeze=False)[0]
    image = axes[0].imshow(activations.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=axes[0], label="activation")
    axes[0].scatter(labels.numpy(), np.arange(n), s=120, facecolors="none", edgecolors="red", linewidths=1.5)
    axes[0].set_xticks(range(k), names, rotation=90 if rotate else 0)
    axes[0].set_yticks(range(n), rows)
    axes[0].set_xlabel("class capsule")
    axes[0].set_title("activations (true class circled)", fontsize=9)
    if per_iteration is not None:
        per_iteration = per_iteration.detach().float().cpu()  # (T, N, K)
        true = torch.nn.functional.one_hot(labels, k).bool()  # (N, K)
        its = np.arange(1, per_iteration.shape[0] + 1)
        axes[1].plot(its, [float(a[true].mean()) for a in per_iteration], marker="o", label="true class")
        axes[1].plot(its, [float(a[~true].mean()) for a in per_iteration], marker="o", label="other classes")
        axes[1].set_xticks(its)
        axes[1].set_ylim(0, 1)
        axes[1].set_xlabel("routing iteration")
        axes[1].set_ylabel("mean activation")
        axes[1].set_title("class activations by iteration", fontsize=9)
        axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return figure_to_array(fig)


# --- files -----------------------------------------------------------------------------------


def write_png(pixels: np.ndarray, path: Path) -> Path:
    """Write (H, W, 3) uint8 pixels as a PNG, creating the folder."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, compress_level=1)  # fast; the pictures are small anyway
    return path

"""Learning curves of a sweep: accuracy vs training samples seen, mean +/- std over seeds per configuration.

Reads the ``curve`` that :class:`capsnets.callbacks.LearningCurve` leaves in each job's ``metrics.json``
and writes ``curves.md`` (a table: one row per sample count, one column per configuration),
``curves.csv`` (raw floats) and ``curves.png`` (one line per configuration with a +/- std band).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from capsnets.results.summary import DASH, Stat, Summary


@dataclass
class Curve:
    """One configuration's curve: sample counts and the accuracy statistics over its seeds at each."""

    label: str
    samples: list[int]
    stats: list[Stat]


def curves(summary: Summary) -> list[Curve]:
    """The curve of every configuration whose finished jobs recorded one (points matched by sample count)."""
    result = []
    for row in summary.rows:
        by_samples: dict[int, list[float]] = {}
        for job in row.finished:
            for point in (job.record or {}).get("curve") or []:
                by_samples.setdefault(int(point["samples"]), []).append(float(point["acc"]))
        if by_samples:
            samples = sorted(by_samples)
            result.append(Curve(row.label, samples, [Stat.of(by_samples[n]) for n in samples]))
    return result


def render_curves_table(items: Sequence[Curve]) -> str:
    """Markdown: one row per sample count, accuracy (%) mean ± std over seeds per configuration."""
    samples = sorted({n for c in items for n in c.samples})
    header = ["samples", *(f"`{c.label}`" for c in items)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---:"] * len(header)) + "|"]
    for n in samples:
        cells = [f"{n:,}"]
        for curve in items:
            stat = curve.stats[curve.samples.index(n)] if n in curve.samples else None
            if stat is None:
                cells.append(DASH)
            else:
                std = f"{100 * stat.std:.2f}" if stat.std is not None else DASH
                cells.append(
                    f"{100 * stat.mean:.2f} ± {std}"
                    + (f" (n={stat.n})" if stat.n != max(s.n for s in curve.stats) else "")
                )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_curves(summary: Summary, out: Path, *, ylim: tuple[float, float] = (0.0, 100.0)) -> list[str]:
    """Write curves.md/.csv/.png into ``out`` when the sweep recorded curves; returns the file names written.
    ``ylim``: the plot's accuracy axis in percent (e.g. (95, 99) to tell late differences apart)."""
    items = curves(summary)
    if not items:
        return []
    table = render_curves_table(items)
    title = f"# Learning curves: {summary.task_name}" if summary.task_name else "# Learning curves"
    note = "Accuracy (%) on the split the LearningCurve callback scored, mean ± sample std over seeds."
    (out / "curves.md").write_text(f"{title}\n\n{note}\n\n{table}\n![learning curves](curves.png)\n")
    with (out / "curves.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["configuration", "samples", "n", "acc_mean", "acc_std"])
        for curve in items:
            for n, stat in zip(curve.samples, curve.stats):
                writer.writerow([curve.label, n, stat.n, repr(stat.mean), "" if stat.std is None else repr(stat.std)])
    plot_curves(items, out / "curves.png", title=summary.task_name or summary.sweep_dir.name, ylim=ylim)
    return ["curves.md", "curves.csv", "curves.png"]


LINE_STYLES = ("-", "--", ":", "-.")


def curve_styles(n: int) -> list[tuple[tuple[float, ...], str]]:
    """(colour, line style) of each of ``n`` curves, no two alike: matplotlib's 10 colours for up to 10 curves, its
    20 (tab20) for more, then the same colours dashed, dotted and dash-dotted (a comparison of 11 routing rows
    otherwise draws the first and the eleventh alike)."""
    import matplotlib

    palette = matplotlib.colormaps["tab10" if n <= 10 else "tab20"].colors
    return [(palette[i % len(palette)], LINE_STYLES[(i // len(palette)) % len(LINE_STYLES)]) for i in range(n)]


def plot_curves(
    items: Sequence[Curve], path: Path, *, title: str = "", ylim: tuple[float, float] = (0.0, 100.0)
) -> tuple[float, float]:
    """Plot every curve (mean ± std over seeds) into ``path``; returns the accuracy axis' limits drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for curve, (color, linestyle) in zip(items, curve_styles(len(items))):
        xs = np.array(curve.samples)
        mean = np.array([100 * s.mean for s in curve.stats])
        std = np.array([100 * (s.std or 0.0) for s in curve.stats])
        ax.plot(xs, mean, marker="o", markersize=3, label=curve.label, color=color, linestyle=linestyle)
        ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.2)
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}: mean ± std over seeds" if title else "mean ± std over seeds", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    drawn = ax.get_ylim()
    plt.close(fig)
    return float(drawn[0]), float(drawn[1])

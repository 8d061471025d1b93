"""The outputs of a sweep summary: markdown table, ``summary.md``, ``summary.csv`` and ``summary.png``."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capsnets.results.summary import DASH, Row, Stat, Summary


def is_fraction(metric: str) -> bool:
    """Accuracies and error rates are fractions in metrics.json, shown as percentages."""
    name = metric.rsplit("/", 1)[-1].lower()
    return name.startswith(("acc", "err"))


def _scale(metric: str) -> float:
    return 100.0 if is_fraction(metric) else 1.0


def fmt_value(value: float | None, metric: str, *, signed: bool = False) -> str:
    """``0.847`` -> ``84.70`` for accuracies (percent, 2 decimals), 4 decimals otherwise."""
    if value is None:
        return DASH
    digits = 2 if is_fraction(metric) else 4
    return f"{value * _scale(metric):{'+' if signed else ''}.{digits}f}"


def fmt_stat(stat: Stat | None, metric: str, n: int) -> str:
    """``84.70 ± 0.12``; ``–`` for the std of a single seed; the count when it differs from the row's n."""
    if stat is None:
        return DASH
    text = f"{fmt_value(stat.mean, metric)} ± {fmt_value(stat.std, metric)}"
    return text if stat.n == n else f"{text} (n={stat.n})"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_table(summary: Summary) -> str:
    """The markdown table (one row per configuration)."""
    any_missing = any(r.missing for r in summary.rows)
    paper_metrics = {r.paper_metric for r in summary.rows if r.paper}
    one_paper_metric = paper_metrics.pop() if len(paper_metrics) == 1 else None
    header = ["configuration", "n"] + (["missing"] if any_missing else [])
    header += [f"{m} (%)" if is_fraction(m) else m for m in summary.metrics]
    if summary.has_paper:
        header += [f"paper {one_paper_metric}", "Δ"] if one_paper_metric else ["paper", "Δ"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in summary.rows:
        n = len(row.finished)
        cells = [f"`{_md_escape(row.label)}`" if row.overrides else row.label, str(n)]
        if any_missing:
            cells.append(str(len(row.missing)))
        cells += [fmt_stat(row.stats.get(m), m, n) for m in summary.metrics]
        if summary.has_paper:
            metric = row.paper_metric or ""
            target = fmt_value(row.paper_target, metric)
            if not one_paper_metric and row.paper and row.paper_target is not None:
                target = f"{target} ({metric})"
            cells += [target, fmt_value(row.paper_diff, metric, signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(summary: Summary, plot_name: str | None = "summary.png") -> str:
    """The whole ``summary.md``: title, common overrides, table, notes, plot."""
    title = f"# Sweep summary: {summary.task_name}" if summary.task_name else "# Sweep summary"
    n_jobs = len(summary.jobs)
    n_done = sum(j.finished for j in summary.jobs)
    parts = [
        title,
        "",
        ", ".join(f"`{d}`" for d in summary.sweep_dirs)
        + f": {n_done} of {n_jobs} jobs finished, {len(summary.rows)} configurations; "
        "mean ± sample std (ddof=1) over seeds"
        + (", accuracies in %" if any(map(is_fraction, summary.metrics)) else "")
        + ".",
    ]
    if summary.common:
        parts += ["", "Overrides shared by every configuration: `" + " ".join(summary.common) + "`"]
    parts += ["", render_table(summary).rstrip("\n")]
    if summary.has_paper:
        sources = sorted({r.paper_source for r in summary.rows if r.paper_source})
        points = any(is_fraction(r.paper_metric or "") for r in summary.rows)
        note = "Δ = mean − paper target" + (" (percentage points)" if points else "") + "."
        parts += ["", (f"Paper: {'; '.join(sources)}. " if sources else "") + note]
    if summary.warnings:
        parts += ["", "Warnings:", ""] + [f"- {w}" for w in summary.warnings]
    if plot_name:
        parts += ["", f"![{summary.main_metric} per configuration]({plot_name})"]
    return "\n".join(parts) + "\n"


def write_csv(summary: Summary, path: Path) -> None:
    """``summary.csv``: one row per configuration, raw floats at full precision (empty where none)."""
    header = ["configuration", "overrides", "n", "missing", "seeds"]
    for metric in summary.metrics:
        header += [f"{metric}_mean", f"{metric}_std"]
    header += ["paper_metric", "paper_target", "paper_diff", "paper_source"]

    def num(value: float | None) -> str | float:
        return "" if value is None else value

    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in summary.rows:
            line: list[Any] = [
                row.label,
                " ".join(row.overrides),
                len(row.finished),
                len(row.missing),
                " ".join(str(s) for s in row.seeds),
            ]
            for metric in summary.metrics:
                stat = row.stats.get(metric)
                line += [num(stat.mean if stat else None), num(stat.std if stat else None)]
            line += [row.paper_metric or "", num(row.paper_target), num(row.paper_diff), row.paper_source or ""]
            writer.writerow([repr(v) if isinstance(v, float) else v for v in line])


# --- plot ------------------------------------------------------------------------------


def numeric_axis(rows: Sequence[Row]) -> tuple[str, list[float]] | None:
    """``(key, values)`` when the rows differ in exactly one override key, present in all of them with a
    numeric value (e.g. routing iterations 1, 2, 3, 5); None otherwise."""
    if len(rows) < 2:
        return None
    keyed = [dict(r.key) for r in rows]
    keys = set().union(*keyed)
    differing = [k for k in keys if len({d.get(k) for d in keyed}) > 1]
    if len(differing) != 1 or any(differing[0] not in d for d in keyed):
        return None
    values = []
    for d in keyed:
        try:
            value = float(d[differing[0]])
        except ValueError:
            return None
        if not math.isfinite(value):
            return None
        values.append(value)
    return differing[0], values


def plot(summary: Summary, path: Path) -> bool:
    """Write ``summary.png``: the main metric per configuration (bars, or a line over the one numeric
    override the configurations differ in) with std error bars and the paper target as a marker.
    Returns False (and writes nothing) when no configuration has the main metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = summary.main_metric
    rows = [r for r in summary.rows if metric in r.stats]
    if not rows:
        return False
    scale = _scale(metric)
    means = np.array([r.stats[metric].mean for r in rows]) * scale
    stds = np.array([r.stats[metric].std or 0.0 for r in rows]) * scale
    targets = [
        (i, r.paper_target * scale)
        for i, r in enumerate(rows)
        if r.paper_target is not None and r.paper_metric == metric
    ]
    axis = numeric_axis(rows)

    width = max(6.0, 0.9 * len(rows) + 2.0) if axis is None else 6.5
    fig, ax = plt.subplots(figsize=(min(width, 24.0), 4.5))
    if axis is not None:
        key, xs_list = axis
        xs = np.array(xs_list)
        order = np.argsort(xs)
        ax.errorbar(xs[order], means[order], yerr=stds[order], marker="o", capsize=4, label=f"mean ± std ({metric})")
        if targets:
            tx = np.array([xs[i] for i, _ in targets])
            ty = np.array([t for _, t in targets])
            o = np.argsort(tx)
            ax.plot(tx[o], ty[o], linestyle="--", marker="D", color="tab:red", label="paper")
        ax.set_xlabel(key)
        ax.set_xticks(xs[order])
        if xs.min() > 0 and xs.max() / xs.min() > 100:
            ax.set_xscale("log")
        else:
            ax.set_xticklabels([f"{x:g}" for x in xs[order]])
    else:
        positions = np.arange(len(rows))
        ax.bar(positions, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8, label=f"mean ± std ({metric})")
        if targets:
            ax.scatter(
                [positions[i] for i, _ in targets],
                [t for _, t in targets],
                marker="D",
                color="tab:red",
                zorder=3,
                label="paper",
            )
        ax.set_xticks(positions)
        ax.set_xticklabels(
            [r.label for r in rows],
            rotation=30 if len(rows) > 2 else 0,
            ha="right" if len(rows) > 2 else "center",
            fontsize=8,
        )
        # zoom onto the data: accuracies of one sweep usually differ by a fraction of their size
        low = min([*(means - stds), *(t for _, t in targets)])
        high = max([*(means + stds), *(t for _, t in targets)])
        pad = max(high - low, 1e-3 * max(abs(high), 1e-12)) * 0.25
        bottom, top = low - pad, high + pad
        if is_fraction(metric):
            bottom, top = max(bottom, 0.0), min(top, 100.0)
        if bottom < top:
            ax.set_ylim(bottom, top)
    ax.set_ylabel(f"{metric} (%)" if is_fraction(metric) else metric)
    ax.set_title(f"{summary.task_name or summary.sweep_dir.name}: {metric}, mean ± std over seeds", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- CLI -------------------------------------------------------------------------------

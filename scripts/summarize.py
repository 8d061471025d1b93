"""Summarise a Hydra multirun (sweep) folder: mean +/- std of the test metrics per configuration.

Reads the ``metrics.json`` that ``train.py`` writes into every finished job folder of a sweep
(no W&B needed), groups the jobs into configurations (their overrides without ``seed=...``, so
the seeds of one configuration are aggregated), and writes into the sweep folder

  * ``summary.md``  a markdown table: configuration, n (finished seeds), mean +/- std (sample std,
    ddof=1) of every ``test/*`` metric (accuracies as percentages), the paper's number the preset
    names and the difference mean - paper; jobs without ``metrics.json`` are counted per row;
  * ``summary.csv`` the same numbers as raw floats at full precision (separate mean/std columns);
  * ``summary.png`` the main metric per configuration as bars with std error bars and the paper
    target as a marker; a line plot instead when the configurations differ in exactly one
    numeric override (e.g. ``model.net.routing_iterations=1,2,3,5``).

The markdown table is also printed to stdout; warnings (unfinished jobs, disagreeing paper
targets) go to stderr. Problems with the input (no such folder, not a multirun folder, no
finished job) end the script with exit code 2 and one line naming the problem and the fix.

Usage::

    python scripts/summarize.py outputs/sabour2017_table1/multiruns/2025-01-31_12-00-00
    python scripts/summarize.py SWEEP_DIR --metric val/acc          # plot val/acc, add it to the table
    python scripts/summarize.py SWEEP_DIR --ignore trainer --out results/
    python scripts/summarize.py SWEEP_DIR --group-by model.net.routing_iterations

The module is importable (``summarize(...)``, ``render_markdown``, ``write_csv``, ``plot``) for tests
and notebooks.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

DEFAULT_METRIC = "test/acc"
SEED_KEY = "seed"
DASH = "–"  # shown where a number does not exist (std of one seed, no paper target)


class SummaryError(Exception):
    """A problem with the input that the user must fix; ``main`` prints it as one line, exit code 2."""


# --- reading the sweep ----------------------------------------------------------------

@dataclass
class Job:
    """One Hydra job folder of the sweep (``SWEEP_DIR/<num>/``)."""

    num: int
    path: Path
    overrides: list[str]
    record: dict[str, Any] | None = None  # parsed metrics.json; None while unfinished / crashed
    problem: str | None = None  # why ``record`` is None, for the warning

    @property
    def finished(self) -> bool:
        return self.record is not None

    @property
    def metrics(self) -> dict[str, float]:
        """The job's final metrics (numbers only)."""
        if self.record is None:
            return {}
        raw = self.record.get("metrics") or {}
        return {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    @property
    def paper(self) -> dict[str, Any] | None:
        """The preset's ``paper`` block (``metric``, ``target``, ``source``) or None."""
        paper = (self.record or {}).get("paper")
        return paper if isinstance(paper, dict) else None


def _numbered_folders(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]


def find_jobs(sweep_dir: Path) -> list[Job]:
    """All job folders of ``sweep_dir`` (numbered folders holding ``.hydra/``), in job order.

    Raises ``SummaryError`` when the folder is missing or is not a multirun folder.
    """
    if not sweep_dir.exists():
        raise SummaryError(
            f"sweep folder {sweep_dir} does not exist; pass the multirun folder Hydra printed, "
            "e.g. outputs/<task_name>/multiruns/<date>_<time>"
        )
    if not sweep_dir.is_dir():
        raise SummaryError(f"{sweep_dir} is a file, not a sweep folder; pass the multirun folder that holds 0/, 1/, ...")
    job_dirs = sorted((p for p in _numbered_folders(sweep_dir) if (p / ".hydra").is_dir()), key=lambda p: int(p.name))
    if not job_dirs:
        if (sweep_dir / ".hydra").is_dir():
            fix = "it is a single run's folder; pass a multirun folder (outputs/<task_name>/multiruns/<date>_<time>)"
        else:
            sweeps = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and (p / "multirun.yaml").is_file())
            fix = (f"it holds sweep folders, pass one of them, e.g. {sweep_dir / sweeps[-1]}" if sweeps else
                   "pass the folder Hydra printed for the sweep (it holds multirun.yaml and 0/, 1/, ...)")
        raise SummaryError(f"{sweep_dir} is not a Hydra multirun folder (no numbered job folders with .hydra/); {fix}")
    return [_read_job(p) for p in job_dirs]


def _read_job(path: Path) -> Job:
    """The job's overrides (``.hydra/overrides.yaml``, else those in metrics.json) and its metrics.json."""
    record: dict[str, Any] | None = None
    problem: str | None = None
    metrics_file = path / "metrics.json"
    if metrics_file.is_file():
        try:
            loaded = json.loads(metrics_file.read_text())
        except (OSError, ValueError) as err:
            problem = f"unreadable metrics.json ({err})"
        else:
            if isinstance(loaded, dict):
                record = loaded
            else:
                problem = "metrics.json is not a JSON object"
    else:
        problem = "no metrics.json"

    overrides: list[str] | None = None
    overrides_file = path / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        loaded_overrides = yaml.safe_load(overrides_file.read_text())
        if isinstance(loaded_overrides, list):
            overrides = [str(o) for o in loaded_overrides]
    if overrides is None:
        overrides = [str(o) for o in (record or {}).get("overrides") or []]
    return Job(num=int(path.name), path=path, overrides=overrides, record=record, problem=problem)


# --- grouping --------------------------------------------------------------------------

def parse_override(override: str) -> tuple[str, str]:
    """``'+group.key=value'`` -> ``('group.key', 'value')``: the key without Hydra's ``+``/``++`` prefix."""
    key, _, value = override.partition("=")
    return key.lstrip("+"), value


def _matches(key: str, names: Iterable[str]) -> bool:
    """Whether override ``key`` is one of ``names`` or lies below one (``trainer`` matches ``trainer.devices``)."""
    return any(key == n or key.startswith(n + ".") for n in names)


def config_overrides(overrides: Sequence[str], ignore: Sequence[str] = (), group_by: Sequence[str] = ()) -> list[str]:
    """The overrides that define a job's configuration: all but ``seed`` and ``ignore`` keys, or only the
    ``group_by`` keys when given (then ``seed`` counts only if named there)."""
    ignore = [parse_override(k)[0] for k in ignore]
    group_by = [parse_override(k)[0] for k in group_by]
    kept = []
    for override in overrides:
        key, _ = parse_override(override)
        if group_by:
            if _matches(key, group_by) and not _matches(key, ignore):
                kept.append(override)
        elif key != SEED_KEY and not _matches(key, ignore):
            kept.append(override)
    return kept


@dataclass
class Stat:
    """Mean and sample standard deviation (ddof=1; None for fewer than 2 values) of ``n`` values."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        array = np.asarray(values, dtype=float)
        std = float(np.std(array, ddof=1)) if len(array) > 1 else None
        return cls(mean=float(np.mean(array)), std=std, n=len(array))


@dataclass
class Row:
    """One configuration: its jobs (all seeds) and their aggregated metrics."""

    key: tuple[tuple[str, str], ...]
    overrides: list[str]
    jobs: list[Job] = field(default_factory=list)
    label: str = ""
    stats: dict[str, Stat] = field(default_factory=dict)
    paper: dict[str, Any] | None = None

    @property
    def finished(self) -> list[Job]:
        return [j for j in self.jobs if j.finished]

    @property
    def missing(self) -> list[Job]:
        return [j for j in self.jobs if not j.finished]

    @property
    def seeds(self) -> list[Any]:
        return [j.record.get("seed") for j in self.finished if j.record is not None]

    @property
    def paper_metric(self) -> str | None:
        return self.paper.get("metric") if self.paper else None

    @property
    def paper_target(self) -> float | None:
        target = self.paper.get("target") if self.paper else None
        return float(target) if isinstance(target, (int, float)) and not isinstance(target, bool) else None

    @property
    def paper_source(self) -> str | None:
        return self.paper.get("source") if self.paper else None

    @property
    def paper_diff(self) -> float | None:
        """Mean of the paper's metric minus the paper's target, where both exist."""
        target, metric = self.paper_target, self.paper_metric
        if target is None or metric is None or metric not in self.stats:
            return None
        return self.stats[metric].mean - target


@dataclass
class Summary:
    """Everything the outputs are made of."""

    sweep_dir: Path
    rows: list[Row]
    metrics: list[str]  # table columns, the main metric first
    main_metric: str
    common: list[str]  # overrides every configuration shares (left out of the row labels)
    warnings: list[str]
    task_name: str | None = None

    @property
    def jobs(self) -> list[Job]:
        return [j for r in self.rows for j in r.jobs]

    @property
    def has_paper(self) -> bool:
        return any(r.paper for r in self.rows)


def group_jobs(jobs: Sequence[Job], ignore: Sequence[str] = (), group_by: Sequence[str] = ()) -> list[Row]:
    """Rows of jobs with the same configuration, ordered by their first job number, labelled by the
    overrides that tell them apart (all their overrides when there is a single row)."""
    rows: dict[tuple[tuple[str, str], ...], Row] = {}
    for job in sorted(jobs, key=lambda j: j.num):
        overrides = config_overrides(job.overrides, ignore, group_by)
        key = tuple(sorted(parse_override(o) for o in overrides))
        rows.setdefault(key, Row(key=key, overrides=overrides)).jobs.append(job)
    result = list(rows.values())
    common = common_overrides(result)
    for row in result:
        own = [o for o in row.overrides if parse_override(o) not in common or len(result) == 1]
        row.label = " ".join(own) if own else ("(common overrides only)" if row.overrides else "(defaults)")
    return result


def common_overrides(rows: Sequence[Row]) -> set[tuple[str, str]]:
    """The (key, value) overrides that every row has."""
    if not rows:
        return set()
    common = set(rows[0].key)
    for row in rows[1:]:
        common &= set(row.key)
    return common


def choose_metrics(jobs: Sequence[Job], extra: Sequence[str]) -> list[str]:
    """Table columns: every ``test/*`` metric any finished job has, then ``extra`` (``--metric``) ones;
    the main metric (first of ``extra``, else ``test/acc``) first."""
    available = sorted({k for j in jobs for k in j.metrics})
    metrics = [k for k in available if k.startswith("test/")]
    for name in extra:
        if name not in metrics:
            metrics.append(name)
    main = extra[0] if extra else DEFAULT_METRIC
    if main in metrics:
        metrics.remove(main)
        metrics.insert(0, main)
    return metrics


def summarize(sweep_dir: Path, *, metrics: Sequence[str] = (), ignore: Sequence[str] = (),
              group_by: Sequence[str] = ()) -> Summary:
    """Read ``sweep_dir``, group its jobs and aggregate their metrics (raises ``SummaryError``)."""
    sweep_dir = Path(sweep_dir)
    jobs = find_jobs(sweep_dir)
    finished = [j for j in jobs if j.finished]
    if not finished:
        raise SummaryError(
            f"none of the {len(jobs)} jobs in {sweep_dir} has a metrics.json (crashed or still running); "
            "wait for the sweep to finish, or see the .log file in each job folder for the error"
        )
    available = sorted({k for j in finished for k in j.metrics})
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise SummaryError(
            f"metric {', '.join(unknown)} is in no job's metrics.json; pass --metric with one of: {', '.join(available)}"
        )

    warnings: list[str] = []
    rows = group_jobs(jobs, ignore, group_by)
    columns = choose_metrics(finished, metrics)
    main = metrics[0] if metrics else DEFAULT_METRIC
    if main not in available:
        warnings.append(f"metric {main} is in no job's metrics.json, so there is no plot; choose one with --metric "
                        f"({', '.join(available) or 'none recorded'})")
    for row in rows:
        for metric in columns:
            values = [j.metrics[metric] for j in row.finished if metric in j.metrics]
            if values:
                row.stats[metric] = Stat.of(values)
        row.paper = _row_paper(row, warnings)

    missing = [j for j in jobs if not j.finished]
    if missing:
        names = ", ".join(f"{j.num}/ ({j.problem})" if j.problem != "no metrics.json" else f"{j.num}/" for j in missing)
        verb = "has" if len(missing) == 1 else "have"
        warnings.insert(0, f"{len(missing)} of {len(jobs)} jobs {verb} no metrics.json (crashed or still running) "
                           f"in {sweep_dir}: {names}")
    task_names = {j.record.get("task_name") for j in finished if j.record is not None}
    common = [o for o in rows[0].overrides if parse_override(o) in common_overrides(rows)] if len(rows) > 1 else []
    return Summary(sweep_dir=sweep_dir, rows=rows, metrics=columns, main_metric=main, common=common,
                   warnings=warnings, task_name=task_names.pop() if len(task_names) == 1 else None)


def _row_paper(row: Row, warnings: list[str]) -> dict[str, Any] | None:
    """The paper block of the row's first finished job that has one; warns when its jobs disagree."""
    papers = [(j, j.paper) for j in row.finished if j.paper]
    if not papers:
        return None
    first_job, first = papers[0]
    for job, paper in papers[1:]:
        if (paper.get("metric"), paper.get("target")) != (first.get("metric"), first.get("target")):
            warnings.append(
                f"jobs {first_job.num}/ and {job.num}/ of '{row.label}' name different paper targets "
                f"({first.get('metric')}={first.get('target')} vs {paper.get('metric')}={paper.get('target')}); "
                "showing the first"
            )
            break
    return first


# --- formatting ------------------------------------------------------------------------

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
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
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
    parts = [title, "",
             f"`{summary.sweep_dir}`: {n_done} of {n_jobs} jobs finished, {len(summary.rows)} configurations; "
             "mean ± sample std (ddof=1) over seeds" + (", accuracies in %" if any(map(is_fraction, summary.metrics)) else "")
             + "."]
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
            line: list[Any] = [row.label, " ".join(row.overrides), len(row.finished), len(row.missing),
                               " ".join(str(s) for s in row.seeds)]
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
    targets = [(i, r.paper_target * scale) for i, r in enumerate(rows)
               if r.paper_target is not None and r.paper_metric == metric]
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
            ax.scatter([positions[i] for i, _ in targets], [t for _, t in targets], marker="D", color="tab:red",
                       zorder=3, label="paper")
        ax.set_xticks(positions)
        ax.set_xticklabels([r.label for r in rows], rotation=30 if len(rows) > 2 else 0, ha="right" if len(rows) > 2 else "center",
                           fontsize=8)
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

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="summarize.py",
        description=(
            "Summarise a Hydra multirun folder (no W&B needed): reads metrics.json of every job folder "
            "(SWEEP_DIR/0/, 1/, ...), groups the jobs by their overrides without seed=... (seeds are "
            "aggregated), and writes summary.md (markdown table: n finished seeds, mean ± sample std "
            "(ddof=1) of every test/* metric, accuracies in %, the paper's target the preset names and "
            "Δ = mean - target), summary.csv (same numbers as raw floats: <metric>_mean, <metric>_std, n, "
            "missing, paper_metric, paper_target, paper_diff, paper_source) and summary.png (bars of the "
            "main metric with std error bars and the paper target as a marker; a line over the value "
            "when the configurations differ in exactly one numeric override). The table is also "
            "printed; jobs without metrics.json (crashed or still running) are counted per row and "
            "named in a warning."
        ),
        epilog=(
            "Exit codes: 0 done; 2 SWEEP_DIR missing, not a multirun folder, no finished job, or an "
            "unknown --metric.  Examples:  summarize.py outputs/sabour2017_table1/multiruns/<date>_<time>;  "
            "summarize.py SWEEP_DIR --metric val/acc --ignore trainer --out results/"
        ),
    )
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", type=Path,
                        help="Hydra multirun folder: outputs/<task_name>/multiruns/<date>_<time>")
    parser.add_argument("--out", metavar="DIR", type=Path, default=None,
                        help="folder for summary.md/.csv/.png (default: SWEEP_DIR)")
    parser.add_argument("--metric", metavar="NAME", action="append", default=[],
                        help="extra metric column, e.g. val/acc (repeatable); the first one is the main metric "
                             f"that is plotted (default: {DEFAULT_METRIC}); every test/* metric is always shown")
    parser.add_argument("--ignore", metavar="KEY", action="append", default=[],
                        help="override key to leave out of the configuration, so jobs that differ only in it "
                             "are aggregated like seeds (repeatable; 'trainer' also covers trainer.devices)")
    parser.add_argument("--group-by", metavar="KEY", action="append", default=[],
                        help="group by only these override keys (repeatable; same prefix matching); all other "
                             "overrides, seed included, are aggregated")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        summary = summarize(args.sweep_dir, metrics=args.metric, ignore=args.ignore, group_by=args.group_by)
    except SummaryError as err:
        print(f"summarize.py: error: {err}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    plotted = plot(summary, out / "summary.png")
    (out / "summary.md").write_text(render_markdown(summary, "summary.png" if plotted else None))
    write_csv(summary, out / "summary.csv")

    print(render_table(summary))
    written = ["summary.md", "summary.csv"] + (["summary.png"] if plotted else [])
    print(f"Wrote {', '.join(written)} to {out}", flush=True)
    for warning in summary.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``capsnets-summarize``: mean +/- std of the test metrics per configuration of a Hydra multirun (sweep) folder.

Reads the ``metrics.json`` that ``train.py`` writes into every finished job folder of a sweep
(no W&B needed), groups the jobs into configurations (their overrides without ``seed=...``, so
the seeds of one configuration are aggregated), and writes into the sweep folder

  * ``summary.md``  a markdown table: configuration, n (finished seeds), mean +/- std (sample std,
    ddof=1) of every ``test/*`` metric (accuracies as percentages), the paper's number the preset
    names and the difference mean - paper; jobs without ``metrics.json`` are counted per row;
  * ``summary.csv`` the same numbers as raw floats at full precision (separate mean/std columns);
  * ``summary.png`` the main metric per configuration as bars with std error bars and the paper
    target as a marker; a line plot instead when the configurations differ in exactly one
    numeric override (e.g. ``model.routing.iterations=1,2,3,5``).

The markdown table is also printed to stdout; warnings (unfinished jobs, disagreeing paper
targets) go to stderr. Problems with the input (no such folder, not a multirun folder, no
finished job) end the script with exit code 2 and one line naming the problem and the fix.

Usage::

    capsnets-summarize outputs/sabour2017_table1/multiruns/2025-01-31_12-00-00
    capsnets-summarize SWEEP_DIR --metric val/acc          # plot val/acc, add it to the table
    capsnets-summarize SWEEP_DIR --ignore trainer --out results/
    capsnets-summarize SWEEP_DIR --group-by model.routing.iterations

The pieces are importable from :mod:`capsnets.results` (``summarize``, ``render_markdown``, ``write_csv``,
``plot``) for notebooks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from capsnets.results.curves import write_curves
from capsnets.results.report import plot, render_markdown, render_table, write_csv
from capsnets.results.summary import DEFAULT_METRIC, SummaryError, summarize


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capsnets-summarize",
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
            "named in a warning. Several SWEEP_DIRs are summarised as one sweep (seeds run as separate "
            "sweeps): a job that ran the same overrides in two of them counts once, a finished rerun "
            "replacing a crashed job."
        ),
        epilog=(
            "Exit codes: 0 done; 2 SWEEP_DIR missing, not a multirun folder, given twice, no finished job, "
            "an unknown --metric, the same job finished in two SWEEP_DIRs, or several SWEEP_DIRs without "
            "--out.  Examples:  capsnets-summarize outputs/sabour2017_table1/multiruns/<date>_<time>;  "
            "capsnets-summarize SWEEP_DIR --metric val/acc --ignore trainer --out results/;  "
            "capsnets-summarize SEED1_SWEEP SEED2_SWEEP SEED3_SWEEP --out results/"
        ),
    )
    parser.add_argument(
        "sweep_dirs",
        metavar="SWEEP_DIR",
        type=Path,
        nargs="+",
        help="Hydra multirun folder: outputs/<task_name>/multiruns/<date>_<time>; several are summarised as one "
        "sweep (e.g. seeds run as separate sweeps; a job rerun with the same overrides counts once)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=None,
        help="folder for summary.md/.csv/.png (default: SWEEP_DIR; required with several)",
    )
    parser.add_argument(
        "--metric",
        metavar="NAME",
        action="append",
        default=[],
        help="extra metric column, e.g. val/acc (repeatable); the first one is the main metric "
        f"that is plotted (default: {DEFAULT_METRIC}); every test/* metric is always shown",
    )
    parser.add_argument(
        "--ignore",
        metavar="KEY",
        action="append",
        default=[],
        help="override key to leave out of the configuration, so jobs that differ only in it "
        "are aggregated like seeds (repeatable; 'trainer' also covers trainer.devices)",
    )
    parser.add_argument(
        "--group-by",
        metavar="KEY",
        action="append",
        default=[],
        help="group by only these override keys (repeatable; same prefix matching); all other "
        "overrides, seed included, are aggregated",
    )
    parser.add_argument(
        "--curve-ylim",
        metavar=("LOW", "HIGH"),
        type=float,
        nargs=2,
        default=(0.0, 100.0),
        help="accuracy range (%%) of curves.png, e.g. 95 99 to tell late differences apart (default: 0 100)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        low, high = args.curve_ylim
        if not 0 <= low < high <= 100:
            raise SummaryError(f"--curve-ylim {low:g} {high:g}: need 0 <= LOW < HIGH <= 100 (accuracy in percent)")
        if len(args.sweep_dirs) > 1 and args.out is None:
            raise SummaryError(
                f"{len(args.sweep_dirs)} sweep folders are summarised as one: pass --out DIR for the files "
                "(no sweep folder holds all of them)"
            )
        summary = summarize(args.sweep_dirs, metrics=args.metric, ignore=args.ignore, group_by=args.group_by)
    except SummaryError as err:
        print(f"capsnets-summarize: error: {err}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else args.sweep_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    plotted = plot(summary, out / "summary.png")
    (out / "summary.md").write_text(render_markdown(summary, "summary.png" if plotted else None))
    write_csv(summary, out / "summary.csv")
    curve_files = write_curves(summary, out, ylim=(low, high))

    print(render_table(summary))
    written = ["summary.md", "summary.csv"] + (["summary.png"] if plotted else []) + curve_files
    print(f"Wrote {', '.join(written)} to {out}", flush=True)
    for warning in summary.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

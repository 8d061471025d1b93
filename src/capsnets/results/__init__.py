"""Results of runs and sweeps: the ``metrics.json`` schema (:mod:`~capsnets.results.record`), sweep summaries
(:mod:`~capsnets.results.summary`, :mod:`~capsnets.results.report`) and the ``capsnets-summarize`` command."""

from capsnets.results.curves import Curve, curves, write_curves
from capsnets.results.record import (
    metric_value,
    optimized_value,
    paper_reference,
    read_record,
    scalar_metrics,
    write_record,
)
from capsnets.results.report import numeric_axis, plot, render_markdown, render_table, write_csv
from capsnets.results.summary import Job, Row, Stat, Summary, SummaryError, find_jobs, group_jobs, summarize

__all__ = [
    "Curve",
    "curves",
    "write_curves",
    "Job",
    "Row",
    "Stat",
    "Summary",
    "SummaryError",
    "find_jobs",
    "group_jobs",
    "metric_value",
    "numeric_axis",
    "optimized_value",
    "paper_reference",
    "plot",
    "read_record",
    "render_markdown",
    "render_table",
    "scalar_metrics",
    "summarize",
    "write_csv",
    "write_record",
]

"""Summarise Hydra multirun (sweep) folders: read the jobs' ``metrics.json``, group them into
configurations (their overrides without ``seed=...``, so seeds are aggregated) and aggregate the metrics.

Several sweep folders are summarised as one (seeds run as separate sweeps, on other machines or days, or a
crashed job rerun in a sweep of its own); a job that ran the same overrides in two of them counts once.

See :mod:`capsnets.results.record` for the ``metrics.json`` that ``train.py`` writes,
:mod:`capsnets.results.report` for the table/CSV/plot, and ``capsnets-summarize`` (:mod:`capsnets.results.cli`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from capsnets.results.record import read_record

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
    sweep: int = 0  # position of its sweep folder among those summarised (jobs are ordered by sweep, then num)
    name: str = ""  # how messages name it: ``3/``, or ``<sweep folder>/3/`` when several sweeps are summarised

    def __post_init__(self) -> None:
        self.name = self.name or f"{self.num}/"

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
        raise SummaryError(
            f"{sweep_dir} is a file, not a sweep folder; pass the multirun folder that holds 0/, 1/, ..."
        )
    job_dirs = sorted((p for p in _numbered_folders(sweep_dir) if (p / ".hydra").is_dir()), key=lambda p: int(p.name))
    if not job_dirs:
        if (sweep_dir / ".hydra").is_dir():
            fix = "it is a single run's folder; pass a multirun folder (outputs/<task_name>/multiruns/<date>_<time>)"
        else:
            sweeps = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and (p / "multirun.yaml").is_file())
            fix = (
                f"it holds sweep folders, pass one of them, e.g. {sweep_dir / sweeps[-1]}"
                if sweeps
                else "pass the folder Hydra printed for the sweep (it holds multirun.yaml and 0/, 1/, ...)"
            )
        raise SummaryError(f"{sweep_dir} is not a Hydra multirun folder (no numbered job folders with .hydra/); {fix}")
    return [_read_job(p) for p in job_dirs]


def _read_job(path: Path) -> Job:
    """The job's overrides (``.hydra/overrides.yaml``, else those in metrics.json) and its metrics.json."""
    record, problem = read_record(path / "metrics.json")

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

    sweep_dirs: list[Path]  # the folders summarised (one sweep, or several as one)
    rows: list[Row]
    metrics: list[str]  # table columns, the main metric first
    main_metric: str
    common: list[str]  # overrides every configuration shares (left out of the row labels)
    warnings: list[str]
    task_name: str | None = None

    @property
    def sweep_dir(self) -> Path:
        """The (first) sweep folder."""
        return self.sweep_dirs[0]

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
    for job in sorted(jobs, key=lambda j: (j.sweep, j.num)):
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


def sweep_folders(sweep_dirs: Path | str | Sequence[Path | str]) -> list[Path]:
    """The sweep folders to summarise, as paths; raises ``SummaryError`` for none or one named twice."""
    dirs = [Path(sweep_dirs)] if isinstance(sweep_dirs, (str, Path)) else [Path(d) for d in sweep_dirs]
    if not dirs:
        raise SummaryError("no sweep folder given; pass one or more multirun folders (outputs/<task>/multiruns/...)")
    seen: dict[Path, Path] = {}
    for folder in dirs:
        resolved = folder.resolve()
        if resolved in seen:
            raise SummaryError(
                f"{folder} is given twice (also as {seen[resolved]}); its seeds would count twice: pass it once"
            )
        seen[resolved] = folder
    return dirs


def collect_jobs(sweep_dirs: Sequence[Path]) -> tuple[list[Job], list[str]]:
    """The jobs of every sweep folder, named by folder when there are several, and notes on reruns.

    A job that ran exactly the same overrides (seed included) in two folders is one run: the finished one
    counts and a rerun replaces a crashed or unfinished job (noted); two finished runs of the same overrides
    raise ``SummaryError``, since their seed would count twice.
    """
    jobs: list[Job] = []
    # messages name a job by its folder's name, or by the folder as given where two folders share a name
    by_name = len({folder.name for folder in sweep_dirs}) == len(sweep_dirs)
    for index, folder in enumerate(sweep_dirs):
        for job in find_jobs(folder):
            job.sweep = index
            if len(sweep_dirs) > 1:
                job.name = f"{folder.name if by_name else folder}/{job.num}/"
            jobs.append(job)
    if len(sweep_dirs) == 1:
        return jobs, []
    notes: list[str] = []
    kept: dict[tuple[str, ...], Job] = {}
    same_sweep: list[Job] = []  # a sweep that ran the same overrides twice itself (seed=1,1) keeps both
    for job in jobs:
        key = tuple(sorted(job.overrides))
        other = kept.get(key)
        if other is None:
            kept[key] = job
            continue
        if other.sweep == job.sweep:
            same_sweep.append(job)
            continue
        if other.finished and job.finished:
            raise SummaryError(
                f"{other.name} and {job.name} both finished with the same overrides ({' '.join(key) or 'none'}); "
                "the seed would count twice: summarise only one of the two sweep folders"
            )
        if job.finished or not other.finished:  # the finished run counts; of two unfinished ones, the later
            notes.append(f"{job.name} reran {other.name} ({other.problem or 'unfinished'}); counting {job.name}")
            kept[key] = job
        else:
            notes.append(f"{job.name} reran {other.name}, which finished; counting {other.name}")
    return sorted([*kept.values(), *same_sweep], key=lambda j: (j.sweep, j.num)), notes


def summarize(
    sweep_dirs: Path | str | Sequence[Path | str],
    *,
    metrics: Sequence[str] = (),
    ignore: Sequence[str] = (),
    group_by: Sequence[str] = (),
) -> Summary:
    """Read one sweep folder (or several, as one sweep), group the jobs and aggregate their metrics (raises
    ``SummaryError``)."""
    folders = sweep_folders(sweep_dirs)
    jobs, notes = collect_jobs(folders)
    where = ", ".join(str(f) for f in folders)
    finished = [j for j in jobs if j.finished]
    if not finished:
        raise SummaryError(
            f"none of the {len(jobs)} jobs in {where} has a metrics.json (crashed or still running); "
            "wait for the sweep to finish, or see the .log file in each job folder for the error"
        )
    available = sorted({k for j in finished for k in j.metrics})
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise SummaryError(
            f"metric {', '.join(unknown)} is in no job's metrics.json; "
            f"pass --metric with one of: {', '.join(available)}"
        )

    warnings: list[str] = []
    rows = group_jobs(jobs, ignore, group_by)
    columns = choose_metrics(finished, metrics)
    main = metrics[0] if metrics else DEFAULT_METRIC
    if main not in available:
        warnings.append(
            f"metric {main} is in no job's metrics.json, so there is no plot; choose one with --metric "
            f"({', '.join(available) or 'none recorded'})"
        )
    for row in rows:
        for metric in columns:
            values = [j.metrics[metric] for j in row.finished if metric in j.metrics]
            if values:
                row.stats[metric] = Stat.of(values)
        row.paper = _row_paper(row, warnings)

    missing = [j for j in jobs if not j.finished]
    if missing:
        names = ", ".join(f"{j.name} ({j.problem})" if j.problem != "no metrics.json" else j.name for j in missing)
        verb = "has" if len(missing) == 1 else "have"
        warnings.insert(
            0,
            f"{len(missing)} of {len(jobs)} jobs {verb} no metrics.json (crashed or still running) in {where}: {names}",
        )
    task_names = {j.record.get("task_name") for j in finished if j.record is not None}
    common = [o for o in rows[0].overrides if parse_override(o) in common_overrides(rows)] if len(rows) > 1 else []
    return Summary(
        sweep_dirs=folders,
        rows=rows,
        metrics=columns,
        main_metric=main,
        common=common,
        warnings=warnings + notes,
        task_name=task_names.pop() if len(task_names) == 1 else None,
    )


def _row_paper(row: Row, warnings: list[str]) -> dict[str, Any] | None:
    """The paper block of the row's first finished job that has one; warns when its jobs disagree."""
    papers = [(j, j.paper) for j in row.finished if j.paper]
    if not papers:
        return None
    first_job, first = papers[0]
    for job, paper in papers[1:]:
        if (paper.get("metric"), paper.get("target")) != (first.get("metric"), first.get("target")):
            warnings.append(
                f"jobs {first_job.name} and {job.name} of '{row.label}' name different paper targets "
                f"({first.get('metric')}={first.get('target')} vs {paper.get('metric')}={paper.get('target')}); "
                "showing the first"
            )
            break
    return first

"""capsnets-summarize (capsnets.results) on fake sweep folders in the format train.py writes (no training)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from capsnets import results as summarize

from helpers import run_cli

SCRIPT = "-m capsnets.results.cli"  # the capsnets-summarize console script
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_job(
    sweep: Path,
    num: int,
    overrides: list[str],
    metrics: dict[str, float] | None,
    paper: dict[str, Any] | None = None,
    seed: int | None = None,
    task_name: str = "fake_sweep",
    curve: list[dict[str, float]] | None = None,
) -> Path:
    """One job folder as Hydra + train.py leave it; ``metrics=None``: the job did not finish."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"task_name": task_name, "seed": seed}))
    if metrics is not None:
        record = {
            "task_name": task_name,
            "overrides": overrides,
            "seed": seed,
            "optimized_metric": "val/acc",
            "optimized_value": metrics.get("val/acc"),
            "metrics": metrics,
            "paper": paper,
            **({"curve": curve} if curve else {}),
        }
        (job / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    return job


def make_sweep(
    root: Path,
    configs: dict[tuple[str, ...], list[float | None]],
    *,
    seeds: tuple[int, ...] = (1, 2, 3),
    paper: dict[tuple[str, ...], dict[str, Any]] | None = None,
) -> tuple[Path, dict[tuple[str, ...], list[dict]]]:
    """A multirun folder with one job per (configuration, seed), the sweeper's order (seed innermost).
    ``configs[c][i]`` is the test/acc of seed i (None: job unfinished); other metrics derive from it."""
    sweep = root / "outputs" / "fake_sweep" / "multiruns" / "2025-01-31_12-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"mode": "MULTIRUN"}}))
    per_config: dict[tuple[str, ...], list[dict]] = {}
    num = 0
    for config, accs in configs.items():
        per_config[config] = []
        for seed, acc in zip(seeds, accs):
            metrics = None
            if acc is not None:
                metrics = {
                    "test/acc": acc,
                    "test/loss": 1.0 - acc + 0.01 * seed,
                    "val/acc": acc + 0.001,
                    "val/loss": 0.3,
                    "train/loss": 0.4,
                }
                per_config[config].append(metrics)
            write_job(sweep, num, [*config, f"seed={seed}"], metrics, (paper or {}).get(config), seed)
            num += 1
    return sweep, per_config


DR = ("model=dr_caps",)
DR_FASHION = ("model=dr_caps", "data=fashion_mnist")
PAPER = {"metric": "test/acc", "target": 0.903, "source": "Hinton et al. 2018, Table 1"}


@pytest.fixture
def sweep(tmp_path: Path) -> tuple[Path, dict[tuple[str, ...], list[dict]]]:
    return make_sweep(tmp_path, {DR: [0.81, 0.83, 0.86], DR_FASHION: [0.70, 0.74, 0.71]}, paper={DR: PAPER})


def test_mean_std_per_configuration_equal_numpy(sweep) -> None:
    sweep_dir, per_config = sweep
    result = summarize.summarize(sweep_dir)
    assert [r.overrides for r in result.rows] == [list(DR), list(DR_FASHION)]  # seeds aggregated, data splits
    assert result.metrics == ["test/acc", "test/loss"]
    for row, config in zip(result.rows, (DR, DR_FASHION)):
        assert len(row.finished) == 3 and row.seeds == [1, 2, 3]
        for metric in ("test/acc", "test/loss"):
            values = [m[metric] for m in per_config[config]]
            assert row.stats[metric].mean == pytest.approx(np.mean(values), rel=1e-15, abs=0)
            assert row.stats[metric].std == pytest.approx(np.std(values, ddof=1), rel=1e-15, abs=0)
    assert result.common == ["model=dr_caps"]
    assert [r.label for r in result.rows] == ["(common overrides only)", "data=fashion_mnist"]


def test_paper_target_and_difference(sweep) -> None:
    result = summarize.summarize(sweep[0])
    dr, fashion = result.rows
    assert dr.paper_target == 0.903 and dr.paper_metric == "test/acc"
    assert dr.paper_diff == pytest.approx(np.mean([0.81, 0.83, 0.86]) - 0.903)
    assert fashion.paper is None and fashion.paper_diff is None
    table = summarize.render_table(result)
    assert "| paper test/acc | Δ |" in table
    assert f"{np.mean([0.81, 0.83, 0.86]) * 100:.2f} ± {np.std([0.81, 0.83, 0.86], ddof=1) * 100:.2f}" in table
    assert f"| 90.30 | {(np.mean([0.81, 0.83, 0.86]) - 0.903) * 100:+.2f} |" in table


def test_cli_writes_markdown_csv_png(sweep, tmp_path: Path) -> None:
    sweep_dir, per_config = sweep
    proc = run_cli(SCRIPT, str(sweep_dir))
    assert proc.returncode == 0, proc.stderr
    accs = [m["test/acc"] for m in per_config[DR]]
    row_text = f"{np.mean(accs) * 100:.2f} ± {np.std(accs, ddof=1) * 100:.2f}"
    assert row_text in proc.stdout  # the table is printed
    markdown = (sweep_dir / "summary.md").read_text()
    assert row_text in markdown and "Hinton et al. 2018, Table 1" in markdown and "summary.png" in markdown

    with (sweep_dir / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["configuration"] for r in rows] == ["(common overrides only)", "data=fashion_mnist"]
    for row, config in zip(rows, (DR, DR_FASHION)):
        assert row["n"] == "3" and row["missing"] == "0" and row["seeds"] == "1 2 3"
        for metric in ("test/acc", "test/loss"):
            values = [m[metric] for m in per_config[config]]
            assert float(row[f"{metric}_mean"]) == float(np.mean(values))  # full precision round trip
            assert float(row[f"{metric}_std"]) == float(np.std(values, ddof=1))
    assert float(rows[0]["paper_target"]) == 0.903 and rows[0]["paper_source"] == "Hinton et al. 2018, Table 1"
    assert float(rows[0]["paper_diff"]) == float(np.mean(accs)) - 0.903
    assert rows[1]["paper_target"] == "" and rows[1]["paper_diff"] == ""

    png = (sweep_dir / "summary.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000

    out = tmp_path / "elsewhere"
    proc = run_cli(SCRIPT, str(sweep_dir), "--out", str(out), "--metric", "val/acc")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == {"summary.md", "summary.csv", "summary.png"}
    with (out / "summary.csv").open(newline="") as f:
        assert float(next(csv.DictReader(f))["val/acc_mean"]) == float(np.mean([a + 0.001 for a in accs]))


def test_unfinished_job_counted_not_fatal(tmp_path: Path) -> None:
    sweep_dir, per_config = make_sweep(tmp_path, {DR: [0.81, None, 0.86], DR_FASHION: [0.70, 0.74, None]})
    proc = run_cli(SCRIPT, str(sweep_dir))
    assert proc.returncode == 0, proc.stderr
    assert "2 of 6 jobs have no metrics.json" in proc.stderr and "1/, 5/" in proc.stderr
    result = summarize.summarize(sweep_dir)
    assert [(len(r.finished), len(r.missing)) for r in result.rows] == [(2, 1), (2, 1)]
    assert result.rows[0].stats["test/acc"].mean == pytest.approx(np.mean([0.81, 0.86]))
    assert "| configuration | n | missing |" in proc.stdout
    with (sweep_dir / "summary.csv").open(newline="") as f:
        assert [(r["n"], r["missing"]) for r in csv.DictReader(f)] == [("2", "1"), ("2", "1")]


def test_single_seed_has_no_std_and_paper_disagreement_warns(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    write_job(sweep_dir, 0, ["+hinton2018_row=iterations_1"], {"test/acc": 0.9}, PAPER, seed=42)
    write_job(sweep_dir, 1, ["+hinton2018_row=iterations_3"], {"test/acc": 0.98}, {**PAPER, "target": 0.982}, seed=42)
    write_job(
        sweep_dir, 2, ["+hinton2018_row=iterations_3", "seed=1"], {"test/acc": 0.97}, {**PAPER, "target": 0.5}, seed=1
    )
    result = summarize.summarize(sweep_dir)
    assert [r.label for r in result.rows] == ["+hinton2018_row=iterations_1", "+hinton2018_row=iterations_3"]
    assert result.rows[0].stats["test/acc"].std is None
    assert result.rows[1].paper_target == 0.982  # the first job's, with a warning
    assert any("different paper targets" in w for w in result.warnings)
    table = summarize.render_table(result)
    assert "| `+hinton2018_row=iterations_1` | 1 | 90.00 ± – | 90.30 | -0.30 |" in table


def test_ignore_and_group_by(tmp_path: Path) -> None:
    configs = {
        ("model.routing.iterations=1", "trainer=cpu"): [0.90, 0.92],
        ("model.routing.iterations=3", "trainer=cpu"): [0.95, 0.96],
        ("model.routing.iterations=1", "trainer=gpu"): [0.91, 0.93],
    }
    sweep_dir, _ = make_sweep(tmp_path, configs, seeds=(1, 2))
    assert len(summarize.summarize(sweep_dir).rows) == 3
    by_ignore = summarize.summarize(sweep_dir, ignore=["trainer"])
    by_group = summarize.summarize(sweep_dir, group_by=["model.routing.iterations"])
    for result in (by_ignore, by_group):
        assert [r.label for r in result.rows] == ["model.routing.iterations=1", "model.routing.iterations=3"]
        assert result.rows[0].stats["test/acc"].mean == pytest.approx(np.mean([0.90, 0.92, 0.91, 0.93]))
        assert summarize.numeric_axis(result.rows) == ("model.routing.iterations", [1.0, 3.0])
    assert summarize.numeric_axis(summarize.summarize(sweep_dir).rows) is None  # two keys differ


def test_line_plot_over_numeric_override(tmp_path: Path) -> None:
    configs = {(f"model.routing.iterations={r}",): [0.9 + r / 100, 0.91 + r / 100] for r in (1, 2, 3, 5)}
    sweep_dir, _ = make_sweep(tmp_path, configs, seeds=(1, 2))
    result = summarize.summarize(sweep_dir)
    assert summarize.numeric_axis(result.rows) == ("model.routing.iterations", [1.0, 2.0, 3.0, 5.0])
    assert summarize.plot(result, tmp_path / "line.png")
    assert (tmp_path / "line.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("case", ["missing", "not_multirun", "single_run", "no_finished", "unknown_metric"])
def test_errors_exit_2_with_one_line(tmp_path: Path, case: str) -> None:
    target, extra = tmp_path / "sweep", []
    if case == "not_multirun":
        (target / "0").mkdir(parents=True)  # numbered, but no .hydra/
    elif case == "single_run":
        (target / ".hydra").mkdir(parents=True)
    elif case == "no_finished":
        write_job(target, 0, ["seed=1"], None)
        write_job(target, 1, ["seed=2"], None)
    elif case == "unknown_metric":
        write_job(target, 0, ["seed=1"], {"test/acc": 0.9})
        extra = ["--metric", "test/acuracy"]
    proc = run_cli(SCRIPT, str(target), *extra)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capsnets-summarize: error:"), proc.stderr
    expected = {
        "missing": "does not exist",
        "not_multirun": "not a Hydra multirun folder",
        "single_run": "single run's folder",
        "no_finished": "none of the 2 jobs",
        "unknown_metric": "pass --metric with one of: test/acc",
    }[case]
    assert expected in lines[0]
    assert not (target / "summary.md").exists()


def test_help_documents_options() -> None:
    proc = run_cli(SCRIPT, "--help")
    assert proc.returncode == 0
    for option in ("SWEEP_DIR", "--out", "--metric", "--ignore", "--group-by", "summary.csv", "summary.png"):
        assert option in proc.stdout


def test_learning_curves_mean_and_std_per_sample_count(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    curves = {  # (model, seed) -> accuracy at 0, 1000, 2000 samples
        ("model=em_caps_small", 1): [0.10, 0.50, 0.80],
        ("model=em_caps_small", 2): [0.12, 0.60, 0.84],
        ("model=dr_caps", 1): [0.09, 0.90, 0.95],
        ("model=dr_caps", 2): [0.11, 0.92, 0.97],
    }
    for num, ((model, seed), accs) in enumerate(curves.items()):
        points = [{"samples": n, "acc": a} for n, a in zip((0, 1000, 2000), accs)]
        write_job(sweep_dir, num, [model, f"seed={seed}"], {"test/acc": accs[-1]}, seed=seed, curve=points)
    result = summarize.summarize(sweep_dir)
    by_label = {c.label: c for c in summarize.curves(result)}
    assert by_label["model=em_caps_small"].samples == [0, 1000, 2000]
    stat = by_label["model=em_caps_small"].stats[1]
    assert stat.mean == pytest.approx(0.55) and stat.std == pytest.approx(np.std([0.5, 0.6], ddof=1)) and stat.n == 2
    proc = run_cli(SCRIPT, str(sweep_dir))
    assert proc.returncode == 0, proc.stderr
    table = (sweep_dir / "curves.md").read_text()
    assert "| 1,000 | 55.00 ± 7.07 | 91.00 ± 1.41 |" in table
    assert (sweep_dir / "curves.png").read_bytes()[:8] == PNG_MAGIC
    rows = list(csv.DictReader((sweep_dir / "curves.csv").open()))
    assert len(rows) == 6 and {r["configuration"] for r in rows} == {"model=em_caps_small", "model=dr_caps"}
    # the accuracy axis: 0-100 by default, a chosen range to zoom in, a bad range refused
    from capsnets.results.curves import plot_curves

    items = summarize.curves(result)
    assert plot_curves(items, tmp_path / "full.png") == (0.0, 100.0)
    assert plot_curves(items, tmp_path / "zoom.png", ylim=(50.0, 99.0)) == (50.0, 99.0)
    zoomed = run_cli(SCRIPT, str(sweep_dir), "--curve-ylim", "50", "99", "--out", str(tmp_path / "zoomed"))
    assert zoomed.returncode == 0, zoomed.stderr
    assert (tmp_path / "zoomed" / "curves.png").read_bytes() != (sweep_dir / "curves.png").read_bytes()
    bad = run_cli(SCRIPT, str(sweep_dir), "--curve-ylim", "99", "50")
    assert bad.returncode == 2 and "need 0 <= LOW < HIGH <= 100" in bad.stderr


@pytest.mark.parametrize("n", [1, 10, 11, 20, 41])
def test_every_curve_of_a_plot_has_its_own_colour_and_line_style(n):
    from capsnets.results.curves import curve_styles

    styles = curve_styles(n)
    assert len(styles) == n and len(set(styles)) == n
    if n <= 10:  # matplotlib's default colours, solid, as a plain plot of a few curves
        assert all(linestyle == "-" for _, linestyle in styles)


# --- several sweep folders summarised as one --------------------------------------------------


def seed_sweeps(root: Path) -> tuple[Path, Path]:
    """Seeds 1-2 of two configurations in one sweep folder, seed 3 in another (as run on a CPU, a seed a day),
    each job with a learning curve."""
    accs = {DR: [0.81, 0.83, 0.86], DR_FASHION: [0.70, 0.74, 0.71]}
    first, second = root / "seeds12", root / "seed3"
    for folder, seeds in ((first, (1, 2)), (second, (3,))):
        num = 0
        for config, values in accs.items():
            for seed in seeds:
                acc = values[seed - 1]
                curve = [{"samples": 1000, "acc": acc - 0.1}, {"samples": 2000, "acc": acc}]
                write_job(folder, num, [*config, f"seed={seed}"], {"test/acc": acc}, seed=seed, curve=curve)
                num += 1
    return first, second


def test_several_sweep_folders_are_summarised_as_one(tmp_path: Path) -> None:
    first, second = seed_sweeps(tmp_path)
    result = summarize.summarize([first, second])
    assert len(result.rows) == 2 and all(len(r.finished) == 3 for r in result.rows)
    fashion = next(r for r in result.rows if "data=fashion_mnist" in r.overrides)
    assert fashion.stats["test/acc"].mean == pytest.approx(np.mean([0.70, 0.74, 0.71]))
    assert fashion.stats["test/acc"].std == pytest.approx(np.std([0.70, 0.74, 0.71], ddof=1))
    assert sorted(fashion.seeds) == [1, 2, 3]
    curve = next(c for c in summarize.curves(result) if c.label == fashion.label)
    assert curve.stats[0].n == 3 and curve.stats[0].mean == pytest.approx(np.mean([0.60, 0.64, 0.61]))
    # one folder alone: two seeds
    assert [len(r.finished) for r in summarize.summarize(first).rows] == [2, 2]
    out = tmp_path / "together"
    proc = run_cli(SCRIPT, str(first), str(second), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert {"summary.md", "summary.csv", "summary.png", "curves.md", "curves.csv", "curves.png"} <= {
        p.name for p in out.iterdir()
    }
    assert f"`{first}`, `{second}`: 6 of 6 jobs finished" in (out / "summary.md").read_text()
    assert not (first / "summary.md").exists() and not (second / "summary.md").exists()


def test_a_rerun_of_a_crashed_job_replaces_it_and_a_job_finished_twice_is_refused(tmp_path: Path) -> None:
    first, second = seed_sweeps(tmp_path)
    (first / "1" / "metrics.json").unlink()  # model=dr_caps seed=2 crashed in the first sweep ...
    rerun = tmp_path / "rerun"
    write_job(rerun, 0, [*DR, "seed=2"], {"test/acc": 0.84}, seed=2)  # ... and was rerun in a sweep of its own
    result = summarize.summarize([first, second, rerun])
    dr = next(r for r in result.rows if "data=fashion_mnist" not in r.overrides)
    assert len(dr.finished) == 3 and not dr.missing
    assert dr.stats["test/acc"].mean == pytest.approx(np.mean([0.81, 0.84, 0.86]))
    assert any("rerun/0/ reran seeds12/1/" in w for w in result.warnings)
    assert not any("no metrics.json (crashed or still running)" in w for w in result.warnings)
    # the same overrides finished in two folders: the seed would count twice
    write_job(tmp_path / "again", 0, [*DR, "seed=3"], {"test/acc": 0.5}, seed=3)
    proc = run_cli(SCRIPT, str(first), str(second), str(tmp_path / "again"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "seed3/0/ and again/0/ both finished with the same overrides" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["twice", "no_out"])
def test_several_sweep_folders_errors(tmp_path: Path, case: str) -> None:
    first, second = seed_sweeps(tmp_path)
    if case == "twice":
        args = [str(first), str(tmp_path / "." / "seeds12"), "--out", str(tmp_path / "o")]
        expected = "is given twice"
    else:
        args = [str(first), str(second)]
        expected = "pass --out DIR"
    proc = run_cli(SCRIPT, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (first / "summary.md").exists() and not (tmp_path / "o").exists()

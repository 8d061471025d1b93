"""Real Hydra multiruns through the CLI: basic launcher, joblib launcher, Optuna sweeper, and
``capsnets-summarize`` on the finished sweep folders."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml

from helpers import SMALL_DR_CAPS

pytestmark = pytest.mark.slow

TINY_RUN = [
    "data=synthetic",
    *SMALL_DR_CAPS,
    "trainer=cpu",
    "trainer.max_epochs=1",
    "data.num_train=64",
    "data.num_val=32",
    "data.num_test=32",
    "logger=csv",
]


def _only_sweep(log_dir: Path, task: str) -> Path:
    (sweep,) = (log_dir / task / "multiruns").iterdir()
    return sweep


def _metrics(job_dir: Path) -> dict:
    return json.loads((job_dir / "metrics.json").read_text())


def _summary_rows(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    """``python train.py -m ... seed=1,2`` with the basic launcher, default sweep folder layout."""
    from helpers import run_cli

    log_dir = tmp_path_factory.mktemp("basic")
    proc = run_cli("train.py", "-m", *TINY_RUN, "seed=1,2", f"paths.log_dir={log_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _only_sweep(log_dir, "train")


def test_basic_sweep_writes_one_folder_per_job_in_one_sweep_folder(basic_sweep):
    assert basic_sweep.parent.name == "multiruns" and (basic_sweep / "multirun.yaml").is_file()
    assert sorted(p.name for p in basic_sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job, seed in (("0", 1), ("1", 2)):
        assert (basic_sweep / job / "checkpoints" / "last.ckpt").is_file()
        record = _metrics(basic_sweep / job)
        assert record["seed"] == seed and f"seed={seed}" in record["overrides"]
        assert record["optimized_metric"] == "val/acc"
        # what main() returns: val/acc of the best checkpoint (the one tested), monitored by ModelCheckpoint
        assert record["optimized_value"] == record["metrics"]["val/acc_best"]
        assert record["optimized_value"] == pytest.approx(record["metrics"]["val/acc"])  # 1 epoch: best = last
        assert 0.0 <= record["metrics"]["test/acc"] <= 1.0


def test_summarize_aggregates_the_seeds_with_the_right_mean_and_std(cli, basic_sweep):
    proc = cli("-m capsnets.results.cli", str(basic_sweep))
    assert proc.returncode == 0, proc.stderr[-3000:]
    values = [_metrics(basic_sweep / job)["metrics"]["test/acc"] for job in ("0", "1")]
    (row,) = _summary_rows(basic_sweep)  # one configuration: the seeds are aggregated
    assert int(row["n"]) == 2
    assert float(row["test/acc_mean"]) == pytest.approx(statistics.mean(values))
    assert float(row["test/acc_std"]) == pytest.approx(statistics.stdev(values))
    assert f"{100 * statistics.mean(values):.2f}" in (basic_sweep / "summary.md").read_text()
    assert (basic_sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "launcher, marker",
    [
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], "Joblib.Parallel(n_jobs=2"),
        # submitit's local executor: the same pickling and job path as hydra/launcher=slurm, minus sbatch
        (["hydra/launcher=submitit_local"], "Submitit 'local' sweep output dir"),
    ],
    ids=["joblib", "submitit_local"],
)
def test_other_launchers_run_the_same_jobs_in_worker_processes(cli, tmp_path, basic_sweep, launcher, marker):
    proc = cli("train.py", "-m", *launcher, *TINY_RUN, "seed=1,2", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker in proc.stdout + proc.stderr
    sweep = _only_sweep(tmp_path, "train")
    for job in ("0", "1"):
        parallel, serial = _metrics(sweep / job), _metrics(basic_sweep / job)
        assert parallel["seed"] == serial["seed"]
        # same seed, same data, same model: the same run, whichever launcher ran it
        assert parallel["metrics"]["val/loss"] == pytest.approx(serial["metrics"]["val/loss"], rel=1e-4)


def test_optuna_sweep_of_three_trials_maximises_the_returned_metric(cli, tmp_path):
    proc = cli(
        "train.py",
        "-m",
        "hparams_search=dr_caps_optuna",
        "hydra.sweeper.n_trials=3",
        *TINY_RUN,
        f"paths.log_dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = _only_sweep(tmp_path, "dr_caps_optuna")
    trials = {job: _metrics(sweep / job) for job in ("0", "1", "2")}
    assert not (sweep / "3").exists()
    returned = [t["optimized_value"] for t in trials.values()]
    assert all(v is not None for v in returned)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # Optuna only knows what main() returned: its best value is the best trial's val/acc
    assert result["best_value"] == pytest.approx(max(returned))
    best = next(t for t in trials.values() if t["optimized_value"] == max(returned))
    for key, value in result["best_params"].items():
        assert f"{key}={value}" in best["overrides"]
    # the three trials sampled different learning rates; summarize lists each as its own row
    lrs = {next(o for o in t["overrides"] if o.startswith("model.optimizer.lr=")) for t in trials.values()}
    assert len(lrs) == 3
    proc = cli("-m capsnets.results.cli", str(sweep))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _summary_rows(sweep)
    assert len(rows) == 3 and all(int(r["n"]) == 1 for r in rows)
    assert sorted(float(r["test/acc_mean"]) for r in rows) == pytest.approx(
        sorted(t["metrics"]["test/acc"] for t in trials.values())
    )


# --- a failed job: reported, the sweep goes on, the exit code says so ---------------------------------------
FAILING_MIDDLE = ["model.optimizer.lr=0.001,-1,0.002"]  # job 1 has an invalid learning rate


def test_a_failed_job_is_reported_and_the_sweep_goes_on(cli, tmp_path):
    proc = cli("train.py", "-m", *TINY_RUN, *FAILING_MIDDLE, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    sweep = tmp_path / "sweep"
    assert proc.returncode == 2, proc.stderr[-3000:]  # not every job finished
    for job in ("0", "2"):  # the jobs before and after the failure ran to the end
        assert _metrics(sweep / job)["metrics"]["test/acc"] >= 0.0
    failed = json.loads((sweep / "1" / "failed.json").read_text())
    assert failed["job"] == 1 and "model.optimizer.lr=-1" in failed["overrides"]
    assert "model.optimizer.lr" in failed["error"] and not (sweep / "1" / "metrics.json").exists()
    # one line when it happened, one line in the report at the end; no traceback for a capsnets error
    assert proc.stderr.count("model.optimizer.lr must be") == 2
    assert "Sweep " in proc.stderr and "1 job(s) failed" in proc.stderr and "Traceback" not in proc.stderr


def test_multirun_fail_fast_stops_the_sweep_at_the_first_failure(cli, tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli("train.py", "-m", *TINY_RUN, *FAILING_MIDDLE, "multirun_fail_fast=true", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (sweep / "0" / "metrics.json").is_file() and (sweep / "1" / "failed.json").is_file()
    assert not (sweep / "2").exists()  # never started
    assert "multirun_fail_fast=true" in proc.stderr


def test_a_sweep_whose_jobs_all_finish_exits_0(basic_sweep):
    # the fixture asserted rc 0; no job left a failure record
    assert not list(basic_sweep.rglob("failed.json"))

"""Weights & Biases: mode resolution (unit) and real offline runs, one per Hydra job (end to end)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from lightning.pytorch.loggers import WandbLogger

from capsnets.errors import ConfigError
from capsnets.utils import wandb_logger as wl

from helpers import SMALL_DR_CAPS
from wandb_records import read_offline_run


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return monkeypatch


def test_without_credentials_auto_mode_is_offline_and_says_how_to_log_online(no_wandb_env):
    mode, reason = wl.resolve_mode(None)
    assert mode == "offline"
    assert "WANDB_API_KEY" in reason and "wandb login" in reason


def test_wandb_mode_from_environment_is_respected(no_wandb_env):
    no_wandb_env.setenv("WANDB_MODE", "disabled")
    assert wl.resolve_mode(None)[0] == "disabled"
    no_wandb_env.setenv("WANDB_MODE", "dryrun")  # W&B's old name for offline
    assert wl.resolve_mode(None)[0] == "offline"


def test_config_mode_wins_over_environment(no_wandb_env):
    no_wandb_env.setenv("WANDB_MODE", "disabled")
    assert wl.resolve_mode("offline")[0] == "offline"


def test_online_with_key_but_unreachable_server_falls_back_to_offline(no_wandb_env):
    no_wandb_env.setenv("WANDB_API_KEY", "x" * 40)
    no_wandb_env.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: connection refused
    mode, reason = wl.resolve_mode("online", network_timeout=0.5)
    assert mode == "offline" and "not reachable" in reason


def test_online_without_key_falls_back_to_offline_instead_of_prompting(no_wandb_env):
    mode, reason = wl.resolve_mode("online")
    assert mode == "offline" and "API key" in reason


def test_api_key_is_found_in_the_netrc_that_wandb_login_writes(no_wandb_env, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc.chmod(0o600)
    no_wandb_env.setenv("NETRC", str(netrc))
    assert wl.find_api_key() == "abc123"
    no_wandb_env.setenv("WANDB_API_KEY", "fromenv")
    assert wl.find_api_key() == "fromenv"


@pytest.mark.parametrize("bad", ["onlin", "cloud"])
def test_bad_mode_names_the_valid_ones(no_wandb_env, bad):
    with pytest.raises(ConfigError, match="online, offline, disabled"):
        wl.resolve_mode(bad)
    no_wandb_env.setenv("WANDB_MODE", bad)
    with pytest.raises(ConfigError, match="WANDB_MODE"):
        wl.resolve_mode(None)


def test_bad_log_model_is_rejected_before_any_run_starts(no_wandb_env, tmp_path):
    with pytest.raises(ConfigError, match="log_model"):
        wl.wandb_logger(save_dir=str(tmp_path), log_model="sometimes")
    assert not (tmp_path / "wandb").exists()


def test_logger_outside_hydra_uses_task_name_and_folder_name(no_wandb_env, tmp_path):
    logger = wl.wandb_logger(save_dir=str(tmp_path / "run7"), task_name="mytask", tags=["a"])
    assert isinstance(logger, WandbLogger)
    try:
        run = logger.experiment
        assert run.settings.mode == "offline"
        assert run.group == "mytask" and run.name == "run7" and run.job_type == "train"
        assert Path(run.dir).resolve().is_relative_to((tmp_path / "run7").resolve())
    finally:
        wl.finish_loggers([logger])
    assert logger._experiment is None


# --- end to end: a real multirun through the CLI --------------------------------------------------


def _offline_runs(job_dir: Path) -> list[Path]:
    return sorted((job_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_multirun_makes_one_offline_wandb_run_per_job_and_modes_do_not_leak(cli, tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(
        "train.py",
        "-m",
        "data=synthetic",
        *SMALL_DR_CAPS,
        "trainer=cpu",
        "trainer.max_epochs=1",
        "data.num_train=64",
        "data.num_val=32",
        "data.num_test=32",
        "tags=[wbtest]",
        "logger.wandb.log_model=true",
        # job order: (seed 1, auto), (seed 1, disabled), (seed 2, auto): job 2 must not inherit job 1's mode
        "seed=1,2",
        "logger.wandb.mode=null,disabled",
        f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
        # W&B's default folders for staging and caches, kept inside tmp_path to see that nothing lands there
        env={"XDG_DATA_HOME": str(tmp_path / "xdg_data"), "XDG_CACHE_HOME": str(tmp_path / "xdg_cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list((tmp_path / "xdg_data").rglob("staging/*")), "checkpoint artifacts staged outside the run dir"
    overrides = {job: (sweep / job / ".hydra" / "overrides.yaml").read_text() for job in "0123"}
    assert "logger.wandb.mode=disabled" in overrides["1"] and "logger.wandb.mode=null" in overrides["2"]

    assert _offline_runs(sweep / "1") == [] and _offline_runs(sweep / "3") == []
    runs = {}
    for job, seed in (("0", 1), ("2", 2)):
        (run_dir,) = _offline_runs(sweep / job)
        run = read_offline_run(run_dir)
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        runs[job] = run
        # the job's whole resolved config, as a nested plain dict
        assert run.config["seed"] == seed and run.config["task_name"] == "train"
        assert run.config["model"]["net"]["conv1_channels"] == 16
        assert run.config["paths"]["output_dir"] == str(sweep / job)
        assert run.config["logger"]["wandb"]["tags"] == ["wbtest"]
        # summary holds the test metrics of this job
        assert run.summary["test/acc"] == pytest.approx(metrics["metrics"]["test/acc"])
        assert f"seed={seed}" in run.name and run.job_type == "train" and run.tags == ["wbtest"]
        assert run.artifacts, "logger.wandb.log_model=true uploads the checkpoints as artifacts"
        assert list((sweep / job / "wandb").rglob("staging/*")), "offline artifacts are staged in the run dir"
        assert run.exit_code == 0
        assert f"wandb sync {run_dir}" in proc.stdout
        # pictures land under the run dir too
        assert list((sweep / job / "images").rglob("*.png"))
    assert runs["0"].run_id != runs["2"].run_id
    assert runs["0"].group == runs["2"].group == f"train/{sweep.name}"


@pytest.mark.slow
def test_wandb_mode_disabled_in_environment_writes_no_wandb_files(cli, tmp_path):
    proc = cli(
        "train.py",
        "data=synthetic",
        *SMALL_DR_CAPS,
        "trainer=cpu",
        "trainer.max_epochs=1",
        "data.num_train=64",
        "data.num_val=32",
        "data.num_test=32",
        f"paths.log_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"WANDB_MODE": "disabled"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert not list((tmp_path / "run").rglob("*.wandb"))
    assert "wandb sync" not in proc.stdout


@pytest.mark.slow
def test_ddp_spawn_workers_keep_wandb_files_under_the_run_dir(cli, tmp_path):
    """Spawned workers attach to the launching process's run; their files (logged pictures) must
    still land in <run dir>/wandb, not in the directory the command was started from."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = cli(
        "train.py",
        "data=synthetic",
        *SMALL_DR_CAPS,
        "trainer=ddp_sim",
        "trainer.max_epochs=1",
        "data.num_train=64",
        "data.num_val=32",
        "data.num_test=32",
        f"paths.log_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    (run_dir,) = _offline_runs(tmp_path / "run")
    assert list((run_dir / "files" / "media" / "images").rglob("*.png"))
    run = read_offline_run(run_dir)
    assert 0.0 <= run.summary["test/acc"] <= 1.0


@pytest.mark.slow
def test_eval_logs_its_own_wandb_run_with_job_type_eval(cli, tmp_path):
    train = cli(
        "train.py",
        "data=synthetic",
        *SMALL_DR_CAPS,
        "trainer=cpu",
        "trainer.max_epochs=1",
        "logger=csv",
        "data.num_train=64",
        "data.num_val=32",
        "data.num_test=32",
        "~callbacks.confusion_matrix",
        "~callbacks.reconstructions",
        "~callbacks.routing_pictures",
        f"paths.log_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'train'}",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert not (tmp_path / "train" / "wandb").exists()  # logger=csv: no W&B at all
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    proc = cli("eval.py", f"ckpt_path={ckpt}", f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = _offline_runs(tmp_path / "eval")
    run = read_offline_run(run_dir)
    assert run.job_type == "eval" and run.group == "eval" and run.exit_code == 0
    assert run.config["ckpt_path"] == str(ckpt)
    (result,) = ckpt.parent.glob("last.eval-test*.json")
    assert run.summary["test/acc"] == pytest.approx(json.loads(result.read_text())["metrics"]["test/acc"])


def test_failed_online_start_falls_back_to_offline_instead_of_failing_the_job(
    no_wandb_env, tmp_path, monkeypatch, caplog
):
    """wandb.init(mode="online") can still fail after the checks (e.g. an expired key); the run then
    starts offline. Only the online start is made to fail here; the offline run is real."""
    import wandb

    real_init = wandb.init

    def init(*args, **kwargs):
        if kwargs.get("mode") == "online":
            raise wandb.errors.AuthenticationError("API key is invalid")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    no_wandb_env.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(wl, "server_reachable", lambda timeout: True)
    logger = wl.wandb_logger(save_dir=str(tmp_path / "run"))
    assert logger._wandb_init["mode"] == "online"
    try:
        with caplog.at_level("WARNING"):
            run = logger.experiment
        assert run.settings.mode == "offline"
        assert "could not start an online run" in caplog.text and "API key is invalid" in caplog.text
    finally:
        wl.finish_loggers([logger])
    assert _offline_runs(tmp_path / "run")


def test_wandb_folders_are_restored_after_the_run_starts(no_wandb_env, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DATA_DIR", "/somewhere/else")
    monkeypatch.delenv("WANDB_CACHE_DIR", raising=False)
    logger = wl.wandb_logger(save_dir=str(tmp_path / "run"))
    try:
        assert Path(logger.experiment.dir).resolve().is_relative_to((tmp_path / "run").resolve())
    finally:
        wl.finish_loggers([logger])
    assert os.environ["WANDB_DATA_DIR"] == "/somewhere/else" and "WANDB_CACHE_DIR" not in os.environ


@pytest.mark.slow
def test_plain_ddp_gives_one_wandb_run_and_one_summary_from_rank_0(cli, tmp_path):
    """trainer=ddp's launch (each rank re-runs the command) on 2 CPU processes: the other rank has
    dummy loggers and must neither crash on them nor start a run or write metrics.json."""
    proc = cli(
        "train.py",
        "data=synthetic",
        *SMALL_DR_CAPS,
        "trainer=ddp_sim",
        "trainer.strategy=ddp",
        "trainer.max_epochs=1",
        "data.num_train=64",
        "data.num_val=32",
        "data.num_test=32",
        f"paths.log_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count("Run directory:") == 1
    (run_dir,) = _offline_runs(tmp_path / "run")
    run = read_offline_run(run_dir)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert run.summary["test/acc"] == pytest.approx(record["metrics"]["test/acc"])
    assert (proc.stdout + proc.stderr).count("W&B offline:") == 1

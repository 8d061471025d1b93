"""SIGTERM / SIGINT through the real CLI: a resumable checkpoint of the partial epoch, exit 128 + signal with
one line naming it and the resume command, and a resume that continues the step count, the LR schedule and
the samples seen (hence the margin schedule); in a multirun the sweep stops there. Checkpoint writes leave no
temporary file behind, and what a killed writer left is removed at the next start."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from capsnets.utils.checkpoint_io import PartialFileCheckpointIO, remove_stale_partials

from helpers import ROOT, SMALL_DR_CAPS, hermetic_env, run_cli

pytestmark = pytest.mark.slow  # each test trains through train.py

STEPS_PER_EPOCH = 20
COMMON = [
    "model=dr_caps",
    *SMALL_DR_CAPS,
    "data=synthetic",
    f"data.num_train={32 * STEPS_PER_EPOCH}",
    "data.num_val=32",
    "data.num_test=32",
    "data.batch_size=32",
    "logger=csv",
    "callbacks=default",
    "test=false",
]


def interrupt(args: list[str], signum: int, ready: Path) -> subprocess.CompletedProcess:
    """Start ``python train.py args``, wait until ``ready`` exists, send ``signum`` a moment later."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=hermetic_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell starts background jobs (CI, nohup) with SIGINT ignored, and Python keeps an inherited
        # "ignore": give the child the default disposition, as a terminal does
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # into the next epoch
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_saves_the_partial_epoch_and_the_run_resumes(tmp_path, signum):
    run = tmp_path / "run"
    proc = interrupt(
        [*COMMON, "trainer.max_epochs=50", f"hydra.run.dir={run}"], signum, run / "checkpoints" / "last.ckpt"
    )
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    name = signal.Signals(signum).name
    line = next(line for line in proc.stderr.splitlines() if line.startswith("Interrupted:"))
    assert f"interrupted by {name}" in line and f"ckpt_path={run / 'checkpoints' / 'interrupted.ckpt'}" in line
    assert "Traceback" not in proc.stderr
    saved = torch.load(run / "checkpoints" / "interrupted.ckpt", weights_only=True)
    step = saved["global_step"]
    assert STEPS_PER_EPOCH <= step < 50 * STEPS_PER_EPOCH
    assert saved["capsnets"]["samples_seen"] == 32 * step

    # the resume command the line names, with a budget of 2 epochs more than were done
    epochs = step // STEPS_PER_EPOCH + 2
    command = shlex.split(line.split("Resume: python train.py ", 1)[1])  # as a shell would split it
    command = [arg for arg in command if not arg.startswith("trainer.max_epochs=")]
    resumed = run_cli("train.py", *command, f"trainer.max_epochs={epochs}", f"hydra.run.dir={tmp_path / 'resumed'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == epochs * STEPS_PER_EPOCH  # the step count went on from the interruption
    assert last["capsnets"]["samples_seen"] == 32 * last["global_step"]
    scheduler = last["lr_schedulers"][0]
    assert scheduler["last_epoch"] == last["global_step"]  # the per-step LR decay went on too


def test_sigterm_stops_a_sweep_and_says_so(tmp_path):
    sweep = tmp_path / "sweep"
    proc = interrupt(
        ["-m", *COMMON, "trainer.max_epochs=50", "seed=1,2,3", f"hydra.sweep.dir={sweep}"],
        signal.SIGTERM,
        sweep / "0" / "checkpoints" / "last.ckpt",
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert re.search(r"Interrupted: interrupted by SIGTERM .*sweep/0/checkpoints/interrupted.ckpt", proc.stderr)
    assert (sweep / "0" / "checkpoints" / "interrupted.ckpt").exists()
    assert not (sweep / "1").exists() and not (sweep / "2").exists()  # the sweep stopped there


def test_checkpoint_writes_are_whole_and_stale_partials_are_removed(tmp_path):
    io = PartialFileCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.zeros(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # nothing staged is left
    # what a killed writer leaves (a dead pid), and a live writer's file, which must stay
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = path.parent / f"last.ckpt.partial-{int(dead.stdout)}"
    live = path.parent / f"epoch_001.ckpt.partial-{os.getpid()}"
    stale.write_bytes(b"\0" * 1000)
    live.write_bytes(b"\0" * 10)
    assert remove_stale_partials(path.parent, None) == [stale]
    assert not stale.exists() and live.exists() and path.exists()


def test_a_new_start_removes_what_an_interrupted_write_left(tmp_path):
    run = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = run / "checkpoints" / f"last.ckpt.partial-{int(dead.stdout)}"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * 1000)
    proc = run_cli("train.py", *COMMON, "trainer.max_epochs=1", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not stale.exists() and (run / "checkpoints" / "last.ckpt").exists()
    assert not list((run / "checkpoints").glob("*.partial-*"))

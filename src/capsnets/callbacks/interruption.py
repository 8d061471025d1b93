"""SIGTERM and SIGINT (Ctrl-C) during training: a resumable checkpoint of the partial epoch, then a
non-zero exit with one line naming it and the resume command.

Lightning turns SIGTERM into ``SIGTERMException`` at the next batch boundary (and exits 0) and
Ctrl-C into ``KeyboardInterrupt`` (exit 1, nothing saved). ``train.py`` always adds
:class:`Interruption`: on either, while fitting, it writes ``<run>/checkpoints/interrupted.ckpt`` (the
whole training state: weights, optimiser, LR schedule, samples seen, so the margin schedule and the
step count continue) from global rank 0, and ``train.py`` then ends with :class:`Interrupted`: exit
code 128 + the signal number (143 for SIGTERM, 130 for SIGINT), in a multirun too (the sweep stops
there; the jobs not yet started are not run). On SLURM, Lightning's own requeue path
(``SLURMEnvironment(auto_requeue=True)``, the default there) handles SIGUSR1 before any of this.
"""

from __future__ import annotations

import shlex
import signal
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from capsnets.errors import CapsnetsError


class Interrupted(CapsnetsError):
    """Training was stopped by a signal; ``exit_code`` is 128 + its number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class Interruption(Callback):
    """Saves ``interrupted.ckpt`` when fitting is stopped by SIGTERM or SIGINT (see the module docstring)."""

    def __init__(self, run_dir: str | None = None) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.signum: int | None = None
        self.checkpoint: Path | None = None
        self.step: int | None = None
        self.epoch: int | None = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.signum = int(signal.SIGTERM)
        elif isinstance(exception, KeyboardInterrupt):
            self.signum = int(signal.SIGINT)
        else:
            return
        self.step, self.epoch = trainer.global_step, trainer.current_epoch
        if trainer.state.fn != TrainerFn.FITTING:
            return
        path = Path(self.run_dir or trainer.default_root_dir) / "checkpoints" / "interrupted.ckpt"
        # no barrier: the other ranks may already be gone
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        if trainer.is_global_zero:
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
        self.checkpoint = path

    def error(self, overrides: list[str]) -> Interrupted:
        """The Interrupted error for a fit that this callback saw stopped (call only when ``signum`` is set)."""
        assert self.signum is not None
        name = signal.Signals(self.signum).name
        where = f"at step {self.step} (epoch {self.epoch})"
        if self.checkpoint is None:
            return Interrupted(f"interrupted by {name} {where}, outside training; nothing to save.", self.signum)
        kept = [o for o in overrides if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
        command = " ".join(["python train.py", *map(shlex.quote, kept), shlex.quote(f"ckpt_path={self.checkpoint}")])
        return Interrupted(
            f"interrupted by {name} {where}; the training state is saved in {self.checkpoint}. Resume: {command}",
            self.signum,
        )


def interruption_of(callbacks: list[Any]) -> Interruption | None:
    return next((cb for cb in callbacks if isinstance(cb, Interruption)), None)

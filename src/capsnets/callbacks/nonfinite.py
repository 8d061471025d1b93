"""NaN/Inf guard: a non-finite loss or gradient is caught at the optimiser step where it appears.

``train.py`` always adds it (top-level ``nonfinite: stop|skip``; ``callbacks=none`` does not remove it):

* ``stop`` (default): the poisoned update is never applied. The weights and optimiser state from just
  before it (the last good state) are saved as ``<run>/checkpoints/nonfinite.ckpt``, the step, epoch,
  batch index and the non-finite tensors are written to ``<run>/nonfinite.json``, and training ends with
  :class:`NonFiniteError` (exit code 2, one line naming the files and the resume command).
* ``skip``: that optimiser step is skipped (no parameter moves; the LR schedule still advances), the skip
  is counted and logged as ``train/nonfinite_skips``, and after ``nonfinite_max_skips`` consecutive
  skips the run stops as with ``stop``.

Whatever the policy, no checkpoint holding a non-finite weight is ever written (the save is refused), so
a diverged run can never leave NaN weights behind as its best or last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer

from capsnets.errors import CapsnetsError
from capsnets.schema import PositiveInt, checked

Policy = Literal["stop", "skip"]


class NonFiniteError(CapsnetsError, FloatingPointError):
    """Training produced a non-finite loss or gradient (or would save non-finite weights)."""


class NonFiniteGuard(Callback):
    """Catches non-finite losses and gradients before the optimiser applies them (see the module docstring).

    Args:
        policy: ``stop`` or ``skip``.
        max_skips: with ``skip``, stop after this many consecutive skipped steps.
        run_dir: where ``nonfinite.json`` and ``checkpoints/nonfinite.ckpt`` go (default: the trainer's root dir).
    """

    @checked(keys={"policy": "nonfinite", "max_skips": "nonfinite_max_skips"})  # top-level keys of train.yaml
    def __init__(self, policy: Policy = "stop", *, max_skips: PositiveInt = 10, run_dir: str | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.max_skips = max_skips
        self.run_dir = run_dir
        self.skips = 0  # in all
        self.consecutive = 0
        self._loss_finite = True
        self._batch_idx = -1

    # --- detection -------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx
        self._loss_finite = True

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._loss_finite = bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # gradients are already all-reduced under DDP, so every rank reaches the same verdict
        named = [(name, p.grad) for name, p in pl_module.named_parameters() if p.grad is not None]
        # one device sync per step: a tensor's norm is non-finite iff it holds a NaN or an Inf
        norms = torch.stack(torch._foreach_norm([g for _, g in named])) if named else torch.zeros(0)
        if self._loss_finite and bool(torch.isfinite(norms).all()):
            self.consecutive = 0
            return
        bad = [name for (name, g) in named if not bool(torch.isfinite(g).all())]
        if self._loss_finite and not bad:  # a norm can overflow on huge but finite gradients
            self.consecutive = 0
            return
        for p in pl_module.parameters():  # never apply this update
            p.grad = None
        what = (["the loss"] if not self._loss_finite else []) + (
            [f"the gradients of {len(bad)} tensors (e.g. {', '.join(bad[:3])})"] if bad else []
        )
        if self.policy == "skip":
            self.skips += 1
            self.consecutive += 1
            pl_module.log("train/nonfinite_skips", float(self.skips), on_step=True, on_epoch=False)
            if self.consecutive < self.max_skips:
                return
        self._stop(trainer, " and ".join(what), bad)

    # --- stopping --------------------------------------------------------------------------
    def _stop(self, trainer: Trainer, what: str, bad: list[str]) -> None:
        run_dir = Path(self.run_dir or trainer.default_root_dir)
        ckpt = run_dir / "checkpoints" / "nonfinite.ckpt"
        trainer.save_checkpoint(ckpt)  # the state before the poisoned update: finite weights, resumable
        report = {
            "policy": self.policy,
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch_idx": self._batch_idx,
            "nonfinite_loss": not self._loss_finite,
            "nonfinite_gradients": bad,
            "consecutive_skips": self.consecutive,
            "checkpoint": str(ckpt),
        }
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "nonfinite.json").write_text(json.dumps(report, indent=2) + "\n")
        skipped = f" after {self.consecutive} consecutive skipped steps" if self.policy == "skip" else ""
        raise NonFiniteError(
            f"non-finite values in {what} at step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {self._batch_idx}){skipped}; the update was not applied. Last good state: {ckpt}; "
            f"details: {run_dir / 'nonfinite.json'}. Fix: lower model.optimizer.lr (or check the data), then "
            f"resume with ckpt_path={ckpt}, or train with nonfinite=skip to step over rare bad batches."
        )

    # --- never write non-finite weights ------------------------------------------------------
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        for name, value in checkpoint.get("state_dict", {}).items():
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise NonFiniteError(
                    f"refusing to save a checkpoint with non-finite weights ({name}) at step {trainer.global_step}: "
                    f"the run has diverged. Fix: lower model.optimizer.lr and resume from the last checkpoint."
                )

    def state_dict(self) -> dict[str, Any]:
        return {"skips": self.skips}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skips = int(state_dict.get("skips", 0))

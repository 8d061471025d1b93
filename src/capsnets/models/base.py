"""Shared LightningModule base: metrics, optimiser and LR schedule from plain dicts,
a samples-seen counter that survives resume, and checkpoint metadata for ``eval.py``.

Schedules count samples, not steps (DESIGN.md): the exponential LR decay is defined as
``decay_rate`` every ``decay_samples`` training samples (the official CapsNet code decays by
0.96 every 2,000 steps of 128 samples = 256,000 samples), and the step decay multiplies the LR
by ``decay_rate`` at each of ``milestone_samples``, so batch size and device count do not
change the curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Required, TypedDict

import torch
from lightning import LightningModule
from torchmetrics.classification import MulticlassAccuracy

from capsnets.errors import ConfigError
from capsnets.nn.routing import RoutingTrace, recording
from capsnets.schema import Fraction, NonNegativeFloat, NumClasses, OtherKeys, PositiveFloat, Range, checked

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class OptimizerSettings(TypedDict, total=False):
    """``model.optimizer``: ``name`` picks the torch.optim class; every key but ``name`` is passed to it."""

    name: Required[Literal["adam", "adamw", "sgd"]]  # the keys of OPTIMIZERS
    lr: Required[PositiveFloat]
    weight_decay: NonNegativeFloat
    momentum: NonNegativeFloat  # sgd


Optimizer = Annotated[OptimizerSettings, OtherKeys("torch.optim: betas, eps, nesterov, ...")]


SchedulerName = Literal["exponential", "cosine", "multistep", "none"]


class SchedulerSettings(TypedDict, total=False):
    """``model.scheduler``: an exponential decay by ``decay_rate`` every ``decay_samples`` training samples, a
    cosine decay to ``final_fraction`` of the LR over the planned run, a step decay by ``decay_rate`` at each of
    ``milestone_samples`` (training samples seen; torch's MultiStepLR counted in samples), or none."""

    name: SchedulerName
    decay_rate: Annotated[float, Range(1e-12, 1.0)]
    decay_samples: PositiveFloat
    final_fraction: Fraction
    milestone_samples: list[PositiveFloat]


def check_schedule(scheduler: SchedulerSettings) -> None:
    """Rules across settings: the exponential decay needs its rate and its period; the step decay its rate and
    increasing milestones."""
    if scheduler.get("name", "none") == "multistep":
        milestones = scheduler.get("milestone_samples")
        if not milestones or scheduler.get("decay_rate") is None:
            raise ConfigError(
                "model.scheduler.name=multistep multiplies the LR by decay_rate at each of milestone_samples, but "
                f"decay_rate={scheduler.get('decay_rate')} and milestone_samples={milestones}. Fix: e.g. "
                "model.scheduler.decay_rate=0.1 '+model.scheduler.milestone_samples=[6750000,11250000]' (+ where the "
                "model's config has no milestone_samples)."
            )
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ConfigError(
                f"model.scheduler.milestone_samples must increase, got {list(milestones)}. "
                f"Fix: list them in order, e.g. {sorted(set(milestones))}."
            )
    if scheduler.get("name", "none") == "exponential":
        for name in ("decay_rate", "decay_samples"):
            if scheduler.get(name) is None:
                raise ConfigError(
                    f"model.scheduler.name=exponential decays by decay_rate every decay_samples samples, but "
                    f"model.scheduler.{name} is not set. Fix: model.scheduler.{name}=<value> (e.g. decay_rate=0.96 "
                    f"decay_samples=256000), or model.scheduler.name=none."
                )


@dataclass
class CapsuleView:
    """What a model shows of one batch: everything pictures and routing statistics read (see ``inspect``)."""

    scores: torch.Tensor  # (B, K) class scores
    poses: torch.Tensor | None = None  # (B, K, D) class capsules; None for a model without capsules
    decoder: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None  # (poses, labels) -> images
    traces: dict[str, RoutingTrace] = field(default_factory=dict)  # routed layer -> every iteration
    class_layer: str | None = None  # the layer in ``traces`` whose parents are the class capsules


class CapsuleClassifier(LightningModule):
    """Base class: subclasses build ``self.net`` and implement ``shared_step`` and ``class_capsules``.

    ``capsule_kind`` (``vector``, ``matrix`` or None for a model without capsules) is the kind of
    routing the model's capsule layers take (``model.routing``); ``class_layer`` names the layer
    whose routing makes the class capsules.
    """

    capsule_kind: ClassVar[str | None] = None
    class_layer: ClassVar[str | None] = None

    @checked("model", keys={"num_classes": "model.net.num_classes"})
    def __init__(self, *, num_classes: NumClasses, optimizer: Optimizer, scheduler: SchedulerSettings) -> None:
        super().__init__()
        check_schedule(scheduler)
        self.optimizer_cfg = dict(optimizer)
        self.scheduler_cfg = dict(scheduler)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.samples_seen = 0  # global training samples so far (all devices); saved in checkpoints

    # --- subclasses -----------------------------------------------------------------
    def shared_step(self, batch: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Return (loss, class scores (B, K), extra named loss terms to log)."""
        raise NotImplementedError

    def class_capsules(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Class capsules (B, K, D) (None without capsules) and class scores (B, K) of images x."""
        raise NotImplementedError

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (B, K) of images (B, C, H, W), or of multi-crop batches (B, n, C, H, W) averaged over crops."""
        if x.dim() == 5:
            return self.class_capsules(x.flatten(0, 1))[1].view(x.shape[0], x.shape[1], -1).mean(dim=1)
        return self.class_capsules(x)[1]

    @property
    def decoder(self) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
        """The reconstruction decoder, ``(class capsules (N, K, D), labels (N,) or None) -> images``, if any."""
        return None

    def compiled_modules(self) -> dict[str, torch.nn.Module]:
        """The modules a step calls, by name: what ``compile.enabled=true`` compiles (:mod:`capsnets.utils.compile`)."""
        return {"net": self.net}

    @torch.no_grad()
    def inspect(self, x: torch.Tensor, *, traces: bool = True) -> CapsuleView:
        """One forward pass of ``x`` without gradients, with every routing iteration recorded if ``traces``."""
        if not traces:
            return CapsuleView(*reversed(self.class_capsules(x)), decoder=self.decoder, class_layer=self.class_layer)
        with recording(self.net) as layers:
            poses, scores = self.class_capsules(x)
            recorded = {name: layer.trace for name, layer in layers.items() if layer.trace is not None}
        return CapsuleView(scores, poses, self.decoder, recorded, self.class_layer)

    # --- steps ----------------------------------------------------------------------
    def _crops_step(self, batch: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``shared_step`` that also takes multi-crop batches (smallNORB, Hinton et al. 2018):
        x of shape (B, n, C, H, W) is scored crop by crop and the class scores are averaged
        over the n crops of each image."""
        x, y = batch
        if x.dim() != 5:
            return self.shared_step(batch, stage)
        n_crops = x.shape[1]
        loss, scores, parts = self.shared_step((x.flatten(0, 1), y.repeat_interleave(n_crops)), stage)
        return loss, scores.view(x.shape[0], n_crops, -1).mean(dim=1), parts  # scores (B, K)

    def _step(self, batch: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and detached class scores (B, K) of one batch; logs loss, accuracy and loss parts."""
        x, y = batch
        loss, scores, parts = self._crops_step(batch, stage)
        metric = {"train": self.train_acc, "val": self.val_acc, "test": self.test_acc}[stage]
        metric(scores.detach(), y)
        on_step = stage == "train"
        self.log(
            f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=x.shape[0]
        )
        self.log(f"{stage}/acc", metric, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        for name, value in parts.items():
            self.log(f"{stage}/{name}", value, on_step=False, on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        return loss, scores.detach()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.samples_seen += int(batch[0].shape[0]) * self.trainer.world_size
        self.apply_step_decay()

    def on_train_start(self) -> None:
        self.apply_step_decay()  # a resumed run continues at the LR of the samples it has seen

    def apply_step_decay(self) -> None:
        """``model.scheduler.name=multistep``: every parameter group's LR becomes its initial LR x ``decay_rate`` **
        (the number of ``milestone_samples`` that ``samples_seen`` has reached). Set from the samples actually seen,
        so partial batches, another batch size or device count after a resume, all keep the milestones in samples."""
        if self.scheduler_cfg.get("name") != "multistep" or self._trainer is None:
            return
        reached = sum(self.samples_seen >= float(m) for m in self.scheduler_cfg["milestone_samples"])
        factor = float(self.scheduler_cfg["decay_rate"]) ** reached
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor

    # Evaluation steps also return the class scores (B, K), so callbacks can use the predictions
    # without a second forward pass (e.g. capsnets.callbacks.ConfusionMatrixPictures).
    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        loss, scores = self._step(batch, "val")
        return {"loss": loss, "scores": scores}

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        loss, scores = self._step(batch, "test")
        return {"loss": loss, "scores": scores}

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        _, scores, _ = self._crops_step(batch, "predict")
        return scores.argmax(dim=-1)

    # --- optimisation ---------------------------------------------------------------
    def effective_batch_size(self) -> int:
        """Samples consumed by one optimiser step: batch x devices x gradient accumulation."""
        dm = getattr(self.trainer, "datamodule", None)
        batch = getattr(getattr(dm, "hparams", {}), "get", lambda *_: None)("batch_size")
        if batch is None:
            raise ConfigError("The LR schedule counts samples and needs the DataModule's batch_size (data.batch_size).")
        return int(batch) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self) -> Any:
        cfg = dict(self.optimizer_cfg)
        optimizer_cls = OPTIMIZERS[cfg.pop("name")]
        optimizer = optimizer_cls(self.parameters(), **cfg)
        name = self.scheduler_cfg.get("name", "none")
        if name == "none":
            return optimizer
        if name == "cosine":
            # lr(step) = lr0 (f + (1 - f) (1 + cos(pi step / T)) / 2) over the planned run's T optimiser steps
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total) or total < 1:
                raise ConfigError(
                    "model.scheduler.name=cosine decays over the planned run, but the run has no finite length. "
                    "Fix: set trainer.max_epochs or trainer.max_steps, or use model.scheduler.name=exponential."
                )
            f = float(self.scheduler_cfg.get("final_fraction", 0.0))

            def factor(step: int) -> float:
                return f + (1 - f) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if name == "multistep":
            # lr(samples) = lr0 * decay_rate ** (number of milestones <= samples seen): set by apply_step_decay from
            # samples_seen after every batch (a step-counting torch scheduler would count full batches)
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])  # kept in the optimiser's state: a resume restores it
            return optimizer
        # lr(samples) = lr0 * decay_rate ** (samples / decay_samples), applied per step.
        gamma = self.scheduler_cfg["decay_rate"] ** (self.effective_batch_size() / self.scheduler_cfg["decay_samples"])
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints ----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain values only, so torch.load(weights_only=True) can read the file.
        meta: dict[str, Any] = {
            "model_class": f"{type(self).__module__}.{type(self).__qualname__}",
            "samples_seen": self.samples_seen,
        }
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            meta["datamodule_class"] = f"{type(dm).__module__}.{type(dm).__qualname__}"
            meta["datamodule_hparams"] = dict(dm.hparams)
        checkpoint["capsnets"] = meta

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.samples_seen = int(checkpoint.get("capsnets", {}).get("samples_seen", 0))

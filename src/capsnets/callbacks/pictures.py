"""What every picture callback shares: when to draw, the fixed batch, writing PNGs and logging them.

The picture callbacks (:class:`~capsnets.callbacks.ConfusionMatrixPictures`,
:class:`~capsnets.callbacks.ReconstructionPictures`, :class:`~capsnets.callbacks.RoutingPictures`)
draw every ``every_n_epochs`` validation epochs and once at test end. Those that look at single
images use a fixed batch: the first ``num_samples`` validation (test) images, taken from the
batches the model was given, i.e. after the DataModule's device-side conversion (the first crop
of a multi-crop batch), so the pictures of successive epochs show the same images. They ask the
model for what they draw through one method, ``pl_module.inspect(x)`` (a
:class:`~capsnets.models.CapsuleView`), run in eval mode without gradients; models without it
get no such pictures (one debug line).

Only global rank 0 draws. Files: ``<save_dir>/<kind>/epoch=NNN.png`` (0-based epoch, as in the
checkpoint names) and ``<save_dir>/<kind>/test.png``; every W&B and TensorBoard logger receives
them as ``pictures/<stage>/<kind>``. Drawing (matplotlib) runs on a background thread when the
model trains on an accelerator (``background``), flushed before Lightning finalises the loggers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

from capsnets.callbacks.drawing import write_png
from capsnets.schema import NonNegativeInt, PositiveInt, Range, checked

log = logging.getLogger(__name__)

Render = Callable[[], np.ndarray]  # draws one picture from CPU data: () -> (H, W, 3) uint8


def picture_key(callback: PictureCallback, settings: Mapping[str, Any]) -> str:
    """The config key of a picture callback (its class's ``key``): the prefix of its settings in messages."""
    return callback.key


class PictureCallback(Callback):
    """Base of the picture callbacks; subclasses implement :meth:`draw` (and maybe the batch hooks).

    Args:
        save_dir: folder of the PNGs; None = the trainer's ``default_root_dir``/images.
        every_n_epochs: draw after the validation of every n-th epoch (epochs n-1, 2n-1, ...
            counted from 0); 0 = never during fit (only at test end, if ``on_test``).
        on_test: also draw at test end (``<kind>/test.png``).
        num_samples: images in the fixed batch (callbacks that draw single images).
        class_names: one name per class for axis labels; None = the DataModule's ``class_names``
            if it has them, else the class indices.
        pixel_scale: integer zoom of image grids; dpi: resolution of the charts.
        background: draw, write and log on a background thread; None = when the model runs on an
            accelerator (on the CPU a thread would only compete with PyTorch's own threads).
    """

    key = "callbacks.pictures"  # config key of the subclass, for error messages
    uses_fixed_batch = False

    @checked(picture_key)
    def __init__(
        self,
        *,
        save_dir: str | Path | None = None,
        every_n_epochs: NonNegativeInt = 1,
        on_test: bool = True,
        num_samples: PositiveInt = 8,
        class_names: Sequence[str] | None = None,
        pixel_scale: PositiveInt = 2,
        dpi: Annotated[int, Range(20)] = 80,
        background: bool | None = None,
    ) -> None:
        super().__init__()
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.every_n_epochs = every_n_epochs
        self.on_test = on_test
        self.num_samples = num_samples
        self.class_names = list(class_names) if class_names is not None else None
        self.pixel_scale = pixel_scale
        self.dpi = dpi
        self.background = background
        self.fixed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # stage -> the fixed images and labels
        self.draw_seconds: list[float] = []  # time each drawing pass held up training (rank 0)
        self.written: list[Path] = []  # every PNG written, in order
        self._skipped: set[str] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    # --- what subclasses provide ------------------------------------------------------------
    def draw(
        self, stage: str, trainer: Trainer, pl_module: LightningModule, title: str
    ) -> tuple[dict[str, Render], dict[str, float]]:
        """Renderers by picture kind, and scalars to log, at the end of a drawing epoch (rank 0)."""
        raise NotImplementedError

    def collect(self, stage: str, pl_module: LightningModule, outputs: Any, y: torch.Tensor) -> None:
        """Called for every evaluation batch of a drawing epoch, on every rank."""

    def gather(self, stage: str, trainer: Trainer) -> None:
        """Called at the end of a drawing epoch on every rank, before rank 0 draws (collective syncs)."""

    # --- when --------------------------------------------------------------------------------
    def _due(self, trainer: Trainer, stage: str) -> bool:
        if stage == "test":
            return self.on_test
        if trainer.sanity_checking or self.every_n_epochs == 0:
            return False
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._due(trainer, "val"):
            self._batch("val", trainer, pl_module, outputs, batch, dataloader_idx)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._due(trainer, "test"):
            self._batch("test", trainer, pl_module, outputs, batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._due(trainer, "val"):
            self._finish("val", trainer, pl_module, tag=f"epoch={trainer.current_epoch:03d}")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._due(trainer, "test"):
            self._finish("test", trainer, pl_module, tag="test")

    # --- collecting ----------------------------------------------------------------------------
    def _batch(
        self, stage: str, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, dataloader_idx: int
    ) -> None:
        if dataloader_idx != 0 or not isinstance(batch, Sequence) or len(batch) < 2:
            return
        x, y = batch[0], batch[1]
        self.collect(stage, pl_module, outputs, y)
        if self.uses_fixed_batch and trainer.is_global_zero and self._fixed_count(stage) < self.num_samples:
            if x.dim() == 5:  # multi-crop evaluation batch (B, n, C, H, W): the first crop
                x = x[:, 0]
            take = self.num_samples - self._fixed_count(stage)
            x, y = x[:take].detach().clone(), y[:take].detach().clone()
            have = self.fixed.get(stage)
            self.fixed[stage] = (x, y) if have is None else (torch.cat([have[0], x]), torch.cat([have[1], y]))

    def _fixed_count(self, stage: str) -> int:
        have = self.fixed.get(stage)
        return 0 if have is None else have[0].shape[0]

    def inspect(self, pl_module: LightningModule, x: torch.Tensor, *, traces: bool = False) -> Any:
        """``pl_module.inspect(x)`` in eval mode (training mode restored), or None if the model has no ``inspect``."""
        if not callable(getattr(pl_module, "inspect", None)):
            self._skip("inspect", f"{type(pl_module).__name__} has no inspect() method")
            return None
        was_training = pl_module.training
        pl_module.eval()
        try:
            return pl_module.inspect(x, traces=traces)
        finally:
            pl_module.train(was_training)

    # --- drawing (rank 0) --------------------------------------------------------------------
    def _finish(self, stage: str, trainer: Trainer, pl_module: LightningModule, *, tag: str) -> None:
        self.gather(stage, trainer)
        if not trainer.is_global_zero:
            return
        start = time.perf_counter()
        jobs, scalars = self.draw(stage, trainer, pl_module, f"{stage} {tag}")
        step = trainer.global_step
        if scalars:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)
        root = self.save_dir if self.save_dir is not None else Path(trainer.default_root_dir) / "images"
        publish = partial(
            self._publish, jobs, root=root, tag=tag, stage=stage, step=step, loggers=list(trainer.loggers)
        )
        device = getattr(pl_module, "device", torch.device("cpu"))
        if self.background if self.background is not None else device.type != "cpu":
            self._submit(publish)
        else:
            publish()
        self.draw_seconds.append(time.perf_counter() - start)

    def _publish(
        self, jobs: Mapping[str, Render], *, root: Path, tag: str, stage: str, step: int, loggers: list[Logger]
    ) -> None:
        """Draw each picture, write its PNG and hand it to every W&B / TensorBoard logger."""
        for kind, render in jobs.items():
            pixels = render()
            path = write_png(pixels, root / kind / f"{tag}.png")
            self.written.append(path)
            key = f"pictures/{stage}/{kind}"
            for logger in loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=key, images=[str(path)], step=step, caption=[tag])
                elif isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(key, pixels, global_step=step, dataformats="HWC")

    def class_names_for(self, trainer: Trainer | None) -> list[str] | None:
        if self.class_names is not None:
            return self.class_names
        names = getattr(getattr(trainer, "datamodule", None), "class_names", None) if trainer is not None else None
        return list(names) if names is not None else None

    def _skip(self, kind: str, reason: str) -> None:
        """Log once per kind why a picture does not apply to this model."""
        if kind not in self._skipped:
            self._skipped.add(kind)
            log.debug("pictures: no %s, %s.", kind, reason)

    # --- background thread ---------------------------------------------------------------------
    def _submit(self, publish: Callable[[], None]) -> None:
        """Run ``publish`` on the picture thread (one worker, so pictures keep their order); a pass
        that failed in the meantime raises its error here, at the next drawing epoch."""
        finished = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in finished:
            future.result()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capsnets-pictures")
        self._pending.append(self._executor.submit(publish))

    def flush(self) -> None:
        """Wait until every submitted picture is written and logged; re-raise a drawing error."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def _shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # the run failed: finish what was drawn, but keep the run's own error
        pending, self._pending = self._pending, []
        for future in pending:
            try:
                future.result()
            except Exception as err:  # noqa: BLE001
                log.warning("pictures: drawing failed too: %s", err)
        self._shutdown()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # end of fit / validate / test, before Lightning finalises the loggers
        try:
            self.flush()
        finally:
            self._shutdown()

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callbacks: threads and futures stay behind
        state = self.__dict__.copy()
        state["_executor"], state["_pending"] = None, []
        return state

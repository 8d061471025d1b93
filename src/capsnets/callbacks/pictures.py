"""Pictures a researcher wants to look at, written as PNG under the run dir and sent to the loggers.

:class:`PicturesCallback` draws, every ``every_n_epochs`` validation epochs and once at test end:

* ``reconstructions``: the fixed images (top row) and the decoder's reconstructions from the
  predicted class capsule (bottom row); dr_caps with ``model.net.reconstruction=true``.
* ``perturbations``: each dimension of the predicted class capsule shifted over
  ``[-perturb_range, perturb_range]`` in ``perturb_steps`` steps and decoded, one row per
  dimension (Sabour et al. 2017, Fig. 4); dr_caps with a decoder.
* ``confusion_matrix``: true vs predicted class over the whole validation (test) set; every
  model whose evaluation step returns its class scores (all capsnets models).
* ``routing``: per routing iteration, the entropy of each child's couplings (dynamic routing)
  or assignments (EM routing) and histograms of each child's largest one; capsule models.
* ``class_activations``: EM class-capsule activations of the fixed images, and how the true
  and the other classes' activations develop over the routing iterations; em_caps models.

Pictures that do not apply to the model are skipped (one debug line each). All but the
confusion matrix use a fixed batch: the first ``num_samples`` validation (test) images, taken
from the batches the model was given, i.e. after the DataModule's device-side conversion
(uint8 -> float, smallNORB crops; the first crop of a multi-crop batch), so the pictures of
successive epochs show the same images. Only global rank 0 draws, with the network in eval mode
and without gradients; the only collective call, summing the confusion counts, runs on every
rank before. Files: ``<save_dir>/<kind>/epoch=NNN.png`` (0-based epoch as in the checkpoint
names) and ``<save_dir>/<kind>/test.png``.

Cost: the training loop pays for the confusion counts (a bincount per evaluation batch) and
one forward pass on the fixed images; drawing (matplotlib), PNG writing and logging, a few
hundred milliseconds of CPU per pass, run on a background thread when the model trains on an
accelerator (``background``), flushed before Lightning finalises the loggers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from torch import nn

from capsnets.callbacks.drawing import (
    class_activations_figure,
    confusion_matrix_figure,
    perturbation_grid,
    reconstruction_grid,
    routing_figure,
    write_png,
)
from capsnets.callbacks.routing_stats import record_routing, routing_statistics
from capsnets.errors import ConfigError
from capsnets.nn.class_caps import ClassCapsules
from capsnets.nn.decoder import ReconstructionDecoder
from capsnets.nn.dynamic_routing import RoutingCapsules
from capsnets.nn.em_routing import EMRouting
from capsnets.utils.validation import require_int, require_positive

log = logging.getLogger(__name__)

KINDS = ("reconstructions", "perturbations", "confusion_matrix", "routing", "class_activations")
FIXED_BATCH_KINDS = ("reconstructions", "perturbations", "routing", "class_activations")
KEY = "callbacks.pictures"
Render = Callable[[], np.ndarray]  # draws one picture from CPU data: () -> (H, W, 3) uint8


def confusion_counts(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts, row = true class, column = predicted class, on the inputs' device."""
    flat = targets.long() * num_classes + preds.long()  # (B,) cell index
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def perturbed_capsules(v: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Copies of the class capsules ``v`` (S, K, D) with one dimension of the ``labels`` capsule shifted.

    Returns (S, D, T, K, D): entry [s, d, t] is ``v[s]`` with ``offsets[t]`` added to dimension d
    of capsule ``labels[s]``; the other capsules are unchanged (the decoder masks them anyway).
    """
    s, k, d = v.shape
    shift = torch.eye(d, dtype=v.dtype, device=v.device)[:, None, :] * offsets.to(v)[None, :, None]  # (D, T, D)
    one_hot = torch.nn.functional.one_hot(labels, k).to(v.dtype)  # (S, K)
    return v[:, None, None] + one_hot[:, None, None, :, None] * shift[None, :, :, None, :]  # (S, D, T, K, D)


def perturbed_reconstructions(decoder: nn.Module, v: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Decode :func:`perturbed_capsules`, masked by ``labels``: (S, D, T, C, H, W) images."""
    s, _, d = v.shape
    t = offsets.numel()
    capsules = perturbed_capsules(v, labels, offsets)  # (S, D, T, K, D)
    images = decoder(capsules.flatten(0, 2), labels.repeat_interleave(d * t))  # (S*D*T, C, H, W)
    return images.view(s, d, t, *images.shape[1:])


class PicturesCallback(Callback):
    """Draws the pictures listed in ``kinds`` (see the module docstring) and logs them.

    Args:
        save_dir: folder of the PNGs (``<save_dir>/<kind>/epoch=NNN.png``); None = the
            trainer's ``default_root_dir``/images.
        every_n_epochs: draw after the validation of every n-th epoch (epochs n-1, 2n-1, ...
            counted from 0); 0 = never during fit (only at test end, if ``on_test``).
        kinds: which pictures to draw, any of :data:`KINDS`.
        num_samples: images in the fixed batch (reconstructions, routing, activations).
        perturb_range: each capsule dimension is shifted over [-range, range] (paper: 0.25).
        perturb_steps: number of shifts, evenly spaced (paper: 11, i.e. steps of 0.05).
        perturb_samples: fixed images whose perturbation grid is drawn, side by side.
        on_test: also draw at test end (``<kind>/test.png``, the confusion matrix of the test set).
        class_names: one name per class for axis labels; None = the DataModule's ``class_names``
            if it has them, else the class indices.
        log_routing_scalars: also log the mean child entropy of every routing iteration as
            metrics ``<stage>/routing/<layer>/entropy_iter<t>`` (all loggers).
        pixel_scale: integer zoom of image grids (28 px digits are small on screen).
        dpi: resolution of the charts.
        background: draw, write and log the pictures on a background thread, so training goes
            on meanwhile (the forward pass on the fixed batch and the scalars stay in the
            training loop); flushed at the end of fit, validate and test. None = when the model
            runs on an accelerator, whose host CPU is mostly idle; on the CPU a thread would
            only compete with PyTorch's own threads.
    """

    def __init__(
        self,
        *,
        save_dir: str | Path | None = None,
        every_n_epochs: int = 1,
        kinds: Sequence[str] = KINDS,
        num_samples: int = 8,
        perturb_range: float = 0.25,
        perturb_steps: int = 11,
        perturb_samples: int = 1,
        on_test: bool = True,
        class_names: Sequence[str] | None = None,
        log_routing_scalars: bool = True,
        pixel_scale: int = 2,
        dpi: int = 80,
        background: bool | None = None,
    ) -> None:
        super().__init__()
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.every_n_epochs = require_int(f"{KEY}.every_n_epochs", every_n_epochs, minimum=0)
        if isinstance(kinds, str) or any(kind not in KINDS for kind in kinds):
            raise ConfigError(f"{KEY}.kinds must be a list of {', '.join(KINDS)}; got {kinds!r}.")
        self.kinds = tuple(dict.fromkeys(kinds))
        self.num_samples = require_int(f"{KEY}.num_samples", num_samples)
        self.perturb_range = require_positive(f"{KEY}.perturb_range", perturb_range)
        self.perturb_steps = require_int(f"{KEY}.perturb_steps", perturb_steps, minimum=2)
        self.perturb_samples = require_int(f"{KEY}.perturb_samples", perturb_samples)
        self.on_test = bool(on_test)
        if class_names is not None and (isinstance(class_names, str) or not isinstance(class_names, Sequence)):
            raise ConfigError(f"{KEY}.class_names must be a list of names or null; got {class_names!r}.")
        self.class_names = list(class_names) if class_names is not None else None
        self.log_routing_scalars = bool(log_routing_scalars)
        self.pixel_scale = require_int(f"{KEY}.pixel_scale", pixel_scale)
        self.dpi = require_int(f"{KEY}.dpi", dpi, minimum=20)
        self.background = None if background is None else bool(background)
        # per stage ("val", "test"): the fixed images and labels, kept once complete
        self.fixed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._confusion: dict[str, torch.Tensor | None] = {}  # counts being summed this epoch, per stage
        self.confusion: dict[str, torch.Tensor] = {}  # the last complete confusion counts (K, K) per stage (rank 0)
        self._skipped: set[str] = set()  # skip reasons already logged
        self.draw_seconds: list[float] = []  # time each drawing pass held up training (rank 0)
        self.render_seconds: list[float] = []  # time each pass took to draw, write and log (maybe in the background)
        self.written: list[Path] = []  # every PNG written, in order
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    # --- when ------------------------------------------------------------------------------
    def _due(self, trainer: Trainer, stage: str) -> bool:
        if stage == "test":
            return self.on_test
        if trainer.sanity_checking or self.every_n_epochs == 0:
            return False
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    # --- Lightning hooks -------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._confusion["val"] = None

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._confusion["test"] = None

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._due(trainer, "val"):
            self._collect("val", trainer, pl_module, outputs, batch, dataloader_idx)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._due(trainer, "test"):
            self._collect("test", trainer, pl_module, outputs, batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._due(trainer, "val"):
            self._finish("val", trainer, pl_module, tag=f"epoch={trainer.current_epoch:03d}")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._due(trainer, "test"):
            self._finish("test", trainer, pl_module, tag="test")

    # --- collecting (every rank; cheap) ------------------------------------------------------
    def _collect(self, stage: str, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                 dataloader_idx: int) -> None:
        if dataloader_idx != 0 or not isinstance(batch, Sequence) or len(batch) < 2:
            return
        x, y = batch[0], batch[1]
        scores = outputs.get("scores") if isinstance(outputs, Mapping) else None
        if "confusion_matrix" in self.kinds and isinstance(scores, torch.Tensor) and scores.dim() == 2:
            counts = confusion_counts(scores.argmax(dim=-1), y, scores.shape[-1])
            previous = self._confusion.get(stage)
            self._confusion[stage] = counts if previous is None else previous + counts
        if trainer.is_global_zero and self._fixed_count(stage) < self.num_samples and self._fixed_batch_kinds(pl_module):
            self._keep_fixed(stage, x, y)

    def _fixed_count(self, stage: str) -> int:
        have = self.fixed.get(stage)
        return 0 if have is None else have[0].shape[0]

    def _keep_fixed(self, stage: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """Append images to the fixed batch until it holds ``num_samples`` (then it never changes)."""
        have = self.fixed.get(stage)
        count = self._fixed_count(stage)
        if x.dim() == 5:  # multi-crop evaluation batch (B, n, C, H, W): the first crop
            x = x[:, 0]
        take = self.num_samples - count
        x, y = x[:take].detach().clone(), y[:take].detach().clone()
        self.fixed[stage] = (x, y) if have is None else (torch.cat([have[0], x]), torch.cat([have[1], y]))

    # --- drawing (rank 0) ------------------------------------------------------------------
    def _finish(self, stage: str, trainer: Trainer, pl_module: LightningModule, *, tag: str) -> None:
        counts = self._confusion.pop(stage, None)
        if counts is not None and trainer.world_size > 1:
            # every rank takes part in the sum; everything below runs on rank 0 only
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        if not trainer.is_global_zero:
            return
        start = time.perf_counter()
        title = f"{stage} {tag}"
        jobs: dict[str, Render] = {}
        scalars: dict[str, float] = {}
        if "confusion_matrix" in self.kinds:
            if counts is not None:
                self.confusion[stage] = counts.cpu()
                jobs["confusion_matrix"] = partial(
                    confusion_matrix_figure, self.confusion[stage], class_names=self._class_names(trainer), title=title, dpi=self.dpi
                )
            else:
                self._skip("confusion_matrix", f"{type(pl_module).__name__}'s {stage} step returns no class scores")
        if stage in self.fixed:  # collected only when a fixed-batch picture applies
            x, y = self.fixed[stage]
            fixed_jobs, scalars = self.fixed_batch_jobs(pl_module, x, y, stage=stage, title=title, trainer=trainer)
            jobs.update(fixed_jobs)
        step = trainer.global_step
        if scalars:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)
        root = self.save_dir if self.save_dir is not None else Path(trainer.default_root_dir) / "images"
        publish = partial(self._render_and_publish, jobs, root=root, tag=tag, stage=stage, step=step, loggers=list(trainer.loggers))
        in_background = self.background if self.background is not None else pl_module.device.type != "cpu"
        if in_background:
            self._submit(publish)
        else:
            publish()
        self.draw_seconds.append(time.perf_counter() - start)
        log.debug("pictures (%s %s): %s; %.3f s in the training process", stage, tag, ", ".join(jobs) or "none", self.draw_seconds[-1])

    def fixed_batch_jobs(self, pl_module: LightningModule, x: torch.Tensor, y: torch.Tensor, *, stage: str = "val",
                         title: str = "", trainer: Trainer | None = None) -> tuple[dict[str, Render], dict[str, float]]:
        """Renderers of the fixed-batch pictures that apply to ``pl_module``'s network, and the routing scalars.

        Runs one forward pass of the network in eval mode without gradients (recording the
        routing iterations when a routing picture is wanted; training mode is restored after)
        and moves what the pictures need to the CPU; the returned renderers only draw.
        """
        net: nn.Module = getattr(pl_module, "net", pl_module)
        kinds = self._fixed_batch_kinds(pl_module)
        jobs: dict[str, Render] = {}
        scalars: dict[str, float] = {}
        if not kinds:
            return jobs, scalars
        wants_routing = "routing" in kinds or "class_activations" in kinds
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad(), record_routing(net) if wants_routing else nullcontext():
                out = net(x)
                if "routing" in kinds:
                    stats = routing_statistics(net)
                    if stats:
                        jobs["routing"] = partial(routing_figure, stats, title=title, dpi=self.dpi)
                        if self.log_routing_scalars:
                            for layer in stats:
                                for t, value in enumerate(layer.mean_entropy(), start=1):
                                    scalars[f"{stage}/routing/{layer.name}/entropy_iter{t}"] = value
                    else:
                        self._skip("routing", f"{type(net).__name__}'s routing layers recorded no iterations")
                if "reconstructions" in kinds or "perturbations" in kinds:
                    jobs.update(self._decoder_jobs(net, x, out, kinds))
                if "class_activations" in kinds:
                    job = self._class_activations_job(net, out, y, title, trainer)
                    if job is not None:
                        jobs["class_activations"] = job
        finally:
            net.train(was_training)
        return jobs, scalars

    def _fixed_batch_kinds(self, pl_module: LightningModule) -> list[str]:
        """The wanted fixed-batch pictures that ``pl_module``'s network can give (by its layers),
        so that a network with none of them costs no forward pass; the others are skipped with
        one debug line each."""
        net: nn.Module = getattr(pl_module, "net", pl_module)
        layers = list(net.modules())
        has = {
            "routing": any(isinstance(m, (RoutingCapsules, EMRouting)) for m in layers),
            "reconstructions": isinstance(getattr(net, "decoder", None), ReconstructionDecoder),
            "class_activations": any(isinstance(m, ClassCapsules) for m in layers),
        }
        has["perturbations"] = has["reconstructions"]
        why = {
            "routing": "has no routing layer",
            "reconstructions": "has no reconstruction decoder (dr_caps with model.net.reconstruction=true has)",
            "class_activations": "has no EM class capsules",
        }
        why["perturbations"] = why["reconstructions"]
        wanted = [kind for kind in FIXED_BATCH_KINDS if kind in self.kinds]
        for kind in wanted:
            if not has[kind]:
                self._skip(kind, f"{type(net).__name__} {why[kind]}")
        return [kind for kind in wanted if has[kind]]

    def draw_fixed_batch(self, pl_module: LightningModule, x: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> dict[str, np.ndarray]:
        """The fixed-batch pictures of ``x``, ``y`` as (H, W, 3) arrays, drawn now (see :meth:`fixed_batch_jobs`)."""
        jobs, _ = self.fixed_batch_jobs(pl_module, x, y, **kwargs)
        return {kind: render() for kind, render in jobs.items()}

    def _decoder_jobs(self, net: nn.Module, x: torch.Tensor, out: Any, kinds: Sequence[str]) -> dict[str, Render]:
        """Reconstructions of ``x`` and perturbation grids, for a vector-capsule network with a decoder."""
        decoder = net.decoder
        if not isinstance(out, torch.Tensor) or out.dim() != 3:
            for kind in ("reconstructions", "perturbations"):
                self._skip(kind, f"{type(net).__name__} has a decoder but does not return class capsules (B, K, D)")
            return {}
        v = out  # (N, K, D) class capsules
        preds = v.norm(dim=-1).argmax(dim=-1)  # (N,): the decoder is masked by the prediction, as in evaluation
        jobs: dict[str, Render] = {}
        if "reconstructions" in kinds:
            jobs["reconstructions"] = partial(reconstruction_grid, x.cpu(), decoder(v, preds).cpu(), scale=self.pixel_scale)
        if "perturbations" in kinds:
            n = min(self.perturb_samples, v.shape[0])
            offsets = torch.linspace(-self.perturb_range, self.perturb_range, self.perturb_steps, device=v.device)
            images = perturbed_reconstructions(decoder, v[:n], preds[:n], offsets)  # (S, D, T, C, H, W)
            jobs["perturbations"] = partial(perturbation_grid, images.cpu(), scale=self.pixel_scale)
        return jobs

    def _class_activations_job(self, net: nn.Module, out: Any, y: torch.Tensor, title: str, trainer: Trainer | None) -> Render | None:
        """EM class-capsule activations (final, and per routing iteration from the trace)."""
        class_layer = next(m for m in net.modules() if isinstance(m, ClassCapsules))
        if not (isinstance(out, tuple) and len(out) == 2):
            self._skip("class_activations", f"{type(net).__name__} does not return (class poses, class activations)")
            return None
        trace = class_layer.routing.routing_trace
        per_iteration = torch.stack([a.squeeze(1) for a in trace.activations]).cpu() if trace is not None else None  # (T, N, K)
        return partial(
            class_activations_figure, out[1].cpu(), y.cpu(), per_iteration=per_iteration,
            class_names=self._class_names(trainer), title=title, dpi=self.dpi,
        )

    # --- output ----------------------------------------------------------------------------
    def _render_and_publish(self, jobs: dict[str, Render], *, root: Path, tag: str, stage: str, step: int,
                            loggers: list[Logger]) -> None:
        """Draw each picture, write its PNG and hand it to every W&B / TensorBoard logger."""
        start = time.perf_counter()
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
        self.render_seconds.append(time.perf_counter() - start)

    def _submit(self, publish: Callable[[], None]) -> None:
        """Run ``publish`` on the picture thread (one worker, so pictures keep their order).

        A pass that failed in the meantime raises its error here, at the next drawing epoch.
        """
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

    def _class_names(self, trainer: Trainer | None) -> list[str] | None:
        if self.class_names is not None:
            return self.class_names
        names = getattr(getattr(trainer, "datamodule", None), "class_names", None) if trainer is not None else None
        return list(names) if names is not None else None

    def _skip(self, kind: str, reason: str) -> None:
        """Log once per kind why a picture does not apply to this model."""
        if kind not in self._skipped:
            self._skipped.add(kind)
            log.debug("pictures: no %s, %s.", kind, reason)

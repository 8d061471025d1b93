"""Training throughput as a user sees it: images per second through the whole Lightning loop.

The time between the ends of two consecutive training batches covers everything one step costs in
``train.py``: fetching and moving the batch (the DataModule), the forward and backward passes, the
optimiser step, logging and every callback. The first ``skip`` batches of each epoch (allocator and
DataLoader warm-up) are left out; the median over the rest is logged as ``perf/train_images_per_s``
(per device; times the world size for all devices) at each epoch end, so it lands in ``metrics.json``.
``scripts/bench.py`` compares it with the bare training step of the same model (``make bench``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from lightning import Callback, LightningModule, Trainer

from capsnets.schema import PositiveInt, checked

KEY = "callbacks.throughput"


class Throughput(Callback):
    """Median training images/s over each epoch (after ``skip`` warm-up batches), logged as
    ``perf/train_images_per_s``; ``images_per_s`` holds the last epoch's value."""

    @checked(KEY)
    def __init__(self, *, skip: PositiveInt = 3) -> None:
        super().__init__()
        self.skip = skip
        self.images_per_s: float | None = None
        self._last: float | None = None
        self._rates: list[float] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last, self._rates = None, []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None and batch_idx >= self.skip:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            self._rates.append(len(x) / (now - self._last))
        self._last = now

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._rates:
            self.images_per_s = statistics.median(self._rates)
            pl_module.log("perf/train_images_per_s", self.images_per_s, on_epoch=True, sync_dist=False)

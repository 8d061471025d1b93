"""Lightning's CSV logger, made safe for a fit and a test in separate ``ddp_spawn`` launches."""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.utilities import rank_zero_only


class CSVLogger(_LightningCSVLogger):
    """``<save_dir>/<name>/version_N/metrics.csv`` with one column per metric.

    Under ``ddp_spawn`` each ``trainer.fit`` / ``trainer.test`` runs in fresh processes that get a
    copy of the launching process's logger, which never saw the columns the fit wrote. Lightning's
    writer then rewrites the file with only the test columns and fails on the old rows; this logger
    first reads the existing header, so the file keeps every column.
    """

    @rank_zero_only
    def save(self) -> None:
        writer = self.experiment
        path = writer.metrics_file_path
        if writer.metrics and writer._fs.isfile(path):
            with writer._fs.open(path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            missing = [key for key in header if key not in writer.metrics_keys]
            writer.metrics_keys.extend(missing)
        super().save()

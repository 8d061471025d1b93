"""After a multirun: which jobs finished, which failed, and an exit code that says so.

A Hydra callback (``hydra.callbacks.sweep_report`` in ``conf/hydra/default.yaml``), run in the process
that launched the sweep: it reads the ``failed.json`` that :func:`capsnets.errors.exit_on_error` wrote into
each failed job's folder (so it works for launchers that run jobs in other processes too), prints one
line per failed job with its overrides and message, and exits 2 when any job failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from capsnets.errors import FAILED_JOB_FILE


def failed_jobs(sweep_dir: Path) -> list[dict]:
    """The ``failed.json`` records under a sweep folder, by job number."""
    records = []
    for path in sweep_dir.rglob(FAILED_JOB_FILE):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {"job": None, "overrides": [], "error": f"unreadable {path}"}
        record["folder"] = str(path.parent)
        records.append(record)
    return sorted(records, key=lambda r: (r.get("job") is None, r.get("job") or 0))


class SweepReport(Callback):
    """Names the failed jobs of a multirun and exits 2 if there were any (0 when every job finished)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        failed = failed_jobs(sweep_dir)
        if not failed:
            return
        lines = [f"Sweep {sweep_dir}: {len(failed)} job(s) failed; the others ran to the end:"]
        for record in failed:
            overrides = " ".join(record.get("overrides") or [])
            lines.append(f"  job {record.get('job')} ({overrides}): {record.get('error')} [{record['folder']}]")
        print("\n".join(lines), file=sys.stderr, flush=True)
        sys.exit(2)

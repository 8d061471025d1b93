"""Checkpoint files that are whole or absent: written beside their final name, then renamed.

Lightning's default writer stages a checkpoint through a temporary file in ``$TMPDIR``; a process
killed mid-write (SIGKILL, out of memory) leaves that file behind, up to the checkpoint's size, where
nobody looks. :class:`PartialFileCheckpointIO` writes ``<name>.ckpt.partial-<pid>`` in the checkpoint's
own folder, flushes it to disk and renames it over ``<name>.ckpt`` (atomic on one file system), so the
previous checkpoint stays intact until the new one is complete; :func:`remove_stale_partials` deletes
what a killed writer left, at the next start of a run in that folder or resuming from it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

PARTIAL = ".partial-"


class PartialFileCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO for local paths, staging each file in its own folder (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote file systems keep Lightning's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}{PARTIAL}{os.getpid()}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_partials(*folders: str | Path | None) -> list[Path]:
    """Delete ``*.partial-<pid>`` files of writers that are no longer running; returns what was removed."""
    removed = []
    for folder in folders:
        if folder is None or not Path(folder).is_dir():
            continue
        for path in Path(folder).glob(f"*{PARTIAL}*"):
            pid = path.name.rpartition(PARTIAL)[2]
            if pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)
                removed.append(path)
                log.info("Removed %s, left by an interrupted checkpoint write", path)
    return removed

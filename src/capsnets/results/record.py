"""``metrics.json``: the record every training job leaves in its run folder, and the one place that knows its schema.

``train.py`` writes it (:func:`write_record`) when a job finishes; ``capsnets-summarize`` reads it
(:func:`read_record`) to build sweep tables without W&B. Fields::

    schema             1 (bumped when a field changes meaning)
    task_name          the job's task_name
    overrides          the job's command-line overrides (what tells the jobs of a sweep apart)
    seed               the global seed
    optimized_metric   the metric a sweeper optimises (cfg.optimized_metric) ...
    optimized_value    ... and its value: the best checkpoint's when the checkpoint callback monitors it
    metrics            every scalar metric logged at the end (test/acc, val/acc, train/loss, ...)
    tested             the weights the test/* metrics are of: best (the checkpoint best by validation) or last
                       (the end of training), as test_checkpoint chose; null when the job did not train and test
    paper              the preset's {metric, target, source}, or null
    curve              optional list of {samples, <metric>: value, ...}: evaluations during training
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SCHEMA = 1


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of ``trainer.callback_metrics`` (or any dict) as floats."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, torch.Tensor)) and torch.as_tensor(v).numel() == 1
    }


def paper_reference(cfg: DictConfig) -> dict[str, Any] | None:
    """The preset's ``paper`` block for this job: ``{metric, target, source}``. A sweep preset whose
    rows differ in target lists them as ``paper.targets: [{when: {dotted.key: value}, target: x}]``;
    the first entry whose keys all match this job's config gives ``target``."""
    paper = cfg.get("paper")
    if paper is None:
        return None
    ref = OmegaConf.to_container(paper, resolve=True)
    assert isinstance(ref, dict)
    rows = ref.pop("targets", None) or []
    if ref.get("target") is None:
        for row in rows:
            if all(OmegaConf.select(cfg, key) == value for key, value in row["when"].items()):
                ref["target"] = row["target"]
                break
    return ref


def optimized_value(metrics: dict[str, float], name: str) -> float | None:
    """The best checkpoint's value of ``name`` when the checkpoint callback monitors it, else the last logged one."""
    return metrics.get(f"{name}_best", metrics.get(name))


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a sweeper optimises (:func:`optimized_value`); None (with a warning naming what was
    logged) when absent, e.g. when validation never ran; the finished run and its checkpoints stay as they are."""
    if not name:
        return None
    value = optimized_value(metrics, name)
    if value is None:
        log.warning(
            "optimized_metric=%r was not logged (logged: %s); returning None.", name, ", ".join(sorted(metrics))
        )
    return value


def write_record(
    cfg: DictConfig, metrics: dict[str, float], overrides: list[str], curve: list[dict[str, float]] | None = None
) -> Path:
    """Write ``<run dir>/metrics.json`` for a finished job (see the module docstring)."""
    name = cfg.get("optimized_metric")
    record = {
        "schema": SCHEMA,
        "task_name": cfg.get("task_name"),
        "overrides": overrides,
        "seed": cfg.get("seed"),
        "optimized_metric": name,
        "optimized_value": optimized_value(metrics, name) if name else None,
        "metrics": dict(sorted(metrics.items())),
        "tested": cfg.get("test_checkpoint", "best") if cfg.get("train", True) and cfg.get("test", True) else None,
        "paper": paper_reference(cfg),
    }
    if curve:
        record["curve"] = curve
    path = Path(cfg.paths.output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_record(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(record, None)`` for a readable ``metrics.json``, else ``(None, why not)``."""
    if not path.is_file():
        return None, "no metrics.json"
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"unreadable metrics.json ({err})"
    if not isinstance(loaded, dict):
        return None, "metrics.json is not a JSON object"
    return loaded, None

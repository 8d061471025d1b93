"""Reading checkpoints with one readable error for every way a file can be wrong.

``read_checkpoint`` loads with ``torch.load(weights_only=True)`` (plain values only) and turns an
empty, truncated, text, pickled-module or non-capsnets file into a :class:`ConfigError` that names
the file and the fix; ``check_weights`` compares a checkpoint's weights with a built model (the
wrong model's checkpoint, or another size) and ``check_finite`` refuses non-finite weights.
Which classes a checkpoint may name is :mod:`capsnets.registry`'s business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from capsnets.errors import ConfigError


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint dict at ``path``, written by a capsnets run; ConfigError naming ``key`` otherwise."""
    path = Path(path)
    fix = f"Fix: pass a .ckpt written by a capsnets run, e.g. {key}=outputs/train/runs/<date>/checkpoints/last.ckpt"
    if path.stat().st_size == 0:
        raise ConfigError(f"{key}={str(path)!r} is an empty file, not a checkpoint. {fix}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, unpickling, EOF, ...: all mean "not a readable checkpoint"
        first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        reason = type(exc).__name__ + (f": {first_line}" if first_line else "")
        raise ConfigError(
            f"{key}={str(path)!r} cannot be read as a checkpoint ({reason}); "
            f"it is truncated, not a PyTorch checkpoint, or holds objects other than plain values. {fix}"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"{key}={str(path)!r} holds no model weights (no 'state_dict'). {fix}")
    meta = checkpoint.get("capsnets")
    if not isinstance(meta, dict) or "model_class" not in meta:
        raise ConfigError(
            f"{key}={str(path)!r} was not written by a capsnets run (no 'capsnets' metadata); "
            f"cannot rebuild the model. {fix}"
        )
    if not isinstance(checkpoint.get("hyper_parameters", {}), dict):
        raise ConfigError(f"{key}={str(path)!r}: its hyper_parameters are not a mapping. {fix}")
    return checkpoint


def check_weights(model: torch.nn.Module, state_dict: dict[str, Any], path: str | Path, key: str = "ckpt_path") -> None:
    """ConfigError when ``state_dict`` does not fit ``model`` (missing, unexpected or differently shaped weights)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    reshaped = sorted(
        k
        for k in set(own) & set(state_dict)
        if not torch.is_tensor(state_dict[k]) or tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if not (missing or unexpected or reshaped):
        return
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)):
        if names:
            parts.append(f"{len(names)} {label} (e.g. {', '.join(names[:3])})")
    raise ConfigError(
        f"{key}={str(path)!r}: its weights do not fit {type(model).__name__} as configured: {'; '.join(parts)}. "
        f"It was written by another model or another size of this one. Fix: pass the model= and model.net.* "
        f"settings the checkpoint was trained with, or a checkpoint of this model."
    )


def check_finite(state_dict: dict[str, Any], path: str | Path, key: str = "ckpt_path") -> None:
    """ConfigError naming the first weights that hold NaN or Inf."""
    bad = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise ConfigError(
            f"{key}={str(path)!r} holds non-finite weights (NaN/Inf in {len(bad)} tensors, e.g. {', '.join(bad[:3])}): "
            f"the run diverged before it was saved. Fix: evaluate an earlier checkpoint of the run, or retrain "
            f"with a smaller learning rate."
        )

"""``torch.compile`` of a model's networks for training (``compile.enabled=true``; README, "Compiling").

TorchDynamo captures the network's forward pass, routing included (the fused routings' custom autograd functions,
their loops over vote blocks and their backward passes are traced, not run around the graph: em_caps_small and
dr_caps compile to one graph per compiled module, no breaks, ``tests/test_compile.py``), and the backend generates
code for it (inductor: C++/OpenMP on a CPU, Triton on a GPU), fusing the elementwise work between the vote-sized
passes that eager PyTorch runs as separate kernels. Measured on a 2-core CPU (float32, batch 32, eager and compiled
steps interleaved in one process): em_caps_small 1.15x / 1.27x with 2 threads (two quiet ``scripts/bench.py
--compile`` runs), ~1.35x with one thread on a loaded machine; dr_caps ~0.93x (its convolution is the same oneDNN
kernel); the first step compiles (23-28 s with inductor's cache warm, minutes cold).

What is compiled: the modules a model's step calls (:meth:`~capsnets.models.base.CapsuleClassifier.compiled_modules`,
``net``, and dr_caps' decoder), each in place (``nn.Module.compile``), so checkpoints keep their parameter names and
load into an eager model (``eval.py``, resume). Each new input shape or grad mode (training, validation, the last
smaller batch) compiles once more; with ``dynamic: null`` (torch's default) a second shape makes that graph dynamic.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Literal, TypedDict

from capsnets.errors import ConfigError

log = logging.getLogger(__name__)

Mode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class CompileSettings(TypedDict, total=False):
    """``compile``: whether and how ``train.py`` compiles the model's networks (``torch.compile``'s arguments)."""

    enabled: bool
    backend: str  # a registered TorchDynamo backend: inductor, aot_eager, eager, cudagraphs, ...
    mode: Mode | None  # inductor only; None: torch's default
    fullgraph: bool  # a graph break is an error instead of running that part eagerly
    dynamic: bool | None  # None: static shapes, made dynamic when a second shape comes


def backends() -> list[str]:
    """Every registered TorchDynamo backend, the debugging ones (``eager``, ``aot_eager``) included."""
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def cpp_compiler() -> str | None:
    """The C++ compiler inductor's CPU code generation would call (``$CXX``, else inductor's list), or None."""
    import torch._inductor.config as inductor_config

    candidates = [os.environ.get("CXX"), *inductor_config.cpp.cxx]
    for name in candidates:
        if name and shutil.which(name):
            return name
    return None


def check_compile(settings: Any, *, on_gpu: bool) -> None:
    """Rules across the ``compile`` settings and the machine, before anything is built (``config_checks``)."""
    if not settings or not settings.get("enabled", False):
        return
    backend = settings.get("backend", "inductor")
    known = backends()
    if backend not in known:
        raise ConfigError(
            f"compile.backend={backend}: not a TorchDynamo backend of this torch. Fix: compile.backend=inductor "
            f"(code generation), or aot_eager (traced, no code generation: for debugging); registered: "
            f"{', '.join(known)}."
        )
    if settings.get("mode") is not None and backend != "inductor":
        raise ConfigError(
            f"compile.mode={settings['mode']} is an inductor setting, but compile.backend={backend}. "
            f"Fix: compile.mode=null, or compile.backend=inductor."
        )
    if backend == "inductor" and not on_gpu and cpp_compiler() is None:
        raise ConfigError(
            "compile.backend=inductor generates C++ on a CPU, but this machine has no C++ compiler (g++, or $CXX). "
            "Fix: install one (Debian: apt-get install g++), or compile.backend=aot_eager, or compile.enabled=false."
        )


def compile_model(model: Any, settings: Any) -> list[str]:
    """Compile ``model.compiled_modules()`` in place with ``settings`` (``compile``); returns their names (none if
    ``compile.enabled`` is false)."""
    if not settings or not settings.get("enabled", False):
        return []
    options = {
        "backend": settings.get("backend", "inductor"),
        "fullgraph": bool(settings.get("fullgraph", False)),
        "dynamic": settings.get("dynamic"),
    }
    if settings.get("mode") is not None:
        options["mode"] = settings["mode"]
    names = []
    for name, module in model.compiled_modules().items():
        module.compile(**options)
        names.append(name)
    log.info("torch.compile (%s): %s; the first step of each shape compiles", options, ", ".join(names))
    return names

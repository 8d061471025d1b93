"""Routing pictures of the fixed images, for any registered routing procedure and any capsule model."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal, get_args

import torch
from lightning import LightningModule, Trainer

from capsnets.callbacks.drawing import class_activations_figure, routing_figure
from capsnets.callbacks.pictures import PictureCallback, Render, picture_key
from capsnets.callbacks.routing_stats import routing_statistics
from capsnets.schema import checked

Kind = Literal["routing", "class_activations"]
KINDS: tuple[str, ...] = get_args(Kind)


class RoutingPictures(PictureCallback):
    """Per routing iteration, for every routed layer the model's :class:`~capsnets.models.CapsuleView`
    traces: the entropy of each child's assignments against the uniform split and histograms of
    each child's largest assignment (``routing``); the class-capsule activations (scores) of the
    fixed images and how the true and the other classes' activations develop over the iterations
    (``class_activations``).

    Args:
        kinds: which of ``routing``, ``class_activations`` to draw.
        log_routing_scalars: also log the mean child entropy of every iteration as metrics
            ``<stage>/routing/<layer>/entropy_iter<t>`` (all loggers).
        **settings: those of :class:`~capsnets.callbacks.pictures.PictureCallback`.
    """

    key = "callbacks.routing_pictures"
    uses_fixed_batch = True

    @checked(picture_key)
    def __init__(self, *, kinds: Sequence[Kind] = KINDS, log_routing_scalars: bool = True, **settings: Any) -> None:
        super().__init__(**settings)
        self.kinds = tuple(dict.fromkeys(kinds))
        self.log_routing_scalars = log_routing_scalars

    def draw(
        self, stage: str, trainer: Trainer, pl_module: LightningModule, title: str
    ) -> tuple[dict[str, Render], dict[str, float]]:
        if stage not in self.fixed:
            return {}, {}
        x, y = self.fixed[stage]
        view = self.inspect(pl_module, x, traces=True)
        if view is None or not view.traces:
            self._skip("routing", f"{type(pl_module).__name__} has no routed capsule layers")
            return {}, {}
        jobs: dict[str, Render] = {}
        scalars: dict[str, float] = {}
        if "routing" in self.kinds:
            stats = routing_statistics(view.traces)
            jobs["routing"] = partial(routing_figure, stats, title=title, dpi=self.dpi)
            if self.log_routing_scalars:
                for layer in stats:
                    for t, value in enumerate(layer.mean_entropy(), start=1):
                        scalars[f"{stage}/routing/{layer.name}/entropy_iter{t}"] = value
        trace = view.traces.get(view.class_layer) if view.class_layer else None
        if "class_activations" in self.kinds and trace is not None:
            per_iteration = torch.stack([a.squeeze(1) for a in trace.activations]).cpu()  # (T, N, K)
            jobs["class_activations"] = partial(
                class_activations_figure,
                view.scores.cpu(),
                y.cpu(),
                per_iteration=per_iteration,
                class_names=self.class_names_for(trainer),
                title=title,
                dpi=self.dpi,
            )
        return jobs, scalars

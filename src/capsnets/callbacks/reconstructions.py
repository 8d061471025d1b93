"""Reconstructions and capsule perturbations (Sabour et al. 2017, Sec. 5.1 and Fig. 4) of the fixed images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Annotated, Any, Literal, get_args

import torch
from lightning import LightningModule, Trainer

from capsnets.callbacks.drawing import perturbation_grid, reconstruction_grid
from capsnets.callbacks.pictures import PictureCallback, Render, picture_key
from capsnets.schema import PositiveFloat, PositiveInt, Range, checked

Kind = Literal["reconstructions", "perturbations"]
KINDS: tuple[str, ...] = get_args(Kind)
Decoder = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def perturbed_capsules(v: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Copies of the class capsules ``v`` (S, K, D) with one dimension of the ``labels`` capsule shifted.

    Returns (S, D, T, K, D): entry [s, d, t] is ``v[s]`` with ``offsets[t]`` added to dimension d
    of capsule ``labels[s]``; the other capsules are unchanged (the decoder masks them anyway).
    """
    s, k, d = v.shape
    shift = torch.eye(d, dtype=v.dtype, device=v.device)[:, None, :] * offsets.to(v)[None, :, None]  # (D, T, D)
    one_hot = torch.nn.functional.one_hot(labels, k).to(v.dtype)  # (S, K)
    return v[:, None, None] + one_hot[:, None, None, :, None] * shift[None, :, :, None, :]  # (S, D, T, K, D)


def perturbed_reconstructions(
    decoder: Decoder, v: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Decode :func:`perturbed_capsules`, masked by ``labels``: (S, D, T, C, H, W) images."""
    s, _, d = v.shape
    t = offsets.numel()
    capsules = perturbed_capsules(v, labels, offsets)  # (S, D, T, K, D)
    images = decoder(capsules.flatten(0, 2), labels.repeat_interleave(d * t))  # (S*D*T, C, H, W)
    return images.view(s, d, t, *images.shape[1:])


class ReconstructionPictures(PictureCallback):
    """Inputs above their reconstructions from the predicted class capsule (``reconstructions``), and
    each dimension of that capsule shifted over ``[-perturb_range, perturb_range]`` in
    ``perturb_steps`` steps and decoded, one row per dimension (``perturbations``). For models whose
    :class:`~capsnets.models.CapsuleView` has a decoder (dr_caps with ``model.net.reconstruction=true``).

    Args:
        kinds: which of ``reconstructions``, ``perturbations`` to draw.
        perturb_range, perturb_steps: the shifts (paper: 0.25 in 11 steps of 0.05).
        perturb_samples: fixed images whose perturbation grid is drawn, side by side.
        **settings: those of :class:`~capsnets.callbacks.pictures.PictureCallback`.
    """

    key = "callbacks.reconstructions"
    uses_fixed_batch = True

    @checked(picture_key)
    def __init__(
        self,
        *,
        kinds: Sequence[Kind] = KINDS,
        perturb_range: PositiveFloat = 0.25,
        perturb_steps: Annotated[int, Range(2)] = 11,
        perturb_samples: PositiveInt = 1,
        **settings: Any,
    ) -> None:
        super().__init__(**settings)
        self.kinds = tuple(dict.fromkeys(kinds))
        self.perturb_range = float(perturb_range)
        self.perturb_steps = perturb_steps
        self.perturb_samples = perturb_samples

    def draw(
        self, stage: str, trainer: Trainer, pl_module: LightningModule, title: str
    ) -> tuple[dict[str, Render], dict[str, float]]:
        if stage not in self.fixed:
            return {}, {}
        x, _ = self.fixed[stage]
        view = self.inspect(pl_module, x)
        if view is None or view.decoder is None or view.poses is None:
            self._skip("reconstructions", f"{type(pl_module).__name__} has no reconstruction decoder")
            return {}, {}
        with torch.no_grad():
            v = view.poses  # (N, K, D) class capsules
            preds = view.scores.argmax(dim=-1)  # the decoder is masked by the prediction, as in evaluation
            jobs: dict[str, Render] = {}
            if "reconstructions" in self.kinds:
                jobs["reconstructions"] = partial(
                    reconstruction_grid, x.cpu(), view.decoder(v, preds).cpu(), scale=self.pixel_scale
                )
            if "perturbations" in self.kinds:
                n = min(self.perturb_samples, v.shape[0])
                offsets = torch.linspace(-self.perturb_range, self.perturb_range, self.perturb_steps, device=v.device)
                images = perturbed_reconstructions(view.decoder, v[:n], preds[:n], offsets)  # (S, D, T, C, H, W)
                jobs["perturbations"] = partial(perturbation_grid, images.cpu(), scale=self.pixel_scale)
        return jobs, {}

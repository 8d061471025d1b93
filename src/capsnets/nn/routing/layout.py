"""Which child sits in each vote slot, and how a child's assignments are normalised over its parents.

Every routing procedure sees votes laid out by *patch* (see :mod:`capsnets.nn.routing.base`):
P parent positions, each receiving K child slots (the kernel offsets of a convolutional capsule
layer, or every child of a fully connected one), T_in child types and T_out parent types.

A child of a convolutional layer sits in several patches when kernels overlap. ``child_index``
names the input position of every (p, k) slot, so a child's assignments can be normalised over
every parent whose receptive field contains it. Three normalisations (``over``) are offered:

* ``covering``: over every covering parent, all positions and types (Hinton et al. 2018, the
  paper's E-step: "the sum over all parents that child i votes for");
* ``type``: over the covering positions, separately for each parent type, so a child sends
  one unit of assignment to every parent type (the authors' release, google-research
  ``capsule_em``, conv layers);
* ``patch``: over the T_out types inside each patch slot, every slot its own child (most public
  ports).

Without ``child_index`` every slot is a distinct child and all three coincide: a softmax over the
T_out parent types (class capsules, DigitCaps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

Normalisation = Literal["covering", "type", "patch"]
NORMALISATIONS: tuple[str, ...] = get_args(Normalisation)


@dataclass(frozen=True)
class ChildLayout:
    """Geometry of the children of one routing call.

    Attributes:
        child_index: (P*K,) input position of each (p, k) slot, in ``[0, num_children)``; None
            when every slot is a distinct child (fully connected layers).
        num_children: number of input positions (children per type).
    """

    child_index: torch.Tensor | None = None
    num_children: int | None = None

    @property
    def shared(self) -> bool:
        """True when some child sits in more than one slot."""
        return self.child_index is not None

    def covering(self) -> torch.Tensor:
        """(num_children,) number of patches that contain each input position."""
        assert self.child_index is not None
        return torch.bincount(self.child_index, minlength=self.num_children or 0)

    def initial(self, shape: torch.Size, like: torch.Tensor, over: str = "covering") -> torch.Tensor:
        """Uniform assignments (B, P, K, T_in, T_out) of the given normalisation, an expanded view.

        ``covering``: 1 / (#covering patches x T_out); ``type`` and ``patch``: 1 / T_out per slot
        (the release starts every slot at 1/T_out and then normalises per type).
        """
        b, p, k, t_in, t_out = shape
        if not self.shared or over != "covering":
            return like.new_full((1, 1, 1, 1, 1), 1.0 / t_out).expand(shape)
        per_slot = (
            self.covering().index_select(0, self.child_index).view(1, p, k, 1, 1).to(like.dtype)
        )  # (1, P, K, 1, 1)
        return (1.0 / (per_slot * t_out)).expand(shape)

    def softmax(self, logits: torch.Tensor, over: str = "covering") -> torch.Tensor:
        """Normalise ``exp(logits)`` (B, P, K, T_in, T_out), any strides, over each child's parents."""
        return normalise_over_parents(logits, self.child_index, self.num_children, over)

    def child_totals(self, R: torch.Tensor) -> torch.Tensor:
        """Sum of each child's assignments over all its parents: (B, P, K, T_in, T_out) -> (B, N, T_in).

        N = ``num_children`` input positions (children covered by no patch get 0), or P*K slots.
        """
        b, p, k, t_in, _ = R.shape
        per_slot = R.sum(dim=-1).reshape(b, p * k, t_in)
        if not self.shared:
            return per_slot
        return per_slot.new_zeros(b, self.num_children, t_in).index_add(1, self.child_index, per_slot)


def normalise_over_parents(
    logits: torch.Tensor, child_index: torch.Tensor | None, num_children: int | None, over: str
) -> torch.Tensor:
    """:meth:`ChildLayout.softmax` as a function of the layout's index (what torch.compile traces: the fused routings'
    compiled statistics, :mod:`~capsnets.nn.routing.kernels`)."""
    if child_index is None or over == "patch":
        # traced by torch.compile: its own loops handle the memory order (softmax_last's reordering is eager's)
        return torch.softmax(logits, dim=-1) if torch.compiler.is_compiling() else softmax_last(logits)
    if over == "type":
        return _softmax_per_type(logits, child_index, num_children)
    b, p, k, t_in, _ = logits.shape
    # the max over every covering parent (a constant shift: it does not change the softmax)
    slot_max = logits.detach().amax(dim=-1).reshape(b, p * k, t_in)  # (B, P*K, T_in)
    child_max = slot_max.new_full((b, num_children, t_in), -math.inf)
    child_max = child_max.scatter_reduce(1, child_index.view(1, -1, 1).expand_as(slot_max), slot_max, reduce="amax")
    e = torch.exp(logits - child_max.index_select(1, child_index).view(b, p, k, t_in, 1))  # largest term per child: 1
    child_sum = e.new_zeros(b, num_children, t_in).index_add(1, child_index, e.sum(dim=-1).reshape(b, p * k, t_in))
    # children covered by no patch never appear in child_index, so no 0/0 is read back
    return e / child_sum.index_select(1, child_index).view(b, p, k, t_in, 1)


def _softmax_per_type(logits: torch.Tensor, index: torch.Tensor, num_children: int) -> torch.Tensor:
    b, p, k, t_in, t_out = logits.shape
    flat = logits.reshape(b, p * k, t_in, t_out)  # (B, P*K, T_in, T_out)
    scatter_index = index.view(1, -1, 1, 1).expand_as(flat)
    child_max = flat.new_full((b, num_children, t_in, t_out), -math.inf)
    child_max = child_max.scatter_reduce(1, scatter_index, flat.detach(), reduce="amax")
    e = torch.exp(flat - child_max.index_select(1, index))
    child_sum = e.new_zeros(b, num_children, t_in, t_out).index_add(1, index, e)
    return (e / child_sum.index_select(1, index)).view(b, p, k, t_in, t_out)


def softmax_last(x: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(x, dim=-1)`` computed in ``x``'s own memory order.

    A routing that keeps its logits in the parents' layout hands over a permuted view whose last dimension (the
    parents) is not the innermost in memory; torch's softmax would copy it and run its last-dimension kernel, which
    for a handful of parents is slow (dr_caps' couplings at batch 128, (128, 1, 1152, 1, 10): 20-23 ms either way,
    0.9 ms over the same dimension of the dense tensor, where the kernel runs along the innermost one; measured).
    The result has x's memory order (strides of size-1 dimensions aside)."""
    if x.dim() > 1 and x.stride(-1) != 1 and x.shape[-1] > 1:
        order = sorted(range(x.dim()), key=lambda i: x.stride(i), reverse=True)  # outermost first
        dense = x.permute(order)
        if dense.is_contiguous():
            return torch.softmax(dense, dim=order.index(x.dim() - 1)).permute([order.index(i) for i in range(x.dim())])
    return torch.softmax(x, dim=-1)


def child_assignment_stats(R: torch.Tensor, layout: ChildLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-child summaries of assignments R (B, P, K, T_in, T_out), each child taken as a distribution.

    Each child's assignments are divided by their total first (so ``type`` normalisation, which
    sends one unit per parent type, is summarised like the others). Children no patch covers are
    left out. Returns, each (B, N, T_in):
        entropy: entropy in nats of the child's distribution over its parents;
        uniform: the entropy of a uniform split over its parents, ``log(#parents)``;
        largest: the largest share of one parent (1 = all to one parent).
    """
    b, p, k, t_in, t_out = R.shape
    R = R.float()
    totals = layout.child_totals(R)  # (B, N, T_in)
    if layout.shared:
        slot_total = totals.index_select(1, layout.child_index).view(b, p, k, t_in, 1)
    else:
        slot_total = totals.view(b, p, k, t_in, 1)
    q = R / slot_total.clamp_min(1e-30)  # shares of each child's total
    plogp = (q * torch.log(q.clamp_min(1e-30))).sum(-1).reshape(b, p * k, t_in)  # (B, P*K, T_in)
    largest = q.amax(-1).reshape(b, p * k, t_in)
    if not layout.shared:
        return -plogp, torch.full_like(largest, math.log(t_out)), largest
    index, n = layout.child_index, layout.num_children
    covering = layout.covering()
    covered = covering > 0
    entropy = -(plogp.new_zeros(b, n, t_in).index_add(1, index, plogp))
    scatter_index = index.view(1, -1, 1).expand(b, p * k, t_in)
    largest = largest.new_zeros(b, n, t_in).scatter_reduce(1, scatter_index, largest, reduce="amax")
    uniform = torch.log(covering.to(entropy.dtype) * t_out).view(1, n, 1).expand(b, n, t_in)
    return entropy[:, covered], uniform[:, covered], largest[:, covered]

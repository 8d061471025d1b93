"""The vote-sized passes of the fused routing implementations (``impl: fused``), shared by EM and dynamic routing.

Routing is memory-bound on the votes, V (B, P, K, T_in, T_out, D): every iteration contracts them with small
per-parent or per-child operands. The fused implementations copy them once into the parents' layout, U (G, N, D)
with G = B * P * T_out parents of N = K * T_in votes each (:class:`ParentVotes`), and run every contraction through
a set of kernels (:mod:`~capsnets.nn.routing.kernels`): batched products over the parents in cache-sized blocks
(``eager``), or each contraction compiled into one fused loop (``compiled``).

**One write of the vote gradient.** The gradient of every such use with respect to U is an outer product
``left (G, N) x right (G, D)`` (for a square ``(U - c)^2``, U times one). Each use hands its pair back as the
gradients of two zero *tokens* (outputs of :class:`ParentVotes`, inputs of the use), and ParentVotes' backward sums
all of them per block of parents (eager: one batched product ``(g, N, uses) @ (g, uses, D)``), and writes dL/dV once,
in V's own strides, where plain autograd would write and add one vote-sized gradient per use.

**Votes from their factors.** A capsule layer whose votes are ``V = pose @ W (+ offset)`` can hand over the factors
(:class:`~capsnets.nn.routing.VoteFactors`); :class:`FactorVotes` then forms each block of votes straight into U, and
its backward pass turns each block of the vote gradient into the pose and W gradients: the votes never exist whole.
"""

from __future__ import annotations

import torch

from capsnets.nn.routing.kernels import (  # noqa: F401 - the blocks' sizes live with the kernels
    ACCELERATOR_CHUNK_ELEMENTS,
    CHUNK_ELEMENTS,
    EAGER,
    FACTOR_BLOCKS,
    EagerKernels,
    chunk_elements,
    flat_position_chunks,
    parent_chunks,
)


def position_chunks(b: int, p: int, per_position: int, device: torch.device | str) -> list[tuple[slice, slice]]:
    """(range of images, range of positions) blocks of about :func:`chunk_elements` vote elements, in the parents'
    order: whole images where one holds fewer (dr_caps' DigitCaps on a CPU: ~11 images a block at 184K elements
    each), else ranges of one image's positions."""
    chunk = chunk_elements(device)
    if p * per_position <= chunk:
        images = max(1, chunk // (p * per_position))
        return [(slice(i, min(b, i + images)), slice(0, p)) for i in range(0, b, images)]
    step = max(1, chunk // per_position)
    return [(slice(i, i + 1), slice(q, min(p, q + step))) for i in range(b) for q in range(0, p, step)]


def first_order_only(backward):
    """Backward of a custom Function that has no derivative of its own: computes under no_grad and refuses
    ``create_graph=True`` (second derivatives, e.g. gradient penalties) instead of silently dropping terms."""

    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "routing impl=fused has no second derivatives (create_graph=True, e.g. a gradient penalty "
                "through routing): use model.routing.impl=reference, plain autograd, which has them"
            )
        with torch.no_grad():
            return backward(ctx, *grads)

    checked.__name__, checked.__doc__ = backward.__name__, backward.__doc__
    return checked


def vote_tokens(U: torch.Tensor, plain: int, scaled: int) -> list[torch.Tensor]:
    """Distinct (G, N) and (G, D) zero tokens, a pair for each use of U (shared ones would sum factors before the
    product); their gradients are the factors of dL/dU (:class:`ParentVotes`)."""
    return [U.new_zeros(()).expand(U.shape[0], U.shape[1 + i % 2]) for i in range(2 * (plain + scaled))]


def centred_votes(
    ctx, U: torch.Tensor, c0: torch.Tensor, plain: int, scaled: int, kernels: EagerKernels, *saved: torch.Tensor
):
    """The outputs of :class:`ParentVotes` (and :class:`FactorVotes`) from U (..., T_out, K, T_in, D) and its centres
    c0 (..., T_out, 1, 1, D): U as (G, N, D), c0 as (G, D), and the tokens of the uses; U (and ``saved``) kept for the
    backward pass, whose vote gradient ``kernels`` forms."""
    d = U.shape[-1]
    U = U.view(-1, U.shape[-3] * U.shape[-2], d)  # (G, N, D)
    c0 = c0.view(-1, d)
    ctx.save_for_backward(U, *saved)
    ctx.plain = plain
    ctx.kernels = kernels
    ctx.mark_non_differentiable(U, c0)
    return (U, c0, *vote_tokens(U, plain, scaled))


def vote_gradient_blocks(ctx, token_grads, ranges: list[slice], t_out: int, slots: tuple[int, int] | None = None):
    """The blocks of dL/dU from the uses' token gradients (:class:`ParentVotes`): for each range of (image,
    position) pairs in ``ranges`` (flat, in the parents' order) yields dU (positions * T_out, N, D) in the parents'
    layout, or with ``slots`` = (K, T_in) in the layout of :class:`FactorVotes`' products over the slots,
    (K * T_in, positions, T_out * D); formed one block at a time by ``ctx.kernels``; nothing if no use has a
    gradient."""
    (U,) = ctx.saved_tensors[:1]
    pairs = list(zip(token_grads[::2], token_grads[1::2]))
    plain = [pair for pair in pairs[: ctx.plain] if pair[0] is not None]
    scaled = [pair for pair in pairs[ctx.plain :] if pair[0] is not None]
    if not plain and not scaled:
        return
    for positions in ranges:
        rows = slice(positions.start * t_out, positions.stop * t_out)
        block = [[(left[rows], right[rows]) for left, right in uses] for uses in (plain, scaled)]
        yield ctx.kernels.vote_gradient(U[rows], *block, None if slots is None else (*slots, t_out))


class ParentVotes(torch.autograd.Function):
    """``U = V - c0`` (G, N, D) in ``dtype``: the votes copied once into the parents' layout, ``c0`` (G, D) the
    plain mean of each parent's votes (a constant, no gradient) if ``centre``, else 0 (U the votes themselves).

    Every later use of U (directly, or through ``Q = (U - c)^2``) is a contraction with a small operand, whose
    gradient with respect to U is ``left (G, N) x right (G, D)``, or for Q ``2 (U - c) * (left x right)``
    ``= U * (left x 2 right) + left x (-2 c right)``. Each use hands its factors back as the gradients of its
    ``tokens``: ``plain`` pairs (their products sum) and ``scaled`` pairs (their products sum, times U), and
    the backward here forms dL/dU block by block (never whole) and writes dL/dV once, in V's own strides.
    """

    @staticmethod
    def forward(
        ctx,
        V: torch.Tensor,
        plain: int,
        scaled: int,
        dtype: torch.dtype,
        centre: bool = True,
        kernels: EagerKernels = EAGER,
    ):  # type: ignore[override]
        b, p, k, t_in, t_out, d = V.shape
        ctx.set_materialize_grads(False)  # U and c0 get no gradient: never allocate zeros for them
        V_par = V.permute(0, 1, 4, 2, 3, 5)  # (B, P, T_out, K, T_in, D), a view
        U = V.new_empty(b, p, t_out, k, t_in, d, dtype=dtype)
        c0 = V.new_zeros(b, p, t_out, 1, 1, d, dtype=dtype)  # the plain mean of each parent's votes: U's centre
        for images, ps in position_chunks(b, p, t_out * k * t_in * d, V.device):  # one read of V from memory
            block = V_par[images, ps] if dtype == V.dtype else V_par[images, ps].to(dtype)
            if centre:
                torch.mean(block, dim=(3, 4), keepdim=True, out=c0[images, ps])
                torch.sub(block, c0[images, ps], out=U[images, ps])  # centres, lays out
            else:
                U[images, ps].copy_(block)  # lays out
        ctx.layout = torch.empty_like(V, device="meta")  # V's shape, strides and dtype, without keeping V alive
        ctx.device = V.device
        return centred_votes(ctx, U, c0, plain, scaled, kernels)

    @staticmethod
    @first_order_only
    def backward(ctx, _dU, _dc0, *token_grads):  # type: ignore[override]
        layout = ctx.layout
        b, p, k, t_in, t_out, d = layout.shape
        dV = None
        blocks = position_chunks(b, p, t_out * k * t_in * d, ctx.device)
        # the same blocks as flat ranges of (image, position) pairs: whole images, or positions within one image
        ranges = [slice(images.start * p + ps.start, (images.stop - 1) * p + ps.stop) for images, ps in blocks]
        for (images, ps), dU in zip(blocks, vote_gradient_blocks(ctx, token_grads, ranges, t_out)):
            if dV is None:  # V's own strides, so that the backward of the vote einsum needs no copy
                dV = torch.empty_strided(layout.shape, layout.stride(), dtype=layout.dtype, device=dU.device)
            n_images, n_positions = images.stop - images.start, ps.stop - ps.start
            dV.permute(0, 1, 4, 2, 3, 5)[images, ps].copy_(dU.view(n_images, n_positions, t_out, k, t_in, d))
        return dV, None, None, None, None, None


class VoteSum(torch.autograd.Function):
    """Weighted sum of each parent's votes ``S[g] = sum_n w[g, n] U[g, n]``: (G, N) -> (G, D); one plain token pair."""

    @staticmethod
    def forward(ctx, U, token_n, token_d, w, kernels: EagerKernels = EAGER):  # type: ignore[override]
        ctx.save_for_backward(U, w)
        ctx.kernels = kernels
        return kernels.vote_sum(U, w)

    @staticmethod
    @first_order_only
    def backward(ctx, dS):  # type: ignore[override]
        U, w = ctx.saved_tensors
        dw = ctx.kernels.vote_dot(U, dS) if ctx.needs_input_grad[3] else None
        return None, w, dS, dw, None  # dL/dU = w x dS


class VoteDot(torch.autograd.Function):
    """Each vote's dot product with its parent's vector, ``A[g, n] = sum_h U[g, n, h] x[g, h]``: (G, D) -> (G, N);
    one plain token pair (``dL/dU = dA x x``)."""

    @staticmethod
    def forward(ctx, U, token_n, token_d, x, kernels: EagerKernels = EAGER):  # type: ignore[override]
        ctx.save_for_backward(U, x)
        ctx.kernels = kernels
        return kernels.vote_dot(U, x)

    @staticmethod
    @first_order_only
    def backward(ctx, dA):  # type: ignore[override]
        U, x = ctx.saved_tensors
        dx = ctx.kernels.vote_sum(U, dA) if ctx.needs_input_grad[3] else None
        return None, dA, x, dx, None


class FactorVotes(torch.autograd.Function):
    """:class:`ParentVotes` from the votes' factors (:class:`~capsnets.nn.routing.VoteFactors`): the votes
    ``V = pose @ weight + offset`` are formed straight into U, centred (if ``centre``) and laid out by the kernels'
    ``factor_votes`` (eager: block by block while in cache; compiled: in one loop, of 4 products per element where
    ``kron``, :class:`~capsnets.nn.routing.VoteFactors`), so V never exists besides U
    (em_caps' ConvCaps1: 678 MB at batch 32 in float32); the backward pass forms each block of dL/dV and turns it into
    the gradients of the pose, weight and offset at once."""

    @staticmethod
    def forward(
        ctx,
        pose,
        weight,
        offset,
        plain: int,
        scaled: int,
        dtype: torch.dtype,
        centre: bool = True,
        kernels: EagerKernels = EAGER,
        kron: bool = False,
    ):  # type: ignore[override]
        b, p, k, t_in, c = pose.shape  # pose (B, P, K, T_in, C), weight (K, T_in, T_out, C, D), offset (K, D)
        ctx.set_materialize_grads(False)
        U, c0 = kernels.factor_votes(pose.reshape(b * p, k, t_in, c), weight, offset, centre, dtype, kron)
        ctx.has_offset = offset is not None
        return centred_votes(ctx, U, c0, plain, scaled, kernels, pose, weight)

    @staticmethod
    @first_order_only
    def backward(ctx, _dU, _dc0, *token_grads):  # type: ignore[override]
        _, pose, weight = ctx.saved_tensors
        b, p, k, t_in, c = pose.shape
        t_out, d = weight.shape[2], weight.shape[4]
        want_pose, want_weight, want_offset = ctx.needs_input_grad[:3]
        d_pose = pose.new_empty(b * p, k, t_in, c) if want_pose else None
        # dL/dW accumulated in the layout of the bmm over (k, i): (K * T_in, C, T_out * D)
        d_weight = pose.new_zeros(k * t_in, c, t_out * d) if want_weight else None
        d_offset = pose.new_zeros(k, d) if want_offset and ctx.has_offset else None
        weight_t = None  # the transforms as (K * T_in, T_out * D, C), for dL/dpose
        flat = pose.reshape(b * p, k, t_in, c)
        ranges = flat_position_chunks(b * p, t_out * k * t_in * d, FACTOR_BLOCKS, pose.device)
        computed = False
        # each block's vote gradient in the layout of the bmm over (k, i), (K * T_in, n, T_out * D): written there by
        # the kernels (compiled: in the same loop that forms it; eager: one copy)
        for ps, d_votes in zip(ranges, vote_gradient_blocks(ctx, token_grads, ranges, t_out, (k, t_in))):
            computed, n = True, ps.stop - ps.start
            if d_offset is not None:
                d_offset += d_votes.view(k, t_in, n * t_out, d).sum(dim=(1, 2)).to(pose.dtype)
            if d_pose is None and d_weight is None:
                continue
            d_votes = d_votes.to(pose.dtype)
            if d_pose is not None:
                if weight_t is None:
                    weight_t = weight.to(pose.dtype).permute(0, 1, 2, 4, 3).reshape(k * t_in, t_out * d, c)
                d_pose[ps] = torch.bmm(d_votes, weight_t).view(k, t_in, n, c).permute(2, 0, 1, 3)
            if d_weight is not None:
                pose_t = flat[ps].permute(1, 2, 3, 0).reshape(k * t_in, c, n)  # (K * T_in, C, n)
                d_weight.baddbmm_(pose_t, d_votes)
        if not computed:  # no use of U has a gradient
            return None, None, None, None, None, None, None, None, None
        if d_pose is not None:
            d_pose = d_pose.view_as(pose)
        if d_weight is not None:
            d_weight = d_weight.view(k, t_in, c, t_out, d).permute(0, 1, 3, 2, 4).to(weight.dtype)
        return d_pose, d_weight, d_offset, None, None, None, None, None, None

"""The vote-sized kernels of the fused routings: ``eager`` (batched products, in cache-sized blocks) or ``compiled``.

Every pass of a fused routing over the votes U (G, N, D) is one of a few contractions with small per-parent operands
(:mod:`~capsnets.nn.routing.vote_passes`, :mod:`~capsnets.nn.routing.em_fused`). In eager PyTorch each is a batched
product (``(G, 1, D) @ (G, D, N)`` and the like) and, where a square ``(U - c)^2`` is involved, an elementwise pass
that forms it block by block: on a CPU these products run at ~10-40 GFLOP/s on their tiny inner dimensions, several
times slower than one read of U (measured: the E-step's contraction 13 ms against 2.5 ms for a sum over the same
21M-element float32 U, 2 threads). ``compiled`` writes each contraction as the plain formula and lets torch.compile
(Inductor: C++ loops on a CPU, Triton on a GPU) fuse it into one loop that reads U once and forms nothing
vote-sized: 4.7 ms for that contraction, and the vote gradient of the backward pass in 10.5 instead of 26 ms. The
EM and VB routings' per-parent and per-assignment statistics between those passes (tens of small elementwise,
gather and scatter passes over the assignments R, in float64, forward and backward) are compiled too, with their
backward pass (:meth:`CompiledKernels.stats`). A whole training step (``scripts/bench.py --compare
model.routing.kernels=eager``, same run, batch 32, smallNORB shapes): em_caps_small 1.48x (float32) / 1.50x (bf16
autocast), em_caps 1.75x / 1.54x. Since then the votes are formed from their factors by a compiled loop too
(``factor_votes``: each vote computed where it is written, centred on each parent's mean taken from the factors by
one matrix product): em_caps_small's ConvCaps1 18 against 32 ms eager; a training step 1.02x / 1.09x faster than
with eager ``factor_votes`` (em_caps 1.01x / 1.05x; interleaved A/B, two runs).

The kernels are compiled with the parents' dimension (G) dynamic and N, D static (one compiled loop per layer
shape, whatever the batch or block), on first use in a process (seconds; Inductor caches them on disk). A
routing chooses with its ``kernels`` setting (:func:`vote_kernels`): ``auto`` compiles on a CPU or a CUDA GPU
(elsewhere it runs ``eager``) and, where compiling fails (no C++ compiler, no Triton), runs eager after one warning;
``compiled`` makes such a failure an error; ``eager`` never compiles. A kernel that has reached torch's limit of
recompilations in a process (``torch._dynamo.config.recompile_limit`` shapes and dtypes) runs eager for further
shapes. Both give the same values within rounding (tests/nn/test_kernels.py: float64 to 1e-12; float32 as exact
as eager).
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

KernelMode = Literal["auto", "eager", "compiled"]
KERNEL_MODES = ("auto", "eager", "compiled")
# what ``auto`` chooses in this process, where set: ``eager`` or ``compiled`` (the test suite runs eager by default,
# so that hundreds of differently shaped tiny layers do not each compile; tests/nn/test_kernels.py compiles)
AUTO_ENV = "CAPSNETS_ROUTING_KERNELS"

# vote-sized work on a CPU runs in blocks of about this many elements (8 MB in float32), so that what a block
# forms (Q, a vote gradient) is read back from cache, and no vote-sized temporary is ever allocated
CHUNK_ELEMENTS = 1 << 21
# ... and on an accelerator in blocks of about this many (512 MB in float32): there a block costs a few kernel
# launches and their Python, not cache misses, and CPU-sized blocks would cut em_caps' ConvCaps1 at batch 64 (340M
# vote elements) into 163 blocks, each pass over the votes ~500 launches; these blocks make it 3
ACCELERATOR_CHUNK_ELEMENTS = 1 << 27


def chunk_elements(device: torch.device | str) -> int:
    """Vote elements per block on ``device``: :data:`CHUNK_ELEMENTS` on a CPU, :data:`ACCELERATOR_CHUNK_ELEMENTS`
    elsewhere (a GPU)."""
    return CHUNK_ELEMENTS if torch.device(device).type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS


def parent_chunks(parents: int, per_parent: int, device: torch.device | str) -> list[slice]:
    """Consecutive ranges of ``parents`` (G) whose votes hold about :func:`chunk_elements` elements."""
    step = max(1, chunk_elements(device) // per_parent)
    return [slice(g, min(parents, g + step)) for g in range(0, parents, step)]


# forming votes from their factors works in bigger blocks, FACTOR_BLOCKS x chunk_elements elements (on a CPU em_caps:
# about 3 images of ConvCaps1): the backward pass accumulates dL/dW once per block (vote_passes.FactorVotes), a bmm
# whose inner dimension is the block's positions, and CPU blocks of CHUNK_ELEMENTS made that pass 2x slower (measured)
FACTOR_BLOCKS = 8


def flat_position_chunks(positions: int, per_position: int, blocks: int, device: torch.device | str) -> list[slice]:
    """Ranges of the B * P (image, position) pairs, in the parents' order, of about ``blocks`` x
    :func:`chunk_elements` vote elements each."""
    step = max(1, blocks * chunk_elements(device) // per_position)
    return [slice(q, min(positions, q + step)) for q in range(0, positions, step)]


def squares(U: torch.Tensor, c: torch.Tensor, rows: slice) -> torch.Tensor:
    """``Q = (U - c)^2`` for the parents ``rows``: (g, N, D), formed block by block, never for all parents."""
    return (U[rows] - c[rows, None]).square_()


class EagerKernels:
    """The contractions as batched products over the parents, in the form that reads U fastest on a CPU
    (``(G, 1, N) @ (G, N, D)`` and ``(G, 1, D) @ (G, D, N)``: 3-5x faster than the transposed forms einsum's
    backward picks), squares formed one cache-sized block at a time."""

    name = "eager"

    def factor_votes(
        self,
        pose: torch.Tensor,
        weight: torch.Tensor,
        offset: torch.Tensor | None,
        centre: bool,
        dtype: torch.dtype,
        kron: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The votes ``V = pose @ weight (+ offset)`` in the parents' layout, centred on each parent's plain mean c0
        if ``centre``: U = V - c0 (n, T_out, K, T_in, D) and c0 (n, T_out, 1, 1, D) (zeros if not ``centre``), in
        ``dtype``. pose (n, K, T_in, C) for n (image, position) pairs, weight (K, T_in, T_out, C, D), offset (K, D)
        or None; ``kron``: weight is ``kron(I_4, W)`` (:class:`~capsnets.nn.routing.VoteFactors`). Here: one batched
        product over the (K, T_in) slots per block of :data:`FACTOR_BLOCKS` x :func:`chunk_elements` elements,
        centred and laid out while in cache (the 16x16 form either way)."""
        n, k, t_in, c = pose.shape
        t_out, d = weight.shape[2], weight.shape[4]
        weight_b = weight.to(dtype).permute(0, 1, 3, 2, 4).reshape(k * t_in, c, t_out * d)  # (K * T_in, C, T_out * D)
        offset_m = None if offset is None else offset.to(dtype)[:, None, :]  # (K, 1, D) over T_in
        U = pose.new_empty(n, t_out, k, t_in, d, dtype=dtype)
        c0 = (pose.new_empty if centre else pose.new_zeros)(n, t_out, 1, 1, d, dtype=dtype)
        for ps in flat_position_chunks(n, t_out * k * t_in * d, FACTOR_BLOCKS, pose.device):
            m = ps.stop - ps.start
            pose_b = pose[ps].to(dtype).permute(1, 2, 0, 3).reshape(k * t_in, m, c)  # (K * T_in, m, C)
            block = torch.bmm(pose_b, weight_b).view(k, t_in, m, t_out, d).permute(2, 3, 0, 1, 4)
            if offset_m is not None:
                block = block.add_(offset_m)
            if centre:
                torch.mean(block, dim=(2, 3), keepdim=True, out=c0[ps])
                torch.sub(block, c0[ps], out=U[ps])
            else:
                U[ps].copy_(block)
        return U, c0

    def moments(
        self, U: torch.Tensor, w: torch.Tensor, shift: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An M-step's two sums, ``E_U = sum_n w[g, n] U[g, n]`` and ``E_Q = sum_n w[g, n] (U[g, n] - c[g])^2`` about
        ``c``, E_U rounded to U's dtype (each parent's weighted mean where its w sums to 1): (G, N) -> (G, D) x 2 in
        float64, and c (G, D) in U's dtype. ``shift`` (G, D): a guess of the mean (a previous iteration's), for a
        kernel that sums in one pass. Here in two passes: the mean, then the squared distances from it."""
        c = self.vote_sum(U, w)
        return c.to(torch.float64, copy=True), self.square_sum(U, c, w).to(torch.float64), c

    def vote_sum(self, U: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``sum_n w[g, n] U[g, n]``: (G, N) -> (G, D)."""
        return torch.bmm(w.unsqueeze(1), U).squeeze(1)

    def vote_dot(self, U: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``sum_h U[g, n, h] x[g, h]``: (G, D) -> (G, N)."""
        return torch.bmm(x.unsqueeze(1), U.transpose(1, 2)).squeeze(1)

    def square_sum(self, U: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``sum_n w[g, n] (U[g, n] - c[g])^2``: (G, N) -> (G, D)."""
        S = U.new_empty(U.shape[0], 1, U.shape[2])
        for rows in parent_chunks(U.shape[0], U[0].numel(), U.device):
            torch.bmm(w[rows, None], squares(U, c, rows), out=S[rows])  # (g, 1, N) @ (g, N, D)
        return S.squeeze(1)

    def pose_sum(self, U: torch.Tensor, c: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        """``sum_h U[g, n, h] f1[g, h] + (U[g, n, h] - c[g, h])^2 f2[g, h]``: (G, D) x 2 -> (G, N)."""
        q = U.new_empty(U.shape[0], 1, U.shape[1])
        for rows in parent_chunks(U.shape[0], U[0].numel(), U.device):
            torch.bmm(f1[rows, None], U[rows].transpose(1, 2), out=q[rows])
            q[rows].baddbmm_(f2[rows, None], squares(U, c, rows).transpose(1, 2))
        return q.squeeze(1)

    def pose_sum_grads(self, U: torch.Tensor, c: torch.Tensor, dq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sum_n dq[g, n] U[g, n]`` and ``sum_n dq[g, n] (U[g, n] - c[g])^2``: (G, N) -> (G, D) x 2."""
        d1 = U.new_empty(U.shape[0], 1, U.shape[2])
        d2 = U.new_empty(U.shape[0], 1, U.shape[2])
        for rows in parent_chunks(U.shape[0], U[0].numel(), U.device):
            torch.bmm(dq[rows, None], U[rows], out=d1[rows])  # (g, 1, N) @ (g, N, D)
            torch.bmm(dq[rows, None], squares(U, c, rows), out=d2[rows])
        return d1.squeeze(1), d2.squeeze(1)

    def vote_gradient(
        self,
        U: torch.Tensor,
        plain: Sequence[tuple[torch.Tensor, torch.Tensor]],
        scaled: Sequence[tuple[torch.Tensor, torch.Tensor]],
        slots: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        """One block of dL/dU, ``sum_plain left x right + U * sum_scaled left x right`` (g, N, D), from the uses'
        factors (left (g, N), right (g, D)); at least one use. With ``slots`` = (K, T_in, T_out) (N = K * T_in,
        g = n * T_out) laid out as (K * T_in, n, T_out * D) instead, for a product over the slots."""

        def product(pairs):  # sum over the uses of left x right, (g, N, D)
            left = torch.stack([left for left, _ in pairs], dim=1)  # (g, uses, N)
            right = torch.stack([right for _, right in pairs], dim=1)  # (g, uses, D)
            return torch.bmm(left.transpose(1, 2), right)

        dU = product(plain) if plain else None
        if scaled:
            factor = product(scaled)
            dU = factor.mul_(U) if dU is None else dU.addcmul_(U, factor)
        return dU if slots is None else by_slots(dU, *slots)

    def stats(self, name: str, formula: Callable, *args):
        """A routing's per-parent or per-assignment statistics, ``formula(*args)``: plain autograd here (compiled by
        :class:`CompiledKernels`); ``name`` names the formula."""
        return formula(*args)


def by_slots(dU: torch.Tensor, k: int, t_in: int, t_out: int) -> torch.Tensor:
    """A block of dL/dU (n * T_out, K * T_in, D) as (K * T_in, n, T_out * D) (a copy)."""
    d = dU.shape[-1]
    return dU.view(-1, t_out, k, t_in, d).permute(2, 3, 0, 1, 4).reshape(k * t_in, -1, t_out * d)


# the contractions as plain formulas, for torch.compile to fuse (and for an enclosing torch.compile to trace)
def _factor_votes(pose, weight, offset, centre, dtype):
    n, k, t_in, c = pose.shape
    t_out, d = weight.shape[2], weight.shape[4]
    pose, weight = pose.to(dtype), weight.to(dtype)
    # V = sum_c pose[..., c] weight[..., c, :], written out term by term in the parents' order (one fused loop;
    # Inductor's reduction over the 16-long axis was measured 2x slower than the unrolled terms)
    P = pose.reshape(n, 1, k, t_in, c, 1)
    Wt = weight.permute(2, 0, 1, 3, 4).reshape(1, t_out, k, t_in, c, d)
    V = P[..., 0, :] * Wt[..., 0, :]
    for term in range(1, c):
        V = V + P[..., term, :] * Wt[..., term, :]
    if offset is not None:
        V = V + offset.to(dtype)[:, None, :]  # (K, 1, D) over T_in
    if not centre:
        return V.contiguous(), V.new_zeros(n, t_out, 1, 1, d)
    # each parent's plain mean from the factors, one matrix product (n, K T_in C) @ (K T_in C, T_out D), so that the
    # loop forming U = V - c0 computes each vote once, where it writes it (a mean over V itself made Inductor keep
    # V whole: one more write and read of the votes)
    c0 = pose.reshape(n, k * t_in * c) @ weight.permute(0, 1, 3, 2, 4).reshape(k * t_in * c, t_out * d)
    c0 = c0.view(n, t_out, 1, 1, d) / (k * t_in)
    if offset is not None:
        c0 = c0 + offset.to(dtype).mean(dim=0).view(1, 1, 1, 1, d)
    # contiguous: the broadcasts above would give U the strides of the inputs' order (T_out inside T_in)
    return (V - c0).contiguous(), c0


def kron_factors(pose, weight, offset, centre, dtype):
    """The operands of :func:`_kron_votes` for ``weight = kron(I_4, W)``, formed eagerly (tensors, not expressions,
    so that the compiled loop reads both contiguously): each pose element broadcast over its row of the vote,
    ``P[n, 0, k, i, m, (r, j)] = M[r, m]`` (n, 1, K, T_in, 4, 16), W's rows tiled over the vote's rows
    ``Wt[0, o, k, i, m, (r, j)] = W[m, j]`` (1, T_out, K, T_in, 4, 16), and the plain means c0 (n, T_out, 1, 1, 16)
    from one product with the 4x4 matrices (zeros if not ``centre``)."""
    n, k, t_in, _ = pose.shape
    t_out = weight.shape[2]
    M = pose.to(dtype).reshape(n, k, t_in, 4, 4)  # (r, m)
    W = weight[..., :4, :4].to(dtype)  # (K, T_in, T_out, 4, 4): (m, j), the top-left block of kron(I_4, W)
    P = M.transpose(-1, -2)[..., None].expand(n, k, t_in, 4, 4, 4).reshape(n, 1, k, t_in, 4, 16).contiguous()
    Wt = W[..., None, :].expand(k, t_in, t_out, 4, 4, 4).reshape(k, t_in, t_out, 4, 16)
    Wt = Wt.permute(2, 0, 1, 3, 4).unsqueeze(0).contiguous()
    if not centre:
        return P, Wt, pose.new_zeros(n, t_out, 1, 1, 16, dtype=dtype)
    # mean over the (K, T_in) slots: (n r, K T_in m) @ (K T_in m, T_out j) / (K T_in)
    rows = M.permute(0, 3, 1, 2, 4).reshape(n * 4, k * t_in * 4)
    c0 = (rows @ W.permute(0, 1, 3, 2, 4).reshape(k * t_in * 4, t_out * 4)) / (k * t_in)
    c0 = c0.view(n, 4, t_out, 4).permute(0, 2, 1, 3).reshape(n, t_out, 1, 1, 16)
    if offset is not None:
        c0 = c0 + offset.to(dtype).mean(dim=0).view(1, 1, 1, 1, 16)
    return P, Wt, c0


def _kron_votes(P, Wt, offset, c0):
    # U = V - c0 with V[n, o, k, i, (r, j)] = sum_m M[r, m] W[m, j]: 4 products per element, each operand a
    # contiguous 16-vector (the 16 unrolled terms of _factor_votes are 3/4 products with kron's zeros)
    V = P[..., 0, :] * Wt[..., 0, :]
    for m in range(1, 4):
        V = V + P[..., m, :] * Wt[..., m, :]
    if offset is not None:
        V = V + offset[:, None, :]  # (K, 1, D) over T_in
    return (V - c0).contiguous()


def _moments(U, w, shift):
    # one pass: with X = U - shift, sum w, sum w X and sum w X^2 accumulated in float64 (the square of a difference of
    # two float32 numbers is exact there), then the squared distances from the rounded mean c by algebra,
    # E_Q = S2 - 2 (c - shift) S1 + S0 (c - shift)^2, which cancels float64's digits only: ~1e-16 N ((mean - shift) /
    # sigma)^2 of the variance
    w64, shift64 = w.to(torch.float64)[:, :, None], shift.to(torch.float64)
    X = U.to(torch.float64) - shift64[:, None, :]
    wX = w64 * X
    S1, S2, S0 = wX.sum(1), (wX * X).sum(1), w64.sum(1)
    E_U = S1 + S0 * shift64
    c = E_U.to(U.dtype, copy=True)  # a tensor of its own, also for float64 votes
    m = c.to(torch.float64) - shift64
    return E_U, S2 - m * (2 * S1 - S0 * m), c


def _vote_sum(U, w):
    return (w[:, :, None] * U).sum(1)


def _vote_dot(U, x):
    return (U * x[:, None, :]).sum(2)


def _pose_sum(U, c, f1, f2):
    return (U * f1[:, None, :] + (U - c[:, None, :]).square() * f2[:, None, :]).sum(2)


def _pose_sum_grads(U, c, dq):
    return (dq[:, :, None] * U).sum(1), (dq[:, :, None] * (U - c[:, None, :]).square()).sum(1)


def _vote_gradient(U, plain, scaled, slots):
    dU = None
    for left, right in plain:
        term = left[:, :, None] * right[:, None, :]
        dU = term if dU is None else dU + term
    if scaled:
        factor = None
        for left, right in scaled:
            term = left[:, :, None] * right[:, None, :]
            factor = term if factor is None else factor + term
        dU = U * factor if dU is None else dU + U * factor
    return dU if slots is None else by_slots(dU, *slots)  # written in that layout by the same loop


class CompiledKernels(EagerKernels):
    """The same contractions as :class:`EagerKernels`, each compiled by torch.compile into one fused loop (module
    docstring). ``auto``: a failure to compile (no C++ compiler, no Triton) warns once and runs eager from then on."""

    name = "compiled"

    def __init__(self, *, strict: bool) -> None:
        self.strict = strict
        self._compiled: dict[str, Callable] = {}
        self._untraceable: set[str] = set()  # formulas torch.compile cannot trace whole in this torch: eager

    def _run(
        self,
        name: str,
        formula: Callable,
        args: tuple,
        eager: Callable | None = None,
        *,
        differentiable: bool = False,
        dynamic: Sequence[torch.Tensor] | None = None,
    ):
        """``formula(*args)`` compiled; ``eager(*args)`` (default: the eager kernel ``name``) where it cannot be.
        ``differentiable``: compiled with its backward (autograd through it), else run without gradients.
        ``dynamic``: the tensors whose first dimension varies between calls (default: every tensor in ``args``)."""
        eager = eager if eager is not None else getattr(super(), name)
        if torch.compiler.is_compiling():  # inside an enclosing torch.compile: let it trace the formula
            return formula(*args)
        if _FAILED or name in self._untraceable or is_in_torch_dispatch_mode():
            # torch.compile refuses to run under a dispatch mode (FlopCounterMode, a debugging mode): eager, whose
            # operations such a mode also sees (counted FLOPs)
            return eager(*args)
        key = (name, _signature(args)) if differentiable else name
        fn = self._compiled.get(key)
        if fn is None:
            # the statistics: one compiled copy per layer shape, assignment layout and grad mode (a function of its
            # own, so that torch's limit of compiled versions per function counts each separately: with one function
            # for all, training, validation and a partial batch reached it, measured)
            fn = self._compiled[key] = torch.compile(_own_copy(formula) if differentiable else formula, fullgraph=True)
        if not differentiable:
            for x in _tensors(args) if dynamic is None else dynamic:
                # the parents (G) vary with the batch and the block; N and D are the layer's
                torch._dynamo.maybe_mark_dynamic(x, 0)
        try:
            if differentiable:
                return fn(*args)
            with torch.no_grad():  # never differentiated here (the routings' autograd Functions give the gradients)
                return fn(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            # this kernel has been compiled for torch's limit of shapes and dtypes in this process (many differently
            # shaped layers, e.g. a test suite): this call runs the eager kernel, the compiled ones stay in use
            return eager(*args)
        except torch._dynamo.exc.Unsupported as error:
            # this formula does not trace whole (a capsnets defect, not the machine's): it runs eager from now on
            message = f"routing kernels: {name} cannot be compiled ({str(error).strip().splitlines()[0]})"
            if self.strict:
                raise RuntimeError(message + "; set model.routing.kernels=auto or eager") from error
            warnings.warn(message + "; running it eager", RuntimeWarning, stacklevel=3)
            self._untraceable.add(name)
            return eager(*args)
        except Exception as error:  # noqa: BLE001 - a failure to compile falls back (auto) or names the fix
            if not _compile_failure(error):
                raise
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            message = (
                f"routing kernels: torch.compile failed on {args[0].device.type} ({type(error).__name__}: "
                f"{first_line}). Install a C++ compiler (CPU: g++ or clang++; CUDA: the triton package), or set "
                "model.routing.kernels=eager"
            )
            if self.strict:
                raise RuntimeError(message) from error
            warnings.warn(message + "; running the eager kernels", RuntimeWarning, stacklevel=3)
            _FAILED.append(message)
            return eager(*args)

    def stats(self, name: str, formula: Callable, *args):
        """A routing's per-parent or per-assignment statistics, ``formula(*args)`` (differentiable), compiled with its
        backward pass: tens of small elementwise, gather and scatter passes fused into a few loops."""
        return self._run(name, formula, args, formula, differentiable=True)

    def factor_votes(self, pose, weight, offset, centre, dtype, kron=False):
        args = (pose, weight, offset, centre, dtype)
        if not kron or torch.compiler.is_compiling() or pose.shape[-1] != 16 or weight.shape[-1] != 16:
            return self._run("factor_votes", _factor_votes, args, dynamic=[pose])  # the whole of U in one loop
        # matrix poses: 4 products per element (a training step of em_caps_small: ConvCaps1's votes 7.6 ms
        # against 17.4 for the 16 unrolled terms, measured alone)
        P, Wt, c0 = self._run("kron_factors", kron_factors, args, kron_factors, dynamic=[pose])  # 3 tensors
        offset = None if offset is None else offset.to(dtype)

        def eager(P, Wt, offset, c0):
            return super(CompiledKernels, self).factor_votes(*args)[0]

        U = self._run("kron_votes", _kron_votes, (P, Wt, offset, c0), eager, dynamic=[P, c0])
        return U, c0

    def moments(self, U, w, shift):
        return self._run("moments", _moments, (U, w, shift))  # one pass over U

    def vote_sum(self, U, w):
        return self._run("vote_sum", _vote_sum, (U, w))

    def vote_dot(self, U, x):
        return self._run("vote_dot", _vote_dot, (U, x))

    def pose_sum(self, U, c, f1, f2):
        return self._run("pose_sum", _pose_sum, (U, c, f1, f2))

    def pose_sum_grads(self, U, c, dq):
        return self._run("pose_sum_grads", _pose_sum_grads, (U, c, dq))

    def vote_gradient(self, U, plain, scaled, slots=None):
        pairs = ([tuple(p) for p in plain], [tuple(p) for p in scaled])
        return self._run("vote_gradient", _vote_gradient, (U, *pairs, slots))


_FAILED: list[str] = []  # the message of a failed compile under ``auto``: eager from then on in this process


def _own_copy(fn: Callable) -> Callable:
    """``fn`` with a code object of its own: torch.compile keeps compiled versions, and counts them against its
    recompilation limit, per code object."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _signature(args) -> tuple:
    """What a statistics call's compiled version depends on besides the batch size: each tensor's other sizes,
    strides and dtype, the other arguments, and whether gradients are recorded."""
    parts = [
        (x.shape[1:], x.stride()[1:], x.dtype) if isinstance(x, torch.Tensor) else x
        for x in args
        if not isinstance(x, (list, tuple))
    ]
    return (*parts, torch.is_grad_enabled())


def _tensors(args) -> list[torch.Tensor]:
    out = []
    for x in args:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out.extend(_tensors(x))
    return out


def _compile_failure(error: Exception) -> bool:
    """Whether ``error`` comes from torch.compile's machinery (a missing compiler, a backend failure) rather than
    from the computation itself (e.g. out of memory), which eager would raise too."""
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch.compiler", "triton")) or isinstance(
        error, (OSError, ImportError)
    )


EAGER = EagerKernels()
_COMPILED = {True: CompiledKernels(strict=True), False: CompiledKernels(strict=False)}


def can_compile(device: torch.device | str) -> bool:
    """Whether ``auto`` compiles on ``device``: a CPU or a CUDA GPU (others, e.g. MPS, run eager)."""
    return torch.device(device).type in ("cpu", "cuda")


def vote_kernels(mode: KernelMode, device: torch.device | str) -> EagerKernels:
    """The kernels a routing's ``kernels`` setting selects on ``device`` (module docstring); ``auto`` follows
    :data:`AUTO_ENV` where it is set."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"routing kernels: {mode!r} is not one of {', '.join(KERNEL_MODES)}")
    if mode == "auto":
        chosen = os.environ.get(AUTO_ENV, "")
        if chosen not in ("", "eager", "compiled"):
            raise ValueError(f"{AUTO_ENV}={chosen}: set it to eager or compiled, or unset it")
        if chosen == "eager" or (not chosen and not can_compile(device)):
            return EAGER
        return _COMPILED[False]
    return EAGER if mode == "eager" else _COMPILED[True]

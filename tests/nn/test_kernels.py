"""The fused routings' vote-sized kernels (capsnets/nn/routing/kernels.py): compiled equals eager, kernel by kernel
and through the whole EM routing, in values and gradients; how ``kernels`` is chosen; what happens when compiling
fails."""

import itertools
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from capsnets.nets import EMCapsNet
from capsnets.nn.conv_caps import conv_child_index
from capsnets.nn.matrix_caps import vote_weight
from capsnets.nn.routing import ChildLayout, VoteFactors, build_routing, kernels
from capsnets.nn.routing.em_fused import fused_em_routing
from capsnets.nn.routing.kernels import AUTO_ENV, EAGER, CompiledKernels, vote_kernels

COMPILED = vote_kernels("compiled", "cpu")


def kernel_cases(g: int, n: int, d: int, dtype: torch.dtype, seed: int = 0) -> dict[str, tuple]:
    """Every kernel's inputs: votes U (G, N, D) far from the origin, centres c near them, per-parent operands."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    U, c = rand(g, n, d, scale=2.0, shift=3.0), rand(g, d, scale=2.0, shift=3.0)
    pairs = lambda uses: [(rand(g, n), rand(g, d)) for _ in range(uses)]  # noqa: E731
    return {
        "moments": (U, rand(g, n), rand(g, d, scale=2.0, shift=3.0)),
        "vote_sum": (U, rand(g, n)),
        "vote_dot": (U, rand(g, d)),
        "pose_sum": (U, c, rand(g, d), rand(g, d)),
        "pose_sum_grads": (U, c, rand(g, n)),
        "vote_gradient": (U, pairs(3), pairs(2)),
        "vote_gradient_plain": (U, pairs(2), []),
        "vote_gradient_scaled": (U, [], pairs(1)),
        # laid out for FactorVotes' products over the (K, T_in) slots: N = K * T_in, G = positions * T_out
        **({"vote_gradient_slots": (U, pairs(2), pairs(1), (n // 4, 4, g // 4))} if n % 4 == 0 and g % 4 == 0 else {}),
    }


def run_kernel(which, name: str, args: tuple):
    out = getattr(which, name.replace("_plain", "").replace("_scaled", "").replace("_slots", ""))(*args)
    return out if isinstance(out, tuple) else (out,)


def assert_close(got, want, rtol: float) -> None:
    for x, y in zip(got, want, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        scale = y.abs().max().clamp_min(1e-30)
        assert ((x - y).abs().max() / scale).item() < rtol, ((x - y).abs().max() / scale).item()


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(37, 72, 16), (5, 9, 4), (600, 144, 16), (24, 8, 16)])
def test_each_compiled_kernel_equals_eager(shape, dtype, rtol, monkeypatch):
    # eager in blocks of 1,000 elements (several parents per block, a partial last block) and in one block
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 1000)
    for name, args in kernel_cases(*shape, dtype).items():
        got, want = run_kernel(COMPILED, name, args), run_kernel(EAGER, name, args)
        assert_close(got, want, rtol)
        monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 1 << 21)
        assert_close(got, run_kernel(EAGER, name, args), rtol)
        monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 1000)
    assert not kernels._FAILED


def test_the_kernels_compute_what_they_claim():
    # the eager kernels against the formulas written out, so that compiled == eager means compiled == the formula
    cases = kernel_cases(4, 6, 16, torch.float64)
    U, w = cases["vote_sum"]
    assert torch.allclose(EAGER.vote_sum(U, w), torch.einsum("gn,gnd->gd", w, U))
    U, x = cases["vote_dot"]
    assert torch.allclose(EAGER.vote_dot(U, x), torch.einsum("gnd,gd->gn", U, x))
    U, w, shift = cases["moments"]
    E_U, E_Q, c = EAGER.moments(U, w, shift)
    assert E_U.dtype == E_Q.dtype == torch.float64 and c.dtype == U.dtype
    assert torch.allclose(E_U, torch.einsum("gn,gnd->gd", w, U)) and torch.allclose(c, E_U)
    assert torch.allclose(E_Q, torch.einsum("gn,gnd->gd", w, (U - c[:, None]) ** 2))
    U, c, f1, f2 = cases["pose_sum"]
    q = torch.einsum("gnd,gd->gn", U, f1) + torch.einsum("gnd,gd->gn", (U - c[:, None]) ** 2, f2)
    assert torch.allclose(EAGER.pose_sum(U, c, f1, f2), q)
    U, c, dq = cases["pose_sum_grads"]
    d1, d2 = EAGER.pose_sum_grads(U, c, dq)
    assert torch.allclose(d1, torch.einsum("gn,gnd->gd", dq, U))
    assert torch.allclose(d2, torch.einsum("gn,gnd->gd", dq, (U - c[:, None]) ** 2))
    U, plain, scaled = cases["vote_gradient"]
    outer = lambda pairs: sum(torch.einsum("gn,gd->gnd", left, right) for left, right in pairs)  # noqa: E731
    assert torch.allclose(EAGER.vote_gradient(U, plain, scaled), outer(plain) + U * outer(scaled))
    # by the (K, T_in) = (3, 2) slots of T_out = 2 parents at n = 2 positions:
    # dU[(p, j), (k, i), d] lands at [(k, i), p, (j, d)]
    dU = EAGER.vote_gradient(U, plain, scaled)
    slotted = EAGER.vote_gradient(U, plain, scaled, (3, 2, 2))
    assert slotted.shape == (6, 2, 2 * 16)
    for p, j, k, i in itertools.product(range(2), range(2), range(3), range(2)):
        assert torch.equal(slotted[k * 2 + i, p, j * 16 : (j + 1) * 16], dU[p * 2 + j, k * 2 + i])


@pytest.mark.parametrize("which", [EAGER, COMPILED], ids=["eager", "compiled"])
def test_moments_of_a_tight_cluster_far_from_the_origin_are_float32_exact(which):
    # the M-step's sums of float32 votes 1000 + 1e-3 x: the squared distances about the returned centre as float64
    # computes them from the same float32 inputs (compiled: in one pass about the shift, sum w (U - shift)^2
    # accumulated in float64 and the centre's part taken off by algebra; float32 sums of U^2 would keep nothing of a
    # 1e-6 variance under 1e6, and float64 sums of U^2 about 0 lose 1e-3 of it, measured)
    gen = torch.Generator().manual_seed(0)
    U = (1000 + 1e-3 * torch.randn(50, 72, 16, generator=gen, dtype=torch.float64)).float()
    w = torch.rand(50, 72, generator=gen, dtype=torch.float64)
    w = (w / w.sum(1, keepdim=True)).float()
    w[7] = 0  # a parent without data: no mass, zero sums
    E_U, E_Q, c = which.moments(U, w, U[:, 3].clone())  # shift: one of the votes
    U64, w64 = U.double(), w.double()[:, :, None]
    assert torch.allclose(E_U, (w64 * U64).sum(1), rtol=1e-6, atol=0)
    assert torch.equal(c, E_U.float()) if which is COMPILED else torch.allclose(c.double(), E_U, rtol=1e-6)
    want = (w64 * (U64 - c.double()[:, None]) ** 2).sum(1)
    assert ((E_Q - want).abs() / want.clamp_min(1e-30)).max() < 1e-4  # eager: float32 sums of float32 squares
    if which is COMPILED:
        assert ((E_Q - want).abs() / want.clamp_min(1e-30)).max() < 1e-9
    assert E_U[7].abs().max() == 0 and E_Q[7].abs().max() == 0 and c[7].abs().max() == 0
    assert not kernels._FAILED


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kron", [True, False], ids=["kron", "general"])
@pytest.mark.parametrize("offset", [True, False], ids=["offset", "no_offset"])
@pytest.mark.parametrize("centre", [True, False], ids=["centred", "plain"])
def test_factor_votes_compiled_equals_eager_and_the_votes(kron, offset, centre, dtype, rtol, monkeypatch):
    # n = 37 (image, position) pairs of K = 9 slots, T_in = 3, T_out = 4; votes far from the origin; the transforms
    # of matrix poses (kron(I_4, W), mostly zeros) or general 16x16 ones
    gen = torch.Generator().manual_seed(0)
    pose = 3.0 + torch.randn(37, 9, 3, 16, generator=gen, dtype=torch.float64)
    if kron:
        weight = vote_weight(torch.randn(9, 3, 4, 4, 4, generator=gen, dtype=torch.float64))
    else:
        weight = torch.randn(9, 3, 4, 16, 16, generator=gen, dtype=torch.float64)
    shift = torch.randn(9, 16, generator=gen, dtype=torch.float64) if offset else None
    # the votes in the parents' layout (n, T_out, K, T_in, D), from their definition
    V = VoteFactors(pose[None], weight, shift).materialise()[0].permute(0, 3, 1, 2, 4)
    c0 = V.mean(dim=(2, 3), keepdim=True) if centre else torch.zeros_like(V[:, :, :1, :1])
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 3000)  # eager: blocks of a few positions, a partial last one
    eager = EAGER.factor_votes(pose, weight, shift, centre, dtype)
    assert_close(eager, ((V - c0).to(dtype), c0.to(dtype)), rtol)
    # kron: told that the weight is kron(I_4, W) (as the matrix-capsule layers tell it), compiled forms each element
    # from W's 4 products
    compiled = COMPILED.factor_votes(pose, weight, shift, centre, dtype, kron)
    assert_close(compiled, eager, rtol)
    assert compiled[0].is_contiguous()  # the parents' layout, which FactorVotes views as (G, N, D)
    # fewer positions (a partial batch: compiled with the positions dynamic) give the same values
    assert_close(COMPILED.factor_votes(pose[:20], weight, shift, centre, dtype, kron), [x[:20] for x in eager], rtol)
    assert not kernels._FAILED and not COMPILED._untraceable
    if kron:
        assert "kron_votes" in COMPILED._compiled  # the 4-product loop ran compiled


def em_inputs(conv: bool, factors: bool, seed: int = 0, kron: bool = False) -> tuple[dict, list[torch.Tensor]]:
    """Float64 routing inputs (a 3x3/1 conv layer on a 5x5 grid, or a fully connected one) and their leaves;
    ``kron``: the transforms of matrix poses, kron(I_4, W) of 4x4 matrices W (the leaf)."""
    torch.manual_seed(seed)
    if conv:
        layout, k, p = ChildLayout(conv_child_index(5, 5, kernel_size=3, stride=1), 25), 9, 9
    else:
        layout, k, p = ChildLayout(), 12, 1
    b, t_in, t_out, d = 2, 3, 4, 16
    opts = dict(dtype=torch.float64, requires_grad=True)
    pose = torch.randn(b, p, k, t_in, d, **opts)
    if kron:
        weight = (0.5 * torch.randn(k, t_in, t_out, 4, 4, dtype=torch.float64)).requires_grad_(True)
        factor = vote_weight(weight)
    else:
        weight = factor = (0.5 * torch.randn(k, t_in, t_out, d, d, dtype=torch.float64)).requires_grad_(True)
    offset = torch.randn(k, d, **opts)
    a_in = torch.rand(b, p, k, t_in, **opts)
    beta_u, beta_a = torch.randn(t_out, **opts), torch.randn(t_out, **opts)
    V = VoteFactors(pose, factor, offset)
    inputs = dict(
        V=V if factors else V.materialise(),
        a_in=a_in,
        beta_u=beta_u,
        beta_a=beta_a,
        lambdas=[0.01, 0.02, 0.05],
        layout=layout,
        moment_dtype=torch.float64,
    )
    return inputs, [pose, weight, offset, a_in, beta_u, beta_a]


def outputs_and_gradients(out, leaves):
    """A routing's outputs and the gradients of a loss of all of them with respect to ``leaves``."""
    loss = sum((torch.cos(3 * x) * (i + 1)).sum() for i, x in enumerate(out))
    return out, torch.autograd.grad(loss, leaves)


def assert_same_results(eager, compiled) -> None:
    """Eager and compiled kernels' outputs and gradients (float64) agree to rounding; every gradient is non-zero."""
    for x, y in zip(eager[0], compiled[0], strict=True):
        assert torch.allclose(x, y, atol=1e-12, rtol=1e-10)
    for x, y in zip(eager[1], compiled[1], strict=True):
        assert x.abs().max() > 0 and torch.allclose(x, y, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("normalisation", ["covering", "type", "patch"])
@pytest.mark.parametrize("factors", ["factors", "kron", "votes"])
@pytest.mark.parametrize("conv", [True, False], ids=["conv", "fc"])
def test_em_routing_with_compiled_kernels_equals_eager_in_values_and_gradients(conv, factors, normalisation):
    results = []
    for mode in ("eager", "compiled"):
        # the same values, a fresh graph
        inputs, leaves = em_inputs(conv, factors != "votes", kron=factors == "kron")
        results.append(
            outputs_and_gradients(fused_em_routing(**inputs, normalisation=normalisation, kernels=mode), leaves)
        )
    assert_same_results(*results)


def float32_errors(got, ref) -> list[float]:
    """Largest error of poses (relative to the largest pose), activations and assignments (absolute)."""
    return [
        ((got.poses.double() - ref.poses).abs().max() / ref.poses.abs().max()).item(),
        (got.activations.double() - ref.activations).abs().max().item(),
        (got.assignments.double() - ref.assignments).abs().max().item(),
    ]


def test_float32_routing_with_compiled_kernels_matches_float64():
    # the float32 path's exactness (tests/nn/test_em_routing.py) holds with the compiled kernels: votes far from
    # the origin (1000 + 3 x), re-centred on each M-step's mean; float64 arithmetic on the same float32 inputs is
    # the reference
    for seed in range(3):
        inputs, _ = em_inputs(conv=True, factors=False, seed=seed)
        inputs["V"] = 1000 + 3 * inputs["V"]
        single = {key: x.float().detach() if torch.is_tensor(x) else x for key, x in inputs.items()}
        single["moment_dtype"] = torch.float32
        ref = fused_em_routing(
            **{**{k: x.double() if torch.is_tensor(x) else x for k, x in single.items()}, "moment_dtype": torch.float64}
        )
        errors = {}
        for mode in ("eager", "compiled"):
            errors[mode] = float32_errors(fused_em_routing(**single, kernels=mode), ref)
        assert max(errors["compiled"]) < 1e-5, errors
        assert all(c <= 2 * e + 1e-7 for c, e in zip(errors["compiled"], errors["eager"])), errors


@pytest.mark.parametrize("normalisation", ["covering", "type"])
def test_float32_routing_with_compiled_kernels_is_exact_for_a_tight_cluster_far_from_the_mean(normalisation):
    # 30% of the votes agree to 1e-3 at 10 from the plain mean of the rest (the cancellation case of
    # tests/nn/test_em_routing.py): the compiled M-step sums in one pass, about the previous iteration's centre
    # (the first about the plain mean, 1e4 sigma away), in float64; as exact as the eager two passes
    for seed in range(3):
        inputs, _ = em_inputs(conv=True, factors=False, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        V = 10 * inputs["V"].detach()
        inliers = torch.rand(V.shape[:4], generator=gen, dtype=torch.float64) < 0.3
        centre = 10 * torch.randn(V.shape[0], V.shape[1], 1, 1, V.shape[4], 16, generator=gen, dtype=torch.float64)
        V = torch.where(inliers[..., None, None], centre + 1e-3 * torch.randn(V.shape, generator=gen), V)
        single = {key: x.float().detach() if torch.is_tensor(x) else x for key, x in inputs.items()}
        single.update(V=V.float(), a_in=torch.where(inliers, 0.9, 0.1).float(), moment_dtype=torch.float32)
        double = {key: x.double() if torch.is_tensor(x) else x for key, x in single.items()}
        double["moment_dtype"] = torch.float64
        ref = fused_em_routing(**double, normalisation=normalisation, kernels="eager")
        errors = {
            mode: float32_errors(fused_em_routing(**single, normalisation=normalisation, kernels=mode), ref)
            for mode in ("eager", "compiled")
        }
        # both at float32's rounding of these votes: up to 9.4e-6 (eager) and 7.3e-6 (compiled) over these seeds,
        # where float32 sums about the plain mean were off by 6.5e-2 on the assignments (README, "Float32 routing")
        assert max(errors["compiled"]) < 3e-5 and max(errors["eager"]) < 3e-5, errors


@pytest.mark.parametrize("factors", [True, False], ids=["factors", "votes"])
def test_vb_routing_with_compiled_kernels_equals_eager_in_values_and_gradients(factors):
    # variational Bayes routing runs the same passes over the votes (mean, squared distances, the q(R) update)
    results = []
    for mode in ("eager", "compiled"):
        inputs, leaves = em_inputs(conv=True, factors=factors)
        routing = build_routing({"name": "vb", "kernels": mode}, kind="matrix", out_types=4).double()
        assert routing.kernels == mode
        out = routing(inputs["V"], inputs["a_in"], inputs["layout"])
        results.append(outputs_and_gradients(out, leaves[:4]))  # pose, weight, offset, a_in
    assert_same_results(*results)
    # its statistics ran compiled (the M-step weights, the q(R) update), not eager after a failure to trace
    compiled = {key[0] for key in COMPILED._compiled if isinstance(key, tuple)}
    assert {"parent_weights", "vb_assignments"} <= compiled and not COMPILED._untraceable


def test_a_training_step_with_compiled_kernels_equals_eager():
    # em_caps_small's shapes (three routing layers: two convolutional, one class layer with coordinate addition)
    grads = []
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        net = EMCapsNet(
            in_channels=1, image_size=20, num_classes=5, A=8, B=4, C=4, D=4, routing={"name": "em", "kernels": mode}
        ).double()
        x = torch.randn(3, 1, 20, 20, dtype=torch.float64)
        poses, a = net(x)
        loss = (a * torch.arange(5)).sum() + poses.sin().sum()
        loss.backward()
        grads.append([(name, p.grad) for name, p in net.named_parameters()])
    for (name, g_eager), (_, g_compiled) in zip(*grads):
        assert g_eager is not None and torch.allclose(g_eager, g_compiled, atol=1e-11, rtol=1e-8), name


def test_the_kernels_setting_chooses(monkeypatch):
    monkeypatch.delenv(AUTO_ENV, raising=False)
    assert vote_kernels("eager", "cpu") is EAGER
    assert isinstance(vote_kernels("compiled", "cpu"), CompiledKernels) and vote_kernels("compiled", "cpu").strict
    auto = vote_kernels("auto", "cpu")
    assert isinstance(auto, CompiledKernels) and not auto.strict  # a failure to compile warns, runs eager
    assert vote_kernels("auto", "mps") is EAGER  # no torch.compile backend assumed there
    monkeypatch.setenv(AUTO_ENV, "eager")
    assert vote_kernels("auto", "cpu") is EAGER and vote_kernels("compiled", "cpu") is not EAGER
    monkeypatch.setenv(AUTO_ENV, "fast")
    with pytest.raises(ValueError, match=f"{AUTO_ENV}=fast: set it to eager or compiled"):
        vote_kernels("auto", "cpu")
    with pytest.raises(ValueError, match="'fast' is not one of auto, eager, compiled"):
        vote_kernels("fast", "cpu")
    # the setting reaches the routing, and a bad value is refused by name
    assert build_routing({"name": "em", "kernels": "eager"}, kind="matrix", out_types=4).kernels == "eager"
    assert build_routing({"name": "em"}, kind="matrix", out_types=4).kernels == "auto"
    with pytest.raises(Exception, match="kernels"):
        build_routing({"name": "em", "kernels": "fast"}, kind="matrix", out_types=4)


def test_a_kernel_past_the_recompile_limit_runs_eager_without_giving_up_compiling():
    # torch compiles a function for a limited number of shapes and dtypes per process; past it, the call runs the
    # eager kernel (same values) and the kernels stay compiled for the shapes they have
    cases = [
        kernel_cases(g, n, 16, dtype)["pose_sum"] for g, n, dtype in ((9, 7, torch.float64), (4, 3, torch.float32))
    ]
    with torch._dynamo.config.patch(recompile_limit=1), warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: nothing failed
        fresh = CompiledKernels(strict=True)
        for args in cases * 2:
            assert_close((fresh.pose_sum(*args),), (EAGER.pose_sum(*args),), 1e-5)
    assert not kernels._FAILED


def test_under_a_dispatch_mode_the_kernels_run_eager_and_are_seen_by_it():
    # torch.compile refuses to run under a TorchDispatchMode (bench.py counts FLOPs with one): eager there
    from torch.utils.flop_counter import FlopCounterMode

    args = kernel_cases(6, 5, 16, torch.float32)["vote_sum"]
    with FlopCounterMode(display=False) as counter:
        got = COMPILED.vote_sum(*args)
    assert torch.equal(got, EAGER.vote_sum(*args)) and counter.get_total_flops() == 2 * 6 * 5 * 16
    assert not kernels._FAILED


def doubled_with_a_graph_break(x: torch.Tensor) -> torch.Tensor:
    torch._dynamo.graph_break()  # what torch.compile(fullgraph=True) cannot trace whole
    return 2 * x


def test_a_formula_that_does_not_trace_whole_runs_eager_after_one_warning_or_is_refused_under_compiled():
    x = torch.randn(3, 4, requires_grad=True)
    auto = CompiledKernels(strict=False)
    with pytest.warns(RuntimeWarning, match="routing kernels: doubled cannot be compiled .*; running it eager"):
        y = auto.stats("doubled", doubled_with_a_graph_break, x)
    assert torch.equal(y, 2 * x) and y.requires_grad  # eager, differentiable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: from now on eager without trying again
        assert torch.equal(auto.stats("doubled", doubled_with_a_graph_break, x), 2 * x)
    with pytest.raises(RuntimeError, match="doubled cannot be compiled .*set model.routing.kernels=auto or eager"):
        CompiledKernels(strict=True).stats("doubled", doubled_with_a_graph_break, x)
    assert not kernels._FAILED  # the other kernels stay compiled


def test_each_layer_shape_of_the_statistics_compiles_apart_from_the_others():
    # torch counts its limit of compiled versions per function: the statistics take one function per layer shape
    # (and layout and grad mode), so that training, validation and partial batches of several layers never reach it
    # (with one shared function they did, and ran eagerly: README); here four layer shapes under a limit of 2, each
    # compiled as a function of its own (one shared function: 2 versions, the second with P dynamic)
    from capsnets.nn.routing.em_fused import parent_weights

    fresh = CompiledKernels(strict=True)
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(recompile_limit=2):
        for p in (2, 3, 4, 5):
            R, a_in = torch.rand(2, p, 4, 5, 6, dtype=torch.float64), torch.rand(2, p, 1, 5, 6, dtype=torch.float64)
            w, _, _ = fresh.stats("parent_weights", parent_weights, R, a_in, 1e-8, torch.float64)
            assert torch.allclose(w, parent_weights(R, a_in, 1e-8, torch.float64)[0])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4
    assert len(fresh._compiled) == 4


def test_compiled_statistics_are_differentiable_and_equal_eager():
    # the statistics formulas are compiled with their backward pass (autograd through them)
    from capsnets.nn.routing.em_fused import parent_weights

    R = torch.rand(2, 3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    a_in = torch.rand(2, 3, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for which in (EAGER, COMPILED):
        w, sum_R, mass = which.stats("parent_weights", parent_weights, R, a_in, 1e-8, torch.float32)
        assert w.dtype == torch.float32 and w.shape == (24, 30)
        loss = (w.double().cos() * torch.arange(30)).sum() + sum_R.sin().sum() + mass.sum()
        results.append((w, sum_R, mass, *torch.autograd.grad(loss, (R, a_in))))
    for x, y in zip(*results, strict=True):
        assert torch.allclose(x, y, rtol=1e-6 if x.dtype == torch.float32 else 1e-12)


FAILING_COMPILER = textwrap.dedent(
    """
    import sys, warnings
    import torch
    import torch._inductor.config
    from capsnets.nn.routing.kernels import EAGER, vote_kernels

    torch._inductor.config.cpp.cxx = ("/nonexistent/c++",)  # no C++ compiler: Inductor cannot build a CPU kernel
    U, w = torch.randn(6, 5, 16), torch.rand(6, 5)
    if sys.argv[1] == "compiled":
        try:
            vote_kernels("compiled", "cpu").vote_sum(U, w)
        except RuntimeError as error:
            print("ERROR", error)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kernels = vote_kernels("auto", "cpu")
            got = kernels.vote_sum(U, w)
            again = kernels.vote_dot(U, w[:, :1].expand(6, 16).contiguous())
        print("EQUAL", torch.equal(got, EAGER.vote_sum(U, w)), again.shape == (6, 5))
        print("WARNINGS", len(caught), caught[0].message if caught else "")
    """
)


@pytest.mark.parametrize("mode", ["auto", "compiled"])
def test_without_a_cpp_compiler_auto_falls_back_to_eager_and_compiled_names_the_fix(mode, tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # nothing compiled before
    env.pop(AUTO_ENV, None)
    script = tmp_path / "failing_compiler.py"
    script.write_text(FAILING_COMPILER)
    result = subprocess.run(
        [sys.executable, str(script), mode], env=env, capture_output=True, text=True, timeout=300, cwd=Path.cwd()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if mode == "compiled":
        assert "ERROR routing kernels: torch.compile failed on cpu" in result.stdout
        assert "set model.routing.kernels=eager" in result.stdout
    else:
        assert "EQUAL True True" in result.stdout
        # one warning naming the fix, not one per kernel
        assert "WARNINGS 1 routing kernels: torch.compile failed on cpu" in result.stdout, result.stdout
        assert "running the eager kernels" in result.stdout

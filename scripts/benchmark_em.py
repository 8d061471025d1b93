"""Training throughput of the EM-routing capsule network, and of its routing layers alone.

Measures, after ``--warmup`` untimed steps, the median of ``--steps`` timed steps of
  * ``model``: forward + spread-style loss + backward + Adam step of ``EMCapsNet`` (images/s), and
  * every routing layer (ConvCaps1, ConvCaps2, ClassCaps): ``em_routing`` forward + backward on
    the votes that layer received in a forward pass of the model (ms).

``--reference`` also times a straightforward implementation of Procedure 1 defined below
(``(V - mu)^2`` materialised every iteration, einsum contractions: the library's code path
before the single-pass rewrite) on the same inputs, and reports the speed-up and the largest
output difference. The library keeps only the fast path.

Usage::

    python scripts/benchmark_em.py --model em_caps_small --steps 5 --warmup 1
    python scripts/benchmark_em.py --model em_caps --threads 1 --reference --json em_bench.json
    python scripts/benchmark_em.py --device cuda --precision bf16 --batch-size 64

On CPU the routing is memory-bound, and every fresh vote-sized tensor costs page faults on
top of its write; ``THP_MEM_ALLOC_ENABLE=1`` (transparent huge pages for PyTorch's CPU
allocator) or a caching malloc (jemalloc / tcmalloc via LD_PRELOAD) cuts that cost, so
compare numbers only within one environment. On a shared machine compare only the columns
of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from capsnets.models import EMCapsNet
from capsnets.nn.em_routing import EMRouting, EMRoutingResult

EM_MODULE = sys.modules["capsnets.nn.em_routing"]  # the module: the package re-exports the function under its name
MODELS = {"em_caps": dict(A=32, B=32, C=32, D=32), "em_caps_small": dict(A=64, B=8, C=16, D=16)}


def reference_em_routing(
    V: torch.Tensor, a_in: torch.Tensor, *, beta_u: torch.Tensor, beta_a: torch.Tensor, lambdas: list[float],
    var_floor: float = 0.0005, eps: float = 1e-8, child_index: torch.Tensor | None = None, num_children: int | None = None,
    moment_dtype: torch.dtype | None = None,
) -> EMRoutingResult:
    """Procedure 1 as written in the paper, on V (B, P, K, T_in, T_out, D): the comparison baseline (float32; ignores moment_dtype)."""
    with torch.autocast(device_type=V.device.type, enabled=False):
        dtype = torch.promote_types(V.dtype, torch.float32)
        V = V.to(dtype)  # (B, P, K, T_in, T_out, D)
        a_in, beta_u, beta_a = a_in.to(dtype), beta_u.to(dtype), beta_a.to(dtype)
        b, p, k, t_in, t_out, _ = V.shape
        if child_index is None:
            R = V.new_full((b, p, k, t_in, t_out), 1.0 / t_out)
        else:
            covering = torch.bincount(child_index, minlength=num_children).index_select(0, child_index)  # (P*K,)
            R = (1.0 / (covering.to(dtype) * t_out)).view(1, p, k, 1, 1).expand(b, p, k, t_in, t_out)
        for t, lambda_ in enumerate(lambdas):
            R_a = R * a_in[..., None]  # (B, P, K, T_in, T_out)
            sum_R = R_a.sum(dim=(2, 3))  # (B, P, T_out)
            R_norm = R_a / (sum_R[:, :, None, None] + eps)
            mu = torch.einsum("bpkio,bpkiod->bpod", R_norm, V)
            diff_sq = (V - mu[:, :, None, None]) ** 2  # (B, P, K, T_in, T_out, D)
            sigma_sq = torch.einsum("bpkio,bpkiod->bpod", R_norm, diff_sq) + var_floor
            cost = ((beta_u[:, None] + 0.5 * torch.log(sigma_sq)) * sum_R[..., None]).sum(-1)
            logits = lambda_ * (beta_a - cost)  # (B, P, T_out)
            a_out = torch.sigmoid(logits)
            if t == len(lambdas) - 1:
                break
            log_p = -0.5 * ((diff_sq / sigma_sq[:, :, None, None]).sum(-1) + torch.log(2 * math.pi * sigma_sq).sum(-1)[:, :, None, None])
            R = _softmax_over_parents(F.logsigmoid(logits)[:, :, None, None] + log_p, child_index, num_children)
    return EMRoutingResult(mu, sigma_sq, a_out, R)


def _softmax_over_parents(logits: torch.Tensor, child_index: torch.Tensor | None, num_children: int | None) -> torch.Tensor:
    """softmax of (B, P, K, T_in, T_out) over every parent of each child, shifted by the child's max."""
    if child_index is None:
        return torch.softmax(logits, dim=-1)
    b, p, k, t_in, _ = logits.shape
    slot_max = logits.detach().amax(-1).reshape(b, p * k, t_in)
    index = child_index.view(1, -1, 1).expand_as(slot_max)
    child_max = slot_max.new_full((b, num_children, t_in), -math.inf).scatter_reduce(1, index, slot_max, "amax")
    e = torch.exp(logits - child_max.index_select(1, child_index).view(b, p, k, t_in, 1))
    child_sum = e.new_zeros(b, num_children, t_in).index_add(1, child_index, e.sum(-1).reshape(b, p * k, t_in))
    return e / child_sum.index_select(1, child_index).view(b, p, k, t_in, 1)


@contextlib.contextmanager
def routing_implementation(fn: Callable | None) -> Iterator[None]:
    """Temporarily route every ``EMRouting`` layer through ``fn`` (None: the library)."""
    original = EM_MODULE.em_routing
    EM_MODULE.em_routing = fn or original
    try:
        yield
    finally:
        EM_MODULE.em_routing = original


def timed(fn: Callable[[], object], *, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per call of ``fn`` for ``steps`` calls after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def model_step(net: EMCapsNet, optimiser: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, precision: str) -> Callable[[], None]:
    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            _, a = net(x)  # (B, K) class activations
        a_t = a.float().gather(1, y[:, None])
        loss = (F.relu(0.2 - (a_t - a.float())) ** 2).sum() / len(y)  # spread loss (target term is constant)
        loss.backward()
        optimiser.step()
    return step


def capture_routing_inputs(net: EMCapsNet, x: torch.Tensor) -> dict[str, tuple]:
    """The (V, a_in, kwargs) that each routing layer receives in one forward pass."""
    captured: dict[str, tuple] = {}
    hooks = []
    for name, module in net.named_modules():
        if isinstance(module, EMRouting):
            def hook(mod, args, kwargs, name=name):
                captured[name.removesuffix(".routing")] = (mod, args[0].detach(), args[1].detach(), kwargs)
            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return captured


def routing_step(module: EMRouting, V: torch.Tensor, a_in: torch.Tensor, kwargs: dict) -> Callable[[], object]:
    V, a_in = V.clone().requires_grad_(True), a_in.clone().requires_grad_(True)  # clone keeps V's strides

    def step() -> EMRoutingResult:
        V.grad = a_in.grad = None
        out = module(V, a_in, **kwargs)
        (out.mu.sin().sum() + out.a_out.sum()).backward()
        return out
    return step


def max_difference(a: EMRoutingResult, b: EMRoutingResult) -> float:
    return max((x.detach() - y.detach()).abs().max().item() for x, y in [(a.mu, b.mu), (a.a_out, b.a_out), (a.R, b.R)])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="em_caps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=3, help="EM routing iterations")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast outside routing")
    parser.add_argument("--moment-dtype", choices=["float32", "float64"], default="float32", help="EMRouting.moment_dtype")
    parser.add_argument("--reference", action="store_true", help="also time the straightforward implementation")
    parser.add_argument("--skip-model", action="store_true", help="time the routing layers only")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON ('-' for stdout)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    net = EMCapsNet(in_channels=1, image_size=args.image_size, num_classes=args.num_classes,
                    iterations=args.iterations, **MODELS[args.model]).to(device)
    for module in net.modules():
        if isinstance(module, EMRouting):
            module.moment_dtype = args.moment_dtype
    x = torch.randn(args.batch_size, 1, args.image_size, args.image_size, device=device)
    y = torch.randint(args.num_classes, (args.batch_size,), device=device)
    implementations = {"library": None} | ({"reference": reference_em_routing} if args.reference else {})
    rows: list[dict] = []

    if not args.skip_model:
        optimiser = torch.optim.Adam(net.parameters(), lr=1e-4)
        for impl, fn in implementations.items():
            with routing_implementation(fn):
                times = timed(model_step(net, optimiser, x, y, args.precision), steps=args.steps, warmup=args.warmup, device=device)
            median = statistics.median(times)
            rows.append({"what": "model train step", "impl": impl, "ms": 1e3 * median, "images_per_s": args.batch_size / median,
                         "times_s": times})

    for layer, (module, V, a_in, kwargs) in capture_routing_inputs(net, x).items():
        results = {}
        for impl, fn in implementations.items():
            with routing_implementation(fn):
                step = routing_step(module, V, a_in, kwargs)
                times = timed(step, steps=args.steps, warmup=args.warmup, device=device)
                results[impl] = step()
            rows.append({"what": f"routing {layer} fwd+bwd", "impl": impl, "ms": 1e3 * statistics.median(times),
                         "votes": list(V.shape), "times_s": times})
        if args.reference:
            rows[-1]["max_abs_diff_vs_library"] = max_difference(results["library"], results["reference"])

    report = {"config": vars(args) | {"torch": torch.__version__, "threads_used": torch.get_num_threads()}, "results": rows}
    if device.type == "cuda":
        report["peak_cuda_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print_table(rows, args)
    if args.json:
        text = json.dumps(report, indent=2)
        print(text) if args.json == "-" else open(args.json, "w").write(text + "\n")
    return report


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, {args.device}/{args.precision}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} after {args.warmup} warm-up")
    print(f"{'what':32s} {'impl':10s} {'ms':>10s} {'images/s':>9s} {'library is':>11s} {'max |diff|':>10s}")
    library_ms = {row["what"]: row["ms"] for row in rows if row["impl"] == "library"}
    for row in rows:
        ips = f"{row['images_per_s']:9.1f}" if "images_per_s" in row else ""
        faster = f"{row['ms'] / library_ms[row['what']]:.2f}x faster" if row["impl"] != "library" else ""
        diff = f"{row['max_abs_diff_vs_library']:10.1e}" if "max_abs_diff_vs_library" in row else ""
        print(f"{row['what']:32s} {row['impl']:10s} {row['ms']:10.1f} {ips:>9s} {faster:>11s} {diff:>10s}")


if __name__ == "__main__":
    main()

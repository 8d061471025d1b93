"""Training throughput of the matrix-capsule network for every registered matrix routing implementation.

For each implementation of each routing procedure that supports matrix capsules (today: ``em``
with ``impl: reference``, Procedure 1 as written, and ``impl: fused``), measures after
``--warmup`` untimed steps the median of ``--steps`` timed steps of

  * ``model``: forward + spread-style loss + backward + Adam step of ``EMCapsNet`` (images/s), and
  * every routing layer (ConvCaps1, ConvCaps2, ClassCaps): forward + backward of the routing alone,
    on the votes that layer received in a forward pass of the model (ms),

and reports each implementation's speed relative to ``impl: reference`` and its largest output
difference from it on the same inputs. A newly registered matrix routing is picked up without edits.

Usage::

    python scripts/benchmark_em.py --model em_caps_small --steps 5 --warmup 1
    python scripts/benchmark_em.py --model em_caps --threads 1 --json em_bench.json
    python scripts/benchmark_em.py --device cuda --precision bf16 --batch-size 64 --moment-dtype float32

On CPU the routing is memory-bound, and every fresh vote-sized tensor costs page faults on top of
its write; ``THP_MEM_ALLOC_ENABLE=1`` (transparent huge pages for PyTorch's CPU allocator) or a
caching malloc (jemalloc / tcmalloc via LD_PRELOAD) cuts that cost, so compare numbers only within
one environment, and on a shared machine only the columns of one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from capsnets.nets import EMCapsNet
from capsnets.nn.routing import ROUTINGS, Routing, RoutingResult, VoteFactors, routing_layers
from capsnets.nn.routing.base import routing_settings

MODELS = {"em_caps": dict(A=32, B=32, C=32, D=32), "em_caps_small": dict(A=64, B=8, C=16, D=16)}


def matrix_routings() -> list[tuple[str, str]]:
    """(name, impl) of every registered routing for matrix capsules, ``reference`` first within a name."""
    return [
        (n, i)
        for n, impls in sorted(ROUTINGS.items())
        for i in sorted(impls, key=lambda i: i != "reference")
        if "matrix" in impls[i].kinds
    ]


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


def model_step(net: EMCapsNet, x: torch.Tensor, y: torch.Tensor, precision: str) -> Callable[[], None]:
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            _, a = net(x)  # (B, K) class activations
        a_t = a.float().gather(1, y[:, None])
        loss = (F.relu(0.2 - (a_t - a.float())) ** 2).sum() / len(y)  # spread loss (target term is constant)
        loss.backward()
        optimiser.step()

    return step


def capture_routing_inputs(net: EMCapsNet, x: torch.Tensor) -> dict[str, tuple[Routing, tuple]]:
    """The positional inputs (votes, a_in, layout) each routing layer receives in one forward pass."""
    captured: dict[str, tuple[Routing, tuple]] = {}
    hooks = [
        routing.register_forward_pre_hook(lambda mod, args, name=name: captured.__setitem__(name, (mod, args)))
        for name, routing in routing_layers(net).items()
    ]
    with torch.no_grad():
        net(x)
    for hook in hooks:
        hook.remove()
    return captured


def routing_step(routing: Routing, args: tuple) -> Callable[[], RoutingResult]:
    """Forward + backward of one routing layer on the (detached) inputs it received: (votes, [a_in, [layout]])."""
    V, *rest = args
    a_in = rest[0] if rest else None  # None: a routing without child activations (dynamic routing)
    layout = rest[1] if len(rest) > 1 else None

    def leaf(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.detach().clone().requires_grad_(True)  # clone keeps the strides

    # the votes, or their factors (a matrix-capsule layer's VoteFactors: the pose, weight and offset get gradients)
    V = VoteFactors(*(leaf(x) for x in (V.pose, V.weight, V.offset))) if isinstance(V, VoteFactors) else leaf(V)
    a_in = leaf(a_in)
    leaves = [
        x for x in (*((V.pose, V.weight, V.offset) if isinstance(V, VoteFactors) else (V,)), a_in) if x is not None
    ]

    def step() -> RoutingResult:
        for x in leaves:
            x.grad = None
        out = routing(V, a_in, layout)
        (out.poses.float().sin().sum() + out.activations.float().sum()).backward()
        return out

    return step


def max_difference(a: RoutingResult, b: RoutingResult) -> float:
    return max((x.detach().double() - y.detach().double()).abs().max().item() for x, y in zip(a, b))


def build(args: argparse.Namespace, name: str, impl: str, device: torch.device) -> EMCapsNet:
    torch.manual_seed(args.seed)  # the same weights for every implementation
    routing = {"name": name, "impl": impl, "iterations": args.iterations, "moment_dtype": args.moment_dtype}
    # only the settings this routing has (variational Bayes routing has no moment_dtype)
    settings = routing_settings(ROUTINGS[name][impl])
    routing = {key: value for key, value in routing.items() if key in ("name", "impl") or key in settings}
    size = {"in_channels": 1, "image_size": args.image_size, "num_classes": args.num_classes}
    return EMCapsNet(**size, **MODELS[args.model], routing=routing).to(device)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch_size, 1, args.image_size, args.image_size, device=device)
    y = torch.randint(args.num_classes, (args.batch_size,), device=device)
    rows: list[dict] = []
    outputs: dict[str, dict[str, RoutingResult]] = {}
    for name, impl in matrix_routings():
        label = f"{name}/{impl}"
        if not args.skip_model:
            times = timed(
                model_step(build(args, name, impl, device), x, y, args.precision),
                steps=args.steps,
                warmup=args.warmup,
                device=device,
            )
            median = statistics.median(times)
            rows.append(
                {
                    "what": "model train step",
                    "impl": label,
                    "ms": 1e3 * median,
                    "images_per_s": args.batch_size / median,
                    "times_s": times,
                }
            )
        for layer, (routing, inputs) in capture_routing_inputs(build(args, name, impl, device), x).items():
            step = routing_step(routing, inputs)
            times = timed(step, steps=args.steps, warmup=args.warmup, device=device)
            outputs.setdefault(layer, {})[label] = step()
            row = {
                "what": f"routing {layer} fwd+bwd",
                "impl": label,
                "ms": 1e3 * statistics.median(times),
                "votes": list(inputs[0].shape),
                "times_s": times,
            }
            if "em/reference" in outputs[layer] and label != "em/reference":
                row["max_abs_diff_vs_reference"] = max_difference(outputs[layer]["em/reference"], outputs[layer][label])
            rows.append(row)
    report = {
        "config": vars(args) | {"torch": torch.__version__, "threads_used": torch.get_num_threads()},
        "results": rows,
    }
    if device.type == "cuda":
        report["peak_cuda_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


def print_table(report: dict) -> None:
    args, rows = report["config"], report["results"]
    print(
        f"{args['model']}, batch {args['batch_size']}, {args['image_size']}x{args['image_size']}, {args['device']}/"
        f"{args['precision']}, moments {args['moment_dtype']}, {report['config']['threads_used']} threads, "
        f"median of {args['steps']} after {args['warmup']} warm-up"
    )
    print(f"{'what':32s} {'impl':14s} {'ms':>10s} {'images/s':>9s} {'vs reference':>13s} {'max |diff|':>10s}")
    reference_ms = {row["what"]: row["ms"] for row in rows if row["impl"] == "em/reference"}
    for row in rows:
        ips = f"{row['images_per_s']:9.1f}" if "images_per_s" in row else ""
        base = reference_ms.get(row["what"])
        ratio = f"{base / row['ms']:.2f}x faster" if base and row["impl"] != "em/reference" else ""
        diff = f"{row['max_abs_diff_vs_reference']:10.1e}" if "max_abs_diff_vs_reference" in row else ""
        print(f"{row['what']:32s} {row['impl']:14s} {row['ms']:10.1f} {ips:>9s} {ratio:>13s} {diff:>10s}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="em_caps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=3, help="EM routing iterations")
    parser.add_argument("--moment-dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast outside routing")
    parser.add_argument("--skip-model", action="store_true", help="time the routing layers only")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON ('-' for stdout)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    print_table(report)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

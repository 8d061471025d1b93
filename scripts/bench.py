"""``make bench``: training and inference speed of the standard cases, as ratios measured in one run.

The CPU under a machine changes from day to day, so every figure is put next to what the same run
measured of the machine itself and of a reference:

* the machine: float32 and bf16 matmul GFLOP/s (a 2048^3 product) and memory bandwidth (a 512 MB copy),
  probed in this run, with the device's name;
* per case (dr_caps on MNIST shapes at batch 32 and 128; em_caps_small and em_caps on smallNORB shapes at
  batch 32), each in float32 and, where the CPU or GPU has native bf16 matmuls, under bf16 autocast, each in
  its own process (so peak memory is the case's own): the bare training step (forward, loss, backward,
  optimiser step of the LightningModule's network and loss) and inference, in images/s (medians); peak memory
  (RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU); the share of the step spent in routing (forward +
  backward of every routing layer on the inputs it received); training GFLOP/s (3 x the forward FLOPs counted
  by ``torch.utils.flop_counter``) as a share of the matmul ceiling of its precision, probed again in the case's
  own process right after its timings (on a shared machine the first probe can be a neighbour's load away); and
  for routings with a faster implementation (dynamic and EM routing), the readable reference procedure
  (``impl: reference``) timed on the same inputs, with its own peak memory;
* the user's path: images/s through ``train.py`` (Lightning loop, DataModule, callbacks) on ``data=synthetic``
  of the same shape, against the bare step (target: within 10%);
* the allocator: the bench runs under the one ``train.py`` uses (``capsnets.utils.allocator``: jemalloc keeping
  freed pages where the machine has it) and then also times the float32 step under the system's malloc.

Each case's variants (default, reference, system malloc) are measured ``--repeats`` times in turn and their
medians reported: on a shared machine one process's speed swings by 2x from one minute to the next (measured:
dr_caps at batch 32, 32.7 then 76.5 img/s in two runs of the same child minutes apart).

Results: a table on stdout and ``outputs/bench/<date>_<time>.json``. Usage::

    python scripts/bench.py                       # everything, 3 repeats (CPU: ~30 min on 2 cores)
    python scripts/bench.py --cases em_caps_small --steps 3
    python scripts/bench.py --device cuda --batch 64
    python scripts/bench.py --routings            # each routing vs its backbone's own (experiment=routing_comparison)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # benchmark_em's timing and routing-capture helpers


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    image_size: int
    num_classes: int
    batch: int
    overrides: tuple[str, ...] = ()


CASES = [
    Case("dr_caps_b32", "dr_caps", 28, 10, 32),
    Case("dr_caps_b128", "dr_caps", 28, 10, 128),
    Case("em_caps_small_norb_b32", "em_caps_small", 32, 5, 32),
    Case("em_caps_norb_b32", "em_caps", 32, 5, 32),
]

# --routings: every routing on the backbone of experiment=routing_comparison, batch 32; the first of each
# backbone is the one the others are compared with (dr_caps: dynamic routing; em_caps_small: capsnets' EM routing;
# ida_caps at the comparison's CPU budget, simple backbone and 16 types: inverted dot-product routing)
ROUTING_BACKBONES = {
    "dr_caps": (("dr_caps", 28, 10, ()), ("dynamic", "self_attention", "uniform", "random")),
    "em_caps_small": (("em_caps_small", 28, 10, ()), ("em_capsnets", "vb", "uniform", "random")),
    "ida_caps": (
        (
            "ida_caps",
            28,
            10,
            ("model.net.backbone=simple", "model.net.primary_types=16", "model.net.caps_types=[16,16]"),
        ),
        ("inverted_dot_product", "uniform", "random"),
    ),
}
ROUTING_CASES = [
    Case(f"{backbone}+{routing}", model, size, classes, 32, (*extra, f"model/routing={routing}"))
    for backbone, ((model, size, classes, extra), routings) in ROUTING_BACKBONES.items()
    for routing in routings
]


# --------------------------------------------------------------------------- the machine
def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: str) -> bool:
    """bf16 autocast is worth measuring: a GPU with bf16, or a CPU with AVX512-BF16 / AMX."""
    import torch

    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def median_seconds(fn, *, steps: int, warmup: int, device: str) -> float:
    import torch

    from benchmark_em import timed  # torch loads here, after THP_MEM_ALLOC_ENABLE is set

    return statistics.median(timed(fn, steps=steps, warmup=warmup, device=torch.device(device)))


def matmul_gflops(precision: str, device: str) -> float:
    """GFLOP/s of a 2048^3 matrix product in ``precision`` (fp32/float32 or bf16), median of 5."""
    import torch

    n = 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = median_seconds(lambda: torch.mm(a, b), steps=5, warmup=2, device=device)
    return 2 * n**3 / seconds / 1e9


def probe_machine(device: str) -> dict:
    """Matmul GFLOP/s (float32, bf16) and memory bandwidth (GB/s, bytes read + written by a copy)."""
    import torch

    result = {f"matmul_{name}_gflops": matmul_gflops(name, device) for name in ("float32", "bf16")}
    src = torch.empty(128 * 2**20, device=device)  # 512 MB of float32
    src.fill_(1.0)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), steps=5, warmup=2, device=device)
    result["memory_gb_per_s"] = 2 * src.numel() * 4 / seconds / 1e9
    return result


# --------------------------------------------------------------------------- one case, in its own process
def rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, it does not carry over the peak of the
    process that forked this one before the exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB -> MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case_config(case: Case, extra: list[str]):
    """The composed training config of ``case`` (``data=synthetic`` of the case's shape)."""
    from hydra import compose, initialize_config_dir

    from capsnets.utils.resolvers import CONFIG_DIR

    overrides = [
        f"model={case.model}",
        "data=synthetic",
        f"data.image_size={case.image_size}",
        f"data.num_classes={case.num_classes}",
        *case.overrides,
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def build_module(case: Case, extra: list[str]):
    from hydra.utils import instantiate

    return instantiate(case_config(case, extra).model, _convert_="all")


def has_reference(case: Case) -> bool:
    """Whether the case's routing runs a faster implementation than its readable ``impl: reference``, which is
    then timed on the same inputs."""
    from capsnets.nn.routing.base import DEFAULT_IMPLS, ROUTINGS

    name = case_config(case, []).model.routing.name
    return "reference" in ROUTINGS.get(name, {}) and DEFAULT_IMPLS[name] != "reference"


def measure_case(case: Case, *, impl: str | None, precision: str, device: str, steps: int, warmup: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmark_em import capture_routing_inputs, routing_step
    from capsnets.utils.allocator import loaded_allocator

    baseline = rss_mb()
    torch.manual_seed(0)
    module = build_module(case, [f"model.routing.impl={impl}"] if impl else []).to(device)
    batch = case.batch
    x = torch.randn(batch, 1, case.image_size, case.image_size, device=device)
    y = torch.randint(case.num_classes, (batch,), device=device)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = module.shared_step((x, y), "train")[0]
        loss.backward()
        optimizer.step()

    def inference() -> None:
        with torch.no_grad(), autocast:
            module.scores(x)

    module.train()
    step_s = median_seconds(train_step, steps=steps, warmup=warmup, device=device)
    module.eval()
    infer_s = median_seconds(inference, steps=steps, warmup=warmup, device=device)
    module.train()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module.scores(x)
    forward_flops = counter.get_total_flops()
    # the routing's share: forward + backward of every routing layer on the inputs it received
    routing_s = 0.0
    with autocast:
        captured = capture_routing_inputs(module.net, x)
    for routing, inputs in captured.values():
        routing_s += median_seconds(routing_step(routing, inputs), steps=steps, warmup=1, device=device)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_mb()
    # the matmul ceiling of this precision probed again here, right after the case's timings: on a shared machine
    # the one probed at the start can be minutes and a neighbour's load away (measured: start-of-run float32 probes
    # of 173 and 101 GFLOP/s half an hour apart; per-case probes of 147-170 in the run after)
    ceiling = matmul_gflops(precision, device)
    return {
        "case": case.name,
        "impl": impl or "default",
        "precision": precision,
        "train_images_per_s": batch / step_s,
        "inference_images_per_s": batch / infer_s,
        "train_step_ms": 1e3 * step_s,
        "routing_share": routing_s / step_s,
        "routing_layers_timed": len(captured),  # 0: routing outside the seam (ida_caps' concurrent rounds)
        "train_gflops": 3 * forward_flops / step_s / 1e9,
        "matmul_ceiling_gflops": ceiling,
        "forward_gflop_per_image": forward_flops / batch / 1e9,
        "peak_memory_mb": peak,
        "baseline_rss_mb": baseline if device == "cpu" else 0.0,
        "allocator": loaded_allocator(),
    }


def measure_compiled(case: Case, *, backend: str, device: str, steps: int) -> dict:
    """Training img/s of the case compiled (``compile.enabled=true`` with ``backend``) and eager, interleaved in this
    process on the same weights and inputs (float32), the first compiled step's seconds (the compilation) and both
    first losses (the compiled path computes what the eager one does)."""
    import torch

    from capsnets.utils.compile import compile_model

    torch.manual_seed(0)
    eager = build_module(case, []).to(device)
    compiled = build_module(case, []).to(device)
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled, {"enabled": True, "backend": backend})
    x = torch.randn(case.batch, 1, case.image_size, case.image_size, device=device)
    y = torch.randint(case.num_classes, (case.batch,), device=device)

    def loss_of(module) -> float:  # one step's loss, without changing the weights
        module.zero_grad(set_to_none=True)
        loss = module.shared_step((x, y), "train")[0]
        loss.backward()
        return float(loss.detach())

    began = time.perf_counter()
    first_compiled = loss_of(compiled)
    first_step_s = time.perf_counter() - began
    first_eager = loss_of(eager)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(steps):  # interleaved, so that a neighbour's load falls on both
        for name, module in (("eager", eager), ("compiled", compiled)):
            times[name].append(median_seconds(lambda m=module: loss_of(m), steps=1, warmup=0, device=device))
    return {
        "case": case.name,
        "backend": backend,
        "eager_train_images_per_s": case.batch / statistics.median(times["eager"]),
        "compiled_train_images_per_s": case.batch / statistics.median(times["compiled"]),
        "first_compiled_step_s": first_step_s,
        "loss_eager": first_eager,
        "loss_compiled": first_compiled,
    }


def compile_table(report: dict) -> str:
    lines = [
        "",
        f"torch.compile ({report['compile']}), float32 training, eager and compiled steps interleaved in one process:",
        "",
        "| case | eager img/s | compiled img/s | compiled / eager | first compiled step (s) | loss eager / compiled |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in report.get("compiled", []):
        lines.append(
            f"| {row['case']} | {row['eager_train_images_per_s']:.1f} | {row['compiled_train_images_per_s']:.1f} | "
            f"{row['compiled_train_images_per_s'] / row['eager_train_images_per_s']:.2f}x | "
            f"{row['first_compiled_step_s']:.0f} | {row['loss_eager']:.6g} / {row['loss_compiled']:.6g} |"
        )
    return "\n".join(lines)


def measure_compare(case: Case, overrides: list[str], *, precision: str, device: str, steps: int) -> dict:
    """Training img/s of the case as configured and with ``overrides`` (model settings, e.g.
    ``model.net.primary_weight_grad=native``), interleaved in this process on the same inputs, in ``precision``.
    Where both configurations have parameters of the same shapes, the second starts from the first's weights (a
    speed comparison: an override of the initialisation itself is then not compared) and the largest relative
    difference of their parameter gradients after one step is reported with both losses, so that a setting that
    should not change the values can be seen not to."""
    import torch

    torch.manual_seed(0)
    base = build_module(case, []).to(device)
    torch.manual_seed(0)
    other = build_module(case, list(overrides)).to(device)
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (base, other)]
    same_weights = shapes[0] == shapes[1]
    if same_weights:
        other.load_state_dict(base.state_dict())
    x = torch.randn(case.batch, 1, case.image_size, case.image_size, device=device)
    y = torch.randint(case.num_classes, (case.batch,), device=device)

    def loss_of(module) -> float:  # one step's loss and gradients, without changing the weights
        module.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = module.shared_step((x, y), "train")[0]
        loss.backward()
        return float(loss.detach())

    losses = {"default": loss_of(base), "compared": loss_of(other)}  # also the warm-up step of each
    grad_diff = None
    if same_weights:  # max over parameters of max |g_compared - g_default| / max |g_default|
        pairs = zip(base.parameters(), other.parameters())
        grad_diff = max(
            float((b.grad - o.grad).abs().max() / b.grad.abs().max().clamp_min(1e-30))
            for b, o in pairs
            if b.grad is not None and o.grad is not None
        )
    times: dict[str, list[float]] = {"default": [], "compared": []}
    order = [("default", base), ("compared", other)]
    for _ in range(steps):  # interleaved, A B then B A, so that a neighbour's load and the order fall on both
        for name, module in order:
            times[name].append(median_seconds(lambda m=module: loss_of(m), steps=1, warmup=0, device=device))
        order.reverse()
    return {
        "case": case.name,
        "precision": precision,
        "overrides": list(overrides),
        "same_weights": same_weights,
        "default_train_images_per_s": case.batch / statistics.median(times["default"]),
        "compared_train_images_per_s": case.batch / statistics.median(times["compared"]),
        "loss_default": losses["default"],
        "loss_compared": losses["compared"],
        "max_grad_rel_diff": grad_diff,
    }


def compare_table(report: dict) -> str:
    overrides = " ".join(report["compare"])
    same = all(r["same_weights"] for r in report["compared"])
    lines = [
        f"capsnets bench --compare, {report['time']}: {report['device_name']} ({report['device']}, "
        f"{report['threads']} threads, allocator: {report.get('allocator', 'system')})",
        "",
        f"as configured vs `{overrides}`, training steps interleaved in one process (A B, B A, ...), the same inputs"
        + (" and weights (a speed comparison: the overrides' own initialisation is not compared)" if same else "")
        + ":",
        "",
        f"| case | precision | as configured img/s | `{overrides}` img/s | configured / compared "
        "| loss configured / compared | max relative gradient difference |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["compared"]:
        ratio = row["default_train_images_per_s"] / row["compared_train_images_per_s"]
        diff = "-" if row.get("max_grad_rel_diff") is None else f"{row['max_grad_rel_diff']:.1e}"
        lines.append(
            f"| {row['case']} | {row['precision']} | {row['default_train_images_per_s']:.1f} | "
            f"{row['compared_train_images_per_s']:.1f} | {ratio:.2f}x | {row['loss_default']:.6g} / "
            f"{row['loss_compared']:.6g} | {diff} |"
        )
    return "\n".join(lines)


def user_path(case: Case, *, device: str, steps: int) -> float | None:
    """Median images/s through ``train.py`` (perf/train_images_per_s of the Throughput callback)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            f"model={case.model}",
            "data=synthetic",
            f"data.image_size={case.image_size}",
            f"data.num_classes={case.num_classes}",
            f"data.batch_size={case.batch}",
            f"data.num_train={case.batch * (steps + 4)}",
            f"data.num_val={case.batch}",
            f"data.num_test={case.batch}",
            f"trainer={'gpu' if device == 'cuda' else 'cpu'}",
            "trainer.max_epochs=1",
            "+trainer.limit_val_batches=0",
            "callbacks=[none,throughput]",
            "logger=csv",
            "test=false",
            "optimized_metric=null",
            *case.overrides,
            f"hydra.run.dir={tmp}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ.copy())
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return None
        metrics = json.loads((Path(tmp) / "metrics.json").read_text())["metrics"]
        return metrics.get("perf/train_images_per_s")


def with_batch(case: Case, batch: int | None) -> Case:
    return case if batch is None else Case(**{**asdict(case), "batch": batch})


def run_child(args: argparse.Namespace) -> None:
    case = with_batch(next(c for c in CASES + ROUTING_CASES if c.name == args.child), args.batch)
    if args.compile:
        result = measure_compiled(case, backend=args.compile, device=args.device, steps=args.steps)
        print("BENCH-RESULT " + json.dumps(result), flush=True)
        return
    if args.compare:
        result = measure_compare(case, args.compare, precision=args.precision, device=args.device, steps=args.steps)
        print("BENCH-RESULT " + json.dumps(result), flush=True)
        return
    result = measure_case(
        case, impl=args.impl, precision=args.precision, device=args.device, steps=args.steps, warmup=args.warmup
    )
    print("BENCH-RESULT " + json.dumps(result), flush=True)


def system_malloc_env() -> dict[str, str]:
    """This environment without the preloaded jemalloc: a child started with it runs on the system's malloc."""
    from capsnets.utils.allocator import MODE_ENV, without_allocator

    return {**without_allocator(os.environ), MODE_ENV: "system"}


def median_result(results: list[dict]) -> dict:
    """One child's result with every number the median over ``results`` (repeats of the same measurement)."""
    merged = dict(results[0])
    for key, value in merged.items():
        if isinstance(value, float):
            merged[key] = statistics.median(r[key] for r in results)
    merged["repeats"] = len(results)
    return merged


def in_child(
    args: argparse.Namespace,
    case: Case,
    *,
    impl: str | None,
    precision: str,
    system_malloc: bool = False,
    compile_backend: str | None = None,
) -> dict | None:
    cmd = [sys.executable, __file__, "--child", case.name, "--precision", precision, "--device", args.device]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--impl", impl] if impl else [])
    cmd += ["--compile", compile_backend] if compile_backend else []
    cmd += ["--compare", *args.compare] if args.compare else []
    cmd += ["--batch", str(case.batch)]
    env = system_malloc_env() if system_malloc else os.environ.copy()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            return json.loads(line[len("BENCH-RESULT ") :])
    print(f"{case.name} {impl or 'default'} {precision}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


# --------------------------------------------------------------------------- the report
def table(report: dict) -> str:
    machine = report["machine"]
    repeats = report.get("repeats", 1)
    lines = [
        f"capsnets bench, {report['time']}: {report['device_name']} ({report['device']}, {report['threads']} threads"
        f"{', THP on' if report['thp'] else ''}, allocator: {report.get('allocator', 'system')}"
        f"{f', medians of {repeats} repeats' if repeats > 1 else ''})",
        f"machine: float32 matmul {machine['matmul_float32_gflops']:.0f} GFLOP/s, bf16 "
        f"{machine['matmul_bf16_gflops']:.0f} GFLOP/s, memory {machine['memory_gb_per_s']:.1f} GB/s",
        "",
        "| case | precision | train img/s | infer img/s | routing share | train GFLOP/s (% of the matmul ceiling "
        "probed with it) "
        "| peak MB | reference img/s | speed-up vs reference | memory vs reference | train.py img/s (vs bare) "
        "| system malloc img/s (jemalloc's gain) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        ceiling = (
            row.get("matmul_ceiling_gflops")
            or machine[f"matmul_{'bf16' if row['precision'] == 'bf16' else 'float32'}_gflops"]
        )
        ref = row.get("reference")
        user = row.get("user_path_images_per_s")
        system = row.get("system_malloc_images_per_s")
        lines.append(
            f"| {row['case']} | {row['precision']} | {row['train_images_per_s']:.1f} | "
            f"{row['inference_images_per_s']:.1f} | {100 * row['routing_share']:.0f}% | "
            f"{row['train_gflops']:.0f} ({100 * row['train_gflops'] / ceiling:.0f}%) | {row['peak_memory_mb']:.0f} | "
            + (
                f"{ref['train_images_per_s']:.1f} | {row['train_images_per_s'] / ref['train_images_per_s']:.2f}x | "
                f"{row['peak_memory_mb'] / ref['peak_memory_mb']:.2f} | "
                if ref
                else "- | - | - | "
            )
            + (f"{user:.1f} ({100 * user / row['train_images_per_s']:.0f}%) |" if user else "- |")
            + (f" {system:.1f} ({row['train_images_per_s'] / system:.2f}x) |" if system else " - |")
        )
    return "\n".join(lines)


def routing_table(report: dict) -> str:
    """Training img/s of every routing relative to the first routing of its backbone, measured in this run."""
    lines = [
        f"capsnets bench --routings, {report['time']}: {report['device_name']} ({report['device']}, "
        f"{report['threads']} threads), float32, batch {report['batch_override'] or 32}, 28x28 images, 10 classes",
        "",
        "| backbone | routing | train img/s | vs the backbone's own routing | infer img/s | routing share | peak MB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    base: dict[str, float] = {}
    for row in report["rows"]:
        backbone, routing = row["case"].split("+", 1)
        base.setdefault(backbone, row["train_images_per_s"])
        lines.append(
            f"| {backbone} | {routing} | {row['train_images_per_s']:.1f} | "
            f"{row['train_images_per_s'] / base[backbone]:.2f}x | {row['inference_images_per_s']:.1f} | "
            + (f"{100 * row['routing_share']:.0f}%" if row.get("routing_layers_timed", 1) else "- (concurrent)")
            + f" | {row['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", default=None, help="case names or model names (default: all)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per figure (medians)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="every case at this batch size (default: its own)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measure each case's variants (default, reference, system malloc) this many times in turn and take "
        "the medians: on a shared machine the speed of one process can swing 2x from one minute to the next",
    )
    parser.add_argument("--no-user-path", action="store_true", help="skip the train.py figures")
    parser.add_argument(
        "--no-system-malloc",
        action="store_true",
        help="skip the float32 training figure under the system's malloc (measured when jemalloc is in use; "
        "never with --routings)",
    )
    parser.add_argument(
        "--routings",
        action="store_true",
        help="instead of the standard cases: every routing on its backbone (float32, batch 32), relative to the "
        "backbone's own routing (dr_caps: dynamic; em_caps_small: em; ida_caps: inverted dot-product)",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="also time each case's float32 training step compiled (torch.compile, default backend inductor) against "
        "eager, interleaved in one process (the first step compiles: minutes on a CPU)",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="OVERRIDE",
        help="instead of the standard figures: each case's training step as configured and with these overrides "
        "(e.g. model.net.primary_weight_grad=native), interleaved in one process, float32 and bf16",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare and (args.routings or args.compile):
        parser.error(
            "--compare measures the cases as configured against the overrides; run --routings and --compile apart"
        )
    if args.child:
        run_child(args)
        return
    import torch

    from capsnets.utils.allocator import loaded_allocator

    pool = ROUTING_CASES if args.routings else CASES
    cases = [with_batch(c, args.batch) for c in pool if not args.cases or c.name in args.cases or c.model in args.cases]
    if not cases:
        parser.error(f"no such case; cases: {', '.join(c.name for c in pool)}")
    precisions = ["fp32"] + ([] if args.routings or args.no_bf16 or not native_bf16(args.device) else ["bf16"])
    report = {
        "time": datetime.now().isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": device_name(args.device),
        "threads": torch.get_num_threads(),
        "batch_override": args.batch,
        "repeats": args.repeats,
        "thp": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
        "allocator": loaded_allocator(),
        "torch": torch.__version__,
        "machine": probe_machine(args.device),
        "rows": [],
        "compile": args.compile,
        "compiled": [],
        "compare": args.compare,
    }
    if args.compare:
        report["compared"] = [
            result
            for case in cases
            for precision in precisions
            if (result := in_child(args, case, impl=None, precision=precision)) is not None
        ]
    for case in [] if args.compare else cases:  # --compare: only the comparison
        for precision in precisions:
            # the variants of this case, each measured args.repeats times in turn (A B C A B C ...), medians
            variants = {"default": dict(impl=None)}
            if not args.routings and has_reference(case):
                variants["reference"] = dict(impl="reference")
            # the system's malloc for the standard cases (--routings compares routings, under one allocator)
            if (
                precision == "fp32"
                and report["allocator"] == "jemalloc"
                and not (args.no_system_malloc or args.routings)
            ):
                variants["system"] = dict(impl=None, system_malloc=True)
            runs: dict[str, list[dict]] = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, kwargs in variants.items():
                    result = in_child(args, case, precision=precision, **kwargs)
                    if result is not None:
                        runs[name].append(result)
            if not runs["default"]:
                continue
            row = median_result(runs["default"])
            if runs.get("reference"):
                row["reference"] = median_result(runs["reference"])
            system = median_result(runs["system"]) if runs.get("system") else None
            if system is not None and system["allocator"] == "system":
                row["system_malloc_images_per_s"] = system["train_images_per_s"]
            if precision == "fp32" and not args.no_user_path and not args.routings:
                row["user_path_images_per_s"] = user_path(case, device=args.device, steps=max(args.steps, 8))
            report["rows"].append(row)
            print(f"{case.name} {precision}: {row['train_images_per_s']:.1f} img/s", file=sys.stderr, flush=True)
        if args.compile:
            result = in_child(args, case, impl=None, precision="fp32", compile_backend=args.compile)
            if result is not None:
                report["compiled"].append(result)
    if args.compare:
        text = compare_table(report)
    else:
        text = routing_table(report) if args.routings else table(report)
    if args.compile:
        text += "\n" + compile_table(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    (args.out / f"{stem}.json").write_text(json.dumps({**report, "cases": [asdict(c) for c in cases]}, indent=2))
    (args.out / f"{stem}.md").write_text(text + "\n")
    print(f"\nwritten: {args.out / stem}.json, .md")


if __name__ == "__main__":
    # the allocator train.py uses (jemalloc keeping freed pages where the machine has it, THP), chosen before
    # torch loads; CAPSNETS_ALLOCATOR=system measures the system's malloc (capsnets/utils/allocator.py)
    from capsnets.utils.allocator import use_fast_allocator

    use_fast_allocator()
    main()

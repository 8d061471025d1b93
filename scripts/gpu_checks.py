"""The GPU checks of the open issues as one prepared run: ``python3 scripts/gpu_checks.py --out DIR``.

A GPU is lent to this project's sessions only now and then, for minutes, on a bare machine; this script is what such
a session runs, so its minutes go to measuring, not to setting up. In order, each with its own time limit:

1. ``bench_em``: ``scripts/bench.py --device cuda`` on em_caps at batch 64 (target: >= 3,000 training img/s on an
   H100/H200-class GPU; the fused routing timed against the readable reference, float32 and bf16);
2. ``bench_std``: the standard cases at their own batches (dr_caps 128, em_caps_small and em_caps 32), with the
   user path through ``train.py``;
3. ``dr_epoch``: dr_caps, one epoch of Fashion-MNIST through ``train.py`` (55,000 training images: the target is
   one 60,000-image MNIST epoch in <= 5 s; MNIST itself cannot be downloaded there);
4. ``em_small_mnist_sample`` and ``em_fashion``, side by side on the GPU once the timings are done: em_caps_small on
   ``data=mnist_sample`` for 20 epochs (target >= 98% test accuracy) and em_caps on Fashion-MNIST for 10 epochs
   (target >= 90%). Each stops at its share of the budget (``trainer.max_time``) and is then tested, so a short
   budget still yields a test figure, with the epochs it reached.

Everything lands in ``--out`` as three files: ``gpu_checks.json`` (every figure, command, return code and wall time),
``gpu_checks.md`` (the table against the targets) and ``gpu_checks.log`` (the end of each step's output).

Set-up, here first (``make gpu-kit``): wheels of what the GPU image lacks (Hydra, OmegaConf, ANTLR) into ``.whl/``
and Fashion-MNIST into ``data/``; then on the GPU machine, from the repository root, with both carried::

    python3 scripts/gpu_checks.py --out "$OUT" --budget 540

The script installs the wheels into a private folder when Hydra is missing and runs everything with ``src`` on the
path (no install). ``--device cpu --smoke`` runs the same steps on a CPU with tiny budgets (a check of the
plumbing, no figures); ``--plan`` prints the commands.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
SITE = Path(tempfile.gettempdir()) / "capsnets-site"

# the issues' GPU targets (issue 11: performance; issue 9: matrix capsules that learn)
TARGETS = {
    "em_caps_b64_train_images_per_s": 3000.0,
    "dr_caps_mnist_epoch_s": 5.0,
    "em_caps_small_mnist_sample_test_acc": 0.98,
    "em_caps_fashion_test_acc": 0.90,
}


@dataclass
class Step:
    name: str
    argv: list[str]
    share: float  # of the budget: the step's time limit
    parallel: bool = False  # runs beside the other parallel steps, after every serial one
    run_dir: Path | None = None  # train.py's hydra.run.dir
    bench_dir: Path | None = None
    result: dict = field(default_factory=dict)


def train_argv(python: str, run_dir: Path, overrides: list[str]) -> list[str]:
    return [
        python,
        str(ROOT / "train.py"),
        *overrides,
        "logger=csv",
        "optimized_metric=null",
        f"hydra.run.dir={run_dir}",
    ]


def plan(args: argparse.Namespace, work: Path) -> list[Step]:
    """The steps of this run, in order (the budget split by their shares)."""
    py, device = sys.executable, args.device
    trainer = "trainer=gpu" if device == "cuda" else "trainer=cpu"
    smoke = ["+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"]
    bench = [py, str(ROOT / "scripts" / "bench.py"), "--device", device, "--repeats", "1"]
    bench += ["--steps", "1", "--warmup", "0", "--no-bf16", "--no-system-malloc"] if args.smoke else ["--steps", "10"]
    steps = [
        Step("bench_em", [*bench, "--cases", "em_caps_norb_b32", "--batch", "4" if args.smoke else "64",
                          "--no-user-path"], 0.15),
        Step("bench_std", [*bench, *(["--batch", "4", "--no-user-path"] if args.smoke else []), "--cases",
                           "dr_caps_b128", "em_caps_small_norb_b32", "em_caps_norb_b32"], 0.25),
        Step("dr_epoch", ["model=dr_caps", "data=fashion_mnist", trainer, "trainer.max_epochs=1", "test=false",
                          "callbacks=[none,throughput]", *(smoke if args.smoke else [])], 0.1),
        Step("em_small_mnist_sample", ["model=em_caps_small", "data=mnist_sample", "data.batch_size=32", trainer,
                                       "trainer.max_epochs=1" if args.smoke else "trainer.max_epochs=20",
                                       *(smoke if args.smoke else [])], 0.5, parallel=True),
        Step("em_fashion", ["model=em_caps", "data=fashion_mnist", trainer,
                            "trainer.max_epochs=1" if args.smoke else "trainer.max_epochs=10",
                            *(smoke if args.smoke else [])], 0.5, parallel=True),
    ]  # fmt: skip
    steps = [s for s in steps if not args.only or s.name in args.only]
    for step in steps:
        if step.name.startswith("bench"):
            step.bench_dir = work / step.name
            step.argv = [*step.argv, "--out", str(step.bench_dir)]
        else:
            step.run_dir = work / step.name
            step.argv = train_argv(py, step.run_dir, step.argv)
    return steps


def environment() -> dict[str, str]:
    """The children's environment: ``src`` on the path, and the carried wheels where Hydra is missing."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    paths = [str(ROOT / "src")]
    missing = subprocess.run([sys.executable, "-c", "import hydra, omegaconf"], capture_output=True).returncode != 0
    if missing:
        wheels = sorted(WHEELS.glob("*.whl"))
        if not wheels:
            raise SystemExit(f"Hydra is not installed and {WHEELS} holds no wheels: run `make gpu-kit` first")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--upgrade",
                "--target",
                str(SITE),
                *map(str, wheels),
            ],
            check=True,
        )
        paths.append(str(SITE))
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def last_rows(run_dir: Path) -> list[dict[str, str]]:
    """The csv logger's rows (``<run>/csv/version_*/metrics.csv``), for a run that ended before its record."""
    rows: list[dict[str, str]] = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with path.open() as f:
            rows += list(csv.DictReader(f))
    return rows


def collect(step: Step) -> dict:
    """The figures a finished (or stopped) step left behind."""
    if step.bench_dir is not None:
        reports = sorted(step.bench_dir.glob("*.json"))
        return json.loads(reports[-1].read_text()) if reports else {}
    assert step.run_dir is not None
    record = step.run_dir / "metrics.json"
    result: dict = {}
    if record.is_file():
        result["metrics"] = json.loads(record.read_text())["metrics"]
    epochs = [row for row in last_rows(step.run_dir) if row.get("val/acc")]
    result["val_acc_by_epoch"] = [float(row["val/acc"]) for row in epochs]
    return result


def targets(steps: dict[str, Step]) -> list[tuple[str, float | None, float, bool | None, str]]:
    """(target, measured, wanted, met, how) for each target whose step ran."""
    rows = []

    def add(name, value, how, higher=True):
        wanted = TARGETS[name]
        met = None if value is None else (value >= wanted if higher else value <= wanted)
        rows.append((name, value, wanted, met, how))

    if "bench_em" in steps:
        row = next((r for r in steps["bench_em"].result.get("rows", []) if r["precision"] == "fp32"), None)
        add("em_caps_b64_train_images_per_s", row and row["train_images_per_s"], "scripts/bench.py, float32")
    if "dr_epoch" in steps:
        speed = steps["dr_epoch"].result.get("metrics", {}).get("perf/train_images_per_s")
        add("dr_caps_mnist_epoch_s", speed and 60000 / speed, "60,000 / train.py's img/s on Fashion-MNIST", False)
    for name, key in (
        ("em_small_mnist_sample", "em_caps_small_mnist_sample_test_acc"),
        ("em_fashion", "em_caps_fashion_test_acc"),
    ):
        if name in steps:
            result = steps[name].result
            epochs = len(result.get("val_acc_by_epoch", []))
            add(key, result.get("metrics", {}).get("test/acc"), f"test/acc after {epochs} epoch(s) (val per epoch)")
    return rows


def run(steps: list[Step], args: argparse.Namespace, env: dict[str, str], log) -> None:
    def start(step: Step) -> tuple[subprocess.Popen, float, float]:
        limit = step.share * args.budget
        if step.run_dir is not None:  # train.py stops itself in time to be tested
            hms = time.strftime("%H:%M:%S", time.gmtime(max(30.0, 0.8 * limit - 45)))
            step.argv.append(f"+trainer.max_time=00:{hms}")
        print(f"== {step.name} (limit {limit:.0f} s): {shlex.join(step.argv)}", file=log, flush=True)
        proc = subprocess.Popen(
            step.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        return proc, time.monotonic(), limit

    def finish(step: Step, proc: subprocess.Popen, began: float, limit: float) -> None:
        try:
            output, _ = proc.communicate(timeout=max(1.0, began + limit - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            step.result["timed_out"] = True
        step.result.update(returncode=proc.returncode, wall_s=round(time.monotonic() - began, 1))
        step.result.update(collect(step))
        tail = "\n".join(output.splitlines()[-40:])
        print(f"-- {step.name}: rc {proc.returncode}, {step.result['wall_s']} s\n{tail}", file=log, flush=True)

    for step in [s for s in steps if not s.parallel]:
        finish(step, *start(step))
    side_by_side = [(step, *start(step)) for step in steps if step.parallel]
    for step, proc, began, limit in side_by_side:
        finish(step, proc, began, limit)


def report(steps: list[Step], args: argparse.Namespace) -> str:
    by_name = {s.name: s for s in steps}
    lines = [
        f"# GPU checks, {time.strftime('%Y-%m-%d %H:%M')} ({args.device}, budget {args.budget:.0f} s"
        f"{', smoke' if args.smoke else ''})",
        "",
        "| target | measured | wanted | met | how |",
        "|---|---:|---:|---|---|",
    ]
    for name, value, wanted, met, how in targets(by_name):
        shown = "-" if value is None else f"{value:.4g}"
        lines.append(f"| {name} | {shown} | {wanted:g} | {'-' if met is None else 'yes' if met else 'no'} | {how} |")
    lines += ["", "| step | return code | wall s |", "|---|---:|---:|"]
    lines += [f"| {s.name} | {s.result.get('returncode')} | {s.result.get('wall_s')} |" for s in steps]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "outputs" / "gpu_checks"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all steps together")
    parser.add_argument("--only", nargs="*", help="run only these steps")
    parser.add_argument("--smoke", action="store_true", help="tiny steps: checks the plumbing, measures nothing")
    parser.add_argument("--plan", action="store_true", help="print the steps' commands and exit")
    args = parser.parse_args()
    # the steps' own folders (bench reports, train.py run dirs): only what --out receives is kept
    work = (
        Path(tempfile.gettempdir(), "capsnets-gpu-checks")
        if args.plan
        else Path(tempfile.mkdtemp(prefix="capsnets-gpu-checks-"))
    )
    steps = plan(args, work)
    names = [step.name for step in plan(argparse.Namespace(**{**vars(args), "only": None}), work)]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"no step named {', '.join(unknown)}; the steps: {', '.join(names)}")
    if args.plan:
        for step in steps:
            print(
                f"{step.name} ({step.share:.0%} of the budget{', in parallel' if step.parallel else ''}): "
                f"{shlex.join(step.argv)}"
            )
        return
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    with (args.out / "gpu_checks.log").open("w") as log:
        run(steps, args, env, log)
    judged = targets({s.name: s for s in steps})
    payload = {
        "budget_s": args.budget,
        "device": args.device,
        "smoke": args.smoke,
        "steps": {s.name: {"argv": s.argv, **s.result} for s in steps},
        "targets": [dict(zip(("target", "measured", "wanted", "met", "how"), row)) for row in judged],
    }
    (args.out / "gpu_checks.json").write_text(json.dumps(payload, indent=1) + "\n")
    text = report(steps, args)
    (args.out / "gpu_checks.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""``make bench`` (scripts/bench.py) and the Throughput callback it reads train.py's speed from.

No speed is asserted (speed is measured by the benchmark, not by tests): these check that every figure the
report promises is there, measured, and consistent with the others."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from capsnets.callbacks import Throughput
from capsnets.data import SyntheticDataModule
from capsnets.errors import ConfigError
from capsnets.utils.allocator import find_jemalloc

from helpers import ROOT, quiet_trainer


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(28 * 28, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_throughput_logs_the_median_images_per_second_of_each_epoch():
    dm = SyntheticDataModule(num_train=16 * 8, num_val=16, num_test=16, batch_size=16)
    callback = Throughput(skip=2)
    trainer = quiet_trainer(max_epochs=2, callbacks=[callback], limit_val_batches=0)
    trainer.fit(Tiny(), datamodule=dm)
    assert callback.images_per_s is not None and callback.images_per_s > 0
    assert len(callback._rates) == 8 - 2  # the second epoch's batches after the warm-up ones
    assert trainer.callback_metrics["perf/train_images_per_s"].item() == pytest.approx(callback.images_per_s)


def test_throughput_skip_must_be_positive():
    with pytest.raises(ConfigError, match="callbacks.throughput.skip"):
        Throughput(skip=0)


@pytest.mark.slow
def test_bench_reports_every_figure_of_a_case(tmp_path):
    # one case end to end (each variant of a case is a process of its own: ~10 s apiece); dr_caps' figures are
    # measured in-process below
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--cases", "em_caps_small_norb_b32"]
        + ["--steps", "1", "--warmup", "0", "--batch", "4", "--no-bf16", "--repeats", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report_path,) = tmp_path.glob("*.json")
    report = json.loads(report_path.read_text())
    assert report["device"] == "cpu" and report["device_name"] and report["thp"]
    machine = report["machine"]
    assert machine["matmul_float32_gflops"] > 0 and machine["matmul_bf16_gflops"] > 0
    assert machine["memory_gb_per_s"] > 0
    rows = {row["case"]: row for row in report["rows"]}
    assert set(rows) == {"em_caps_small_norb_b32"} and report["batch_override"] == 4
    for row in rows.values():
        assert row["precision"] == "fp32" and row["train_images_per_s"] > 0 and row["inference_images_per_s"] > 0
        assert row["routing_share"] > 0 and row["peak_memory_mb"] > row["baseline_rss_mb"] > 0
        assert row["user_path_images_per_s"] > 0  # through train.py
        assert row["matmul_ceiling_gflops"] > 0  # probed in the case's own process, next to its timings
    # the bench runs under train.py's allocator, and under jemalloc also times the system's malloc
    allocator = "jemalloc" if find_jemalloc(os.environ) else "system"
    assert report["allocator"] == allocator and {row["allocator"] for row in rows.values()} == {allocator}
    for row in rows.values():
        assert (row.get("system_malloc_images_per_s", 0) > 0) == (allocator == "jemalloc")
    # the routing runs a fused implementation, timed against the readable reference procedure on the same inputs
    for row in rows.values():
        assert row["impl"] == "default" and row["reference"]["impl"] == "reference"
        assert row["reference"]["train_images_per_s"] > 0 and row["reference"]["peak_memory_mb"] > 0
    table = (tmp_path / report_path.name.replace(".json", ".md")).read_text()
    assert "speed-up vs reference" in table and "em_caps_small_norb_b32" in table
    assert f"allocator: {allocator}" in table


def test_a_case_measured_in_process_reports_its_flops_routing_share_and_ceiling():
    bench = load_bench()
    case = bench.with_batch(next(c for c in bench.CASES if c.name == "dr_caps_b32"), 2)
    row = bench.measure_case(case, impl=None, precision="fp32", device="cpu", steps=1, warmup=0)
    assert row["case"] == "dr_caps_b32" and row["impl"] == "default" and row["precision"] == "fp32"
    # dr_caps: ~0.2 G multiply-adds per MNIST image forward (0.4 GFLOP; training ~1.2 GFLOP = 6 x MACs)
    assert 0.3 < row["forward_gflop_per_image"] < 0.5
    assert row["train_images_per_s"] > 0 and row["inference_images_per_s"] > 0 and row["routing_layers_timed"] == 1
    assert 0 < row["routing_share"] < 1 and row["matmul_ceiling_gflops"] > 0
    assert row["train_gflops"] == pytest.approx(3 * row["forward_gflop_per_image"] * row["train_images_per_s"])


def test_a_case_compiled_is_timed_against_eager_on_the_same_weights():
    bench = load_bench()
    case = bench.with_batch(next(c for c in bench.CASES if c.name == "dr_caps_b32"), 2)
    row = bench.measure_compiled(case, backend="aot_eager", device="cpu", steps=2)
    assert row["case"] == "dr_caps_b32" and row["backend"] == "aot_eager"
    assert row["loss_compiled"] == pytest.approx(row["loss_eager"], rel=1e-5)  # the same step, compiled
    assert row["eager_train_images_per_s"] > 0 and row["compiled_train_images_per_s"] > 0
    assert row["first_compiled_step_s"] > 0
    table = bench.compile_table({"compile": "aot_eager", "compiled": [row]})
    assert "| dr_caps_b32 |" in table and "torch.compile (aot_eager)" in table


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_setting_is_timed_against_the_configuration_in_one_process(precision):
    bench = load_bench()
    case = bench.with_batch(next(c for c in bench.CASES if c.name == "dr_caps_b32"), 2)
    overrides = ["model.net.primary_weight_grad=native"]
    row = bench.measure_compare(case, overrides, precision=precision, device="cpu", steps=2)
    assert row["case"] == "dr_caps_b32" and row["precision"] == precision and row["overrides"] == overrides
    assert row["same_weights"]  # the setting changes no parameter: both modules start from the same weights
    assert row["loss_compared"] == row["loss_default"]  # the weight gradient's path does not change the loss
    assert row["max_grad_rel_diff"] < (1e-4 if precision == "fp32" else 3e-2)  # ... nor the gradients
    assert row["default_train_images_per_s"] > 0 and row["compared_train_images_per_s"] > 0
    table = bench.compare_table(
        {"compare": overrides, "compared": [row], "time": "t", "device_name": "cpu0", "device": "cpu", "threads": 2}
    )
    assert f"| dr_caps_b32 | {precision} |" in table and "`model.net.primary_weight_grad=native` img/s" in table
    # a setting that changes the parameters: each configuration keeps its own initial weights
    other = bench.measure_compare(case, ["model.net.class_dim=8"], precision="fp32", device="cpu", steps=1)
    assert not other["same_weights"] and other["loss_compared"] != other["loss_default"]
    assert other["max_grad_rel_diff"] is None


@pytest.mark.slow
def test_bench_routings_times_each_routing_against_its_backbones_own(tmp_path):
    cases = ["dr_caps+dynamic", "dr_caps+self_attention", "ida_caps+inverted_dot_product", "ida_caps+random"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--routings", "--cases", *cases]
        + ["--steps", "1", "--warmup", "0", "--batch", "4", "--repeats", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report_path,) = tmp_path.glob("*.json")
    rows = {row["case"]: row for row in json.loads(report_path.read_text())["rows"]}
    assert list(rows) == cases and all(row["precision"] == "fp32" for row in rows.values())
    assert all(row["train_images_per_s"] > 0 and "reference" not in row for row in rows.values())
    # one allocator for every routing: no second child under the system's malloc (the table does not show it)
    assert not any("system_malloc_images_per_s" in row for row in rows.values())
    table = (tmp_path / report_path.name.replace(".json", ".md")).read_text()
    assert "float32, batch 4, 28x28" in table
    assert "| dr_caps | dynamic |" in table and "| 1.00x |" in table and "| ida_caps | random |" in table


def load_bench():
    spec = importlib.util.spec_from_file_location("capsnets_bench_script", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_repeated_measurements_are_merged_into_medians_of_every_figure():
    bench = load_bench()
    runs = [
        {"case": "c", "impl": "default", "train_images_per_s": rate, "peak_memory_mb": peak, "routing_layers_timed": 3}
        for rate, peak in [(30.0, 900.0), (80.0, 1000.0), (75.0, 950.0)]
    ]
    merged = bench.median_result(runs)
    assert merged["train_images_per_s"] == 75.0 and merged["peak_memory_mb"] == 950.0  # a 2x outlier is outvoted
    assert merged["case"] == "c" and merged["routing_layers_timed"] == 3 and merged["repeats"] == 3
    assert runs[0]["train_images_per_s"] == 30.0  # the inputs are left as they were


@pytest.mark.parametrize("other", [["--routings"], ["--compile"]])
def test_compare_is_refused_alongside_routings_or_compile(other):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--compare", "model.net.primary_weight_grad=native"]
    proc = subprocess.run(cmd + other, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "run --routings and --compile apart" in proc.stderr

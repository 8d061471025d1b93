"""scripts/gpu_checks.py: the prepared run of the GPU checks. No GPU is needed here: the steps' commands must compose
into the configs the targets name, and the targets must be judged from what the steps leave behind."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from capsnets.utils.resolvers import CONFIG_DIR

from helpers import ROOT


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"capsnets_{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def plan(tmp_path: Path, **options):
    checks = load("gpu_checks")
    args = argparse.Namespace(**{"device": "cuda", "smoke": False, "only": None, "budget": 540.0, **options})
    return checks, {step.name: step for step in checks.plan(args, tmp_path)}


def train_config(step):
    overrides = [a for a in step.argv[2:] if not a.startswith("hydra.")]  # after python train.py
    assert step.argv[1].endswith("train.py")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_the_training_steps_compose_into_the_runs_the_targets_name(tmp_path):
    _, steps = plan(tmp_path)
    assert list(steps) == ["bench_em", "bench_std", "dr_epoch", "em_small_mnist_sample", "em_fashion"]
    expected = {  # step: (model, data, epochs, batch)
        "dr_epoch": ("dr_caps", "fashion_mnist", 1, 128),
        "em_small_mnist_sample": ("em_caps_small", "mnist_sample", 20, 32),
        "em_fashion": ("em_caps", "fashion_mnist", 10, 128),
    }
    for name, (model, data, epochs, batch) in expected.items():
        cfg = train_config(steps[name])
        assert f"model={model}" in steps[name].argv and f"data={data}" in steps[name].argv
        if model == "dr_caps":
            assert cfg.model.routing.name == "dynamic"
        else:  # the paper's large (A=B=C=D=32) and small (C=D=16) matrix-capsule networks
            assert cfg.model.routing.name == "em" and (16 if model == "em_caps_small" else 32) == cfg.model.net.C
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.max_epochs == epochs and cfg.data.batch_size == batch
        assert cfg.logger is not None and "csv" in cfg.logger  # no W&B on the GPU machine
        assert f"hydra.run.dir={tmp_path / name}" in steps[name].argv
    assert train_config(steps["dr_epoch"]).test is False
    # the two learning runs share the GPU after the timings; their shares and the serial ones fill the budget
    assert [s.name for s in steps.values() if s.parallel] == ["em_small_mnist_sample", "em_fashion"]
    assert sum(s.share for s in steps.values() if not s.parallel) + max(
        s.share for s in steps.values() if s.parallel
    ) == pytest.approx(1.0)


def test_the_bench_steps_time_the_standard_cases_on_the_gpu(tmp_path):
    bench = load("bench")
    _, steps = plan(tmp_path)
    cases = {c.name for c in bench.CASES}
    for name in ("bench_em", "bench_std"):
        argv = steps[name].argv
        assert argv[1].endswith("bench.py") and argv[argv.index("--device") + 1] == "cuda"
        after = argv[argv.index("--cases") + 1 :]
        named = after[: next(i for i, a in enumerate(after) if a.startswith("--"))]
        assert named and set(named) <= cases
        assert argv[argv.index("--out") + 1] == str(tmp_path / name)
    em = steps["bench_em"].argv
    assert em[em.index("--batch") + 1] == "64" and em[em.index("--cases") + 1] == "em_caps_norb_b32"
    assert "--batch" not in steps["bench_std"].argv  # each standard case at its own batch
    _, smoke = plan(tmp_path, device="cpu", smoke=True, only=["bench_em", "dr_epoch"])
    assert list(smoke) == ["bench_em", "dr_epoch"]
    assert "trainer=cpu" in smoke["dr_epoch"].argv and "+trainer.limit_train_batches=2" in smoke["dr_epoch"].argv


def test_targets_are_judged_from_what_the_steps_left(tmp_path):
    checks, steps = plan(tmp_path)
    steps["bench_em"].result = {
        "rows": [
            {"precision": "fp32", "train_images_per_s": 3200.0},
            {"precision": "bf16", "train_images_per_s": 1000.0},
        ]
    }
    steps["dr_epoch"].result = {"metrics": {"perf/train_images_per_s": 10000.0}}  # 6 s for 60,000 images
    steps["em_small_mnist_sample"].result = {"metrics": {"test/acc": 0.985}, "val_acc_by_epoch": [0.9] * 20}
    steps["em_fashion"].result = {"val_acc_by_epoch": [0.8, 0.85]}  # stopped before its test: no figure
    rows = {row[0]: row for row in checks.targets(steps)}
    assert rows["em_caps_b64_train_images_per_s"][1:4] == (3200.0, 3000.0, True)  # float32, not bf16
    assert rows["dr_caps_mnist_epoch_s"][1] == pytest.approx(6.0) and rows["dr_caps_mnist_epoch_s"][3] is False
    assert rows["em_caps_small_mnist_sample_test_acc"][3] is True
    assert "after 20 epoch(s)" in rows["em_caps_small_mnist_sample_test_acc"][4]
    assert rows["em_caps_fashion_test_acc"][1] is None and rows["em_caps_fashion_test_acc"][3] is None
    args = argparse.Namespace(device="cuda", budget=540.0, smoke=False)
    table = checks.report(list(steps.values()), args)
    assert "| em_caps_b64_train_images_per_s | 3200 | 3000 | yes |" in table
    assert "| dr_caps_mnist_epoch_s | 6 | 5 | no |" in table and "| em_caps_fashion_test_acc | - | 0.9 | - |" in table


def test_a_stopped_run_still_reports_its_validation_curve(tmp_path):
    checks, steps = plan(tmp_path)
    step = steps["em_fashion"]
    csv_dir = step.run_dir / "csv" / "version_0"
    csv_dir.mkdir(parents=True)
    (csv_dir / "metrics.csv").write_text("epoch,step,train/loss,val/acc\n0,10,0.5,\n0,10,,0.71\n1,20,,0.78\n")
    assert checks.collect(step) == {"val_acc_by_epoch": [0.71, 0.78]}
    (step.run_dir / "metrics.json").write_text(json.dumps({"metrics": {"test/acc": 0.8}}))
    assert checks.collect(step)["metrics"] == {"test/acc": 0.8}


def test_the_children_find_capsnets_in_src_without_an_install(tmp_path, monkeypatch):
    checks = load("gpu_checks")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    env = checks.environment()  # Hydra is installed here: no wheels needed, none installed
    assert env["PYTHONPATH"].split(":") == [str(ROOT / "src")] and env["WANDB_MODE"] == "disabled"

"""Bad configurations, as the override strings a user types, each refused before anything is built or written,
with the key named: types and booleans, ranges, choices, cross-field rules, misspelled options and keys, devices.

In-process through ``capsnets.train.train`` (the CLI's own path after Hydra composes; tests/test_cli.py checks
exit code 2 and the one-line message through the real command line)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from capsnets.errors import ConfigError
from capsnets.train import train
from capsnets.utils.resolvers import CONFIG_DIR

from helpers import SMALL_DR_CAPS

DR = ["model=dr_caps", *SMALL_DR_CAPS]
EM = ["model=em_caps_small", "model.net.A=8", "model.net.B=4", "model.net.C=4", "model.net.D=4"]
SYNTH = ["data=synthetic", "data.num_train=32", "data.num_val=16", "data.num_test=16"]

CASES = [
    # --- types and booleans: any string used to be "true"
    ("bool_reconstruction", [*DR, "model.net.reconstruction=no"], "model.net.reconstruction"),
    ("bool_coordinate_addition", [*EM, "model.net.coordinate_addition=no"], "model.net.coordinate_addition"),
    ("bool_download", ["data=mnist", "data.download=no"], "data.download"),
    ("bool_pin_memory", ["data.pin_memory=1"], "data.pin_memory"),
    ("bool_test", ["test=maybe"], "test must be true or false"),
    ("bool_multirun_fail_fast", ["multirun_fail_fast=yes"], "multirun_fail_fast must be true or false"),
    ("bool_train", ["train=yes"], "train must be true or false"),
    ("test_checkpoint", ["test_checkpoint=final"], "test_checkpoint must be one of"),
    ("bool_deterministic", ["trainer.deterministic=sometimes"], "trainer.deterministic"),
    ("int_A", [*EM, "model.net.A=abc"], "model.net.A must be an integer"),
    ("int_A_float", [*EM, "model.net.A=2.5"], "model.net.A must be an integer"),
    ("int_batch", ["data.batch_size=abc"], "data.batch_size must be an integer"),
    ("int_batch_float", ["data.batch_size=3.5"], "data.batch_size must be an integer"),
    ("int_val_size", ["data.val_size=many"], "data.val_size must be an integer"),
    ("seed_string", ["seed=abc"], "seed must be an integer"),
    ("seed_negative", ["seed=-1"], "seed must be an integer"),
    ("list_decoder", [*DR, "model.net.decoder_hidden=wide"], "model.net.decoder_hidden must be a list"),
    ("str_pose", [*EM, "model.net.pose=1"], "model.net.pose must be a string"),
    ("float_coordinate_scale", [*EM, "model.net.coordinate_scale=big"], "model.net.coordinate_scale must be"),
    ("int_iterations_type", [*DR, "model.routing.iterations=abc"], "model.routing.iterations"),
    # --- ranges
    ("iterations_0", [*DR, "model.routing.iterations=0"], "model.routing.iterations"),
    ("em_iterations_0", [*EM, "model.routing.iterations=0"], "model.routing.iterations"),
    ("lr_negative", ["model.optimizer.lr=-1"], "model.optimizer.lr"),
    ("lr_zero", ["model.optimizer.lr=0"], "model.optimizer.lr"),
    ("weight_decay", ["model.optimizer.weight_decay=-0.1"], "model.optimizer.weight_decay"),
    ("batch_0", ["data.batch_size=0"], "data.batch_size"),
    ("workers_negative", ["data.num_workers=-1"], "data.num_workers"),
    ("class_dim_0", [*DR, "model.net.class_dim=0"], "model.net.class_dim"),
    ("m_plus_range", [*DR, "model.loss.m_plus=1.5"], "model.loss.m_plus"),
    ("down_weight_range", [*DR, "model.loss.down_weight=-0.1"], "model.loss.down_weight"),
    ("var_floor", [*EM, "model.routing.var_floor=-1"], "model.routing.var_floor"),
    ("lambda_value", [*EM, "model.routing.lambda_value=-0.01"], "model.routing.lambda_value"),
    ("decay_rate", ["model.scheduler.decay_rate=2"], "model.scheduler.decay_rate"),
    ("decay_samples", ["model.scheduler.decay_samples=0"], "model.scheduler.decay_samples"),
    ("final_fraction", ["model.scheduler.name=cosine", "model.scheduler.final_fraction=3"], "final_fraction"),
    ("normalised_inputs_with_a_decoder", [*DR, "data=cifar10", "data.normalize=true"], "data.normalize=true"),
    ("multistep_without_milestones", ["model.scheduler.name=multistep"], "at each of milestone_samples"),
    (
        "multistep_milestones_order",
        ["model.scheduler.name=multistep", "+model.scheduler.milestone_samples=[5000,300]"],
        "milestone_samples must increase",
    ),
    ("max_epochs", ["trainer.max_epochs=-5"], "trainer.max_epochs"),
    ("accumulate_0", ["+trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches"),
    ("val_check_0", ["+trainer.val_check_interval=0"], "trainer.val_check_interval"),
    ("log_every_0", ["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps"),
    ("check_val_0", ["trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch"),
    ("max_skips_0", ["nonfinite_max_skips=0"], "nonfinite_max_skips"),
    ("margin_start", [*EM, "model.loss.margin_schedule.start=-0.2"], "model.loss.margin_schedule.start"),
    ("curve_every_0", ["callbacks=learning_curve", "callbacks.learning_curve.every_samples=0"], "every_samples"),
    # --- choices
    ("recon_weight", [*DR, "model.loss.recon_weight=-1"], "model.loss.recon_weight"),
    ("em_loss_name", [*EM, "model.loss.name=hinge"], "model.loss.name"),
    ("normalisation", [*EM, "model.routing.normalisation=all"], "model.routing.normalisation"),
    ("impl", [*EM, "model.routing.impl=fast"], "model.routing.impl"),
    ("lambda_schedule", [*EM, "model.routing.lambda_schedule=cosine"], "model.routing.lambda_schedule"),
    ("moment_dtype", [*EM, "model.routing.moment_dtype=float16"], "model.routing.moment_dtype"),
    ("pose", [*EM, "model.net.pose=quaternion"], "model.net.pose"),
    ("optimizer", ["model.optimizer.name=rmsprop"], "model.optimizer.name"),
    ("scheduler", ["model.scheduler.name=step"], "model.scheduler.name"),
    ("nonfinite", ["nonfinite=ignore"], "nonfinite must be one of stop, skip"),
    ("optimized_metric", ["optimized_metric=val/accc"], "Did you mean optimized_metric=val/acc"),
    ("margin_schedule", [*EM, "model.loss.margin_schedule.schedule=cubic"], "model.loss.margin_schedule.schedule"),
    ("cnn_architecture", ["model=cnn_hinton2018", "model.net.architecture=resnet"], "model.net.architecture"),
    ("routing_kind", [*DR, "model/routing=em"], "does not support vector capsules"),
    # --- cross-field rules
    ("num_classes", [*DR, "model.net.num_classes=12"], "model.net.num_classes=12 but the data has data.num_classes=10"),
    ("in_channels", [*DR, "model.net.in_channels=3"], "model.net.in_channels=3"),
    ("image_size", [*EM, "model.net.image_size=32"], "model.net.image_size=32"),
    (
        "margins_order",
        [*DR, "model.loss.m_plus=0.1", "model.loss.m_minus=0.9"],
        "must be larger than model.loss.m_minus",
    ),
    (
        "margin_decreasing",
        [*EM, "model.loss.margin_schedule.start=0.9", "model.loss.margin_schedule.end=0.2"],
        "a decreasing",
    ),
    ("shift_whole_image", ["data.shift_pixels=28"], "data.shift_pixels=28"),
    ("shift_beyond_image", [*SYNTH, "data.shift_pixels=100"], "data.shift_pixels=100"),
    ("crop_beyond_resize", ["data=smallnorb", "data.image_size=64"], "data.image_size=64 crops are larger"),
    ("train_false_no_ckpt", ["train=false"], "train=false tests a model without training it"),
    # --- devices
    ("devices_too_many", ["trainer=cpu", "trainer.devices=64"], "trainer.devices=64"),
    ("devices_zero", ["trainer=cpu", "trainer.devices=0"], "trainer.devices=0"),
    ("gpu_without_gpu", ["trainer=gpu"], "Fix: trainer=cpu"),
    ("ddp_without_gpu", ["trainer=ddp"], "trainer=ddp_sim"),
    # --- misspelled options and keys
    ("experiment_typo", ["experiment=sabour2017_mnsit"], "Did you mean experiment=sabour2017_mnist"),
    ("debug_typo", ["debug=fastest"], "debug=fastest: there is no such option"),
    ("hparams_search_typo", ["hparams_search=dr_caps_optunaa"], "Did you mean hparams_search=dr_caps_optuna"),
    ("net_key_typo", [*DR, "+model.net.conv1_chanels=16"], "Did you mean model.net.conv1_channels"),
    ("data_key_typo", ["+data.batchsize=32"], "Did you mean data.batch_size"),
    ("routing_key_typo", [*DR, "+model.routing.iteration=2"], "iteration is not a setting of routing 'dynamic'"),
]


@pytest.mark.parametrize("overrides, key", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_refused_before_anything_is_written(tmp_path: Path, overrides: list[str], key: str):
    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[*overrides, f"paths.output_dir={run_dir}", "logger=csv"],
            return_hydra_config=True,
        )
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert key in str(info.value), str(info.value)
    assert not run_dir.exists()  # no checkpoint folder, no logs, no metrics.json


def test_the_table_is_large_and_covers_every_category():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


# --- eval.py: its own settings, the trainer and the data, through the same checks, before the checkpoint is read
EVAL_CASES = [
    ("eval_missing_ckpt", [], "ckpt_path is required"),
    ("eval_split_choice", ["split=tset"], "split"),
    ("eval_crops_range", ["test_crops=0"], "test_crops"),
    ("eval_viewpoints_split", ["split=val", "viewpoints=novel"], "viewpoints"),
    ("eval_overrides_type", ["data_overrides=3"], "data_overrides"),
    ("eval_seed_type", ["seed=abc"], "seed"),
    ("eval_gpu_without_gpu", ["trainer=gpu"], "trainer=cpu"),
    ("eval_devices", ["trainer.devices=64"], "trainer.devices"),
    ("eval_data_type", ["data=mnist", "data.download=no"], "data.download"),
]


@pytest.mark.parametrize("overrides, key", [c[1:] for c in EVAL_CASES], ids=[c[0] for c in EVAL_CASES])
def test_bad_eval_config_is_refused_before_the_checkpoint_is_read(tmp_path: Path, overrides: list[str], key: str):
    from capsnets.eval import evaluate

    # a path that does not exist: every case must be refused before eval.py looks at it
    ckpt = [] if "missing" in key or key == "ckpt_path is required" else [f"ckpt_path={tmp_path / 'absent.ckpt'}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[*ckpt, *overrides, "logger=csv"], return_hydra_config=True)
    with pytest.raises(ConfigError) as info:
        evaluate(cfg)
    assert key in str(info.value), str(info.value)
    assert "absent.ckpt" not in str(info.value)  # not the checkpoint's problem: the setting's

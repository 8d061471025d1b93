"""eval.py: multi-crop testing, other splits, familiar/novel viewpoints, results JSON next to the checkpoint.

Two tiny checkpoints are trained once through the real CLI (a matrix-capsule net on a fake
smallNORB in the real file format with the azimuth protocol, a CapsNet on tiny MNIST IDX files);
the evaluations then run through ``eval.py`` as a user would, and the config errors also in-process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from capsnets.data import SmallNORBDataModule
from capsnets.data.smallnorb import AZIMUTH_TRAIN_DEGREES
from capsnets.errors import ConfigError
from capsnets.eval import evaluate
from capsnets.utils.resolvers import CONFIG_DIR

from helpers import SMALL_DR_CAPS, N, run_cli, write_fake_smallnorb, write_tiny_mnist

TINY_EM = ["model.net.A=8", "model.net.B=4", "model.net.C=4", "model.net.D=4"]
SMALL_CROPS = ["data.resize=24", "data.image_size=20"]  # 20 px crops of 24 px images: the smallest em_caps input
VAL_SIZE = 6  # of the 18 familiar-azimuth training rows of the fake smallNORB (N = 54 per part)
FAMILIAR, NOVEL = N * 6 // 18, N * 12 // 18  # 6 of the 18 azimuths are trained on; the other 12 are novel


def logged(stdout: str, key: str) -> float:
    """A metric from train.py's summary line (``Metrics: key=value, ...``)."""
    match = re.search(rf"{re.escape(key)}=([0-9.]+)", stdout)
    assert match, stdout[-2000:]
    return float(match.group(1))


@pytest.fixture(scope="module")
def azimuth_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(last.ckpt, train.py stdout) of em_caps trained one epoch on the azimuth protocol."""
    root = tmp_path_factory.mktemp("azimuth")
    write_fake_smallnorb(root / "data")
    proc = run_cli(
        "train.py",
        "model=em_caps",
        "data=smallnorb_azimuth",
        f"data.data_dir={root / 'data'}",
        "data.download=false",
        f"data.val_size={VAL_SIZE}",
        "data.batch_size=16",
        *SMALL_CROPS,
        *TINY_EM,
        "trainer=cpu",
        "trainer.max_epochs=1",
        "logger=none",
        f"paths.log_dir={root}",
        f"hydra.run.dir={root / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run" / "checkpoints" / "last.ckpt", proc.stdout


@pytest.fixture(scope="module")
def mnist_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of a small CapsNet trained one epoch on tiny MNIST IDX files."""
    root = tmp_path_factory.mktemp("mnist")
    write_tiny_mnist(root / "data")
    proc = run_cli(
        "train.py",
        "data=mnist",
        f"data.data_dir={root / 'data'}",
        "data.download=false",
        "data.val_size=32",
        "data.batch_size=32",
        "data.num_workers=0",
        *SMALL_DR_CAPS,
        "trainer=cpu",
        "trainer.max_epochs=1",
        "logger=none",
        "test=false",
        f"paths.log_dir={root}",
        f"hydra.run.dir={root / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run" / "checkpoints" / "last.ckpt"


def results(ckpt: Path) -> dict[str, dict]:
    """Every results file next to ``ckpt``, by file name."""
    return {p.name: json.loads(p.read_text()) for p in sorted(ckpt.parent.glob(f"{ckpt.stem}.eval-*.json"))}


def eval_cli(ckpt: Path, *overrides: str, multirun: bool = False):  # noqa: ANN201
    log_dir = ckpt.parents[2]
    where = (
        f"hydra.sweep.dir={log_dir / 'sweeps' / str(len(overrides))}"
        if multirun
        else f"hydra.run.dir={log_dir / 'eval'}"
    )
    return run_cli(
        "eval.py",
        *(["-m"] if multirun else []),
        f"ckpt_path={ckpt}",
        *overrides,
        "logger=none",
        f"paths.log_dir={log_dir}",
        where,
    )


# --------------------------------------------------------------------------- through the CLI
@pytest.mark.slow
def test_viewpoints_and_multi_crop_on_a_novel_azimuth_checkpoint(azimuth_run):
    ckpt, _ = azimuth_run
    proc = eval_cli(ckpt, "viewpoints=familiar,novel,all", "test_crops=1,5", multirun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = results(ckpt)
    for crops, suffix in ((1, ""), (5, "-crops5")):
        fam, nov, every = (files[f"last.eval-test-{v}{suffix}.json"] for v in ("familiar", "novel", "all"))
        assert (fam["num_examples"], nov["num_examples"], every["num_examples"]) == (FAMILIAR, NOVEL, N)
        assert fam["num_examples"] + nov["num_examples"] == every["num_examples"]  # the whole testing file
        for record, viewpoints in ((fam, "familiar"), (nov, "novel"), (every, "all")):
            assert (record["split"], record["viewpoints"], record["crops"]) == ("test", viewpoints, crops)
            assert record["dataset"]["settings"]["test_crops"] == crops
            assert record["dataset"]["settings"]["split"] == "azimuth"
        # accuracy over the whole file = the example-weighted mean of its two halves
        correct = fam["metrics"]["test/acc"] * FAMILIAR + nov["metrics"]["test/acc"] * NOVEL
        assert every["metrics"]["test/acc"] == pytest.approx(correct / N, abs=1e-6)
    record = files["last.eval-test-novel-crops5.json"]
    assert record["checkpoint"] == str(ckpt.resolve())
    assert record["dataset"]["class"] == "capsnets.data.smallnorb.SmallNORBDataModule"
    assert record["dataset"]["changed_from_checkpoint"] == {"test_crops": {"checkpoint": 1, "now": 5}}
    assert record["model"]["class"] == "capsnets.models.em_caps.EMCapsModule"
    assert record["capsnets_version"] and record["time"] and set(record["metrics"]) >= {"test/acc", "test/loss"}
    assert f"Results written to {ckpt.parent / 'last.eval-test-novel-crops5.json'}" in proc.stdout


@pytest.mark.slow
def test_val_and_train_splits_report_their_size_and_reproduce_training(azimuth_run):
    ckpt, train_stdout = azimuth_run
    proc = eval_cli(ckpt, "split=val,train", multirun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = results(ckpt)
    val, train = files["last.eval-val.json"], files["last.eval-train.json"]
    assert (val["split"], val["num_examples"], val["split_size"], val["viewpoints"]) == (
        "val",
        VAL_SIZE,
        VAL_SIZE,
        None,
    )
    assert (train["split"], train["num_examples"]) == ("train", FAMILIAR - VAL_SIZE)
    # logged as test/acc (sweepers read that key), but it is the validation accuracy train.py logged
    assert val["metrics"]["test/acc"] == pytest.approx(logged(train_stdout, "val/acc"), abs=1e-4)
    assert "split=val, crops=1, 6 examples" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, messages",
    [
        ("test_crops=5", ["test_crops=5: MNISTDataModule has no multi-crop testing", "Fix: drop test_crops="]),
        ("split=holdout", ["split must be one of test, val, train; got 'holdout'"]),
    ],
    ids=["crops_on_mnist", "bad_split"],
)
def test_cli_errors_before_reading_data(mnist_ckpt, override, messages):
    before = results(mnist_ckpt)
    proc = eval_cli(mnist_ckpt, override)
    assert proc.returncode != 0
    for message in messages:
        assert message in proc.stderr
    assert "Testing" not in proc.stdout + proc.stderr and results(mnist_ckpt) == before


# --------------------------------------------------------------------------- in-process
def compose_eval(tmp_path: Path, *overrides: str):  # noqa: ANN201
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(
            "eval", overrides=[*overrides, "logger=none", "trainer=cpu", f"paths.output_dir={tmp_path / 'out'}"]
        )


@pytest.mark.slow  # trains through train.py (the module fixture)
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["viewpoints=novel"], "viewpoints=novel: MNISTDataModule has no novel-viewpoint protocol"),
        (["viewpoints=sideways"], "viewpoints=sideways: MNISTDataModule has no novel-viewpoint protocol"),
        (["split=val", "viewpoints=familiar"], "viewpoints=familiar selects rows of the test split, but split=val"),
        (["+data_overrides.crop=3"], "MNISTDataModule has no setting crop. Valid settings: batch_size,"),
        (["data_overrides=4"], "data_overrides must be a mapping"),
        (["test_crops=0"], "test_crops must be an integer >= 1, got 0"),
        (
            ["data=synthetic", "data.num_classes=5"],
            "SyntheticDataModule gives 1x28x28 images, 5 classes; "
            "the checkpoint's network expects 1x28x28 images, 10 classes",
        ),
    ],
)
def test_config_errors_on_an_mnist_checkpoint(mnist_ckpt, tmp_path, overrides, message):
    before = results(mnist_ckpt)
    with pytest.raises(ConfigError, match=re.escape(message)):
        evaluate(compose_eval(tmp_path, f"ckpt_path={mnist_ckpt}", *overrides))
    assert results(mnist_ckpt) == before


@pytest.mark.slow  # trains through train.py (the module fixture)
def test_spawned_workers_are_refused_before_testing(mnist_ckpt, tmp_path):
    before = results(mnist_ckpt)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                f"ckpt_path={mnist_ckpt}",
                "logger=none",
                "trainer=ddp_sim",
                f"paths.output_dir={tmp_path / 'out'}",
            ],
        )
    with pytest.raises(ConfigError, match=re.escape("cannot run under a ddp_spawn strategy")):
        evaluate(cfg)
    assert results(mnist_ckpt) == before


@pytest.mark.slow  # trains through train.py (the module fixture)
@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["+data_overrides.split=standard", "viewpoints=familiar"],
            "with data.split=standard has no novel-viewpoint protocol",
        ),
        (["viewpoints=sideways"], "viewpoints must be one of novel, familiar, all; got 'sideways'"),
        (["test_crops=3", "+data_overrides.test_crops=5"], "test_crops=3 and data_overrides.test_crops=5 disagree"),
        (["test_crops=26"], "data.test_crops must be in 1..25 (distinct 20px crops of a 24px image)"),
    ],
)
def test_config_errors_on_a_smallnorb_checkpoint(azimuth_run, tmp_path, overrides, message):
    ckpt, _ = azimuth_run
    before = results(ckpt)
    with pytest.raises(ConfigError, match=re.escape(message)):
        evaluate(compose_eval(tmp_path, f"ckpt_path={ckpt}", *overrides))
    assert results(ckpt) == before


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path='/nonexistent/last.ckpt' is not a file"):
        evaluate(compose_eval(tmp_path, "ckpt_path=/nonexistent/last.ckpt"))
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        evaluate(compose_eval(tmp_path))


@pytest.mark.slow  # trains through train.py (the module fixture)
def test_same_setting_replaces_its_file_and_data_changes_get_their_own(mnist_ckpt, tmp_path):
    before = set(results(mnist_ckpt))
    first = evaluate(compose_eval(tmp_path, f"ckpt_path={mnist_ckpt}"))
    plain = mnist_ckpt.parent / "last.eval-test.json"
    stamp = plain.read_text()
    again = evaluate(compose_eval(tmp_path, f"ckpt_path={mnist_ckpt}", "+data_overrides.batch_size=7"))
    assert again["test/acc"] == pytest.approx(first["test/acc"])
    assert plain.read_text() != stamp  # the batch size does not change the setting: the file is replaced
    assert json.loads(plain.read_text())["dataset"]["settings"]["batch_size"] == 7
    evaluate(compose_eval(tmp_path, f"ckpt_path={mnist_ckpt}", "+data_overrides.val_size=8", "split=val"))
    names = sorted(set(results(mnist_ckpt)) - before - {plain.name})
    assert len(names) == 1 and re.fullmatch(r"last\.eval-val-data-[0-9a-f]{8}\.json", names[0]), names
    assert json.loads((mnist_ckpt.parent / names[0]).read_text())["num_examples"] == 8
    assert plain.is_file()  # the other setting's file is still there


# --------------------------------------------------------------------------- the DataModule side
def test_test_viewpoints_and_eval_split_select_the_rows(tmp_path):
    parts = write_fake_smallnorb(tmp_path)
    dm = SmallNORBDataModule(str(tmp_path), split="azimuth", val_size=VAL_SIZE, download=False, batch_size=64)
    degrees = {}
    for viewpoints in ("novel", "familiar", "all"):
        dm.set_test_viewpoints(viewpoints)
        dm.setup("test")
        degrees[viewpoints] = set((dm.info_test[:, 2] * 10).tolist())
        assert len(dm.test_dataloader().dataset) == {"novel": NOVEL, "familiar": FAMILIAR, "all": N}[viewpoints]
    assert degrees["familiar"] == set(AZIMUTH_TRAIN_DEGREES)
    assert degrees["novel"] == set(range(60, 281, 20)) and degrees["all"] == degrees["novel"] | degrees["familiar"]
    assert parts["testing"][2].shape[0] == N
    dm.set_eval_split("val")
    dm.setup("test")  # the val split needs the training file
    assert dm.test_dataloader().dataset is dm.data_val and len(dm.data_val) == VAL_SIZE
    with pytest.raises(ConfigError, match="split must be one of test, val, train"):
        dm.set_eval_split("dev")
    standard = SmallNORBDataModule(str(tmp_path), download=False)
    with pytest.raises(ConfigError, match="with data.split=standard has no novel-viewpoint protocol"):
        standard.set_test_viewpoints("novel")

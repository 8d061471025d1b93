"""Every registered routing passes the invariant suite (tests/routing_invariants.py) for each capsule kind it
supports, the moment it is registered; the registry refuses what does not fit; and a toy routing registered
here, without touching any other file, trains end to end and appears in the pictures and routing statistics."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from capsnets.errors import ConfigError
from capsnets.nn.routing import ROUTINGS, Routing, RoutingResult, build_routing, register_routing, routing_names
from capsnets.nn.routing.base import DEFAULT_IMPLS
from capsnets.nn.squash import squash
from capsnets.utils.resolvers import CONFIG_DIR

from routing_invariants import check_routing

REGISTERED = [
    (name, impl, kind)
    for name, impls in sorted(ROUTINGS.items())
    for impl, cls in sorted(impls.items())
    for kind in cls.kinds
]


@pytest.mark.parametrize("name,impl,kind", REGISTERED, ids=["-".join(x) for x in REGISTERED])
def test_registered_routing_satisfies_the_invariants(name, impl, kind):
    torch.manual_seed(0)
    check_routing(name, impl, kind)


def test_registry_lists_procedures_by_kind_and_refuses_with_the_options():
    assert routing_names("vector") == ["dynamic", "random", "self_attention", "uniform"]
    assert routing_names("matrix") == ["em", "random", "uniform", "vb"]
    assert routing_names("pose") == ["inverted_dot_product", "random", "uniform"]
    assert set(ROUTINGS["em"]) == {"reference", "fused"} and DEFAULT_IMPLS["em"] == "fused"
    with pytest.raises(ConfigError, match="unknown routing 'attention'. Options: dynamic, random, self_attention"):
        build_routing({"name": "attention"}, kind="vector", out_types=3)
    with pytest.raises(
        ConfigError, match="'dynamic' does not support matrix capsules.*Routings for matrix capsules: em, random"
    ):
        build_routing({"name": "dynamic"}, kind="matrix", out_types=3)
    with pytest.raises(
        ConfigError, match="lambda_value is not a setting of routing 'dynamic'.*detach_inner, iterations"
    ):
        build_routing({"name": "dynamic", "lambda_value": 0.1}, kind="vector", out_types=3)


@pytest.mark.parametrize("normalisation", ["covering", "type", "patch"])
@pytest.mark.parametrize(
    "name,impl", [("em", "reference"), ("em", "fused"), ("uniform", "reference"), ("random", "reference")]
)
def test_matrix_routings_satisfy_the_invariants_under_every_normalisation(name, impl, normalisation):
    torch.manual_seed(0)
    check_routing(name, impl, "matrix", normalisation=normalisation)


# --- a toy routing, registered here only ---------------------------------------------------------


class UniformToy(Routing):
    """Uniform assignments, no iterations: parents are the (activation-weighted) mean of their votes."""

    def __init__(self, *, iterations: int = 1, **base) -> None:
        super().__init__(iterations=iterations, **base)
        self.beta = torch.nn.Parameter(torch.zeros(self.out_types))

    def route(self, votes, a_in, layout, trace) -> RoutingResult:
        R = layout.initial(votes.shape[:5], like=votes)  # (B, P, K, T_in, T_out), uniform over each child's parents
        weights = R * a_in[..., None] if a_in is not None else R
        mass = weights.sum(dim=(2, 3))  # (B, P, T_out)
        poses = torch.einsum("bpkio,bpkiod->bpod", weights, votes) / (mass[..., None] + 1e-8)
        if self.kind == "vector":
            poses = squash(poses)
            activations = poses.norm(dim=-1)
        else:  # agreement (small spread) -> high activation
            spread = torch.einsum("bpkio,bpkiod->bpod", weights, (votes - poses[:, :, None, None]) ** 2) / (
                mass[..., None] + 1e-8
            )
            activations = torch.sigmoid(self.beta - torch.log(spread.mean(dim=-1) + 1e-4))
        if trace is not None:
            trace.record(R.expand(votes.shape[:5]), activations)
        return RoutingResult(poses, activations, R.expand(votes.shape[:5]))


@pytest.fixture
def toy_routing():
    cls = register_routing("toy_uniform", kinds=("vector", "matrix"))(UniformToy)
    yield cls
    ROUTINGS.pop("toy_uniform")
    DEFAULT_IMPLS.pop("toy_uniform")


def test_a_toy_routing_passes_the_invariant_suite(toy_routing):
    for kind in ("vector", "matrix"):
        check_routing("toy_uniform", "reference", kind)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, small",
    [
        (
            "dr_caps",
            [
                "model.net.conv1_channels=16",
                "model.net.primary_types=4",
                "model.net.primary_dim=4",
                "model.net.class_dim=8",
                "model.net.decoder_hidden=[32,64]",
            ],
        ),
        ("em_caps_small", ["model.net.A=8", "model.net.B=4", "model.net.C=4", "model.net.D=4"]),
    ],
)
def test_a_toy_routing_trains_end_to_end_with_pictures_and_statistics(toy_routing, tmp_path, model, small):
    from capsnets.train import train

    overrides = [
        f"model={model}",
        *small,
        "data=synthetic",
        "data.num_train=64",
        "data.num_val=32",
        "data.num_test=32",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "logger=csv",
        f"paths.output_dir={tmp_path}",
        "~callbacks.rich_progress_bar",
        "~callbacks.model_summary",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.model.routing = OmegaConf.create({"name": "toy_uniform"})  # what model/routing=toy_uniform would compose
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and math.isfinite(metrics["train/loss_epoch"])
    layers = {"dr_caps": ["digit"], "em_caps_small": ["caps1", "caps2", "classes"]}[model]
    images = {str(p.relative_to(tmp_path / "images")) for p in (tmp_path / "images").rglob("*.png")}
    assert {"routing/epoch=000.png", "routing/test.png", "class_activations/test.png"} <= images
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    for layer in layers:  # the uniform toy's entropy is logged like any routing's
        assert f"val/routing/{layer}/entropy_iter1" in header

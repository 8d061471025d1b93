"""CNN baselines of the two papers: parameter counts and training step."""

import pytest
import torch

from capsnets.errors import ConfigError
from capsnets.models import CNNModule

OPT = {"name": "adam", "lr": 1e-3, "weight_decay": 0.0}
SCHED = {"name": "none"}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def make(architecture, **shape):
    shape = shape or dict(in_channels=1, image_size=28, num_classes=10)
    return CNNModule(net={"architecture": architecture, "dropout": 0.5, **shape}, optimizer=OPT, scheduler=SCHED)


def test_sabour2017_baseline_has_35_4m_parameters_on_mnist():
    # 5x5 convs 1->256->256->128 (same padding, no pooling), FC 28*28*128 -> 328 -> 192 -> 10
    expected = (
        (25 * 256 + 256)
        + (25 * 256 * 256 + 256)
        + (25 * 256 * 128 + 128)
        + (100_352 * 328 + 328)
        + (328 * 192 + 192)
        + (192 * 10 + 10)
    )
    assert n_params(make("sabour2017")) == expected == 35_445_522


def test_hinton2018_baseline_has_4_2m_parameters_on_smallnorb():
    # 5x5 convs 1->32->64 each with 2x2 max pooling (32 -> 16 -> 8), FC 8*8*64 -> 1024 -> 5
    expected = (25 * 32 + 32) + (25 * 32 * 64 + 64) + (4096 * 1024 + 1024) + (1024 * 5 + 5)
    assert n_params(make("hinton2018", in_channels=1, image_size=32, num_classes=5)) == expected == 4_252_549


@pytest.mark.parametrize("architecture", ["sabour2017", "hinton2018"])
def test_training_step_and_scores(architecture):
    torch.manual_seed(0)
    module = make(architecture)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    loss, scores, _ = module.shared_step((x, y), "train")
    loss.backward()
    assert torch.isfinite(loss) and scores.shape == (4, 10)
    assert torch.allclose(scores.sum(-1), torch.ones(4))


def test_bad_architecture_and_dropout_name_the_key():
    with pytest.raises(ConfigError, match="model.net.architecture"):
        make("vgg")
    with pytest.raises(ConfigError, match="model.net.dropout"):
        CNNModule(
            net={"architecture": "hinton2018", "dropout": 1.5, "in_channels": 1, "image_size": 32, "num_classes": 5},
            optimizer=OPT,
            scheduler=SCHED,
        )
    with pytest.raises(ConfigError, match="after pooling"):
        make("hinton2018", in_channels=1, image_size=3, num_classes=5)

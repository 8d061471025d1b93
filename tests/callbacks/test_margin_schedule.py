"""Spread-loss margin schedules (Hinton et al. 2018; authors' release), in samples seen."""

import math

import pytest

from capsnets.callbacks import SpreadMarginSchedule
from capsnets.errors import ConfigError
from capsnets.losses import linear_margin, sigmoid_margin


@pytest.mark.parametrize("samples, expected", [(0, 0.2), (250, 0.375), (500, 0.55), (1000, 0.9), (5000, 0.9)])
def test_linear_golden(samples, expected):
    assert linear_margin(samples, start=0.2, end=0.9, ramp_samples=1000) == pytest.approx(expected)


@pytest.mark.parametrize(
    "samples, expected",
    [
        (0, 0.2 + 0.79 / (1 + math.exp(4))),  # 0.21421
        (200_000 * 64, 0.2 + 0.79 * 0.5),  # step 200K: argument 0
        (10**15, 0.2 + 0.79 / (1 + math.exp(-10))),  # capped at 10: ~0.98996
    ],
)
def test_sigmoid_golden(samples, expected):
    assert sigmoid_margin(samples) == pytest.approx(expected, abs=1e-9)


def test_sigmoid_reaches_0_9_only_near_300k_steps_of_64():
    assert sigmoid_margin(250_000 * 64) < 0.9 < sigmoid_margin(320_000 * 64)


def test_callback_uses_schedule_and_constant():
    cb = SpreadMarginSchedule(schedule="linear", start=0.2, end=0.9, ramp_samples=100)
    assert cb.margin(50) == pytest.approx(0.55)
    assert SpreadMarginSchedule(schedule="constant", end=0.7).margin(10**9) == 0.7
    assert SpreadMarginSchedule(schedule="sigmoid").margin(0) == pytest.approx(0.2142091, abs=1e-6)


def test_state_dict_round_trip_keeps_planned_ramp():
    cb = SpreadMarginSchedule(schedule="linear", ramp_samples=None)
    cb.ramp_samples = 12345.0
    restored = SpreadMarginSchedule(schedule="linear")
    restored.load_state_dict(cb.state_dict())
    assert restored.ramp_samples == 12345.0 and restored.margin(12345) == pytest.approx(0.9)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"schedule": "cosine"}, "schedule"), ({"start": 1.5}, "start"), ({"ramp_samples": 0}, "ramp_samples")],
)
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"model.loss.margin_schedule.{key}"):
        SpreadMarginSchedule(**kwargs)


def test_unbounded_run_without_ramp_samples_fails_with_fix():
    from types import SimpleNamespace

    cb = SpreadMarginSchedule(schedule="linear", ramp_samples=None)
    trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))
    module = SimpleNamespace(effective_batch_size=lambda: 64)
    with pytest.raises(ConfigError, match="model.loss.margin_schedule.ramp_samples"):
        cb.on_fit_start(trainer, module)
    bounded = SpreadMarginSchedule(schedule="linear", ramp_samples=None)
    bounded.on_fit_start(SimpleNamespace(estimated_stepping_batches=10), module)
    assert bounded.ramp_samples == 640

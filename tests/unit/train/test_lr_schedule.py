"""The learning-rate factor `lr_lambda` gives the optimizer at each step: a linear warm-up, then
the scheduler's decay, ending where each scheduler says."""

import math

import pytest

from jobs.train.engines.base import lr_lambda
from jobs.train.spec import load_training_spec

MINIMAL = {"name": "run", "model": {"uri": "m", "dtype": "fp32"}, "datasets": [{"uri": "d"}],
           "checkpoint": {"storage": "ckpt"}}


def factors(scheduler: str, warmup_ratio: float, total: int) -> list[float]:
    spec = load_training_spec(MINIMAL | {"optim": {"scheduler": scheduler, "warmup_ratio": warmup_ratio}})
    factor = lr_lambda(spec, total)
    return [factor(step) for step in range(total)]


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_warm_up_rises_linearly_to_the_peak(scheduler):
    f = factors(scheduler, 0.1, 100)  # 10 warm-up steps
    assert f[:10] == pytest.approx([(s + 1) / 11 for s in range(10)])
    assert f[10] == pytest.approx(1.0)  # the peak, right after warm-up


def test_cosine_decays_to_zero_through_half_at_the_middle():
    f = factors("cosine", 0.0, 100)
    assert f[0] == pytest.approx(1.0)
    assert f[50] == pytest.approx(0.5)
    assert f[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a >= b for a, b in zip(f, f[1:], strict=False))  # never rises again


def test_linear_decays_by_equal_steps():
    f = factors("linear", 0.0, 10)
    assert f == pytest.approx([1 - s / 10 for s in range(10)])


def test_constant_holds_the_peak_after_warm_up():
    f = factors("constant", 0.2, 10)
    assert f[2:] == [1.0] * 8


def test_a_run_shorter_than_its_warm_up_still_reaches_a_positive_rate():
    assert all(0 < x <= 1 for x in factors("cosine", 0.5, 1))


def test_warmup_steps_override_the_ratio():
    spec = load_training_spec(MINIMAL | {"optim": {"warmup_ratio": 0.5, "warmup_steps": 3}})
    factor = lr_lambda(spec, 100)
    assert [round(factor(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]

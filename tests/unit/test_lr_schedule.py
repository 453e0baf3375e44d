"""The trapezoidal learning-rate factor."""

import pytest

from model.lr_schedule import trapezoid_factor

pytestmark = pytest.mark.unit


def test_trapezoid_shape():
    factors = [trapezoid_factor(s, num_steps=10, warmup_steps=2, decay_steps=4) for s in range(10)]
    assert factors == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]


def test_no_warmup_or_decay_is_constant():
    assert {trapezoid_factor(s, num_steps=5, warmup_steps=0, decay_steps=0) for s in range(5)} == {
        1.0
    }


def test_invalid_steps_are_refused():
    with pytest.raises(ValueError, match="exceed num_steps"):
        trapezoid_factor(0, num_steps=4, warmup_steps=3, decay_steps=2)
    with pytest.raises(ValueError, match="outside"):
        trapezoid_factor(4, num_steps=4, warmup_steps=1, decay_steps=1)

"""The request objects as plain data: the `atv` steering spec shared by the API, presets and the engine."""
import pytest

from atv_core.engine.request import Example, InvalidRequest, SteeringSpec


def test_steering_spec_defaults_to_the_generator():
    spec = SteeringSpec()
    assert spec.uses_generator and not spec.uses_named_vector


@pytest.mark.parametrize("kwargs, message, field", [
    (dict(mode="vector"), "needs a named vector", "atv.vector"),
    (dict(mode="off", examples=(Example("a", "b"),)), "need mode 'atv'", "atv.examples"),
    (dict(mode="steer"), "must be 'atv', 'vector' or 'off'", "atv.mode"),
    (dict(mode="atv", vector_weight=0.5), "none is given", "atv.vector_weight"),   # it would weigh nothing
])
def test_steering_spec_refuses_contradictions_with_a_fix(kwargs, message, field):
    with pytest.raises(InvalidRequest, match=message) as info:
        SteeringSpec(**kwargs)
    assert info.value.field == field   # the HTTP error's param


def test_named_vector_with_and_without_the_generator():
    assert SteeringSpec("vector", vector="sentiment").uses_named_vector
    both = SteeringSpec("atv", vector="sentiment", vector_weight=0.5)
    assert both.uses_generator and both.uses_named_vector
    assert not SteeringSpec("off", vector="sentiment").uses_named_vector

"""Tests for qsched.schedule.Schedule."""

import json
import math

import pytest

from qsched.errors import QSchedError
from qsched.schedule import KINDS, Schedule


def test_linear_runs_from_start_to_one():
    s = Schedule.linear(0.8, 1.2, 5)
    assert s.kind == "linear" and s.steps == 5
    assert s.model_coeff[0] == 0.8 and s.model_coeff[-1] == 1.0
    assert s.sample_coeff[0] == 1.2 and s.sample_coeff[-1] == 1.0
    diffs = [b - a for a, b in zip(s.model_coeff, s.model_coeff[1:])]
    assert all(math.isclose(d, 0.05) for d in diffs)
    assert s.params == {"model_start": 0.8, "sample_start": 1.2}


def test_linear_single_step_is_start():
    s = Schedule.linear(0.9, 1.1, 1)
    assert s.model_coeff == (0.9,) and s.sample_coeff == (1.1,)


def test_ramp_and_per_step_and_identity():
    r = Schedule.ramp(0.5, 1.5, 2.0, 1.0, 3)
    assert r.model_coeff == (0.5, 1.0, 1.5) and r.sample_coeff == (2.0, 1.5, 1.0)
    p = Schedule.per_step(model_coeff=[1.1, 0.9], sample_coeff=[1.0, 1.2])
    assert p.kind == "per-step" and p.model_coeff == (1.1, 0.9) and p.sample_coeff == (1.0, 1.2)
    assert p.params == {"model_0": 1.1, "model_1": 0.9, "sample_0": 1.0, "sample_1": 1.2}
    i = Schedule.identity(4)
    assert i.model_coeff == (1.0,) * 4 and i.sample_coeff == (1.0,) * 4 and i.is_identity
    assert Schedule.linear(1.0, 1.0, 4).is_identity and not r.is_identity


@pytest.mark.parametrize(
    "build",
    [
        lambda: Schedule.per_step([1.0, 1.0], [1.0]),  # unequal lengths
        lambda: Schedule.per_step([], []),  # T = 0
        lambda: Schedule.linear(0.9, 1.0, 0),
        lambda: Schedule.linear(0.9, 1.0, 2.5),
        lambda: Schedule.linear(float("nan"), 1.0, 3),
        lambda: Schedule.linear(1.0, float("inf"), 3),
        lambda: Schedule.linear(0.0, 1.0, 3),
        lambda: Schedule.ramp(1.0, -0.5, 1.0, 1.0, 3),
        lambda: Schedule.per_step([1e30, 1.0], [1.0, 1.0]),  # diverges to an all-NaN image: refused (> 10)
        lambda: Schedule.linear(1.0, 10.5, 3),
        lambda: Schedule.per_step([1.0, "x"], [1.0, 1.0]),
        lambda: Schedule(model_coeff=(1.0, 2.0), sample_coeff=(1.0, 1.0), kind="identity"),
        lambda: Schedule(model_coeff=(0.5, 2.0), sample_coeff=(1.0, 1.0), kind="linear",
                         params={"model_start": 0.5, "sample_start": 1.0}),
        lambda: Schedule.from_params("bogus", {}, 2),
    ],
)
def test_invalid_schedules_raise_value_error(build):
    with pytest.raises(QSchedError):
        build()


def test_roundtrip_through_json():
    for s in (Schedule.linear(0.83, 1.17, 4), Schedule.ramp(0.9, 1.1, 1.2, 0.95, 8),
              Schedule.per_step([1.1, 0.9, 1.3], [0.8, 1.0, 1.05]), Schedule.identity(2)):
        d = json.loads(json.dumps(s.to_dict()))
        assert d["kind"] == s.kind and d["model_coeff"] == list(s.model_coeff)
        back = Schedule.from_dict(d)
        assert back == s and back.model_coeff == s.model_coeff and back.sample_coeff == s.sample_coeff


def test_from_dict_checks_consistency_and_kind():
    d = Schedule.linear(0.8, 1.2, 4).to_dict()
    d["model_coeff"][1] = 0.5
    with pytest.raises(ValueError, match="Inconsistent"):
        Schedule.from_dict(d)
    with pytest.raises(ValueError, match="kind"):
        Schedule.from_dict({"kind": "cosine", "steps": 2, "params": {}})
    with pytest.raises(ValueError):
        Schedule.from_dict({"steps": 2})


@pytest.mark.parametrize("kind,steps,n", [("linear", 4, 2), ("ramp", 4, 4), ("per-step", 3, 6), ("identity", 5, 0)])
def test_param_names_and_from_params_are_generic(kind, steps, n):
    names = Schedule.param_names(kind, steps)
    assert len(names) == n and len(set(names)) == n
    values = {name: 1.0 + 0.01 * k for k, name in enumerate(names)}
    s = Schedule.from_params(kind, values, steps)
    assert s.kind == kind and s.steps == steps and s.params == values
    assert Schedule.from_dict(s.to_dict()) == s
    if names:
        with pytest.raises(ValueError, match="missing"):
            Schedule.from_params(kind, dict(list(values.items())[1:]), steps)
    with pytest.raises(ValueError, match="unexpected"):
        Schedule.from_params(kind, {**values, "extra": 1.0}, steps)


def test_per_step_param_names_order():
    assert Schedule.param_names("per-step", 2) == ["model_0", "model_1", "sample_0", "sample_1"]
    assert Schedule.param_names("linear", 7) == ["model_start", "sample_start"]
    assert set(KINDS) == {"linear", "ramp", "per-step", "identity"}


def test_schedule_is_frozen_and_hashable():
    s = Schedule.linear(0.9, 1.1, 3)
    with pytest.raises(AttributeError):
        s.kind = "ramp"  # type: ignore[misc]
    assert hash(s) == hash(Schedule.linear(0.9, 1.1, 3))
    assert s.coefficients(0) == (0.9, 1.1)
    with pytest.raises(ValueError):
        s.coefficients(3)

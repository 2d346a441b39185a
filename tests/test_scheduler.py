"""Tests for qsched.scheduler: exact pass-through, coefficient placement, signatures, config save/load."""

import copy
import inspect
import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
)

from qsched.schedule import Schedule
from qsched.scheduler import QSchedScheduler, apply_schedule

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

# (factory, step kwargs factory, supported step counts)
CASES = {
    "lcm": (lambda: LCMScheduler(**SD), lambda: {"generator": torch.Generator().manual_seed(7)}, (1, 2, 4, 8)),
    "tcd": (lambda: TCDScheduler(**SD, timestep_spacing="trailing"),
            lambda: {"eta": 0.3, "generator": torch.Generator().manual_seed(7)}, (1, 2, 4, 8)),
    "euler_a": (lambda: EulerAncestralDiscreteScheduler(**SD, timestep_spacing="trailing"),
                lambda: {"generator": torch.Generator().manual_seed(7)}, (1, 2, 4, 8)),
    "flow": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
             lambda: {"generator": torch.Generator().manual_seed(7)}, (1, 2, 4, 8)),
    "ddim": (lambda: DDIMScheduler(**SD, timestep_spacing="trailing"),
             lambda: {"eta": 0.5, "generator": torch.Generator().manual_seed(7)}, (1, 2, 4, 8)),
    "euler": (lambda: EulerDiscreteScheduler(**SD, timestep_spacing="trailing"),
              lambda: {"s_churn": 0.5, "generator": torch.Generator().manual_seed(7)}, (1, 2, 4, 8)),
    "dpm": (lambda: DPMSolverMultistepScheduler(**SD, algorithm_type="sde-dpmsolver++"),
            lambda: {"generator": torch.Generator().manual_seed(7)}, (1, 2, 4, 8)),
}


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a denoiser."""
    return 0.6 * x + 0.3 * torch.sin(1.7 * x + float(t) / 250.0)


def denoise(scheduler, steps: int, step_kwargs: dict, **set_kwargs) -> torch.Tensor:
    scheduler.set_timesteps(steps, **set_kwargs)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        xin = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = fake_model(xin, t)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("name", list(CASES))
def test_identity_schedule_is_bit_identical(name):
    make, kwargs, step_counts = CASES[name]
    wrapped = QSchedScheduler.from_scheduler(make(), None)
    for steps in step_counts:
        ref = denoise(make(), steps, kwargs())
        wrapped.set_schedule(Schedule.identity(steps))
        got = denoise(wrapped, steps, kwargs())
        assert torch.equal(ref, got), f"{name} with {steps} steps"
        assert torch.isfinite(ref).all()
        # the same through the paper's parametrisation with a = b = 1
        wrapped.set_schedule(Schedule.linear(1.0, 1.0, steps))
        assert torch.equal(ref, denoise(wrapped, steps, kwargs()))


@pytest.mark.parametrize("name", list(CASES))
def test_non_identity_schedule_changes_the_result(name):
    make, kwargs, step_counts = CASES[name]
    steps = step_counts[-2]
    ref = denoise(make(), steps, kwargs())
    got = denoise(QSchedScheduler.from_scheduler(make(), Schedule.linear(0.9, 1.05, steps)), steps, kwargs())
    assert torch.isfinite(got).all() and not torch.allclose(ref, got)


def test_flow_match_euler_update_matches_the_paper_formula():
    base = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched = Schedule.per_step([0.8, 1.3, 0.95, 1.1], [1.2, 0.9, 1.05, 1.0])
    wrapped = QSchedScheduler.from_scheduler(base, sched)
    wrapped.set_timesteps(4)
    sigmas = base.sigmas.clone()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for i, t in enumerate(wrapped.timesteps):
        v = fake_model(x, t)
        expected = sched.sample_coeff[i] * x + (sigmas[i + 1] - sigmas[i]) * sched.model_coeff[i] * v
        x = wrapped.step(v, t, x).prev_sample
        torch.testing.assert_close(x, expected.to(x.dtype), rtol=1e-6, atol=1e-6)
        assert wrapped.step_index == i + 1


def test_euler_ancestral_update_matches_the_paper_formula():
    # x_prev = c^x x + c^e eps (sigma_down - sigma) + sigma_up z  (z from the same generator)
    make = lambda: EulerAncestralDiscreteScheduler(**SD, timestep_spacing="trailing")  # noqa: E731
    sched = Schedule.linear(0.85, 1.1, 2)
    wrapped, plain = QSchedScheduler.from_scheduler(make(), sched), make()
    wrapped.set_timesteps(2)
    plain.set_timesteps(2)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    eps = fake_model(x, wrapped.timesteps[0])
    got = wrapped.step(eps, wrapped.timesteps[0], x, generator=torch.Generator().manual_seed(5)).prev_sample
    ref = plain.step(0.85 * eps, plain.timesteps[0], 1.1 * x, generator=torch.Generator().manual_seed(5)).prev_sample
    assert torch.equal(got, ref)


def test_ddim_counts_its_own_steps_and_resets():
    make = lambda: DDIMScheduler(**SD)  # noqa: E731
    assert not hasattr(make(), "step_index")
    sched = Schedule.per_step([0.7, 1.0, 1.2], [1.0, 1.1, 0.9])
    wrapped = QSchedScheduler.from_scheduler(make(), sched)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for _ in range(2):  # a second call must start again at step 0
        plain = make()
        plain.set_timesteps(3)
        wrapped.set_timesteps(3)
        a = b = x
        for i, t in enumerate(plain.timesteps):
            e = fake_model(a, t)
            a = plain.step(sched.model_coeff[i] * e, t, sched.sample_coeff[i] * a).prev_sample
            b = wrapped.step(fake_model(b, t), t, b).prev_sample
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="only 3 steps"):
        wrapped.step(x, plain.timesteps[-1], x)


def test_step_index_follows_begin_index():
    base = FlowMatchEulerDiscreteScheduler()
    sched = Schedule.per_step([0.5, 0.6, 0.7, 0.8], [1.0, 1.0, 1.0, 1.0])
    wrapped = QSchedScheduler.from_scheduler(base, sched)
    wrapped.set_timesteps(4)
    wrapped.set_begin_index(2)  # img2img: start at the third step of the full schedule
    sigmas = base.sigmas
    x = torch.ones(1, 1, 2, 2)
    out = wrapped.step(torch.ones_like(x), wrapped.timesteps[2], x).prev_sample
    torch.testing.assert_close(out, x + (sigmas[3] - sigmas[2]) * 0.7 * torch.ones_like(x))


def test_signatures_mirror_the_base():
    def params(s, m):
        return inspect.signature(getattr(QSchedScheduler.from_scheduler(s), m)).parameters

    assert "eta" in params(DDIMScheduler(), "step") and "eta" in params(TCDScheduler(), "step")
    for s in (LCMScheduler(), TCDScheduler(), EulerAncestralDiscreteScheduler(), DPMSolverMultistepScheduler()):
        assert "generator" in params(s, "step")
    assert "generator" not in params(LCMScheduler(), "set_timesteps")
    assert {"sigmas", "timesteps", "mu"} <= set(params(FlowMatchEulerDiscreteScheduler(), "set_timesteps"))
    assert {"sigmas", "timesteps"} <= set(params(EulerDiscreteScheduler(), "set_timesteps"))
    assert "timesteps" in params(LCMScheduler(), "set_timesteps")
    assert list(params(DDIMScheduler(), "step"))[:3] == ["model_output", "timestep", "sample"]


def test_schedule_length_must_match_inference_steps():
    wrapped = QSchedScheduler.from_scheduler(FlowMatchEulerDiscreteScheduler(), Schedule.linear(0.9, 1.1, 4))
    wrapped.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4))
    assert len(wrapped.timesteps) == 4
    with pytest.raises(ValueError, match="4 steps.*3 inference steps"):
        wrapped.set_timesteps(3)
    with pytest.raises(ValueError, match="inference steps"):
        wrapped.set_timesteps(sigmas=np.linspace(1.0, 0.2, 5))
    lcm = QSchedScheduler.from_scheduler(LCMScheduler(), Schedule.identity(2))
    lcm.set_timesteps(timesteps=[999, 499])
    with pytest.raises(ValueError):
        lcm.set_timesteps(timesteps=[999, 666, 333])
    passthrough = QSchedScheduler.from_scheduler(LCMScheduler(), None)
    passthrough.set_timesteps(5)  # no schedule: any length


def test_attributes_are_delegated_both_ways():
    base = EulerDiscreteScheduler(**SD)
    w = QSchedScheduler.from_scheduler(base, Schedule.identity(4))
    w.set_timesteps(4)
    assert torch.equal(w.timesteps, base.timesteps) and torch.equal(w.sigmas, base.sigmas)
    assert w.init_noise_sigma == base.init_noise_sigma and w.order == base.order == 1
    assert w.step_index is None and len(w) == len(base) == 1000
    assert w.config.beta_schedule == "scaled_linear" and w.config["num_train_timesteps"] == 1000
    assert w.config["base_scheduler_class"] == "EulerDiscreteScheduler"
    assert w.config["schedule"] == Schedule.identity(4).to_dict()
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(w.scale_model_input(x, w.timesteps[0]), base.scale_model_input(x, base.timesteps[0]))
    noise = torch.randn_like(x)
    assert torch.equal(w.add_noise(x, noise, w.timesteps[:1]), base.add_noise(x, noise, base.timesteps[:1]))
    w.some_flag = 3  # writes go to the base (pipelines set e.g. scheduler.timesteps)
    assert base.some_flag == 3
    # pipelines rewrite scheduler._internal_dict; it must reach the base's config
    new = dict(w.config)
    new["steps_offset"] = 1
    w._internal_dict = new
    assert base.config.steps_offset == 1 and "schedule" not in base.config
    assert not hasattr(w, "no_such_attribute")
    w2 = copy.deepcopy(w)
    assert w2.base_scheduler is not base and w2.schedule == w.schedule


def test_apply_schedule_never_wraps_twice():
    class Pipe:
        scheduler = LCMScheduler()

    pipe = Pipe()
    base = pipe.scheduler
    assert apply_schedule(pipe, Schedule.identity(4)) is pipe
    apply_schedule(pipe, Schedule.linear(0.9, 1.0, 4))
    assert isinstance(pipe.scheduler, QSchedScheduler) and pipe.scheduler.base_scheduler is base
    assert pipe.scheduler.schedule == Schedule.linear(0.9, 1.0, 4)
    assert QSchedScheduler.from_scheduler(pipe.scheduler).base_scheduler is base


def test_rejects_multi_call_schedulers_and_bad_schedules():
    with pytest.raises(ValueError, match="order"):
        QSchedScheduler.from_scheduler(HeunDiscreteScheduler())
    with pytest.raises(TypeError):
        QSchedScheduler.from_scheduler(LCMScheduler(), {"kind": "linear"})


def test_save_and_load_keeps_full_base_config_and_schedule(tmp_path):
    base = DDIMScheduler(beta_schedule="linear", beta_end=0.031, clip_sample=False, timestep_spacing="trailing")
    sched = Schedule.ramp(0.8, 1.05, 1.1, 0.95, 4)
    QSchedScheduler.from_scheduler(base, sched).save_pretrained(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "QSchedScheduler"
    assert saved["base_scheduler_class"] == "DDIMScheduler"
    assert saved["base_config"]["beta_end"] == 0.031 and saved["base_config"]["beta_schedule"] == "linear"
    assert set(base.config) - {"_use_default_values"} <= set(saved["base_config"])
    assert Schedule.from_dict(saved["schedule"]) == sched
    for loaded in (QSchedScheduler.from_pretrained(tmp_path / "scheduler"),
                   QSchedScheduler.from_pretrained(tmp_path, subfolder="scheduler")):
        assert isinstance(loaded.base_scheduler, DDIMScheduler) and loaded.schedule == sched
        assert loaded.config.beta_end == 0.031 and loaded.config.beta_schedule == "linear"
        assert torch.equal(loaded.betas, base.betas)
        assert {k: v for k, v in loaded.base_scheduler.config.items() if k != "_use_default_values"} == {
            k: v for k, v in base.config.items() if k != "_use_default_values"}
    # no schedule survives as None; the flat runtime config rebuilds too
    QSchedScheduler.from_scheduler(LCMScheduler(), None).save_pretrained(tmp_path / "plain")
    assert QSchedScheduler.from_pretrained(tmp_path / "plain").schedule is None
    w = QSchedScheduler.from_config(QSchedScheduler.from_scheduler(base, sched).config)
    assert w.schedule == sched and w.config.beta_end == 0.031
    with pytest.raises(ValueError, match="base_scheduler_class"):
        QSchedScheduler.from_config({"base_scheduler_class": "NotAScheduler"})

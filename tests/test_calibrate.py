"""Tests for qsched.calibrate on tiny random pipelines with cheap stand-in scorers (no shipped weights)."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import optuna
import pytest
import torch

from qsched.calibrate import (
    CalibrationResult,
    calibrate,
    grid_candidates,
    search_space,
    weights_fingerprint,
)
from qsched.cache import ForwardCache
from qsched.quantization import quant_spec_of, quantize, quantized_layers
from qsched.runner import denoiser_of, generate
from qsched.schedule import Schedule, load_schedule, read_schedules, save_schedule
from qsched.scheduler import QSchedScheduler, apply_schedule
from qsched.scoring import JAQ
from qsched.testing import tiny_pipeline

from fakes import BrightTC, ContrastIQ, fake_jaq

PROMPTS = ["a bag", "a red coat", "a dress"]
KW = {"height": 32, "width": 32, "guidance_scale": 0.0}


def generate_images(pipe, prompts, seeds, steps, call_kwargs):
    """Seed-major images of every (seed, prompt) through the one runner, as calibrate draws them."""
    return torch.cat([generate(pipe, prompts, steps, seed=s, call_kwargs=call_kwargs) for s in seeds]), \
        list(prompts) * len(seeds)


@pytest.fixture(scope="module")
def qpipe():
    pipe = tiny_pipeline("pcm")
    summary = quantize(pipe, "w4a8")
    pipe._test_summary = summary
    return pipe


# ------------------------------------------------------------------ search space


def test_grid_is_exactly_the_papers_2500_candidates():
    cands = grid_candidates("linear", 4, (0.8, 1.2), 50)
    axis = np.linspace(0.8, 1.2, 50)
    expected = {(float(a), float(b)) for a, b in itertools.product(axis, axis)}
    got = {(c["model_start"], c["sample_start"]) for c in cands}
    assert len(cands) == 2500 and got == expected
    # the GridSampler that calibrate builds uses the same axes
    space = search_space("linear", 4, (0.8, 1.2), 50)
    assert set(space) == {"model_start", "sample_start"}
    assert all(np.array_equal(np.array(v), axis) for v in space.values())
    assert len(search_space("ramp", 4)) == 4 and len(search_space("per-step", 3)) == 6
    with pytest.raises(ValueError):
        search_space("cubic", 4)
    with pytest.raises(ValueError):
        search_space("linear", 4, (0.0, 1.2))
    with pytest.raises(ValueError):
        search_space("linear", 4, (1.2, 0.8))


def test_grid_strategy_evaluates_every_grid_point_plus_identity(qpipe):
    r = calibrate(qpipe, PROMPTS[:2], 2, jaq=fake_jaq(), parametrization="linear", strategy="grid", grid_points=3,
                  progress=False, call_kwargs=KW)
    params = [(t["params"]["model_start"], t["params"]["sample_start"]) for t in r.trials]
    expected = {(c["model_start"], c["sample_start"]) for c in grid_candidates("linear", 2, (0.8, 1.2), 3)}
    assert len(params) == 9 and set(params) == expected  # the grid's (1, 1) point is the identity trial: not twice
    assert r.trials[0]["role"] == "identity" and r.trials[0]["params"] == {"model_start": 1.0, "sample_start": 1.0}
    assert r.naive["jaq"] == r.trials[0]["jaq"]
    assert r.best["jaq"] == max(t["jaq"] for t in r.trials)
    assert r.strategy == "grid" and len(r.trials) == 9


def test_grid_resumes_without_repeating_points_and_its_order_is_seeded(qpipe, tmp_path):
    kw = dict(jaq=fake_jaq(), parametrization="linear", strategy="grid", grid_points=3, progress=False, call_kwargs=KW)
    part = calibrate(qpipe, PROMPTS[:2], 2, n_trials=4, out_dir=tmp_path / "a", **kw)
    assert len(part.trials) == 4 and part.trials[0]["role"] == "identity"
    full = calibrate(qpipe, PROMPTS[:2], 2, out_dir=tmp_path / "a", **kw)  # resumes the same study
    params = [tuple(t["params"].values()) for t in full.trials]
    assert len(full.trials) == 9 and len(set(params)) == 9
    assert [t["params"] for t in full.trials[:4]] == [t["params"] for t in part.trials]
    again = calibrate(qpipe, PROMPTS[:2], 2, n_trials=4, out_dir=tmp_path / "b", **kw)
    other = calibrate(qpipe, PROMPTS[:2], 2, n_trials=4, out_dir=tmp_path / "c", sampler_seed=1, **kw)
    assert [t["params"] for t in again.trials] == [t["params"] for t in part.trials]
    assert [t["params"] for t in other.trials] != [t["params"] for t in part.trials]


# ------------------------------------------------------------------ only the quantized model runs


def test_only_the_quantized_denoiser_runs_and_nothing_is_built(qpipe, monkeypatch):
    """Every module forward during calibration belongs to the pipeline passed in; every denoiser forward is the
    quantized one; every float Linear/Conv2d that runs inside it is one quantize() skipped on purpose; and no
    torch module (so no other pipeline or denoiser) is constructed, containers from slicing aside."""
    pipe = qpipe
    summary = pipe._test_summary
    assert quant_spec_of(pipe) == "w4a8"
    owned = {}
    for cname, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            for mname, m in comp.named_modules():
                owned[id(m)] = (cname, mname)
    ran: dict[int, torch.nn.Module] = {}
    built = []
    orig_init = torch.nn.Module.__init__

    def spy_init(self, *a, **kw):
        if not isinstance(self, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
            built.append(type(self).__name__)  # (slicing a ModuleList builds a container: harmless)
        orig_init(self, *a, **kw)

    def hook(module, args, output):
        ran[id(module)] = module

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    monkeypatch.setattr(torch.nn.Module, "__init__", spy_init)
    try:
        r = calibrate(pipe, PROMPTS, 2, jaq=fake_jaq(), parametrization="linear", n_trials=3, progress=False, call_kwargs=KW)
    finally:
        handle.remove()
        monkeypatch.undo()
    assert built == []
    foreign = [type(m).__name__ for i, m in ran.items() if i not in owned]
    assert foreign == []
    from diffusers import ModelMixin

    diffusers_models = {owned[i][0] for i, m in ran.items() if isinstance(m, ModelMixin)}
    assert diffusers_models == {"unet"}  # the unet and its sub-models (the VAE is used through .decode)
    denoisers = {i for i, m in ran.items() if isinstance(m, type(pipe.unet))}
    assert denoisers == {id(pipe.unet)} and quant_spec_of(pipe.unet) == "w4a8"
    qids = {id(m) for m in quantized_layers(pipe.unet).values()}
    assert qids and qids <= set(ran)  # quantized layers really run
    names = {id(m): n for n, m in pipe.unet.named_modules()}
    float_layers = [names[i] for i, m in ran.items()
                    if i in names and type(m) in (torch.nn.Linear, torch.nn.Conv2d)]
    assert all(n in summary.skipped for n in float_layers), float_layers
    assert r.quant_spec == "w4a8" and r.model_evals > 0


# ------------------------------------------------------------------ caching, determinism, same noise


def test_forward_cache_is_bit_identical_and_counts(qpipe):
    pipe = qpipe
    sched_a, sched_b = Schedule.linear(0.9, 1.1, 2), Schedule.linear(1.15, 0.85, 2)
    old = pipe.scheduler
    try:
        apply_schedule(pipe, sched_b)
        ref, _ = generate_images(pipe, PROMPTS, [0, 1], 2, call_kwargs=KW)
        cache = ForwardCache(max_entries=32)
        with cache.attach(pipe.unet):
            apply_schedule(pipe, sched_a)
            generate_images(pipe, PROMPTS, [0, 1], 2, call_kwargs=KW)
            e_first = cache.evals
            apply_schedule(pipe, sched_b)
            got, rep = generate_images(pipe, PROMPTS, [0, 1], 2, call_kwargs=KW)
        assert "forward" not in pipe.unet.__dict__  # detached again
    finally:
        pipe.scheduler = old
    assert torch.equal(got, ref)  # bit-identical to the uncached run
    assert rep == PROMPTS * 2 and got.shape[0] == 6
    assert e_first == 4  # 2 seeds x 2 steps
    assert cache.hits == 2 and cache.evals == 6  # the second schedule reuses both first steps


def test_forward_cache_protects_hit_entries():
    calls = []
    c = ForwardCache(max_entries=3)
    f = lambda x: (calls.append(1), x * 2)[1]  # noqa: E731
    a = torch.tensor([1.0])
    c.call(f, (a,), {})
    c.call(f, (a,), {})  # hit: protected
    for v in range(2, 8):
        c.call(f, (torch.tensor([float(v)]),), {})
    assert len(c) == 3
    c.call(f, (a,), {})
    assert c.hits == 2 and c.evals == 7
    # kwargs and dtype are part of the key
    c.call(f, (a.double(),), {})
    assert c.evals == 8


def test_calibrate_is_deterministic_and_cache_changes_nothing(qpipe):
    runs = [calibrate(qpipe, PROMPTS, 2, jaq=fake_jaq(), parametrization="linear", n_trials=4, seeds=(0, 3), progress=False,
                      call_kwargs=KW, cache=c) for c in (True, True, False)]
    vals = [[t["jaq"] for t in r.trials] for r in runs]
    assert vals[0] == vals[1] == vals[2]
    assert len(set(vals[0])) > 1  # candidates really differ
    cached, uncached = runs[0], runs[2]
    # 2 seeds -> 2 pipeline calls per trial, 2 steps each; trials after the first reuse the first step
    assert cached.model_evals == 4 + 3 * 2 and cached.cache_hits == 3 * 2
    assert uncached.model_evals == 4 * 4 and uncached.cache_hits == 0
    # the prompts are encoded once; every later call (other seed, other trial) reuses the embeddings
    assert cached.text_encoder_evals == 1 and cached.text_encoder_hits == 4 * 2 - 1
    assert [t["cache_hits"] for t in cached.trials] == [0, 2, 2, 2]
    assert cached.n_images == 6 and cached.seeds == [0, 3]


def test_selects_argmax_jaq_not_tc(qpipe):
    # TC rewards brightness, IQ (weighted 1000) rewards contrast: they disagree on some trial
    r = calibrate(qpipe, PROMPTS[:2], 2, jaq=fake_jaq(k=1000.0), parametrization="linear", n_trials=6, progress=False, call_kwargs=KW)
    best = max(r.trials, key=lambda t: t["jaq"])
    assert r.best["trial"] == best["number"] and r.best["jaq"] == best["jaq"]
    if best["role"] != "identity":
        assert r.schedule == Schedule.from_params("linear", best["params"], 2)
    assert r.improvement == pytest.approx(r.best["jaq"] - r.naive["jaq"])
    assert r.improvement >= 0


@pytest.mark.parametrize("kind,n", [("ramp", 4), ("per-step", 4)])
def test_other_parametrizations(qpipe, kind, n):
    r = calibrate(qpipe, PROMPTS[:1], 2, jaq=fake_jaq(), parametrization=kind, n_trials=2, progress=False,
                  call_kwargs=KW)
    assert len(r.trials[1]["params"]) == n and r.parametrization == kind
    assert r.schedule.steps == 2


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
def test_auto_plan_gives_exactly_the_trials_asked(steps):
    from qsched.search import auto_plan

    for n in range(1, 80):
        plan = auto_plan(steps, n)
        assert sum(b for _, b in plan) == n, (steps, n, plan)
        assert plan[0][0] == "linear" and (len(plan) == 1 or min(b for _, b in plan) >= 5), (steps, n, plan)
    assert auto_plan(steps, 6) == [("linear", 6)]  # a small budget is not spread one point per parametrization
    assert [k for k, _ in auto_plan(steps, 60)] == (["linear"] if steps == 1 else ["linear", "per-step"] if steps == 2
                                                    else ["linear", "ramp", "per-step"])


def test_auto_with_fewer_trials_than_parametrizations(qpipe):
    r = calibrate(qpipe, PROMPTS[:1], 2, jaq=fake_jaq(), n_trials=3, progress=False, call_kwargs=KW)
    assert list(r.searches) == ["linear"] and sum(t["state"] == "COMPLETE" for t in r.trials) == 3


def test_seeds_are_checked_before_anything_is_written(qpipe, tmp_path):
    from qsched.errors import QSchedError

    for kw in ({"seeds": [-1]}, {"validation_seeds": [0, 2**62]}):
        with pytest.raises(QSchedError, match="out of range"):
            calibrate(qpipe, PROMPTS, 2, jaq=fake_jaq(), n_trials=2, progress=False, call_kwargs=KW,
                      out_dir=tmp_path / "o", **kw)
        assert not (tmp_path / "o").exists()


def test_model_identity_survives_quantized_copy():
    from qsched.calibrate import _model_name
    from qsched.quantization import quantized_copy

    pipe = tiny_pipeline("pcm")
    pipe.register_to_config(_name_or_path="testbed")  # as qsched.load_pipeline("testbed") names it
    q, _ = quantized_copy(pipe, "w4a8")
    assert _model_name(pipe) == _model_name(q) == "testbed"


def test_cmaes_sampler(qpipe):
    r = calibrate(qpipe, PROMPTS[:1], 2, jaq=fake_jaq(), parametrization="linear", sampler="cmaes", n_trials=3, progress=False,
                  call_kwargs=KW)
    assert len(r.trials) == 3 and r.sampler == "cmaes"


def test_bad_arguments(qpipe, tmp_path):
    for kw in ({"parametrization": "cubic"}, {"strategy": "random"}, {"sampler": "nsga"},
               {"grid_range": (0.0, 1.0)}, {"n_trials": 0}, {"seeds": ()}):
        with pytest.raises(ValueError):
            calibrate(qpipe, PROMPTS, 2, jaq=fake_jaq(), progress=False, call_kwargs=KW,
                      **{"parametrization": "linear", **kw})
    with pytest.raises(ValueError):
        calibrate(qpipe, [], 2, jaq=fake_jaq(), parametrization="linear", progress=False)
    with pytest.raises(ValueError):
        calibrate(qpipe, PROMPTS, 0, jaq=fake_jaq(), parametrization="linear", progress=False)


# ------------------------------------------------------------------ durable, resumable studies


class Killer(BrightTC):
    """Raises on the (n+1)-th scoring call: a run killed in the middle of a trial."""

    def __init__(self, n):
        self.n = n

    def __call__(self, images, prompts):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt("killed")
        return super().__call__(images, prompts)


def test_resume_keeps_completed_trials(qpipe, tmp_path):
    out = tmp_path / "run"
    args = dict(jaq=None, parametrization="linear", n_trials=6, progress=False, call_kwargs=KW, out_dir=out)
    with pytest.raises(KeyboardInterrupt):
        calibrate(qpipe, PROMPTS, 2, **{**args, "jaq": JAQ(Killer(3), ContrastIQ())})
    assert (out / "study.db").exists()
    study = optuna.load_study(study_name="qsched-w4a8-linear-optuna-2steps",
                              storage=f"sqlite:///{out / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3 and done[0].user_attrs["role"] == "identity"
    kept = {t.number: (t.params, t.value) for t in done}
    study.ask()  # a trial left RUNNING, as a SIGKILLed worker leaves it
    r = calibrate(qpipe, PROMPTS, 2, **{**args, "jaq": fake_jaq()})
    complete = [t for t in r.trials if t["state"] == "COMPLETE"]
    assert len(complete) == 6
    assert sum(t["role"] == "identity" for t in r.trials) == 1  # naive measured once, not re-enqueued
    for num, (params, value) in kept.items():
        rec = next(t for t in r.trials if t["number"] == num)
        assert rec["params"] == params and rec["jaq"] == value
    assert r.model_evals == 2 + 2 * 1  # this session: 3 new trials, 1st step of the first one not cached
    # a finished study is not extended by the same call; more trials extend it
    r2 = calibrate(qpipe, PROMPTS, 2, **{**args, "jaq": fake_jaq()})
    assert r2.model_evals == 0 and len(r2.trials) == len(r.trials)
    r3 = calibrate(qpipe, PROMPTS, 2, **{**args, "jaq": fake_jaq(), "n_trials": 7})
    assert len([t for t in r3.trials if t["state"] == "COMPLETE"]) == 7
    # other settings against the same study: refused
    with pytest.raises(ValueError, match="other settings"):
        calibrate(qpipe, PROMPTS[:2], 2, **{**args, "jaq": fake_jaq()})
    # the same settings on other weights (a retrained or differently quantized model): refused, not reused
    _, den = denoiser_of(qpipe)
    p0 = next(p for p in den.parameters() if p.is_floating_point())
    with torch.no_grad():
        p0.add_(1e-3)
    with pytest.raises(ValueError, match="denoiser_weights"):
        calibrate(qpipe, PROMPTS, 2, **{**args, "jaq": fake_jaq()})
    with torch.no_grad():
        p0.sub_(1e-3)


def test_weights_fingerprint_sees_values_shapes_and_dtypes():
    a = torch.nn.Linear(64, 64)
    b = torch.nn.Linear(64, 64)
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.weight[10, 7] += 1.0  # 4,096 values: all of them are sampled
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(a) != weights_fingerprint(copy.deepcopy(a).half())
    assert weights_fingerprint(a) != weights_fingerprint(torch.nn.Linear(64, 65))


def test_storage_url_shared_by_two_workers(qpipe, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a = calibrate(qpipe, PROMPTS[:1], 2, jaq=fake_jaq(), parametrization="linear", n_trials=2, storage=url,
                  study_name="s", progress=False, call_kwargs=KW)
    b = calibrate(qpipe, PROMPTS[:1], 2, jaq=fake_jaq(), parametrization="linear", n_trials=4, storage=url,
                  study_name="s", progress=False, call_kwargs=KW)
    assert len(a.trials) == 2 and len(b.trials) == 4 and b.trials[:2] == a.trials
    assert b.storage == url


# ------------------------------------------------------------------ saving, schedules.json


def test_save_load_and_scheduler_dir(qpipe, tmp_path):
    r = calibrate(qpipe, PROMPTS[:2], 2, jaq=fake_jaq(), parametrization="linear", n_trials=3, progress=False, call_kwargs=KW,
                  out_dir=tmp_path / "o", model_name="tiny-pcm")
    d = tmp_path / "o"
    data = json.loads((d / "calibration.json").read_text())
    assert data["model"] == "tiny-pcm" and data["quant_spec"] == "w4a8" and data["steps"] == 2
    assert data["best"]["jaq"] == r.best["jaq"] and "torch" in data["versions"]
    sch = QSchedScheduler.from_pretrained(str(d / "scheduler"))
    assert sch.schedule == r.schedule
    assert type(sch.base_scheduler).__name__ == "TCDScheduler"
    back = CalibrationResult.load(d)
    assert back.to_dict() == r.to_dict()
    # the pipeline's own scheduler was restored by calibrate
    assert not isinstance(qpipe.scheduler, QSchedScheduler) or qpipe.scheduler.schedule is None
    assert load_schedule(d, spec=quant_spec_of(qpipe)) == r.schedule


def test_schedules_json_holds_several_specs(qpipe, tmp_path):
    s8, s4 = Schedule.linear(0.95, 1.05, 2), Schedule.linear(0.9, 1.1, 2)
    p = save_schedule(tmp_path, "w8a8", s8, "m", 2)
    save_schedule(tmp_path, "w4a8", s4, "m", 2)
    save_schedule(tmp_path / "schedules.json", None, Schedule.identity(2), "m", 2)
    data = read_schedules(p)
    assert set(data["schedules"]) == {"w8a8", "w4a8", "none"} and data["model"] == "m"
    assert load_schedule(tmp_path, spec=quant_spec_of(qpipe)) == s4
    assert load_schedule(tmp_path, spec="w8a8") == s8
    with pytest.raises(ValueError, match="w8a8"):
        load_schedule(tmp_path, spec="w4a4")
    with pytest.raises(ValueError, match="steps"):
        load_schedule(tmp_path, spec="w4a8", steps=4)
    with pytest.raises(ValueError, match="model"):
        save_schedule(tmp_path, "w4a8", s4, "other-model", 2)
    with pytest.raises(FileNotFoundError):
        load_schedule(tmp_path / "nothing", spec="w4a8")

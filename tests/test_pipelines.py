"""Tests for qsched.pipelines and qsched.testing: tiny pipelines, Q-Sched on real pipeline classes, loading."""

import json
import sys
import types

import diffusers
import numpy as np
import pytest
import torch

import qsched.pipelines as P
from qsched.pipelines import MODELS, ModelNotFoundError, load_pipeline, resolve_model
from qsched.runner import denoiser_of
from qsched.schedule import Schedule
from qsched.scheduler import QSchedScheduler, apply_schedule
from qsched.testing import FAMILIES, tiny_call_kwargs, tiny_pipeline

PROMPT = "a photo of the red shirt"
_PIPES: dict = {}


def pipe_of(family):
    if family not in _PIPES:
        _PIPES[family] = tiny_pipeline(family)
    return _PIPES[family]


def generate(pipe, family, **overrides):
    kw = {**tiny_call_kwargs(family), **overrides}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_identity_and_schedule(family):
    pipe = pipe_of(family)
    if isinstance(pipe.scheduler, QSchedScheduler):  # restore the plain scheduler if an earlier test wrapped it
        pipe.scheduler = pipe.scheduler.base_scheduler
    assert not any(m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    plain = generate(pipe, family)
    assert plain.shape == (1, 32, 32, 3) and np.isfinite(plain).all() and plain.std() > 0
    assert np.array_equal(plain, generate(pipe, family))  # deterministic for a fixed generator
    steps = tiny_call_kwargs(family)["num_inference_steps"]
    apply_schedule(pipe, Schedule.identity(steps))
    assert isinstance(pipe.scheduler, QSchedScheduler)
    assert np.array_equal(plain, generate(pipe, family))  # bit-identical through the real pipeline
    apply_schedule(pipe, Schedule.linear(0.85, 1.1, steps))
    tuned = generate(pipe, family)
    assert np.isfinite(tuned).all() and np.abs(tuned - plain).max() > 1e-3
    with pytest.raises(ValueError, match="inference steps"):
        generate(pipe, family, num_inference_steps=steps + 1)
    pipe.scheduler = pipe.scheduler.base_scheduler


def test_pipelines_still_pass_eta_and_generator():
    # StableDiffusionPipeline passes `eta` to TCD only if the step signature shows it; SDXL passes `generator`.
    pipe = pipe_of("pcm")
    base = pipe.scheduler
    ref = generate(pipe, "pcm", eta=0.6)
    assert not np.array_equal(ref, generate(pipe, "pcm", eta=0.0))
    apply_schedule(pipe, Schedule.identity(4))
    assert np.array_equal(ref, generate(pipe, "pcm", eta=0.6))
    pipe.scheduler = base
    xl = pipe_of("sdxl-turbo")
    base = xl.scheduler
    ref = generate(xl, "sdxl-turbo")
    apply_schedule(xl, Schedule.identity(4))
    torch.manual_seed(123)  # the global RNG must not matter: the pipeline's generator reaches the scheduler
    assert np.array_equal(ref, generate(xl, "sdxl-turbo"))
    xl.scheduler = base


def test_saved_pipeline_reloads_with_its_schedule(tmp_path):
    pipe = pipe_of("lcm")
    base = pipe.scheduler
    sched = Schedule.linear(0.9, 1.05, 4)
    apply_schedule(pipe, sched)
    tuned = generate(pipe, "lcm")
    pipe.save_pretrained(tmp_path / "p")
    pipe.scheduler = base
    plain = generate(pipe, "lcm")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["scheduler"] == ["qsched.scheduler", "QSchedScheduler"]
    for loaded in (diffusers.LatentConsistencyModelPipeline.from_pretrained(tmp_path / "p"),
                   diffusers.DiffusionPipeline.from_pretrained(tmp_path / "p"), load_pipeline(tmp_path / "p")):
        assert isinstance(loaded.scheduler, QSchedScheduler) and loaded.scheduler.schedule == sched
        assert type(loaded.scheduler.base_scheduler) is type(base)
        loaded.set_progress_bar_config(disable=True)
        out = generate(loaded, "lcm")
        # reloaded weights may sit at other memory alignments: float sums can differ in the last bits
        assert np.allclose(out, tuned, atol=1e-4) and np.abs(out - plain).max() > 1e-3


def test_load_pipeline_imports_the_scheduler_module_itself(monkeypatch, tmp_path):
    # As in a fresh process: diffusers resolves ["qsched.scheduler", "QSchedScheduler"] only from sys.modules.
    import qsched

    pipe = pipe_of("pcm")
    base = pipe.scheduler
    apply_schedule(pipe, Schedule.ramp(0.9, 1.0, 1.1, 1.0, 4))
    pipe.save_pretrained(tmp_path / "p")
    pipe.scheduler = base
    monkeypatch.setattr(qsched, "scheduler", qsched.scheduler)  # restored (with sys.modules) after the test
    monkeypatch.delitem(sys.modules, "qsched.scheduler")
    with pytest.raises(ValueError, match="qsched.scheduler"):
        diffusers.DiffusionPipeline.from_pretrained(tmp_path / "p")
    loaded = load_pipeline(str(tmp_path / "p"))
    assert "qsched.scheduler" in sys.modules and type(loaded).__name__ == "StableDiffusionPipeline"
    assert type(loaded.scheduler).__name__ == "QSchedScheduler" and loaded.scheduler.schedule.kind == "ramp"


def test_model_table():
    assert set(MODELS) >= {"lcm-sd15", "pcm-sd15-2step", "pcm-sd15-4step", "pcm-sd15-8step", "sdxl-turbo",
                           "flux-schnell", "testbed"}
    lcm = MODELS["lcm-sd15"]
    assert (lcm.hub_id, lcm.scheduler_class, lcm.steps, lcm.guidance, lcm.resolution) == (
        "SimianLuo/LCM_Dreamshaper_v7", "LCMScheduler", 4, 8.0, 512)
    for steps in (2, 4, 8):
        pcm = MODELS[f"pcm-sd15-{steps}step"]
        assert pcm.steps == steps and pcm.guidance == 0.0 and pcm.scheduler_class == "TCDScheduler"
        assert pcm.lora_repo == "wangfuyun/PCM_Weights" and pcm.lora_subfolder == "sd15"
        assert pcm.lora_weight_name == f"pcm_sd15_smallcfg_{steps}step_converted.safetensors"
        assert pcm.scheduler_kwargs["timestep_spacing"] == "trailing"
    flux = MODELS["flux-schnell"]
    assert flux.denoiser == "transformer" and flux.torch_dtype == torch.bfloat16 and flux.resolution == 1024
    for spec in MODELS.values():  # every class named in the table exists in diffusers
        if spec.hub_id:
            assert hasattr(diffusers, spec.pipeline_class) and hasattr(diffusers, spec.scheduler_class)
    assert resolve_model("sdxl-turbo").call_defaults() == {"guidance_scale": 0.0, "height": 512, "width": 512}
    assert resolve_model("flux-schnell").call_defaults()["max_sequence_length"] == 256
    assert resolve_model("testbed").call_defaults() == {}


def test_model_spec_resolved_once_for_aliases_paths_and_hub_ids(tmp_path):
    assert resolve_model("lcm-sd15").call_defaults() == {"guidance_scale": 8.0, "height": 512, "width": 512}
    local = resolve_model("./my-local-model")
    assert local.call_defaults() == {} and local.steps == 4 and not local.is_testbed
    assert resolve_model("pcm-sd15-2step").steps == 2
    assert [resolve_model(m).jaq_preset for m in ("testbed", "lcm-sd15", "sdxl-turbo", "flux-schnell",
                                                   "./my-sd-model", "org/my-flux-finetune")] == \
        ["testbed", "sd15", "sdxl", "sdxl", "sd15", "sdxl"]
    # a saved testbed pipeline folder is the testbed, whatever its name
    (tmp_path / "model_index.json").write_text('{"_class_name": "TestbedPipeline"}')
    saved = resolve_model(tmp_path)
    assert saved.is_testbed and saved.jaq_preset == "testbed" and saved.alias == str(tmp_path)


def test_denoiser_of():
    assert denoiser_of(pipe_of("lcm"))[0] == "unet" and denoiser_of(pipe_of("flux"))[0] == "transformer"
    assert denoiser_of(pipe_of("flux"))[1] is pipe_of("flux").transformer
    with pytest.raises(ValueError):
        denoiser_of(types.SimpleNamespace(vae=torch.nn.Linear(1, 1)))


def test_offline_missing_models_give_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(ModelNotFoundError, match="SimianLuo/LCM_Dreamshaper_v7.*local directory"):
        load_pipeline("lcm-sd15")
    with pytest.raises(ModelNotFoundError, match="someorg/somemodel"):
        load_pipeline("someorg/somemodel")
    with pytest.raises(ValueError, match="lcm-sd15.*testbed"):
        load_pipeline("no-such-model")
    with pytest.raises(FileNotFoundError):
        load_pipeline(str(tmp_path / "missing" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path / "empty")


def test_hub_alias_path_sets_scheduler_dtype_and_lora(monkeypatch):
    calls = {}
    tiny = tiny_pipeline("pcm")
    tiny.scheduler = diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             steps_offset=1, skip_prk_steps=True)

    def fake_from_pretrained(repo, **kw):
        calls["repo"], calls["kw"] = repo, kw
        return tiny

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(diffusers.utils, "is_peft_available", lambda: True)
    for method in ("load_lora_weights", "fuse_lora", "unload_lora_weights"):
        monkeypatch.setattr(tiny, method, lambda *a, _m=method, **k: calls.setdefault(_m, (a, k)), raising=False)
    pipe = load_pipeline("pcm-sd15-2step")
    assert pipe is tiny and calls["repo"] == MODELS["pcm-sd15-2step"].hub_id
    assert calls["kw"]["torch_dtype"] == torch.float32 and calls["kw"]["safety_checker"] is None  # CPU: float32
    assert isinstance(pipe.scheduler, diffusers.TCDScheduler)
    assert pipe.scheduler.config.timestep_spacing == "trailing" and pipe.scheduler.config.beta_end == 0.012
    assert calls["load_lora_weights"] == (("wangfuyun/PCM_Weights",), {
        "weight_name": "pcm_sd15_smallcfg_2step_converted.safetensors", "subfolder": "sd15"})
    assert "fuse_lora" in calls and "unload_lora_weights" in calls
    load_pipeline("pcm-sd15-4step", dtype="float16")
    assert calls["kw"]["torch_dtype"] == torch.float16
    monkeypatch.setattr(diffusers.utils, "is_peft_available", lambda: False)
    with pytest.raises(ImportError, match="peft"):
        load_pipeline("pcm-sd15-8step")


def test_testbed_alias_and_quantized_directories_delegate(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(P, "_import_loader", lambda path: lambda **kw: seen.update(path=path, kw=kw) or "tb")
    assert load_pipeline("testbed", variant="teacher") == "tb"
    assert seen == {"path": "qsched.testbed.pipeline:load_testbed_pipeline",
                    "kw": {"device": "cpu", "variant": "teacher"}}
    import qsched.checkpoint as C

    monkeypatch.setattr(C, "load_quantized", lambda directory, **kw: ("quantized", directory, kw))
    (tmp_path / C.MANIFEST_FILE).write_text("{}")
    assert load_pipeline(tmp_path) == ("quantized", str(tmp_path), {"device": "cpu"})


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_quantize_schedule_generate(family):
    """quantize + Q-Sched schedule + generate on a fresh tiny pipeline of every family."""
    from qsched.quantization import quant_spec_of, quantize

    pipe = tiny_pipeline(family)
    plain = generate(pipe, family)
    summary = quantize(pipe, "w4a8")
    assert quant_spec_of(pipe) == "w4a8" and summary.bytes_after < summary.bytes_before
    steps = tiny_call_kwargs(family)["num_inference_steps"]
    apply_schedule(pipe, Schedule.linear(0.9, 1.05, steps))
    out = generate(pipe, family)
    assert out.shape == plain.shape and np.isfinite(out).all() and not np.array_equal(out, plain)

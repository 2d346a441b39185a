"""qsched as a diffusers quantization backend: save_pretrained / from_pretrained, quantization_config at load time,
PipelineQuantizationConfig, dtypes, LoRA refusals, and loading in a fresh process after a plain ``import qsched``."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

import qsched
from qsched.checkpoint import CheckpointError
from qsched.hf_quantizer import QSchedConfig, QSchedQuantizer, check_reloadable
from qsched.quantization import quant_spec_of, quantize, quantized_layers
from qsched.testing import FAMILIES, tiny_call_kwargs, tiny_pipeline

from fakes import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kw(family: str) -> dict:
    return {**tiny_call_kwargs(family), "num_inference_steps": 2}


def _images(pipe, family: str) -> np.ndarray:
    return pipe("a red cat", generator=torch.Generator().manual_seed(0), **_kw(family)).images


def _unet_inputs(unet, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    sample = torch.randn(2, c.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 4, c.cross_attention_dim, generator=g)
    return sample, torch.tensor([10, 700]), text


def _run_unet(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


_subprocess = run_python


def test_registered_in_diffusers_mappings():
    from diffusers.quantizers import auto

    assert auto.AUTO_QUANTIZER_MAPPING["qsched"] is QSchedQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["qsched"] is QSchedConfig
    assert qsched.QSchedConfig is QSchedConfig


def test_config_roundtrip_and_errors():
    cfg = QSchedConfig("W4A8-g64", skip="down_blocks.*", modules=["a.b"])
    d = cfg.to_dict()
    assert d["quant_method"] == "qsched" and d["spec"] == "w4a8-g64" and d["skip"] == ["down_blocks.*"]
    again = QSchedConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again.to_dict() == d and again.quant_method.value == "qsched"
    with pytest.raises(CheckpointError, match="newer qsched"):
        QSchedConfig("w4a8", some_future_field=1)
    with pytest.raises(CheckpointError, match="format_version"):
        QSchedConfig("w4a8", format_version=99)
    with pytest.raises(ValueError, match="ill-formed"):
        QSchedConfig("int4")


def test_save_pretrained_writes_the_standard_layout(tmp_path):
    from diffusers import UNet2DConditionModel

    pipe = tiny_pipeline("pcm")
    summary = quantize(pipe, "w4a8")
    pipe.save_pretrained(tmp_path)
    unet_dir = tmp_path / "unet"
    assert sorted(os.listdir(unet_dir)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    qc = json.loads((unet_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qsched" and qc["spec"] == "w4a8" and qc["modules"] == summary.quantized
    for f in os.listdir(unet_dir):
        assert stat.S_IMODE(os.stat(unet_dir / f).st_mode) == 0o644, f
    from safetensors import safe_open

    with safe_open(str(unet_dir / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    first = summary.quantized[0]
    assert {f"{first}.qweight", f"{first}.weight_scale"} <= keys and f"{first}.weight" not in keys
    assert set(json.loads(meta["qsched_blake2b"])) == keys
    # the bare model reloads exactly, in eval mode, with packed layers and no "newly initialized" weights
    inputs = _unet_inputs(pipe.unet)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    assert quant_spec_of(loaded) == "w4a8" and not loaded.training
    assert set(quantized_layers(loaded)) == set(summary.quantized)
    assert torch.equal(_run_unet(loaded, inputs), _run_unet(pipe.unet, inputs))


def test_quantize_at_load_and_pipeline_quantization_config(tmp_path):
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig, UNet2DConditionModel

    pipe = tiny_pipeline("lcm")
    pipe.save_pretrained(tmp_path / "fp")
    cfg = QSchedConfig("w4a8")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "fp", subfolder="unet", quantization_config=cfg)
    assert cfg.modules is None  # the caller's recipe is not modified
    quantize(pipe, "w4a8")
    inputs = _unet_inputs(pipe.unet)
    assert set(quantized_layers(unet)) == set(quantized_layers(pipe.unet))
    assert torch.equal(_run_unet(unet, inputs), _run_unet(pipe.unet, inputs))

    loaded = DiffusionPipeline.from_pretrained(
        tmp_path / "fp", quantization_config=PipelineQuantizationConfig(quant_mapping={"unet": QSchedConfig("w4a8")}))
    loaded.set_progress_bar_config(disable=True)
    assert quant_spec_of(loaded) == "w4a8"
    assert np.array_equal(_images(loaded, "lcm"), _images(pipe, "lcm"))
    loaded.save_pretrained(tmp_path / "q")  # quantized at load, saved, reloaded: still the same model
    again = UNet2DConditionModel.from_pretrained(tmp_path / "q", subfolder="unet")
    assert torch.equal(_run_unet(again, inputs), _run_unet(pipe.unet, inputs))


def test_int8_scale_grid_spec_survives_save_pretrained_and_plain_from_pretrained(tmp_path):
    from diffusers import DiffusionPipeline

    from qsched.kernels import compile_quantized

    pipe = tiny_pipeline("lcm")
    quantize(pipe, "w4a8-g16-i8")
    pipe.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "unet" / "config.json").read_text())["quantization_config"]
    assert qc["spec"] == "w4a8-g16-i8"
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert quant_spec_of(loaded) == "w4a8-g16-i8"
    layers, ref = quantized_layers(loaded.unet), quantized_layers(pipe.unet)
    assert set(layers) == set(ref) and all(m.spec.int8_scales for m in layers.values())
    assert sum(m.weight_scale.shape[1] > 1 for m in layers.values()) > len(layers) // 2  # real group-wise grids
    assert all(torch.equal(layers[n].weight_scale, ref[n].weight_scale) and torch.equal(layers[n].qweight,
                                                                                       ref[n].qweight) for n in ref)
    assert np.array_equal(_images(loaded, "lcm"), _images(pipe, "lcm"))
    summary = compile_quantized(loaded, backend="int8")  # the reloaded scales are still on the int8 grid
    assert summary.compiled and not summary.inexact and not summary.grid_fallback


def test_torch_dtype_keeps_fp16_scales_and_casts_stay_allowed(tmp_path):
    from diffusers import UNet2DConditionModel

    pipe = tiny_pipeline("pcm")
    quantize(pipe, "w4a8-asym")
    pipe.unet.save_pretrained(tmp_path)
    bf = UNet2DConditionModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    layer = next(iter(quantized_layers(bf).values()))
    ref = quantized_layers(pipe.unet)[next(iter(quantized_layers(bf)))]
    assert layer.dtype == torch.bfloat16 and layer.weight_scale.dtype == torch.float16
    assert torch.equal(layer.weight_scale, ref.weight_scale) and torch.equal(layer.weight_zero, ref.weight_zero)
    f32 = bf.to(torch.float32)  # a qsched model may be cast (its float weights are re-derived from the codes)
    assert torch.equal(quantized_layers(f32)[next(iter(quantized_layers(bf)))].weight, ref.weight)


def test_save_refuses_what_cannot_reload_exactly(tmp_path):
    pipe = tiny_pipeline("pcm")
    quantize(pipe, "w4a8")
    cfg = pipe.unet.config.quantization_config
    state = pipe.unet.state_dict()
    with pytest.raises(CheckpointError, match="mixes float dtypes"):
        check_reloadable({**state, "conv_in.weight": state["conv_in.weight"].half()}, cfg)
    with pytest.raises(CheckpointError, match="do not match"):
        check_reloadable({k: v for k, v in state.items() if not k.startswith(cfg.modules[0] + ".")}, cfg)
    with pytest.raises(CheckpointError, match="LoRA"):
        check_reloadable({**state, "x.lora_A.default.weight": torch.zeros(2, 2)}, cfg)
    with pytest.raises(CheckpointError, match="safetensors only"):
        pipe.unet.save_pretrained(tmp_path / "bin", safe_serialization=False)


def test_dequantize_gives_float_layers():
    pipe = tiny_pipeline("pcm")
    quantize(pipe, "w8a16")
    inputs = _unet_inputs(pipe.unet)
    out = _run_unet(pipe.unet, inputs)
    pipe.unet.dequantize()
    assert not quantized_layers(pipe.unet) and quant_spec_of(pipe.unet) is None
    assert torch.allclose(_run_unet(pipe.unet, inputs), out, atol=1e-5)  # w8a16: weights only, same values


def test_lora_on_a_quantized_model_is_one_clear_error():
    pipe = tiny_pipeline("pcm")
    quantize(pipe, "w4a8")
    with pytest.raises(ValueError, match="LoRA cannot be loaded into a qsched-quantized model"):
        pipe.unet.load_lora_adapter({}, adapter_name="x")


def _add_lora(pipe):
    from peft import LoraConfig

    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))


def test_peft_lora_paths(tmp_path):
    pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    # a LoRA file, as PCM ships one
    src = tiny_pipeline("pcm")
    _add_lora(src)
    type(src).save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(src.unet))
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"

    # unfused adapters: quantize refuses (it would quantize lora_A/lora_B and drop the LoRA)
    unfused = tiny_pipeline("pcm")
    unfused.load_lora_weights(str(lora_file))
    with pytest.raises(ValueError, match="fuse_lora"):
        quantize(unfused, "w4a8")
    assert quant_spec_of(unfused) is None

    # PCM's path: load, fuse, unload, quantize; the LoRA is in the quantized weights and survives a reload
    fused = tiny_pipeline("pcm")
    base_out = _run_unet(fused.unet, _unet_inputs(fused.unet))
    fused.load_lora_weights(str(lora_file))
    fused.fuse_lora()
    fused.unload_lora_weights()
    fp_out = _run_unet(fused.unet, _unet_inputs(fused.unet))
    assert not torch.allclose(fp_out, base_out)  # the LoRA changed the model
    quantize(fused, "w8a16")
    q_out = _run_unet(fused.unet, _unet_inputs(fused.unet))
    assert (q_out - fp_out).abs().max() < (fp_out - base_out).abs().max() / 10
    fused.save_pretrained(tmp_path / "q")
    from diffusers import UNet2DConditionModel

    again = UNet2DConditionModel.from_pretrained(tmp_path / "q", subfolder="unet")
    assert torch.equal(_run_unet(again, _unet_inputs(again)), q_out)

    # and loading a LoRA into the quantized pipeline is one clear line
    with pytest.raises(ValueError, match="fuse_lora\\(\\) and unload_lora_weights\\(\\), then quantize"):
        fused.load_lora_weights(str(lora_file))


def test_fresh_process_plain_diffusers_loads_every_family(tmp_path):
    """`import qsched` + diffusers' own from_pretrained reload save_pretrained folders of all families exactly
    (images bit for bit where the other components' CPU kernels allow)."""
    from qsched.schedule import Schedule
    from qsched.scheduler import apply_schedule

    for family in (*FAMILIES, "testbed"):
        pipe = apply_schedule(tiny_pipeline(family), Schedule.linear(0.9, 1.05, 2))
        quantize(pipe, "w4a8")
        pipe.save_pretrained(tmp_path / family)
        np.save(tmp_path / f"{family}.npy", _images(pipe, family))
    code = f"""
        import sys
        import qsched
        assert "diffusers" not in sys.modules and "torch" not in sys.modules  # import qsched stays light
        import numpy as np, torch
        torch.set_num_threads(1)  # as conftest: the reference images were made single-threaded
        from diffusers import DiffusionPipeline
        from qsched.schedule import Schedule
        from qsched.testing import tiny_call_kwargs
        for family in {[*FAMILIES, "testbed"]!r}:
            folder = {str(tmp_path)!r} + "/" + family
            pipe = DiffusionPipeline.from_pretrained(folder)  # the testbed too: import qsched names TestbedPipeline
            pipe.set_progress_bar_config(disable=True)
            assert type(pipe.scheduler).__name__ == "QSchedScheduler"
            assert pipe.scheduler.schedule == Schedule.linear(0.9, 1.05, 2)  # the calibrated schedule came back
            assert qsched.quant_spec_of(pipe) == "w4a8"
            kw = {{**tiny_call_kwargs(family), "num_inference_steps": 2}}
            ref = np.load(folder + ".npy")
            plain = pipe("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
            from qsched.hf_quantizer import _realign
            for module in pipe.components.values():
                if isinstance(module, torch.nn.Module):
                    _realign(module)
            aligned = pipe("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
            print(family, float(np.abs(plain - ref).max()), float(np.abs(aligned - ref).max()))
        sched = qsched.QSchedScheduler.from_pretrained({str(tmp_path / "pcm")!r}, subfolder="scheduler")
        assert sched.schedule is not None and type(sched.base_scheduler).__name__ == "TCDScheduler"
    """
    out = _subprocess(code)
    diffs = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out.strip().splitlines()}
    assert set(diffs) == {*FAMILIES, "testbed"}
    for family, (plain, aligned) in diffs.items():
        # The quantized denoiser is rebuilt bit for bit (qsched realigns it); the other components (text encoders)
        # run on the file-aligned memory diffusers/transformers load them into, where CPU kernels round the last bit
        # differently (an unquantized pipeline shows it too). Realigned, every image is bit-identical.
        assert aligned == 0.0, (family, aligned)
        assert plain <= 1e-2, (family, plain)


def test_fresh_process_plain_diffusers_quantizes_a_testbed_folder_at_load(tmp_path):
    """An unquantized testbed folder, PipelineQuantizationConfig, plain diffusers imported before qsched: diffusers
    finds TestbedPipeline, quantizes its UNet while loading, and makes the in-process quantized pipeline's images."""
    pipe = tiny_pipeline("testbed")
    pipe.save_pretrained(tmp_path / "fp")
    quantize(pipe, "w4a8")
    np.save(tmp_path / "ref.npy", _images(pipe, "testbed"))
    code = f"""
        import numpy as np, torch
        torch.set_num_threads(1)
        import sys
        import diffusers  # before qsched this time
        import qsched
        from diffusers import DiffusionPipeline, PipelineQuantizationConfig
        assert "qsched.testbed.pipeline" not in sys.modules  # imported when diffusers first asks for the class
        from qsched.hf_quantizer import _realign
        from qsched.testing import tiny_call_kwargs
        config = PipelineQuantizationConfig(quant_mapping={{"unet": qsched.QSchedConfig("w4a8")}})
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "fp")!r}, quantization_config=config)
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe).__name__ == "TestbedPipeline" and qsched.quant_spec_of(pipe) == "w4a8"
        kw = {{**tiny_call_kwargs("testbed"), "num_inference_steps": 2}}
        ref = np.load({str(tmp_path / "ref.npy")!r})
        plain = pipe("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                _realign(module)
        aligned = pipe("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
        print(float(np.abs(plain - ref).max()), float(np.abs(aligned - ref).max()))
    """
    plain, aligned = (float(x) for x in _subprocess(code).split())
    assert aligned == 0.0 and plain <= 1e-2, (plain, aligned)  # as in the test above


def test_register_refuses_a_diffusers_without_the_hooks(monkeypatch):
    from diffusers.quantizers.base import DiffusersQuantizer

    from qsched.hf_quantizer import register

    monkeypatch.delattr(DiffusersQuantizer, "maybe_update_loaded_keys")
    with pytest.raises(ImportError, match="diffusers>=0.39"):
        register()

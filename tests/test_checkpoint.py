"""qsched.checkpoint: save_quantized / load_quantized in the diffusers layout, integrity checks, atomic writes,
file modes, and load_pipeline's refusal to import code a model_index.json names."""

from __future__ import annotations

import json
import os
import stat
import sys

import numpy as np
import pytest
import torch
from torch import nn

import qsched
from qsched.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, CheckpointError, load_quantized, save_quantized
from qsched.quantization import QuantSpec, quant_spec_of, quantize, quantized_layers
from qsched.testing import tiny_call_kwargs, tiny_pipeline

def _images(pipe, family: str) -> np.ndarray:
    kw = {**tiny_call_kwargs(family), "num_inference_steps": 2}
    return pipe("a red cat", generator=torch.Generator().manual_seed(0), **kw).images


def _inputs(unet):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, unet.config.in_channels, 8, 8, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 4, unet.config.cross_attention_dim, generator=g))


def _run(unet):
    with torch.no_grad():
        return unet(*_inputs(unet)).sample


def _modes(root) -> set[int]:
    return {stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.parametrize("spec", ["w4a8", "w3a8-g16-asym", "w8a8", "w4a8-i8"])
def test_module_save_load_exact(tmp_path, spec):
    unet = tiny_pipeline("pcm").unet
    quantize(unet, spec)
    out = _run(unet)
    save_quantized(unet, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", WEIGHTS_FILE, MANIFEST_FILE]
    manifest = json.loads((tmp_path / "m" / MANIFEST_FILE).read_text())
    assert manifest["spec"] == QuantSpec.parse(spec).name and manifest["denoiser"] is None
    assert set(manifest["files"]) == {"config.json", WEIGHTS_FILE} and "torch" in manifest["versions"]
    assert _modes(tmp_path / "m") == {0o644}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folder left behind
    for keep_packed in (False, True):
        loaded = load_quantized(tmp_path / "m", keep_packed=keep_packed)
        assert quant_spec_of(loaded) == QuantSpec.parse(spec).name and not loaded.training
        assert torch.equal(_run(loaded), out)
        assert all((m.weight_dq is None) == keep_packed for m in quantized_layers(loaded).values())


def test_packed_file_ratio_w4(tmp_path):
    from safetensors.torch import save_file

    from diffusers import UNet2DConditionModel

    # a small UNet whose Linear/Conv weights dominate, in fp16 so both files hold the leftovers in fp16
    unet = UNet2DConditionModel(
        block_out_channels=(32, 128), layers_per_block=1, cross_attention_dim=64, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=16, attention_head_dim=4).half()
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp_path / "fp16.safetensors"))
    quantize(unet, "w4a8")
    save_quantized(unet, tmp_path / "q")
    def data_bytes(path):  # tensor bytes: file size minus the 8-byte length and the JSON header (checksums)
        with open(path, "rb") as f:
            return os.path.getsize(path) - 8 - int.from_bytes(f.read(8), "little")

    fp16, packed = tmp_path / "fp16.safetensors", tmp_path / "q" / WEIGHTS_FILE
    assert data_bytes(packed) / data_bytes(fp16) <= 0.30  # packed int4 codes (two per byte) + fp16 scales
    assert os.path.getsize(packed) / os.path.getsize(fp16) <= 0.32  # the per-tensor checksums cost little


@pytest.mark.parametrize("family", ["lcm", "pcm", "sdxl-turbo", "flux", "testbed"])
def test_pipeline_save_load_exact(tmp_path, family):
    from qsched.schedule import Schedule
    from qsched.scheduler import apply_schedule

    pipe = apply_schedule(tiny_pipeline(family), Schedule.linear(0.9, 1.05, 2))
    summary = quantize(pipe, "w4a8")
    images = _images(pipe, family)
    def components():
        return {k: v for k, v in pipe.config.items() if not k.startswith("_")}

    config_before = components()
    save_quantized(pipe, tmp_path / "p")
    assert components() == config_before
    manifest = json.loads((tmp_path / "p" / MANIFEST_FILE).read_text())
    den = summary.denoiser
    assert manifest["denoiser"] == den and manifest["pipeline_class"] == type(pipe).__name__
    assert sorted(os.listdir(tmp_path / "p" / den)) == ["config.json", WEIGHTS_FILE]  # no float copy of it
    assert _modes(tmp_path / "p") == {0o644}
    for loader in (load_quantized, qsched.load_pipeline):
        loaded = loader(str(tmp_path / "p"))
        assert type(loaded) is type(pipe) and type(loaded.scheduler).__name__ == "QSchedScheduler"
        assert quant_spec_of(loaded) == "w4a8"
        assert np.array_equal(_images(loaded, family), images)


def test_overwrite_and_refusals(tmp_path):
    unet = tiny_pipeline("pcm").unet
    with pytest.raises(CheckpointError, match="quantize"):
        save_quantized(unet, tmp_path / "x")
    quantize(unet, "w4a8")
    save_quantized(unet, tmp_path / "q")
    save_quantized(unet, tmp_path / "q")  # a previous checkpoint is replaced
    assert torch.equal(_run(load_quantized(tmp_path / "q")), _run(unet))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a qsched checkpoint"):
        save_quantized(unet, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="not a directory"):
        save_quantized(unet, tmp_path / "other" / "notes.txt")
    assert not [p for p in os.listdir(tmp_path / "other") if p.startswith(".")]  # temporary folder removed
    plain = nn.Sequential(nn.Linear(64, 64))
    quantize(plain, "w4a8")
    with pytest.raises(CheckpointError, match="diffusers model"):
        save_quantized(plain, tmp_path / "y")
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "nothing-here")
    manifest = tmp_path / "q" / MANIFEST_FILE
    old = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**old, "format_version": 1}))
    with pytest.raises(CheckpointError, match="format version 1"):
        load_quantized(tmp_path / "q")
    manifest.write_text(json.dumps({**old, "format_version": 99}))
    with pytest.raises(CheckpointError, match="upgrade qsched"):
        load_quantized(tmp_path / "q")


def _corrupt(path, truncate: bool) -> None:
    data = bytearray(path.read_bytes())
    if truncate:
        data = data[: len(data) * 2 // 3]
    else:  # random bytes inside the tensor data (the end of the file; the JSON header is at the start)
        rng = np.random.default_rng(0)
        data[-200:-100] = rng.integers(0, 256, 100, dtype=np.uint8).tobytes()
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("truncate", [False, True])
def test_corrupted_or_truncated_files_fail_naming_the_file(tmp_path, truncate):
    from diffusers import UNet2DConditionModel

    pipe = tiny_pipeline("pcm")
    quantize(pipe, "w4a8")
    save_quantized(pipe, tmp_path / "p")
    weights = tmp_path / "p" / "unet" / WEIGHTS_FILE
    _corrupt(weights, truncate)
    for load in (lambda: load_quantized(tmp_path / "p"), lambda: qsched.load_pipeline(str(tmp_path / "p"))):
        with pytest.raises(CheckpointError) as e:
            load()
        assert str(weights) in str(e.value) and "\n" not in str(e.value)
    # diffusers' own loader: the per-tensor checksums in the file catch changed bytes (a truncated file is
    # refused by diffusers itself, with its own one-line OSError naming the file)
    with pytest.raises((CheckpointError, OSError)) as e:
        UNet2DConditionModel.from_pretrained(tmp_path / "p", subfolder="unet")
    assert str(weights) in str(e.value) and "\n" not in str(e.value).strip()
    assert truncate or isinstance(e.value, CheckpointError)
    # a corrupted vae (not quantized) is caught by the manifest's per-file digest
    pipe2 = tiny_pipeline("pcm")
    quantize(pipe2, "w4a8")
    save_quantized(pipe2, tmp_path / "p2")
    vae = tmp_path / "p2" / "vae" / WEIGHTS_FILE
    _corrupt(vae, truncate)
    with pytest.raises(CheckpointError, match="vae"):
        load_quantized(tmp_path / "p2")


def test_model_index_cannot_import_code(tmp_path, monkeypatch):
    """A model_index.json naming another module (even one called qsched-something) is refused, never imported."""
    pipe = tiny_pipeline("pcm")
    pipe.save_pretrained(tmp_path / "p")
    marker = tmp_path / "ran.txt"
    (tmp_path / "qsched_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    index_path = tmp_path / "p" / "model_index.json"
    index = json.loads(index_path.read_text())
    for library in ("qsched_evil", "qsched.evil", "qsched_evil.scheduler", "os"):
        index["scheduler"] = [library, "QSchedScheduler" if library.startswith("qsched") else "TCDScheduler"]
        index_path.write_text(json.dumps(index))
        with pytest.raises(ValueError, match="qsched loads only") as e:
            qsched.load_pipeline(str(tmp_path / "p"))
        assert library in str(e.value)
    assert "qsched_evil" not in sys.modules and not marker.exists()
    index["_class_name"] = "os.system"
    index["scheduler"] = ["diffusers", "TCDScheduler"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="Unknown pipeline class"):
        qsched.load_pipeline(str(tmp_path / "p"))

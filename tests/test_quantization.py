"""Tests for qsched.quantization: specs, fake-quant layers, in-place quantization (save/load: test_checkpoint.py)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qsched.quantization import (
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    dequantize_weight,
    fake_quant_per_token,
    quant_spec_of,
    quantize,
    quantize_weight,
    quantized_layers,
)

# ------------------------------------------------------------------------------------------ helpers


def tiny_unet(seed: int = 0, channels=(32, 64), cross_dim: int = 32, sample_size: int = 16, in_ch: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=1, cross_attention_dim=cross_dim, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=sample_size, attention_head_dim=4, in_channels=in_ch, out_channels=in_ch,
    ).eval()


def unet_inputs(seed: int = 1, in_ch: int = 4, size: int = 16, cross_dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, in_ch, size, size, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 5, cross_dim, generator=g))


def run_unet(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------- spec


@pytest.mark.parametrize("text, wb, ab, g, sym, name", [
    ("w4a8", 4, 8, 32, True, "w4a8"),
    ("W8A8", 8, 8, None, True, "w8a8"),
    ("w4a4", 4, 4, 32, True, "w4a4"),
    ("w4a16", 4, 16, 32, True, "w4a16"),
    ("w8a16", 8, 16, None, True, "w8a16"),
    ("w3a6", 3, 6, 32, True, "w3a6"),
    (" w4a8-g64 ", 4, 8, 64, True, "w4a8-g64"),
    ("w4a8-asym", 4, 8, 32, False, "w4a8-asym"),
    ("w4a16-g128-asym", 4, 16, 128, False, "w4a16-g128-asym"),
    ("w4a8-asym-g128", 4, 8, 128, False, "w4a8-g128-asym"),
    ("w4a8-pc", 4, 8, None, True, "w4a8-pc"),
    ("w8a8-g64", 8, 8, 64, True, "w8a8-g64"),
    ("w4a8-g32-sym", 4, 8, 32, True, "w4a8"),
])
def test_spec_parse(text, wb, ab, g, sym, name):
    s = QuantSpec.parse(text)
    assert (s.weight_bits, s.act_bits, s.group_size, s.symmetric) == (wb, ab, g, sym)
    assert s.name == name
    assert QuantSpec.parse(s.name) == s
    assert s.quantizes_activations == (ab < 16)


@pytest.mark.parametrize("text, name", [("w4a8-i8", "w4a8-i8"), ("W4A8-I8-g64", "w4a8-g64-i8"),
                                        ("w3a8-i8-sym", "w3a8-i8"), ("w4a16-g128-i8", "w4a16-g128-i8")])
def test_spec_int8_scale_grid_option(text, name):
    s = QuantSpec.parse(text)
    assert s.int8_scales and s.symmetric and s.group_size is not None and s.name == name
    assert QuantSpec.parse(s.name) == s and s.to_dict()["int8_scales"] is True
    assert not QuantSpec.parse("w4a8").int8_scales and QuantSpec.parse("w4a8").to_dict()["int8_scales"] is False


@pytest.mark.parametrize("bad, why", [("w4a8-asym-i8", "asymmetric"), ("w8a8-i8", "8-bit"), ("w5a8-g32-i8", "5-bit"),
                                      ("w4a8-pc-i8", "per-channel"), ("w4a8-i8-i8", "twice")])
def test_spec_int8_scale_grid_rejects_meaningless_combinations(bad, why):
    with pytest.raises(ValueError, match=why) as e:
        QuantSpec.parse(bad)
    assert "w4a8-i8" in str(e.value)  # the message lists valid examples
    with pytest.raises(ValueError, match="int8_scales must be a bool"):
        QuantSpec(4, 8, int8_scales=1)


def test_int8_scale_grid_is_not_a_torchao_format():
    with pytest.raises(ValueError, match=r"-i8\) is a backend='qsched' format"):
        quantize(nn.Sequential(nn.Linear(64, 64)), "w4a16-i8", backend="torchao")


@pytest.mark.parametrize("bad", ["", "w4", "a8w4", "w1a8", "w9a8", "w4a3", "w4a17", "w4a8-g0", "w4a8-foo",
                                 "w4a8-g32-g64", "w4a8-asym-sym", "int4", "w4a8g32"])
def test_spec_parse_rejects(bad):
    with pytest.raises(ValueError, match="w4a8"):  # the message lists valid examples
        QuantSpec.parse(bad)


def test_spec_constructor_defaults_and_validation():
    assert QuantSpec(4, 8).group_size == 32
    assert QuantSpec(8, 8).group_size is None
    assert QuantSpec(4, 8, group_size=None).name == "w4a8-pc"
    assert QuantSpec() == QuantSpec.parse("w4a8")
    with pytest.raises(ValueError):
        QuantSpec(4, 8, group_size=0)
    with pytest.raises(ValueError):
        QuantSpec(4, 8, act_granularity="per-tensor")
    with pytest.raises(ValueError):
        QuantSpec.parse(48)


# ------------------------------------------------------------------------------------ numeric kernels


@pytest.mark.parametrize("spec", ["w2a8", "w3a8", "w4a8", "w5a8", "w8a8", "w4a8-asym", "w3a8-g7-asym", "w8a8-g16"])
def test_weight_roundtrip_error_bounded(spec):
    s = QuantSpec.parse(spec)
    g_ = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g_) * torch.linspace(0.1, 3, 6)[:, None]  # 40 = not a multiple of 32: padding
    packed, scale, zero = quantize_weight(w, s)
    g = s.group_size or 40
    ng = -(-40 // g)
    assert scale.dtype == torch.float16 and scale.shape == (6, ng)
    assert (zero is None) == s.symmetric
    assert packed.dtype == torch.uint8
    assert packed.shape == (6, (ng * g + 1) // 2 if s.weight_bits <= 4 else ng * g)
    deq = dequantize_weight(packed, scale, zero, s, 40)
    assert deq.shape == w.shape
    # round-to-nearest: every value within half a step of its group's scale (plus fp16 slack). Asymmetric: the
    # integer zero point is itself rounded, so a group's extreme value may be clamped by up to one whole step.
    step = scale.float().repeat_interleave(g, dim=1)[:, :40]
    bound = 0.5 if s.symmetric else 1.0
    assert ((deq - w).abs() <= bound * step * (1 + 1e-3) + 1e-6).all()
    assert ((deq - w).abs() <= 0.5 * step * (1 + 1e-3) + 1e-6).float().mean() > 0.9
    # at most 2^bits distinct values per (row, group): the bit width is real
    for r in range(6):
        for j in range(ng):
            assert torch.unique(deq[r, j * g:(j + 1) * g]).numel() <= 2 ** s.weight_bits


@pytest.mark.parametrize("spec", ["w4a8-i8", "w4a8-g64-i8", "w3a8-i8", "w2a8-g16-i8"])
def test_int8_scale_grid_scales_are_row_scale_times_small_integers(spec):
    s = QuantSpec.parse(spec)
    qmax = 2 ** (s.weight_bits - 1) - 1
    g_ = torch.Generator().manual_seed(0)
    k = 200  # not a multiple of the group size: the last group is padded
    w = torch.randn(40, k, generator=g_) * torch.logspace(-9, 5, 40)[:, None]  # fp16 subnormal .. large scales
    w *= torch.logspace(-3, 0, k)[torch.randperm(k, generator=g_)]  # groups of very different ranges in a row
    w[0] = 0.0  # all-zero row
    w[1, :s.group_size] = 0.0  # all-zero group
    w[2, 7] = 1e7  # overflows the largest fp16 scale: clamped, codes saturate
    packed, scale, zero = quantize_weight(w, s)
    assert zero is None and scale.dtype == torch.float16 and torch.isfinite(scale.float()).all()
    sf = scale.float()
    base = sf.amax(1, keepdim=True) / 16
    m = sf / base
    assert torch.equal(m, m.round()) and m.min() >= 1 and m.max() == 16
    assert torch.equal(base * m, sf)  # exact: the int8 kernels rebuild these scales bit for bit
    assert (sf >= 2.0**-24).all() and sf[0].eq(2.0**-24).all()  # zero row: the smallest scale, as without -i8
    assert sf[1, 0] == base[1] and (base[1:] >= 2.0**-24).all()  # zero group: the row's base scale
    # each multiplier is floor or ceil of the ideal one, whichever gives the group the smaller squared error;
    # ceil never clips, so no group is worse than half a step of its ceil scale (bar the clamped overflow)
    ng, gs = scale.shape[1], s.group_size
    wg = F.pad(w, (0, ng * gs - k)).reshape(40, ng, gs)
    amax = wg.abs().amax(-1)
    ideal = amax / qmax / base
    hi, lo = ideal.ceil().clamp(1, 16), ideal.floor().clamp(1, 16)
    top = amax == amax.amax(1, keepdim=True)
    assert ((m == hi) | (m == lo) | top).all() and (m[top] == 16).all() and (m < hi).any()

    def sse(sc):
        return (torch.round(wg / sc[..., None]).clamp(-qmax, qmax) * sc[..., None] - wg).square().sum(-1)

    clamped = amax / qmax > 64512  # the largest fp16 with 6 significant bits
    assert clamped[2].any()
    deq = dequantize_weight(packed, scale, zero, s, k)
    err = F.pad(deq - w, (0, ng * gs - k)).reshape(40, ng, gs).square().sum(-1)
    assert torch.allclose(err, sse(sf), rtol=1e-5, atol=0)
    ceil_sse = sse(base * hi)
    assert (err[~top] <= ceil_sse[~top] * (1 + 1e-6)).all()
    assert (ceil_sse <= gs * (0.5 * base * hi) ** 2 * (1 + 1e-5))[~clamped].all()
    # rows whose scales are normal fp16 numbers: no more than a few times plain round-to-nearest's error
    plain = QuantSpec(s.weight_bits, 8, group_size=s.group_size)
    p_packed, p_scale, _ = quantize_weight(w, plain)
    rows = (p_scale.float() >= 2.0**-14).all(1) & (torch.arange(40) > 2)
    assert rows.sum() >= 10
    e_grid = (deq - w)[rows].norm(dim=1) / w[rows].norm(dim=1)
    e_plain = (dequantize_weight(p_packed, p_scale, None, plain, k) - w)[rows].norm(dim=1) / w[rows].norm(dim=1)
    assert (e_grid < 2 * e_plain).all()


def test_more_bits_smaller_error():
    w = torch.randn(16, 64)
    errs = [(dequantize_weight(*quantize_weight(w, QuantSpec(b, 8)), QuantSpec(b, 8), 64) - w).norm().item()
            for b in (2, 3, 4, 6, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 20


def test_asymmetric_beats_symmetric_on_shifted_weights():
    w = torch.rand(8, 64) + 0.5  # all positive: symmetric wastes half its levels
    err = {sym: (dequantize_weight(*quantize_weight(w, QuantSpec(4, 8, symmetric=sym)),
                                   QuantSpec(4, 8, symmetric=sym), 64) - w).norm().item() for sym in (True, False)}
    assert err[False] < 0.7 * err[True]


def test_zero_weight_group_is_safe():
    w = torch.zeros(2, 32)
    w[1, 3] = 1e-12  # below the smallest fp16 scale
    s = QuantSpec.parse("w4a8")
    deq = dequantize_weight(*quantize_weight(w, s), s, 32)
    assert torch.isfinite(deq).all() and deq.abs().max() < 1e-6


def test_fake_quant_per_token():
    x = torch.randn(3, 5, 16)
    x[0, 0] *= 1000  # one loud token must not change the others' scales
    q = fake_quant_per_token(x, 8)
    assert torch.equal(fake_quant_per_token(x[1:], 8), q[1:])
    # per-token max is representable exactly; error within half a step
    assert torch.allclose(q.abs().amax(-1), x.abs().amax(-1), rtol=1e-6)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((q - x).abs() <= step / 2 + 1e-6).all()
    assert torch.unique(torch.round(q[1, 1] / step[1, 1])).numel() <= 255
    assert fake_quant_per_token(x, 16) is x
    assert rel_err(fake_quant_per_token(x, 4), x) > rel_err(q, x)
    h = x.to(torch.bfloat16)
    assert fake_quant_per_token(h, 8).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- layers


def test_quant_linear_matches_reference():
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    spec = QuantSpec.parse("w4a8")
    q = QuantLinear.from_float(lin, spec)
    x = torch.randn(2, 7, 40)
    w = dequantize_weight(*quantize_weight(lin.weight, spec), spec, 40)
    assert torch.equal(q.weight, w)
    ref = F.linear(fake_quant_per_token(x, 8), w, lin.bias)
    assert torch.equal(q(x), ref)
    assert 1e-4 < rel_err(q(x), lin(x)) < 0.3
    assert q.qweight.numel() == 24 * 64 // 2  # 40 inputs -> 2 groups of 32 (padded), two codes per byte


def test_quant_conv_per_position_activations():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    q = QuantConv2d.from_float(conv, "w4a8")
    assert q.weight.shape == conv.weight.shape and q.weight_scale.shape == (16, 3)  # 8*9=72 -> 3 groups of 32
    x = torch.randn(1, 8, 6, 6)
    w = q.weight
    xq = fake_quant_per_token(x, 8, dim=1)
    assert torch.equal(q(x), F.conv2d(xq, w, conv.bias, padding=1))
    # a loud position changes only its own quantization, i.e. only outputs in its 3x3 neighbourhood
    x2 = x.clone()
    x2[0, :, 0, 0] *= 100
    diff = (q(x2) - q(x)).abs().sum(1)[0]
    assert diff[3:, 3:].max() == 0 and diff[0, 0] > 0
    # non-default padding modes follow nn.Conv2d
    conv_r = nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect")
    qr = QuantConv2d.from_float(conv_r, "w8a16")
    assert torch.equal(qr(x), F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), qr.weight, conv_r.bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).to(dtype)
    q = QuantLinear.from_float(lin, "w4a8")
    ref = QuantLinear.from_float(nn.Linear(64, 32), "w4a8")
    ref_w = dequantize_weight(*quantize_weight(lin.weight.float(), ref.spec), ref.spec, 64)
    assert q.weight.dtype == dtype and torch.equal(q.weight, ref_w.to(dtype))  # scales computed in float32
    x = torch.randn(3, 64, dtype=dtype)
    if dtype == torch.bfloat16:  # CPU fp16 matmul is not universally available; bf16 is
        assert q(x).dtype == dtype
    # .to() keeps the fp16 scales exact and rebuilds the cache from the codes
    scale = q.weight_scale.clone()
    q.to(torch.bfloat16).float()
    assert q.weight_scale.dtype == torch.float16 and torch.equal(q.weight_scale, scale)
    assert q.weight.dtype == torch.float32 and torch.equal(q.weight, ref_w)


def test_keep_packed_layer_same_output_no_cache():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = QuantLinear.from_float(lin, "w4a8")
    x = torch.randn(5, 64)
    y = q(x)
    q.set_keep_packed(True)
    assert q.weight_dq is None and all(b.dtype in (torch.uint8, torch.float16) for b in q.buffers())
    assert torch.equal(q(x), y)


# ------------------------------------------------------------------------------------ model surgery


def test_quantize_module_defaults_and_summary():
    unet = tiny_unet()
    n_lin_conv = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in unet.modules())
    assert quant_spec_of(unet) is None
    summary = quantize(unet, "w4a8")
    assert quant_spec_of(unet) == "w4a8"
    assert unet.qsched_quant_spec == "w4a8"
    for name in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"):
        assert name in summary.skipped and not isinstance(unet.get_submodule(name), (QuantLinear, QuantConv2d))
    assert len(summary.quantized) + len(summary.skipped) == n_lin_conv
    assert set(summary.quantized) == set(quantized_layers(unet))
    assert any(isinstance(unet.get_submodule(n), QuantConv2d) for n in summary.quantized)
    assert summary.bytes_after < 0.35 * summary.bytes_before
    text = str(summary)
    assert "w4a8" in text and "conv_in" in text and str(len(summary.quantized)) in text
    with pytest.raises(ValueError, match="already quantized"):
        quantize(unet, "w8a8")


def test_quantize_skip_patterns_conv_and_group_size():
    unet = tiny_unet()
    s = quantize(unet, "w4a8", skip=["*.attn2.*", "down_blocks.0.*"], include_conv=False)
    assert all(not isinstance(unet.get_submodule(n), QuantConv2d) for n in s.quantized)
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" in s.skipped
    assert not any(n.startswith("down_blocks.0.") for n in s.quantized)
    assert any("attn1" in n for n in s.quantized)
    assert s.skipped["down_blocks.1.resnets.0.conv1"] == "Conv2d layers excluded (include_conv=False)"
    # layers whose input is shorter than a group are kept (input length 32 < 64)
    unet2 = tiny_unet()
    s2 = quantize(unet2, "w4a8-g64")
    assert "group size" in s2.skipped["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    with pytest.raises(ValueError, match="backend"):
        quantize(tiny_unet(), "w4a8", backend="bitsandbytes")


def test_quantize_pipeline_object_uses_denoiser():
    class FakePipe:  # anything with a .unet / .transformer
        def __init__(self, m):
            self.transformer = m

    m = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    pipe = FakePipe(m)
    s = quantize(pipe, "w8a8")
    assert s.quantized == ["0", "2"] and quant_spec_of(pipe) == "w8a8"


def test_error_grows_with_lower_precision():
    unet = tiny_unet()
    inputs = unet_inputs()
    ref = run_unet(unet, inputs)
    errs = {}
    for spec in ("w8a8", "w4a8", "w4a4"):
        q = tiny_unet()
        quantize(q, spec)
        errs[spec] = rel_err(run_unet(q, inputs), ref)
    assert 0 < errs["w8a8"] < errs["w4a8"] < errs["w4a4"], errs


# (packed save/load: tests/test_checkpoint.py and tests/test_hf_quantizer.py)


# ------------------------------------------------------------------------------------ torchao backend


def test_torchao_backend_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import fails as if torchao were not installed
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    unet = tiny_unet()
    with pytest.raises(ImportError, match="torchao"):
        quantize(unet, "w8a8", backend="torchao")
    assert quant_spec_of(unet) is None and not quantized_layers(unet)
    with pytest.raises(ValueError, match="does not support w4a8"):
        quantize(unet, "w4a8", backend="torchao")
    with pytest.raises(ValueError, match="CUDA"):
        quantize(unet, "w4a16", backend="torchao")

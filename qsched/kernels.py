"""Real integer kernels for qsched-quantized denoisers: the same codes and scales, run as int8 GEMMs.

``quantize(pipe, "w8a8")`` gives *simulated* layers (:class:`~qsched.quantization.QuantLinear` /
:class:`~qsched.quantization.QuantConv2d`: integer codes dequantized to float, activations fake-quantized, float
GEMM). ``compile_quantized(pipe)`` swaps each of them, in place, for a real-kernel twin built from the very
same stored codes and fp16 scales, so a checkpoint written by ``save_quantized`` and a schedule calibrated on
the simulated model carry over unchanged (save *before* compiling; compiled models are not saved).

What runs (backend ``"int8"``, CPU; also CUDA through ``torch._int_mm`` with padding):

* **Activations** are quantized dynamically per token with exactly the formula of
  :func:`~qsched.quantization.fake_quant_per_token` (float32 ``scale = max|x| / qmax``, ``round(x / scale)``,
  clamp), giving the identical integer codes; they go to the GEMM as int8. This covers a2..a8 (a4 codes lie in
  [-7, 7] and run on the int8 kernel: exact, but no faster than a8). a9..a15 codes do not fit int8 and a16
  means float activations: those layers stay simulated (listed in the summary with the reason).
* **Linear**: an int8 x int8 GEMM with exact integer sums, then ``acc * act_scale * weight_scale + bias`` in
  float32. For large layers (>= ``ONEDNN_MIN_WEIGHT`` weights per GEMM) the GEMM is oneDNN's with the weight
  prepacked once at compile time (``gemm="auto"`` on CPUs where :func:`onednn_int8_exact` holds: unit scales,
  so its float32 output is the integer sum, as with ``_int_mm``; 1.3-3.6x faster than ``torch._int_mm`` on
  SD1.5 shapes on an AMX Xeon, ``scripts/gemm_probe.py``); smaller layers, and other devices, use
  ``torch._int_mm``. Convolutions call the layer's GEMM once per kernel offset.
* **Conv2d**: a per-token activation scale differs between the input positions that one output mixes, so it
  cannot be folded into a single int8 convolution (``torch.ops.quantized.conv2d`` takes one activation scale
  per tensor). The convolution is computed as a sum over the ``kh*kw`` kernel offsets of shifted int8 GEMMs
  (``(positions, C_in) x (C_in, C_out)``), each int32 result scaled by the activation scales of the positions it
  read: exact integer products, per-token scales honoured. The input is quantized once in its own NCHW layout
  and copied (int8) into a zero-padded NHWC image; for stride 1 that image is flattened so that every kernel
  offset's GEMM input and scales are contiguous row slices of it (outputs are computed on the padded grid and
  cropped), strided convolutions gather each offset's rows. The result is returned as the NCHW tensor it is, in
  channels_last memory (what ``unet.to(memory_format=torch.channels_last)`` gives, and what diffusers recommends
  for UNets on CPU): no copy back to NCHW-contiguous (SD1.5-sized UNet, AMX Xeon, 1 thread: 3.63 -> 3.19 s per
  W8A8 forward), and the next layer's per-token reduction runs over contiguous channels.
* **Weights**: one scale per output channel (``w8a8`` and any ``-pc`` spec) maps directly: the stored codes
  become int8 (minus their offset or zero point) with the fp16 scales: integer arithmetic identical to the
  simulated layer, only the float rounding of the final scaling differs (~1e-7 relative).
  **Group-wise** weights (``w4a8``: a scale per 32 inputs) do not map to one per-channel GEMM scale. Measured on
  SD1.5 shapes (1 thread): per-group partial GEMMs (K=32 chunks, accumulated in float) cost 2.0-4.7x a single
  int8 GEMM, and for 3x3 convolutions the groups (over the flattened ``C_in*3*3``) cut across the kernel
  offsets, leaving chunks of ~4 channels. So the dequantized weight (exact in float32) is instead written per
  output channel as a sum of ``planes`` int8 planes, ``w = s0*d0 + s1*d1 (+ ...)``, each plane the rounded
  residual of the ones before; the planes are stacked along the GEMM's N so one ``_int_mm`` computes all of
  them (cost ~2x one int8 GEMM for 2 planes, and 2 bytes per weight resident). With the default ``planes=2``
  the weight error is <= 1/(2*127*127) of the row's largest weight (the measured output error vs the simulated
  model is in the tests and the benchmark; target <= 1e-3). ``planes=1`` is the per-channel int8 rounding of
  the W4 weight (W8A8 speed and 1 byte per weight, but not faithful: ~1e-2 error).
  **Int8 scale grid** (spec option ``-i8``, e.g. ``w4a8-i8``): the quantizer puts every row's group scales on
  ``s_row * m_g`` with integer ``m_g`` in 1..16 (:func:`~qsched.qformat.quantize_weight`; still plain fp16
  scales on disk, same file). Then ``code * m_g`` (|.| <= 112) is one int8 weight per output channel with the
  float32 scale ``s_row``, exactly the dequantized weight: W8A8's single GEMM and 1 byte per weight, faithful
  like W8A8 (:func:`scale_grid_plane` checks it bit for bit; a layer whose scales are off the grid takes the
  plane path, and the summary says why). The grid costs accuracy: groups far below the row's largest get
  coarser scales (measured in ``python -m qsched.bench.scale_grid``).
  Asymmetric 8-bit codes minus zero point span [-255, 255] and take the plane path as well.
* The 4-bit checkpoint on disk is unchanged; the int8 planes are built once, at compile time.
* **Small layers** (``compile_quantized(..., small_layers="auto")``, opt-in): on layers of a few thousand weights
  the int8 path's own passes over the activations (quantize, int32 -> float, a rescale per kernel offset) cost
  more than the float op they replace (profiled in ``python -m qsched.bench.kernels_profile``). Such a layer also
  keeps the dequantized weight (once, in the layer's dtype) and runs calls below a size threshold as the
  simulated layer does (fake-quantized activations, float op): the simulated arithmetic itself, so faithful by
  construction, at the cost of that float weight's memory. The layer repr and ``KernelSummary.small`` say which
  layers do this and from how many tokens they switch to int8.

Faithfulness. Each real-kernel layer fed the same input as its simulated twin agrees to float rounding (measured
<= 4e-7 relative for per-channel and -i8 specs, <= 2.4e-5 for w4a8 with two planes; tests/test_kernels.py).
Whole forwards agree less: per-token activation rounding is discontinuous, so a 1e-7 difference that moves one
value across a rounding boundary changes a code, and the change spreads through later layers. The simulated model shows the
same spread against *itself* (1 thread vs 2 threads, or a 1e-7 input perturbation: ~8e-3 relative on the testbed,
~3e-2 on the SD1.5-sized UNet; ``python -m qsched.bench.kernels --faithfulness``), so a per-forward bound of 1e-3
against it is below its own noise floor. The real-kernel model is as close to full precision as the simulated one
and, on the integer path, does not depend on the thread count.

Backend ``"torchao"`` (CUDA, torchao installed): Linear layers become ``nn.Linear`` with the dequantized weight
passed to torchao's ``Int8DynamicActivationInt8WeightConfig`` (w8a8), ``Int8WeightOnlyConfig`` (w8a16) or
``Int4WeightOnlyConfig`` (w4a16, symmetric, groups 32..256, tinygemm packing). torchao re-derives its own scales
from those weights and quantizes activations its own way, so it is close to, not identical with, the simulated model.
Conv2d layers and other specs stay simulated there. ``"auto"`` picks torchao on CUDA when it is importable,
else ``"int8"``.
"""

from __future__ import annotations

import functools
import importlib
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qsched.quantization import (
    BACKEND_ATTR,
    QuantConv2d,
    QuantLinear,
    _groups,
    _QuantBase,
    _set_submodule,
    _unpack,
    fake_quant_per_token,
    quantized_layers,
)
from qsched.runner import denoiser_of

__all__ = ["BACKENDS", "GEMMS", "why_int8_is_slow", "onednn_int8_exact", "Int8Linear", "Int8Conv2d",
           "KernelSummary", "compile_quantized", "quantize_activations", "weight_planes", "scale_grid_plane",
           "kernel_layers", "small_layer_tokens"]

BACKENDS = ("auto", "int8", "torchao")
GEMMS = ("auto", "onednn", "int_mm")
# oneDNN's prepacked int8 GEMM beats torch._int_mm from about this size (per GEMM: N x K weights, depth K),
# measured on an AMX Xeon (torch 2.13, 1 thread): 1.2-2.6x at 320x320 and up for 1,000+ rows; 2-5x slower for
# 64-row calls and small layers (a fixed ~0.03 ms per call), and a reference kernel at depth 16 (1000x slower).
ONEDNN_MIN_WEIGHT = 65536
ONEDNN_MIN_K = 64
SMALL_LAYERS = ("int8", "auto")
KERNELS_ATTR = "qsched_kernels"
_MAX_PLANES = 4
# small_layers="auto" (measured on the testbed's layers, AVX-512 CPU, 1 thread, torch 2.13: see
# benchmarks/kernels_testbed_profile.md). A layer with at most SMALL_WEIGHT weights runs the simulated computation
# for calls with fewer GEMM rows (tokens, output positions) than: SMALL_TOKENS if its GEMM depth (Linear
# in_features, Conv2d in_channels) is at least SMALL_K, else SHALLOW_TOKENS; int8 from there on. Below those sizes
# the int8 path's own passes (quantize, int32 -> float, per-offset rescale) cost more than the float op it replaces.
SMALL_WEIGHT = 65536
SMALL_K = {"Linear": 64, "Conv2d": 96}
SMALL_TOKENS = 64
SHALLOW_TOKENS = 32768


class KernelError(ValueError):
    """A model or argument that compile_quantized cannot handle."""


# ------------------------------------------------------------------------------------------ numerics


def quantize_activations(x32: torch.Tensor, bits: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int codes (int8) and float32 scales over dim ``dim`` of float32 ``x32``.

    The same arithmetic as :func:`qsched.quantization.fake_quant_per_token`, so ``codes * scale`` equals its
    output bit for bit. ``bits`` must be 2..8. The codes keep ``x32``'s layout (a conv input is reduced over its
    channel dim in place, which is faster than over a permuted view's last dim for few channels).
    """
    if not 2 <= bits <= 8:
        raise KernelError(f"int8 activation codes need 2..8 bits, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    scale = x32.abs().amax(dim=dim, keepdim=True).div_(qmax)
    scale = torch.where(scale > 0, scale, 1.0)
    codes = torch.div(x32, scale).round_().clamp_(-qmax, qmax).to(torch.int8)
    return codes, scale


def weight_planes(layer: _QuantBase, planes: int = 2) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per-output-channel int8 representation of a qsched layer's weight.

    Returns ``(codes, scales, exact)``: int8 ``(P, out, k)``, float32 ``(P, out)`` with
    ``weight ~= sum_p scales[p, :, None] * codes[p]`` (``k`` = flattened input length), and whether the sum
    equals the dequantized weight exactly. One group per row with codes that fit int8 gives the stored codes
    themselves (exact, P=1); so do ``-i8`` specs (group scales on the int8 grid: :func:`scale_grid_plane`);
    otherwise up to ``planes`` residual planes (stopping early once exact).
    """
    if not 1 <= planes <= _MAX_PLANES:
        raise KernelError(f"planes must be 1..{_MAX_PLANES}, got {planes!r}")
    spec, k = layer.spec, layer._k
    out, ng = layer.weight_scale.shape
    if ng == 1:
        g, _ = _groups(k, spec.group_size)
        codes = _unpack(layer.qweight, spec.weight_bits, g)[:, :k].to(torch.int16)
        offset = layer.weight_zero.to(torch.int16) if layer.weight_zero is not None else 2 ** (spec.weight_bits - 1)
        d = codes - offset
        if d.numel() == 0 or int(d.abs().max()) <= 127:
            return d.to(torch.int8).unsqueeze(0), layer.weight_scale.float().reshape(1, out), True
    elif spec.int8_scales:
        grid = scale_grid_plane(layer)
        if not isinstance(grid, str):
            return grid[0].unsqueeze(0), grid[1].reshape(1, out), True
    w = layer.dequantize(torch.float32).reshape(out, k).double()  # the simulated layer's weight, exactly
    codes_l, scales_l = [], []
    resid = w
    for _ in range(planes):
        s = (resid.abs().amax(dim=1) / 127).float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        d = torch.round(resid / s.double().unsqueeze(1)).clamp_(-127, 127)
        resid = resid - d * s.double().unsqueeze(1)
        codes_l.append(d.to(torch.int8))
        scales_l.append(s)
        if not resid.any():
            break
    return torch.stack(codes_l), torch.stack(scales_l), not bool(resid.any())


def scale_grid_plane(layer: _QuantBase) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The exact single int8 plane of a layer whose group scales lie on the int8 scale grid (spec ``-i8``).

    Recovers each row's base scale ``s = max_g scale_g / 16`` and integer multipliers
    ``m_g = scale_g / s`` (1..16) from the stored fp16 scales, and returns ``(codes * m_g`` as int8 ``(out, k)``,
    float32 ``s (out,))``, checked to equal the dequantized weight bit for bit in float32. Returns the reason
    instead when the scales are not on the grid (e.g. codes written without ``-i8``) or the check fails.
    """
    spec, k = layer.spec, layer._k
    if not spec.int8_scales:  # QuantSpec only allows -i8 for symmetric group-wise <= 4-bit weights
        return f"{spec.name} is not a spec with the int8 scale grid (-i8)"
    scale = layer.weight_scale.float()
    out, ng = scale.shape
    base = scale.amax(dim=1) / 16 if out else scale.new_zeros(0)
    mult = scale / base.unsqueeze(1)
    on_grid = (mult == mult.round()) & (mult >= 1) & (mult <= 16)
    if not bool(on_grid.all()):
        rows = (~on_grid).any(dim=1).nonzero().flatten()
        return (f"group scales are not on the int8 grid (row scale x integer 1..16) in {rows.numel()} of {out} "
                f"rows (first: row {int(rows[0])}); were the codes written with {spec.name}?")
    g, _ = _groups(k, spec.group_size)
    codes = _unpack(layer.qweight, spec.weight_bits, ng * g).to(torch.int16) - 2 ** (spec.weight_bits - 1)
    d = (codes.reshape(out, ng, g) * mult.to(torch.int16).unsqueeze(-1)).reshape(out, ng * g)[:, :k]
    if d.numel() and int(d.abs().max()) > 127:
        return "codes x group multipliers exceed int8"
    d = d.to(torch.int8)
    if not torch.equal(d.float() * base.unsqueeze(1), layer.dequantize(torch.float32).reshape(out, k)):
        return "codes x group multipliers x row scale differ from the dequantized weight"
    return d.contiguous(), base


# Shared int32 scratch for GEMM results (per thread): fresh multi-MB allocations per call cost page faults that
# were as large as the GEMM itself on SD1.5 shapes.
_scratch = threading.local()


#: CPU instruction sets with int8 dot products; without them torch._int_mm runs a generic loop.
_INT8_DOT_ISA = ("avx512_vnni", "avx_vnni", "amx_int8")


def why_int8_is_slow(device: torch.device | str = "cpu") -> str | None:
    """``None`` when ``torch._int_mm`` has a fast kernel on ``device``, else the reason it does not.

    CUDA: fast. CPU: fast only with an int8 dot-product instruction set (AVX-512 VNNI, AVX-VNNI or AMX). Without
    one (e.g. an AVX2-only EPYC) it runs a generic loop: measured 20-50x slower than the fp32 GEMM on SD1.5 shapes
    (experiments in BENCHMARKS.md section 3), so the "real" kernels would make the model far slower, not faster.
    """
    if torch.device(device).type == "cuda":
        return None
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if any(caps.get(isa) for isa in _INT8_DOT_ISA):
        return None
    return ("this CPU has no int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX; torch reports "
            f"{torch.backends.cpu.get_cpu_capability()}), so torch._int_mm runs a generic loop, measured 20-50x "
            "slower than the float GEMM")


def _int32_buffer(m: int, n: int, device: torch.device) -> torch.Tensor:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < m * n or buf.device != device:
        buf = torch.empty(max(m * n, 1), dtype=torch.int32, device=device)
        _scratch.buf = buf
    return buf[: m * n].view(m, n)


def _pad_for_cuda(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``a (M, K)`` / ``b (K, N)`` to CUDA ``_int_mm``'s shapes (M > 16; K, N multiples of 8); ``b``
    stays column-major (padded as the ``(N, K)`` weight it is a transposed view of). Zeros add nothing."""
    m, k = a.shape
    n = b.shape[1]
    pm, pk, pn = max(17 - m, 0), -k % 8, -n % 8
    if not (pm or pk or pn):
        return a, b
    return F.pad(a, (0, pk, 0, pm)), F.pad(b.t(), (0, pk, 0, pn)).t()


def _int_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 ``a (M, K) @ b (K, N)`` -> exact int32 (``torch._int_mm``; on CUDA padded to its shape rules)."""
    if a.is_cuda:
        m, n = a.shape[0], b.shape[1]
        return torch._int_mm(*_pad_for_cuda(a, b))[:m, :n]
    if out is None:
        return torch._int_mm(a, b)
    return torch._int_mm(a, b, out=out)


_ONEDNN_UNIT: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # N -> (unit weight scales, zero points)


@functools.cache
def onednn_int8_exact() -> bool:
    """Whether oneDNN's prepacked int8 GEMM (``torch.ops.onednn.qlinear_pointwise``) runs here and returns exact
    int32 sums (as float32), checked once per process on random and saturating (+-127) codes.

    With unit scales and zero points it is the same integer product as ``torch._int_mm``, measured 1.3-3.6x faster
    on SD1.5 shapes on an AMX Xeon (weights packed once into oneDNN's blocked layout, float32 out directly).
    CPUs whose int8 instructions saturate 16-bit intermediates would fail the check and keep ``torch._int_mm``.
    """
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randint(-127, 128, (40, 1280), dtype=torch.int8, generator=g)
        a[:8] = 127
        b = torch.randint(-127, 128, (72, 1280), dtype=torch.int8, generator=g)
        b[:8] = -127
        return torch.equal(_onednn_mm(a, _onednn_pack(b)), (a.double() @ b.double().t()).float())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _onednn_pack(w: torch.Tensor) -> torch.Tensor:
    """int8 ``(N, K)`` weight -> oneDNN's prepacked (opaque) weight for :func:`_onednn_mm`."""
    return torch.ops.onednn.qlinear_prepack(w.contiguous(), None)


def _onednn_mm(a: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """int8 ``a (M, K)`` x prepacked ``(N, K)`` weight -> the exact integer sums as float32 ``(M, N)`` (unit
    scales, zero points 0: no rounding but the int32 -> float32 conversion every path here does)."""
    n = packed.shape[1]  # the packed weight reports its shape as (K, N)
    ones = _ONEDNN_UNIT.get(n)
    if ones is None:
        ones = _ONEDNN_UNIT[n] = (torch.ones(n), torch.zeros(n, dtype=torch.int64))
    return torch.ops.onednn.qlinear_pointwise(a, 1.0, 0, packed, ones[0], ones[1], None, 1.0, 0, torch.float32,
                                              "none", [], "")


def _as_float_(part: torch.Tensor) -> torch.Tensor:
    """A contiguous int32 CPU tensor converted to float32 in place (same memory, viewed as float32): saves the
    allocation of the converted copy (exact for |values| < 2^24, as the int32 -> float cast everywhere here)."""
    f = part.view(torch.float32)
    f.copy_(part)  # element i read and written at the same address: an in-place elementwise cast
    return f


def _finish(acc: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(..., P*N) float32 activation-scaled accumulators -> (..., N): apply the P plane scales, add the bias."""
    p, n = scales.shape
    if p == 1:  # one fused op: bias + acc * scale
        return acc * scales[0] if bias is None else torch.addcmul(bias.float(), acc, scales[0])
    y = acc[..., :n].mul(scales[0])
    for i in range(1, p):
        y.addcmul_(acc[..., i * n:(i + 1) * n], scales[i])
    if bias is not None:
        y.add_(bias.float())
    return y


# --------------------------------------------------------------------------------------------- layers


class _Int8Base(nn.Module):
    weight_int8: torch.Tensor | None
    weight_scales: torch.Tensor | None
    weight_float: torch.Tensor | None

    def _init_from(self, layer: _QuantBase, codes: torch.Tensor, scales: torch.Tensor, exact: bool,
                   min_tokens: float) -> None:
        self.spec = layer.spec
        self.act_bits = layer.spec.act_bits
        self.planes = codes.shape[0]
        self.exact = exact
        self.register_buffer("weight_scales", scales.contiguous().to(layer.qweight.device))
        self.bias = layer.bias
        self._n_all = codes.shape[0] * codes.shape[1]  # P planes x N outputs: the GEMM's width
        self._packed: list[torch.Tensor] | None = None  # oneDNN-prepacked weights (CPU), see pack_onednn
        # Small-call fallback: calls with fewer than ``min_tokens`` GEMM rows run the simulated computation
        # (fake-quantized activations, float op) on the dequantized weight, cached once in the layer's dtype:
        # the very arithmetic of the simulated layer, faster than int8 where per-call overhead dominates.
        self.min_tokens = min_tokens
        self.register_buffer("weight_float", layer.dequantize() if min_tokens > 0 else None, persistent=False)
        if min_tokens == float("inf"):  # never int8: keep only the float weight (the simulated layer, exactly)
            self.weight_int8 = None
            self.weight_scales = None
            self.planes, self.exact = 0, True

    @property
    def gemm(self) -> str:
        """The int8 GEMM this layer calls: "onednn" (prepacked, CPU), "int_mm" (``torch._int_mm``) or "none"."""
        return "none" if self.weight_int8 is None else "onednn" if self._packed is not None else "int_mm"

    def pack_onednn(self, force: bool = False) -> bool:
        """Move the int8 weight into oneDNN's prepacked layout (CPU): the same codes, one copy, faster GEMMs
        (:func:`onednn_int8_exact`). The ``weight_int8`` buffer is emptied; :meth:`int8_weight` rebuilds it.
        Only GEMMs of at least ``ONEDNN_MIN_WEIGHT`` weights and depth ``ONEDNN_MIN_K`` are packed unless
        ``force``: below that oneDNN's per-call overhead (or, at depth 16, a reference kernel) loses. Returns
        whether the layer is packed."""
        if self.weight_int8 is None or self._packed is not None or self.weight_int8.device.type != "cpu":
            return self._packed is not None
        w = self.weight_int8
        n, k = w.shape[-2:]
        if not force and (n * k < ONEDNN_MIN_WEIGHT or k < ONEDNN_MIN_K):
            return False
        self._packed = [_onednn_pack(w)] if w.dim() == 2 else [_onednn_pack(w[i]) for i in range(w.shape[0])]
        self.weight_int8 = w.new_empty(0)
        return True

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy / pickle: oneDNN's packed tensors have no storage
        state = dict(super().__getstate__())
        if state.get("_packed") is not None:
            state["_packed"] = [torch.ops.aten.to_dense(p).t().contiguous() for p in state["_packed"]]
            state["_repack"] = True
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.pop("_repack", False):
            state["_packed"] = [_onednn_pack(w) for w in state["_packed"]]
        super().__setstate__(state)

    def int8_weight(self) -> torch.Tensor | None:
        """The int8 weight the GEMMs use, dense (``(P*N, K)``; convolutions ``(kh*kw, P*N, C)``)."""
        if self._packed is None:
            return self.weight_int8
        dense = [torch.ops.aten.to_dense(p).t() for p in self._packed]
        return torch.stack(dense) if isinstance(self, Int8Conv2d) else dense[0].contiguous()

    def _mm(self, codes: torch.Tensor, i: int | None = None) -> torch.Tensor:
        """Exact int8 products of activation codes ``(M, K)`` with weight ``i`` (a conv's kernel offset), as
        float32 ``(M, P*N)``: a new tensor (oneDNN, CUDA) or a view of the shared scratch (CPU ``_int_mm``)."""
        if self._packed is not None:
            if codes.device.type != "cpu":
                raise KernelError("this layer's int8 weights are packed for oneDNN on the CPU; compile the model "
                                  "on the device it runs on")
            return _onednn_mm(codes, self._packed[0 if i is None else i])
        w = self.weight_int8 if i is None else self.weight_int8[i]
        if codes.is_cuda:
            return _int_mm(codes, w.t()).float()
        return _as_float_(_int_mm(codes, w.t(), out=_int32_buffer(codes.shape[0], self._n_all, codes.device)))

    @property
    def int8_path(self) -> str:
        """Which computation the layer runs: "int8", "simulated" (small layer) or "int8 from N tokens"."""
        if self.min_tokens == 0:
            return "int8"
        if self.min_tokens == float("inf"):
            return "simulated"
        return f"int8 from {int(self.min_tokens)} tokens, simulated below"

    def _extra(self) -> str:
        if self.min_tokens == float("inf"):
            return (f"spec={self.spec.name}, path=simulated (too small for int8 to gain; dequantized weight cached "
                    f"in {str(self.weight_float.dtype).replace('torch.', '')})")
        path = "" if self.min_tokens == 0 else f", path=int8 from {int(self.min_tokens)} tokens, simulated below " \
                                               f"(dequantized weight cached)"
        return f"spec={self.spec.name}, planes={self.planes}, exact={self.exact}{path}"


class Int8Linear(_Int8Base):
    """``nn.Linear`` on int8 kernels: per-token int8 activation codes x int8 weight planes -> int32 -> float."""

    def __init__(self, layer: QuantLinear, planes: int = 2, min_tokens: float = 0) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        codes, scales, exact = weight_planes(layer, planes)
        # (P*N, K) row-major; the GEMM reads its transpose (measured as fast as a (K, N) copy).
        self.register_buffer("weight_int8", codes.reshape(-1, self.in_features).contiguous().to(layer.qweight.device))
        self._init_from(layer, codes, scales, exact, min_tokens)

    @classmethod
    def from_quant(cls, layer: QuantLinear, planes: int = 2, min_tokens: float = 0) -> "Int8Linear":
        """Build from a simulated :class:`QuantLinear` (its codes, scales and bias); ``min_tokens``: calls with
        fewer rows run the simulated computation (0: always int8; inf: never)."""
        return cls(layer, planes, min_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] < self.min_tokens:
            return F.linear(fake_quant_per_token(x, self.act_bits, dim=-1), self.weight_float, self.bias)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        codes, sx = quantize_activations(x2.float(), self.act_bits)
        acc = torch.mul(self._mm(codes), sx)  # a new tensor (the CPU _int_mm result is in the shared scratch)
        return _finish(acc, self.weight_scales, self.bias).to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"{self._extra()}"


class Int8Conv2d(_Int8Base):
    """``nn.Conv2d`` (groups=1) on int8 kernels: a shifted int8 GEMM per kernel offset, per-token scales."""

    def __init__(self, layer: QuantConv2d, planes: int = 2, min_tokens: float = 0) -> None:
        super().__init__()
        if layer.groups != 1:
            raise KernelError(f"Int8Conv2d supports groups=1 only, got groups={layer.groups}")
        if isinstance(layer.padding, str):
            raise KernelError(f"Int8Conv2d needs numeric padding, got padding={layer.padding!r}")
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, layer.padding
        self.dilation, self.padding_mode = layer.dilation, layer.padding_mode
        kh, kw = self.kernel_size
        codes, scales, exact = weight_planes(layer, planes)
        p = codes.shape[0]
        # (P, out, C*kh*kw) -> per offset (kh*kw, P*out, C): the weights one shifted GEMM needs.
        w = codes.reshape(p, self.out_channels, self.in_channels, kh * kw).permute(3, 0, 1, 2)
        self.register_buffer("weight_int8", w.reshape(kh * kw, p * self.out_channels, self.in_channels)
                             .contiguous().to(layer.qweight.device))
        self._init_from(layer, codes, scales, exact, min_tokens)

    @classmethod
    def from_quant(cls, layer: QuantConv2d, planes: int = 2, min_tokens: float = 0) -> "Int8Conv2d":
        """Build from a simulated :class:`QuantConv2d` (its codes, scales and bias); ``min_tokens``: calls with
        fewer output positions run the simulated computation (0: always int8; inf: never)."""
        return cls(layer, planes, min_tokens)

    def _simulated(self, x: torch.Tensor) -> torch.Tensor:
        """The simulated layer's computation (QuantConv2d.forward) on the cached dequantized weight."""
        x = fake_quant_per_token(x, self.act_bits, dim=1 if x.dim() == 4 else 0)
        if self.padding_mode != "zeros":
            pad = [p for p in reversed(self.padding) for _ in range(2)]
            return F.conv2d(F.pad(x, pad, mode=self.padding_mode), self.weight_float, self.bias, self.stride, 0,
                            self.dilation)
        return F.conv2d(x, self.weight_float, self.bias, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        dtype = x.dtype
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ph, pw = self.padding
        b, c, h, w = x.shape
        hp, wp = h + 2 * ph, w + 2 * pw
        ho = (hp - dh * (kh - 1) - 1) // sh + 1
        wo = (wp - dw * (kw - 1) - 1) // sw + 1
        m = b * ho * wo
        if m < self.min_tokens:
            y = self._simulated(x)
            return y.squeeze(0) if unbatched else y
        if self.padding_mode != "zeros":  # pad the float input (same values as padding the quantized one)
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            ph = pw = 0
        n_all = self._n_all
        # Quantize in the input's own layout (reduction over channels), then one int8 copy to NHWC, padded.
        codes, sx = quantize_activations(x.float(), self.act_bits, dim=1)
        if sh == sw == 1:
            acc = self._flat_offsets(codes, sx, ph, pw)[:, :ho, :wo]
        else:
            acc = self._gathered_offsets(codes, sx, ph, pw, ho, wo).view(b, ho, wo, n_all)
        y = _finish(acc, self.weight_scales, self.bias)
        y = y.permute(0, 3, 1, 2).to(dtype)  # NCHW in channels_last memory: no copy back (see the docstring)
        return y.squeeze(0) if unbatched else y

    def _flat_offsets(self, codes: torch.Tensor, sx: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
        """Stride-1 accumulation without per-offset gathers: (B, Hp, Wp, P*N) float, valid at [:, :Ho, :Wo].

        The codes are laid out once as the flattened zero-padded NHWC image ``(B*Hp*Wp + tail, C)``; output
        position ``(b, r, c)`` at flat row ``f`` reads kernel offset ``(i, j)`` at row ``f + i*dh*Wp + j*dw``, so
        each offset's GEMM input and activation scales are contiguous slices (rows past the valid output, which
        wrap into the next row or image, are computed and cropped)."""
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        b, c, h, w = codes.shape
        hp, wp = h + 2 * ph, w + 2 * pw
        mp = b * hp * wp
        tail = (kh - 1) * dh * wp + (kw - 1) * dw
        flat = codes.new_zeros(mp + tail, c)
        flat[:mp].view(b, hp, wp, c)[:, ph:ph + h, pw:pw + w].copy_(codes.permute(0, 2, 3, 1))
        sflat = sx.new_zeros(mp + tail, 1)  # padding rows: codes 0, any scale
        sflat[:mp].view(b, hp, wp, 1)[:, ph:ph + h, pw:pw + w].copy_(sx.permute(0, 2, 3, 1))
        n_all = self._n_all
        acc: torch.Tensor | None = None
        for i in range(kh):
            for j in range(kw):
                o = i * dh * wp + j * dw
                part = self._mm(flat[o:o + mp], i * kw + j)
                if acc is None:
                    acc = torch.mul(part, sflat[o:o + mp])
                else:
                    acc.addcmul_(part, sflat[o:o + mp])
        assert acc is not None
        return acc.view(b, hp, wp, n_all)

    def _gathered_offsets(self, codes: torch.Tensor, sx: torch.Tensor, ph: int, pw: int, ho: int,
                          wo: int) -> torch.Tensor:
        """Any stride: per kernel offset, gather the (M, C) input rows it reads and their scales; (M, P*N)."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        b, c, h, w = codes.shape
        if ph or pw:
            cp = codes.new_zeros(b, h + 2 * ph, w + 2 * pw, c)
            cp[:, ph:ph + h, pw:pw + w].copy_(codes.permute(0, 2, 3, 1))
            sp = sx.new_ones(b, h + 2 * ph, w + 2 * pw, 1)
            sp[:, ph:ph + h, pw:pw + w].copy_(sx.permute(0, 2, 3, 1))
            codes, sx = cp, sp
        else:
            codes, sx = codes.permute(0, 2, 3, 1).contiguous(), sx.permute(0, 2, 3, 1)
        m = b * ho * wo
        acc: torch.Tensor | None = None
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * dh, j * dw
                rows = codes[:, r0:r0 + (ho - 1) * sh + 1:sh, c0:c0 + (wo - 1) * sw + 1:sw, :].reshape(m, c)
                srow = sx[:, r0:r0 + (ho - 1) * sh + 1:sh, c0:c0 + (wo - 1) * sw + 1:sw, :].reshape(m, 1)
                part = self._mm(rows, i * kw + j)
                if acc is None:
                    acc = torch.mul(part, srow)
                else:
                    acc.addcmul_(part, srow)
        assert acc is not None
        return acc

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, " \
               f"padding={self.padding}, bias={self.bias is not None}, {self._extra()}"


_KERNEL_TYPES = (Int8Linear, Int8Conv2d)


def kernel_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Name -> Int8Linear / Int8Conv2d of every real-kernel layer in ``module``."""
    return {n: m for n, m in module.named_modules() if isinstance(m, _KERNEL_TYPES)}


# ------------------------------------------------------------------------------------------- torchao


def _torchao_config(spec: Any, tq: Any) -> Any:
    """torchao config reproducing ``spec`` on a Linear, or a string saying why there is none."""
    if not spec.symmetric:
        return "torchao backend: asymmetric specs stay simulated"
    key = (spec.weight_bits, spec.act_bits)
    if key == (8, 8) and spec.group_size is None:
        return tq.Int8DynamicActivationInt8WeightConfig()
    if key == (8, 16) and spec.group_size is None:
        return tq.Int8WeightOnlyConfig()
    if key == (4, 16) and spec.group_size in (32, 64, 128, 256):
        try:  # tinygemm (aten._weight_int4pack_mm, in every CUDA torch); the "plain" default needs the mslk package
            return tq.Int4WeightOnlyConfig(group_size=spec.group_size, int4_packing_format="tile_packed_to_4d")
        except TypeError:  # torchao before the packing-format argument
            return tq.Int4WeightOnlyConfig(group_size=spec.group_size)
    return f"torchao backend: no torchao kernel for {spec.name} (w8a8, w8a16, w4a16-g32..256 only)"


def _torchao_linear(layer: QuantLinear, config: Any, tq: Any) -> nn.Module:
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                    device=layer.qweight.device, dtype=layer.dtype)
    with torch.no_grad():
        lin.weight.copy_(layer.dequantize())
    if layer.bias is not None:
        lin.bias = layer.bias
    holder = nn.Sequential(lin)
    tq.quantize_(holder, config)
    return holder[0]


# ------------------------------------------------------------------------------------------- compile


@dataclass
class KernelSummary:
    """What :func:`compile_quantized` did: backend, layers compiled (name -> kind) and kept simulated."""

    backend: str
    compiled: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    inexact: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    planes: int = 2
    grid_fallback: dict[str, str] = field(default_factory=dict)
    small: dict[str, str] = field(default_factory=dict)
    slow_int8: str | None = None
    gemm: str = "int_mm"
    onednn_layers: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields."""
        return {"backend": self.backend, "compiled": len(self.compiled), "kept": dict(self.kept),
                "inexact_layers": len(self.inexact), "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "planes": self.planes, "grid_fallback": dict(self.grid_fallback),
                "small": dict(self.small), "slow_int8": self.slow_int8,
                "gemm": self.gemm, "onednn_layers": self.onednn_layers}

    def __str__(self) -> str:
        mib = 2**20
        gemm = "" if self.backend != "int8" else ", int_mm GEMM" if self.gemm == "int_mm" else \
            f", oneDNN GEMM on {self.onednn_layers} layers (the rest torch._int_mm)"
        lines = [f"KernelSummary ({self.backend}{gemm}): {len(self.compiled)} layers on real kernels, "
                 f"{len(self.kept)} kept simulated; resident {self.bytes_before / mib:.2f} MiB -> "
                 f"{self.bytes_after / mib:.2f} MiB"]
        if self.slow_int8:
            lines.append(f"  slow int8: {self.slow_int8}")
        if self.inexact:
            lines.append(f"  {len(self.inexact)} layers use {self.planes} int8 weight planes for group-wise scales "
                         f"(approximate to <= 1/(2*127^{self.planes}) of each row's max weight)")
        lines += [f"  -i8 layer on weight planes, not one exact int8 plane: {n}: {why}"
                  for n, why in self.grid_fallback.items()]
        if self.small:
            lines.append(f"  {len(self.small)} small layers run (some or all calls) the simulated computation on a "
                         "cached dequantized weight (faithful by construction; faster than int8 at their size):")
            lines += [f"    {n}: {why}" for n, why in self.small.items()]
        lines += [f"  kept simulated: {n}: {why}" for n, why in self.kept.items()]
        return "\n".join(lines)


def _resident_bytes(module: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (persistent or not): what the model holds in memory."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for m in module.modules():  # oneDNN-prepacked int8 weights (opaque tensors, not buffers)
        total += sum(p.numel() for p in getattr(m, "_packed", None) or ())
    return total


def _int8_reason(layer: _QuantBase) -> str | None:
    """Why ``layer`` cannot run on the int8 path (None if it can)."""
    if not layer.spec.quantizes_activations:
        return f"{layer.spec.name}: float activations (weight-only spec); runs the simulated float path"
    if layer.spec.act_bits > 8:
        return f"{layer.spec.name}: {layer.spec.act_bits}-bit activation codes do not fit int8"
    if isinstance(layer, QuantConv2d):
        if layer.groups != 1:
            return f"grouped convolution (groups={layer.groups}) is not on the int8 path"
        if isinstance(layer.padding, str):
            return f"string padding {layer.padding!r} is not on the int8 path"
    return None


def compile_quantized(pipe_or_module: Any, backend: str = "auto", planes: int = 2,
                      small_layers: str = "int8", gemm: str = "auto") -> KernelSummary:
    """Swap every qsched simulated layer of a quantized denoiser (pipeline or module) for a real-kernel layer.

    ``backend``: ``"int8"`` (``torch._int_mm``; CPU or CUDA, no optional package), ``"torchao"`` (CUDA Linear
    layers through torchao), ``"auto"`` (torchao on CUDA when importable, else int8; on a CPU without int8
    dot-product instructions, where int8 would be slower (:func:`why_int8_is_slow`), nothing is swapped: the
    summary's backend is ``"none"`` and a warning says why). ``planes``: int8 weight
    planes for group-wise scales (see the module docstring). ``small_layers`` (int8 backend): ``"int8"`` runs
    every layer on int8 kernels; ``"auto"`` lets small layers (at most ``SMALL_WEIGHT`` weights) run the
    simulated computation, on the dequantized weight cached once in the layer's dtype, for calls too small for
    int8 to gain (:func:`small_layer_tokens`; listed in ``KernelSummary.small`` and each layer's repr). In place;
    returns a :class:`KernelSummary`. Layers the backend cannot run stay simulated and are listed with the reason.
    ``gemm`` (int8 backend, CPU): ``"onednn"`` packs the int8 weights of large layers (see ``ONEDNN_MIN_WEIGHT``)
    once for oneDNN's int8 GEMM (exact, faster there), ``"int_mm"`` calls ``torch._int_mm`` everywhere; ``"auto"``:
    oneDNN where :func:`onednn_int8_exact` holds.
    """
    if backend not in BACKENDS:
        raise KernelError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if small_layers not in SMALL_LAYERS:
        raise KernelError(f"small_layers must be one of {', '.join(SMALL_LAYERS)}, got {small_layers!r}")
    if isinstance(planes, bool) or not isinstance(planes, int) or not 1 <= planes <= _MAX_PLANES:
        raise KernelError(f"planes must be an int in 1..{_MAX_PLANES}, got {planes!r}")
    if gemm not in GEMMS:
        raise KernelError(f"gemm must be one of {', '.join(GEMMS)}, got {gemm!r}")
    _, denoiser = denoiser_of(pipe_or_module)
    if getattr(denoiser, KERNELS_ATTR, None) is not None:
        raise KernelError(f"the denoiser is already compiled (backend {getattr(denoiser, KERNELS_ATTR)!r})")
    layers = quantized_layers(denoiser)
    if not layers:
        raise KernelError("no qsched quantized layers to compile: call qsched.quantize(pipe, spec) (or "
                          "load_quantized) first; torchao-quantized models already run torchao kernels")
    device = next(iter(layers.values())).qweight.device
    tq = None
    if backend in ("auto", "torchao") and device.type == "cuda":
        try:
            tq = importlib.import_module("torchao.quantization")
        except ImportError:
            if backend == "torchao":
                raise ImportError("backend='torchao' needs the optional package torchao (pip install torchao); "
                                  "backend='int8' needs nothing extra") from None
    elif backend == "torchao":
        raise KernelError(f"backend='torchao' runs on CUDA only; the denoiser is on {device}. Use backend='int8'")
    chosen = "torchao" if tq is not None else "int8"
    slow = why_int8_is_slow(device) if chosen == "int8" else None
    if slow and backend == "auto":  # the fastest choice here is the simulated model as it is
        warnings.warn(f"compile_quantized(backend='auto') left the model simulated: {slow}. "
                      "backend='int8' forces the int8 kernels (smaller resident weights, slower here).",
                      RuntimeWarning, stacklevel=2)
        size = _resident_bytes(denoiser)
        return KernelSummary(backend="none", kept=dict.fromkeys(layers, "auto: int8 kernels would be slower on this "
                                                                      "device"),
                             bytes_before=size, bytes_after=size, planes=planes, slow_int8=slow)
    if gemm == "onednn" and (device.type != "cpu" or not onednn_int8_exact()):
        raise KernelError(f"gemm='onednn' needs a CPU where oneDNN's int8 GEMM is exact (device {device}); "
                          "use gemm='auto'")
    packed = chosen == "int8" and device.type == "cpu" and gemm != "int_mm" and onednn_int8_exact()
    summary = KernelSummary(backend=chosen, bytes_before=_resident_bytes(denoiser), planes=planes, slow_int8=slow,
                            gemm="onednn" if packed else "int_mm" if chosen == "int8" else chosen)
    if slow:
        warnings.warn(f"compile_quantized(backend='int8'): {slow}; the compiled model will be slower than the "
                      "simulated one on this device.", RuntimeWarning, stacklevel=2)
    memo: dict[int, nn.Module | str] = {}
    for name, layer in layers.items():
        if id(layer) not in memo:
            memo[id(layer)] = _compile_layer(layer, chosen, planes, tq, small_layers == "auto")
            if packed and isinstance(memo[id(layer)], _KERNEL_TYPES) and memo[id(layer)].pack_onednn():
                summary.onednn_layers += 1
        new = memo[id(layer)]
        if isinstance(new, str):
            summary.kept[name] = new
            continue
        _set_submodule(denoiser, name, new)
        summary.compiled[name] = type(new).__name__
        if isinstance(new, _KERNEL_TYPES) and new.min_tokens > 0:
            summary.small[name] = new.int8_path
        if isinstance(new, _KERNEL_TYPES) and not new.exact:
            summary.inexact.append(name)
        if isinstance(new, _KERNEL_TYPES) and layer.spec.int8_scales and (new.planes > 1 or not new.exact):
            why = scale_grid_plane(layer)
            if isinstance(why, str):
                summary.grid_fallback[name] = why
    setattr(denoiser, KERNELS_ATTR, chosen)
    # save_quantized refuses non-"qsched" backends: a compiled model must not be written as a partial checkpoint.
    setattr(denoiser, BACKEND_ATTR, f"qsched+{chosen}")
    summary.bytes_after = _resident_bytes(denoiser)
    return summary


def small_layer_tokens(layer: _QuantBase) -> float:
    """``min_tokens`` of ``layer`` under ``small_layers="auto"``: 0 (always int8: more than
    :data:`SMALL_WEIGHT` weights), else :data:`SMALL_TOKENS` or, below :data:`SMALL_K` depth,
    :data:`SHALLOW_TOKENS` (calls with fewer GEMM rows run the simulated computation)."""
    if layer.weight_scale.shape[0] * layer._k > SMALL_WEIGHT:
        return 0
    linear = isinstance(layer, QuantLinear)
    depth = layer.in_features if linear else layer.in_channels
    return SMALL_TOKENS if depth >= SMALL_K["Linear" if linear else "Conv2d"] else SHALLOW_TOKENS


def _compile_layer(layer: _QuantBase, backend: str, planes: int, tq: Any, small: bool = False) -> nn.Module | str:
    """The real-kernel twin of ``layer``, or the reason it stays simulated."""
    if backend == "torchao":
        if not isinstance(layer, QuantLinear):
            return "torchao backend: Conv2d layers stay simulated (torchao quantizes Linear layers)"
        config = _torchao_config(layer.spec, tq)
        if isinstance(config, str):
            return config
        try:
            return _torchao_linear(layer, config, tq)
        except (RuntimeError, ValueError, NotImplementedError, AssertionError) as e:
            return f"torchao refused this layer: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    reason = _int8_reason(layer)
    if reason is not None:
        return reason
    cls = Int8Conv2d if isinstance(layer, QuantConv2d) else Int8Linear
    return cls.from_quant(layer, planes, small_layer_tokens(layer) if small else 0)

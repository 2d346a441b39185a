"""Post-training quantization of a diffusion denoiser (UNet / DiT): simulated W{b}A{a} and packed storage.

What it does
------------
``quantize(pipe, "w4a8")`` swaps the denoiser's ``nn.Linear`` / ``nn.Conv2d`` layers, in place, for
:class:`QuantLinear` / :class:`QuantConv2d`. Quantization is round-to-nearest and data-free: no calibration
data and no full-precision statistics are used, as in Q-Sched (arXiv 2509.01624).

* **Weights** are quantized once. A Linear weight ``(out, in)`` is split along the input dimension into groups
  of ``group_size`` values with one scale per (output channel, group); ``group_size=None`` means one scale per
  output channel. A Conv2d weight ``(out, in/groups, kh, kw)`` is flattened per output channel to
  ``(out, in/groups*kh*kw)`` and grouped the same way. When the group size does not divide that length, the
  last group is padded with zeros (zeros never change a group's range, so the padding is free).
  Symmetric: ``scale = max|w| / (2^(b-1)-1)``, codes in ``[-(2^(b-1)-1), 2^(b-1)-1]`` stored offset by
  ``2^(b-1)``. Asymmetric: ``scale = (max-min) / (2^b-1)`` with the range widened to include 0, an integer
  zero point in ``[0, 2^b-1]``. Scales are computed in float32 and rounded to float16 *before* the codes are
  computed (they are stored in fp16), clamped to ``[2^-24, 65504]``.
* **Activations** are fake-quantized dynamically per token with symmetric int{a}: Linear inputs per row of
  the last dimension; Conv2d inputs per spatial position across channels (the ``C`` values at each ``(n, h, w)``
  form one "token", which is what a 1x1 conv / Linear over channels would see). ``a16`` = no activation
  quantization. Computation in float32, result cast back to the input dtype.
* The layer then runs the ordinary float op (``F.linear`` / ``F.conv2d``) with the dequantized weight.

Storage. Every quantized layer keeps its weight as *integer codes*, packed two per byte (uint8) for <= 4 bits
and one per byte for 5..8 bits (buffer ``qweight``), float16 scales (``weight_scale``) and, for asymmetric
specs, uint8 zero points (``weight_zero``). These buffers are exactly what :func:`save_quantized` writes
(safetensors), so a reloaded model reproduces the in-memory one bit for bit. By default the dequantized
weight is cached in the layer's dtype (non-persistent buffer ``weight_dq``); ``keep_packed=True`` drops the
cache and dequantizes during every forward (same numbers, less memory, slower).

Spec grammar (``QuantSpec.parse``), case-insensitive::

    spec    := "w" WBITS "a" ABITS option*
    WBITS   := 2..8          weight bits
    ABITS   := 4..16         activation bits (16 = activations are not quantized)
    option  := "-g" N        groups of N input values per scale (N >= 1)
             | "-pc"         one scale per output channel (no groups)
             | "-asym"       asymmetric weights (scale + zero point)
             | "-sym"        symmetric weights (the default)
             | "-i8"         group scales on an int8 grid: row scale x integer 1..16 (symmetric, group-wise,
                             2..4-bit weights), so the int8 kernels run W4A8 as one exact int8 GEMM

Defaults: groups of 32 for weight bits <= 4, per output channel for 5..8 bits; symmetric. Examples: "w4a8"
(int4 sym g32 weights, int8 per-token activations), "w8a8" (int8 per-channel weights), "w4a4", "w4a16",
"w8a16", "w4a8-g64", "w4a8-asym", "w4a16-g128-asym", "w4a8-pc", "w4a8-i8".

Layers kept in full precision by default (``DEFAULT_SKIPS``, fnmatch patterns on module names): the input and
output projections (``conv_in``/``conv_out`` of a UNet, ``x_embedder``/``pos_embed.proj``/``proj_out`` of a
transformer; tiny and very sensitive, as in SVDQuant/MixDQ practice), the timestep / added-condition embedding
MLPs (``time_embedding``, ``add_embedding``, ``time_text_embed``, ...: tiny, and every feature of every block
depends on them), and any layer whose per-channel input length is shorter than the group size (a group would
be mostly padding; these are tiny layers).
"""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from qsched.qformat import (  # noqa: F401 - the number format, re-exported here where users look for it
    QuantSpec,
    _groups,
    _pack,
    _packed_cols,
    _unpack,
    dequantize_weight,
    fake_quant_per_token,
    quantize_weight,
)
from qsched.errors import QSchedError
from qsched.runner import denoiser_of

__all__ = [
    "QuantSpec",
    "QuantLinear",
    "QuantConv2d",
    "QuantSummary",
    "DEFAULT_SKIPS",
    "quantize",
    "quant_spec_of",
    "quantized_copy",
    "quantized_layers",
    "fake_quant_per_token",
    "quantize_weight",
    "dequantize_weight",
]

SPEC_ATTR = "qsched_quant_spec"
BACKEND_ATTR = "qsched_quant_backend"

# Called as marker(model, spec, skip, include_conv, keep_packed, modules) on every diffusers model quantize() makes,
# so that its save_pretrained writes the quantized layout. Set by qsched.hf_quantizer, which qsched imports as soon as
# diffusers loads its quantizers (this module does not import the diffusers integration; that one imports this).
_DIFFUSERS_MARKER: list[Callable[..., None]] = []


def set_diffusers_marker(marker: Callable[..., None]) -> None:
    """Install the function that marks quantized diffusers models (called by :mod:`qsched.hf_quantizer`)."""
    _DIFFUSERS_MARKER[:] = [marker]


class _QuantBase(nn.Module):
    """Shared storage / dequantization logic of QuantLinear and QuantConv2d."""

    qweight: torch.Tensor
    weight_scale: torch.Tensor

    @staticmethod
    def _layer_kwargs(layer: nn.Module) -> dict[str, Any]:
        """Constructor arguments (shapes) of the quantized twin of float ``layer``."""
        raise NotImplementedError

    @classmethod
    def from_float(cls, layer: nn.Module, spec: QuantSpec | str, keep_packed: bool = False) -> "_QuantBase":
        """Quantize a float layer (round-to-nearest; scales computed in float32); the bias is shared."""
        w = layer.weight
        q = cls(**cls._layer_kwargs(layer), bias=False, spec=spec, dtype=w.dtype, device=w.device,
                keep_packed=keep_packed)
        q.bias = layer.bias
        q._set_quantized(w)
        return q

    @classmethod
    def empty_like(cls, layer: nn.Module, spec: QuantSpec, dtype: torch.dtype) -> "_QuantBase":
        """A shell with the right buffer shapes, to be filled by ``load_state_dict``."""
        return cls(**cls._layer_kwargs(layer), bias=layer.bias is not None, spec=spec, dtype=dtype, device="cpu",
                   keep_packed=True)

    def _init_storage(self, spec: QuantSpec, out: int, k: int, weight_shape: tuple[int, ...],
                      dtype: torch.dtype, device: torch.device | str | None, keep_packed: bool) -> None:
        self.spec = spec
        self.weight_shape = tuple(weight_shape)
        self._k = k
        self._dtype = dtype
        self.keep_packed = keep_packed
        g, ng = _groups(k, spec.group_size)
        self.register_buffer("qweight", torch.zeros(out, _packed_cols(ng * g, spec.weight_bits), dtype=torch.uint8,
                                                     device=device))
        self.register_buffer("weight_scale", torch.ones(out, ng, dtype=torch.float16, device=device))
        if not spec.symmetric:
            self.register_buffer("weight_zero", torch.zeros(out, ng, dtype=torch.uint8, device=device))
        else:
            self.weight_zero = None
        self.register_buffer("weight_dq", None, persistent=False)

    def _set_quantized(self, w: torch.Tensor) -> None:
        packed, scale, zero = quantize_weight(w.reshape(w.shape[0], -1), self.spec)
        self.qweight, self.weight_scale = packed, scale
        if zero is not None:
            self.weight_zero = zero
        self.refresh()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight, in its original shape, in ``dtype`` (default: the layer's dtype)."""
        w = dequantize_weight(self.qweight, self.weight_scale, self.weight_zero, self.spec, self._k,
                              dtype or self._dtype)
        return w.reshape(self.weight_shape)

    def refresh(self) -> None:
        """Rebuild (or drop, when ``keep_packed``) the cached dequantized weight from the stored codes."""
        self.weight_dq = None if self.keep_packed else self.dequantize()

    def set_keep_packed(self, keep_packed: bool) -> None:
        """Switch between cached float weights (fast) and per-forward dequantization (small)."""
        self.keep_packed = bool(keep_packed)
        self.refresh()

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (cached, or computed on access when ``keep_packed``)."""
        return self.weight_dq if self.weight_dq is not None else self.dequantize()

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the layer (that of the original float weight, following ``.to()``)."""
        return self._dtype

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Keep fp16 scales exact (``.to(bfloat16)`` must not round them) and rebuild the cached weight from the
        # codes at the new dtype instead of converting the old cache, so it always equals dequantize().
        keep = {n: self._buffers.pop(n) for n in ("weight_scale", "weight_zero") if self._buffers.get(n) is not None}
        self._buffers.pop("weight_dq", None)
        try:
            super()._apply(fn, recurse)
        finally:
            device = self.qweight.device
            for n, t in keep.items():
                self._buffers[n] = t.to(device)
        probe = fn(torch.empty(0, dtype=self._dtype, device=device))
        if probe.is_floating_point():
            self._dtype = probe.dtype
        self._buffers["weight_dq"] = None
        self.refresh()
        return self

    def packed_nbytes(self) -> int:
        """Bytes of the stored (packed) representation: codes, scales, zero points and bias."""
        n = sum(t.numel() * t.element_size() for t in (self.qweight, self.weight_scale, self.weight_zero)
                if t is not None)
        bias = getattr(self, "bias", None)
        return n + (bias.numel() * bias.element_size() if bias is not None else 0)

    def _quant_repr(self) -> str:
        return f"spec={self.spec.name}, dtype={str(self._dtype).replace('torch.', '')}, keep_packed={self.keep_packed}"


class QuantLinear(_QuantBase):
    """Fake-quantized ``nn.Linear``: packed int weights + per-token dynamic activation fake quantization."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, spec: QuantSpec | str = "w4a8",
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 keep_packed: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage(QuantSpec.parse(spec), out_features, in_features, (out_features, in_features), dtype,
                           device, keep_packed)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @staticmethod
    def _layer_kwargs(layer: nn.Linear) -> dict[str, Any]:
        return dict(in_features=layer.in_features, out_features=layer.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fake_quant_per_token(x, self.spec.act_bits, dim=-1)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, {self._quant_repr()}"


class QuantConv2d(_QuantBase):
    """Fake-quantized ``nn.Conv2d``. Weights grouped over (in_channels/groups x kh x kw) per output channel;
    activations quantized per spatial position across channels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 spec: QuantSpec | str = "w4a8", dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, keep_packed: bool = False) -> None:
        super().__init__()
        kh, kw = nn.modules.utils._pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride = nn.modules.utils._pair(stride)
        self.padding = padding if isinstance(padding, str) else nn.modules.utils._pair(padding)
        self.dilation = nn.modules.utils._pair(dilation)
        self.groups, self.padding_mode = groups, padding_mode
        shape = (out_channels, in_channels // groups, kh, kw)
        self._init_storage(QuantSpec.parse(spec), out_channels, shape[1] * kh * kw, shape, dtype, device,
                           keep_packed)
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device)) if bias else None

    @staticmethod
    def _layer_kwargs(layer: nn.Conv2d) -> dict[str, Any]:
        return dict(in_channels=layer.in_channels, out_channels=layer.out_channels, kernel_size=layer.kernel_size,
                    stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                    padding_mode=layer.padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fake_quant_per_token(x, self.spec.act_bits, dim=1 if x.dim() == 4 else 0)
        w = self.weight
        if self.padding_mode != "zeros":
            pad = [p for p in reversed(self.padding) for _ in range(2)]
            return F.conv2d(F.pad(x, pad, mode=self.padding_mode), w, self.bias, self.stride, 0, self.dilation,
                            self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, " \
               f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, {self._quant_repr()}"


_QUANT_TYPES = (QuantLinear, QuantConv2d)


# ----------------------------------------------------------------------------------- model surgery

DEFAULT_SKIPS: tuple[tuple[str, str], ...] = (
    ("conv_in", "UNet input conv: tiny and very sensitive (kept full precision, as in SVDQuant/MixDQ)"),
    ("conv_out", "UNet output conv: tiny and very sensitive (kept full precision, as in SVDQuant/MixDQ)"),
    ("x_embedder", "transformer input projection: tiny and very sensitive (as in SVDQuant/MixDQ)"),
    ("pos_embed.proj", "transformer patch-embedding input projection: tiny and very sensitive"),
    ("proj_out", "transformer output projection: tiny and very sensitive (as in SVDQuant/MixDQ)"),
    ("time_embedding.*", "timestep-embedding MLP: tiny, conditions every block"),
    ("time_embed.*", "timestep-embedding MLP: tiny, conditions every block"),
    ("add_embedding.*", "added-condition (SDXL time-id / pooled text) embedding MLP: tiny, conditions every block"),
    ("class_embedding.*", "class-embedding MLP: tiny, conditions every block"),
    ("time_text_embed.*", "timestep/guidance/pooled-text embedding MLPs: tiny, condition every block"),
    ("adaln_single.*", "timestep embedding (AdaLN-single): tiny, conditions every block"),
)


def quantized_layers(module: nn.Module) -> dict[str, _QuantBase]:
    """Name -> QuantLinear/QuantConv2d of every quantized layer in ``module``."""
    return {n: m for n, m in module.named_modules() if isinstance(m, _QUANT_TYPES)}


def _state_bytes(module: nn.Module) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in module.state_dict().values():
        key = (t.data_ptr(), t.numel())
        if t.data_ptr() and key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _layer_in_len(m: nn.Module) -> int:
    if isinstance(m, nn.Conv2d):
        return (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    return m.in_features


@dataclass
class QuantSummary:
    """What :func:`quantize` did: spec, quantized and skipped layers, storage bytes before and after."""

    spec: QuantSpec
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    backend: str = "qsched"
    denoiser: str | None = None

    @property
    def ratio(self) -> float:
        """bytes_after / bytes_before."""
        return self.bytes_after / self.bytes_before if self.bytes_before else float("nan")

    def __str__(self) -> str:
        mib = 1024**2
        where = f"{self.denoiser} " if self.denoiser else ""
        lines = [f"QuantSummary {self.spec.name} ({self.backend}) of {where}denoiser: "
                 f"{len(self.quantized)} layers quantized, {len(self.skipped)} kept in full precision",
                 f"  storage: {self.bytes_before / mib:.2f} MiB -> {self.bytes_after / mib:.2f} MiB "
                 f"({self.ratio:.3f}x)"]
        if self.skipped:
            lines.append("  kept in full precision:")
            lines += [f"    {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _select_layers(denoiser: nn.Module, spec: QuantSpec, skip: list[str], include_conv: bool,
                   linear_only_reason: str | None = None) -> tuple[list[str], dict[str, str]]:
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    inside_mha: list[str] = [n for n, m in denoiser.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, m in denoiser.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or not name:
            continue
        reason = None
        if isinstance(m, nn.Conv2d) and linear_only_reason:
            reason = linear_only_reason
        elif isinstance(m, nn.Conv2d) and not include_conv:
            reason = "Conv2d layers excluded (include_conv=False)"
        elif any(name.startswith(p + ".") for p in inside_mha):
            reason = "inside nn.MultiheadAttention (its weights are read directly, not through forward)"
        else:
            for pat, why in DEFAULT_SKIPS:
                if fnmatch.fnmatchcase(name, pat):
                    reason = why
                    break
            for pat in skip:
                if reason is None and fnmatch.fnmatchcase(name, pat):
                    reason = f"matches skip pattern {pat!r}"
            if reason is None and spec.group_size is not None and _layer_in_len(m) < spec.group_size:
                reason = f"input length {_layer_in_len(m)} < group size {spec.group_size}"
        if reason is None:
            chosen.append(name)
        else:
            skipped[name] = reason
    return chosen, skipped


def quantize(pipe_or_module: Any, spec: QuantSpec | str = "w4a8", skip: list[str] | str | None = None,
             backend: str = "qsched", include_conv: bool = True, keep_packed: bool = False) -> QuantSummary:
    """Quantize the denoiser of a pipeline (``pipe.unet`` / ``pipe.transformer``) or a bare module, in place.

    ``skip``: extra fnmatch patterns on module names, added to :data:`DEFAULT_SKIPS`. ``backend="torchao"``
    uses torchao's ``quantize_`` on Linear layers (w8a16, w8a8; w4a16 on CUDA only; torchao must be installed).
    ``keep_packed=True`` drops the cached float weights (dequantize during each forward).
    Raises ValueError if the denoiser is already quantized or the spec/backend is invalid.
    """
    spec = QuantSpec.parse(spec)
    if backend not in ("qsched", "torchao"):
        raise QSchedError(f"backend must be 'qsched' or 'torchao', got {backend!r}")
    skip_list = [skip] if isinstance(skip, str) else list(skip or [])
    name, denoiser = denoiser_of(pipe_or_module)
    prior = getattr(denoiser, SPEC_ATTR, None)
    if prior is not None or quantized_layers(denoiser):
        raise QSchedError(f"the denoiser is already quantized ({prior or 'contains quantized layers'}); "
                          f"re-quantizing is not supported: reload the full-precision model and quantize it once")
    _refuse_adapters(denoiser)
    before = _state_bytes(denoiser)
    if backend == "torchao":
        return _quantize_torchao(denoiser, name, spec, skip_list, before)

    chosen, skipped = _select_layers(denoiser, spec, skip_list, include_conv)
    memo: dict[int, nn.Module] = {}
    for lname in chosen:
        layer = denoiser.get_submodule(lname)
        if id(layer) not in memo:
            cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
            memo[id(layer)] = cls.from_float(layer, spec, keep_packed=keep_packed)
        _set_submodule(denoiser, lname, memo[id(layer)])
    setattr(denoiser, SPEC_ATTR, spec.name)
    setattr(denoiser, BACKEND_ATTR, "qsched")
    if hasattr(denoiser, "register_to_config"):  # a diffusers model: save_pretrained writes the quantized layout
        if not _DIFFUSERS_MARKER:
            raise ImportError("qsched's diffusers quantizer is not registered (qsched.hf_quantizer failed to import "
                              "with this diffusers; see the warning above): qsched needs diffusers>=0.39")
        _DIFFUSERS_MARKER[0](denoiser, spec, skip_list, include_conv, keep_packed, chosen)
    return QuantSummary(spec=spec, quantized=chosen, skipped=skipped, bytes_before=before,
                        bytes_after=_state_bytes(denoiser), backend="qsched", denoiser=name)


def _refuse_adapters(denoiser: nn.Module) -> None:
    """Unfused (or fused but not unloaded) peft adapters would be quantized as ordinary layers and then lost:
    refuse, saying what to do."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return
    names = [n for n, m in denoiser.named_modules() if isinstance(m, BaseTunerLayer)]
    if names:
        raise QSchedError(f"the denoiser holds {len(names)} peft adapter (LoRA) layers, e.g. {names[0]!r}: call "
                          "pipe.fuse_lora() and pipe.unload_lora_weights() before quantize (quantizing them "
                          "would drop the LoRA)")


def _quantize_torchao(denoiser: nn.Module, name: str | None, spec: QuantSpec, skip: list[str],
                      before: int) -> QuantSummary:
    """torchao backend: int8 weight-only (w8a16), int8 dynamic (w8a8), int4 weight-only (w4a16, CUDA)."""
    supported = "w8a16 (int8 weight-only), w8a8 (int8 dynamic activations + int8 weights), w4a16 (CUDA only)"
    if not spec.symmetric or spec.act_granularity != "per-token":
        raise QSchedError(f"backend='torchao' does not support {spec.name}: only symmetric specs; "
                          f"supported: {supported}")
    if spec.int8_scales:
        raise QSchedError(f"backend='torchao' does not support {spec.name}: torchao derives its own scales, so the "
                          f"int8 scale grid (-i8) is a backend='qsched' format; supported: {supported}")
    key = (spec.weight_bits, spec.act_bits)
    if key not in ((8, 16), (8, 8), (4, 16)) or (spec.weight_bits == 8 and spec.group_size is not None):
        raise QSchedError(f"backend='torchao' does not support {spec.name}; supported: {supported}. "
                          f"Use backend='qsched' (simulated, any spec) instead")
    try:
        p = next(denoiser.parameters())
        device = p.device
    except StopIteration:
        device = torch.device("cpu")
    if key == (4, 16):
        if device.type != "cuda":
            raise QSchedError(f"backend='torchao' w4a16 (int4 weight-only) needs a CUDA device; the denoiser is on "
                              f"{device}. Move it to CUDA first, or use backend='qsched'")
        if spec.group_size not in (32, 64, 128, 256):
            raise QSchedError(f"torchao int4 weight-only supports group sizes 32, 64, 128, 256; got {spec.name}")
    try:
        tq = importlib.import_module("torchao.quantization")
    except ImportError as e:
        raise ImportError("backend='torchao' needs the optional package torchao, which is not installed "
                          "(pip install 'qsched[torchao]'); the default backend='qsched' needs nothing extra") from e
    if key == (8, 16):
        config = tq.Int8WeightOnlyConfig()
    elif key == (8, 8):
        config = tq.Int8DynamicActivationInt8WeightConfig()
    else:
        config = tq.Int4WeightOnlyConfig(group_size=spec.group_size)
    chosen, skipped = _select_layers(denoiser, spec, skip, include_conv=False,
                                     linear_only_reason="torchao backend quantizes Linear layers only")
    selected = set(chosen)
    tq.quantize_(denoiser, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in selected)
    setattr(denoiser, SPEC_ATTR, spec.name)
    setattr(denoiser, BACKEND_ATTR, "torchao")
    # torchao tensor subclasses do not report packed sizes uniformly: estimate from the spec.
    after = before
    for lname in chosen:
        m = denoiser.get_submodule(lname)
        n = m.out_features * m.in_features
        _, ng = _groups(m.in_features, spec.group_size)
        after += -n * 4 + n * spec.weight_bits // 8 + m.out_features * ng * 2
    return QuantSummary(spec=spec, quantized=chosen, skipped=skipped, bytes_before=before, bytes_after=after,
                        backend="torchao", denoiser=name)


def quant_spec_of(pipe_or_module: Any) -> str | None:
    """Canonical spec string (e.g. ``"w4a8"``) of a quantized denoiser, None for full precision."""
    _, denoiser = denoiser_of(pipe_or_module)
    return getattr(denoiser, SPEC_ATTR, None)


def quantized_copy(pipe: Any, spec: "QuantSpec | str", **kwargs: Any) -> tuple[Any, "QuantSummary"]:
    """A pipeline sharing every component of ``pipe`` except its denoiser, which is a quantized deep copy
    (``quantize(copy, spec, **kwargs)``), and its scheduler, which is copied (so schedules installed on one do
    not reach the other). Returns ``(pipeline, summary)``; ``pipe`` is unchanged. The one way qsched makes the
    quantized sibling of a full-precision pipeline."""
    import copy

    name, den = denoiser_of(pipe)
    if name is None:
        raise QSchedError("quantized_copy needs a pipeline; for a bare module use quantize(copy.deepcopy(m), spec)")
    qden = copy.deepcopy(den)
    summary = quantize(qden, spec, **kwargs)
    comps = dict(pipe.components)
    comps[name] = qden
    comps["scheduler"] = copy.deepcopy(pipe.scheduler)
    out = type(pipe)(**comps)
    if getattr(pipe, "name_or_path", None) and hasattr(out, "register_to_config"):
        out.register_to_config(_name_or_path=pipe.name_or_path)  # the same model identity (calibrate records it)
    if hasattr(out, "set_progress_bar_config"):
        out.set_progress_bar_config(disable=True)
    return out, summary


def _trim_heap() -> None:
    """Hand the loader's freed temporary copies back to the OS (glibc keeps them otherwise; ~2x RSS)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass

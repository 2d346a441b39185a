"""The number formats of qsched's quantization: :class:`QuantSpec` (``"w4a8"``, ``"w8a8-pc"``, ...), group-wise
integer weight codes with fp16 scales, their packing (two int4 codes per byte), and per-token activation
fake-quantization. Everything that reads or writes codes (the simulated layers, checkpoints, the int8 kernels)
uses these functions, so they agree bit for bit."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["QuantSpec", "fake_quant_per_token", "quantize_weight", "dequantize_weight"]

_EXAMPLES = "w4a8, w8a8, w4a4, w4a16, w8a16, w4a8-g64, w4a8-asym, w4a16-g128-asym, w4a8-pc"
_DEFAULT = "default"  # sentinel for QuantSpec.group_size
_SCALE_MIN = 2.0**-24  # smallest positive float16 (subnormal)
_SCALE_MAX = 65504.0  # largest float16


# ----------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class QuantSpec:
    """A quantization recipe: weight/activation bit widths, weight group size, weight symmetry.

    ``group_size`` left at its default resolves to 32 for ``weight_bits <= 4`` and ``None`` (one scale per
    output channel) otherwise. ``act_bits=16`` disables activation quantization.
    """

    weight_bits: int = 4
    act_bits: int = 8
    group_size: int | None | str = _DEFAULT
    symmetric: bool = True
    act_granularity: str = "per-token"

    def __post_init__(self) -> None:
        wb = self.weight_bits
        if isinstance(wb, bool) or not isinstance(wb, int) or not 2 <= wb <= 8:
            raise ValueError(f"weight_bits must be an int in 2..8, got {self.weight_bits!r}. Examples: {_EXAMPLES}")
        if isinstance(self.act_bits, bool) or not isinstance(self.act_bits, int) or not 4 <= self.act_bits <= 16:
            raise ValueError(f"act_bits must be an int in 4..16 (16 = no activation quantization), got "
                             f"{self.act_bits!r}. Examples: {_EXAMPLES}")
        if self.group_size == _DEFAULT:
            object.__setattr__(self, "group_size", self.default_group_size(self.weight_bits))
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ValueError(f"group_size must be a positive int or None (per output channel), got {g!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")
        if self.act_granularity != "per-token":
            raise ValueError(f"act_granularity must be 'per-token' (dynamic), got {self.act_granularity!r}")

    @staticmethod
    def default_group_size(weight_bits: int) -> int | None:
        """32 for <= 4-bit weights, None (per output channel) for 5..8-bit weights."""
        return 32 if weight_bits <= 4 else None

    @property
    def quantizes_activations(self) -> bool:
        """False for a16 specs (weight-only quantization)."""
        return self.act_bits < 16

    @property
    def name(self) -> str:
        """Canonical string, e.g. ``"w4a8"``, ``"w4a8-g64-asym"``; ``QuantSpec.parse(spec.name) == spec``."""
        s = f"w{self.weight_bits}a{self.act_bits}"
        if self.group_size != self.default_group_size(self.weight_bits):
            s += "-pc" if self.group_size is None else f"-g{self.group_size}"
        if not self.symmetric:
            s += "-asym"
        return s

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, spec: "str | QuantSpec") -> "QuantSpec":
        """Parse a spec string (grammar in the module docstring); a QuantSpec is returned unchanged."""
        if isinstance(spec, QuantSpec):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"quantization spec must be a string like 'w4a8', got {type(spec).__name__}. "
                             f"Examples: {_EXAMPLES}")
        text = spec.strip().lower()
        m = re.fullmatch(r"w(\d+)a(\d+)((?:-[a-z0-9]+)*)", text)
        if m is None:
            raise ValueError(f"ill-formed quantization spec {spec!r}; expected w<2..8>a<4..16>[-g<N>|-pc][-asym]. "
                             f"Examples: {_EXAMPLES}")
        wb, ab = int(m.group(1)), int(m.group(2))
        group: int | None | str = _DEFAULT
        symmetric = True
        seen: set[str] = set()
        for opt in filter(None, m.group(3).split("-")):
            kind = "g" if re.fullmatch(r"g\d+|pc", opt) else "sym" if opt in ("asym", "sym") else None
            if kind is None:
                raise ValueError(f"unknown option {opt!r} in quantization spec {spec!r}; options are -g<N>, -pc, "
                                 f"-asym, -sym. Examples: {_EXAMPLES}")
            if kind in seen:
                raise ValueError(f"option given twice in quantization spec {spec!r}. Examples: {_EXAMPLES}")
            seen.add(kind)
            if kind == "g":
                group = None if opt == "pc" else int(opt[1:])
            else:
                symmetric = opt == "sym"
        try:
            return cls(weight_bits=wb, act_bits=ab, group_size=group, symmetric=symmetric)
        except ValueError as e:
            raise ValueError(f"invalid quantization spec {spec!r}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields."""
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------ numeric kernels


def fake_quant_per_token(x: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Symmetric dynamic fake quantization: one scale ``max|x| / (2^(bits-1)-1)`` per slice along ``dim``.

    Computed in float32, returned in ``x.dtype``. ``bits >= 16`` returns ``x`` unchanged.
    """
    if bits >= 16 or x.numel() == 0:
        return x
    qmax = 2 ** (bits - 1) - 1
    x32 = x.float()
    scale = x32.abs().amax(dim=dim, keepdim=True).div(qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(x32 / scale).clamp_(-qmax, qmax) * scale).to(x.dtype)


def _groups(k: int, group_size: int | None) -> tuple[int, int]:
    """(group length, number of groups) for a row of length k."""
    g = k if group_size is None else group_size
    return g, math.ceil(k / g)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (rows, n) -> packed uint8: two per byte (low nibble first) for <= 4 bits, else as is."""
    if bits > 4:
        return codes.contiguous()
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def _unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack`: (rows, n) uint8 codes."""
    if bits > 4:
        return packed[:, :n]
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :n]


def _packed_cols(n: int, bits: int) -> int:
    return n if bits > 4 else (n + 1) // 2


def quantize_weight(w2d: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest quantization of a 2-D weight ``(out, k)`` -> (packed codes, fp16 scales, zero points).

    Scales have shape ``(out, n_groups)``; zero points (uint8, same shape) only for asymmetric specs.
    """
    if w2d.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D (out, in) weight, got shape {tuple(w2d.shape)}")
    out, k = w2d.shape
    g, ng = _groups(k, spec.group_size)
    b = spec.weight_bits
    w = F.pad(w2d.detach().float(), (0, ng * g - k)).reshape(out, ng, g)
    if spec.symmetric:
        qmax = 2 ** (b - 1) - 1
        scale16 = (w.abs().amax(-1) / qmax).clamp(_SCALE_MIN, _SCALE_MAX).half()
        q = torch.round(w / scale16.float().unsqueeze(-1)).clamp_(-qmax, qmax) + 2 ** (b - 1)
        zero = None
    else:
        levels = 2**b - 1
        lo = w.amin(-1).clamp(max=0.0)
        hi = w.amax(-1).clamp(min=0.0)
        scale16 = ((hi - lo) / levels).clamp(_SCALE_MIN, _SCALE_MAX).half()
        s = scale16.float()
        zero_f = torch.round(-lo / s).clamp_(0, levels)
        q = (torch.round(w / s.unsqueeze(-1)) + zero_f.unsqueeze(-1)).clamp_(0, levels)
        zero = zero_f.to(torch.uint8)
    codes = q.to(torch.uint8).reshape(out, ng * g)
    return _pack(codes, b), scale16, zero


def dequantize_weight(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
                      k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_weight`: the ``(out, k)`` weight in ``dtype`` (computed in float32)."""
    out, ng = scale.shape
    g, _ = _groups(k, spec.group_size)
    b = spec.weight_bits
    codes = _unpack(packed, b, ng * g).float().reshape(out, ng, g)
    offset = zero.float().unsqueeze(-1) if zero is not None else 2 ** (b - 1)
    w = (codes - offset) * scale.float().unsqueeze(-1)
    return w.reshape(out, ng * g)[:, :k].to(dtype)


# ------------------------------------------------------------------------------------------- layers



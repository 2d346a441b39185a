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

from qsched.errors import QSchedError

__all__ = ["QuantSpec", "fake_quant_per_token", "quantize_weight", "dequantize_weight"]

_EXAMPLES = "w4a8, w8a8, w4a4, w4a16, w8a16, w4a8-g64, w4a8-asym, w4a16-g128-asym, w4a8-pc, w4a8-i8"
_DEFAULT = "default"  # sentinel for QuantSpec.group_size
_SCALE_MIN = 2.0**-24  # smallest positive float16 (subnormal)
_SCALE_MAX = 65504.0  # largest float16
_GRID_BITS = 6  # significant bits of a row's base scale * 16 on the int8 scale grid (-i8)
_GRID_MULT = 16  # largest integer group multiplier on the grid: codes * multiplier <= 7 * 16 = 112 fit int8
_GRID_MAX = 64512.0  # largest float16 with _GRID_BITS significant bits (63 * 2^10)


# ----------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class QuantSpec:
    """A quantization recipe: weight/activation bit widths, weight group size, weight symmetry.

    ``group_size`` left at its default resolves to 32 for ``weight_bits <= 4`` and ``None`` (one scale per
    output channel) otherwise. ``act_bits=16`` disables activation quantization. ``int8_scales`` (spec option
    ``-i8``; symmetric group-wise <= 4-bit weights only) puts each row's group scales on an integer grid,
    ``scale_g = s_row * m_g`` with ``m_g`` in 1..16, so ``codes * m_g`` is one exact int8 weight per output
    channel (see :func:`quantize_weight`); the stored format is unchanged (fp16 scales).
    """

    weight_bits: int = 4
    act_bits: int = 8
    group_size: int | None | str = _DEFAULT
    symmetric: bool = True
    act_granularity: str = "per-token"
    int8_scales: bool = False

    def __post_init__(self) -> None:
        wb = self.weight_bits
        if isinstance(wb, bool) or not isinstance(wb, int) or not 2 <= wb <= 8:
            raise QSchedError(f"weight_bits must be an int in 2..8, got {self.weight_bits!r}. Examples: {_EXAMPLES}")
        if isinstance(self.act_bits, bool) or not isinstance(self.act_bits, int) or not 4 <= self.act_bits <= 16:
            raise QSchedError(f"act_bits must be an int in 4..16 (16 = no activation quantization), got "
                              f"{self.act_bits!r}. Examples: {_EXAMPLES}")
        if self.group_size == _DEFAULT:
            object.__setattr__(self, "group_size", self.default_group_size(self.weight_bits))
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise QSchedError(f"group_size must be a positive int or None (per output channel), got {g!r}")
        if not isinstance(self.symmetric, bool):
            raise QSchedError(f"symmetric must be a bool, got {self.symmetric!r}")
        if self.act_granularity != "per-token":
            raise QSchedError(f"act_granularity must be 'per-token' (dynamic), got {self.act_granularity!r}")
        if not isinstance(self.int8_scales, bool):
            raise QSchedError(f"int8_scales must be a bool, got {self.int8_scales!r}")
        if self.int8_scales:
            why = ("asymmetric weights (zero points)" if not self.symmetric
                   else f"{wb}-bit weights (codes * 16 must fit int8: 2..4 bits)" if wb > 4
                   else "per-channel scales (-pc: there are no group scales to put on a grid)" if g is None
                   else None)
            if why is not None:
                raise QSchedError(f"int8 scale grid (-i8) is for symmetric group-wise 2..4-bit weights, not {why}. "
                                  f"Examples: {_EXAMPLES}")

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
        if self.int8_scales:
            s += "-i8"
        return s

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, spec: "str | QuantSpec") -> "QuantSpec":
        """Parse a spec string (grammar in the module docstring); a QuantSpec is returned unchanged."""
        if isinstance(spec, QuantSpec):
            return spec
        if not isinstance(spec, str):
            raise QSchedError(f"quantization spec must be a string like 'w4a8', got {type(spec).__name__}. "
                              f"Examples: {_EXAMPLES}")
        text = spec.strip().lower()
        m = re.fullmatch(r"w(\d+)a(\d+)((?:-[a-z0-9]+)*)", text)
        if m is None:
            raise QSchedError(f"ill-formed quantization spec {spec!r}; expected "
                              f"w<2..8>a<4..16>[-g<N>|-pc][-asym][-i8]. Examples: {_EXAMPLES}")
        wb, ab = int(m.group(1)), int(m.group(2))
        group: int | None | str = _DEFAULT
        symmetric = True
        int8_scales = False
        seen: set[str] = set()
        for opt in filter(None, m.group(3).split("-")):
            kind = ("g" if re.fullmatch(r"g\d+|pc", opt) else "sym" if opt in ("asym", "sym")
                    else "i8" if opt == "i8" else None)
            if kind is None:
                raise QSchedError(f"unknown option {opt!r} in quantization spec {spec!r}; options are -g<N>, -pc, "
                                  f"-asym, -sym, -i8. Examples: {_EXAMPLES}")
            if kind in seen:
                raise QSchedError(f"option given twice in quantization spec {spec!r}. Examples: {_EXAMPLES}")
            seen.add(kind)
            if kind == "g":
                group = None if opt == "pc" else int(opt[1:])
            elif kind == "i8":
                int8_scales = True
            else:
                symmetric = opt == "sym"
        try:
            return cls(weight_bits=wb, act_bits=ab, group_size=group, symmetric=symmetric, int8_scales=int8_scales)
        except ValueError as e:
            raise QSchedError(f"invalid quantization spec {spec!r}: {e}") from None

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


def _grid_scales(w: torch.Tensor, qmax: int) -> torch.Tensor:
    """fp16 group scales ``(out, ng)`` on the int8 scale grid (``-i8``) of a grouped float32 weight (out, ng, g).

    Per row: ``S = max_g amax_g / qmax`` rounded *up* to ``_GRID_BITS`` significant bits (and to a multiple of
    2^-20, so that ``s = S / 16`` is a multiple of the smallest fp16 subnormal), clamped to [2^-20, 64512];
    each group gets ``s * m_g`` with an integer ``m_g`` in 1..16: of ``floor`` and ``ceil`` of the ideal
    ``amax_g / qmax / s``, the one whose round-to-nearest codes give the group the smaller squared error (``ceil``
    never clips; ``floor`` may clip the group's extremes but rounds the rest finer, which measured clearly better
    than ``ceil`` alone in ``python -m qsched.bench.scale_grid``). The row's largest group gets
    ``m_g = 16`` (what ``ceil`` gives anyway unless the 2^-20 floor coarsened ``S``: rows of weights below
    ~2e-4), so ``s = max_g scale_g / 16`` recovers the base scale from the stored fp16 scales alone
    (:func:`qsched.kernels.scale_grid_plane`). ``S * m_g / 16`` has at most 10 significant bits on the 2^-24
    lattice, so it is an exact fp16 value. All-zero rows get 2^-24 everywhere (then ``s = 2^-28``).
    """
    target = w.abs().amax(-1) / qmax
    big = target.amax(-1, keepdim=True)
    grid = big.clamp(min=2.0**-20)
    quantum = torch.ldexp(torch.ones_like(grid), torch.frexp(grid).exponent - _GRID_BITS).clamp(min=2.0**-20)
    base = (torch.ceil(grid / quantum) * quantum).clamp(max=_GRID_MAX) / _GRID_MULT

    def sse(m: torch.Tensor) -> torch.Tensor:  # squared error of each group quantized with scale base * m
        sc = (base * m).unsqueeze(-1)
        return (torch.round(w / sc).clamp_(-qmax, qmax) * sc - w).square_().sum(-1)

    hi = torch.ceil(target / base).clamp_(1, _GRID_MULT)
    lo = torch.floor(target / base).clamp_(1, _GRID_MULT)
    mult = torch.where(sse(lo) < sse(hi), lo, hi)
    mult = torch.where(target == big, float(_GRID_MULT), mult)
    return torch.where(big > 0, base * mult, _SCALE_MIN).half()  # all-zero rows: the smallest scale, as without


def quantize_weight(w2d: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest quantization of a 2-D weight ``(out, k)`` -> (packed codes, fp16 scales, zero points).

    Scales have shape ``(out, n_groups)``; zero points (uint8, same shape) only for asymmetric specs. With
    ``spec.int8_scales`` the scales lie on the int8 scale grid (:func:`_grid_scales`); the codes are rounded with
    them as usual (and clamped: a grid scale may be a little below the group's ``max|w| / qmax``).
    """
    if w2d.dim() != 2:
        raise QSchedError(f"quantize_weight expects a 2-D (out, in) weight, got shape {tuple(w2d.shape)}")
    out, k = w2d.shape
    g, ng = _groups(k, spec.group_size)
    b = spec.weight_bits
    w = F.pad(w2d.detach().float(), (0, ng * g - k)).reshape(out, ng, g)
    if spec.symmetric:
        qmax = 2 ** (b - 1) - 1
        if spec.int8_scales:
            scale16 = _grid_scales(w, qmax)
        else:
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



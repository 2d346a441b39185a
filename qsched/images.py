"""The one image converter of qsched: every scorer, metric, report and writer reads images through it.

Conventions (one rule each, so no two callers disagree):
- In memory an image batch is a float32 tensor ``(B, C, H, W)`` with values in [0, 1] (not clamped here, so NaN
  or out-of-range images stay detectable).
- A torch tensor is ``(B, C, H, W)`` or one ``(C, H, W)`` image; a numpy array is ``(B, H, W, C)``, one
  ``(H, W, C)`` image (last axis of size 1, 3 or 4), or a grayscale batch ``(B, H, W)``; uint8 data of either kind
  is divided by 255. PIL images (one or a list of the same size and mode) are read as uint8.
- Gray is ITU-R BT.601 luminance (0.299 R + 0.587 G + 0.114 B); alpha is dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qsched.errors import QSchedError

__all__ = ["to_tensor", "to_uint8", "to_gray", "finite_mask", "check_finite"]

_LUMA = (0.299, 0.587, 0.114)


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    if a.ndim == 3:
        a = a[None] if a.shape[-1] in (1, 3, 4) else a[..., None]
    if a.ndim != 4:
        raise QSchedError(f"expected a numpy image array (B, H, W, C), (H, W, C) or (B, H, W), got shape {a.shape}")
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
    return t.float() / 255.0 if a.dtype == np.uint8 else t.float()


def to_tensor(images: Any) -> torch.Tensor:
    """Images as a float32 ``(B, C, H, W)`` tensor in [0, 1] (see the module docstring for accepted inputs)."""
    if isinstance(images, torch.Tensor):
        x = images.detach()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4:
            raise QSchedError(f"expected a (B, C, H, W) tensor, got shape {tuple(images.shape)}")
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if isinstance(images, np.ndarray):
        return _from_numpy(images)
    from PIL import Image

    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)) and images:
        if all(isinstance(im, Image.Image) for im in images):
            arrs = [np.asarray(im) for im in images]
            arrs = [a[:, :, None] if a.ndim == 2 else a for a in arrs]
            if len({a.shape for a in arrs}) != 1:
                raise QSchedError(f"PIL images must share one size and mode, got shapes {[a.shape for a in arrs]}")
            return _from_numpy(np.stack(arrs))
        if all(isinstance(im, (torch.Tensor, np.ndarray)) for im in images):
            return torch.cat([to_tensor(im) for im in images])
    raise QSchedError(f"cannot interpret images of type {type(images).__name__}: expected a (B,C,H,W) tensor, "
                      "a (B,H,W,C) numpy array or a non-empty list of PIL images")


def finite_mask(x: torch.Tensor) -> torch.Tensor:
    """(B,) True where an image holds no NaN/inf."""
    return torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)


def check_finite(x: torch.Tensor, what: str = "images") -> None:
    """Raise ``ValueError`` naming how many of the B items contain NaN or inf."""
    n = int((~finite_mask(x)).sum())
    if n:
        raise QSchedError(f"{n} of {x.shape[0]} {what} contain NaN or inf values; drop or replace them before scoring")


def to_uint8(images: Any) -> np.ndarray:
    """``(B, H, W, C)`` uint8 (NaN -> 0, clamped to [0, 1], rounded) for PNG files and reports."""
    x = torch.nan_to_num(to_tensor(images).cpu(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)


def to_gray(images: Any, size: int | None = None) -> torch.Tensor:
    """``(B, 1, H, W)`` luminance in [0, 1] (clamped), resized to ``size`` x ``size`` (antialiased bilinear) when
    given and different."""
    x = to_tensor(images)
    if x.shape[0] == 0:
        raise QSchedError("got an empty batch of images")
    if x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[1] == 3:
        x = (x * torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] != 1:
        raise QSchedError(f"expected 1, 3 or 4 channels, got {x.shape[1]}")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)

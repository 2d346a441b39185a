"""A second, independent feature extractor for FD on the testbed ("FD2").

The project classifier (``classifier.py``) is both an evaluator and, through its features, the yardstick every
benchmark FD is read in; an evaluator that shares its biases cannot show them. ``Features2Net`` differs from it
in every choice that shapes features: a residual network with strided-convolution downsampling, GroupNorm and
SiLU (the classifier: a plain conv stack with BatchNorm, ReLU and max-pooling), a different seed, and training
with heavy augmentation (random scale/shift, flips, contrast and brightness, cutout; see ``train_features.py``).
Its FD features are multi-scale: the global averages of the 16x16 (32), 8x8 (64) and 4x4 (128) stages,
``FEATURES2_DIM`` = 224 numbers per image, so low- and mid-level texture statistics count, not only the class
evidence the head is trained on. No noise augmentation: a first version trained with Gaussian noise (sigma up
to 0.1) and only the last two stages' averages was nearly blind to noise (FD of 2,000 real test images against
the test set 0.031 clean, 0.051 with sigma 0.05 noise; the classifier's FD 0.17 -> 5.98), the very artifact
multi-step sampling of the testbed student adds.

    from qsched.testbed.features2 import load_features2, features2_fd
    feats = load_features2()(images)    # (B, 224) float64 numpy, images (B, 1, 32, 32) in [0, 1]
    fd2 = features2_fd(images)          # FD against the real 10k test set (weights/fd2_ref_test.safetensors)

Weights: ``weights/features2.{safetensors,json}``, reference statistics ``weights/fd2_ref_test.safetensors``, both
written by ``python -m qsched.testbed.train_features``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from qsched.frechet import feature_stats, frechet_distance, load_stats
from qsched.testbed.metrics import to_gray32
from qsched.testbed.weights_io import WEIGHTS_DIR, load_net

STEM = "features2"
FD2_REF_FILE = "fd2_ref_test.safetensors"
FEATURES2_DIM = 224
TRAIN_CMD = "python -m qsched.testbed.train_features"


class _ResBlock(nn.Module):
    """Pre-activation residual block: GroupNorm -> SiLU -> conv, twice."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.net = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                                 nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class Features2Net(nn.Module):
    """32x32x1 -> stem -> three stages (stride-2 conv + residual block: 16x16, 8x8, 4x4) -> GAP -> 10 logits.

    ``features`` returns the global averages of the three stages (after GroupNorm + SiLU), concatenated.
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), groups: int = 8, num_classes: int = 10,
                 dropout: float = 0.2):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        self.config = {"widths": list(widths), "groups": groups, "num_classes": num_classes, "dropout": dropout}
        w0 = widths[0] // 2
        self.stem = nn.Conv2d(1, w0, 3, padding=1)
        stages, c_in = [], w0
        for w in widths:
            stages.append(nn.Sequential(nn.Conv2d(c_in, w, 3, stride=2, padding=1), _ResBlock(w, groups)))
            c_in = w
        self.stages = nn.ModuleList(stages)
        self.outs = nn.ModuleList([nn.Sequential(nn.GroupNorm(groups, w), nn.SiLU()) for w in widths])
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], num_classes)

    def _pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected images (B, 1, H, W), got shape {tuple(x.shape)}")
        h = self.stem(x * 2 - 1)
        pooled = []
        for i, stage in enumerate(self.stages):
            h = stage(h)
            pooled.append(self.outs[i](h).mean(dim=(2, 3)))
        return pooled

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 224) multi-scale features of images (B, 1, 32, 32) in [0, 1]."""
        return torch.cat(self._pooled(x), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits (from the last stage's pooled features)."""
        return self.fc(self.drop(self._pooled(x)[-1]))


def load_features2_net(device: str | torch.device = "cpu", weights_dir: str | Path | None = None) -> Features2Net:
    """The shipped (or ``weights_dir``'s) extractor network in eval mode."""
    return load_net(Features2Net, STEM, weights_dir, TRAIN_CMD, device)


def load_features2(device: str | torch.device = "cpu", weights_dir: str | Path | None = None,
                   batch_size: int = 500) -> Callable[[Any], np.ndarray]:
    """A function images -> (B, 224) float64 features, for FD in a feature space the classifier does not share.

    Images: anything ``metrics.to_gray32`` accepts (tensor (B, 1|3, 32, 32) or numpy / PIL, values in [0, 1]);
    non-finite images raise ``ValueError``.
    """
    net = load_features2_net(device, weights_dir)
    dev = torch.device(device)

    @torch.no_grad()
    def features(images: Any) -> np.ndarray:
        x = to_gray32(images)
        out = [net.features(x[i:i + batch_size].to(dev)).double().cpu() for i in range(0, x.shape[0], batch_size)]
        return torch.cat(out).numpy()

    return features


@lru_cache(maxsize=1)
def features2_reference() -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of the real 10k test set (``weights/fd2_ref_test.safetensors``)."""
    mu, sigma, _ = load_stats(WEIGHTS_DIR / FD2_REF_FILE)
    return mu, sigma


@lru_cache(maxsize=1)
def _default_features() -> Callable[[Any], np.ndarray]:
    return load_features2()


def features2_fd(images: Any) -> float:
    """FD of images against the real 10k test set in the features2 space (needs >= 2 images)."""
    mu, sigma = feature_stats(_default_features()(images))
    return frechet_distance(mu, sigma, *features2_reference())


__all__ = ["Features2Net", "load_features2", "load_features2_net", "features2_fd", "features2_reference", "FEATURES2_DIM", "FD2_REF_FILE"]

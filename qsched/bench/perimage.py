"""Per-image evaluation records of the benchmark's rows (for paired bootstraps, :mod:`qsched.paired`).

A record is what :func:`qsched.evaluate.evaluate` already keeps per image (``EvalResult.per_image``) from the
standard metrics: classifier features ("fd"), correctness ("accuracy"), JAQ and, where the env has an independent
extractor, its features ("fd2"). :func:`record_metrics` builds those metrics from the env; :func:`eval_record_unit`
stores a row's record as ``per_image.safetensors`` in the unit directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from qsched.metrics import AccuracyMetric, EvalMetric, FrechetMetric, JAQMetric
from qsched.paired import PerImage, load_per_image, save_per_image

__all__ = ["record_metrics", "eval_record_unit", "load_record", "row_fd"]


def record_metrics(env: Any, have: Sequence[EvalMetric] = ()) -> list[EvalMetric]:
    """The metrics a record needs ("fd", "accuracy", "jaq", and "fd2" where ``env.features2`` is set), built from
    ``env.evaluator`` / ``env.jaq`` / ``env.features2``; keys that a metric in ``have`` already produces are left
    out, so no feature is computed twice."""
    got = {k for m in have for k in (m.keys or ())}
    ev = env.evaluator()
    out: list[EvalMetric] = []
    if "fd" not in got:
        out.append(FrechetMetric("fd", ev.features, lambda: ev.reference))
    if "accuracy" not in got:
        out.append(AccuracyMetric(ev.predict))
    if "jaq" not in got:
        out.append(JAQMetric(env.jaq()))
    if env.features2 is not None and "fd2" not in got:
        f2, ref2 = env.features2()
        out.append(FrechetMetric("fd2", f2, lambda: ref2))
    return out


def eval_record_unit(run: Callable[[Path], tuple[dict[str, Any], PerImage]]) -> Callable[[Path], dict[str, Any]]:
    """A unit's compute: ``run(directory)`` evaluates one row and returns (the unit's result dict, the row's
    per-image record); the record is saved beside it and named in the result (``file``, with ``n`` images)."""

    def compute(d: Path) -> dict[str, Any]:
        out, rec = run(d)
        path = save_per_image(d / "per_image.safetensors", rec)
        return {**out, "file": str(path.resolve()), "n": int(len(rec["finite"]))}

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

"""Paired comparisons of two evaluation rows over the same images, with bootstrap 95% CIs.

Every evaluation row is generated from the same prompts and per-image seeds (:mod:`qsched.runner`), so two rows
can be compared image by image: one resample of image indices is applied to both rows, and each metric's
difference ``b - a`` is recomputed on it (FD/FID from the resampled features, accuracy and JAQ as means). The
percentile interval of those differences is the paired bootstrap CI; resampling images together removes the
prompt-to-prompt spread that two unpaired intervals would carry.

A per-image record (:data:`PerImage`) is a dict of aligned arrays over the row's images: ``finite`` (bool),
``accuracy`` (bool, correct class), ``jaq`` (TC + k IQ per image) and, for each Frechet metric (``fd``, ``fd2``,
``fid``), its ``(N, D)`` features (rows of non-finite images are ignored). :meth:`qsched.metrics.EvalMetric.per_image`
produces them; :func:`save_per_image` / :func:`load_per_image` store them as safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from qsched.errors import QSchedError

__all__ = ["PerImage", "paired_cis", "comparison_lines", "format_ci", "save_per_image", "load_per_image", "N_BOOT",
           "LOWER_IS_BETTER"]

PerImage = dict[str, np.ndarray]
N_BOOT = 300
LOWER_IS_BETTER = ("fd", "fd2", "fid")
_LEGACY = {"features": "fd", "features2": "fd2", "correct": "accuracy"}  # the default path's first files


def _fd(feats: np.ndarray, ok: np.ndarray, ref: Any) -> float:
    return ref.distance_of_features(feats[ok]) if int(ok.sum()) >= 2 else float("nan")


def paired_cis(a: PerImage, b: PerImage, refs: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
               n_boot: int = N_BOOT, seed: int = 0) -> dict[str, dict[str, float]]:
    """``b - a`` for every metric both records have, each with a paired percentile bootstrap 95% CI over images.

    Frechet metrics need their reference (mu, sigma) in ``refs`` (keyed like the record: "fd", "fd2", "fid");
    those without one, or with fewer than 2 finite images in a row, are skipped (a resample with fewer than 2 is left
    out of the interval). Returns ``{metric: {"diff", "ci_low", "ci_high"}}``.
    """
    from qsched.frechet import FrechetReference

    n = len(a["finite"])
    if len(b["finite"]) != n:
        raise QSchedError(f"paired rows must have the same images, got {n} and {len(b['finite'])}")
    if n < 2:
        raise QSchedError("a paired bootstrap needs at least 2 images")
    fa, fb = a["finite"].astype(bool), b["finite"].astype(bool)
    frechet = {k: FrechetReference(*refs[k]) for k in LOWER_IS_BETTER
               if k in a and k in b and refs is not None and k in refs and min(fa.sum(), fb.sum()) >= 2}
    means = [k for k in ("accuracy", "jaq") if k in a and k in b]

    def diffs(idx: np.ndarray) -> dict[str, float]:
        out = {k: _fd(b[k][idx], fb[idx], r) - _fd(a[k][idx], fa[idx], r) for k, r in frechet.items()}
        out.update({k: float(np.mean(b[k][idx], dtype=np.float64) - np.mean(a[k][idx], dtype=np.float64))
                    for k in means})
        return out

    point = diffs(np.arange(n))
    rng = np.random.default_rng(seed)
    boots: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        for k, v in diffs(rng.integers(0, n, n)).items():
            boots[k].append(v)
    res = {}
    for k, v in point.items():
        ok = np.isfinite(boots[k])
        lo, hi = np.percentile(np.asarray(boots[k])[ok], [2.5, 97.5]) if ok.any() else (float("nan"),) * 2
        res[k] = {"diff": float(v), "ci_low": float(lo), "ci_high": float(hi)}
    return res


def format_ci(d: dict[str, float], nd: int = 2) -> str:
    """``"diff [low, high]"`` of one paired difference, signed, ``nd`` decimals."""
    return f"{d['diff']:+.{nd}f} [{d['ci_low']:+.{nd}f}, {d['ci_high']:+.{nd}f}]"


def comparison_lines(comparisons: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """A Markdown table of paired differences: one row per comparison, "diff [low, high]" per metric, and a
    verdict per metric where the CI excludes 0 (FD/FID: lower is better)."""
    keys = [k for k in ("fd", "fd2", "fid", "accuracy", "jaq") if any(k in c for c in comparisons.values())]
    lines = ["| B vs A | " + " | ".join(f"delta {k}" for k in keys) + " | beyond noise |",
             "|---|" + "---|" * (len(keys) + 1)]
    for name, c in comparisons.items():
        cells, verdict = [], []
        for k in keys:
            if k not in c:
                cells.append("-")
                continue
            d = c[k]
            nd = 3 if k == "accuracy" else 2
            cells.append(format_ci(d, nd))
            if d["ci_low"] > 0 or d["ci_high"] < 0:
                better = (d["diff"] < 0) == (k in LOWER_IS_BETTER)
                verdict.append(f"{k} {'better' if better else 'worse'}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {', '.join(verdict) or 'none'} |")
    return lines


def save_per_image(path: str | Path, rec: PerImage) -> Path:
    """Write a per-image record as safetensors (features as float32), atomically."""
    import os

    from safetensors.numpy import save_file

    path = Path(path)
    arrays = {k: (np.asarray(v, np.float32) if np.asarray(v).ndim == 2 else
                  np.asarray(v, np.uint8) if k in ("finite", "accuracy") else np.asarray(v, np.float64))
              for k, v in rec.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(arrays, str(tmp))
    os.replace(tmp, path)
    return path


def load_per_image(path: str | Path) -> PerImage:
    """Read a record written by :func:`save_per_image` (or by the default-path section's first version)."""
    from safetensors.numpy import load_file

    from qsched.errors import CorruptFileError

    try:
        d = load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types
        raise CorruptFileError(f"{path} is not a per-image record ({e})") from None
    d = {_LEGACY.get(k, k): v for k, v in d.items()}
    if "finite" not in d:
        raise CorruptFileError(f"{path} is not a per-image record (no 'finite' array)")
    return {k: (v.astype(np.float64) if v.ndim == 2 else v.astype(bool) if k in ("finite", "accuracy") else v)
            for k, v in d.items()}

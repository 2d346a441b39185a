"""Validation of a calibrated schedule on prompts and seeds it was not searched on, and the do-no-harm rule.

A candidate schedule and the identity schedule generate images for the same validation prompts and seeds; the
per-prompt JAQ differences (averaged over seeds) are the paired sample. Their mean is the validation gain, with a
bootstrap confidence interval over prompts (``scipy.stats.bootstrap``, BCa). When several candidates are
validated on the same prompts the interval is widened for the number of candidates (Bonferroni), so picking
the best of them does not manufacture a "significant" gain. A candidate is kept only when its interval's lower
end is above zero; otherwise the original schedule is kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["Gain", "paired_gain", "per_prompt_means"]


@dataclass(frozen=True)
class Gain:
    """Mean paired difference (candidate - baseline) over ``n`` prompts with its confidence interval."""

    mean: float
    ci_low: float
    ci_high: float
    n: int
    confidence: float

    @property
    def reliable(self) -> bool:
        """True when the interval excludes zero from below (a gain, not noise)."""
        return self.ci_low > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def per_prompt_means(values: Sequence[float], n_prompts: int) -> np.ndarray:
    """Per-prompt means of seed-major per-image values (all prompts for seed 0, then seed 1, ...)."""
    v = np.asarray(values, dtype=np.float64)
    if n_prompts < 1 or v.size % n_prompts:
        raise ValueError(f"{v.size} per-image values do not split into {n_prompts} prompts")
    return v.reshape(-1, n_prompts).mean(axis=0)


def paired_gain(candidate: Sequence[float], baseline: Sequence[float], confidence: float = 0.95,
                n_resamples: int = 4999, seed: int = 0) -> Gain:
    """Mean of ``candidate - baseline`` (paired per prompt) with a BCa bootstrap interval at ``confidence``."""
    from scipy.stats import bootstrap

    d = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    if d.ndim != 1 or d.size < 2:
        raise ValueError(f"a paired bootstrap needs at least 2 paired values, got {d.size}")
    if not np.isfinite(d).all():
        raise ValueError("paired values contain NaN or inf")
    mean = float(d.mean())
    if np.ptp(d) < 1e-12:  # no spread: the interval is the point (bootstrap would be degenerate)
        return Gain(mean, mean, mean, int(d.size), float(confidence))
    res = bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="BCa",
                    random_state=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # BCa can fail on tiny or skewed samples
        res = bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                        random_state=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return Gain(mean, lo, hi, int(d.size), float(confidence))

"""Validation of a calibrated schedule on prompts and seeds it was not searched on, and the do-no-harm rule.

A candidate schedule and the identity schedule generate images for the same validation prompts and seeds; the
per-prompt JAQ differences (averaged over seeds) are the paired sample. Their mean is the validation gain, with a
bootstrap confidence interval over prompts (``scipy.stats.bootstrap``, BCa). When several candidates are
validated on the same prompts the interval is widened for the number of candidates (Bonferroni), so picking
the best of them does not manufacture a "significant" gain. A candidate is kept only when its interval's lower
end is above zero; otherwise the original schedule is kept.

TC (text-image alignment) and IQ (image quality) get their own paired intervals too, and the verdict says when
one of them fell reliably while JAQ rose. That is reported, not a veto: on the testbed the schedules that traded
TC -0.3 for IQ +0.4 (1-step W8A8/W4A8) made held-out FD and class accuracy *better* (BENCHMARKS.md, "Default
path"), so a veto would only have thrown away gains.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from qsched.errors import QSchedError
from qsched.schedule import Schedule

if TYPE_CHECKING:
    from qsched.scoring import JAQScore

__all__ = ["Gain", "paired_gain", "per_prompt_means", "validate", "candidate", "verdict"]


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
        raise QSchedError(f"{v.size} per-image values do not split into {n_prompts} prompts")
    return v.reshape(-1, n_prompts).mean(axis=0)


def paired_gain(candidate: Sequence[float], baseline: Sequence[float], confidence: float = 0.95,
                n_resamples: int = 4999, seed: int = 0) -> Gain:
    """Mean of ``candidate - baseline`` (paired per prompt) with a BCa bootstrap interval at ``confidence``."""
    from scipy.stats import bootstrap

    d = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    if d.ndim != 1 or d.size < 2:
        raise QSchedError(f"a paired bootstrap needs at least 2 paired values, got {d.size}")
    if not np.isfinite(d).all():
        raise QSchedError("paired values contain NaN or inf")
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


def validate(run_schedule: Callable[..., JAQScore], cands: dict[str, Schedule], prompts: list[str],
              seeds: list[int], steps: int, confidence: float) -> dict[str, Any]:
    """Score the identity and every candidate on the validation prompts/seeds; paired gains with intervals
    widened (Bonferroni) for the number of candidates. Per-prompt TC and IQ (means over seeds) are kept in the
    record, so the decision can be re-examined offline (e.g. under another weighting of TC and IQ)."""
    def per_prompt(s: JAQScore) -> dict[str, np.ndarray]:
        tc, iq = np.asarray(s.tc_per_image), np.asarray(s.iq_per_image)
        return {"jaq": per_prompt_means(tc + s.k * iq, len(prompts)), "tc": per_prompt_means(tc, len(prompts)),
                "iq": per_prompt_means(iq, len(prompts))}

    ident = run_schedule(Schedule.identity(steps), prompts, seeds)
    base = per_prompt(ident)
    level = 1 - (1 - confidence) / max(1, len(cands))
    rows = []
    for name, sched in cands.items():
        sc = run_schedule(sched, prompts, seeds)
        pp = per_prompt(sc)
        gain = paired_gain(pp["jaq"], base["jaq"], confidence=level)
        parts = {k: paired_gain(pp[k], base[k], confidence=level) for k in ("tc", "iq")}
        worse = [k for k, g in parts.items() if g.ci_high < 0]
        rows.append({"name": name, "schedule": sched.to_dict(), "jaq": sc.jaq, "tc": sc.tc, "iq": sc.iq,
                     "gain": gain.to_dict(), "tc_gain": parts["tc"].to_dict(), "iq_gain": parts["iq"].to_dict(),
                     "worse": worse, "per_prompt": {k: pp[k].tolist() for k in ("tc", "iq")}})
    best = max(rows, key=lambda r: r["gain"]["mean"])["name"] if rows else None
    return {"prompts": prompts, "seeds": seeds, "confidence": confidence, "interval_level": level,
            "identity": {"jaq": ident.jaq, "tc": ident.tc, "iq": ident.iq,
                         "per_prompt": {k: base[k].tolist() for k in ("tc", "iq")}}, "candidates": rows,
            "best_candidate": best}


def candidate(validation: dict[str, Any], name: str | None) -> dict[str, Any] | None:
    """The validated candidate called ``name`` (None if absent)."""
    return next((c for c in validation["candidates"] if c["name"] == name), None)


def _fell(row: dict[str, Any]) -> str:
    """", although <part> fell by x (CI a to b)" for each part of JAQ the candidate made reliably worse."""
    names = {"tc": "text-image alignment (TC)", "iq": "image quality (IQ)"}
    parts = [f"{names[k]} fell by {-row[k + '_gain']['mean']:.2f} (CI {row[k + '_gain']['ci_low']:+.2f} to "
             f"{row[k + '_gain']['ci_high']:+.2f})" for k in row.get("worse") or []]
    return (", although " + " and ".join(parts)) if parts else ""


def verdict(res: Any, out: Path | None = None) -> str:
    """The result in one plain sentence."""
    where = f"; schedule saved to {out}" if out is not None else ""
    v = res.validation
    if v is None:
        if res.decision == "identity":
            return f"no schedule beat the original on the search prompts: kept the original schedule{where}"
        return (f"Q-Sched improves JAQ on {len(res.prompts)} search prompts by {res.improvement:+.2f} "
                f"(not validated on other prompts){where}")
    n = len(v["prompts"])
    best = candidate(v, v["best_candidate"])
    if res.decision == "qsched":
        g = best["gain"]
        return (f"Q-Sched ({res.chosen}) improves JAQ on {n} validation prompts by {g['mean']:+.2f} "
                f"({100 * v['confidence']:.0f}% CI {g['ci_low']:+.2f} to {g['ci_high']:+.2f}){_fell(best)}{where}")
    if best is None:
        return f"no candidate differs from the original schedule: kept the original schedule{where}"
    g = best["gain"]
    kept = "kept the original schedule" if res.decision == "identity" else f"kept {res.chosen} anyway (do_no_harm off)"
    return (f"no reliable gain on {n} validation prompts (best: {v['best_candidate']} {g['mean']:+.2f}, "
            f"CI {g['ci_low']:+.2f} to {g['ci_high']:+.2f}): {kept}{_traded(v)}{where}")


def _traded(v: dict[str, Any]) -> str:
    """", although <cand> raised IQ by x (CI) while TC fell by y (CI)" for the candidate with the largest reliable
    IQ gain whose JAQ gain was not reliable because alignment fell: the user sees what was traded and can judge it
    (on the testbed such schedules improved held-out FD while TC's change depended on the prompts' wording:
    BENCHMARKS.md, "What validation cannot see")."""
    rows = [c for c in v["candidates"] if c.get("iq_gain") and c.get("tc_gain") and c["iq_gain"]["ci_low"] > 0
            and c["tc_gain"]["mean"] < 0 and c["gain"]["ci_low"] <= 0]
    if not rows:
        return ""
    c = max(rows, key=lambda r: r["iq_gain"]["mean"])
    q, t = c["iq_gain"], c["tc_gain"]
    return (f", although {c['name']} raised image quality (IQ) reliably by {q['mean']:+.3f} (CI {q['ci_low']:+.3f} "
            f"to {q['ci_high']:+.3f}) while text-image alignment (TC) changed by {t['mean']:+.2f} (CI "
            f"{t['ci_low']:+.2f} to {t['ci_high']:+.2f}); --no-do-no-harm would keep the best-JAQ candidate "
            f"({v['best_candidate']}) anyway")

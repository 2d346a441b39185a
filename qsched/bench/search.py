"""Section 2 of the benchmark, search cost: the paper's exhaustive grid over the linear parametrization against
Optuna TPE (several sampler seeds), as best calibration JAQ per denoiser forwards spent."""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable

from qsched.bench.env import BenchEnv, Models
from qsched.bench.quality import SEED_RULE, calibrate_unit
from qsched.bench.settings import BenchSettings
from qsched.bench.units import Job, UnitStore, config_hash

__all__ = ["section_search", "curve", "evals_to_reach", "median_with_misses"]


def curve(trials: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(cumulative denoiser forwards, best JAQ so far) over completed trials, in trial order."""
    evals, best, xs, ys = 0, -math.inf, [], []
    for t in sorted(trials, key=lambda t: t["number"]):
        if t.get("state") != "COMPLETE" or t.get("jaq") is None:
            continue
        evals += int(t.get("model_evals") or 0)
        best = max(best, float(t["jaq"]))
        xs.append(evals)
        ys.append(best)
    return xs, ys


def evals_to_reach(xs: list[int], ys: list[float], target: float) -> int | None:
    """Forwards spent when the curve first reaches ``target`` (None: never)."""
    for x, y in zip(xs, ys):
        if y >= target - 1e-12:
            return x
    return None


def section_search(s: BenchSettings, env: BenchEnv, models: Models, units: UnitStore, R: dict[str, Any],
                   write: Callable[[], None]) -> None:
    """Run (or reuse) the grid and the TPE runs and put the curves and the forwards-to-target into ``R["search"]``."""
    from qsched.prompts import load_prompts

    units.console.rule("[bold]2. Search cost: grid vs Optuna TPE")
    calib = load_prompts("testbed-calib", s.calib_prompts)
    base = {"env": env.key, "calib_prompts_sha1": config_hash(calib.prompts), "calib_seed": s.calib_seed,
            "steps": s.search_steps, "precision": s.search_spec, "parametrization": "linear",
            "grid_range": list(s.grid_range), "seed_rule": SEED_RULE}
    jobs = [Job("search", f"grid{s.grid_points}", {**base, "kind": "grid", "grid_points": s.grid_points},
                calibrate_unit(models, env, calib.prompts, s.search_steps, s.search_spec, "linear",
                               strategy="grid", n_trials=None, s=s, grid_points=s.grid_points, keep_trials=True),
                f"grid {s.grid_points}x{s.grid_points} ({s.grid_points ** 2 + 1} trials)")]
    jobs += [Job("search", f"tpe-seed{seed}", {**base, "kind": "tpe", "n_trials": s.search_trials,
                                               "sampler_seed": seed},
                 calibrate_unit(models, env, calib.prompts, s.search_steps, s.search_spec, "linear",
                                strategy="optuna", n_trials=s.search_trials, s=s, sampler_seed=seed,
                                keep_trials=True),
                 f"Optuna TPE seed {seed} ({s.search_trials} trials)") for seed in s.search_seeds]
    grid, *tpe_runs = units.run_all(jobs)
    gx, gy = curve(grid["trials"])
    out: dict[str, Any] = {"grid": {"points": s.grid_points, "evals": gx[-1] if gx else 0,
                                    "best_jaq": gy[-1] if gy else None,
                                    "naive_jaq": (grid.get("naive") or {}).get("jaq"),
                                    "best_params": grid["best"].get("params"), "curve": [gx, gy],
                                    "n_trials": grid["n_trials"]},
                           "tpe": {}, "steps": s.search_steps, "spec": s.search_spec,
                           "prompts": len(calib.prompts)}
    R["search"] = out
    for seed, r in zip(s.search_seeds, tpe_runs):
        x, y = curve(r["trials"])
        gbest = out["grid"]["best_jaq"]
        out["tpe"][str(seed)] = {"curve": [x, y], "best_jaq": y[-1] if y else None, "evals": x[-1] if x else 0,
                                 "best_params": r["best"].get("params"),
                                 "to_within_0.05": evals_to_reach(x, y, gbest - 0.05) if gbest is not None else None,
                                 "to_exact": evals_to_reach(x, y, gbest) if gbest is not None else None}
    ge = out["grid"]["evals"] or 1
    for key in ("to_within_0.05", "to_exact"):
        vals = [v[key] for v in out["tpe"].values()]
        med = median_with_misses(vals)
        out[f"median_{key}"] = med
        out[f"median_{key}_pct"] = None if med is None else 100.0 * med / ge
        out[f"reached_{key}"] = sum(v is not None for v in vals)
    write()


def median_with_misses(vals: list[int | None]) -> float | None:
    """Median counting a miss as +inf; None when the median itself is a miss."""
    if not vals:
        return None
    v = sorted(math.inf if x is None else float(x) for x in vals)
    m = statistics.median(v)
    return None if math.isinf(m) else m

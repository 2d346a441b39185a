"""Section "default path": what a user gets from the default main job, with its spread.

For each (steps, spec) and each of ``default_draws`` calibration draws (a different shuffle of the
``testbed-calib`` prompts and a different search seed per draw), the default ``qsched calibrate`` runs (auto
parametrization, validation, do no harm: :mod:`qsched.defaults`); the chosen schedule and the original schedule
then generate the same held-out images (prompts never seen by calibration, same seeds), and the differences are
reported with paired bootstrap 95% CIs over images: FD (features of the testbed classifier, recomputed per
resample), class accuracy and held-out JAQ. A draw whose calibration kept the original schedule differs by
exactly 0. The summary counts how often do-no-harm kept the identity and whether any draw made FD or accuracy
worse beyond noise (a CI entirely on the bad side).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from qsched.bench.env import BenchEnv, Models
from qsched.bench.settings import BenchSettings
from qsched.bench.units import Job, UnitStore, config_hash
from qsched.metrics import EvalMetric

__all__ = ["section_default", "paired_image_cis", "render_default"]

_N_BOOT = 300


def _calib_unit(models: Models, env: BenchEnv, steps: int, spec: str, draw: int, s: BenchSettings) -> Callable:
    def compute(d: Path) -> dict[str, Any]:
        from qsched import defaults
        from qsched.calibrate import calibrate
        from qsched.prompts import load_prompts

        n_s, n_v = s.default_search_prompts, s.default_val_prompts
        both = load_prompts("testbed-calib", n_s + n_v, seed=draw)
        res = calibrate(models.pipe(spec), both.prompts[:n_s], steps, validation_prompts=both.prompts[n_s:],
                        validation_seeds=defaults.VALIDATION_SEEDS, seeds=defaults.SEARCH_SEEDS, jaq=env.jaq(),
                        parametrization=defaults.PARAMETRIZATION, n_trials=s.default_trials, sampler_seed=draw,
                        out_dir=d, progress=s.progress, model_name=env.name, call_kwargs=env.call_kwargs() or None)
        return {"schedule": res.schedule.to_dict(), "decision": res.decision, "chosen": res.chosen,
                "validation_gain": res.validation_gain, "verdict": res.verdict, "wall_time_s": res.wall_time_s,
                "model_evals": res.model_evals, "prompts_sha1": config_hash(both.prompts)}

    return compute


class _PerImage(EvalMetric):
    """An evaluation metric keeping per-image features, correctness and JAQ (for paired bootstraps). Non-finite
    images count as wrong and are left out of FD (their features, of the NaN-zeroed image, are masked)."""

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


def _eval_unit(models: Models, env: BenchEnv, prompts: Any, steps: int, spec: str, schedule: dict | None,
               s: BenchSettings) -> Callable:
    def compute(d: Path) -> dict[str, Any]:
        from safetensors.numpy import save_file

        from qsched.evaluate import evaluate
        from qsched.schedule import Schedule

        f2 = env.features2() if env.features2 is not None else None
        metric = _PerImage(env.evaluator(), env.jaq(), f2[0] if f2 else None)
        sched = Schedule.from_dict(schedule) if schedule is not None else None
        cfg = "quant-qsched" if sched is not None else "quant-naive"
        evaluate(model=env.model, spec=spec, steps=steps, qsched_schedule=sched, prompts=prompts,
                 n_images=s.default_images, seed=s.eval_seed, batch_size=s.eval_batch, metrics=[metric],
                 configs=[cfg], pipe_loader=lambda: models.fp, progress=s.progress, n_samples=0)
        arrays = {"features": np.concatenate(metric._s_feats), "correct": np.asarray(metric._s_correct, np.uint8),
                  "jaq": np.asarray(metric._s_jaq, np.float64), "finite": np.asarray(metric._s_finite, np.uint8)}
        if metric._s_feats2:
            arrays["features2"] = np.concatenate(metric._s_feats2)
        tmp = d / ".per_image.safetensors.tmp"
        save_file(arrays, str(tmp))
        tmp.replace(d / "per_image.safetensors")
        return {"file": str((d / "per_image.safetensors").resolve()), "n": int(arrays["jaq"].shape[0])}

    return compute


def _load(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def _fd(feats: np.ndarray, ok: np.ndarray, ref: Any) -> float:
    from qsched.frechet import FrechetReference, feature_stats

    ref = ref if isinstance(ref, FrechetReference) else FrechetReference(*ref)
    return ref.distance(*feature_stats(feats[ok]))


def paired_image_cis(a: dict[str, np.ndarray], b: dict[str, np.ndarray], ref: tuple[np.ndarray, np.ndarray],
                     n_boot: int = _N_BOOT, seed: int = 0,
                     ref2: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """``b - a`` for FD (and FD2 in the independent extractor's features when both rows have them and ``ref2`` is
    given), accuracy and JAQ over the same images, each with a paired percentile bootstrap 95% CI (the same
    resampled image indices for both; FD recomputed on every resample)."""
    n = len(a["jaq"])
    if len(b["jaq"]) != n:
        raise ValueError(f"paired rows must have the same images, got {n} and {len(b['jaq'])}")
    from qsched.frechet import FrechetReference

    rng = np.random.default_rng(seed)
    ref = FrechetReference(*ref)
    ref2 = FrechetReference(*ref2) if ref2 is not None else None
    fa, fb = a["finite"].astype(bool), b["finite"].astype(bool)
    out: dict[str, dict[str, float]] = {}
    point = {"fd": _fd(b["features"], fb, ref) - _fd(a["features"], fa, ref),
             "accuracy": float(b["correct"].mean() - a["correct"].mean()),
             "jaq": float(b["jaq"].mean() - a["jaq"].mean())}
    two = ref2 is not None and "features2" in a and "features2" in b
    if two:
        point["fd2"] = _fd(b["features2"], fb, ref2) - _fd(a["features2"], fa, ref2)
    boots = {k: [] for k in point}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        boots["fd"].append(_fd(b["features"][idx], fb[idx], ref) - _fd(a["features"][idx], fa[idx], ref))
        if two:
            boots["fd2"].append(_fd(b["features2"][idx], fb[idx], ref2) - _fd(a["features2"][idx], fa[idx], ref2))
        boots["accuracy"].append(float(b["correct"][idx].mean() - a["correct"][idx].mean()))
        boots["jaq"].append(float(b["jaq"][idx].mean() - a["jaq"][idx].mean()))
    for k, v in point.items():
        lo, hi = np.percentile(boots[k], [2.5, 97.5])
        out[k] = {"diff": float(v), "ci_low": float(lo), "ci_high": float(hi)}
    return out


def section_default(s: BenchSettings, env: BenchEnv, models: Models, units: UnitStore, R: dict[str, Any],
                    write: Callable[[], None], table: bool = True) -> None:
    """Run (or reuse) the default-path units and put them into ``R["default"]`` (``table=False``: only the units,
    for a helper process; the bootstraps run once, in the main process)."""
    from qsched import defaults
    from qsched.prompts import load_prompts

    con = units.console
    con.rule("[bold]Default path: the default calibrate, then held-out evaluation")
    specs = list(s.default_specs)
    evalp = load_prompts("testbed-heldout", n=s.default_images, seed=0)
    keys = [(st, sp, dr) for st in s.steps for sp in specs for dr in range(s.default_draws)]
    base = {"env": env.name, "search": s.default_search_prompts, "val": s.default_val_prompts,
            "trials": s.default_trials, "val_seeds": list(defaults.VALIDATION_SEEDS),
            "search_seeds": list(defaults.SEARCH_SEEDS), "parametrization": defaults.PARAMETRIZATION,
            "defaults": "qsched.defaults/2"}
    calp = {dr: config_hash(load_prompts("testbed-calib", s.default_search_prompts + s.default_val_prompts,
                                         seed=dr).prompts) for dr in range(s.default_draws)}
    cal_jobs = [Job("default-calib", f"{st}s-{sp}-d{dr}",
                    {**base, "steps": st, "spec": sp, "draw": dr, "calib_prompts_sha1": calp[dr]},
                    _calib_unit(models, env, st, sp, dr, s), f"default calibrate {st} steps {sp} draw {dr}")
                for st, sp, dr in keys]
    cals = dict(zip(keys, units.run_all(cal_jobs)))

    def row(st: int, sp: str, sched: dict | None) -> Job:
        conf = {"env": env.name, "steps": st, "spec": sp, "schedule": sched, "n": s.default_images,
                "fd2": env.features2 is not None,
                "eval_seed": s.eval_seed, "prompts_sha1": config_hash(evalp.prompts)}
        name = "original" if sched is None else config_hash(sched)[:8]
        return Job("default-eval", f"{st}s-{sp}-{name}", conf, _eval_unit(models, env, evalp, st, sp, sched, s),
                   f"default-path evaluation {st} steps {sp} {name} ({s.default_images} images)")

    wanted: dict[tuple, Job] = {}
    for st in s.steps:
        for sp in specs:
            wanted[(st, sp, None)] = row(st, sp, None)
    for (st, sp, _), c in cals.items():
        if c["decision"] == "qsched":
            key = (st, sp, config_hash(c["schedule"]))
            wanted.setdefault(key, row(st, sp, c["schedule"]))
    evals = dict(zip(wanted, units.run_all(list(wanted.values()), after=write)))
    if not table:
        return
    ref = env.evaluator().reference
    ref2 = env.features2()[1] if env.features2 is not None else None
    table: dict[str, Any] = {}
    for st in s.steps:
        for sp in specs:
            orig = _load(evals[(st, sp, None)]["file"])
            draws = []
            for dr in range(s.default_draws):
                c = cals[(st, sp, dr)]
                if c["decision"] != "qsched":
                    keys = ("fd", "fd2", "accuracy", "jaq") if ref2 is not None else ("fd", "accuracy", "jaq")
                    cis = {k: {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0} for k in keys}
                else:
                    t0 = time.perf_counter()
                    q = _load(evals[(st, sp, config_hash(c["schedule"]))]["file"])
                    cis = paired_image_cis(orig, q, ref, seed=dr, ref2=ref2)
                    con.print(f"  paired bootstrap {st} steps {sp} draw {dr} ({_N_BOOT} resamples of "
                              f"{len(q['jaq']):,} images) in {time.perf_counter() - t0:.1f} s")
                draws.append({"draw": dr, "decision": c["decision"], "chosen": c["chosen"],
                              "validation_gain": c["validation_gain"], "wall_time_s": c["wall_time_s"], **cis})
            fa = orig["finite"].astype(bool)
            table[f"{st}:{sp}"] = {
                "steps": st, "spec": sp, "original": {"fd": _fd(orig["features"], fa, ref),
                                                       "fd2": _fd(orig["features2"], fa, ref2)
                                                       if ref2 is not None and "features2" in orig else None,
                                                       "accuracy": float(orig["correct"].mean()),
                                                       "jaq": float(orig["jaq"].mean())},
                "draws": draws, "kept_identity": sum(d["decision"] != "qsched" for d in draws),
                "harm_fd": sum(d["fd"]["ci_low"] > 0 for d in draws),
                "harm_fd2": sum(d["fd2"]["ci_low"] > 0 for d in draws if "fd2" in d),
                "help_fd2": sum(d["fd2"]["ci_high"] < 0 for d in draws if "fd2" in d),
                "harm_accuracy": sum(d["accuracy"]["ci_high"] < 0 for d in draws),
                "help_fd": sum(d["fd"]["ci_high"] < 0 for d in draws),
                "help_accuracy": sum(d["accuracy"]["ci_low"] > 0 for d in draws)}
    R["default"] = {"rows": table, "images": s.default_images, "draws": s.default_draws,
                    "search_prompts": s.default_search_prompts, "val_prompts": s.default_val_prompts,
                    "val_seeds": list(defaults.VALIDATION_SEEDS), "trials": s.default_trials,
                    "calibration_prompts": "testbed-calib"}
    write()


def _pm(vals: list[float], nd: int = 2) -> str:
    m = float(np.mean(vals))
    return f"{m:+.{nd}f}" if len(vals) < 2 else f"{m:+.{nd}f} ± {float(np.std(vals, ddof=1)):.{nd}f}"


def render_default(R: dict[str, Any]) -> list[str]:
    """The Markdown of the default-path section (empty when it did not run)."""
    D = R.get("default")
    if not D:
        return []
    L = ["## Default path: `qsched calibrate` with its defaults, then held-out evaluation", "",
         f"Each (steps, spec): {D['draws']} calibration draws (other `testbed-calib` prompt shuffles and search seeds) "
         f"of the default main job ({D['search_prompts']} search prompts, {D['val_prompts']} validation prompts x "
         f"{len(D.get('val_seeds', (1, 2)))} seeds, {D['trials']} trials, parametrization auto, do no harm), each "
         f"followed by {D['images']:,} held-out "
         "images with the original and the chosen schedule (same prompts and seeds). Cells: change vs the original "
         "schedule, mean ± sd over draws; 'CI better/worse': how many draws' paired bootstrap 95% CI over images "
         "excludes 0 on the good / bad side. FD: testbed-classifier features; FD2: an independently trained "
         "extractor's (`qsched.testbed.features2`); lower is better for both.", "",
         "| steps | spec | original FD / FD2 / acc / JAQ | identity kept | ΔFD | ΔFD CI better/worse | ΔFD2 | "
         "ΔFD2 CI better/worse | Δacc | Δacc CI better/worse | ΔJAQ |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in D["rows"].values():
        o, ds = r["original"], r["draws"]
        fd2 = "-" if o.get("fd2") is None else f"{o['fd2']:.2f}"
        d2 = [d["fd2"]["diff"] for d in ds if "fd2" in d]
        L.append(f"| {r['steps']} | {r['spec']} | {o['fd']:.2f} / {fd2} / {o['accuracy']:.3f} / {o['jaq']:.2f} | "
                 f"{r['kept_identity']} of {len(ds)} | {_pm([d['fd']['diff'] for d in ds])} | "
                 f"{r['help_fd']} / {r['harm_fd']} | {_pm(d2) if d2 else '-'} | "
                 f"{r.get('help_fd2', 0)} / {r.get('harm_fd2', 0)} | {_pm([d['accuracy']['diff'] for d in ds], 3)} | "
                 f"{r['help_accuracy']} / {r['harm_accuracy']} | {_pm([d['jaq']['diff'] for d in ds])} |")
    draws = [d for r in D["rows"].values() for d in r["draws"]]
    harms = sum(d["fd"]["ci_low"] > 0 or d["accuracy"]["ci_high"] < 0 for d in draws)
    helps = sum((d["fd"]["ci_high"] < 0 or d["accuracy"]["ci_low"] > 0) and not
                (d["fd"]["ci_low"] > 0 or d["accuracy"]["ci_high"] < 0) for d in draws)
    fw, n_tests = family_wise_harms(draws)
    fw_text = (f" ({fw} at the family-wise 95% level: Bonferroni over the {n_tests} FD and accuracy tests of the "
               f"kept schedules, normal approximation from the bootstrap intervals; at the per-draw level about "
               f"{0.025 * n_tests:.1f} such flags are expected by chance alone)") if n_tests else ""
    L += ["", f"Over {len(draws)} default calibrations: {harms} made FD or accuracy worse beyond noise at the per-draw "
          f"95% level{fw_text}, {helps} made one of them better beyond noise without the other getting worse, "
          f"{sum(r['kept_identity'] for r in D['rows'].values())} kept the original schedule (do no harm).", ""]
    return L


def family_wise_harms(draws: list[dict[str, Any]], level: float = 0.95) -> tuple[int, int]:
    """(draws worse beyond noise at a family-wise ``level``, number of tests): FD and accuracy of every draw that
    kept a schedule are the tests; each interval is widened to the Bonferroni level with the standard error read
    off its 95% bootstrap interval (normal approximation)."""
    from scipy.stats import norm

    kept = [d for d in draws if d["decision"] == "qsched"]
    n = 2 * len(kept)
    if not n:
        return 0, 0
    z = float(norm.ppf(1 - (1 - level) / (2 * n)))

    def worse(m: dict[str, float], bad_sign: int) -> bool:
        se = (m["ci_high"] - m["ci_low"]) / (2 * 1.959964)
        return bad_sign * m["diff"] - z * se > 0

    return sum(worse(d["fd"], 1) or worse(d["accuracy"], -1) for d in kept), n

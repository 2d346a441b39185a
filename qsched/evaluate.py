"""Side-by-side evaluation: full precision vs naive quantization vs Q-Sched (vs full precision + tuned schedule).

Every configuration generates images for the same prompts with the same per-image seeds (one CPU
``torch.Generator`` per image, seeded ``seed + i``), so the initial noise and any sampler noise are identical
across configurations and independent of the batch size:

=================  =====================  ==============================================
config             denoiser               scheduler coefficients
=================  =====================  ==============================================
``fp-original``    full precision         none (the model's own sampler)
``quant-naive``    quantized (``spec``)   none
``quant-qsched``   quantized              ``qsched_schedule`` (calibrated on the quantized model)
``fp-tuned``       full precision         ``fp_schedule`` (calibrated on the full-precision model)
=================  =====================  ==============================================

``fp-tuned`` is the honest control the paper does not report: how much of the gain is plain schedule tuning.

Metrics are streamed batch by batch (:mod:`qsched.metrics`): testbed FD in the classifier's features and class
accuracy, CLIPScore and JAQ, and optionally Inception FID.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from qsched._util import fmt_num, json_default, package_versions
from qsched.errors import QSchedError
from qsched.images import finite_mask, to_uint8
from qsched.metrics import AccuracyMetric, EvalMetric, build_metrics
from qsched.pipelines import ModelSpec, resolve_model
from qsched.prompts import PromptSet, load_prompts
from qsched.runner import denoiser_of, generate_batches, using_schedule

__all__ = ["evaluate", "EvalResult", "CONFIGS", "DEFAULT_METRICS", "COMPARISONS"]

CONFIGS: tuple[str, ...] = ("fp-original", "quant-naive", "quant-qsched", "fp-tuned")
DEFAULT_METRICS: tuple[str, ...] = ("fd", "fd2", "accuracy", "clipscore", "jaq")
TESTBED_DEFAULT_N = 500
_QUANT_CONFIGS = ("quant-naive", "quant-qsched")
#: (B, A) pairs compared image by image when both rows exist: what Q-Sched changes, what quantization costs, and
#: the fp32-tuned control.
COMPARISONS: tuple[tuple[str, str], ...] = (("quant-qsched", "quant-naive"), ("quant-naive", "fp-original"),
                                            ("quant-qsched", "fp-original"), ("fp-tuned", "fp-original"),
                                            ("quant-qsched", "fp-tuned"))


# ============================================================================================ result
@dataclass
class EvalResult:
    """Numbers of one side-by-side evaluation (JSON round trip; sample images as PNG files beside the JSON)."""

    rows: dict[str, dict[str, Any]]
    model: str
    spec: str | None
    steps: int
    seeds: list[int]
    prompt_set: str
    n_images: int
    configs: list[str]
    metrics: list[str]
    schedules: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    command: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    sample_prompts: list[str] = field(default_factory=list)
    sample_seeds: list[int] = field(default_factory=list)
    samples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # config -> (S, H, W, C) uint8
    #: "B vs A" -> metric -> {"diff": B - A, "ci_low", "ci_high"}: paired bootstrap 95% CIs over the same images
    comparisons: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    per_image: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)  # config -> record

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (without the sample pixels)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("samples", "per_image")}
        return _clean(json.loads(json.dumps(d, default=_json_default)))

    def to_json(self, path: str | Path, save_samples: bool = True) -> Path:
        """Write the JSON; sample images go to ``<stem>_samples/<config>_<i>.png`` and are listed in the JSON.
        Each file is written atomically, and Ctrl-C waits until all of them are."""
        from qsched.interrupts import deferred_interrupts

        with deferred_interrupts():
            return self._to_json(Path(path), save_samples)

    def _to_json(self, path: Path, save_samples: bool) -> Path:
        import io

        from qsched._util import write_atomic

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = self.to_dict()
        if save_samples and self.samples:
            from PIL import Image

            sdir = path.parent / f"{path.stem}_samples"
            sdir.mkdir(exist_ok=True)
            files: dict[str, list[str]] = {}
            for cfg, arr in self.samples.items():
                files[cfg] = []
                for i, im in enumerate(arr):
                    name = f"{cfg}_{i:03d}.png"
                    buf = io.BytesIO()
                    Image.fromarray(_pil_array(im)).save(buf, format="PNG")
                    write_atomic(sdir / name, buf.getvalue())
                    files[cfg].append(f"{sdir.name}/{name}")
            d["sample_files"] = files
        return write_atomic(path, json.dumps(d, indent=2, allow_nan=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        """Inverse of :meth:`to_dict` (samples not included)."""
        names = {f for f in cls.__dataclass_fields__ if f not in ("samples", "per_image")}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path) -> EvalResult:
        """Load a result written by :meth:`to_json`, with its sample PNGs when present."""
        from qsched.errors import CorruptFileError, read_json

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"evaluation result not found: {path}")
        d = read_json(path, "evaluation result")
        _check_eval_dict(d, path)
        try:
            res = cls.from_dict(d)
        except TypeError as e:
            raise CorruptFileError(f"{path} is not a qsched evaluation result ({e})") from None
        files = d.get("sample_files") or {}
        if files:
            from PIL import Image

            for cfg, names in files.items():
                ims = []
                for name in names:
                    p = path.parent / name
                    if p.exists():
                        try:
                            a = np.asarray(Image.open(p))
                        except OSError as e:
                            raise CorruptFileError(f"sample image {p} of {path} is unreadable ({e})") from None
                        ims.append(a[..., None] if a.ndim == 2 else a)
                if ims:
                    res.samples[cfg] = np.stack(ims)
        return res

    # ------------------------------------------------------------------ presentation
    def metric_columns(self) -> list[str]:
        """Metric keys present in the rows, in a stable order."""
        order = ["fd", "fd2", "fid", "accuracy", "clipscore", "iq", "jaq"]
        present = {k for r in self.rows.values() for k in r}
        return [k for k in order if k in present]

    def table(self) -> tuple[list[str], list[list[str]]]:
        """(header, formatted rows): one row per config, metric columns then counts and speed."""
        cols = self.metric_columns()
        head = ["config", *cols, "n_images", "non-finite", "gen s", "img/s"]
        rows = [[cfg, *[fmt_num(r.get(c)) for c in cols], str(r.get("n_images", "")), str(r.get("n_nonfinite", "")),
                 fmt_num(r.get("gen_seconds"), 2), fmt_num(r.get("images_per_s"), 2)] for cfg, r in self.rows.items()]
        return head, rows

    def to_markdown(self) -> str:
        """A Markdown table of the rows (one line per config) plus the setting and notes."""
        cols = self.metric_columns()
        head, rows = self.table()
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(vals) + " |" for vals in rows]
        setting = (f"model `{self.model}`, spec `{self.spec}`, {self.steps} steps, {self.n_images} images "
                   f"from `{self.prompt_set}`, seeds {self.seeds[0] if self.seeds else '-'}.."
                   f"{self.seeds[-1] if self.seeds else '-'}")
        out = [setting, "", *lines]
        lower = {"fd": "lower", "fid": "lower"}
        out.append("")
        out.append("FD/FID: lower is better; accuracy, CLIPScore, IQ, JAQ: higher is better."
                   if any(c in lower for c in cols) or cols else "")
        if self.comparisons:
            from qsched.paired import comparison_lines

            out += ["", "Paired differences (B - A over the same images and seeds) with bootstrap 95% CIs:", "",
                    *comparison_lines(self.comparisons)]
        if self.notes:
            out += ["", "Notes:", *[f"- {n}" for n in self.notes]]
        return "\n".join(out).rstrip() + "\n"


_EVAL_TYPES = {"rows": dict, "model": str, "steps": int, "seeds": list, "prompt_set": str, "n_images": int,
               "configs": list, "metrics": list}


def _check_eval_dict(d: Any, path: Path) -> None:
    """A CorruptFileError naming ``path`` unless ``d`` has an evaluation result's fields with their JSON types."""
    from qsched.errors import CorruptFileError

    if not isinstance(d, dict):
        raise CorruptFileError(f"{path} is not a qsched evaluation result (a JSON {type(d).__name__}, not an object)")
    missing = [k for k in _EVAL_TYPES if k not in d]
    wrong = [f"{k} ({type(d[k]).__name__})" for k, t in _EVAL_TYPES.items() if k in d and
             (not isinstance(d[k], t) or isinstance(d[k], bool))]
    wrong += [f"rows.{k}" for k, v in (d.get("rows") or {}).items() if not isinstance(v, dict)] \
        if isinstance(d.get("rows"), dict) else []
    if not isinstance(d.get("sample_files") or {}, dict):
        wrong.append("sample_files")
    if missing or wrong:
        raise CorruptFileError(f"{path} is not a qsched evaluation result (missing {missing}, wrong type {wrong})")


def _json_default(o: Any) -> Any:
    try:
        return json_default(o)
    except TypeError:
        return repr(o)


def _clean(o: Any) -> Any:
    """Replace NaN/inf floats by None (strict JSON)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_clean(v) for v in o]
    return o


def _pil_array(im: np.ndarray) -> np.ndarray:
    return im[..., 0] if im.ndim == 3 and im.shape[-1] == 1 else im


# ============================================================================================ processes
def _process_group(device: str) -> tuple[int, int, Any]:
    """(rank, world size, accelerate PartialState or None). A run started by ``accelerate launch`` or
    ``torchrun`` (WORLD_SIZE > 1) shards its batches across processes; a plain run is one process."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from accelerate import PartialState

    state = PartialState(cpu=torch.device(device).type == "cpu")
    return state.process_index, state.num_processes, state


def _gather(metrics: Sequence[EvalMetric], extra: dict[str, Any], group: Any) -> dict[str, Any]:
    """Merge every process's metric states (in rank order, i.e. image order) and sum ``extra`` counters."""
    if group is None:
        return extra
    from accelerate.utils import gather_object

    got = gather_object([{"metrics": [m.state() for m in metrics], "extra": extra}])
    for i, m in enumerate(metrics):
        m.merge([g["metrics"][i] for g in got])
    return {k: sum(g["extra"][k] for g in got) for k in extra}


# ============================================================================================ evaluate
def evaluate(
    model: str | ModelSpec = "testbed",
    spec: str = "w4a8",
    steps: int | None = None,
    qsched_schedule: Any = None,
    fp_schedule: Any = None,
    prompts: PromptSet | str | Path | None = None,
    n_images: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    metrics: Sequence[str | EvalMetric] | None = DEFAULT_METRICS,
    configs: Sequence[str] = CONFIGS,
    device: str = "cpu",
    pipe_loader: Callable[[], Any] | None = None,
    progress: bool = True,
    fid_ref: str | Path | None = None,
    n_samples: int = 8,
    call_kwargs: dict[str, Any] | None = None,
    paired_resamples: int = 300,
) -> EvalResult:
    """Generate images for each config side by side (same prompts, seeds, noise) and score them.

    Args:
        model: a ModelSpec, or "testbed" / a model alias / path for :func:`qsched.pipelines.load_pipeline`.
        spec: quantization spec for the quantized configs (e.g. "w4a8", "w8a8").
        steps: denoising steps (default: the schedules' length, else the model's default).
        qsched_schedule: :class:`~qsched.schedule.Schedule` calibrated on the quantized model ("quant-qsched").
        fp_schedule: schedule calibrated on the full-precision model ("fp-tuned"; skipped with a note if None).
        prompts: a PromptSet or a source for :func:`qsched.prompts.load_prompts` (default testbed-heldout).
        n_images: images per config; prompts are cycled if fewer (default: all prompts; testbed default 500).
        seed: base seed; image ``i`` is drawn as image ``i`` of this seed (:mod:`qsched.runner`'s rule).
        batch_size: images per pipeline call (default 50 for the testbed, 4 otherwise).
        metrics: metric names ("fd", "accuracy", "clipscore", "jaq", "fid") and/or :class:`EvalMetric` objects.
        configs: which rows to produce, any of :data:`CONFIGS`.
        device: torch device for the pipeline and metrics.
        pipe_loader: zero-argument callable returning the full-precision pipeline (instead of load_pipeline).
        progress: show a rich progress bar.
        fid_ref: reference statistics (.safetensors/.npz with mu, sigma) for "fid" (required for real models).
        n_samples: sample images kept per config for the report.
        call_kwargs: extra keyword arguments for every pipeline call (e.g. guidance_scale).
        paired_resamples: bootstrap resamples of the paired comparisons (:data:`COMPARISONS`, each row against
            another over the same images; :mod:`qsched.paired`); 0 skips them. The per-image records stay in
            ``EvalResult.per_image``.

    Started under ``accelerate launch`` / ``torchrun`` (WORLD_SIZE > 1), whole batches are shared out across
    the processes and metric states gathered, so every process returns the numbers of a single-process run.
    """
    t_start = time.time()
    configs = list(configs)
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        raise QSchedError(f"unknown config(s) {bad}; choose from {', '.join(CONFIGS)}")
    if len(set(configs)) != len(configs):
        raise QSchedError(f"duplicate configs in {configs}")
    mspec = model if isinstance(model, ModelSpec) else resolve_model(model)
    testbed = mspec.is_testbed
    notes: list[str] = []

    # ---------------------------------------------------------------- prompts, seeds
    if prompts is None:
        if not testbed:
            raise QSchedError("pass prompts for a real model, e.g. prompts=load_prompts('meta_data.json') "
                              "(MJHQ-30K) or a text file")
        prompts = load_prompts("testbed-heldout", n=n_images or TESTBED_DEFAULT_N, seed=seed)
    elif not isinstance(prompts, PromptSet):
        prompts = load_prompts(prompts)
    n = int(n_images) if n_images is not None else len(prompts)
    if n < 1:
        raise QSchedError(f"n_images must be >= 1, got {n_images}")
    all_prompts = [prompts.prompts[i % len(prompts)] for i in range(n)]
    all_labels = None if prompts.labels is None else [prompts.labels[i % len(prompts)] for i in range(n)]
    from qsched.runner import image_seed

    seeds = [image_seed(seed, i) for i in range(n)]
    bs = int(batch_size) if batch_size else (50 if testbed else 4)
    if bs < 1:
        raise QSchedError(f"batch_size must be >= 1, got {batch_size}")

    # ---------------------------------------------------------------- schedules, steps
    given = [s for s in (qsched_schedule, fp_schedule) if s is not None]
    T = int(steps) if steps is not None else (int(given[0].steps) if given else mspec.steps)
    for name, s in (("qsched_schedule", qsched_schedule), ("fp_schedule", fp_schedule)):
        if s is not None and s.steps != T:
            raise QSchedError(f"{name} has {s.steps} steps but the evaluation uses steps={T}")
    schedules = {"fp-original": None, "quant-naive": None, "quant-qsched": qsched_schedule, "fp-tuned": fp_schedule}
    run_cfgs = []
    for c in configs:
        if c == "fp-tuned" and fp_schedule is None:
            notes.append("fp-tuned skipped: no fp_schedule (calibrate a schedule on the full-precision model "
                         "to measure how much of the gain is plain schedule tuning)")
        elif c == "quant-qsched" and qsched_schedule is None:
            notes.append("quant-qsched skipped: no qsched_schedule given")
        else:
            run_cfgs.append(c)

    # ---------------------------------------------------------------- pipeline
    if pipe_loader is not None:
        pipe = pipe_loader()
    else:
        from qsched.pipelines import load_pipeline

        pipe = load_pipeline(mspec.alias, device=device)
    from qsched.quantization import quant_spec_of, quantized_copy

    loaded_spec = quant_spec_of(denoiser_of(pipe)[1])
    if loaded_spec is not None:
        fp_rows = [c for c in run_cfgs if c.startswith("fp-")]
        if fp_rows:
            notes.append(f"{', '.join(fp_rows)} skipped: the loaded model is already quantized ({loaded_spec})")
        run_cfgs = [c for c in run_cfgs if not c.startswith("fp-")]
        if spec is not None and str(spec).lower() != loaded_spec:
            notes.append(f"the loaded model is quantized as {loaded_spec}; spec={spec!r} ignored")
        spec = loaded_spec
    call = {**mspec.call_defaults(), **(call_kwargs or {})}
    from qsched.runner import check_call_kwargs, check_steps

    check_steps(pipe.scheduler, T)
    check_call_kwargs(call)

    # ---------------------------------------------------------------- metrics
    metric_names = [m for m in (metrics or ()) if isinstance(m, str)]
    metric_objs: list[EvalMetric] = [m for m in (metrics or ()) if not isinstance(m, str)]
    metric_objs = build_metrics(mspec, metric_names, device=device, fid_ref=fid_ref, notes=notes) + metric_objs
    if all_labels is None:
        acc = [m for m in metric_objs if isinstance(m, AccuracyMetric)]
        if acc:
            notes.append("accuracy skipped: the prompt set has no class labels")
            metric_objs = [m for m in metric_objs if not isinstance(m, AccuracyMetric)]

    # ---------------------------------------------------------------- this process's share of the batches
    rank, world, group = _process_group(device)
    batches = [(b, min(b + bs, n)) for b in range(0, n, bs)]
    mine = batches[rank * len(batches) // world:(rank + 1) * len(batches) // world]
    lo, hi = (mine[0][0], mine[-1][1]) if mine else (0, 0)

    # ---------------------------------------------------------------- run: fp rows first, then quantized
    order = [c for c in run_cfgs if c.startswith("fp-")] + [c for c in run_cfgs if c in _QUANT_CONFIGS]
    rows: dict[str, dict[str, Any]] = {}
    per_image: dict[str, dict[str, np.ndarray]] = {}
    samples: dict[str, np.ndarray] = {}
    qpipe = pipe if loaded_spec is not None else None
    quant_info: dict[str, Any] = {}
    prog = _make_progress(progress and rank == 0)
    with (prog if prog is not None else contextlib.nullcontext()):
        for cfg in order:
            if cfg in _QUANT_CONFIGS and qpipe is None:
                t0 = time.time()
                qpipe, summary = quantized_copy(pipe, spec)
                quant_info = {"quantize_seconds": time.time() - t0, "summary": _summary_dict(summary)}
            run_pipe = qpipe if cfg in _QUANT_CONFIGS else pipe
            task = prog.add_task(cfg, total=hi - lo) if prog is not None else None
            for m in metric_objs:
                m.reset()
            counts = {"gen_seconds": 0.0, "n_nonfinite": 0}
            kept: list[np.ndarray] = []
            finite_all: list[bool] = []
            t0 = time.time()
            with using_schedule(run_pipe, schedules[cfg]):
                for off, imgs in generate_batches(run_pipe, all_prompts[lo:hi], T, seed=seed, start=lo,
                                                  batch_size=bs, call_kwargs=call):
                    counts["gen_seconds"] += time.time() - t0
                    a, b = lo + off, lo + off + imgs.shape[0]
                    finite = finite_mask(imgs)
                    counts["n_nonfinite"] += int((~finite).sum())
                    finite_all += finite.cpu().tolist()
                    for m in metric_objs:
                        m.update(imgs, all_prompts[a:b], None if all_labels is None else all_labels[a:b], finite)
                    if a < n_samples:
                        kept.append(to_uint8(imgs[: n_samples - a]))
                    if task is not None:
                        prog.update(task, advance=b - a)
                    t0 = time.time()
            counts = _gather(metric_objs, counts, group)
            if group is not None:
                from accelerate.utils import gather_object

                kept = [k for part in gather_object([kept]) for k in part]
                finite_all = [f for part in gather_object([finite_all]) for f in part]
            row: dict[str, Any] = {}
            for m in metric_objs:
                row.update(m.compute())
            gen_s, n_nonfinite = counts["gen_seconds"], counts["n_nonfinite"]
            row.update({"n_images": n, "n_nonfinite": n_nonfinite, "gen_seconds": gen_s,
                        "images_per_s": n / gen_s if gen_s > 0 else None,
                        "precision": "quantized" if cfg in _QUANT_CONFIGS else "full",
                        "schedule": schedules[cfg].kind if schedules[cfg] is not None else "original"})
            if n_nonfinite:
                notes.append(f"{cfg}: {n_nonfinite} of {n} images contain NaN/inf (excluded from FD/FID and "
                             "CLIPScore, counted wrong in accuracy, worst score in JAQ)")
            rows[cfg] = row
            per_image[cfg] = {"finite": np.asarray(finite_all, dtype=bool)}
            for m in metric_objs:
                per_image[cfg].update(m.per_image())
            if kept:
                samples[cfg] = np.concatenate(kept)[:n_samples]

    rows = {c: rows[c] for c in configs if c in rows}
    comparisons: dict[str, dict[str, dict[str, float]]] = {}
    if paired_resamples > 0 and rank == 0 and n >= 2:
        from qsched.metrics import FrechetMetric
        from qsched.paired import paired_cis

        refs = {m.key: m.reference() for m in metric_objs if isinstance(m, FrechetMetric)}
        for b, a in COMPARISONS:
            if a in rows and b in rows:
                comparisons[f"{b} vs {a}"] = paired_cis(per_image[a], per_image[b], refs, n_boot=paired_resamples)
    n_keep = min(n_samples, n)
    return EvalResult(
        rows=rows, model=mspec.alias, spec=None if spec is None else str(spec), steps=T, seeds=seeds,
        prompt_set=prompts.name, n_images=n, configs=list(rows), metrics=[*metric_names] + [
            type(m).__name__ for m in metrics or () if not isinstance(m, str)],
        schedules={c: (schedules[c].to_dict() if schedules[c] is not None else None) for c in rows},
        prompts=all_prompts, notes=notes, versions=package_versions(), command=" ".join(sys.argv),
        args=_jsonable({"model": mspec.alias, "spec": spec, "steps": T, "n_images": n, "seed": seed,
                        "batch_size": bs, "device": device, "configs": configs, "fid_ref": fid_ref,
                        "call_kwargs": call, "quantization": quant_info, "processes": world,
                        "total_seconds": time.time() - t_start}),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        sample_prompts=all_prompts[:n_keep], sample_seeds=seeds[:n_keep], samples=samples,
        comparisons=comparisons, per_image=per_image,
    )


def _summary_dict(summary: Any) -> Any:
    if summary is None:
        return None
    if hasattr(summary, "to_dict"):
        return summary.to_dict()
    try:
        return asdict(summary)
    except TypeError:
        return repr(summary)


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=_json_default))


def _make_progress(enabled: bool) -> Any:
    """A rich Progress (or None when disabled)."""
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:>14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())

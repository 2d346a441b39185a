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

Metrics are streamed batch by batch (:class:`EvalMetric`): testbed FD in the classifier's features and class
accuracy (:mod:`qsched.testbed.metrics`), CLIPScore and JAQ (:func:`qsched.scoring.make_jaq`), and optionally
Inception FID. Images with NaN/inf are counted, excluded from FD/FID and CLIPScore, count as misclassified, and
get the worst JAQ (the scorer handles that).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from qsched._util import fmt_num, json_default, package_versions
from qsched.pipelines import resolve_model


# TEMPORARY (bench branch): main's WIP removed these module functions; drop at merge with main's evaluate refactor.
def call_defaults(model: Any) -> dict[str, Any]:
    return resolve_model(model).call_defaults()


def default_steps(model: Any) -> int:
    return resolve_model(model).steps


def jaq_preset(model: Any) -> str:
    return resolve_model(model).jaq_preset
from qsched.prompts import PromptSet, load_prompts

__all__ = [
    "evaluate",
    "EvalResult",
    "EvalMetric",
    "FrechetMetric",
    "AccuracyMetric",
    "JAQMetric",
    "build_metrics",
    "load_reference_stats",
    "CONFIGS",
    "DEFAULT_METRICS",
    "TESTBED_ONLY_METRICS",
]

CONFIGS: tuple[str, ...] = ("fp-original", "quant-naive", "quant-qsched", "fp-tuned")
DEFAULT_METRICS: tuple[str, ...] = ("fd", "accuracy", "clipscore", "jaq")
KNOWN_METRICS: tuple[str, ...] = ("fd", "accuracy", "clipscore", "jaq", "fid")
TESTBED_ONLY_METRICS: tuple[str, ...] = ("fd", "accuracy")
TESTBED_NAMES = ("testbed", "testbed-student", "testbed-teacher")
TESTBED_DEFAULT_N = 500
_QUANT_CONFIGS = ("quant-naive", "quant-qsched")


# ============================================================================================ streaming metrics
class EvalMetric:
    """A streaming metric: ``reset()``, ``update(images, prompts, labels, finite)`` per batch, ``compute()``.

    ``images`` is a (B, C, H, W) float tensor in [0, 1] that may contain NaN/inf; ``finite`` is the (B,) bool
    mask of images that are entirely finite; ``labels`` is a list of ints or None. ``compute()`` returns a dict
    of named floats (None where undefined). ``keys`` lists the names it produces.
    """

    keys: tuple[str, ...] = ()

    def reset(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def update(self, images: torch.Tensor, prompts: Sequence[str], labels: Sequence[int] | None,
               finite: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def compute(self) -> dict[str, float | None]:  # pragma: no cover - interface
        raise NotImplementedError


class FrechetMetric(EvalMetric):
    """Frechet distance between features of the finite images and reference (mu, sigma).

    ``features(images) -> (B, D)``; ``reference() -> (mu, sigma)`` (called lazily, once per compute).
    """

    def __init__(self, key: str, features: Callable[[torch.Tensor], Any],
                 reference: Callable[[], tuple[np.ndarray, np.ndarray]]):
        self.key = key
        self.keys = (key,)
        self._features = features
        self._reference = reference
        self.reset()

    def reset(self) -> None:
        self._feats: list[np.ndarray] = []

    def update(self, images, prompts, labels, finite) -> None:
        if bool(finite.any()):
            f = self._features(images[finite])
            f = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
            self._feats.append(np.asarray(f, dtype=np.float64).reshape(f.shape[0], -1))

    def compute(self) -> dict[str, float | None]:
        from qsched.testbed.metrics import feature_stats, frechet_distance

        n = sum(f.shape[0] for f in self._feats)
        if n < 2:
            return {self.key: None}
        mu, sigma = feature_stats(np.concatenate(self._feats))
        return {self.key: frechet_distance(mu, sigma, *self._reference())}


class AccuracyMetric(EvalMetric):
    """Fraction of images whose predicted class equals the prompt label; non-finite images count as wrong."""

    keys = ("accuracy",)

    def __init__(self, predict: Callable[[torch.Tensor], Any]):
        self._predict = predict
        self.reset()

    def reset(self) -> None:
        self._correct = 0
        self._total = 0

    def update(self, images, prompts, labels, finite) -> None:
        if labels is None:
            raise ValueError("the 'accuracy' metric needs class labels: use a labelled PromptSet "
                             "(testbed-heldout / testbed-calib) or drop 'accuracy' from metrics")
        y = torch.as_tensor(list(labels), dtype=torch.long)
        self._total += int(y.shape[0])
        if bool(finite.any()):
            pred = torch.as_tensor(self._predict(images[finite])).reshape(-1).cpu().long()
            self._correct += int((pred == y[finite.cpu()]).sum())

    def compute(self) -> dict[str, float | None]:
        return {"accuracy": self._correct / self._total if self._total else None}


class JAQMetric(EvalMetric):
    """JAQ = mean TC + k mean IQ over all images (invalid images score 0), plus CLIPScore and CLIP-IQA.

    ``clipscore`` (the TC term) and ``iq`` are means over the valid images only; ``n_invalid`` counts the NaN /
    blank images the scorer rejected. Wraps a :class:`qsched.scoring.JAQ` (or anything with ``score`` returning
    per-image ``tc_per_image`` / ``iq_per_image`` and ``k``).
    """

    keys = ("jaq", "clipscore", "iq", "n_invalid")

    def __init__(self, jaq: Any):
        self.jaq = jaq
        self.reset()

    def reset(self) -> None:
        self._tc: list[float] = []
        self._iq: list[float] = []
        self._valid: list[bool] = []
        self._k = float(getattr(self.jaq, "k", 2.0))

    def update(self, images, prompts, labels, finite) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # invalid images are counted, not warned per batch
            s = self.jaq.score(images, list(prompts))
        self._k = float(s.k)
        self._tc += list(s.tc_per_image)
        self._iq += list(s.iq_per_image)
        from qsched.scoring import invalid_mask

        nonfinite, blank = invalid_mask(images)
        self._valid += (~(nonfinite | blank)).tolist()

    def compute(self) -> dict[str, float | None]:
        if not self._tc:
            return {"jaq": None, "clipscore": None, "iq": None, "n_invalid": 0}
        tc, iq, ok = np.asarray(self._tc), np.asarray(self._iq), np.asarray(self._valid, dtype=bool)
        return {
            "jaq": float(tc.mean() + self._k * iq.mean()),
            "clipscore": float(tc[ok].mean()) if ok.any() else None,
            "iq": float(iq[ok].mean()) if ok.any() else None,
            "n_invalid": int((~ok).sum()),
        }


def load_reference_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a ``.safetensors`` (``mu`` + ``sigma`` or ``sigma_triu``) or ``.npz`` (``mu``, ``sigma``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"FID reference statistics not found: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z or "sigma" not in z:
                raise ValueError(f"{path} must hold arrays 'mu' and 'sigma', found {sorted(z.files)}")
            return np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    if path.suffix == ".safetensors":
        from qsched.testbed.metrics import load_stats

        mu, sigma, _ = load_stats(path)
        return mu, sigma
    raise ValueError(f"FID reference statistics must be .safetensors or .npz, got {path}")


def _is_testbed(model: Any) -> bool:
    return isinstance(model, str) and (model in TESTBED_NAMES or model.startswith("testbed"))


def build_metrics(model: str, names: Sequence[str], device: str | torch.device = "cpu",
                  fid_ref: str | Path | None = None, notes: list[str] | None = None) -> list[EvalMetric]:
    """Build the streaming metrics ``names`` for ``model`` (testbed or a real model alias/path).

    Testbed-only metrics ("fd", "accuracy") are skipped with a note for real models. "fid" on a real model needs
    ``fid_ref`` (reference statistics file).
    """
    notes = notes if notes is not None else []
    unknown = [n for n in names if n not in KNOWN_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(KNOWN_METRICS)}")
    testbed = _is_testbed(model)
    out: list[EvalMetric] = []
    if testbed and ("fd" in names or "accuracy" in names):
        from qsched.testbed.metrics import ClassifierFD

        cfd = ClassifierFD(device=device)
        if "fd" in names:
            out.append(FrechetMetric("fd", cfd.features, lambda: cfd.reference))
        if "accuracy" in names:
            out.append(AccuracyMetric(cfd.predict))
    elif not testbed:
        for n in TESTBED_ONLY_METRICS:
            if n in names:
                notes.append(f"metric {n!r} is testbed-only (classifier features); skipped for {model}")
    if "clipscore" in names or "jaq" in names:
        from qsched.scoring import MissingWeightsError, make_jaq

        preset = jaq_preset(model)
        try:
            out.append(JAQMetric(make_jaq(preset, device=device)))
        except (MissingWeightsError, ImportError) as e:
            if testbed:
                raise
            notes.append(f"clipscore/jaq skipped: the {preset!r} scorer weights are not available ({e})")
    if "fid" in names:
        from qsched.testbed.metrics import InceptionFID

        if fid_ref is None and not testbed:
            raise ValueError("FID on a real model needs reference statistics: pass fid_ref=<.safetensors/.npz with "
                             "mu and sigma> (e.g. MJHQ-30K Inception statistics)")
        if fid_ref is None:
            ifid = InceptionFID(device=device)
            out.append(FrechetMetric("fid", ifid.features, lambda: ifid.reference))
        else:
            ref = load_reference_stats(fid_ref)
            ifid = InceptionFID(ref_path=fid_ref if str(fid_ref).endswith(".safetensors") else None, device=device)
            out.append(FrechetMetric("fid", ifid.features, lambda: ref))
    return out


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

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (without the sample pixels)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "samples"}
        return _clean(json.loads(json.dumps(d, default=_json_default)))

    def to_json(self, path: str | Path, save_samples: bool = True) -> Path:
        """Write the JSON; sample images go to ``<stem>_samples/<config>_<i>.png`` and are listed in the JSON."""
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
                    Image.fromarray(_pil_array(im)).save(sdir / name)
                    files[cfg].append(f"{sdir.name}/{name}")
            d["sample_files"] = files
        path.write_text(json.dumps(d, indent=2, allow_nan=False), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        """Inverse of :meth:`to_dict` (samples not included)."""
        names = {f for f in cls.__dataclass_fields__ if f != "samples"}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path) -> EvalResult:
        """Load a result written by :meth:`to_json`, with its sample PNGs when present."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"evaluation result not found: {path}")
        d = json.loads(path.read_text(encoding="utf-8"))
        res = cls.from_dict(d)
        files = d.get("sample_files") or {}
        if files:
            from PIL import Image

            for cfg, names in files.items():
                ims = []
                for name in names:
                    p = path.parent / name
                    if p.exists():
                        a = np.asarray(Image.open(p))
                        ims.append(a[..., None] if a.ndim == 2 else a)
                if ims:
                    res.samples[cfg] = np.stack(ims)
        return res

    # ------------------------------------------------------------------ presentation
    def metric_columns(self) -> list[str]:
        """Metric keys present in the rows, in a stable order."""
        order = ["fd", "fid", "accuracy", "clipscore", "iq", "jaq"]
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
        if self.notes:
            out += ["", "Notes:", *[f"- {n}" for n in self.notes]]
        return "\n".join(out).rstrip() + "\n"


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


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float [0, 1] (NaN -> 0) -> (B, H, W, C) uint8."""
    x = torch.nan_to_num(x.detach().float().cpu(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)


# ============================================================================================ generation
def _images_of(out: Any) -> torch.Tensor:
    imgs = out.images if hasattr(out, "images") else out[0]
    if isinstance(imgs, torch.Tensor):
        return imgs.detach().float().cpu()
    from qsched.scoring import to_tensor

    return to_tensor(imgs)


def _generate(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int,
              call_kwargs: dict[str, Any]) -> torch.Tensor:
    """One batch: (B, C, H, W) float images in [0, 1] (may hold NaN), one CPU generator per image."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with torch.inference_mode():
        out = pipe(prompt=list(prompts), num_inference_steps=steps, generator=gens, output_type="pt",
                   **call_kwargs)
    return _images_of(out)


def _denoiser_of(pipe: Any) -> tuple[str, torch.nn.Module]:
    """(name, module) of the pipeline's denoiser: qsched.pipelines.denoiser_of, or pipe.unet / pipe.transformer."""
    try:
        from qsched.pipelines import denoiser_of
    except ImportError:  # evaluate-owned minimal stand-in while qsched.pipelines is unavailable
        for name in ("unet", "transformer"):
            m = getattr(pipe, name, None)
            if isinstance(m, torch.nn.Module):
                return name, m
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer") from None
    return denoiser_of(pipe)


class _SchedulerSwap:
    """Install a schedule on ``pipe`` for one config and restore the original scheduler afterwards."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.base = pipe.scheduler
        self.base_schedule = getattr(self.base, "schedule", None) if self._is_qsched(self.base) else None

    @staticmethod
    def _is_qsched(s: Any) -> bool:
        from qsched.scheduler import QSchedScheduler

        return isinstance(s, QSchedScheduler)

    def set(self, schedule: Any, steps: int) -> None:
        from qsched.scheduler import apply_schedule

        self.pipe.scheduler = self.base
        if schedule is None:
            if self._is_qsched(self.base):  # the model was saved with a schedule: run it without coefficients
                self.base.set_schedule(None)
            return
        apply_schedule(self.pipe, schedule)

    def restore(self) -> None:
        if self._is_qsched(self.base) and self.base_schedule is not None:
            self.base.set_schedule(self.base_schedule)
        self.pipe.scheduler = self.base


def evaluate(
    model: str = "testbed",
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
) -> EvalResult:
    """Generate images for each config side by side (same prompts, seeds, noise) and score them.

    Args:
        model: "testbed" or a model alias/path for :func:`qsched.pipelines.load_pipeline`.
        spec: quantization spec for the quantized configs (e.g. "w4a8", "w8a8").
        steps: denoising steps (default: the schedules' length, else the model's default, else 4).
        qsched_schedule: :class:`~qsched.schedule.Schedule` calibrated on the quantized model ("quant-qsched").
        fp_schedule: schedule calibrated on the full-precision model ("fp-tuned"; skipped with a note if None).
        prompts: a PromptSet or a source for :func:`qsched.prompts.load_prompts` (default testbed-heldout).
        n_images: images per config; prompts are cycled if fewer (default: all prompts; testbed default 500).
        seed: image ``i`` uses seed ``seed + i`` in every config.
        batch_size: images per pipeline call (default 50 for the testbed, 4 otherwise).
        metrics: metric names ("fd", "accuracy", "clipscore", "jaq", "fid") and/or :class:`EvalMetric` objects.
        configs: which rows to produce, any of :data:`CONFIGS`.
        device: torch device for the pipeline and metrics.
        pipe_loader: zero-argument callable returning the full-precision pipeline (instead of load_pipeline).
        progress: show a rich progress bar.
        fid_ref: reference statistics (.safetensors/.npz with mu, sigma) for "fid" (required for real models).
        n_samples: sample images kept per config for the report.
        call_kwargs: extra keyword arguments for every pipeline call (e.g. guidance_scale).
    """
    t_start = time.time()
    configs = list(configs)
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        raise ValueError(f"unknown config(s) {bad}; choose from {', '.join(CONFIGS)}")
    if len(set(configs)) != len(configs):
        raise ValueError(f"duplicate configs in {configs}")
    testbed = _is_testbed(model)
    notes: list[str] = []

    # ---------------------------------------------------------------- prompts, seeds
    if prompts is None:
        if not testbed:
            raise ValueError("pass prompts for a real model, e.g. prompts=load_prompts('meta_data.json') "
                             "(MJHQ-30K) or a text file")
        prompts = load_prompts("testbed-heldout", n=n_images or TESTBED_DEFAULT_N, seed=seed)
    elif not isinstance(prompts, PromptSet):
        prompts = load_prompts(prompts)
    n = int(n_images) if n_images is not None else len(prompts)
    if n < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    all_prompts = [prompts.prompts[i % len(prompts)] for i in range(n)]
    all_labels = None if prompts.labels is None else [prompts.labels[i % len(prompts)] for i in range(n)]
    seeds = [seed + i for i in range(n)]
    bs = int(batch_size) if batch_size else (50 if testbed else 4)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    # ---------------------------------------------------------------- schedules, steps
    given = [s for s in (qsched_schedule, fp_schedule) if s is not None]
    T = int(steps) if steps is not None else (int(given[0].steps) if given else default_steps(model))
    for name, s in (("qsched_schedule", qsched_schedule), ("fp_schedule", fp_schedule)):
        if s is not None and s.steps != T:
            raise ValueError(f"{name} has {s.steps} steps but the evaluation uses steps={T}")
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

        pipe = load_pipeline(model, device=device)
    from qsched.quantization import quant_spec_of, quantize

    den_name, fp_den = _denoiser_of(pipe)
    loaded_spec = quant_spec_of(fp_den)
    if loaded_spec is not None:
        fp_rows = [c for c in run_cfgs if c.startswith("fp-")]
        if fp_rows:
            notes.append(f"{', '.join(fp_rows)} skipped: the loaded model is already quantized ({loaded_spec})")
        run_cfgs = [c for c in run_cfgs if not c.startswith("fp-")]
        if spec is not None and str(spec).lower() != loaded_spec:
            notes.append(f"the loaded model is quantized as {loaded_spec}; spec={spec!r} ignored")
        spec = loaded_spec
    call = {**call_defaults(model), **(call_kwargs or {})}

    # ---------------------------------------------------------------- metrics
    metric_names = [m for m in (metrics or ()) if isinstance(m, str)]
    metric_objs: list[EvalMetric] = [m for m in (metrics or ()) if not isinstance(m, str)]
    metric_objs = build_metrics(model, metric_names, device=device, fid_ref=fid_ref, notes=notes) + metric_objs
    if all_labels is None:
        acc = [m for m in metric_objs if isinstance(m, AccuracyMetric)]
        if acc:
            notes.append("accuracy skipped: the prompt set has no class labels")
            metric_objs = [m for m in metric_objs if not isinstance(m, AccuracyMetric)]

    # ---------------------------------------------------------------- run: fp rows first, then quantized
    order = [c for c in run_cfgs if c.startswith("fp-")] + [c for c in run_cfgs if c in _QUANT_CONFIGS]
    rows: dict[str, dict[str, Any]] = {}
    samples: dict[str, np.ndarray] = {}
    swap = _SchedulerSwap(pipe)
    qden = None
    quant_info: dict[str, Any] = {}
    prog = _make_progress(progress)
    try:
        with (prog if prog is not None else _NullProgress()):
            for cfg in order:
                if cfg in _QUANT_CONFIGS and loaded_spec is None and qden is None:
                    t0 = time.time()
                    qden = copy.deepcopy(fp_den)
                    summary = quantize(qden, spec=spec)
                    quant_info = {"quantize_seconds": time.time() - t0, "summary": _summary_dict(summary)}
                    setattr(pipe, den_name, qden)
                task = prog.add_task(cfg, total=n) if prog is not None else None
                swap.set(schedules[cfg], T)
                for m in metric_objs:
                    m.reset()
                gen_s = 0.0
                n_nonfinite = 0
                kept: list[np.ndarray] = []
                for start in range(0, n, bs):
                    end = min(start + bs, n)
                    ps, ss = all_prompts[start:end], seeds[start:end]
                    ls = None if all_labels is None else all_labels[start:end]
                    t0 = time.time()
                    imgs = _generate(pipe, ps, ss, T, call)
                    gen_s += time.time() - t0
                    if imgs.shape[0] != len(ps):
                        raise RuntimeError(f"the pipeline returned {imgs.shape[0]} images for {len(ps)} prompts")
                    finite = torch.isfinite(imgs.reshape(imgs.shape[0], -1)).all(dim=1)
                    n_nonfinite += int((~finite).sum())
                    for m in metric_objs:
                        m.update(imgs, ps, ls, finite)
                    if sum(k.shape[0] for k in kept) < n_samples:
                        kept.append(_to_uint8(imgs[: n_samples - sum(k.shape[0] for k in kept)]))
                    if task is not None:
                        prog.update(task, advance=end - start)
                row: dict[str, Any] = {}
                for m in metric_objs:
                    row.update(m.compute())
                row.update({"n_images": n, "n_nonfinite": n_nonfinite, "gen_seconds": gen_s,
                            "images_per_s": n / gen_s if gen_s > 0 else None,
                            "precision": "quantized" if cfg in _QUANT_CONFIGS else "full",
                            "schedule": schedules[cfg].kind if schedules[cfg] is not None else "original"})
                if n_nonfinite:
                    notes.append(f"{cfg}: {n_nonfinite} of {n} images contain NaN/inf (excluded from FD/FID and "
                                 "CLIPScore, counted wrong in accuracy, worst score in JAQ)")
                rows[cfg] = row
                if kept:
                    samples[cfg] = np.concatenate(kept)
    finally:
        swap.restore()
        if qden is not None:
            setattr(pipe, den_name, fp_den)

    rows = {c: rows[c] for c in configs if c in rows}
    n_keep = min(n_samples, n)
    return EvalResult(
        rows=rows, model=str(model), spec=None if spec is None else str(spec), steps=T, seeds=seeds,
        prompt_set=prompts.name, n_images=n, configs=list(rows), metrics=[*metric_names] + [
            type(m).__name__ for m in metrics or () if not isinstance(m, str)],
        schedules={c: (schedules[c].to_dict() if schedules[c] is not None else None) for c in rows},
        prompts=all_prompts, notes=notes, versions=package_versions(), command=" ".join(sys.argv),
        args=_jsonable({"model": model, "spec": spec, "steps": T, "n_images": n, "seed": seed, "batch_size": bs,
                        "device": device, "configs": configs, "fid_ref": fid_ref, "call_kwargs": call,
                        "quantization": quant_info, "total_seconds": time.time() - t_start}),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        sample_prompts=all_prompts[:n_keep], sample_seeds=seeds[:n_keep], samples=samples,
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


class _NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _make_progress(enabled: bool) -> Any:
    """A rich Progress (or None when disabled)."""
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:>14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())

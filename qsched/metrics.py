"""Streaming evaluation metrics: images arrive batch by batch, numbers come out at the end.

Each metric keeps a mergeable state (``state()`` / ``merge()``) so that a run sharded across processes gathers
exactly the numbers of a single-process run. :func:`build_metrics` makes the standard ones for a model: testbed FD
in the classifier's features and class accuracy (:mod:`qsched.testbed.metrics`), CLIPScore and JAQ
(:func:`qsched.scoring.make_jaq`), and Inception FID. Images with NaN/inf are excluded from FD/FID and CLIPScore,
count as misclassified, and get the worst JAQ (the scorer handles that).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from qsched.errors import QSchedError
from qsched.frechet import feature_stats, frechet_distance, load_reference_stats
from qsched.pipelines import ModelSpec, resolve_model

__all__ = ["EvalMetric", "FrechetMetric", "AccuracyMetric", "JAQMetric", "build_metrics", "KNOWN_METRICS",
           "TESTBED_ONLY_METRICS"]

KNOWN_METRICS: tuple[str, ...] = ("fd", "fd2", "accuracy", "clipscore", "jaq", "fid")
TESTBED_ONLY_METRICS: tuple[str, ...] = ("fd", "fd2", "accuracy")


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

    def per_image(self) -> dict[str, np.ndarray]:
        """Per-image arrays aligned with the images seen (for paired bootstraps, :mod:`qsched.paired`); {} if the
        metric keeps none."""
        return {}

    def state(self) -> dict[str, Any]:
        """The accumulated state (picklable), gathered from every process in a distributed evaluation."""
        return {k: v for k, v in vars(self).items() if k.startswith("_s_")}

    def merge(self, states: Sequence[dict[str, Any]]) -> None:
        """Replace the state by the concatenation of ``states`` (in process order = image order)."""
        self.reset()
        for st in states:
            for k, v in st.items():
                cur = getattr(self, k)
                setattr(self, k, cur + v)


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
        self._s_feats: list[np.ndarray] = []
        self._s_finite: list[bool] = []

    def update(self, images, prompts, labels, finite) -> None:
        self._s_finite += finite.cpu().tolist()
        if bool(finite.any()):
            f = self._features(images[finite])
            f = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
            self._s_feats.append(np.asarray(f, dtype=np.float64).reshape(f.shape[0], -1))

    def compute(self) -> dict[str, float | None]:
        n = sum(f.shape[0] for f in self._s_feats)
        if n < 2:
            return {self.key: None}
        mu, sigma = feature_stats(np.concatenate(self._s_feats))
        return {self.key: frechet_distance(mu, sigma, *self._reference())}

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """The reference (mu, sigma)."""
        return self._reference()

    def per_image(self) -> dict[str, np.ndarray]:
        """``{key: (N, D) features}``; rows of non-finite images are 0 (masked by ``finite`` in a comparison)."""
        ok = np.asarray(self._s_finite, dtype=bool)
        if not self._s_feats:
            return {}
        f = np.concatenate(self._s_feats)
        out = np.zeros((ok.size, f.shape[1]), dtype=np.float64)
        out[ok] = f
        return {self.key: out}


class AccuracyMetric(EvalMetric):
    """Fraction of images whose predicted class equals the prompt label; non-finite images count as wrong."""

    keys = ("accuracy",)

    def __init__(self, predict: Callable[[torch.Tensor], Any]):
        self._predict = predict
        self.reset()

    def reset(self) -> None:
        self._s_correct = 0
        self._s_total = 0
        self._s_hits: list[bool] = []

    def update(self, images, prompts, labels, finite) -> None:
        if labels is None:
            raise QSchedError("the 'accuracy' metric needs class labels: use a labelled PromptSet "
                              "(testbed-heldout / testbed-calib) or drop 'accuracy' from metrics")
        y = torch.as_tensor(list(labels), dtype=torch.long)
        self._s_total += int(y.shape[0])
        hits = torch.zeros(y.shape[0], dtype=torch.bool)
        if bool(finite.any()):
            pred = torch.as_tensor(self._predict(images[finite])).reshape(-1).cpu().long()
            hits[finite.cpu()] = pred == y[finite.cpu()]
            self._s_correct += int(hits.sum())
        self._s_hits += hits.tolist()

    def per_image(self) -> dict[str, np.ndarray]:
        return {"accuracy": np.asarray(self._s_hits, dtype=bool)}

    def compute(self) -> dict[str, float | None]:
        return {"accuracy": self._s_correct / self._s_total if self._s_total else None}


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
        self._s_tc: list[float] = []
        self._s_iq: list[float] = []
        self._s_valid: list[bool] = []
        self._k = float(getattr(self.jaq, "k", 2.0))

    def update(self, images, prompts, labels, finite) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # invalid images are counted, not warned per batch
            s = self.jaq.score(images, list(prompts))
        self._k = float(s.k)
        self._s_tc += list(s.tc_per_image)
        self._s_iq += list(s.iq_per_image)
        from qsched.scoring import invalid_mask

        nonfinite, blank = invalid_mask(images)
        self._s_valid += (~(nonfinite | blank)).tolist()

    def per_image(self) -> dict[str, np.ndarray]:
        """``{"jaq": TC + k IQ per image}`` (the per-image terms of the row's JAQ)."""
        return {"jaq": np.asarray(self._s_tc, np.float64) + self._k * np.asarray(self._s_iq, np.float64)}

    def compute(self) -> dict[str, float | None]:
        if not self._s_tc:
            return {"jaq": None, "clipscore": None, "iq": None, "n_invalid": 0}
        tc, iq, ok = np.asarray(self._s_tc), np.asarray(self._s_iq), np.asarray(self._s_valid, dtype=bool)
        return {
            "jaq": float(tc.mean() + self._k * iq.mean()),
            "clipscore": float(tc[ok].mean()) if ok.any() else None,
            "iq": float(iq[ok].mean()) if ok.any() else None,
            "n_invalid": int((~ok).sum()),
        }


def build_metrics(model: str | ModelSpec, names: Sequence[str], device: str | torch.device = "cpu",
                  fid_ref: str | Path | None = None, notes: list[str] | None = None) -> list[EvalMetric]:
    """Build the streaming metrics ``names`` for ``model`` (a ModelSpec, or an alias/path resolved once).

    Testbed-only metrics ("fd", "accuracy") are skipped with a note for real models. "fid" on a real model needs
    ``fid_ref`` (reference statistics file).
    """
    notes = notes if notes is not None else []
    unknown = [n for n in names if n not in KNOWN_METRICS]
    if unknown:
        raise QSchedError(f"unknown metric(s) {unknown}; choose from {', '.join(KNOWN_METRICS)}")
    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    testbed = spec.is_testbed
    out: list[EvalMetric] = []
    if testbed and ("fd" in names or "accuracy" in names):
        from qsched.testbed.metrics import ClassifierFD

        cfd = ClassifierFD(device=device)
        if "fd" in names:
            out.append(FrechetMetric("fd", cfd.features, lambda: cfd.reference))
        if "accuracy" in names:
            out.append(AccuracyMetric(cfd.predict))
    if testbed and "fd2" in names:  # an independently trained extractor: FD not in the classifier's own features
        from qsched.testbed.features2 import features2_reference, load_features2

        out.append(FrechetMetric("fd2", load_features2(device), features2_reference))
    if not testbed:
        for n in TESTBED_ONLY_METRICS:
            if n in names:
                notes.append(f"metric {n!r} is testbed-only (classifier features); skipped for {spec.alias}")
    if "clipscore" in names or "jaq" in names:
        from qsched.scoring import MissingWeightsError, make_jaq

        preset = spec.jaq_preset
        try:
            out.append(JAQMetric(make_jaq(preset, device=device)))
        except (MissingWeightsError, ImportError) as e:
            if testbed:
                raise
            notes.append(f"clipscore/jaq skipped: the {preset!r} scorer weights are not available ({e})")
    if "fid" in names:
        from qsched.testbed.metrics import InceptionFID

        if fid_ref is None and not testbed:
            raise QSchedError("FID on a real model needs reference statistics: pass fid_ref=<.safetensors/.npz with "
                              "mu and sigma> (e.g. MJHQ-30K Inception statistics)")
        if fid_ref is None:
            ifid = InceptionFID(device=device)
            out.append(FrechetMetric("fid", ifid.features, lambda: ifid.reference))
        else:
            ref = load_reference_stats(fid_ref)
            ifid = InceptionFID(ref_path=fid_ref if str(fid_ref).endswith(".safetensors") else None, device=device)
            out.append(FrechetMetric("fid", ifid.features, lambda: ref))
    return out

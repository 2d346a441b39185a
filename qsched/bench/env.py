"""What the benchmark runs on: the model and its scorers (:class:`BenchEnv`), the lazily loaded pipelines
(:class:`Models`) and the machine description recorded with the results."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from qsched._util import PACKAGES, package_versions

__all__ = ["BenchEnv", "Models", "machine_info", "versions", "git_commit"]


@dataclass
class BenchEnv:
    """What the benchmark runs on; everything injectable for tests.

    ``load_pipe`` returns the full-precision pipeline (called at most once per process, lazily, only when a
    unit has to run); ``jaq`` builds the calibration score; ``eval_metrics`` / ``fid_metrics`` build fresh
    evaluation metrics (None: evaluate's own "fd", "accuracy", "jaq" / "fid"); ``name`` enters every unit's key.
    With ``jobs > 1`` the env is sent to the worker processes, so its callables must be picklable (module-level
    functions or ``functools.partial`` of them, as in :meth:`testbed`).
    """

    load_pipe: Callable[[], Any]
    jaq: Callable[[], Any]
    name: str = "testbed-student"
    eval_metrics: Callable[[], list[Any]] | None = None
    fid_metrics: Callable[[], list[Any]] | None = None
    model: str = "testbed"
    fid_reference: str = ""  # identifies the FID reference statistics (FID units are keyed by it)
    evaluator: Callable[[], Any] | None = None  # -> .features(images), .predict(images), .reference (mu, sigma)
    features2: Callable[[], Any] | None = None  # -> (features(images), (mu, sigma)) of an independent extractor
    scorer: str = ""  # identifies the JAQ scorer's weights: units that calibrate or score JAQ are keyed by it

    @property
    def key(self) -> str:
        """What keys units whose results depend on the JAQ scorer: the model name, plus the scorer if known (a
        retrained tiny CLIP must not reuse calibrations made with another one)."""
        return f"{self.name}+scorer-{self.scorer}" if self.scorer else self.name

    @classmethod
    def testbed(cls, variant: str = "student") -> "BenchEnv":
        """The shipped testbed model with its scorers (classifier FD/accuracy, tiny-CLIP JAQ, Inception FID)."""
        from qsched.scoring import make_jaq
        from qsched.testbed.metrics import FID_REF_FILE
        from qsched.testbed.pipeline import WEIGHTS_DIR, load_testbed_pipeline
        from qsched.testbed.weights_io import file_digest

        w = WEIGHTS_DIR / f"{variant}.safetensors"
        if not w.exists():
            raise FileNotFoundError(f"testbed weights missing: {w} (train them with "
                                    f"`python -m qsched.testbed.train_{variant}`)")
        digest = file_digest(w, 8)  # units are keyed by the weights they measured
        ref = WEIGHTS_DIR / FID_REF_FILE
        ref_id = file_digest(ref, 8) if ref.exists() else ""
        from qsched.testbed.metrics import ClassifierFD

        clip = WEIGHTS_DIR / "tiny_clip.safetensors"
        return cls(load_pipe=functools.partial(load_testbed_pipeline, variant),
                   jaq=functools.partial(make_jaq, "testbed"), name=f"testbed-{variant}-{digest}",
                   fid_reference=ref_id, evaluator=ClassifierFD, features2=_features2,
                   scorer=file_digest(clip, 8) if clip.exists() else "")

    def call_kwargs(self) -> dict[str, Any]:
        """Pipeline call defaults of ``model`` (guidance, resolution, ...; none for the testbed)."""
        from qsched.pipelines import resolve_model

        return resolve_model(self.model).call_defaults()


def _features2() -> tuple[Callable[[Any], Any], Any]:
    """The independently trained extractor of the testbed and its reference statistics (picklable for --jobs)."""
    from qsched.testbed.features2 import features2_reference, load_features2

    return load_features2(), features2_reference()


class Models:
    """The lazily loaded full-precision pipeline and its quantized siblings (``quantized_copy``: same text encoder,
    own scheduler), cached per precision."""

    def __init__(self, env: BenchEnv):
        self.env = env
        self._fp: Any = None
        self._q: dict[str, Any] = {}
        self.loads = 0
        self._tc_max: int | None = None
        self._tc_stack = contextlib.ExitStack()

    @property
    def fp(self) -> Any:
        """The full-precision pipeline (loaded on first use)."""
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
            from qsched.cache import ForwardCache

            self._tc_stack.enter_context(ForwardCache(max_entries=self._tc_max, name="text_encoder").attach(enc))

    @contextlib.contextmanager
    def text_cache(self, max_entries: int) -> Iterator[None]:
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
        """(name, module) of the full-precision pipeline's denoiser."""
        from qsched.runner import denoiser_of

        return denoiser_of(self.fp)

    def pipe(self, precision: str, keep_packed: bool = False) -> Any:
        """The fp32 pipeline or a cached quantized copy (``keep_packed``: no cached float weights)."""
        if precision == "fp32":
            return self.fp
        key = f"{precision}{' keep_packed' if keep_packed else ''}"
        if key not in self._q:
            from qsched.quantization import quantized_copy

            self._q[key] = quantized_copy(self.fp, precision, keep_packed=keep_packed)[0]
        return self._q[key]


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
    """Versions of qsched and of the packages that determine the numbers (``qsched`` from ``qsched.__version__``)."""
    import qsched

    return {**package_versions((*PACKAGES, "rich", "filelock")), "qsched": qsched.__version__}


def git_commit() -> str | None:
    """The commit the run measured, from ``QSCHED_GIT_COMMIT`` when set (qsched never runs git itself)."""
    return os.environ.get("QSCHED_GIT_COMMIT") or None

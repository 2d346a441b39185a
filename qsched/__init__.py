"""qsched: quantization-aware scheduling (Q-Sched, arXiv 2509.01624) for few-step diffusion models.

Public API (imported lazily so that ``import qsched`` stays fast):

    Schedule, QSchedScheduler, apply_schedule          -- per-step coefficients (schedule.py, scheduler.py)
    quantize, quantized_copy, quant_spec_of, QuantSpec -- denoiser quantization (quantization.py)
    compile_quantized, KernelSummary                   -- real int8 kernels for a quantized denoiser (kernels.py)
    save_quantized, load_quantized, CheckpointError    -- quantized checkpoints, diffusers layout (checkpoint.py)
    QSchedConfig                                       -- diffusers quantization_config (hf_quantizer.py)
    load_pipeline, MODELS                              -- diffusers pipelines and the testbed (pipelines.py)
    JAQ, calibrate, CalibrationResult                  -- scoring and search (scoring.py, calibrate.py)
    evaluate                                           -- side-by-side evaluation (evaluate.py)
    QSchedError, CorruptFileError, OutputError         -- the package's errors (ValueError subclasses; errors.py)

Every name above is that object on every access: importing a submodule of the same name (``qsched.calibrate``,
``qsched.evaluate``) does not replace the function on the package (use ``sys.modules["qsched.calibrate"]`` or
``from qsched.calibrate import ...`` for the module). ``import qsched`` also makes every folder qsched writes
loadable by plain diffusers: ``qsched.scheduler`` is registered (lazily) in ``sys.modules``, where diffusers looks
for a saved ``QSchedScheduler``, the ``"qsched"`` quantizer is added to diffusers' quantizer mappings as soon as
diffusers loads them, and qsched's pipeline classes (``TestbedPipeline``) become attributes of the ``diffusers``
module, imported on first access. None of this imports diffusers or torch before they are needed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import types
import warnings
from typing import Any

# Busy-waiting OpenMP worker threads made CPU inference ~25x slower whenever another process shared the cores
# (measured: 3.3 s vs 0.12 s per testbed UNet forward on a 2-core machine). Sleeping workers cost nothing when
# the machine is idle. Only effective if qsched is imported before torch; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_EXPORTS = {
    "Schedule": "qsched.schedule",
    "QSchedScheduler": "qsched.scheduler",
    "apply_schedule": "qsched.scheduler",
    "QuantSpec": "qsched.quantization",
    "quantize": "qsched.quantization",
    "save_quantized": "qsched.checkpoint",
    "load_quantized": "qsched.checkpoint",
    "CheckpointError": "qsched.checkpoint",
    "QSchedConfig": "qsched.hf_quantizer",
    "quant_spec_of": "qsched.quantization",
    "quantized_copy": "qsched.quantization",
    "compile_quantized": "qsched.kernels",
    "KernelSummary": "qsched.kernels",
    "load_pipeline": "qsched.pipelines",
    "MODELS": "qsched.pipelines",
    "JAQ": "qsched.scoring",
    "calibrate": "qsched.calibrate",
    "CalibrationResult": "qsched.calibrate",
    "evaluate": "qsched.evaluate",
    "QSchedError": "qsched.errors",
    "CorruptFileError": "qsched.errors",
    "OutputError": "qsched.errors",
    # diffusers < 0.42 records saved components as ["qsched", cls] and checks the base class on the package.
    "SchedulerMixin": "diffusers",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        obj = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = obj  # cached; _Package.__setattr__ keeps a same-named submodule from replacing it
        return obj
    raise AttributeError(f"module 'qsched' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy exports too (``dir(qsched)``, tab completion), not only what has been imported."""
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The qsched package's module type: when the import system binds a freshly imported submodule whose name is
    also an export (``qsched.calibrate``, ``qsched.evaluate``), the documented export is bound instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


# diffusers module -> qsched module (or "module:function" to call) to run right after it: the quantizer registers
# itself into diffusers' mappings; diffusers resolves a saved ["qsched.scheduler", "QSchedScheduler"] component from
# sys.modules; DiffusionPipeline.from_pretrained resolves a model_index.json's "_class_name" (TestbedPipeline) as an
# attribute of the diffusers module, which qsched.components provides (imported on first access).
_AFTER = {"diffusers": "qsched.components:expose_pipelines",
          "diffusers.quantizers.auto": "qsched.hf_quantizer",
          "diffusers.pipelines.pipeline_loading_utils": "qsched.scheduler"}


def _import_companion(name: str) -> None:
    try:
        module, _, function = name.partition(":")
        module = importlib.import_module(module)
        if function:
            getattr(module, function)()
    except Exception as e:  # an incompatible diffusers must not break diffusers itself
        warnings.warn(f"qsched could not import {name} after diffusers ({type(e).__name__}: {e}); folders saved by "
                      "qsched may not load through diffusers' from_pretrained", RuntimeWarning, stacklevel=2)


class _AfterLoad(importlib.abc.Loader):
    """Wraps a module's loader to import its qsched companion right after the module has executed."""

    def __init__(self, loader: Any, companion: str) -> None:
        self._loader, self._companion = loader, companion

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        _import_companion(self._companion)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _DiffusersHook(importlib.abc.MetaPathFinder):
    """Import hook (removes itself when done): imports the ``_AFTER`` companions once diffusers loads the modules
    they extend, so ``import qsched`` neither imports diffusers nor needs to come after it."""

    def __init__(self, pending: dict[str, str]) -> None:
        self.pending = pending

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        companion = self.pending.pop(fullname, None)
        if companion is None:
            return None
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is not None and spec.loader is not None:
            spec.loader = _AfterLoad(spec.loader, companion)
        return spec


def _install_hook() -> None:
    pending = {}
    for module, companion in _AFTER.items():
        if module in sys.modules:
            _import_companion(companion)
        else:
            pending[module] = companion
    if pending and not any(isinstance(f, _DiffusersHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _DiffusersHook(pending))


_install_hook()

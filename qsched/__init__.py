"""qsched: quantization-aware scheduling (Q-Sched, arXiv 2509.01624) for few-step diffusion models.

Public API (imported lazily so that ``import qsched`` stays fast):

    Schedule, QSchedScheduler, apply_schedule          -- per-step coefficients (schedule.py, scheduler.py)
    quantize, save_quantized, load_quantized, QuantSpec -- denoiser quantization (quantization.py)
    load_pipeline, MODELS                              -- diffusers pipelines and the testbed (pipelines.py)
    JAQ, calibrate, CalibrationResult                  -- scoring and search (scoring.py, calibrate.py)
    evaluate                                           -- side-by-side evaluation (evaluate.py)
"""

from __future__ import annotations

import importlib
import os
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
    "save_quantized": "qsched.quantization",
    "load_quantized": "qsched.quantization",
    "quant_spec_of": "qsched.quantization",
    "load_pipeline": "qsched.pipelines",
    "MODELS": "qsched.pipelines",
    "JAQ": "qsched.scoring",
    "calibrate": "qsched.calibrate",
    "CalibrationResult": "qsched.calibrate",
    "evaluate": "qsched.evaluate",
    # diffusers < 0.42 records saved components as ["qsched", cls] and checks the base class on the package.
    "SchedulerMixin": "diffusers",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qsched' has no attribute {name!r}")

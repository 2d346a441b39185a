"""Regenerate BENCHMARKS.md from scratch: Q-Sched on the testbed (quality, search cost, size and speed).

    python -m qsched.bench [--quick] [--jobs N] [--out BENCHMARKS.md] [--work runs/bench] [--fresh] [--fid-rows ...]
    qsched bench ...                     (the same command inside the main CLI)

Three sections, every number measured by this command on this machine:

1. **Quality** (:mod:`.quality`, the paper's Table 1 on the testbed): for each number of steps and precision
   (fp32, w8a8, w4a8, w4a4), rows = the original schedule; Q-Sched with the paper's ``linear`` parametrization;
   Q-Sched with the parametrization (linear / ramp / per-step) that reached the best *calibration* JAQ (selection
   never looks at evaluation metrics); and fp32 with a schedule calibrated on the fp32 model (the control the paper
   omits). Metrics on held-out prompts (``testbed-heldout``, disjoint from the ``testbed-calib`` calibration
   prompts): FD in the testbed classifier's features, class accuracy, JAQ, and Inception FID for chosen 4-step
   rows. Every row uses the same prompts and the same per-image seeds.
2. **Search cost** (:mod:`.search`): the paper's exhaustive 50x50 grid over [0.8, 1.2]^2 against Optuna TPE
   (several sampler seeds): best calibration JAQ per denoiser forwards spent, and the forwards TPE needs to match
   the grid's best (within 0.05 and exactly), as a share of the grid's.
3. **Size and speed** (:mod:`.size_speed`): denoiser bytes on disk (fp32, fp16, packed w8 / w4) and resident;
   images/s and ms per denoising step for fp32, simulated w4a8 and keep_packed w4a8 (interleaved repeats,
   medians); the QSchedScheduler wrapper's cost per step; the SD1.5-sized UNet numbers (:mod:`.sd15`).

Resumable (:mod:`.units`): each expensive unit writes ``result.json`` in its own directory under ``--work`` (named
by a hash of its settings) and is skipped when present, so a killed run continues where it stopped
(calibrations also resume their Optuna study mid-way). ``--fresh`` deletes the stored units first. ``--quick``
runs a reduced configuration (stated in the output) in a few minutes. BENCHMARKS.md (:mod:`.render`) is rewritten
after every unit, so a long run can be watched.
"""

from __future__ import annotations

import importlib
from typing import Any

from qsched.bench.settings import PRECISIONS, ROW_LABELS, BenchSettings, parse_fid_rows

_LAZY = {  # torch-heavy parts load on first use (the main CLI imports qsched.bench.cli for --help)
    "BenchEnv": "qsched.bench.env",
    "run_bench": "qsched.bench.driver",
    "headline_table": "qsched.bench.render",
    "render_markdown": "qsched.bench.render",
    "main": "qsched.bench.cli",
}

__all__ = ["BenchSettings", "BenchEnv", "run_bench", "headline_table", "render_markdown", "parse_fid_rows", "main",
           "PRECISIONS", "ROW_LABELS"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qsched.bench' has no attribute {name!r}")

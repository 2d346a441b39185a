"""What the benchmark runs: :class:`BenchSettings` (the ``full()`` and ``quick()`` presets) and the FID-row parser."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Sequence

from qsched import defaults

__all__ = ["BenchSettings", "parse_fid_rows", "PRECISIONS", "PARAMETRIZATIONS", "ROW_LABELS", "DEFAULT_FID_ROWS",
           "LABEL_ALIASES"]

PRECISIONS = ("fp32", "w8a8", "w4a8", "w4a4")
PARAMETRIZATIONS = ("linear", "ramp", "per-step")
#: Row labels of section 1 (per steps and precision).
ROW_LABELS = ("original", "qsched-linear", "qsched-best", "fp32-tuned")
LABEL_ALIASES = {"original": "original", "naive": "original", "qsched": "qsched-best", "best": "qsched-best",
                 "qsched-best": "qsched-best", "linear": "qsched-linear", "qsched-linear": "qsched-linear",
                 "tuned": "fp32-tuned", "fp32-tuned": "fp32-tuned"}
DEFAULT_FID_ROWS = "all"  # every 4-step row (rows that share a schedule share one FID unit)


@dataclass
class BenchSettings:
    """What the benchmark runs (``full()`` and ``quick()`` are the two presets; fields can be overridden)."""

    mode: str = "full"
    steps: tuple[int, ...] = (1, 2, 4, 8)
    precisions: tuple[str, ...] = PRECISIONS
    parametrizations: tuple[str, ...] = PARAMETRIZATIONS
    headline_steps: int = 4
    calib_prompts: int = 20
    val_prompts: int = defaults.VALIDATION_PROMPTS  # testbed-calib, disjoint from the search prompts
    calib_trials: int = 50
    calib_seed: int = 0
    calib_draws: int = 3  # section 1: calibration draws per Q-Sched row (other prompts and TPE seed per draw)
    eval_images: int = 5000
    eval_seed: int = 10_000
    eval_batch: int = 50
    fid_images: int = 2000
    fid_rows: tuple[tuple[str, str], ...] | None = None  # None: DEFAULT_FID_ROWS
    default_draws: int = 3  # the default-path section: calibration draws per (steps, spec)
    default_images: int = 5000  # held-out images per default-path row
    default_specs: tuple[str, ...] = ("w8a8", "w4a8", "w4a4")  # quantization specs of the default-path section
    default_search_prompts: int = defaults.SEARCH_PROMPTS
    default_val_prompts: int = defaults.VALIDATION_PROMPTS
    default_trials: int = defaults.TRIALS
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
    sd15: str = "run"  # "run" qsched.bench.sd15 (in-process), "read" an earlier unit's result only, "skip"
    sd15_json: str | None = None
    kernels_json: str | None = None  # real-kernel numbers written by python -m qsched.bench.kernels
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.fid_rows = parse_fid_rows(DEFAULT_FID_ROWS) if self.fid_rows is None else tuple(
            tuple(r) for r in self.fid_rows)  # type: ignore[misc]
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
        from qsched.qformat import QuantSpec

        if not self.default_specs:
            raise ValueError("default_specs must name at least one quantization spec")
        self.default_specs = tuple(QuantSpec.parse(x).name for x in self.default_specs)
        if self.sd15 not in ("run", "read", "skip"):
            raise ValueError(f"sd15 must be 'run', 'read' or 'skip', got {self.sd15!r}")
        for name in ("calib_prompts", "val_prompts", "calib_trials", "calib_draws", "default_draws", "default_images",
                     "default_search_prompts", "default_val_prompts", "default_trials", "eval_images", "fid_images",
                     "eval_batch", "grid_points", "search_trials", "speed_batch", "speed_steps", "speed_repeats"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and int(self.threads) < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    @classmethod
    def full(cls, **kw: Any) -> "BenchSettings":
        """The full benchmark (hours on a 2-core CPU; see :func:`qsched.bench.run_bench`)."""
        return cls(**kw)

    @classmethod
    def quick(cls, **kw: Any) -> "BenchSettings":
        """A few minutes on a 2-core CPU: 4 steps only, fewer prompts, trials and images; no FID rows (the Inception
        network at 299x299 and the 2048-d statistics are slow on a CPU; ask with ``fid_rows``); SD1.5
        numbers read from an earlier run if present (never run)."""
        base: dict[str, Any] = dict(
            mode="quick", steps=(4,), calib_prompts=10, val_prompts=6, calib_trials=6, calib_draws=2, default_draws=2,
            default_images=48, default_search_prompts=6, default_val_prompts=6, default_trials=6, eval_images=96, eval_batch=48,
            fid_images=48, fid_rows=(), grid_points=5, search_trials=8, search_seeds=(0, 1, 2), speed_batch=8,
            speed_repeats=5, overhead_calls=800, sd15="read")
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
        if not sep or prec not in PRECISIONS or label not in LABEL_ALIASES:
            raise ValueError(f"bad FID row {item!r}: use PRECISION:LABEL with PRECISION in {', '.join(PRECISIONS)} "
                             f"and LABEL in original, qsched-linear, qsched-best (or qsched), fp32-tuned; "
                             "e.g. 'fp32:original,w4a8:qsched', or 'all'")
        out.append((prec, LABEL_ALIASES[label]))
    return tuple(dict.fromkeys(out))

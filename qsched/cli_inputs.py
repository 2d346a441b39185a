"""Input checks of the ``qsched`` command line: each turns a bad value into a :class:`UsageError` naming it,
before any model loads (the CLI prints it as one ``error:`` line, exit code 2)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

from qsched.errors import QSchedError

__all__ = ["UsageError", "check_device", "check_model", "check_spec", "writable_dir", "ints", "seeds", "floats",
           "prompts_for", "check_finite", "check_steps", "one_line"]


class UsageError(QSchedError):
    """Bad command-line input."""


def one_line(e: BaseException) -> str:
    """An exception as one line (its message with whitespace collapsed; KeyError without quotes)."""
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        msg = str(e.args[0]) if e.args else msg
    return " ".join(msg.split())


def check_device(device: str) -> str:
    """Fail before any model loads on a device this machine does not have."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown --device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this machine has no CUDA GPU (torch {torch.__version__}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available on this machine")
    return device


def check_model(model: str) -> Any:
    """The model's ModelSpec (resolved once, passed down); fails early on a model that is neither an alias, a
    directory nor a hub id ("org/name")."""
    import re

    from qsched.pipelines import MODELS, resolve_model

    if not model.strip():
        raise UsageError(f"--model is empty; name an alias ({', '.join(MODELS)}), a saved pipeline or a hub id")
    if model in MODELS or Path(model).expanduser().exists():
        return resolve_model(model)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) and not model.startswith((".", "/", "~")):
        return resolve_model(model)  # a hub id: resolved (or reported missing) by the loader
    raise UsageError(f"unknown model {model!r}: not an alias ({', '.join(MODELS)}), not a directory and not a "
                     "hub id 'org/name'")


def check_spec(spec: str) -> str | None:
    """Canonical spec name, or None for "none"/"fp" (full precision)."""
    if spec.lower() in ("none", "fp", "fp32", "fp16", "full"):
        return None
    from qsched.quantization import QuantSpec

    try:
        return QuantSpec.parse(spec).name
    except ValueError as e:
        msg = one_line(e)
        raise UsageError(msg if spec in msg else f"unknown quantization spec {spec!r}: {msg}") from None


_created: list[Path] = []  # directories writable_dir made during the current command, outermost first


def writable_dir(path: Path, what: str = "output directory") -> Path:
    """Create ``path`` (a directory) if needed and check it is writable (a command that then fails removes it
    again while it is still empty: :func:`remove_created_if_empty`)."""
    new = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, FileExistsError) as e:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a directory" if blocker is not None else e.strerror or e
        raise UsageError(f"cannot create {what} {path}: {why}") from None
    if not path.is_dir():
        raise UsageError(f"{what} {path} exists and is not a directory")
    _created.extend(reversed(new))
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path} is not writable")
    return path


def remove_created_if_empty() -> None:
    """After a failed command: remove the directories it created that are still empty (never one holding a file,
    e.g. an interrupted calibration's study), so refused input leaves nothing behind."""
    while _created:
        try:
            _created.pop().rmdir()
        except OSError:
            pass


def forget_created() -> None:
    """At the start of a command: earlier commands' directories are theirs."""
    _created.clear()


def _numbers(text: str, what: str, cast: Callable[[str], Any], kind: str) -> list[Any]:
    parts = text.replace(" ", "").split(",")
    if not any(parts):
        raise UsageError(f"{what} is empty")
    if parts[-1] == "":
        parts = parts[:-1]  # a trailing comma is harmless
    if "" in parts:
        raise UsageError(f"{what} has an empty entry (entry {parts.index('') + 1} of {text!r})")
    try:
        vals = [cast(v) for v in parts]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated {kind}, got {text!r}") from None
    return vals


def ints(text: str, what: str) -> list[int]:
    return _numbers(text, what, int, "integers")


def seeds(values: list[int], what: str) -> list[int]:
    """``values`` if each is a base seed the runner accepts (0 to the largest whose image seeds fit in 63 bits),
    else a UsageError naming ``what``: checked before any model loads or output is written."""
    from qsched.runner import image_seed

    for v in values:
        try:
            image_seed(v, 0)
        except QSchedError as e:
            raise UsageError(f"{what}: {e}") from None
    return values


def floats(text: str, what: str) -> list[float]:
    vals = _numbers(text, what, float, "numbers")
    bad = [v for v in vals if not math.isfinite(v) or v <= 0]
    if bad:
        raise UsageError(f"{what} must be finite coefficients > 0, got {bad}")
    return vals


def prompts_for(path: Optional[Path], mspec: Any, n: int) -> Any:
    from qsched.prompts import load_prompts

    if n < 1:
        raise UsageError(f"--n-prompts must be >= 1, got {n}")
    if path is None:
        if not mspec.is_testbed:
            raise UsageError("pass --prompts FILE (one prompt per line, CSV, sDCI YAML...) for a real model")
        return load_prompts("testbed-calib", n=n)  # calibration wording: neither trained on nor evaluated on
    if not path.exists():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if path.is_file() and not path.read_text(encoding="utf-8", errors="replace").strip():
        raise UsageError(f"prompt file is empty: {path}")
    return load_prompts(str(path), n=n)


def check_finite(value: Optional[float], what: str) -> Optional[float]:
    if value is not None and not math.isfinite(value):
        raise UsageError(f"{what} must be a finite number, got {value}")
    return value


def check_steps(mspec: Any, steps: Optional[int], pipe: Any = None) -> Optional[int]:
    """``--steps`` against the model's scheduler: before loading for the testbed (its scheduler is known),
    else on the loaded pipeline's scheduler; a one-line error instead of the scheduler's own message."""
    if steps is None:
        return None
    if steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    from qsched.runner import check_steps

    if pipe is not None:
        return check_steps(pipe.scheduler, steps)
    if mspec.is_testbed:
        from qsched.testbed.pipeline import VARIANTS, _scheduler

        return check_steps(_scheduler(VARIANTS["student"]["scheduler"]), steps)
    return steps


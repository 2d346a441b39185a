"""Per-step Q-Sched coefficients.

A :class:`Schedule` holds two vectors of length ``T`` (the number of denoising steps):

* ``model_coeff`` (c^e): multiplies the denoiser's prediction (eps / velocity) at step ``i``;
* ``sample_coeff`` (c^x): multiplies the current sample at step ``i``;

both applied at the top of the scheduler step, before the unmodified update (see
:class:`qsched.scheduler.QSchedScheduler`). Step 0 is the noisiest step. All-ones is the original sampler.

Kinds and their searchable parameters (``Schedule.param_names(kind, steps)``):

* ``"linear"`` (the paper): ``model_start``, ``sample_start``; c = linspace(start, 1, T) ([start] for T = 1).
* ``"ramp"``: ``model_start``, ``model_end``, ``sample_start``, ``sample_end``; c = linspace(start, end, T).
* ``"per-step"``: ``model_0 .. model_{T-1}``, ``sample_0 .. sample_{T-1}``: free values.
* ``"identity"``: no parameters; all ones.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from qsched.errors import CorruptFileError, QSchedError, read_json

KINDS: tuple[str, ...] = ("linear", "ramp", "per-step", "identity")
_KIND_ALIASES = {"per_step": "per-step", "perstep": "per-step"}


def _canonical_kind(kind: str) -> str:
    k = _KIND_ALIASES.get(str(kind), str(kind))
    if k not in KINDS:
        raise QSchedError(f"Unknown schedule kind {kind!r}; expected one of {', '.join(KINDS)}.")
    return k


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or int(steps) < 1:
        raise QSchedError(f"steps must be an integer >= 1, got {steps!r}.")
    return int(steps)


# A coefficient scales one step's noise prediction or sample; the search spans 0.8-1.2 by default. Far outside
# that the sampler diverges (1e30 gave an all-NaN, all-black image without a word), so values above this fail.
MAX_COEFF = 10.0


def _check_value(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise QSchedError(f"Schedule parameter {name} must be a number, got {value!r}.") from None
    if not math.isfinite(v) or not 0.0 < v <= MAX_COEFF:
        raise QSchedError(f"Schedule parameter {name} must be finite, > 0 and <= {MAX_COEFF:g}, got {value!r}.")
    return v


def _linspace(start: float, end: float, steps: int) -> tuple[float, ...]:
    if steps == 1:
        return (float(start),)
    return tuple(float(v) for v in np.linspace(start, end, steps))


@dataclass(frozen=True)
class Schedule:
    """Per-step coefficients c^e (``model_coeff``) and c^x (``sample_coeff``), validated and immutable.

    Build with :meth:`linear`, :meth:`ramp`, :meth:`per_step`, :meth:`identity` or :meth:`from_params`.
    """

    model_coeff: tuple[float, ...]
    sample_coeff: tuple[float, ...]
    kind: str = "per-step"
    params: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        kind = _canonical_kind(self.kind)
        try:
            mc, sc = list(self.model_coeff), list(self.sample_coeff)
        except TypeError:
            raise QSchedError("model_coeff and sample_coeff must be sequences of numbers.") from None
        if len(mc) != len(sc):
            raise QSchedError(
                f"model_coeff and sample_coeff must have the same length, got {len(mc)} and {len(sc)}."
            )
        if len(mc) < 1:
            raise QSchedError("A schedule needs at least one step (T >= 1).")
        mc = tuple(_check_value(f"model_coeff[{i}]", v) for i, v in enumerate(mc))
        sc = tuple(_check_value(f"sample_coeff[{i}]", v) for i, v in enumerate(sc))
        params = dict(self.params)
        if kind == "per-step" and not params:
            params = {f"model_{i}": v for i, v in enumerate(mc)} | {f"sample_{i}": v for i, v in enumerate(sc)}
        params, emc, esc = _expand(kind, params, len(mc))
        if not (_close(mc, emc) and _close(sc, esc)):
            raise QSchedError(
                f"Coefficients do not match the {kind!r} parameters {params}: got c^e={list(mc)}, c^x={list(sc)}, "
                f"expected c^e={list(emc)}, c^x={list(esc)}."
            )
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "model_coeff", emc)
        object.__setattr__(self, "sample_coeff", esc)
        object.__setattr__(self, "params", params)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, model_start: float, sample_start: float, steps: int) -> "Schedule":
        """The paper's form: c^e = linspace(model_start, 1, T), c^x = linspace(sample_start, 1, T)."""
        return cls.from_params("linear", {"model_start": model_start, "sample_start": sample_start}, steps)

    @classmethod
    def ramp(
        cls, model_start: float, model_end: float, sample_start: float, sample_end: float, steps: int
    ) -> "Schedule":
        """Start->end form: c^e = linspace(model_start, model_end, T), likewise c^x."""
        params = {
            "model_start": model_start,
            "model_end": model_end,
            "sample_start": sample_start,
            "sample_end": sample_end,
        }
        return cls.from_params("ramp", params, steps)

    @classmethod
    def per_step(cls, model_coeff: Sequence[float], sample_coeff: Sequence[float]) -> "Schedule":
        """Free per-step values (equal lengths)."""
        mc, sc = list(model_coeff), list(sample_coeff)
        if len(mc) != len(sc):
            raise QSchedError(
                f"model_coeff and sample_coeff must have the same length, got {len(mc)} and {len(sc)}."
            )
        params = {f"model_{i}": v for i, v in enumerate(mc)}
        params.update({f"sample_{i}": v for i, v in enumerate(sc)})
        return cls.from_params("per-step", params, len(mc))

    @classmethod
    def identity(cls, steps: int) -> "Schedule":
        """All coefficients 1: the unmodified sampler."""
        return cls.from_params("identity", {}, steps)

    @staticmethod
    def param_names(kind: str, steps: int) -> list[str]:
        """Names of the free parameters of ``kind`` for ``steps`` steps (for a generic search)."""
        kind, steps = _canonical_kind(kind), _check_steps(steps)
        if kind == "linear":
            return ["model_start", "sample_start"]
        if kind == "ramp":
            return ["model_start", "model_end", "sample_start", "sample_end"]
        if kind == "per-step":
            return [f"model_{i}" for i in range(steps)] + [f"sample_{i}" for i in range(steps)]
        return []

    @classmethod
    def from_params(cls, kind: str, params: Mapping[str, Any], steps: int) -> "Schedule":
        """Build a schedule of ``kind`` from its named parameters (see :meth:`param_names`)."""
        kind, steps = _canonical_kind(kind), _check_steps(steps)
        p, mc, sc = _expand(kind, params, steps)
        return cls(model_coeff=mc, sample_coeff=sc, kind=kind, params=p)

    # ------------------------------------------------------------------ properties
    @property
    def steps(self) -> int:
        """Number of denoising steps T."""
        return len(self.model_coeff)

    @property
    def is_identity(self) -> bool:
        """True when every coefficient is exactly 1 (the unmodified sampler)."""
        return all(v == 1.0 for v in self.model_coeff) and all(v == 1.0 for v in self.sample_coeff)

    def coefficients(self, i: int) -> tuple[float, float]:
        """(c^e_i, c^x_i) for step ``i`` (0 = noisiest)."""
        if not 0 <= i < self.steps:
            raise QSchedError(f"Step index {i} is outside this {self.steps}-step schedule.")
        return self.model_coeff[i], self.sample_coeff[i]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: kind, steps, params and the expanded vectors."""
        return {
            "kind": self.kind,
            "steps": self.steps,
            "params": dict(self.params),
            "model_coeff": list(self.model_coeff),
            "sample_coeff": list(self.sample_coeff),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Schedule":
        """Rebuild from :meth:`to_dict` output (from kind + params; stored vectors must agree)."""
        if not isinstance(d, Mapping) or "kind" not in d:
            raise QSchedError(f"Not a schedule dict (needs at least 'kind'): {d!r}")
        try:
            return cls._from_dict(d)
        except (TypeError, AttributeError) as e:  # wrong JSON types (a list for params, a number for a vector...)
            raise QSchedError(f"Not a valid schedule dict ({e}): {dict(d)!r}") from None

    @classmethod
    def _from_dict(cls, d: Mapping[str, Any]) -> "Schedule":
        kind = _canonical_kind(d["kind"])
        mc, sc = d.get("model_coeff"), d.get("sample_coeff")
        steps = d.get("steps", len(mc) if mc is not None else None)
        if steps is None:
            raise QSchedError("Schedule dict needs 'steps' or the coefficient vectors.")
        if "params" in d:
            sched = cls.from_params(kind, d["params"], steps)
        elif kind == "per-step" and mc is not None and sc is not None:
            sched = cls.per_step(mc, sc)
        else:
            raise QSchedError(f"Schedule dict of kind {kind!r} needs 'params'.")
        for name, stored, built in (("model_coeff", mc, sched.model_coeff), ("sample_coeff", sc, sched.sample_coeff)):
            if stored is not None and not _close(list(stored), built):
                raise QSchedError(f"Inconsistent schedule dict: stored {name} {list(stored)} != rebuilt {list(built)}.")
        return sched

    def __str__(self) -> str:
        fmt = lambda v: "[" + ", ".join(f"{x:.4g}" for x in v) + "]"  # noqa: E731
        return f"Schedule({self.kind}, T={self.steps}, c^e={fmt(self.model_coeff)}, c^x={fmt(self.sample_coeff)})"


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(float(x), y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a, b))


def _expand(
    kind: str, params: Mapping[str, Any], steps: int
) -> tuple[dict[str, float], tuple[float, ...], tuple[float, ...]]:
    """Validate ``params`` of ``kind`` and expand them to (params, c^e, c^x) for ``steps`` steps."""
    names = Schedule.param_names(kind, steps)
    params = dict(params)
    missing = [n for n in names if n not in params]
    extra = [n for n in params if n not in names]
    if missing or extra:
        raise QSchedError(
            f"Schedule kind {kind!r} with {steps} steps takes parameters {names}; "
            f"missing {missing}, unexpected {extra}."
        )
    p = {n: _check_value(n, params[n]) for n in names}
    if kind == "linear":
        mc, sc = _linspace(p["model_start"], 1.0, steps), _linspace(p["sample_start"], 1.0, steps)
    elif kind == "ramp":
        mc = _linspace(p["model_start"], p["model_end"], steps)
        sc = _linspace(p["sample_start"], p["sample_end"], steps)
    elif kind == "per-step":
        mc = tuple(p[f"model_{i}"] for i in range(steps))
        sc = tuple(p[f"sample_{i}"] for i in range(steps))
    else:
        mc = sc = (1.0,) * steps
    return p, mc, sc


# ============================================================================================== schedule files
# A schedules file (``schedules.json``) maps quantization specs to the schedule calibrated for them, so one file
# serves a whole model: ``{"format": "qsched.schedules/1", "model": ..., "schedules": {spec: {"steps": T,
# "schedule": {...}, ...}}}``. Full precision is stored under "none".

SCHEDULES_FILE = "schedules.json"
SCHEDULES_FORMAT = "qsched.schedules/1"
FP_SPEC = "none"


def _schedules_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / SCHEDULES_FILE if p.is_dir() or not p.suffix else p


def _read_json(p: Path, what: str = "schedule file") -> Any:
    return read_json(p, what)


def read_schedules(path_or_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a ``schedules.json`` (or the one inside a directory)."""
    p = _schedules_path(path_or_dir)
    if not p.exists():
        raise FileNotFoundError(f"no schedule file at {p}")
    data = _read_json(p)
    if not isinstance(data, dict) or not isinstance(data.get("schedules"), dict):
        raise CorruptFileError(f"{p} is not a qsched schedules file (no 'schedules' mapping)")
    bad = [k for k, v in data["schedules"].items()
           if not isinstance(v, dict) or not isinstance(v.get("schedule"), dict)]
    if bad:
        raise CorruptFileError(f"{p}: the entries {bad} are not {{'steps': T, 'schedule': {{...}}}} mappings")
    return data


def save_schedule(path: str | os.PathLike, spec: str | None, schedule: Schedule, model: str | None, steps: int,
                  extra: dict[str, Any] | None = None) -> Path:
    """Merge ``schedule`` for quantization ``spec`` (None = full precision, stored as "none") into a
    ``schedules.json`` (a file path, or a directory that gets ``schedules.json``), atomically. Other specs are
    kept; the same spec is replaced. A file for another model is refused (ValueError)."""
    p = _schedules_path(path)
    if int(steps) != schedule.steps:
        raise QSchedError(f"schedule has {schedule.steps} steps, not {steps}")
    data: dict[str, Any] = {"format": SCHEDULES_FORMAT, "model": model, "schedules": {}}
    if p.exists():
        data = read_schedules(p)
        if model is not None and data.get("model") not in (None, model):
            raise QSchedError(f"{p} holds schedules for model {data.get('model')!r}, not {model!r}")
        data["model"] = data.get("model") or model
    entry = {"steps": int(steps), "schedule": schedule.to_dict()}
    entry.update(extra or {})
    data["schedules"][spec or FP_SPEC] = entry
    p.parent.mkdir(parents=True, exist_ok=True)
    from qsched._util import write_atomic

    return write_atomic(p, json.dumps(data, indent=2))


#: Written beside a saved Q-Sched scheduler: which quantization spec, model and step count it was calibrated for.
SCHEDULER_INFO_FILE = "qsched_schedule.json"


def _from_scheduler_dir(d: Path) -> Schedule:
    cfg = _read_json(d / "scheduler_config.json", "scheduler config")
    if not isinstance(cfg, dict) or cfg.get("schedule") is None:
        raise QSchedError(f"{d} holds a scheduler without a Q-Sched schedule")
    return _schedule_in(d / "scheduler_config.json", cfg["schedule"])


def _schedule_in(f: Path, d: Any) -> Schedule:
    """``Schedule.from_dict(d)`` for a dict read from ``f``; a bad one is a CorruptFileError naming ``f``."""
    try:
        return Schedule.from_dict(d)
    except QSchedError as e:
        raise CorruptFileError(f"{f}: {e}") from None


def _calibrated_for(d: Path) -> tuple[str, Path] | None:
    """(quantization spec, file saying so) of a saved scheduler directory ``d``: from its info file or the
    calibration.json of the calibration directory around it; None when nothing says."""
    for f in (d / SCHEDULER_INFO_FILE, d / "calibration.json", d.parent / "calibration.json"):
        if f.is_file():
            info = _read_json(f, "calibration info")
            if isinstance(info, dict) and "quant_spec" in info:
                return info["quant_spec"] or FP_SPEC, f
    return None


def load_schedule(path: str | os.PathLike, *, spec: str | None = None, steps: int | None = None) -> Schedule:
    """The schedule stored at ``path`` for quantization ``spec`` (None: full precision).

    ``path`` may be a calibration directory or a ``schedules.json`` (the entry for ``spec`` is picked; a
    ValueError lists the available ones when there is none), or a saved QSchedScheduler directory (its
    ``scheduler_config.json``). ``steps``, when given, must match the schedule's length.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"schedule not found: {p}")
    spec = spec or FP_SPEC
    if (p.is_file() and p.suffix == ".json" and p.name != "scheduler_config.json") or \
            (p.is_dir() and (p / SCHEDULES_FILE).exists()):
        table = read_schedules(p)["schedules"]
        if spec not in table:
            have = ", ".join(f"{k} ({v.get('steps')} steps)" for k, v in table.items()) or "nothing"
            raise QSchedError(f"no schedule for quantization spec {spec!r} in {_schedules_path(p)}; it holds: {have}")
        sched = _schedule_in(_schedules_path(p), table[spec]["schedule"])
        if table[spec].get("steps") not in (None, sched.steps):
            raise CorruptFileError(f"{_schedules_path(p)}: the {spec!r} entry says {table[spec].get('steps')!r} "
                                   f"steps but its schedule has {sched.steps}")
    else:
        d = p.parent if p.name == "scheduler_config.json" else p
        for cand in (d, d / "scheduler"):
            if (cand / "scheduler_config.json").is_file():
                sched = _from_scheduler_dir(cand)
                made_for = _calibrated_for(cand)
                if made_for is not None and made_for[0] != spec:
                    raise QSchedError(f"the schedule at {p} was calibrated for quantization spec {made_for[0]!r} "
                                      f"(says {made_for[1]}), not {spec!r}")
                break
        else:
            raise FileNotFoundError(f"{p} holds neither schedules.json nor a saved Q-Sched scheduler")
    if steps is not None and sched.steps != int(steps):
        raise QSchedError(f"the {spec!r} schedule at {p} has {sched.steps} steps, but {steps} were asked for")
    return sched

"""QSchedScheduler: wraps any diffusers scheduler and scales (model_output, sample) at the top of each step.

At step ``i`` the wrapper calls ``base.step(c^e_i * model_output, timestep, c^x_i * sample, ...)``; nothing else
changes. Every other attribute and method is the base scheduler's (read and write), and ``step`` /
``set_timesteps`` expose the base's signatures, because pipelines inspect them for ``eta``, ``generator``,
``timesteps`` and ``sigmas``. It is a diffusers ``SchedulerMixin``/``ConfigMixin``, so pipelines save and reload it.
"""

from __future__ import annotations

import inspect
import json
import warnings
from typing import Any

import diffusers
from diffusers import ConfigMixin, SchedulerMixin  # SchedulerMixin here also lets diffusers' loader find us
from diffusers.configuration_utils import FrozenDict

from qsched.errors import QSchedError
from qsched.schedule import Schedule

__all__ = ["QSchedScheduler", "apply_schedule", "ScheduleDroppedWarning"]

_OWN = frozenset({"_base", "_schedule", "_count", "_counts_itself"})
_OUR_KEYS = ("base_scheduler_class", "schedule")


class ScheduleDroppedWarning(UserWarning):
    """``OtherScheduler.from_config(qsched_scheduler.config)`` builds a plain scheduler: the schedule is not kept."""


class _WrapperConfig(FrozenDict):
    """``QSchedScheduler.config``: warns when another scheduler class is built from it with a schedule set.

    diffusers' ``ConfigMixin.extract_init_dict`` (the start of every ``X.from_config``) first reads
    ``config.get("_use_default_values")``; :meth:`QSchedScheduler.from_config` never does, so that read means the
    Q-Sched coefficients are about to be dropped."""

    def get(self, key: Any, default: Any = None) -> Any:
        if key == "_use_default_values" and dict.get(self, "schedule") is not None:
            warnings.warn(
                f"building another scheduler from a QSchedScheduler's config drops its Q-Sched schedule "
                f"({dict.get(self, 'base_scheduler_class')} base); keep it with "
                f"qsched.QSchedScheduler(X.from_config(cfg), pipe.scheduler.schedule) or qsched.apply_schedule",
                ScheduleDroppedWarning, stacklevel=4)
        return super().get(key, default)


class _Mirror:
    """Callable forwarding to ``owner.<impl>`` whose ``inspect.signature`` is the base's ``<name>``."""

    __slots__ = ("_owner", "_name", "_impl")

    def __init__(self, owner: "QSchedScheduler", name: str, impl: str) -> None:
        self._owner, self._name, self._impl = owner, name, impl

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._owner, self._impl)(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(getattr(self._owner._base, self._name))


class _mirrored:
    """Descriptor: ``wrapper.<name>`` is a :class:`_Mirror` of the base's ``<name>`` calling ``wrapper.<impl>``."""

    def __init__(self, impl: str) -> None:
        self.impl = impl

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else _Mirror(obj, self.name, self.impl)


class QSchedScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler applying Q-Sched coefficients (``schedule``) around an unmodified ``base`` scheduler.

    ``schedule=None`` passes everything through unchanged. Saved configs hold the base class name, the base's full
    config and the schedule dict.
    """

    step = _mirrored("_step")
    set_timesteps = _mirrored("_set_timesteps")

    def __init__(self, base: SchedulerMixin, schedule: Schedule | None = None) -> None:
        if isinstance(base, QSchedScheduler):
            base = base._base
        params = list(inspect.signature(base.step).parameters)[:3]
        if params != ["model_output", "timestep", "sample"]:
            raise TypeError(f"{type(base).__name__}.step must take (model_output, timestep, sample, ...); got {params}.")
        if getattr(base, "order", 1) != 1:
            raise QSchedError(f"{type(base).__name__} has order {base.order} (several step calls per denoising "
                              "step); Q-Sched needs a scheduler that calls step once per denoising step.")
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_counts_itself", not hasattr(type(base), "step_index"))
        object.__setattr__(self, "_count", 0)
        self.set_schedule(schedule)

    @classmethod
    def from_scheduler(cls, base: SchedulerMixin, schedule: Schedule | None = None) -> "QSchedScheduler":
        """Wrap ``base`` (a QSchedScheduler is unwrapped first, never wrapped twice)."""
        return cls(base, schedule)

    @property
    def schedule(self) -> Schedule | None:
        """The current :class:`Schedule` (None: pass-through)."""
        return self._schedule

    def set_schedule(self, schedule: Schedule | None) -> None:
        """Replace the schedule (its length is checked at the next ``set_timesteps``)."""
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a qsched.Schedule or None, got {type(schedule).__name__}.")
        object.__setattr__(self, "_schedule", schedule)

    @property
    def base_scheduler(self) -> SchedulerMixin:
        """The wrapped, unmodified diffusers scheduler."""
        return self._base

    def _set_timesteps(self, *args: Any, **kwargs: Any) -> Any:
        out = self._base.set_timesteps(*args, **kwargs)
        object.__setattr__(self, "_count", 0)
        n = len(self._base.timesteps)
        if self._schedule is not None and self._schedule.steps != n:
            raise QSchedError(f"The Q-Sched schedule has {self._schedule.steps} steps but the pipeline asked for {n} "
                              f"inference steps; build the schedule for {n} steps (e.g. Schedule.linear(a, b, {n})).")
        return out

    def _step(self, model_output: Any, timestep: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
        base, sched = self._base, self._schedule
        if sched is not None:
            if self._counts_itself:
                i = self._count
                object.__setattr__(self, "_count", i + 1)
            else:
                if base.step_index is None and hasattr(base, "_init_step_index"):
                    base._init_step_index(timestep)  # exactly what base.step does first; idempotent
                i = base.step_index or 0
            if i >= sched.steps:
                raise QSchedError(f"Step {i} called but the Q-Sched schedule has only {sched.steps} steps.")
            ce, cx = sched.model_coeff[i], sched.sample_coeff[i]
            if ce != 1.0:
                model_output = model_output * ce
            if cx != 1.0:
                sample = sample * cx
        return base.step(model_output, timestep, sample, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        base = self.__dict__.get("_base")
        if base is None or name.startswith("__") or name in _OWN:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return getattr(base, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN or isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
        else:
            setattr(self._base, name, value)

    def __len__(self) -> int:
        return len(self._base)

    compatibles = property(lambda self: self._base.compatibles)

    @property
    def _internal_dict(self) -> FrozenDict:
        """The base's config plus ``base_scheduler_class`` and ``schedule`` (``config`` reads this)."""
        sched = None if self._schedule is None else self._schedule.to_dict()
        return _WrapperConfig({**self._base.config, "base_scheduler_class": type(self._base).__name__,
                               "schedule": sched})

    @_internal_dict.setter
    def _internal_dict(self, value: Any) -> None:  # pipelines rewrite scheduler._internal_dict: forward to the base
        self._base._internal_dict = FrozenDict({k: v for k, v in dict(value).items() if k not in _OUR_KEYS})

    def to_json_string(self) -> str:
        """JSON of {base_scheduler_class, base_config (full), schedule}; written as scheduler_config.json."""
        d = {"_class_name": type(self).__name__, "_diffusers_version": diffusers.__version__,
             "base_scheduler_class": type(self._base).__name__, "base_config": json.loads(self._base.to_json_string()),
             "schedule": None if self._schedule is None else self._schedule.to_dict()}
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """Rebuild from a saved config (nested ``base_config``) or from ``wrapper.config`` (flat); ``kwargs``
        override base config fields."""
        cfg = dict(config or {})
        name = cfg.pop("base_scheduler_class", None)
        base_cls = getattr(diffusers, str(name), None)
        if not (isinstance(base_cls, type) and issubclass(base_cls, SchedulerMixin)):
            raise QSchedError(f"QSchedScheduler config names no diffusers scheduler class "
                              f"(base_scheduler_class={name!r}).")
        schedule = cfg.pop("schedule", None)
        base_cfg = cfg.pop("base_config", None)
        if base_cfg is None:
            base_cfg = {k: v for k, v in cfg.items() if k not in ("_class_name", "_diffusers_version")}
        base, unused = base_cls.from_config(base_cfg, return_unused_kwargs=True, **kwargs)
        obj = cls(base, None if schedule is None else Schedule.from_dict(schedule))
        return (obj, unused) if return_unused_kwargs else obj

    def __repr__(self) -> str:
        return f"QSchedScheduler(base={type(self._base).__name__}, schedule={self._schedule})"


def apply_schedule(pipe: Any, schedule: Schedule | None) -> Any:
    """Set ``schedule`` on ``pipe.scheduler`` (wrapping it once in a QSchedScheduler); returns ``pipe``."""
    if isinstance(pipe.scheduler, QSchedScheduler):
        pipe.scheduler.set_schedule(schedule)
    else:
        pipe.scheduler = QSchedScheduler.from_scheduler(pipe.scheduler, schedule)
    return pipe

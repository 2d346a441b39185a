"""The qsched package surface: exports that stay the documented objects after any submodule import, a light
``import qsched``, saved schedulers that load after a plain ``import qsched``, and visible schedule drops."""

from __future__ import annotations

import os
import warnings

import pytest

from fakes import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_subprocess = run_python


def test_exports_survive_every_submodule_import():
    out = _subprocess("""
        import importlib, pkgutil, sys, time
        t = time.perf_counter()
        import qsched
        print("import_s", time.perf_counter() - t)
        assert "torch" not in sys.modules and "diffusers" not in sys.modules
        before = {name: getattr(qsched, name) for name in qsched._EXPORTS}  # resolves every export once
        for m in pkgutil.walk_packages(qsched.__path__, "qsched."):
            if not m.name.endswith(".__main__"):  # those run the CLI
                importlib.import_module(m.name)
        import qsched.calibrate, qsched.evaluate  # the names that collide with functions
        from qsched import calibrate, evaluate
        for name, source in qsched._EXPORTS.items():
            obj = getattr(qsched, name)
            assert obj is before[name] is getattr(sys.modules[source], name), name
        assert calibrate is sys.modules["qsched.calibrate"].calibrate and callable(qsched.calibrate)
        assert evaluate is sys.modules["qsched.evaluate"].evaluate and callable(qsched.evaluate)
        for _ in range(2):  # each call reaches the function itself (a module would raise 'not callable')
            for fn in (qsched.calibrate, qsched.evaluate):
                try:
                    fn(no_such_argument=1)
                except TypeError as e:
                    assert "unexpected keyword argument" in str(e), e
        print("ok")
    """)
    assert out.strip().endswith("ok")
    import_s = float(out.split()[1])
    assert import_s < 5.0  # no torch/diffusers at import (measured ~0.01 s; generous for a loaded machine)


def test_scheduler_swap_warns_when_the_schedule_is_dropped():
    import diffusers

    from qsched.scheduler import QSchedScheduler, ScheduleDroppedWarning
    from qsched.schedule import Schedule

    wrapped = QSchedScheduler(diffusers.LCMScheduler(), Schedule.linear(0.9, 1.05, 4))
    with pytest.warns(ScheduleDroppedWarning, match="drops its Q-Sched schedule"):
        plain = diffusers.EulerDiscreteScheduler.from_config(wrapped.config)
    assert type(plain) is diffusers.EulerDiscreteScheduler
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScheduleDroppedWarning)
        again = QSchedScheduler.from_config(wrapped.config)  # keeps the schedule: no warning
        assert again.schedule == wrapped.schedule
        diffusers.EulerDiscreteScheduler.from_config(QSchedScheduler(diffusers.LCMScheduler()).config)  # none set
        rewrapped = QSchedScheduler(diffusers.EulerDiscreteScheduler.from_config(wrapped.base_scheduler.config),
                                    wrapped.schedule)
    assert rewrapped.schedule == wrapped.schedule


def test_diffusers_imported_before_qsched_still_registers():
    out = _subprocess("""
        import sys
        from diffusers.quantizers import auto  # diffusers' model side first, pipelines not yet
        import qsched
        assert auto.AUTO_QUANTIZER_MAPPING["qsched"].__name__ == "QSchedQuantizer"
        assert "qsched.scheduler" not in sys.modules
        import diffusers.pipelines.pipeline_loading_utils  # now diffusers can resolve saved pipelines
        assert "qsched.scheduler" in sys.modules
        print("ok")
    """)
    assert out.strip() == "ok"


def test_dir_lists_the_lazy_exports():
    import qsched

    assert {"load_pipeline", "quantize", "calibrate", "QSchedError", "__version__"} <= set(dir(qsched))

"""The classes a saved model folder may name, and the only ones qsched imports for it: diffusers' and
transformers' own, plus qsched's known pipeline and component classes (older diffusers import whatever module a
``model_index.json`` names, so a model folder could run code). Used by :mod:`qsched.pipelines` and
:mod:`qsched.checkpoint`."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Mapping

from qsched.errors import QSchedError

__all__ = ["QSCHED_PIPELINES", "QSCHED_COMPONENTS", "SAFE_LIBRARIES", "pipeline_class", "check_components",
           "expose_pipelines"]

QSCHED_PIPELINES = {"TestbedPipeline": "qsched.testbed.pipeline"}  # pipeline classes defined in qsched
QSCHED_COMPONENTS = {"QSchedScheduler": "qsched.scheduler"}  # component classes defined in qsched
SAFE_LIBRARIES = ("diffusers", "transformers")


def pipeline_class(name: str) -> type:
    """The pipeline class called ``name``: one of qsched's own (``TestbedPipeline``) or a diffusers pipeline."""
    import diffusers

    if name in QSCHED_PIPELINES:
        cls = getattr(importlib.import_module(QSCHED_PIPELINES[name]), name)
    else:
        cls = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise QSchedError(f"Unknown pipeline class {name!r}: neither a diffusers pipeline nor one of qsched's "
                          f"({', '.join(QSCHED_PIPELINES)}).")
    return cls


def expose_pipelines() -> None:
    """Make qsched's pipeline classes attributes of the ``diffusers`` module, so plain
    ``DiffusionPipeline.from_pretrained(folder)`` finds a ``model_index.json`` naming one (diffusers resolves
    ``_class_name`` with ``getattr(diffusers, name)``). Each class is imported on first access, through a module
    ``__getattr__`` (PEP 562), which Python consults before diffusers' own lazy-module lookup and which hands every
    other name on to it. Idempotent; does nothing before diffusers is imported (``import qsched`` calls it then)."""
    module = sys.modules.get("diffusers")
    if module is None:
        return
    previous = module.__dict__.get("__getattr__")
    if getattr(previous, "_qsched", False):
        return

    def __getattr__(name: str) -> Any:
        if name in QSCHED_PIPELINES:
            cls = getattr(importlib.import_module(QSCHED_PIPELINES[name]), name)
            setattr(module, name, cls)  # cached: later lookups never come here
            return cls
        if previous is not None:
            return previous(name)
        raise AttributeError(name)  # diffusers' _LazyModule.__getattr__ runs next and raises its own message

    __getattr__._qsched = True
    module.__getattr__ = __getattr__


def check_components(index: Path, config: Mapping[str, Any]) -> None:
    """Refuse a model_index.json naming component libraries other than diffusers, transformers and qsched's known
    classes (older diffusers import whatever module a model_index.json names: a model folder could run code), and
    import the modules of qsched's known classes it names (from qsched's table, not from the file)."""
    for key, value in config.items():
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        library, cls = value
        if library in SAFE_LIBRARIES:
            continue
        if cls in QSCHED_COMPONENTS and library in ("qsched", QSCHED_COMPONENTS[cls]):
            importlib.import_module(QSCHED_COMPONENTS[cls])
            continue
        raise QSchedError(f"{index}: component {key!r} names {library}.{cls}; qsched loads only diffusers and "
                          f"transformers components and its own ({', '.join(QSCHED_COMPONENTS)}).")

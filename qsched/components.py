"""The classes a saved model folder may name, and the only ones qsched imports for it: diffusers' and
transformers' own, plus qsched's known pipeline and component classes (older diffusers import whatever module a
``model_index.json`` names, so a model folder could run code). Used by :mod:`qsched.pipelines` and
:mod:`qsched.checkpoint`."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping

__all__ = ["QSCHED_PIPELINES", "QSCHED_COMPONENTS", "SAFE_LIBRARIES", "pipeline_class", "check_components"]

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
        raise ValueError(f"Unknown pipeline class {name!r}: neither a diffusers pipeline nor one of qsched's "
                         f"({', '.join(QSCHED_PIPELINES)}).")
    return cls


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
        raise ValueError(f"{index}: component {key!r} names {library}.{cls}; qsched loads only diffusers and "
                         f"transformers components and its own ({', '.join(QSCHED_COMPONENTS)}).")

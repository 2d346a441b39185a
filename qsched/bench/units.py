"""The unit store: each expensive piece of the benchmark is a *unit* whose result lives in
``<work>/units/<kind>/<name>-<hash of its config>/result.json``.

A unit whose ``result.json`` is present (with the same config) is reused, so a killed run resumes where it
stopped. Several processes may share one store (``--jobs``): each unit's directory holds a ``unit.lock``
taken with :mod:`filelock` (an OS lock, released by the kernel when its holder dies, so a killed worker never
leaves a unit blocked). A process that finds a unit locked moves on to the next one and comes back at the end,
waiting on the lock; once it gets it, it reads the result the other process wrote (or computes the unit itself
if that process died first). So no two processes ever compute the same unit. Results are written atomically
(a temporary file in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from filelock import FileLock, Timeout

from qsched._util import json_default, write_atomic

__all__ = ["Job", "UnitStore", "config_hash", "write_json", "write_result", "finite", "now", "MARKER", "RESULT_FILE", "LOCK_FILE"]

MARKER = "qsched-bench.json"
RESULT_FILE = "result.json"
LOCK_FILE = "unit.lock"


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def config_hash(obj: Any) -> str:
    """A short stable hash of a JSON-able object (keys sorted)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def write_json(path: Path, data: Any) -> None:
    """Write strict JSON atomically (:func:`qsched._util.write_atomic`), creating the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=1, default=json_default, allow_nan=False))


def write_result(path: Path, res: dict[str, Any], markdown: Callable[[dict[str, Any]], str] | None = None) -> str:
    """A standalone measurement's result: JSON at ``path`` and, with ``markdown``, its rendering beside it (``.md``),
    each written atomically; returns the Markdown ("" without ``markdown``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(res, indent=2) + "\n")
    if markdown is None:
        return ""
    md = markdown(res)
    write_atomic(path.with_suffix(".md"), md)
    return md


def finite(x: Any) -> Any:
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


@dataclass
class Job:
    """One resumable unit of work: where it is stored (kind, name, config) and how to compute it.

    ``compute(directory)`` returns a JSON-able dict; it may write further files into ``directory``."""

    kind: str
    name: str
    config: dict[str, Any]
    compute: Callable[[Path], dict[str, Any]]
    label: str | None = None

    @property
    def tag(self) -> str:
        return f"{self.kind}/{self.name}"


_HELD = object()  # another process holds the unit's lock right now


class UnitStore:
    """Result store under ``<work>/units`` shared by any number of processes (see the module docstring).

    ``computed`` / ``skipped`` list the tags (``kind/name``) this process computed / reused.
    """

    def __init__(self, work: str | Path, console: Any, fresh: bool = False):
        self.work = Path(work)
        self.root = self.work / "units"
        self.console = console
        self.computed: list[str] = []
        self.skipped: list[str] = []
        self._memo: dict[Path, dict[str, Any]] = {}
        marker = self.work / MARKER
        if fresh and self.root.exists():
            if not marker.exists():
                raise ValueError(f"--fresh: {self.work} was not created by qsched.bench (no {MARKER}); refusing to "
                                 "delete anything there")
            shutil.rmtree(self.root)
        self.work.mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            write_json(marker, {"created_by": "qsched.bench", "created": now()})

    def dir(self, kind: str, name: str, config: dict[str, Any]) -> Path:
        """The unit's directory (named by its config's hash)."""
        return self.root / kind / f"{name}-{config_hash(config)}"

    def run(self, kind: str, name: str, config: dict[str, Any], compute: Callable[[Path], dict[str, Any]],
            label: str | None = None) -> dict[str, Any]:
        """Compute one unit, or reuse its stored result, or wait for the process computing it."""
        return self.run_all([Job(kind, name, config, compute, label)])[0]

    def run_all(self, jobs: Sequence[Job], after: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        """Results of ``jobs`` in order. Units locked by another process are passed over first and collected at
        the end (waiting on their locks); ``after`` is called whenever this process finishes a unit."""
        results: list[Any] = [self._attempt(j, after, wait=False) for j in jobs]
        pending = [i for i, r in enumerate(results) if r is _HELD]
        if pending:
            self.console.print(f"  waiting for {len(pending)} unit(s) held by another worker ...")
        for i in pending:
            results[i] = self._attempt(jobs[i], after, wait=True)
        return results

    def _stored(self, d: Path, config: dict[str, Any]) -> dict[str, Any] | None:
        f = d / RESULT_FILE
        if not f.exists():
            return None
        data = json.loads(f.read_text(encoding="utf-8"))
        return data if data.get("config") == json.loads(json.dumps(config, default=str)) else None

    def _reuse(self, job: Job, d: Path, data: dict[str, Any], quiet: bool) -> dict[str, Any]:
        self.skipped.append(job.tag)
        if not quiet:
            self.console.print(f"  [dim]cached[/] {job.label or job.tag}")
        self._memo[d] = data["result"]
        return data["result"]

    def _attempt(self, job: Job, after: Callable[[], None] | None, wait: bool) -> Any:
        d = self.dir(job.kind, job.name, job.config)
        if d in self._memo:  # the same unit asked for twice in one run (e.g. a shared fp32 row)
            return self._memo[d]
        data = self._stored(d, job.config)
        if data is not None:
            return self._reuse(job, d, data, quiet=wait)
        d.mkdir(parents=True, exist_ok=True)
        lock = FileLock(d / LOCK_FILE)
        try:
            lock.acquire(blocking=wait)
        except Timeout:
            return _HELD
        try:
            data = self._stored(d, job.config)  # finished by another process since we looked
            if data is not None:
                return self._reuse(job, d, data, quiet=wait)
            label = job.label or job.tag
            self.console.print(f"  [bold cyan]run[/] {label} ...")
            t0 = time.perf_counter()
            result = finite(job.compute(d))
            dt = time.perf_counter() - t0
            write_json(d / RESULT_FILE, {"config": job.config, "result": result, "seconds": dt, "finished": now(),
                                         "pid": os.getpid()})
        finally:
            lock.release()
        self.computed.append(job.tag)
        self.console.print(f"  [green]done[/] {label} in {dt:.1f} s")
        self._memo[d] = json.loads((d / RESULT_FILE).read_text(encoding="utf-8"))["result"]
        if after is not None:
            after()
        return self._memo[d]

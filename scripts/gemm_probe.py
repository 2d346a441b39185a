"""Does this CPU have fast int8 (and bf16) GEMMs? fp32 vs bf16 vs ``torch._int_mm`` vs oneDNN's prepacked int8
GEMM (what ``compile_quantized`` uses where it is exact) on SD1.5-sized shapes.

``qsched.compile_quantized`` runs quantized layers as int8 GEMMs. Those are fast only where the CPU has int8
dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX); elsewhere torch runs a generic loop. This probe measures
it: per shape, the GEMMs timed interleaved (order rotated each round, 1 thread), medians, and each one's speed-up
over fp32 (> 1 is faster); the oneDNN column only where ``qsched.kernels.onednn_int8_exact`` holds. ``qsched.kernels.why_int8_is_slow`` is the rule ``backend="auto"`` uses.

    python scripts/gemm_probe.py [--rounds 5] [--out benchmarks/gemm_probe.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

# (tokens, in, out): SD1.5 64x64 latent: attention projection at 64x64, a 3x3 conv as GEMM, a 16x16 FF layer;
# then one kernel offset of a 32x32 640-channel conv, and a testbed-sized layer (8 images of 16x16, 64 channels).
SHAPES = ((4096, 320, 320), (4096, 2880, 320), (256, 1280, 5120), (1024, 640, 640), (2048, 64, 64))


def _time(fn, reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from qsched._util import write_atomic
    from qsched.kernels import _onednn_mm, _onednn_pack, onednn_int8_exact, why_int8_is_slow

    caps = torch.cpu.get_capabilities()
    res = {"cpu": caps.get("cpu_name") or platform.processor(), "capability": torch.backends.cpu.get_cpu_capability(),
           "isa": {k: bool(caps.get(k)) for k in ("avx2", "avx512_f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                                   "amx_int8", "amx_bf16")},
           "fast_int8_gemm": why_int8_is_slow("cpu") or "yes", "onednn_int8_exact": onednn_int8_exact(),
           "torch": torch.__version__, "threads": 1,
           "rounds": a.rounds, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "shapes": []}
    g = torch.Generator().manual_seed(0)
    for m, k, n in SHAPES:
        x, w = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        xb, wb = x.bfloat16(), w.bfloat16()
        xi = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        wi = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).t()  # column-major, as qsched stores it
        fns = {"fp32": lambda: x @ w, "bf16": lambda: xb @ wb, "int8": lambda: torch._int_mm(xi, wi)}
        if onednn_int8_exact():
            packed = _onednn_pack(wi.t())
            fns["int8_onednn"] = lambda: _onednn_mm(xi, packed)
        times: dict[str, list[float]] = {v: [] for v in fns}
        names = list(fns)
        for r in range(a.rounds):
            for v in names[r % len(names):] + names[: r % len(names)]:
                times[v].append(_time(fns[v], a.reps))
        med = {v: statistics.median(t) for v, t in times.items()}
        row = {"shape": [m, k, n], "ms": {v: round(t * 1e3, 3) for v, t in med.items()},
               "speedup_vs_fp32": {v: round(med["fp32"] / t, 3) for v, t in med.items()}}
        res["shapes"].append(row)
        print(f"{m}x{k}x{n}: fp32 {row['ms']['fp32']:.2f} ms; " + ", ".join(
            f"{v} x{row['speedup_vs_fp32'][v]:.2f}" for v in names[1:]) + " (speed-up over fp32)", flush=True)
    print(f"{res['cpu']} ({res['capability']}); fast int8 GEMM: {res['fast_int8_gemm']}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(a.out, json.dumps(res, indent=1) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

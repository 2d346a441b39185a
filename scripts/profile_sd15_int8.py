"""Where a compiled W8A8 SD1.5-sized UNet forward spends its time (1 thread, torch profiler, self CPU ms by op).

    python scripts/profile_sd15_int8.py [--spec w8a8] [--gemm auto]

Random weights from the SD1.5 UNet config (``qsched.bench.sd15``), 64x64 latent, batch 1, 77 tokens; one warm-up
forward, one timed, one profiled. Prints the top ops; nothing is written.
"""

from __future__ import annotations

import argparse
import time

import torch

from qsched.bench.sd15 import build_sd15_unet, sd15_inputs
from qsched.kernels import GEMMS, compile_quantized
from qsched.quantization import quantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="w8a8")
    ap.add_argument("--gemm", default="auto", choices=GEMMS)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(1)
    m = build_sd15_unet()
    quantize(m, a.spec)
    print(compile_quantized(m, backend="int8", gemm=a.gemm))
    x, t, enc = sd15_inputs()
    with torch.no_grad():
        m(x, t, encoder_hidden_states=enc)
        s = time.perf_counter()
        m(x, t, encoder_hidden_states=enc)
        print(f"forward {time.perf_counter() - s:.2f} s")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            m(x, t, encoder_hidden_states=enc)
    rows = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()), key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    print(f"profiled self CPU total {total:.0f} ms")
    for key, ms, calls in rows[:a.top]:
        print(f"{key:50s} {ms:8.1f} ms {100 * ms / total:5.1f}%  x{calls}")


if __name__ == "__main__":
    main()

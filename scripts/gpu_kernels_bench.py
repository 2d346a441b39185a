"""GPU benchmark of qsched's real-kernel execution: bf16 vs torchao-backed W8A8 / W4A16 through qsched.

For a machine with a CUDA GPU (not run by the test suite). SD1.5- and SDXL-sized UNets are built from their
configs with random weights (nothing is downloaded), in bf16 on the GPU. Variants, all held at once and timed
interleaved (rotating order, CUDA-synchronised wall time, medians):

* ``bf16``: the float model;
* ``torchao-w8a8 direct``: torchao's own ``quantize_(Int8DynamicActivationInt8WeightConfig())`` on the Linear
  layers of a bf16 copy (reference for qsched's overhead);
* ``qsched w8a8 -> torchao``: ``qsched.quantize(unet, "w8a8")`` then ``qsched.kernels.compile_quantized(unet,
  backend="torchao")`` (Linear layers on torchao int8 dynamic kernels, Conv2d simulated);
* ``qsched w4a16 -> torchao``: ``quantize(unet, "w4a16")`` (int4 g32 weights) then ``compile_quantized`` (Linear
  layers on torchao's int4 weight-only tinygemm kernel, Conv2d simulated);
* ``qsched w8a8 -> int8``: ``compile_quantized(unet, backend="int8")`` (torch._int_mm for Linear and Conv2d).

Reported per model and variant: ms per forward (batch 1 by default; SD1.5 64x64 latent, SDXL 128x128), the
memory the variant holds after building (``torch.cuda.memory_allocated`` delta), the peak during a forward, the
speed-up vs bf16, the relative output error vs bf16, and which layers stayed simulated. JSON is written
atomically (default ``benchmarks/gpu_kernels.json``).

    python scripts/gpu_kernels_bench.py [--models sd15 sdxl] [--runs 20] [--batch 1] [--out benchmarks/gpu_kernels.json]
    python scripts/gpu_kernels_bench.py --smoke --device cpu   # checks the script itself (no torchao rows)
"""

from __future__ import annotations

import argparse
import gc
import json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from qsched.bench.sd15 import SD15_UNET_CONFIG  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, written out.
SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=(320, 640, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, upcast_attention=False,
)
SMOKE = dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=8, sample_size=16)
SMOKE_XL = dict(block_out_channels=(32, 64, 64), norm_num_groups=8, sample_size=16,
                transformer_layers_per_block=(1, 1, 1),
                attention_head_dim=(2, 4, 4), cross_attention_dim=64, addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32)


def build(model: str, device: torch.device, smoke: bool) -> nn.Module:
    """A random-weight bf16 UNet of ``model`` ("sd15" or "sdxl") on ``device`` (built there: no CPU copy)."""
    from diffusers import UNet2DConditionModel

    cfg = {**SD15_UNET_CONFIG, **(SMOKE if smoke else {})} if model == "sd15" else \
        {**SDXL_UNET_CONFIG, **(SMOKE_XL if smoke else {})}
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg)
    return unet.to(torch.bfloat16).eval()


def inputs(unet: nn.Module, batch: int, device: torch.device) -> tuple[tuple, dict]:
    cfg = unet.config
    g = torch.Generator(device="cpu").manual_seed(1)
    s = cfg.sample_size
    x = torch.randn(batch, cfg.in_channels, s, s, generator=g)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    kw: dict[str, Any] = {"encoder_hidden_states": ctx.to(device, torch.bfloat16)}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g).to(device, torch.bfloat16),
                                   "time_ids": torch.tensor([[s * 8, s * 8, 0, 0, s * 8, s * 8]] * batch,
                                                            dtype=torch.bfloat16, device=device)}
    return (x.to(device, torch.bfloat16), torch.tensor([500], device=device)), kw


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def variants(device: torch.device) -> dict[str, Callable[[nn.Module], dict[str, Any]]]:
    """Name -> function turning a fresh bf16 UNet into that variant in place (returns notes)."""
    from qsched.kernels import compile_quantized
    from qsched.quantization import quantize

    def bf16(m: nn.Module) -> dict[str, Any]:
        return {}

    def torchao_direct(m: nn.Module) -> dict[str, Any]:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(m, Int8DynamicActivationInt8WeightConfig())
        return {}

    def qsched(spec: str, backend: str) -> Callable[[nn.Module], dict[str, Any]]:
        def make(m: nn.Module) -> dict[str, Any]:
            q = quantize(m, spec, keep_packed=True)  # codes only; the compiled layers build from them
            s = compile_quantized(m, backend=backend)
            for layer in m.modules():  # layers left simulated need their float cache back for speed
                if hasattr(layer, "set_keep_packed"):
                    layer.set_keep_packed(False)
            return {"quantized": len(q.quantized), "compiled": len(s.compiled), "backend": s.backend,
                    "kept_simulated": len(s.kept), "kept_reasons": sorted(set(s.kept.values()))}
        return make

    out = {"bf16": bf16}
    if device.type == "cuda":
        out.update({"torchao-w8a8 direct": torchao_direct, "qsched w8a8 -> torchao": qsched("w8a8", "torchao"),
                    "qsched w4a16 -> torchao": qsched("w4a16", "torchao")})
    out["qsched w8a8 -> int8"] = qsched("w8a8", "int8")
    return out


def bench_model(model: str, device: torch.device, runs: int, warmup: int, batch: int, smoke: bool,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """ms/forward, held and peak memory, error vs bf16 for every variant of ``model``."""
    held: dict[str, nn.Module] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name, make in variants(device).items():
        gc.collect()
        before = _allocated(device)
        try:
            m = build(model, device, smoke)
            notes = make(m)
        except Exception as e:  # a variant that cannot run here is reported, not fatal
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            log(f"  {name}: ERROR {rows[name]['error']}")
            m = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        _sync(device)
        if device.type == "cuda":
            held_bytes = _allocated(device) - before
        else:  # no allocator statistics: parameter and buffer bytes (tensor subclasses are not counted right)
            from qsched.kernels import _resident_bytes

            held_bytes = _resident_bytes(m)
        rows[name] = {"held_bytes": held_bytes, **notes}
        held[name] = m
        log(f"  {name}: built, holds {rows[name]['held_bytes'] / 2**20:.0f} MiB")
    args, kw = inputs(next(iter(held.values())), batch, device)
    outs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name, m in held.items():
            for _ in range(warmup):
                m(*args, **kw)
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            base = _allocated(device)
            outs[name] = m(*args, **kw).sample.float()
            _sync(device)
            if device.type == "cuda":
                rows[name]["forward_peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - base
        times: dict[str, list[float]] = {n: [] for n in held}
        names = list(held)
        for r in range(runs):
            for name in names[r % len(names):] + names[: r % len(names)]:
                _sync(device)
                t0 = time.perf_counter()
                held[name](*args, **kw)
                _sync(device)
                times[name].append((time.perf_counter() - t0) * 1e3)
    ref = outs.get("bf16")
    for name, ts in times.items():
        row = rows[name]
        row["ms_per_forward"] = statistics.median(ts)
        row["ms_all"] = ts
        if ref is not None:
            row["rel_error_vs_bf16"] = ((outs[name] - ref).norm() / ref.norm()).item()
    b = rows.get("bf16", {}).get("ms_per_forward")
    for row in rows.values():
        if b and row.get("ms_per_forward"):
            row["speedup_vs_bf16"] = b / row["ms_per_forward"]
            if rows["bf16"].get("held_bytes"):
                row["held_vs_bf16"] = row["held_bytes"] / rows["bf16"]["held_bytes"]
    for name in rows:
        if "ms_per_forward" in rows[name]:
            r = rows[name]
            peak = r.get("forward_peak_extra_bytes", 0) / 2**20
            log(f"  {name:>24}: {r['ms_per_forward']:8.2f} ms  x{r.get('speedup_vs_bf16', float('nan')):.2f} vs bf16, "
                f"holds {r['held_bytes'] / 2**20:.0f} MiB, peak extra {peak:.0f} MiB, "
                f"rel err vs bf16 {r.get('rel_error_vs_bf16', float('nan')):.4f}")
    del held
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"batch": batch, "runs": runs, "warmup": warmup, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny widths (checks the script)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/gpu_kernels.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script is for a GPU machine (use --device cpu --smoke to check it)")
    from qsched._util import package_versions

    res: dict[str, Any] = {
        "command": "python scripts/gpu_kernels_bench.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {**package_versions(), "cuda": torch.version.cuda}, "smoke": args.smoke, "models": {}}
    try:
        import torchao

        res["versions"]["torchao"] = torchao.__version__
    except ImportError:
        res["versions"]["torchao"] = None
    for model in args.models:
        print(f"{model}:", flush=True)
        res["models"][model] = bench_model(model, device, args.runs, args.warmup, args.batch, args.smoke)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()

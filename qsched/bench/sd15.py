"""The SD1.5-sized UNet measurement of section 3 (formerly ``scripts/measure_quant.py``): qsched quantization on
a UNet with SD1.5's architecture and random weights (built from its config; no download).

:func:`measure` returns: parameter count, fp16 safetensors bytes vs packed bytes (and their ratio), layers
quantized / skipped; resident memory and seconds per forward (64x64 latent, batch 1) for fp32, simulated and
keep_packed quantization (each variant in its own spawned process so its RSS is its own; forwards interleaved
across the processes, medians); and the relative output error ||q(x) - fp(x)|| / ||fp(x)|| of a tiny random
UNet at w8a8, w4a8, w4a4. Needs several GB of RAM and a few minutes. Command line:
``python -m qsched.bench.sd15 [--threads 1] [--runs 3] [--json out.json]`` (see :mod:`qsched.bench.cli`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["SD15_UNET_CONFIG", "measure", "build_sd15_unet", "tiny_errors", "summary_lines"]

# The standard Stable Diffusion 1.5 UNet config (runwayml/stable-diffusion-v1-5, unet/config.json), written out.
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
    use_linear_projection=False,
)


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kb = line.split()[:2]
                vals[key] = int(kb) / 1024
    return vals.get("VmRSS:", float("nan")), vals.get("VmHWM:", float("nan"))


# --smoke: same structure, tiny widths (checks the script itself in seconds).
SMOKE_OVERRIDES: dict[str, Any] = dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=8)


def build_sd15_unet(seed: int = 0, smoke: bool = False) -> Any:
    """The SD1.5 UNet architecture with random weights (``smoke``: tiny widths), in eval mode."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**SD15_UNET_CONFIG, **(SMOKE_OVERRIDES if smoke else {})}).eval()


def sd15_inputs() -> tuple[Any, Any, Any]:
    """Fixed random inputs: a 64x64 latent, timestep 500, 77 text tokens of width 768."""
    import torch

    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, 64, 64, generator=g), torch.tensor([500]), torch.randn(1, 77, 768, generator=g))


def worker(kind: str, packed_dir: str, threads: int, smoke: bool, conn: Any) -> None:
    """Hold one model variant; answer 'run' with the seconds of one forward, 'stop' to exit."""
    import torch

    torch.set_num_threads(threads)
    import accelerate  # noqa: F401  (imports first, so "model RSS" counts the model only)
    import safetensors.torch  # noqa: F401
    from diffusers import UNet2DConditionModel  # noqa: F401

    from qsched.checkpoint import load_quantized

    base = rss_mib()[0]
    if kind == "fp32":
        model = build_sd15_unet(smoke=smoke)
    else:
        model = load_quantized(packed_dir, keep_packed=(kind == "packed"))
    loaded = rss_mib()[0]
    x = sd15_inputs()
    with torch.inference_mode():
        model(*x)  # warm-up
    conn.send({"rss_model_mib": loaded - base, "rss_mib": rss_mib()[0], "peak_rss_mib": rss_mib()[1]})
    while (msg := conn.recv()) == "run":
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(*x)
            conn.send(time.perf_counter() - t0)
    conn.send({"peak_rss_mib": rss_mib()[1]})


def tiny_errors() -> dict[str, float]:
    """Relative output error of a tiny random UNet at w8a8, w4a8, w4a4 (same weights, same input)."""
    import torch
    from diffusers import UNet2DConditionModel

    from qsched.quantization import quantize

    def build():
        torch.manual_seed(0)
        return UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=16, attention_head_dim=4).eval()

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 32, generator=g))
    with torch.no_grad():
        ref = build()(*x).sample
        out = {}
        for spec in ("w8a8", "w4a8", "w4a4"):
            m = build()
            quantize(m, spec)
            out[spec] = ((m(*x).sample - ref).norm() / ref.norm()).item()
    return out


def measure(runs: int = 3, threads: int = 1, spec: str = "w4a8", speed: bool = True, smoke: bool = False,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure size, speed and RSS of ``spec`` on the SD1.5-sized UNet (``smoke``: tiny widths, seconds)."""
    import torch
    from safetensors.torch import save_file

    from qsched.checkpoint import WEIGHTS_FILE, save_quantized
    from qsched.quantization import quantize

    if runs < 1 or threads < 1:
        raise ValueError(f"runs and threads must be >= 1, got runs={runs}, threads={threads}")
    torch.set_num_threads(threads)
    res: dict[str, Any] = {"spec": spec, "threads": threads, "runs": runs, "smoke": smoke}
    with tempfile.TemporaryDirectory(prefix="qsched-measure-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        unet = build_sd15_unet(smoke=smoke)
        res["params"] = sum(p.numel() for p in unet.parameters())
        log(f"SD1.5-sized UNet2DConditionModel: {res['params'] / 1e6:.1f} M parameters "
            f"(built in {time.perf_counter() - t0:.0f} s)")
        fp16_file = tmp_path / "unet_fp16.safetensors"
        save_file({k: v.half().contiguous() for k, v in unet.state_dict().items()}, str(fp16_file))
        res["fp16_file_bytes"] = os.path.getsize(fp16_file)
        fp16_file.unlink()
        summary = quantize(unet, spec)
        log(str(summary))
        packed_dir = tmp_path / "packed"
        save_quantized(unet, packed_dir)
        del unet
        res["packed_file_bytes"] = os.path.getsize(packed_dir / WEIGHTS_FILE)
        res["packed_ratio"] = res["packed_file_bytes"] / res["fp16_file_bytes"]
        res["layers_quantized"] = len(summary.quantized)
        res["layers_skipped"] = dict(summary.skipped)
        log(f"fp16 file {res['fp16_file_bytes'] / 2**20:.1f} MiB, packed {spec} file "
            f"{res['packed_file_bytes'] / 2**20:.1f} MiB, ratio {res['packed_ratio']:.3f}; "
            f"{res['layers_quantized']} layers quantized, {len(res['layers_skipped'])} skipped")
        if speed:
            res["speed"] = _speed(packed_dir, spec, runs, threads, smoke, log)
        res["tiny_rel_error"] = tiny_errors()
    return res


def _speed(packed_dir: Path, spec: str, runs: int, threads: int, smoke: bool,
           log: Callable[[str], None]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    modes = {"fp32": "fp32", f"{spec} simulated": "sim", f"{spec} keep_packed": "packed"}
    kinds = list(modes)
    workers = {}
    try:
        for kind in kinds:  # start one at a time to keep the build peaks apart
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(modes[kind], str(packed_dir), threads, smoke, child))
            proc.start()
            workers[kind] = (proc, parent, parent.recv())
            log(f"  {kind}: model RSS {workers[kind][2]['rss_model_mib']:.0f} MiB, process RSS after "
                f"warm-up {workers[kind][2]['rss_mib']:.0f} MiB")
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(runs):
            for kind in kinds:
                workers[kind][1].send("run")
                times[kind].append(workers[kind][1].recv())
        out = {}
        for kind, (proc, conn, info) in workers.items():
            conn.send("stop")
            final = conn.recv()
            proc.join()
            out[kind] = {**info, "peak_rss_mib": final["peak_rss_mib"], "seconds": times[kind],
                         "median_s": statistics.median(times[kind])}
        return out
    finally:
        for proc, _, _ in workers.values():
            if proc.is_alive():
                proc.kill()
                proc.join()


def summary_lines(res: dict[str, Any]) -> list[str]:
    """A plain-text summary of :func:`measure`'s result."""
    skipped = res["layers_skipped"]
    lines = [f"params {res['params']:,}; fp16 file {res['fp16_file_bytes']:,} B; packed {res['spec']} file "
             f"{res['packed_file_bytes']:,} B; ratio {res['packed_ratio']:.3f}; layers quantized "
             f"{res['layers_quantized']}, skipped {len(skipped)} ({', '.join(skipped)})"]
    for kind, s in res.get("speed", {}).items():
        lines.append(f"{kind:>22}: {s['median_s']:.2f} s/forward (median of {len(s['seconds'])}, 64x64 latent, "
                     f"batch 1, {res['threads']} thread(s)); model RSS {s['rss_model_mib']:.0f} MiB, peak process "
                     f"RSS {s['peak_rss_mib']:.0f} MiB")
    lines.append("tiny UNet relative error: " + ", ".join(f"{k} {v:.4f}" for k, v in res["tiny_rel_error"].items()))
    return lines


def _cli() -> Any:
    """``python -m qsched.bench.sd15``: the typer app of :func:`measure_sd15`."""
    import typer

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    def measure_sd15(
        threads: int = typer.Option(1, "--threads", help="Torch threads per forward."),
        runs: int = typer.Option(3, "--runs", help="Interleaved timed forwards per variant."),
        spec: str = typer.Option("w4a8", "--spec", help="Quantization spec."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers here (JSON)."),
        no_speed: bool = typer.Option(False, "--no-speed", help="Skip the RSS / speed part."),
        smoke: bool = typer.Option(False, "--smoke", help="Tiny widths instead of SD1.5's (checks the code path)."),
    ) -> None:
        """Measure qsched quantization on an SD1.5-sized UNet (random weights; several GB of RAM, minutes)."""
        from qsched.bench.units import write_json

        try:
            res = measure(runs=runs, threads=threads, spec=spec, speed=not no_speed, smoke=smoke,
                          log=lambda line: typer.echo(line))
        except (ValueError, FileNotFoundError) as e:
            typer.echo(f"error: {' '.join(str(e).split()) or type(e).__name__}", err=True)
            raise typer.Exit(2) from None
        typer.echo("\n=== summary ===")
        for line in summary_lines(res):
            typer.echo(line)
        if json_out is not None:
            write_json(json_out, res)

    app.command(help=measure_sd15.__doc__)(measure_sd15)
    return app


if __name__ == "__main__":
    _cli()(prog_name="python -m qsched.bench.sd15")

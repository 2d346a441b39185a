"""Measure the QSchedScheduler wrapper's overhead per denoising step on a tiny pipeline (CPU, 1 thread).

Two measurements, plain scheduler vs wrapped (a schedule with no coefficient equal to 1, so both multiplies run),
interleaved run by run so that machine load affects both alike:

1. whole denoising steps inside the real pipeline (time between consecutive ``callback_on_step_end`` calls:
   denoiser forward + guidance + scheduler step), median over all steps of all runs;
2. the scheduler ``step`` call alone on the pipeline's latent shape (median of many calls), whose difference is the
   wrapper's absolute cost, reported relative to the median denoising step.

Usage: python scripts/measure_overhead.py [--family lcm] [--steps 8] [--runs 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qsched.schedule import Schedule
from qsched.scheduler import QSchedScheduler
from qsched.testing import tiny_call_kwargs, tiny_pipeline


def step_times(pipe, kwargs: dict) -> list[float]:
    stamps: list[float] = []

    def callback(_pipe, _i, _t, _kw):
        stamps.append(time.perf_counter())
        return {}

    pipe("a photo of the cat", generator=torch.Generator().manual_seed(0), callback_on_step_end=callback, **kwargs)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def scheduler_step_time(scheduler, shape: tuple[int, ...], steps: int, calls: int) -> float:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(calls // steps):
        scheduler.set_timesteps(steps)
        sample = x
        for t in scheduler.timesteps:
            if hasattr(scheduler, "scale_model_input"):
                scheduler.scale_model_input(sample, t)  # as pipelines do (untimed); Euler schedulers expect it
            t0 = time.perf_counter()
            sample = scheduler.step(eps, t, sample, generator=None).prev_sample
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="lcm", choices=["lcm", "pcm", "sdxl-turbo", "flux"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = tiny_pipeline(args.family)
    kwargs = {**tiny_call_kwargs(args.family), "num_inference_steps": args.steps, "output_type": "latent"}
    plain = pipe.scheduler
    schedule = Schedule.per_step([0.95] * args.steps, [1.05] * args.steps)
    wrapped = QSchedScheduler.from_scheduler(plain, schedule)

    for sched in (plain, wrapped):  # warm-up
        pipe.scheduler = sched
        step_times(pipe, kwargs)
    per_step = {"plain": [], "wrapped": []}
    for r in range(args.runs):
        order = (("plain", plain), ("wrapped", wrapped)) if r % 2 == 0 else (("wrapped", wrapped), ("plain", plain))
        for name, sched in order:
            pipe.scheduler = sched
            per_step[name] += step_times(pipe, kwargs)
    pipe.scheduler = plain

    # scheduler.step alone, on the latent shape the pipeline uses
    latents = pipe(
        "a photo of the cat", generator=torch.Generator().manual_seed(0), **{**kwargs, "num_inference_steps": 1}
    ).images
    shape = tuple(latents.shape)
    calls = max(args.steps, 50 * args.runs // args.steps * args.steps)
    step_plain, step_wrapped = [], []
    for _ in range(5):  # interleaved blocks
        step_plain.append(scheduler_step_time(type(plain).from_config(plain.config), shape, args.steps, calls))
        base = type(plain).from_config(plain.config)
        step_wrapped.append(scheduler_step_time(QSchedScheduler.from_scheduler(base, schedule), shape, args.steps,
                                                calls))

    med_plain, med_wrapped = statistics.median(per_step["plain"]), statistics.median(per_step["wrapped"])
    sp, sw = statistics.median(step_plain), statistics.median(step_wrapped)
    print(f"tiny '{args.family}' pipeline, {type(plain).__name__}, {args.steps} steps, {args.runs} interleaved runs, "
          f"{torch.get_num_threads()} thread(s), latents {shape}")
    print(f"median denoising step: plain {med_plain * 1e3:.3f} ms, wrapped {med_wrapped * 1e3:.3f} ms "
          f"({(med_wrapped / med_plain - 1) * 100:+.2f}%; n = {len(per_step['plain'])} steps each)")
    print(f"scheduler.step alone: plain {sp * 1e6:.1f} us, wrapped {sw * 1e6:.1f} us; wrapper cost {(sw - sp) * 1e6:.1f} us "
          f"= {(sw - sp) / med_plain * 100:.2f}% of a denoising step")


if __name__ == "__main__":
    main()

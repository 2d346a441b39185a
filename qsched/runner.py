"""The one generation runner: every image qsched draws (calibration, evaluation, benchmark, model card, reports,
the CLI) goes through :func:`generate` / :func:`generate_batches` with the schedule installed by
:func:`using_schedule`.

Seed rule (one, documented, batch-size independent): image ``i`` of a run with base seed ``seed`` draws its
initial noise and any sampler noise from ``torch.Generator("cpu").manual_seed(image_seed(seed, i))`` with
``image_seed(seed, i) = seed * 100003 + i``. For seed 0 that is image ``i`` -> seed ``i``. Calibration with several
seeds draws prompt ``i`` of seed ``s`` as image ``i`` of base seed ``s``; evaluation draws its ``n``-th image as
image ``n`` of its base seed. Same (prompt, seed, index) -> same image, whichever caller asks.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from qsched.errors import QSchedError
from qsched.images import to_tensor
from qsched.schedule import Schedule

__all__ = ["image_seed", "denoiser_of", "text_encoders_of", "using_schedule", "generate", "generate_batches",
           "check_steps", "check_call_kwargs", "SEED_STRIDE"]

SEED_STRIDE = 100003


def image_seed(seed: int, index: int) -> int:
    """Generator seed of image ``index`` for base seed ``seed``: ``seed * 100003 + index``."""
    s = int(seed) * SEED_STRIDE + int(index)
    if not 0 <= s < 2**63:
        from qsched.errors import QSchedError

        raise QSchedError(f"seed {seed} is out of range: seeds must be integers from 0 to {(2**63 - 1) // SEED_STRIDE}")
    return s


def check_steps(scheduler: Any, steps: int) -> int:
    """``steps`` if ``scheduler`` can sample in that many steps, else a one-line QSchedError saying the limit
    (``num_train_timesteps``, or an LCM/TCD's ``original_inference_steps``) instead of the scheduler's own
    message (diffusers' LCM asks to "increase strength", an img2img notion)."""
    from qsched.errors import QSchedError
    from qsched.scheduler import QSchedScheduler

    base = scheduler.base_scheduler if isinstance(scheduler, QSchedScheduler) else scheduler
    cfg = getattr(base, "config", None) or {}
    limits = [int(v) for v in (cfg.get("num_train_timesteps"), cfg.get("original_inference_steps")) if v]
    if limits and int(steps) > min(limits):
        raise QSchedError(f"--steps {steps}: the model's {type(base).__name__} samples in at most {min(limits)} "
                          "steps")
    return int(steps)


def check_call_kwargs(call_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Refuse non-finite numbers among the pipeline call arguments (NaN guidance makes every image invalid)."""
    import math

    from qsched.errors import QSchedError

    for key, v in (call_kwargs or {}).items():
        if isinstance(v, float) and not math.isfinite(v):
            raise QSchedError(f"{key} must be a finite number, got {v}")
    return dict(call_kwargs or {})


def denoiser_of(pipe: Any) -> tuple[str, torch.nn.Module]:
    """``("unet", pipe.unet)`` or ``("transformer", pipe.transformer)``; a bare module is its own denoiser
    (name None)."""
    if isinstance(pipe, torch.nn.Module):
        return None, pipe  # type: ignore[return-value]
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return name, module
    raise QSchedError(f"{type(pipe).__name__} has neither a `unet` nor a `transformer` module.")


def text_encoders_of(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's text encoders (text_encoder, text_encoder_2, text_encoder_3 where present)."""
    out = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        m = getattr(pipe, name, None)
        if isinstance(m, torch.nn.Module):
            out.append(m)
    return out


@contextlib.contextmanager
def using_schedule(pipe: Any, schedule: Schedule | None) -> Iterator[Any]:
    """Run ``pipe`` with ``schedule`` inside the block (None: the model's own sampler, even when the pipeline
    was saved with a Q-Sched schedule); the scheduler and its schedule are restored afterwards."""
    from qsched.scheduler import QSchedScheduler, apply_schedule

    if schedule is None and getattr(pipe, "scheduler", None) is None:
        yield pipe  # nothing to install or restore (e.g. a stand-in pipeline without a scheduler)
        return
    base = pipe.scheduler
    saved = base.schedule if isinstance(base, QSchedScheduler) else None
    try:
        if schedule is None:
            if isinstance(base, QSchedScheduler):
                base.set_schedule(None)
        else:
            apply_schedule(pipe, schedule)
        yield pipe
    finally:
        if isinstance(base, QSchedScheduler):
            base.set_schedule(saved)
        pipe.scheduler = base


def _call(pipe: Any, prompts: list[str], seeds: list[int], steps: int, call_kwargs: dict[str, Any]) -> torch.Tensor:
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with torch.inference_mode():
        out = pipe(prompt=prompts, num_inference_steps=int(steps), generator=gens, output_type="pt", **call_kwargs)
    images = to_tensor(out.images if hasattr(out, "images") else out[0]).cpu()
    if images.shape[0] != len(prompts):
        raise RuntimeError(f"the pipeline returned {images.shape[0]} images for {len(prompts)} prompts")
    return images


def generate_batches(pipe: Any, prompts: Sequence[str], steps: int, *, seed: int = 0, start: int = 0,
                     batch_size: int | None = None, call_kwargs: dict[str, Any] | None = None
                     ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(offset, images)`` per pipeline call: images ``(b, C, H, W)`` float in [0, 1] (may hold NaN) of
    ``prompts[offset:offset + b]``, drawn as images ``start + offset ...`` of base ``seed`` (module docstring)."""
    prompts = [str(p) for p in prompts]
    bs = int(batch_size) if batch_size else max(1, len(prompts))
    if bs < 1:
        raise QSchedError(f"batch_size must be >= 1, got {batch_size}")
    kw = check_call_kwargs(call_kwargs)
    for off in range(0, len(prompts), bs):
        chunk = prompts[off:off + bs]
        seeds = [image_seed(seed, start + off + j) for j in range(len(chunk))]
        yield off, _call(pipe, chunk, seeds, steps, kw)


def generate(pipe: Any, prompts: Sequence[str], steps: int, *, seed: int = 0, start: int = 0,
             batch_size: int | None = None, call_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """All images of :func:`generate_batches` as one ``(N, C, H, W)`` tensor (same images for any batch size)."""
    parts = [imgs for _, imgs in generate_batches(pipe, prompts, steps, seed=seed, start=start,
                                                  batch_size=batch_size, call_kwargs=call_kwargs)]
    if not parts:
        raise QSchedError("generate needs at least one prompt")
    return torch.cat(parts)

"""Architectures of the testbed's diffusion models (plain diffusers modules, built from configs).

Teacher and student share one small UNet2DConditionModel in pixel space (1x32x32) that cross-attends to
MiniLM token states; the student adds a guidance-scale embedding (``time_cond_proj_dim``) as in LCM.
Noise schedule: Stable Diffusion's (scaled_linear, 0.00085 -> 0.012, 1000 steps), so real schedulers apply.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from .text import HIDDEN

GUIDANCE_EMBED_DIM = 64

NOISE_SCHEDULE: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)


def unet_config(student: bool = False) -> dict[str, Any]:
    """UNet2DConditionModel config of the teacher (``student=False``) or the LCM student."""
    return dict(
        sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=4, norm_num_groups=8,
        time_cond_proj_dim=GUIDANCE_EMBED_DIM if student else None,
    )


def build_unet(student: bool = False) -> UNet2DConditionModel:
    """A randomly initialised testbed UNet."""
    return UNet2DConditionModel(**unet_config(student))


def noise_scheduler() -> DDPMScheduler:
    """The training noise schedule (SD1.5's), as a diffusers scheduler."""
    return DDPMScheduler(**{k: v for k, v in NOISE_SCHEDULE.items() if k != "set_alpha_to_one"})


def guidance_embedding(w: torch.Tensor, dim: int = GUIDANCE_EMBED_DIM) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale (the LCM pipeline's ``get_guidance_scale_embedding``)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half, dtype=torch.float32) / (half - 1))
    emb = w[:, None] * freqs[None, :].to(w.device)
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)

"""The testbed's text-to-image pipeline: a diffusers ``DiffusionPipeline`` in pixel space (1x32x32).

It behaves like the real few-step families for everything qsched does: ``pipe.unet`` is the denoiser that
``quantize`` acts on, ``pipe.scheduler`` is a stock diffusers scheduler that ``QSchedScheduler`` wraps, and it
saves/loads with ``save_pretrained`` / ``from_pretrained``. The student embeds the guidance scale (LCM style,
no classifier-free guidance pass); the teacher uses classifier-free guidance.
"""

from __future__ import annotations

import inspect
import json
import numbers
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, LCMScheduler, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors.torch import load_file

from qsched.errors import QSchedError

from .models import NOISE_SCHEDULE, guidance_embedding
from .text import MAX_TOKENS, load_minilm, tokenize, warn_truncated
from .weights_io import WEIGHTS_DIR

#: Guidance scale used when the caller passes none. Chosen by comparing 3.0 and 6.0 on the teacher (class
#: accuracy on held-out and training wordings, 200 prompts each); the student is distilled for scales 2-8.
DEFAULT_GUIDANCE = 6.0

#: Default sampling settings per variant.
VARIANTS: dict[str, dict] = {
    "student": {"num_inference_steps": 4, "scheduler": "LCMScheduler"},
    "teacher": {"num_inference_steps": 50, "scheduler": "DDIMScheduler"},
}


class TestbedPipeline(DiffusionPipeline):
    """Text-to-image for 32x32 grayscale Fashion-MNIST-like images, conditioned on MiniLM token states."""

    __test__ = False  # not a pytest test class
    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: UNet2DConditionModel, scheduler, text_encoder, tokenizer):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """(B, 16, 384) MiniLM token states of ``prompts``."""
        warn_truncated(self.tokenizer, [p for p in prompts if p])
        t = tokenize(self.tokenizer, prompts, self.text_encoder.device)
        return self.text_encoder(**t).last_hidden_state.to(self.unet.dtype)

    @property
    def embeds_guidance(self) -> bool:
        """True for the LCM student (guidance scale is an input of the UNet, one pass per step)."""
        return self.unet.config.time_cond_proj_dim is not None

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 4, guidance_scale: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 eta: float | None = None):
        """Generate one image per prompt. ``output_type``: "pil", "np" (B,32,32,1) or "pt" (B,1,32,32), in [0,1]."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt must be a non-empty string or list of strings")
        if (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral)
                or num_inference_steps < 1):
            raise QSchedError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if guidance_scale is None:
            guidance_scale = DEFAULT_GUIDANCE
        b, dev, dtype = len(prompts), self.unet.device, self.unet.dtype
        ctx = self.encode_prompt(prompts)
        cfg = not self.embeds_guidance and guidance_scale > 1.0
        if cfg:
            ctx = torch.cat([self.encode_prompt([""] * b), ctx])
        tcond = None
        if self.embeds_guidance:
            w = torch.full((b,), guidance_scale - 1.0)
            tcond = guidance_embedding(w, self.unet.config.time_cond_proj_dim).to(dev, dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=dev)
        shape = (b, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=dev, dtype=dtype)
        elif latents.shape != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        x = latents.to(dev, dtype) * self.scheduler.init_noise_sigma
        params = inspect.signature(self.scheduler.step).parameters
        extra = {}
        if "generator" in params:
            extra["generator"] = generator
        if "eta" in params and eta is not None:
            extra["eta"] = eta

        for t in self.progress_bar(self.scheduler.timesteps):
            xin = self.scheduler.scale_model_input(torch.cat([x, x]) if cfg else x, t)
            out = self.unet(xin, t, encoder_hidden_states=ctx, timestep_cond=tcond).sample  # eps or v
            if cfg:
                o_u, o_c = out.chunk(2)
                out = o_u + guidance_scale * (o_c - o_u)
            x = self.scheduler.step(out, t, x, **extra, return_dict=False)[0]

        img = (x.float() / 2 + 0.5).clamp(0, 1)
        img = torch.where(torch.isfinite(x.float()), img, x.float())  # keep NaN/inf visible to the caller
        if output_type == "pt":
            images = img.cpu()
        else:
            arr = img.permute(0, 2, 3, 1).cpu().numpy()
            images = arr if output_type == "np" else [
                Image.fromarray((np.nan_to_num(a[..., 0]) * 255).round().astype(np.uint8), mode="L") for a in arr]
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _scheduler(name: str, prediction_type: str = "epsilon"):
    cfg = {**NOISE_SCHEDULE, "prediction_type": prediction_type}
    if name == "LCMScheduler":
        cfg.pop("clip_sample"); cfg.pop("set_alpha_to_one")
        return LCMScheduler(**cfg, original_inference_steps=50, timestep_spacing="leading")
    return DDIMScheduler(**cfg)


def load_testbed_pipeline(variant: str = "student", device: str | torch.device = "cpu",
                          weights_dir: str | Path | None = None) -> TestbedPipeline:
    """Load the shipped testbed model (``variant`` "student", the default few-step model, or "teacher")."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown testbed variant {variant!r}; choose from {sorted(VARIANTS)}")
    wd = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    cfg_path, w_path = wd / f"{variant}.json", wd / f"{variant}.safetensors"
    if not w_path.exists():
        raise FileNotFoundError(f"testbed weights missing: {w_path} (train them with "
                                f"`python -m qsched.testbed.train_{variant}`)")
    meta = json.loads(cfg_path.read_text())
    unet = UNet2DConditionModel.from_config(meta["unet_config"])
    unet.load_state_dict({k: v.float() for k, v in load_file(str(w_path)).items()})
    tok, enc = load_minilm(device)
    sched = _scheduler(VARIANTS[variant]["scheduler"], meta.get("prediction_type", "epsilon"))
    pipe = TestbedPipeline(unet.eval(), sched, enc, tok).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_testbed_pipeline(seed: int = 0, student: bool = True) -> TestbedPipeline:
    """A tiny randomly initialised testbed pipeline (real MiniLM, tiny UNet) for fast tests."""
    from .models import GUIDANCE_EMBED_DIM
    from .text import HIDDEN

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=2, norm_num_groups=4,
        time_cond_proj_dim=GUIDANCE_EMBED_DIM if student else None,
    ).eval()
    tok, enc = load_minilm("cpu")
    pipe = TestbedPipeline(unet, _scheduler("LCMScheduler" if student else "DDIMScheduler"), enc, tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["TestbedPipeline", "load_testbed_pipeline", "tiny_testbed_pipeline", "VARIANTS", "MAX_TOKENS", "DEFAULT_GUIDANCE"]

"""Tiny CLIP for the Fashion-MNIST testbed: the JAQ scorers (CLIPScore and CLIP-IQA stand-ins).

``TinyCLIP`` pairs a small conv image encoder (1x32x32 -> 256-d) with a trainable MLP projection of the frozen
MiniLM sentence embedding (384-d -> 256-d) and a learned temperature. It is trained contrastively on
Fashion-MNIST images with class captions, on clean vs degraded images with good/bad-quality phrases, and on
combined captions ("a bad photo of a sneaker"); see ``python -m qsched.testbed.train_clip``.

- :func:`clip_score`: 100 * max(cos(image, prompt), 0), CLIPScore's 0-100 scale (w = 100 as in torchmetrics).
- :func:`clip_iqa`: CLIP-IQA's antonym-pair probability, softmax(100 * [cos_good, cos_bad])[good], in [0, 1].
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qsched.testbed.metrics import to_gray32
from qsched.testbed.weights_io import load_net, save_net

MINILM_DIM = 384
IQA_PAIR = ("a good photo.", "a bad photo.")


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ImageEncoder(nn.Module):
    """(B, 1, 32, 32) in [0, 1] -> (B, embed_dim) (unnormalised)."""

    def __init__(self, width: int = 32, embed_dim: int = 256):
        super().__init__()
        w = width
        self.body = nn.Sequential(_block(1, w), nn.MaxPool2d(2), _block(w, 2 * w), nn.MaxPool2d(2),
                                  _block(2 * w, 4 * w), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body((x - 0.29) / 0.35))


class TinyCLIP(nn.Module):
    """Image encoder + projection of frozen MiniLM sentence embeddings into a shared 256-d space."""

    def __init__(self, width: int = 32, embed_dim: int = 256, text_hidden: int = 256):
        super().__init__()
        self.config = {"width": width, "embed_dim": embed_dim, "text_hidden": text_hidden}
        self.image_encoder = ImageEncoder(width, embed_dim)
        self.text_proj = nn.Sequential(nn.Linear(MINILM_DIM, text_hidden), nn.GELU(), nn.Linear(text_hidden, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._minilm_cache: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def encode_image(self, images: Any) -> torch.Tensor:
        """(B, 256) L2-normalised embeddings of images (tensor (B,1,32,32) in [0, 1], numpy or PIL also accepted)."""
        x = to_gray32(images)
        return F.normalize(self.image_encoder(x.to(self.device)), dim=-1)

    def minilm_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 384) frozen MiniLM sentence embeddings, cached in memory per prompt string."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        missing = sorted({p for p in prompts if p not in self._minilm_cache})
        if missing:
            from qsched.testbed.text import sentence_embeddings, shared_minilm

            tok, model = shared_minilm()
            emb = sentence_embeddings(tok, model, missing).float().cpu()
            self._minilm_cache.update(zip(missing, emb))
        return torch.stack([self._minilm_cache[p] for p in prompts]).to(self.device)

    def project_text(self, minilm_emb: torch.Tensor) -> torch.Tensor:
        """(B, 256) L2-normalised text embeddings from (B, 384) MiniLM sentence embeddings."""
        return F.normalize(self.text_proj(minilm_emb), dim=-1)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 256) L2-normalised embeddings of prompts."""
        return self.project_text(self.minilm_embeddings(prompts))

    def forward(self, images: torch.Tensor, minilm_emb: torch.Tensor) -> torch.Tensor:
        """(B_img, B_txt) logits = exp(logit_scale) * cosine similarity."""
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return scale * self.encode_image(images) @ self.project_text(minilm_emb).T


def save_tiny_clip(model: TinyCLIP, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``tiny_clip.safetensors`` and ``tiny_clip.json`` (config + ``extra``, e.g. training facts)."""
    return save_net(model, out_dir, "tiny_clip", extra)


def load_tiny_clip(device: str | torch.device = "cpu", weights_dir: str | Path | None = None) -> TinyCLIP:
    """Load the shipped (or ``weights_dir``'s) tiny CLIP in eval mode."""
    return load_net(TinyCLIP, "tiny_clip", weights_dir, "python -m qsched.testbed.train_clip", device)


@lru_cache(maxsize=1)
def shared_tiny_clip() -> TinyCLIP:
    """One process-wide CPU tiny CLIP (shipped weights), loaded on first use."""
    return load_tiny_clip("cpu")


@torch.no_grad()
def clip_score(model: TinyCLIP, images: Any, prompts: str | Sequence[str]) -> torch.Tensor:
    """(B,) CLIPScore = 100 * max(cos(image_i, prompt_i), 0), in [0, 100].

    ``prompts`` is one string (used for every image) or a list with one prompt per image.
    """
    x = to_gray32(images)
    if isinstance(prompts, str):
        prompts = [prompts] * x.shape[0]
    prompts = list(prompts)
    if len(prompts) != x.shape[0]:
        raise ValueError(f"got {x.shape[0]} images but {len(prompts)} prompts")
    cos = (model.encode_image(x) * model.encode_text(prompts)).sum(-1)
    return (100.0 * cos.clamp_min(0.0)).cpu()


@torch.no_grad()
def clip_iqa(model: TinyCLIP, images: Any, pair: tuple[str, str] = IQA_PAIR) -> torch.Tensor:
    """(B,) CLIP-IQA score in [0, 1]: probability of ``pair[0]`` ("good") under softmax(100 * cosines)."""
    if len(pair) != 2:
        raise ValueError(f"pair must be (good_prompt, bad_prompt), got {pair!r}")
    x = to_gray32(images)
    logits = 100.0 * model.encode_image(x) @ model.encode_text(list(pair)).T
    return logits.softmax(dim=-1)[:, 0].cpu()

"""Reference-free scores for calibration: the scorer interface and JAQ (Joint Alignment-Quality).

    JAQ = mean_p TC(image_p, prompt_p) + k * mean_p IQ(image_p),   k = 2 (the paper's choice)

TC is a text-image compatibility scorer (:class:`AlignmentScorer`), IQ a no-reference quality scorer
(:class:`QualityScorer`). Presets after the paper (:func:`make_jaq`):

* ``"testbed"`` (default, offline): the embedded tiny CLIP's CLIPScore + 2 x its CLIP-IQA.
* ``"sd15"``: CLIPScore with CLIP ViT-L/14 + 2 x CLIP-IQA (same CLIP, "Good photo."/"Bad photo.").
* ``"sdxl"``: CLIPScore ViT-L/14 as the alignment term (the paper's AQ-Map is not public) + 2 x HPSv2.1.

Real-model scorers load weights from the Hugging Face hub or a local directory; they also accept an already
built model object so they can be tested with tiny random models. Images that are NaN, infinite or blank
get the worst score (TC = IQ = 0) and a warning, never an exception.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from qsched.errors import QSchedError
from qsched.images import to_gray, to_tensor

__all__ = [
    "AlignmentScorer",
    "QualityScorer",
    "JAQ",
    "JAQScore",
    "invalid_mask",
    "TestbedCLIPScore",
    "TestbedCLIPIQA",
    "CLIPScore",
    "CLIPIQA",
    "PickScore",
    "HPSv2",
    "ImageReward",
    "make_jaq",
    "PRESETS",
    "MissingWeightsError",
]

BLANK_STD = 1e-3

CLIP_L14 = "openai/clip-vit-large-patch14"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPSV2_REPO = "xswu/HPSv2"
HPSV2_FILE = "HPS_v2.1_compressed.pt"


class MissingWeightsError(OSError):
    """Raised when a real scorer's weights are neither local nor downloadable (e.g. offline)."""


# --------------------------------------------------------------------------------------------- images


def invalid_mask(images: torch.Tensor, blank_std: float = BLANK_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """Return boolean masks (nonfinite, blank), each (B,): NaN/inf images, and near-constant images."""
    flat = images.reshape(images.shape[0], -1)
    nonfinite = ~torch.isfinite(flat).all(dim=1)
    safe = torch.where(torch.isfinite(flat), flat, torch.zeros_like(flat))
    blank = (~nonfinite) & (safe.std(dim=1, unbiased=False) < blank_std) if flat.shape[1] > 0 else ~nonfinite
    return nonfinite, blank


# --------------------------------------------------------------------------------------------- interface


@runtime_checkable
class AlignmentScorer(Protocol):
    """Text-image compatibility: ``scorer(images, prompts) -> (B,)`` float tensor, batched, on its device."""

    def __call__(self, images: Any, prompts: Sequence[str]) -> torch.Tensor: ...


@runtime_checkable
class QualityScorer(Protocol):
    """No-reference quality: ``scorer(images) -> (B,)`` float tensor.

    A quality scorer that needs the prompt too (HPSv2) sets ``needs_prompts = True`` and is then called as
    ``scorer(images, prompts)``.
    """

    def __call__(self, images: Any) -> torch.Tensor: ...


@dataclass
class JAQScore:
    """The result of :meth:`JAQ.score`.

    ``jaq = tc + k * iq`` where ``tc``/``iq`` are means over all images; ``tc_per_image``/``iq_per_image``
    hold the per-image values (invalid images scored 0); ``per_prompt`` maps each prompt to its mean
    {"tc", "iq", "jaq", "n"} over its images (several seeds give several images per prompt).
    """

    jaq: float
    tc: float
    iq: float
    k: float
    tc_per_image: list[float]
    iq_per_image: list[float]
    per_prompt: dict[str, dict[str, float]] = field(default_factory=dict)
    n_images: int = 0
    n_invalid: int = 0
    n_nonfinite: int = 0
    n_blank: int = 0

    def summary(self) -> dict[str, float | int]:
        """Short JSON-able summary: jaq, tc, iq, k and invalid counts."""
        return {
            "jaq": self.jaq, "tc": self.tc, "iq": self.iq, "k": self.k, "n_images": self.n_images,
            "n_invalid": self.n_invalid, "n_nonfinite": self.n_nonfinite, "n_blank": self.n_blank,
        }

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-able dict."""
        return asdict(self)


class JAQ:
    """Joint Alignment-Quality score ``mean TC + k * mean IQ`` over a batch of (image, prompt) pairs."""

    def __init__(self, tc: AlignmentScorer, iq: QualityScorer, k: float = 2.0, blank_std: float = BLANK_STD):
        if not callable(tc) or not callable(iq):
            raise QSchedError("JAQ needs callable tc (alignment) and iq (quality) scorers")
        k = float(k)
        if not math.isfinite(k) or k < 0:
            raise QSchedError(f"k must be a finite number >= 0, got {k}")
        self.tc = tc
        self.iq = iq
        self.k = k
        self.blank_std = blank_std

    def __repr__(self) -> str:
        return f"JAQ(tc={type(self.tc).__name__}, iq={type(self.iq).__name__}, k={self.k})"

    @torch.no_grad()
    def score(self, images: Any, prompts: Sequence[str] | str) -> JAQScore:
        """Score images against their prompts (one prompt per image; a single string applies to all)."""
        x = to_tensor(images)
        b = x.shape[0]
        if isinstance(prompts, str):
            prompts = [prompts] * b
        prompts = list(prompts)
        if len(prompts) != b:
            raise QSchedError(f"got {b} images but {len(prompts)} prompts")
        if b == 0:
            raise QSchedError("no images to score")
        nonfinite, blank = invalid_mask(x, self.blank_std)
        bad = nonfinite | blank
        if bad.any():
            warnings.warn(
                f"JAQ: {int(nonfinite.sum())} NaN/inf and {int(blank.sum())} blank image(s) out of {b} "
                "get the worst score (TC 0, IQ 0)",
                RuntimeWarning,
                stacklevel=2,
            )
        tc = torch.zeros(b, dtype=torch.float64)
        iq = torch.zeros(b, dtype=torch.float64)
        good = (~bad).nonzero().flatten().tolist()
        if good:
            xs = x[good].clamp(0, 1)
            ps = [prompts[i] for i in good]
            tc_good = _as_scores(self.tc(xs, ps), len(good), "TC")
            if getattr(self.iq, "needs_prompts", False):
                iq_good = _as_scores(self.iq(xs, ps), len(good), "IQ")
            else:
                iq_good = _as_scores(self.iq(xs), len(good), "IQ")
            tc[good] = tc_good
            iq[good] = iq_good
        per: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            per[p].append(i)
        per_prompt = {}
        for p, idx in per.items():
            t, q = float(tc[idx].mean()), float(iq[idx].mean())
            per_prompt[p] = {"tc": t, "iq": q, "jaq": t + self.k * q, "n": len(idx)}
        tc_m, iq_m = float(tc.mean()), float(iq.mean())
        return JAQScore(
            jaq=tc_m + self.k * iq_m, tc=tc_m, iq=iq_m, k=self.k,
            tc_per_image=tc.tolist(), iq_per_image=iq.tolist(), per_prompt=per_prompt, n_images=b,
            n_invalid=int(bad.sum()), n_nonfinite=int(nonfinite.sum()), n_blank=int(blank.sum()),
        )

    __call__ = score


def _as_scores(s: Any, n: int, what: str) -> torch.Tensor:
    """Validate a scorer output as (n,) float64 on CPU; non-finite scores become 0 with a warning."""
    t = torch.as_tensor(s).detach().reshape(-1).to("cpu", torch.float64)
    if t.numel() != n:
        raise QSchedError(f"{what} scorer returned {t.numel()} scores for {n} images")
    if not torch.isfinite(t).all():
        warnings.warn(f"JAQ: {what} scorer returned non-finite scores; they count as 0", RuntimeWarning, stacklevel=3)
        t = torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)
    return t


# --------------------------------------------------------------------------------------------- testbed


class _TinyClipBase:
    """Shared lazy loading of the testbed's tiny CLIP (``qsched.testbed.clip.load_tiny_clip``)."""

    def __init__(self, model: Any = None, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._model = model

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = _shared_tiny_clip(str(self.device))
        return self._model


@functools.lru_cache(maxsize=4)
def _shared_tiny_clip(device: str) -> Any:
    """One tiny CLIP per device, shared by the testbed CLIPScore and CLIP-IQA."""
    from qsched.testbed.clip import load_tiny_clip

    try:
        return load_tiny_clip(device=device)
    except TypeError:  # a signature without ``device``
        m = load_tiny_clip()
        return m.to(device) if hasattr(m, "to") else m


class TestbedCLIPScore(_TinyClipBase):
    """CLIPScore (0-100) of the testbed's tiny CLIP; RGB inputs become 32x32 grayscale."""

    def __call__(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        from qsched.testbed.clip import clip_score

        x = to_gray(images, 32).to(self.device)
        return clip_score(self.model, x, list(prompts)).reshape(-1).float()


class TestbedCLIPIQA(_TinyClipBase):
    """CLIP-IQA ([0, 1]) of the testbed's tiny CLIP; RGB inputs become 32x32 grayscale."""

    def __call__(self, images: Any) -> torch.Tensor:
        from qsched.testbed.clip import clip_iqa

        x = to_gray(images, 32).to(self.device)
        return clip_iqa(self.model, x).reshape(-1).float()


# --------------------------------------------------------------------------------------------- real CLIP


def _hub_error(name: str, err: BaseException) -> MissingWeightsError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    hint = " (HF_HUB_OFFLINE is set)" if offline else ""
    return MissingWeightsError(
        f"weights for {name!r} are not available{hint}: download them once with network access "
        f"(huggingface-cli download {name}) or pass a local directory / a loaded model. Cause: {err}"
    )


def _load_clip(model: Any, processor: Any, device: str | torch.device, dtype: torch.dtype | None):
    """Return (CLIPModel, CLIPProcessor-like) from ids/paths/objects; model in eval mode on ``device``."""
    from transformers import CLIPModel, CLIPProcessor

    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        try:
            model = CLIPModel.from_pretrained(name, torch_dtype=dtype) if dtype else CLIPModel.from_pretrained(name)
        except OSError as e:
            raise _hub_error(name, e) from e
        if processor is None:
            processor = name
    if isinstance(processor, (str, os.PathLike)):
        pname = str(processor)
        try:
            processor = CLIPProcessor.from_pretrained(pname)
        except OSError as e:
            raise _hub_error(pname, e) from e
    if processor is None:
        raise QSchedError("pass a processor (CLIPProcessor or its id/path) together with a CLIPModel object")
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model, processor


def _size_field(size: Any, keys: tuple[str, ...], default: int) -> int:
    """Read an image-processor size entry (dict, transformers 5 SizeDict or int)."""
    if size is None:
        return default
    if isinstance(size, (int, float)):
        return int(size)
    for k in keys:
        v = size.get(k) if isinstance(size, dict) else getattr(size, k, None)
        if v:
            return int(v)
    return default


def _features(out: Any) -> torch.Tensor:
    """transformers 4 returns a tensor from get_*_features, transformers 5 a ModelOutput with pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _CLIPBase:
    """A transformers CLIPModel with tensor preprocessing that follows its CLIPImageProcessor config."""

    def __init__(
        self,
        model: Any = CLIP_L14,
        processor: Any = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ):
        self.device = torch.device(device)
        self.model, self.processor = _load_clip(model, processor, self.device, dtype)
        self.dtype = next(self.model.parameters()).dtype
        ip = getattr(self.processor, "image_processor", self.processor)
        image_size = int(self.model.config.vision_config.image_size)
        size, crop = getattr(ip, "size", None), getattr(ip, "crop_size", None)
        self.resize_to = int(_size_field(size, ("shortest_edge", "height"), image_size))
        self.crop = (int(_size_field(crop, ("height",), image_size)), int(_size_field(crop, ("width",), image_size)))
        mean = getattr(ip, "image_mean", None) or [0.48145466, 0.4578275, 0.40821073]
        std = getattr(ip, "image_std", None) or [0.26862954, 0.26130258, 0.27577711]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def pixel_values(self, images: Any) -> torch.Tensor:
        """[0, 1] images -> normalised CLIP pixel values: bicubic shortest-edge resize, centre crop."""
        x = to_tensor(images).clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 4:
            x = x[:, :3]
        h, w = x.shape[-2:]
        s = self.resize_to / min(h, w)
        nh, nw = max(self.crop[0], round(h * s)), max(self.crop[1], round(w * s))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (nh - self.crop[0]) // 2, (nw - self.crop[1]) // 2
        x = x[:, :, top : top + self.crop[0], left : left + self.crop[1]]
        x = (x - self.mean) / self.std
        return x.to(self.device, self.dtype)

    @torch.no_grad()
    def image_embeds(self, images: Any) -> torch.Tensor:
        """L2-normalised image embeddings (B, D)."""
        e = _features(self.model.get_image_features(pixel_values=self.pixel_values(images)))
        return F.normalize(e.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (B, D)."""
        t = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        t = {k: v.to(self.device) for k, v in t.items() if k in ("input_ids", "attention_mask")}
        return F.normalize(_features(self.model.get_text_features(**t)).float(), dim=-1)


class CLIPScore(_CLIPBase):
    """CLIPScore = 100 * max(cos(image, text), 0), CLIP ViT-L/14 by default (as torchmetrics)."""

    def __call__(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        return 100.0 * cos.clamp_min(0)


class CLIPIQA(_CLIPBase):
    """CLIP-IQA: softmax over 100 * cos with the antonym pair ("Good photo.", "Bad photo."); P(good) in [0, 1].

    Matches the CLIP-IQA paper and torchmetrics' ``CLIPImageQualityAssessment(prompts=("quality",))``
    (which uses the same CLIP logit scale of 100).
    """

    def __init__(self, model: Any = CLIP_L14, processor: Any = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, prompts: tuple[str, str] = ("Good photo.", "Bad photo.")):
        super().__init__(model, processor, device, dtype)
        self.prompts = prompts
        self._anchors: torch.Tensor | None = None

    def __call__(self, images: Any) -> torch.Tensor:
        if self._anchors is None:
            self._anchors = self.text_embeds(list(self.prompts))
        logits = 100.0 * self.image_embeds(images) @ self._anchors.T
        return logits.softmax(-1)[:, 0]


class PickScore(_CLIPBase):
    """PickScore: logit_scale.exp() * cos(image, text) of the PickScore_v1 CLIP-H (processor from LAION)."""

    def __init__(self, model: Any = PICKSCORE_MODEL, processor: Any = PICKSCORE_PROCESSOR,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        super().__init__(model, processor, device, dtype)

    def __call__(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        return self.model.logit_scale.exp().float() * cos


# --------------------------------------------------------------------------------------------- optional extras


class HPSv2:
    """HPSv2.1 preference score (OpenCLIP ViT-H-14 + the HPS v2.1 checkpoint); needs ``pip install qsched[scorers]``.

    Used as the quality term of the "sdxl" preset. It needs the prompt, so ``needs_prompts = True``.
    Pass ``model``/``preprocess``/``tokenizer`` objects to skip loading; ``checkpoint`` may be a local file.
    """

    needs_prompts = True

    def __init__(self, checkpoint: str | None = None, device: str | torch.device = "cpu", model: Any = None,
                 tokenizer: Any = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 image_size: int = 224):
        self.device = torch.device(device)
        if model is None:
            try:
                import open_clip
            except ImportError as e:
                raise ImportError("HPSv2 needs open-clip-torch: pip install 'qsched[scorers]'") from e
            model = open_clip.create_model("ViT-H-14", pretrained=None, device="cpu")
            if checkpoint is None:
                try:
                    from huggingface_hub import hf_hub_download

                    checkpoint = hf_hub_download(HPSV2_REPO, HPSV2_FILE)
                except Exception as e:  # offline: LocalEntryNotFoundError is an OSError subclass
                    raise _hub_error(f"{HPSV2_REPO}/{HPSV2_FILE}", e) from e
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state))
            tokenizer = tokenizer or open_clip.get_tokenizer("ViT-H-14")
        if tokenizer is None:
            raise QSchedError("pass the OpenCLIP tokenizer together with an HPSv2 model object")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean or (0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
        self.std = torch.tensor(std or (0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        x = to_tensor(images).clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x[:, :3], size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        x = ((x.clamp(0, 1) - self.mean) / self.std).to(self.device)
        img = F.normalize(self.model.encode_image(x).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)
        return (img * txt).sum(-1)


class ImageReward:
    """ImageReward-v1.0 (package ``image-reward``, ``pip install 'qsched[scorers]'``): an alignment scorer."""

    def __init__(self, name: str = "ImageReward-v1.0", device: str | torch.device = "cpu", model: Any = None):
        self.device = torch.device(device)
        if model is None:
            try:
                import ImageReward as RM
            except ImportError as e:
                raise ImportError("ImageReward needs the image-reward package: pip install 'qsched[scorers]'") from e
            try:
                model = RM.load(name, device=str(self.device))
            except OSError as e:
                raise _hub_error(name, e) from e
        self.model = model

    @torch.no_grad()
    def __call__(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        from PIL import Image

        x = to_tensor(images).clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        arr = (x[:, :3].permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        out = [float(self.model.score(p, [Image.fromarray(a)])) for p, a in zip(prompts, arr)]
        return torch.tensor(out)


# --------------------------------------------------------------------------------------------- presets


PRESETS = ("testbed", "sd15", "sdxl")


def make_jaq(preset: str = "testbed", device: str | torch.device = "cpu", k: float = 2.0) -> JAQ:
    """Build the JAQ of a preset: "testbed" (default), "sd15" or "sdxl" (see the module docstring)."""
    if preset == "testbed":
        tb = TestbedCLIPScore(device=device)
        return JAQ(tb, TestbedCLIPIQA(device=device), k=k)
    if preset == "sd15":
        tc = CLIPScore(CLIP_L14, device=device)
        return JAQ(tc, CLIPIQA(tc.model, tc.processor, device=device), k=k)
    if preset == "sdxl":
        return JAQ(CLIPScore(CLIP_L14, device=device), HPSv2(device=device), k=k)
    raise QSchedError(f"unknown JAQ preset {preset!r}; choose one of {', '.join(PRESETS)}")

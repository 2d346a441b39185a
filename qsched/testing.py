"""Tiny random diffusers pipelines for tests, built fully offline from configs (about a second per image on CPU).

``tiny_pipeline(family)`` for ``"lcm"``, ``"pcm"``, ``"sdxl-turbo"``, ``"flux"`` (and ``"testbed"``) returns a
pipeline of the real pipeline class with that family's scheduler configured as for the real model, all modules in
eval mode; ``tiny_call_kwargs(family)`` gives matching call arguments (32 px, ``output_type="np"``).
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

FAMILIES: tuple[str, ...] = ("lcm", "pcm", "sdxl-turbo", "flux")
_SEQ = 16  # text sequence length of the tiny encoders
_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _write_clip_vocab(directory: Path) -> None:
    """A small character-level BPE vocabulary (+ a few merges) that CLIPTokenizer.from_pretrained accepts."""
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n</w>")]
    tokens = ["!", "<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    tokens += [a + b for a, b in merges]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def tiny_clip_tokenizer() -> Any:
    """CLIPTokenizer over a tiny vocabulary, ``model_max_length`` 16."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _write_clip_vocab(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=_SEQ)


def _clip_config(vocab_size: int, projection_dim: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=_SEQ, projection_dim=projection_dim, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        hidden_act="gelu", layer_norm_eps=1e-5,
    )


def _clip_text_encoder(tokenizer: Any, with_projection: bool = False) -> torch.nn.Module:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(_clip_config(len(tokenizer)))


def _tiny_vae(latent_channels: int = 4, levels: int = 2, **kw: Any) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=[4, 8][:levels],
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        layers_per_block=1, norm_num_groups=2 if levels > 1 else 1, sample_size=32, **kw,
    )


def _tiny_sd_unet(**kw: Any) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=2, **kw,
    )


def _tiny_t5() -> tuple[Any, torch.nn.Module]:
    """A T5 (Unigram, as the real one) tokenizer over a few words + characters, and a tiny T5 encoder."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    words = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "shirt", "shoe", "bag", "dress", "on", "in",
             "with", "good", "bad", "quality", "image", "sneaker", "boot", "coat", "trouser", "pullover", "sandal"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + string.digits + ".,!?'-"]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=_SEQ)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="relu",
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return tokenizer, T5EncoderModel(config)


def _build(family: str) -> Any:
    import diffusers as d

    if family in ("lcm", "pcm"):
        tok = tiny_clip_tokenizer()
        common = dict(vae=_tiny_vae(), text_encoder=_clip_text_encoder(tok), tokenizer=tok, safety_checker=None,
                      feature_extractor=None, requires_safety_checker=False)
        if family == "lcm":  # LCM_Dreamshaper_v7: guidance embedded through time_cond_proj_dim
            sched = d.LCMScheduler(**_SD_BETAS, set_alpha_to_one=True, steps_offset=1, clip_sample=False,
                                   original_inference_steps=50, timestep_spacing="leading")
            return d.LatentConsistencyModelPipeline(unet=_tiny_sd_unet(time_cond_proj_dim=32), scheduler=sched,
                                                    **common)
        sched = d.TCDScheduler(**_SD_BETAS, set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                               timestep_spacing="trailing")
        return d.StableDiffusionPipeline(unet=_tiny_sd_unet(), scheduler=sched, **common)
    if family == "sdxl-turbo":
        tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
        unet = d.UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64, norm_num_groups=2,
        )
        sched = d.EulerAncestralDiscreteScheduler(**_SD_BETAS, steps_offset=1, timestep_spacing="trailing")
        return d.StableDiffusionXLPipeline(
            vae=_tiny_vae(), text_encoder=_clip_text_encoder(tok), text_encoder_2=_clip_text_encoder(tok2, True),
            tokenizer=tok, tokenizer_2=tok2, unet=unet, scheduler=sched, add_watermarker=False,
        )
    if family == "flux":
        tok = tiny_clip_tokenizer()
        tok2, t5 = _tiny_t5()
        transformer = d.FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        )
        vae = _tiny_vae(latent_channels=1, levels=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
        sched = d.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)  # as FLUX.1-schnell
        return d.FluxPipeline(scheduler=sched, vae=vae, text_encoder=_clip_text_encoder(tok), tokenizer=tok,
                              text_encoder_2=t5, tokenizer_2=tok2, transformer=transformer)
    if family == "testbed":
        from qsched.testbed.pipeline import tiny_testbed_pipeline

        return tiny_testbed_pipeline(seed=0)
    raise ValueError(f"Unknown tiny pipeline family {family!r}; expected one of {', '.join(FAMILIES)} or 'testbed'.")


def tiny_pipeline(family: str, seed: int = 0) -> Any:
    """A tiny random pipeline of ``family`` (weights from ``torch.manual_seed(seed)``), eval mode, on CPU."""
    if family not in FAMILIES and family != "testbed":
        raise ValueError(f"Unknown tiny pipeline family {family!r}; expected one of {', '.join(FAMILIES)}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _build(family)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_call_kwargs(family: str) -> dict[str, Any]:
    """Call arguments matching :func:`tiny_pipeline` (steps, guidance, 32 px, ``output_type="np"``)."""
    if family == "testbed":
        return {"num_inference_steps": 4, "output_type": "np"}
    guidance = {"lcm": 8.0, "pcm": 0.0, "sdxl-turbo": 0.0, "flux": 0.0}
    if family not in guidance:
        raise ValueError(f"Unknown tiny pipeline family {family!r}; expected one of {', '.join(FAMILIES)}.")
    kw: dict[str, Any] = {"num_inference_steps": 4, "guidance_scale": guidance[family], "height": 32, "width": 32,
                          "output_type": "np"}
    if family == "flux":
        kw["max_sequence_length"] = _SEQ
    return kw

"""Tests for qsched.scoring: image conversion, JAQ arithmetic, invalid images, real-CLIP scorers (tiny random)."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch
from PIL import Image

from qsched import scoring
from qsched.images import to_tensor
from qsched.scoring import JAQ, CLIPIQA, CLIPScore, PickScore, make_jaq


# ------------------------------------------------------------------ helpers


class MeanTC:
    """Fake alignment scorer: 100 * mean brightness, plus 1 for prompts containing 'bag'."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts):
        x = to_tensor(images)
        self.calls.append((x.shape[0], list(prompts)))
        return 100 * x.mean(dim=(1, 2, 3)) + torch.tensor([1.0 if "bag" in p else 0.0 for p in prompts])


class StdIQ:
    """Fake quality scorer: per-image std."""

    def __call__(self, images):
        return to_tensor(images).std(dim=(1, 2, 3))


def tiny_clip(tmp_path, image_size=32):
    """A tiny random transformers CLIPModel + CLIPProcessor built offline from a config and a char vocab."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tmp_path.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return model, CLIPProcessor(image_processor=ip, tokenizer=tok)


# ------------------------------------------------------------------ to_tensor


def test_to_tensor_accepts_three_formats_and_agrees():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 6, generator=g)
    arr = x.permute(0, 2, 3, 1).numpy()
    pils = [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
    t1, t2, t3 = to_tensor(x), to_tensor(arr), to_tensor(pils)
    for t in (t1, t2, t3):
        assert t.shape == (2, 3, 8, 6) and t.dtype == torch.float32
    assert torch.equal(t1, t2)
    assert (t3 - t1).abs().max() <= 0.5 / 255 + 1e-6
    gray = to_tensor([Image.fromarray(np.zeros((5, 5), np.uint8))])
    assert gray.shape == (1, 1, 5, 5)
    with pytest.raises(ValueError):
        to_tensor("not images")
    with pytest.raises(ValueError):
        to_tensor(torch.zeros(2, 2))


# ------------------------------------------------------------------ JAQ


def test_jaq_is_mean_tc_plus_k_mean_iq_with_per_prompt_breakdown():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 8, 8, generator=g)
    prompts = ["a bag", "a coat", "a bag", "a dress"]
    tc, iq = MeanTC(), StdIQ()
    s = JAQ(tc, iq, k=3.0).score(x, prompts)
    exp_tc = tc(x, prompts).double()
    exp_iq = iq(x).double()
    assert s.tc == pytest.approx(float(exp_tc.mean()))
    assert s.iq == pytest.approx(float(exp_iq.mean()))
    assert s.jaq == pytest.approx(s.tc + 3.0 * s.iq)
    assert s.tc_per_image == pytest.approx(exp_tc.tolist())
    assert set(s.per_prompt) == {"a bag", "a coat", "a dress"}
    assert s.per_prompt["a bag"]["n"] == 2
    assert s.per_prompt["a bag"]["tc"] == pytest.approx(float(exp_tc[[0, 2]].mean()))
    assert s.n_invalid == 0 and s.n_images == 4
    json.dumps(s.to_dict())
    # k changes the trade-off
    assert JAQ(tc, iq, k=0.0).score(x, prompts).jaq == pytest.approx(s.tc)
    with pytest.raises(ValueError):
        JAQ(tc, iq, k=float("nan"))
    with pytest.raises(ValueError):
        JAQ(tc, iq).score(x, prompts[:3])


def test_invalid_images_get_worst_score_and_warning_not_crash():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 1, 8, 8, generator=g)
    x[1] = float("nan")
    x[2] = 0.5  # blank
    x[3, 0, 0, 0] = float("inf")
    tc = MeanTC()
    with pytest.warns(RuntimeWarning, match="worst score"):
        s = JAQ(tc, StdIQ()).score(x, ["a", "b", "c", "d"])
    assert s.n_invalid == 3 and s.n_nonfinite == 2 and s.n_blank == 1
    assert s.tc_per_image[1:] == [0.0, 0.0, 0.0] and s.iq_per_image[1:] == [0.0, 0.0, 0.0]
    assert s.tc_per_image[0] > 0
    assert tc.calls == [(1, ["a"])]  # scorers never see invalid images
    assert np.isfinite(s.jaq)
    # all invalid: no scorer call at all, finite worst score
    with pytest.warns(RuntimeWarning):
        s2 = JAQ(MeanTC(), StdIQ()).score(torch.full((2, 1, 4, 4), float("nan")), ["a", "b"])
    assert s2.jaq == 0.0


def test_non_finite_scorer_output_counts_as_zero():
    bad_iq = lambda images: torch.tensor([float("nan")] * to_tensor(images).shape[0])  # noqa: E731
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        s = JAQ(MeanTC(), bad_iq).score(x, ["a", "b"])
    assert s.iq == 0.0 and np.isfinite(s.jaq)


def test_quality_scorer_with_prompts_gets_them():
    class PromptIQ:
        needs_prompts = True

        def __call__(self, images, prompts):
            return torch.tensor([float(len(p)) for p in prompts])

    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    s = JAQ(MeanTC(), PromptIQ(), k=1).score(x, ["ab", "abcd"])
    assert s.iq == pytest.approx(3.0)


def test_make_jaq_unknown_preset():
    with pytest.raises(ValueError, match="unknown JAQ preset"):
        make_jaq("sd3")


def test_testbed_scorers_convert_rgb_to_gray32(monkeypatch):
    """The testbed scorers feed the tiny CLIP (B, 1, 32, 32) whatever they are given."""
    import sys
    import types

    seen = []
    fake = types.ModuleType("qsched.testbed.clip")
    fake.load_tiny_clip = lambda device="cpu": "tiny"
    fake.clip_score = lambda m, x, p: (seen.append(("tc", m, tuple(x.shape))), torch.full((x.shape[0],), 50.0))[1]
    fake.clip_iqa = lambda m, x: (seen.append(("iq", m, tuple(x.shape))), torch.full((x.shape[0],), 0.25))[1]
    monkeypatch.setitem(sys.modules, "qsched.testbed.clip", fake)
    scoring._shared_tiny_clip.cache_clear()
    try:
        jaq = make_jaq("testbed")
        rgb = torch.rand(3, 3, 64, 48, generator=torch.Generator().manual_seed(5))
        s = jaq.score(rgb, ["a", "b", "c"])
    finally:
        scoring._shared_tiny_clip.cache_clear()
    assert s.jaq == pytest.approx(50.0 + 2 * 0.25)
    assert seen == [("tc", "tiny", (3, 1, 32, 32)), ("iq", "tiny", (3, 1, 32, 32))]


# ------------------------------------------------------------------ real CLIP scorers on a tiny random CLIP


def test_clipscore_clipiqa_pickscore_on_tiny_random_clip(tmp_path):
    model, proc = tiny_clip(tmp_path)
    g = torch.Generator().manual_seed(6)
    imgs = torch.rand(3, 3, 40, 56, generator=g)  # non-square: resize + centre crop
    prompts = ["a bag", "a red coat", "good photo."]
    cs = CLIPScore(model, proc)
    tc = cs(imgs, prompts)
    assert tc.shape == (3,) and (tc >= 0).all() and (tc <= 100).all()
    # matches a direct computation with the model (100 * max(cos, 0))
    pv = cs.pixel_values(imgs)
    assert pv.shape == (3, 3, 32, 32)
    ie = scoring._features(model.get_image_features(pixel_values=pv))
    t = proc.tokenizer(prompts, padding=True, return_tensors="pt")
    te = scoring._features(model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]))
    cos = torch.nn.functional.cosine_similarity(ie, te)
    assert torch.allclose(tc, 100 * cos.clamp_min(0), atol=1e-4)

    iqa = CLIPIQA(model, proc)
    q = iqa(imgs)
    assert q.shape == (3,) and ((q > 0) & (q < 1)).all()
    anchors = cs.text_embeds(["Good photo.", "Bad photo."])
    ref = (100 * torch.nn.functional.normalize(ie, dim=-1) @ anchors.T).softmax(-1)[:, 0]
    assert torch.allclose(q, ref, atol=1e-4)

    ps = PickScore(model, proc)
    p = ps(imgs, prompts)
    assert p.shape == (3,) and torch.allclose(p, model.logit_scale.exp() * cos, atol=1e-3)

    # grayscale and PIL input work too
    assert cs(imgs[:, :1], prompts).shape == (3,)
    jaq = JAQ(cs, iqa)
    s = jaq.score([Image.fromarray((a * 255).astype(np.uint8)) for a in imgs.permute(0, 2, 3, 1).numpy()], prompts)
    assert np.isfinite(s.jaq) and s.n_invalid == 0


def test_clipscore_from_local_path(tmp_path):
    model, proc = tiny_clip(tmp_path / "src")
    model.save_pretrained(tmp_path / "clip")
    proc.save_pretrained(tmp_path / "clip")
    cs = CLIPScore(str(tmp_path / "clip"))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(cs(x, ["a", "b"]), CLIPScore(model, proc)(x, ["a", "b"]), atol=1e-4)


def test_missing_weights_offline_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(scoring.MissingWeightsError, match="openai/clip-vit-large-patch14"):
        CLIPScore()
    with pytest.raises(OSError, match="not available"):
        make_jaq("sd15")


def test_optional_extras_fail_clearly_without_packages():
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="qsched\\[scorers\\]"):
            scoring.HPSv2()
    try:
        import ImageReward  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="image-reward"):
            scoring.ImageReward()

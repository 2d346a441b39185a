"""Train the testbed's tiny CLIP (CPU, minutes).

    python -m qsched.testbed.train_clip --out qsched/testbed/weights --steps 700

Each batch holds Fashion-MNIST train images, half of them degraded (noise, blur, posterize, blockiness,
structured "denoising residue" noise, contrast/brightness shifts, or two of these), each paired with one caption:
a class caption (``data.captions_for(label, "train")``), a quality phrase (GOOD_QUALITY for clean images,
BAD_QUALITY for degraded ones, with and without a final period) or a combined caption ("a bad photo of a
sneaker"). Many pairs in a batch are true at once (same class, same quality), so the symmetric InfoNCE uses
*multi-positive* targets: caption j is a positive for image i iff its class (if it names one) equals the image's
class and its quality (if it names one) equals the image's; targets are uniform over the positives.

A class-only caption ("a photo of a sneaker") counts as describing a *clean* image (``--class-clean``, the
default since session 8): degraded images of the class are its negatives, so TC (CLIPScore) falls with
degradation, as a real CLIP's does. The earlier scorer made class captions true of degraded images too; its TC
was then highest for slightly degraded images and moved *against* held-out FD for every schedule tested, which
kept JAQ validation from confirming schedules that help (``scripts/scorer_probe.py``, BENCHMARKS.md).

MiniLM sentence embeddings of all (~900) caption strings are computed once, so training only runs the image
encoder and the text projection. Seeded and resumable (``<out>/tiny_clip_ckpt.safetensors`` + ``.json`` every
``--ckpt-every`` steps; bit-exact continuation). At the end it measures on the real test set and writes into
``tiny_clip.json``: zero-shot class accuracy ("a photo of a {class}") and the CLIP-IQA AUC separating clean test
images from degraded ones (fresh random draws, milder and mixed degradations, see :func:`degrade_heldout`).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qsched.testbed.clip import IQA_PAIR, TinyCLIP, clip_iqa, save_tiny_clip
from qsched.testbed.data import BAD_QUALITY, CLASS_NAMES, GOOD_QUALITY, SYNONYMS, all_captions, load_fashion_mnist
from qsched.testbed.trainutil import (drop_checkpoint, load_checkpoint, lr_at, optimizer_step, save_checkpoint,
                                       scorer_parser)

DEGRADATIONS = ("noise", "blur", "posterize", "blocky", "residue", "contrast")


# ----------------------------------------------------------------------------------------------- degradations
def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def _apply(x: torch.Tensor, kind: str, s: float, gen: torch.Generator) -> torch.Tensor:
    """Degrade a group of images (B, 1, 32, 32) with one ``kind`` at severity ``s`` in [0, 1]."""
    b = x.shape[0]
    if kind == "noise":
        return x + (0.05 + 0.45 * s) * torch.randn(x.shape, generator=gen)
    if kind == "blur":
        return _gaussian_blur(x, 0.8 + 2.2 * s)
    if kind == "posterize":
        levels = 2 + int(round(3 * (1 - s)))  # 2..5 grey levels
        return torch.round(x * (levels - 1)) / (levels - 1)
    if kind == "blocky":
        f = 2 if s < 0.5 else 4
        return F.interpolate(F.avg_pool2d(x, f), scale_factor=f, mode="nearest")
    if kind == "residue":  # partially denoised: image + low-frequency structured noise (+ a little fine noise)
        res = int(torch.randint(0, 3, (1,), generator=gen))
        lo = torch.randn((b, 1, 4 * 2 ** res, 4 * 2 ** res), generator=gen)
        lo = F.interpolate(lo, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x + (0.12 + 0.38 * s) * lo + 0.05 * torch.randn(x.shape, generator=gen)
    if kind == "contrast":
        a = 0.55 - 0.4 * s
        c = float(torch.rand((), generator=gen)) * (1 - a)
        return a * x + c
    raise ValueError(f"unknown degradation {kind!r}; choose from {DEGRADATIONS}")


def degrade(x: torch.Tensor, gen: torch.Generator, p_combo: float = 0.25, min_severity: float = 0.0) -> torch.Tensor:
    """Training degradations: each image gets a random kind (or two) at a random severity; clamped to [0, 1]."""
    out = x.clone()
    kinds = torch.randint(0, len(DEGRADATIONS), (x.shape[0],), generator=gen)
    second = torch.randint(0, len(DEGRADATIONS), (x.shape[0],), generator=gen)
    combo = torch.rand(x.shape[0], generator=gen) < p_combo
    for k in range(len(DEGRADATIONS)):
        idx = (kinds == k).nonzero().flatten()
        if len(idx):
            s = min_severity + (1 - min_severity) * float(torch.rand((), generator=gen))
            out[idx] = _apply(out[idx], DEGRADATIONS[k], s, gen)
    for k in range(len(DEGRADATIONS)):
        idx = ((second == k) & combo).nonzero().flatten()
        if len(idx):
            out[idx] = _apply(out[idx].clamp(0, 1), DEGRADATIONS[k], 0.5 * float(torch.rand((), generator=gen)), gen)
    return out.clamp(0.0, 1.0)


def degrade_heldout(x: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """Evaluation degradations, not the training draws: per-image severities from their own generator, the
    training kinds at a fixed mid severity range, plus "mixed" (noise + blur + contrast, all mild)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    if kind == "mixed":
        y = x + 0.08 * torch.randn(x.shape, generator=gen)
        y = _gaussian_blur(y, 1.0)
        return (0.7 * y + 0.1).clamp(0, 1)
    out = torch.empty_like(x)
    for i in range(0, x.shape[0], 50):  # groups of 50 share one severity drawn from [0.15, 0.85]
        s = 0.15 + 0.7 * float(torch.rand((), generator=gen))
        out[i:i + 50] = _apply(x[i:i + 50], kind, s, gen)
    return out.clamp(0, 1)


def roc_auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half; rank formula)."""
    from scipy.stats import rankdata

    pos, neg = pos.flatten().double().numpy(), neg.flatten().double().numpy()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("roc_auc needs at least one positive and one negative score")
    ranks = rankdata(list(pos) + list(neg))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))

# ----------------------------------------------------------------------------------------------- captions
def caption_bank(small: bool = False, wording: str = "train") -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """All training captions with their class (-1: none) and quality (1 good, 0 bad, -1: none).

    ``small`` keeps one class caption per class and one combined caption per (class, quality) (for smoke tests).
    ``wording`` is the class captions' split: "train" (10 frames) or "scorer" (those and 54 more).
    """
    caps, cls, qual = [], [], []
    class_caps, class_labels = all_captions(wording)
    if small:
        keep = [class_labels.index(c) for c in range(len(CLASS_NAMES))]
        class_caps, class_labels = [class_caps[i] for i in keep], [class_labels[i] for i in keep]
    caps += class_caps
    cls += class_labels
    qual += [-1] * len(class_caps)
    for q, phrases in ((1, GOOD_QUALITY), (0, BAD_QUALITY)):
        for k, ph in enumerate(phrases):
            for s in (ph, ph + "."):
                caps.append(s)
                cls.append(-1)
                qual.append(q)
            if small and k > 0:
                continue
            for c in range(len(CLASS_NAMES)):
                for syn in SYNONYMS[c][0][: 1 if small else None]:
                    caps.append(f"{ph} of a {syn}")
                    cls.append(c)
                    qual.append(q)
    return caps, torch.tensor(cls), torch.tensor(qual)


def pick_captions(labels: torch.Tensor, quality: torch.Tensor, cap_cls: torch.Tensor, cap_q: torch.Tensor,
                  gen: torch.Generator, p_class: float = 0.5, p_quality: float = 0.2,
                  class_clean: bool = False) -> torch.Tensor:
    """For each image, the index of one true caption: class-only, quality-only or combined (``class_clean``: a
    degraded image never gets a class-only caption, which then describes clean images only)."""
    r = torch.rand(labels.shape[0], generator=gen)
    out = torch.empty_like(labels)
    for i in range(labels.shape[0]):
        if r[i] < p_class and not (class_clean and quality[i] == 0):
            ok = (cap_cls == labels[i]) & (cap_q < 0)
        elif r[i] < p_class + p_quality:
            ok = (cap_cls < 0) & (cap_q == quality[i])
        else:
            ok = (cap_cls == labels[i]) & (cap_q == quality[i])
        cand = ok.nonzero().flatten()
        out[i] = cand[int(torch.randint(0, len(cand), (1,), generator=gen))]
    return out


def multi_positive_loss(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets uniform over the positives of each row / column."""
    t_img = pos.float() / pos.sum(1, keepdim=True)
    t_txt = pos.T.float() / pos.T.sum(1, keepdim=True)
    l_i = -(t_img * logits.log_softmax(1)).sum(1).mean()
    l_t = -(t_txt * logits.T.log_softmax(1)).sum(1).mean()
    return 0.5 * (l_i + l_t)


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: TinyCLIP, n_zero_shot: int | None = None, n_auc: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Zero-shot accuracy on the test set and CLIP-IQA AUC (clean vs degraded test images)."""
    model.eval()
    test = load_fashion_mnist("test", limit=n_zero_shot)
    txt = model.encode_text([f"a photo of a {c}" for c in CLASS_NAMES])
    preds = torch.cat([(model.encode_image(test.images[i:i + 1000]) @ txt.T).argmax(-1)
                       for i in range(0, len(test.images), 1000)])
    zs = float((preds == test.labels).float().mean())
    x = test.images[-n_auc:] if n_auc < len(test.images) else test.images  # last images: disjoint from any fit
    clean = clip_iqa(model, x)
    aucs, all_bad = {}, []
    for j, kind in enumerate(DEGRADATIONS + ("mixed",)):
        bad = clip_iqa(model, degrade_heldout(x, kind, seed + j))
        aucs[kind] = round(roc_auc(clean, bad), 4)
        all_bad.append(bad)
    auc = roc_auc(clean, torch.cat(all_bad))
    return {"zero_shot_accuracy": zs, "n_zero_shot": int(len(test.images)), "iqa_auc": auc,
            "iqa_auc_by_kind": aucs, "n_auc_clean": int(len(x)), "iqa_pair": list(IQA_PAIR),
            "iqa_mean_clean": float(clean.mean()), "iqa_mean_degraded": float(torch.cat(all_bad).mean())}


# ----------------------------------------------------------------------------------------------- training
def train(out: Path, steps: int = 700, limit: int | None = None, batch_size: int = 192, lr: float = 2e-3,
          seed: int = 0, max_steps: int | None = None, fresh: bool = False, ckpt_every: int = 100,
          log_every: int = 50, eval_limit: int | None = None, p_degraded: float = 0.5,
          small_captions: bool = False, width: int = 16, wording: str = "train",
          class_clean: bool = True) -> dict[str, Any]:
    """Train and save the tiny CLIP; returns the summary written to ``tiny_clip.json``."""
    from qsched.testbed.text import sentence_embeddings, shared_minilm

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    data = load_fashion_mnist("train", limit=limit)
    caps, cap_cls, cap_q = caption_bank(small_captions, wording)
    t_text = time.time()
    tok, lm = shared_minilm()
    cap_emb = torch.cat([sentence_embeddings(tok, lm, caps[i:i + 256]) for i in range(0, len(caps), 256)]).float()
    print(f"[clip] {len(caps)} captions embedded with MiniLM in {time.time() - t_text:.1f}s", flush=True)
    model = TinyCLIP(width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    ckpt = out / "tiny_clip_ckpt"  # .safetensors + .json
    step, elapsed = 0, 0.0
    if ckpt.with_suffix(".json").exists() and not fresh:
        st = load_checkpoint(ckpt, {"model": model}, opt)
        step, elapsed = st["step"], st.get("train_time_s", 0.0)
        print(f"[clip] resumed from {ckpt} at step {step}", flush=True)
    # the quality each caption asserts when matching images: with class_clean a class-only caption asserts "clean"
    cap_q_pos = torch.where((cap_cls >= 0) & (cap_q < 0), 1, cap_q) if class_clean else cap_q
    n = data.images.shape[0]
    stop = steps if max_steps is None else min(steps, max_steps)
    t0 = time.time()
    run, first = 0.0, True
    model.train()
    while step < stop:
        torch.manual_seed(seed * 1_000_003 + step)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x, y = data.images[idx], data.labels[idx]
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        bad = torch.rand(batch_size, generator=gen) < p_degraded
        if bad.any():
            x[bad] = degrade(x[bad], gen)
        q = (~bad).long()
        ci = pick_captions(y, q, cap_cls, cap_q, gen, class_clean=class_clean)
        cq = cap_q_pos[ci]
        pos = (((cap_cls[ci][None, :] < 0) | (cap_cls[ci][None, :] == y[:, None]))
               & ((cq[None, :] < 0) | (cq[None, :] == q[:, None])))
        loss = multi_positive_loss(model(x, cap_emb[ci]), pos)
        optimizer_step(opt, loss, lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1), final_frac=0.02))
        step += 1
        run = float(loss.detach()) if first else 0.98 * run + 0.02 * float(loss.detach())
        first = False
        if step % log_every == 0 or step == stop:
            print(f"[clip] step {step}/{steps} loss {run:.4f} scale {model.logit_scale.exp():.1f} "
                  f"({time.time() - t0 + elapsed:.0f}s)", flush=True)
        if step % ckpt_every == 0 or step == stop:
            save_checkpoint(ckpt, step, {"model": model}, opt,
                            {"seed": seed, "train_time_s": time.time() - t0 + elapsed})
    train_time = time.time() - t0 + elapsed
    complete = step >= steps
    t_eval = time.time()
    ev = evaluate(model, n_zero_shot=eval_limit, n_auc=min(2000, eval_limit or 2000), seed=seed)
    print(f"[clip] zero-shot acc {ev['zero_shot_accuracy']:.4f}, IQA AUC {ev['iqa_auc']:.4f} "
          f"{ev['iqa_auc_by_kind']} (eval {time.time() - t_eval:.0f}s)", flush=True)
    summary = {**ev, "steps": step, "total_steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
               "n_train": n, "n_captions": len(caps), "wording": wording, "class_clean": class_clean,
               "p_degraded": p_degraded,
               "train_time_s": round(train_time, 1), "threads": torch.get_num_threads(), "complete": complete}
    save_tiny_clip(model, out, summary)
    if complete:
        drop_checkpoint(ckpt)
    print(f"[clip] saved to {out}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = scorer_parser(__doc__, batch_size=192, lr=2e-3)
    p.add_argument("--steps", type=int, default=700, help="total optimizer steps (sets the LR schedule)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first K test images only")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resumable)")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--width", type=int, default=16, help="image encoder width (channels of the first conv)")
    p.add_argument("--small-captions", action="store_true", help="a ~50-caption bank (smoke tests only)")
    p.add_argument("--wording", choices=("train", "scorer"), default="train",
                   help="class captions: the denoisers' 10 training frames, or those and 54 scorer-only frames")
    p.add_argument("--class-clean", action=argparse.BooleanOptionalAction, default=True,
                   help="class-only captions describe clean images only, so TC falls with degradation as real "
                        "CLIPScore does (--no-class-clean: the pre-session-8 scorer, TC invariant to degradation)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train(a.out, a.steps, a.limit, a.batch_size, a.lr, a.seed, a.max_steps, a.fresh, a.ckpt_every,
          eval_limit=a.eval_limit, small_captions=a.small_captions,
          width=a.width, wording=a.wording, class_clean=a.class_clean)


if __name__ == "__main__":
    main()

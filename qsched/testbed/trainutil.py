"""Small training helpers shared by the testbed's training scripts: safetensors checkpoints (model, EMA,
optimizer state; never pickle), EMA, a warm-up + cosine learning-rate, and a caption-embedding table."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (parameters and float buffers)."""
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


def denoising_loss(out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor,
                   prediction_type: str) -> torch.Tensor:
    """Plain diffusion loss against the true eps / v of ``x0`` noised at ``t``, min-SNR-5 weighted."""
    at = abar[t].view(-1, 1, 1, 1)
    snr = at / (1 - at)
    if prediction_type == "v_prediction":
        target, wt = at.sqrt() * noise - (1 - at).sqrt() * x0, snr.clamp(max=5.0) / (snr + 1)
    else:
        target, wt = noise, snr.clamp(max=5.0) / snr
    return (wt * (out - target) ** 2).mean()


def lr_at(step: int, total: int, base: float, warmup: int = 100, final_frac: float = 0.05) -> float:
    """Linear warm-up then cosine decay to ``final_frac * base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
    """One optimizer step at learning rate ``lr`` (set on every parameter group) on ``loss``."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(path: Path, step: int, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
                    extra: dict | None = None) -> None:
    """Write ``path``.safetensors (weights + optimizer tensors) and ``path``.json (step, optimizer scalars)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous()
               for name, m in modules.items() for k, v in m.state_dict().items()}
    opt_t, opt_meta = _flat_optimizer(opt)
    tensors.update(opt_t)
    tmp = path.with_suffix(".tmp.safetensors")
    save_file(tensors, str(tmp))
    meta = {"step": step, "optimizer": opt_meta, **(extra or {})}
    path.with_suffix(".json.tmp").write_text(json.dumps(meta))
    tmp.replace(path.with_suffix(".safetensors"))  # atomic: a killed run keeps the previous checkpoint
    path.with_suffix(".json.tmp").replace(path.with_suffix(".json"))


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer) -> dict:
    """Restore what save_checkpoint wrote; returns its JSON metadata (``step`` etc.)."""
    path = Path(path)
    tensors = load_file(str(path.with_suffix(".safetensors")))
    meta = json.loads(path.with_suffix(".json").read_text())
    for name, m in modules.items():
        pre = f"{name}."
        m.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    for pid, sc in meta["optimizer"]["scalars"].items():
        state.setdefault(int(pid), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    return meta


class Logger:
    """Prints progress lines (step, loss, it/s, ETA) and appends them to a log file."""

    def __init__(self, path: Path | None, total: int):
        self.path, self.total, self.t0 = path, total, time.time()
        self.start_step: int | None = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int, **vals: float) -> None:
        if self.start_step is None:
            self.start_step = step
        el = time.time() - self.t0
        rate = (step - self.start_step + 1) / max(el, 1e-9)
        eta = (self.total - step - 1) / max(rate, 1e-9)
        s = f"step {step + 1}/{self.total} " + " ".join(f"{k}={v:.4f}" for k, v in vals.items())
        s += f" {rate:.2f} it/s eta {eta / 60:.1f} min"
        print(s, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(s + "\n")


def caption_table(split: str = "train") -> tuple[list[str], torch.Tensor, torch.Tensor, dict[int, list[int]]]:
    """Every caption of ``split`` with its MiniLM token states, plus the empty (unconditional) prompt last.

    Returns (captions, states (N+1, 16, 384), labels (N,), class -> caption indices).
    """
    from .data import all_captions
    from .text import shared_minilm, token_states

    caps, labels = all_captions(split)
    tok, enc = shared_minilm()
    states = torch.cat([token_states(tok, enc, caps[i:i + 128]) for i in range(0, len(caps), 128)]
                       + [token_states(tok, enc, [""])])
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(c, []).append(i)
    return caps, states, torch.tensor(labels), by_class


def scorer_parser(doc: str | None, batch_size: int, lr: float, seed: int = 0) -> argparse.ArgumentParser:
    """The options every testbed scorer training script (classifier, tiny CLIP, features2) shares."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None, help="use only the first K train (and test) images")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    return p


def drop_checkpoint(ckpt: Path) -> None:
    """Remove a finished run's resume checkpoint (``.safetensors`` + ``.json``)."""
    for suffix in (".safetensors", ".json"):
        ckpt.with_suffix(suffix).unlink(missing_ok=True)


def base_parser(doc: str | None, steps: int, lr: float, work: str, ckpt_every: int) -> argparse.ArgumentParser:
    """The options every testbed diffusion training script shares (defaults = the shipped models' runs)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    p.add_argument("--device", default="cpu", help="torch device to train on (e.g. cuda); batches are drawn on "
                                                    "the CPU generator either way")
    p.add_argument("--work", type=Path, default=Path(work), help="checkpoint and log folder (resumes from it)")
    p.add_argument("--out", type=Path, default=Path("qsched/testbed/weights"))
    p.add_argument("--ckpt-every", type=int, default=ckpt_every)
    p.add_argument("--log-every", type=int, default=25)
    return p


def training_setup(a: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[int, list[int]]]:
    """Seed, set threads, and load (images in [-1, 1], labels, caption token states, class -> caption ids).

    Images and token states are moved to ``a.device``; labels stay on the CPU (they index Python lists).
    """
    from .data import load_fashion_mnist

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    data = load_fashion_mnist("train", limit=a.limit)
    _, states, _, by_class = caption_table("train")
    return (data.images * 2 - 1).to(a.device), data.labels, states.to(a.device), by_class

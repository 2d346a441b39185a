"""Train the independent FD feature extractor (``features2.py``) and write its test-set reference statistics.

    python -m qsched.testbed.train_features --out qsched/testbed/weights

One command, CPU minutes (1 thread): trains ``Features2Net`` (seed 1; the project classifier used seed 0) with
augmentation, then writes ``features2.{safetensors,json}`` (config, clean test accuracy, training facts) and
``fd2_ref_test.safetensors`` (mean/covariance of its features on the 10k real test images). Resumable: a
checkpoint (``<out>/features2_ckpt.*``) is written every ``--ckpt-every`` steps and removed at the end. Every file
is written to a temporary name in ``--out`` first and then renamed.

Augmentations (all in torch, per image): random scale 0.85-1.15 and shift up to 3 px (one affine resample),
horizontal flip, contrast 0.6-1.4 and brightness -0.15..0.15, cutout of one 6-12 px square (a third of the
images). No noise augmentation: it taught the features to ignore noise (see ``features2.py``).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qsched.testbed.data import load_fashion_mnist
from qsched.testbed.features2 import FD2_REF_FILE, STEM, Features2Net
from qsched.frechet import feature_stats, save_stats
from qsched.testbed.trainutil import (drop_checkpoint, load_checkpoint, lr_at, optimizer_step, save_checkpoint,
                                       scorer_parser)
from qsched.testbed.weights_io import save_net


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Randomly scaled/shifted, flipped, contrast-jittered and cut-out copies of x (B, 1, 32, 32) in [0, 1]."""
    b = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=g)  # noqa: E731
    scale, dx, dy = u(0.85, 1.15), u(-3, 3) / 16, u(-3, 3) / 16  # shifts in the [-1, 1] grid units of 32 px
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = flip / scale, 1 / scale, dx, dy
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False,
                      padding_mode="zeros")
    x = (x - 0.5) * u(0.6, 1.4).view(-1, 1, 1, 1) + 0.5 + u(-0.15, 0.15).view(-1, 1, 1, 1)
    size, cx, cy = u(6, 12), u(0, 32), u(0, 32)
    ii = torch.arange(32).float()
    box = (((ii.view(1, 1, -1) - cx.view(-1, 1, 1)).abs() < size.view(-1, 1, 1) / 2)
           & ((ii.view(1, -1, 1) - cy.view(-1, 1, 1)).abs() < size.view(-1, 1, 1) / 2))
    cut = (torch.rand(b, generator=g) < 1 / 3).view(-1, 1, 1) & box
    x = torch.where(cut.unsqueeze(1), torch.zeros_like(x), x)
    return x.clamp(0.0, 1.0)


@torch.no_grad()
def accuracy(model: Features2Net, x: torch.Tensor, y: torch.Tensor, bs: int = 1000) -> float:
    """Clean accuracy of ``model`` on (x, y)."""
    model.eval()
    return sum(int((model(x[i:i + bs]).argmax(-1) == y[i:i + bs]).sum()) for i in range(0, len(x), bs)) / len(x)


def _atomic(out: Path, name: str, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file in ``out``, then rename it to ``out / name``."""
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=Path(name).suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, out / name)
    finally:
        Path(tmp).unlink(missing_ok=True)


def train(out: Path, steps: int = 1200, batch_size: int = 128, lr: float = 3e-3, seed: int = 1,
          limit: int | None = None, ckpt_every: int = 200, log_every: int = 50) -> dict[str, Any]:
    """Train, evaluate and save the extractor and its reference statistics; returns the JSON summary."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tr, te = load_fashion_mnist("train", limit=limit), load_fashion_mnist("test", limit=limit)
    model = Features2Net()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    ckpt, start, elapsed = out / f"{STEM}_ckpt", 0, 0.0
    if ckpt.with_suffix(".json").exists():
        meta = load_checkpoint(ckpt, {"model": model}, opt)
        start, elapsed = meta["step"], meta["train_time_s"]
        print(f"[features2] resumed from {ckpt} at step {start}", flush=True)
    t0, n = time.time(), tr.images.shape[0]
    model.train()
    for step in range(start, steps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)  # batches and augmentation: bit-exact resume
        torch.manual_seed(seed * 1_000_003 + step)  # dropout
        idx = torch.randint(0, n, (batch_size,), generator=g)
        x, y = augment(tr.images[idx], g), tr.labels[idx]
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        optimizer_step(opt, loss, lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1), final_frac=0.02))
        if (step + 1) % log_every == 0:
            print(f"[features2] step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0 + elapsed:.0f}s)",
                  flush=True)
        if (step + 1) % ckpt_every == 0 and step + 1 < steps:
            save_checkpoint(ckpt, step + 1, {"model": model}, opt, {"train_time_s": time.time() - t0 + elapsed})
            model.train()
    train_time = round(time.time() - t0 + elapsed, 1)
    acc = accuracy(model, te.images, te.labels)
    summary = {"test_accuracy": acc, "n_test": int(te.images.shape[0]), "steps": steps, "batch_size": batch_size,
               "lr": lr, "seed": seed, "train_time_s": train_time, "threads": torch.get_num_threads(),
               "feature_dim": int(model.features(te.images[:2]).shape[1]),
               "augmentation": "scale 0.85-1.15, shift 3 px, hflip, contrast 0.6-1.4, brightness 0.15, "
                               "cutout 6-12 px (p 1/3)",
               "command": f"python -m qsched.testbed.train_features --out {out} --steps {steps}"}
    with torch.no_grad():
        feats = torch.cat([model.features(te.images[i:i + 1000]) for i in range(0, len(te.images), 1000)])
    mu, sigma = feature_stats(feats)
    tmpdir = Path(tempfile.mkdtemp(dir=out, prefix=".features2-"))
    try:
        save_net(model, tmpdir, STEM, summary)
        for suffix in (".safetensors", ".json"):
            os.chmod(tmpdir / f"{STEM}{suffix}", 0o644)
            os.replace(tmpdir / f"{STEM}{suffix}", out / f"{STEM}{suffix}")
    finally:
        for f in tmpdir.iterdir():
            f.unlink()
        tmpdir.rmdir()
    _atomic(out, FD2_REF_FILE, lambda p: save_stats(p, mu, sigma, meta={
        "n_images": int(te.images.shape[0]), "split": "test", "feature": "features2 (192-d)",
        "features2_test_accuracy": acc}))
    drop_checkpoint(ckpt)
    print(f"[features2] saved to {out}: clean test accuracy {acc:.4f}, {train_time:.0f}s", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = scorer_parser(__doc__, batch_size=128, lr=3e-3, seed=1)
    p.add_argument("--steps", type=int, default=1200)
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1:
        raise SystemExit(f"--steps and --batch-size must be positive, got {a.steps} and {a.batch_size}")
    torch.set_num_threads(a.threads)
    train(a.out, a.steps, a.batch_size, a.lr, a.seed, a.limit)


if __name__ == "__main__":
    main()

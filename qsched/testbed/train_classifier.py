"""Train the testbed's Fashion-MNIST classifier (CPU, minutes).

    python -m qsched.testbed.train_classifier --out qsched/testbed/weights --epochs 4

Seeded and resumable: after each epoch the model and AdamW state go to ``<out>/classifier_ckpt.safetensors``
with the epoch/batch counters in ``<out>/classifier_ckpt.json`` (also when ``--max-steps`` stops a run early);
a rerun with the same ``--out`` continues from there, bit-exactly (``--fresh`` ignores it). The final weights are ``classifier.safetensors`` + ``classifier.json`` (config, test
accuracy, train time); the checkpoint files are removed at the end.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qsched.testbed.classifier import FashionClassifier, save_classifier
from qsched.testbed.data import load_fashion_mnist
from qsched.testbed.trainutil import (drop_checkpoint, load_checkpoint, lr_at, optimizer_step, save_checkpoint,
                                       scorer_parser)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation: random horizontal flip and a shift of up to 2 pixels (the 2-px zero border wraps)."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 1000) -> float:
    """Accuracy of ``model`` on (x, y)."""
    model.eval()
    correct = sum(int((model(x[i:i + bs]).argmax(-1) == y[i:i + bs]).sum()) for i in range(0, len(x), bs))
    return correct / max(len(x), 1)


def train(out: Path, epochs: int = 4, limit: int | None = None, batch_size: int = 128, lr: float = 2e-3,
          seed: int = 0, max_steps: int | None = None, fresh: bool = False, log_every: int = 50) -> dict[str, Any]:
    """Train and save the classifier; returns the summary written to ``classifier.json``."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    train_set = load_fashion_mnist("train", limit=limit)
    test_set = load_fashion_mnist("test", limit=limit)
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    n = train_set.images.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = steps_per_epoch * epochs
    ckpt = out / "classifier_ckpt"  # .safetensors + .json
    start_epoch, start_batch, elapsed = 0, 0, 0.0
    if ckpt.with_suffix(".json").exists() and not fresh:
        st = load_checkpoint(ckpt, {"model": model}, opt)
        start_epoch, start_batch, elapsed = st["epoch"], st.get("batch", 0), st.get("train_time_s", 0.0)
        print(f"[classifier] resumed from {ckpt} at epoch {start_epoch} batch {start_batch}", flush=True)
    t0 = time.time()
    step = start_epoch * steps_per_epoch + start_batch
    stopped = False
    for epoch in range(start_epoch, epochs):
        model.train()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        run_loss, run_n = 0.0, 0
        first = start_batch if epoch == start_epoch else 0
        for b in range(first, steps_per_epoch):
            if max_steps is not None and step >= max_steps:
                stopped = True
                save_checkpoint(ckpt, step, {"model": model}, opt,
                                {"epoch": epoch, "batch": b, "seed": seed, "train_time_s": time.time() - t0 + elapsed})
                break
            torch.manual_seed(seed * 1_000_003 + step)  # dropout: bit-exact resume
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            idx = perm[b * batch_size:(b + 1) * batch_size]
            x = augment(train_set.images[idx], gen)
            y = train_set.labels[idx]
            loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
            optimizer_step(opt, loss, lr_at(step, total, lr, warmup=min(200, total // 10 + 1), final_frac=0.02))
            step += 1
            run_loss += float(loss.detach()) * len(idx)
            run_n += len(idx)
            if step % log_every == 0:
                print(f"[classifier] epoch {epoch + 1}/{epochs} step {step}/{total} loss {run_loss / run_n:.4f} "
                      f"({time.time() - t0 + elapsed:.0f}s)", flush=True)
        if stopped:
            print(f"[classifier] stopped at step {step} (--max-steps); rerun to resume from {ckpt}", flush=True)
            break
        acc = evaluate(model, test_set.images, test_set.labels)
        print(f"[classifier] epoch {epoch + 1} done: test acc {acc:.4f} ({time.time() - t0 + elapsed:.0f}s)",
              flush=True)
        save_checkpoint(ckpt, step, {"model": model}, opt,
                        {"epoch": epoch + 1, "batch": 0, "seed": seed, "train_time_s": time.time() - t0 + elapsed})
    acc = evaluate(model, test_set.images, test_set.labels)
    summary = {"test_accuracy": acc, "n_test": int(test_set.images.shape[0]), "n_train": n, "epochs": epochs,
               "batch_size": batch_size, "lr": lr, "seed": seed, "steps": step,
               "train_time_s": round(time.time() - t0 + elapsed, 1), "threads": torch.get_num_threads()}
    summary["complete"] = not stopped
    save_classifier(model, out, summary)
    if not stopped:
        drop_checkpoint(ckpt)
    print(f"[classifier] saved to {out}: test accuracy {acc:.4f} on {summary['n_test']} images", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = scorer_parser(__doc__, batch_size=128, lr=2e-3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train(a.out, a.epochs, a.limit, a.batch_size, a.lr, a.seed, a.max_steps, a.fresh)


if __name__ == "__main__":
    main()

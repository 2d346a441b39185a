"""Train the testbed teacher: a text-conditioned pixel-space UNet (epsilon prediction, SD1.5 noise schedule).

    python -m qsched.testbed.train_teacher --work runs/teacher --out qsched/testbed/weights

Seeded and resumable: re-running the same command continues from ``--work``/ckpt. Text is dropped with
probability ``--p-uncond`` so that classifier-free guidance works. Min-SNR-5 loss weighting speeds convergence.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .models import build_unet, noise_scheduler
from .trainutil import (Logger, base_parser, denoising_loss, ema_update, load_checkpoint, lr_at, save_checkpoint,
                        training_setup)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__, steps=2000, lr=8e-4, work="runs/teacher", ckpt_every=100)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--p-uncond", type=float, default=0.1, help="probability of dropping the text (for CFG)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    x_all, y_all, states, by_class = training_setup(a)
    uncond = states[-1]
    sched = noise_scheduler()
    abar = sched.alphas_cumprod.to(a.device)

    unet = build_unet(student=False).to(a.device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=a.lr, weight_decay=0.0)
    ckpt = a.work / "ckpt"
    start = 0
    if ckpt.with_suffix(".json").exists():
        start = load_checkpoint(ckpt, {"unet": unet, "ema": ema}, opt)["step"]
        print(f"resumed from {ckpt} at step {start}")
    g = torch.Generator().manual_seed(a.seed + start)  # resumption changes the batch stream, not the result quality
    log = Logger(a.work / "train.log", a.steps)

    for step in range(start, a.steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, a.steps, a.lr)
        idx = torch.randint(0, len(x_all), (a.batch_size,), generator=g)
        x0, y = x_all[idx], y_all[idx]
        cap_idx = torch.tensor([by_class[int(c)][torch.randint(0, len(by_class[int(c)]), (1,), generator=g).item()]
                                for c in y])
        ctx = states[cap_idx].clone()
        drop = torch.rand(a.batch_size, generator=g) < a.p_uncond
        ctx[drop] = uncond
        t = torch.randint(0, sched.config.num_train_timesteps, (a.batch_size,), generator=g).to(a.device)
        noise = torch.randn(x0.shape, generator=g).to(a.device)
        xt = sched.add_noise(x0, noise, t)
        pred = unet(xt, t, ctx).sample
        loss = denoising_loss(pred, x0, noise, t, abar, "epsilon")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema_update(ema, unet, a.ema if step > 200 else 0.0)
        if step % a.log_every == 0 or step == a.steps - 1:
            log(step, loss=loss.item(), mse=F.mse_loss(pred, noise).item(), lr=opt.param_groups[0]["lr"])
        if (step + 1) % a.ckpt_every == 0 or step == a.steps - 1:
            save_checkpoint(ckpt, step + 1, {"unet": unet, "ema": ema}, opt)

    export(ema, a.out / "teacher", {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed})


def export(unet: torch.nn.Module, out: Path, train_info: dict, prediction_type: str = "epsilon") -> None:
    """Ship weights as fp16 safetensors plus a JSON config (the repo stores small files only)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().cpu().contiguous() for k, v in unet.state_dict().items()},
              str(out.with_suffix(".safetensors")))
    cfg = dict(unet.config) if hasattr(unet, "config") else {}
    out.with_suffix(".json").write_text(json.dumps({"unet_config": {k: v for k, v in cfg.items()
                                                                    if not k.startswith("_")},
                                                    "prediction_type": prediction_type,
                                                    "train": train_info}, indent=1, default=list))
    print(f"exported {out.with_suffix('.safetensors')}")


if __name__ == "__main__":
    main()

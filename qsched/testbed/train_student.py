"""Latent-consistency distillation (LCD) of the testbed teacher into a few-step student.

The shipped student (v prediction, ``e376ca2d``) came from two runs on one GPU (``--device cuda``; an H200, about
7 + 2.5 min) and two multi-step fine-tunes of their result on this CPU (session 4, about 65 min, and session 7,
about 14 min; experiments.md):

    python -m qsched.testbed.train_student --device cuda --batch-size 256 --steps 5000 \
        --prediction-type v_prediction --convert-steps 1000 --work runs/student-v --out runs/student-v/out
    python -m qsched.testbed.train_student --device cuda --batch-size 256 --steps 1300 --lr 1e-4 \
        --prediction-type v_prediction --convert-steps 400 --init runs/student-v/out/student.safetensors \
        --work runs/student-v2 --out runs/student-v2/out
    python -m qsched.testbed.train_student --steps 500 --lr 5e-5 --prediction-type v_prediction \
        --init runs/student-v2/out/student.safetensors --aux-denoise 1.0 --aux-t-max 500 --slow-ema 0.999 \
        --work runs/ft1 --out runs/ft1
    python -m qsched.testbed.train_student --steps 400 --lr 5e-5 --batch-size 64 --prediction-type v_prediction \
        --init runs/ft1/student.safetensors --aux-denoise 1.0 --aux-t-max 260 --threads 1 \
        --work runs/ft2 --out qsched/testbed/weights

The fourth, started from the session-4 student (``git show 622cc98:qsched/testbed/weights/student.safetensors``),
reproduces the shipped student's quality (re-run on another CPU in session 10: weights within 1.2e-3 relative L2,
not bit-identical, FD within 0.05 at 1/2/4/8 steps; experiments.md).

(The third resumed twice with a shorter ``--steps``; experiments.md has the exact history and the session-3
student is in git history). ``scripts/gpu_train_student.sh`` runs the two GPU runs and then the fine-tune at
batch 256 on a CUDA GPU in one command of under 10 minutes (``START=C INIT=...`` runs the fine-tune alone).

The first run was stopped by the GPU lease's time limit after 4,000 of its 5,000 steps and exported from that
checkpoint (re-running it with ``--steps 4000`` resumes at step 4,000 and only exports). On this 2-core CPU the
same work takes hours (about 0.6 step/s at batch 64), so CPU runs use the defaults (batch 64, epsilon):

    python -m qsched.testbed.train_student --steps 1000 --work runs/student --out qsched/testbed/weights

``--aux-denoise W --aux-t-max T`` adds W x a plain denoising loss (true v of a training image noised at a timestep
drawn from [0, T)) to LCD. The session-3 student's clean-image predictions from *real* test images noised to
t = 259 / 119 (the last step of 4 / 8 LCM steps) scored FD 7.8 / 8.3 against 5.1 at t = 999: it was a poor
denoiser exactly where multi-step sampling ends, which is why its images got worse with more steps (the
fine-tuned, shipped student: 3.0 / 2.6).

The LCM recipe (Luo et al. 2023) in pixel space: a skipping-step DDIM solver over 50 of the 1000 teacher
timesteps (skip k = 20), classifier-free guidance of the teacher with a guidance scale sampled per example and
embedded into the student (``time_cond_proj_dim``), an EMA target network, LCM boundary conditions
(c_skip, c_out with timestep scaling 10, as diffusers' LCMScheduler) and a pseudo-Huber loss. The student
starts from the teacher's weights. Seeded and resumable from ``--work``/ckpt.

``--prediction-type v_prediction`` makes the student predict v instead of epsilon (the teacher stays epsilon):
at t = 999 an epsilon student's clean image is ``(x_t - sqrt(1 - abar) eps) / sqrt(abar)`` with
``sqrt(abar) = 0.068``, which multiplies its error by ~15 and leaves 1-step images noisy; from v the clean image
is ``sqrt(abar) x_t - sqrt(1 - abar) v``, with no such amplification. The first ``--convert-steps`` steps then
regress the true v of noised training images (plain denoising, min-SNR-5 weights) so that LCD starts from a
network that already speaks v. The exported JSON records ``prediction_type``; the pipeline's LCMScheduler uses it.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .models import build_unet, guidance_embedding, noise_scheduler
from .train_teacher import export
from .trainutil import (Logger, base_parser, denoising_loss, ema_update, load_checkpoint, lr_at, save_checkpoint,
                        training_setup)

SOLVER_STEPS = 50
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's c_skip, c_out (the same formula as LCMScheduler.get_scalings_for_boundary_condition_discrete)."""
    s = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s / (s**2 + SIGMA_DATA**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def predicted_x0(out: torch.Tensor, xt: torch.Tensor, abar_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The clean image implied by the network output (as LCMScheduler.step computes it)."""
    if prediction_type == "epsilon":
        return (xt - (1 - abar_t).sqrt() * out) / abar_t.sqrt()
    if prediction_type == "v_prediction":
        return abar_t.sqrt() * xt - (1 - abar_t).sqrt() * out
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__, steps=1000, lr=2e-4, work="runs/student", ckpt_every=50)
    p.add_argument("--target-ema", type=float, default=0.95)
    p.add_argument("--w-min", type=float, default=2.0, help="smallest guidance scale sampled")
    p.add_argument("--w-max", type=float, default=8.0, help="largest guidance scale sampled")
    p.add_argument("--huber-c", type=float, default=0.001)
    p.add_argument("--high-t-frac", type=float, default=0.0,
                   help="share of each batch drawn from the top --high-t-top solver timesteps instead of uniformly "
                        "(the boundary chain that 1-step sampling relies on; 0 = the LCM recipe as published)")
    p.add_argument("--high-t-top", type=int, default=10, help="how many of the highest solver timesteps count as top")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon",
                   help="what the student predicts (the teacher is always epsilon)")
    p.add_argument("--convert-steps", type=int, default=0,
                   help="first steps spent regressing the true v before LCD (only with v_prediction)")
    p.add_argument("--aux-denoise", type=float, default=0.0,
                   help="weight of an extra plain denoising loss (true eps/v of the noised image, min-SNR-5) "
                        "added to LCD; keeps the student a good denoiser at low and middle timesteps")
    p.add_argument("--aux-t-max", type=int, default=1000,
                   help="the auxiliary denoising loss draws its timesteps from [0, AUX_T_MAX) (default: all); "
                        "a lower bound aims it at the mid/low-noise predictions multi-step sampling ends on")
    p.add_argument("--slow-ema", type=float, default=0.0,
                   help="also keep an EMA of the online student with this decay (e.g. 0.999) in the checkpoint "
                        "(prefix slow_ema; 0 = none)")
    p.add_argument("--export-net", choices=("target", "slow_ema"), default="target",
                   help="which network to export: the LCD target (the LCM recipe) or the --slow-ema average")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this exported student (safetensors) instead of the teacher's weights")
    p.add_argument("--teacher", type=Path, default=Path("qsched/testbed/weights/teacher.safetensors"))
    a = p.parse_args(argv)
    if not 0 < a.aux_t_max <= 1000:
        p.error(f"--aux-t-max must be in 1..1000, got {a.aux_t_max}")
    if not 0.0 <= a.slow_ema < 1.0:
        p.error(f"--slow-ema must be in [0, 1), got {a.slow_ema}")
    if a.export_net == "slow_ema" and not a.slow_ema:
        p.error("--export-net slow_ema needs --slow-ema DECAY")
    if a.convert_steps and a.prediction_type == "epsilon":
        p.error("--convert-steps only applies to --prediction-type v_prediction (the teacher already predicts eps)")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    x_all, y_all, states, by_class = training_setup(a)
    uncond = states[-1]
    dev, ptype = torch.device(a.device), a.prediction_type
    abar = noise_scheduler().alphas_cumprod.to(dev)
    n_train = noise_scheduler().config.num_train_timesteps
    k = n_train // SOLVER_STEPS
    solver_t = torch.arange(1, SOLVER_STEPS + 1) * k - 1  # 19, 39, ..., 999 (LCMScheduler's origin timesteps)

    teacher = build_unet(student=False).eval().requires_grad_(False)
    teacher.load_state_dict({k_: v.float() for k_, v in load_file(str(a.teacher)).items()})
    teacher.to(dev)
    student = build_unet(student=True)
    if a.init:  # continue from an exported student (e.g. one trained on another machine)
        student.load_state_dict({k_: v.float() for k_, v in load_file(str(a.init)).items()})
    else:
        missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
        assert not unexpected and all("cond_proj" in m for m in missing), (missing, unexpected)
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)  # starts exactly as the teacher
    student.to(dev).train()
    target = copy.deepcopy(student).eval().requires_grad_(False)
    nets = {"student": student, "target": target}
    if a.slow_ema:
        nets["slow_ema"] = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr, weight_decay=0.0)
    ckpt, start = a.work / "ckpt", 0
    phases: list[dict] = []
    if ckpt.with_suffix(".json").exists():
        meta = load_checkpoint(ckpt, nets, opt)
        start = meta["step"]
        phases = meta.get("phases") or [{"from_step": 0, "to_step": start}]  # runs before phases were logged
        print(f"resumed from {ckpt} at step {start}")
    phase = {"from_step": start, "to_step": a.steps, "lr": a.lr, "high_t_frac": a.high_t_frac,
             "high_t_top": a.high_t_top, "prediction_type": ptype, "convert_steps": a.convert_steps,
             "batch_size": a.batch_size, "aux_denoise": a.aux_denoise, "init": str(a.init) if a.init else None}
    if a.aux_t_max != 1000 or a.slow_ema:  # only recorded when used, so earlier runs' phases still compare equal
        phase.update(aux_t_max=a.aux_t_max, slow_ema=a.slow_ema)
    def settings(ph: dict) -> dict:
        return {k: v for k, v in ph.items() if k not in ("from_step", "to_step")}

    if not phases or settings(phases[-1]) != settings(phase):  # a resumed run with new settings opens a phase
        phases.append(phase)
    phases[-1]["to_step"] = a.steps
    g = torch.Generator().manual_seed(a.seed + start)
    log = Logger(a.work / "train.log", a.steps)

    for step in range(start, a.steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, a.steps, a.lr, warmup=50)
        B = a.batch_size
        idx = torch.randint(0, len(x_all), (B,), generator=g)
        x0, y = x_all[idx], y_all[idx]
        cap = torch.tensor([by_class[int(c)][torch.randint(0, len(by_class[int(c)]), (1,), generator=g).item()]
                            for c in y])
        ctx = states[cap]
        n = torch.randint(0, SOLVER_STEPS, (B,), generator=g)
        top = torch.rand(B, generator=g) < a.high_t_frac
        n = torch.where(top, SOLVER_STEPS - 1 - torch.randint(0, a.high_t_top, (B,), generator=g), n)
        t, s = solver_t[n], (solver_t[n] - k).clamp_min(0)
        w = a.w_min + (a.w_max - a.w_min) * torch.rand(B, generator=g)  # guidance scale
        wemb = guidance_embedding(w - 1.0).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        converting = step < a.convert_steps
        if converting:  # v-conversion: any timestep, true v of the noised image
            t = torch.randint(0, n_train, (B,), generator=g)
        t, s, w = t.to(dev), s.to(dev), w.to(dev).view(-1, 1, 1, 1)
        at, as_ = abar[t].view(-1, 1, 1, 1), abar[s].view(-1, 1, 1, 1)
        xt = at.sqrt() * x0 + (1 - at).sqrt() * noise
        out = student(xt, t, ctx, timestep_cond=wemb).sample

        if converting:
            loss = denoising_loss(out, x0, noise, t, abar, ptype)
        else:
            cs_t, co_t = boundary_scalings(t)
            pred = cs_t * xt + co_t * predicted_x0(out, xt, at, ptype)
            with torch.no_grad():
                e_u, e_c = teacher(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([uncond.expand_as(ctx), ctx])
                                   ).sample.chunk(2)
                e = e_u + w * (e_c - e_u)
                x0_t = predicted_x0(e, xt, at, "epsilon")
                xs = as_.sqrt() * x0_t + (1 - as_).sqrt() * e  # one DDIM step t -> s of the guided teacher
                cs_s, co_s = boundary_scalings(s)
                out_tgt = target(xs, s, ctx, timestep_cond=wemb).sample
                tgt = cs_s * xs + co_s * predicted_x0(out_tgt, xs, as_, ptype)
            loss = (torch.sqrt((pred - tgt) ** 2 + a.huber_c**2) - a.huber_c).mean()
            if a.aux_denoise:
                ta = torch.randint(0, a.aux_t_max, (B,), generator=g).to(dev)
                aa = abar[ta].view(-1, 1, 1, 1)
                out_a = student(aa.sqrt() * x0 + (1 - aa).sqrt() * noise, ta, ctx, timestep_cond=wemb).sample
                loss = loss + a.aux_denoise * denoising_loss(out_a, x0, noise, ta, abar, ptype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(target, student, 0.0 if converting else a.target_ema)  # LCD's target starts as the student
        if a.slow_ema:
            ema_update(nets["slow_ema"], student, a.slow_ema)
        if step % a.log_every == 0 or step == a.steps - 1:
            log(step, loss=loss.item(), lr=opt.param_groups[0]["lr"])
        if (step + 1) % a.ckpt_every == 0 or step == a.steps - 1:
            save_checkpoint(ckpt, step + 1, nets, opt, {"phases": phases})

    info: dict = {}
    if a.init and a.init.with_suffix(".json").exists():  # keep the provenance of the weights we started from
        info["init_from"] = json.loads(a.init.with_suffix(".json").read_text()).get("train")
    export(nets[a.export_net], a.out / "student", {**info, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed,
                                       "recipe": "LCD", "solver_steps": SOLVER_STEPS, "w_range": [a.w_min, a.w_max],
                                       "target_ema": a.target_ema, "exported": a.export_net,
                                       "phases": phases},
           prediction_type=ptype)


if __name__ == "__main__":
    main()

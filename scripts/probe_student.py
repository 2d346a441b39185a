"""Probe a testbed student at several LCM step counts: class accuracy and FD on held-out prompts.

    python scripts/probe_student.py                                   # the shipped student
    python scripts/probe_student.py --ckpt runs/ft1/ckpt.safetensors --prefix target
    python scripts/probe_student.py --weights runs/ft1/out/student.safetensors --n 500 --steps 1 2 4 8
    python scripts/probe_student.py --denoise-t 999 759 499 259 119 --steps   # one-step denoising of real images

Same prompts and seeds as the model card's table (``heldout_prompts(n, seed=0)``, batch b uses seed b), so the
first N images of the card's probe are the images measured here. FD is in the project classifier's features and,
with ``--features2``, also in the independent extractor's (``qsched.testbed.features2``). Used to compare a
fine-tuned student with the shipped one on the same probe before replacing it.

``--denoise-t`` instead feeds the first N *real* test images noised to each timestep t (one fixed noise draw,
a held-out prompt of the image's class, guidance 6) and scores the student's clean-image prediction: a good
few-step student should do better from t = 259 (where 4 LCM steps end) than from pure noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from qsched.testbed.card import generate, score
from qsched.testbed.data import heldout_prompts
from qsched.testbed.pipeline import DEFAULT_GUIDANCE, load_testbed_pipeline


def load_weights(pipe, weights: Path | None, ckpt: Path | None, prefix: str) -> str:
    """Swap the pipeline's UNet weights for an exported student or one network of a training checkpoint."""
    if weights is not None:
        sd = load_file(str(weights))
        name = str(weights)
    elif ckpt is not None:
        pre = prefix + "."
        sd = {k[len(pre):]: v for k, v in load_file(str(ckpt)).items() if k.startswith(pre)}
        if not sd:
            raise ValueError(f"{ckpt} has no tensors with prefix {pre!r}")
        step = json.loads(ckpt.with_suffix(".json").read_text())["step"]
        name = f"{ckpt}:{prefix}@{step}"
    else:
        return "shipped"
    pipe.unet.load_state_dict({k: v.float() for k, v in sd.items()})
    return name


@torch.no_grad()
def denoise_probe(pipe, n: int, ts: list[int], guidance: float) -> dict[int, dict[str, float]]:
    """Accuracy and FD of the student's x0 prediction from real test images noised to each t in ``ts``."""
    from qsched.testbed.data import load_fashion_mnist
    from qsched.testbed.models import guidance_embedding, noise_scheduler
    from qsched.testbed.train_student import boundary_scalings, predicted_x0

    te = load_fashion_mnist("test", limit=n)
    held, lab = heldout_prompts(max(n, 10), seed=0)
    by_class: dict[int, list[str]] = {}
    for p_, c in zip(held, lab):
        by_class.setdefault(c, []).append(p_)
    prompts = [by_class[int(c)][i % len(by_class[int(c)])] for i, c in enumerate(te.labels)]
    ctx = pipe.encode_prompt(prompts)
    abar = noise_scheduler().alphas_cumprod
    w = guidance_embedding(torch.full((n,), guidance - 1.0))
    x0 = te.images * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    out = {}
    for t in ts:
        at, tt = abar[t], torch.full((n,), t)
        xt = at.sqrt() * x0 + (1 - at).sqrt() * noise
        v = torch.cat([pipe.unet(xt[i:i + 250], tt[i:i + 250], ctx[i:i + 250], timestep_cond=w[i:i + 250]).sample
                       for i in range(0, n, 250)])
        cs, co = boundary_scalings(tt)
        img = ((cs * xt + co * predicted_x0(v, xt, at.view(1, 1, 1, 1), pipe.scheduler.config.prediction_type))
               / 2 + 0.5).clamp(0, 1)
        out[t] = score(img, te.labels.tolist())
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None, help="an exported student .safetensors")
    p.add_argument("--ckpt", type=Path, default=None, help="a train_student checkpoint (.safetensors)")
    p.add_argument("--prefix", default="target", help="network in --ckpt: target, student or slow_ema")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--denoise-t", type=int, nargs="*", default=[],
                   help="also score one-step x0 predictions from real test images noised to these timesteps")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--features2", action="store_true", help="also FD in the independent features2 extractor")
    p.add_argument("--fid-n", type=int, default=0, help="also Inception FID on the first K images of each row "
                                                          "(~0.5 s per image on one core; 0 = none)")
    p.add_argument("--json", type=Path, default=None, help="append the result as one JSON line here")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    pipe = load_testbed_pipeline("student")
    name = load_weights(pipe, a.weights, a.ckpt, a.prefix)
    prompts, labels = heldout_prompts(a.n, seed=0)
    ifid = None
    if a.fid_n:
        from qsched.testbed.metrics import InceptionFID
        ifid = InceptionFID()
    f2 = None
    if a.features2:
        from qsched.testbed.features2 import features2_fd
        f2 = features2_fd
    rows = {}
    t0 = time.time()
    for s in a.steps:
        imgs = generate(pipe, prompts, s, a.guidance)
        r = score(imgs, labels)
        if f2 is not None:
            r["fd2"] = f2(imgs[torch.isfinite(imgs).flatten(1).all(1)])
        if ifid is not None:
            r["fid"], r["fid_n"] = ifid.fid(imgs[:a.fid_n]), min(a.fid_n, imgs.shape[0])
        rows[s] = r
        extra = f" FD2 {r['fd2']:.2f}" if "fd2" in r else ""
        extra += f" FID({r['fid_n']}) {r['fid']:.1f}" if "fid" in r else ""
        print(f"{name} steps {s}: acc {r['accuracy']:.3f} FD {r['fd']:.2f}{extra} non-finite {r['non_finite']}",
              flush=True)
    for t, r in denoise_probe(pipe, a.n, a.denoise_t, a.guidance).items() if a.denoise_t else ():
        rows[f"denoise_t{t}"] = r
        print(f"{name} x0 from real images noised to t={t}: acc {r['accuracy']:.3f} FD {r['fd']:.2f}", flush=True)
    res = {"model": name, "n": a.n, "guidance": a.guidance, "rows": rows, "wall_s": round(time.time() - t0, 1),
           "command": " ".join(["python", "scripts/probe_student.py", *(argv if argv is not None else sys.argv[1:])])}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        with open(a.json, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()

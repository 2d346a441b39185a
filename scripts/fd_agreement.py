"""Do FD in the project classifier's features, FD in the independent features2 and Inception FID agree in direction?

    python scripts/fd_agreement.py --n 2000 --fid-n 1000 --out runs/agreement

Generates the 4-step student's images for the same held-out prompts and seeds (the model card's:
``heldout_prompts(n, seed=0)``, batch b seeded b) with the fp32 UNet and with naively quantized copies (original
schedule), then reports per configuration class accuracy, FD (classifier features), FD2 (features2) and
Inception FID (on the first ``--fid-n`` images of each row; ~0.5 s per image on one CPU core), and for each
quantized row the difference to fp32 with a paired bootstrap 95% interval over images (the same resampled image
indices for both rows). Images and Inception features are cached in ``--out`` so a rerun resumes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from qsched.testbed.card import generate, measure_parser, quantized
from qsched.testbed.data import heldout_prompts
from qsched.testbed.features2 import features2_reference, load_features2
from qsched.frechet import feature_stats, frechet_distance
from qsched.testbed.metrics import ClassifierFD, InceptionFID
from qsched.testbed.pipeline import load_testbed_pipeline


def cached(path: Path, make) -> torch.Tensor:
    """Load tensor ``x`` from ``path`` or compute it with ``make()`` and save it (temp file + rename)."""
    if path.exists():
        return load_file(str(path))["x"]
    x = make()
    tmp = path.with_suffix(".tmp.safetensors")
    save_file({"x": torch.as_tensor(x).contiguous()}, str(tmp))
    tmp.replace(path)
    return torch.as_tensor(x)


def fd_and_ci(feats: dict[str, np.ndarray], ref: tuple[np.ndarray, np.ndarray], base: str, boot: int,
              seed: int = 0) -> dict[str, dict]:
    """FD per row; for every other row its difference to ``base`` with a paired bootstrap 95% interval."""
    out = {k: {"fd": frechet_distance(*feature_stats(f), *ref)} for k, f in feats.items()}
    n = feats[base].shape[0]
    rng = np.random.default_rng(seed)
    idx = [rng.integers(0, n, n) for _ in range(boot)]
    base_b = np.array([frechet_distance(*feature_stats(feats[base][i]), *ref) for i in idx])
    for k, f in feats.items():
        if k == base:
            continue
        d = np.array([frechet_distance(*feature_stats(f[i]), *ref) for i in idx]) - base_b
        out[k].update(delta=out[k]["fd"] - out[base]["fd"], ci=[float(np.percentile(d, 2.5)),
                                                                  float(np.percentile(d, 97.5))])
    return out


def main(argv: list[str] | None = None) -> None:
    p = measure_parser(__doc__, Path("runs/agreement"), n_help="images per row (FD, FD2, accuracy)")
    p.add_argument("--fid-n", type=int, default=1000, help="first K images of each row for Inception FID (0: none)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--specs", nargs="+", default=["w4a8", "w4a4"])
    p.add_argument("--weights", type=Path, default=None, help="student .safetensors (default: the shipped one)")
    p.add_argument("--boot", type=int, default=200, help="bootstrap resamples (FD, FD2)")
    p.add_argument("--boot-fid", type=int, default=50, help="bootstrap resamples (Inception FID, 2048-d: slower)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fp = load_testbed_pipeline("student")
    if a.weights is not None:
        fp.unet.load_state_dict({k: v.float() for k, v in load_file(str(a.weights)).items()})
    prompts, labels = heldout_prompts(a.n, seed=0)
    rows = ["fp32", *a.specs]
    images = {}
    for r in rows:
        pipe = fp if r == "fp32" else quantized(fp, r)
        images[r] = cached(a.out / f"images_{r}_{a.steps}steps_{a.n}.safetensors",
                           lambda: generate(pipe, prompts, a.steps, a.guidance))
        print(f"[agree] {r}: {images[r].shape[0]} images ({time.time() - t0:.0f}s)", flush=True)
    ok = torch.stack([torch.isfinite(images[r]).flatten(1).all(1) for r in rows]).all(0)  # same images in every row
    cfd, f2 = ClassifierFD(), load_features2()
    lab = torch.tensor(labels)
    res: dict = {"n": a.n, "n_finite_all_rows": int(ok.sum()), "steps": a.steps, "guidance": a.guidance,
                 "accuracy": {r: float((cfd.predict(images[r][ok]) == lab[ok]).float().mean()) for r in rows}}
    res["fd"] = fd_and_ci({r: cfd.features(images[r][ok]).double().numpy() for r in rows}, cfd.reference, "fp32",
                          a.boot)
    res["fd2"] = fd_and_ci({r: f2(images[r][ok]) for r in rows}, features2_reference(),
                           "fp32", a.boot)
    if a.fid_n:
        ifid = InceptionFID()
        keep = ok[:a.fid_n]
        feats = {r: cached(a.out / f"inception_{r}_{a.steps}steps_{a.fid_n}.safetensors",
                           lambda: torch.from_numpy(ifid.features(images[r][:a.fid_n], log_every=10))).numpy()[keep]
                 for r in rows}
        res["fid"] = fd_and_ci(feats, ifid.reference, "fp32", a.boot_fid)
        res["fid_n"] = int(keep.sum())
    res["wall_s"] = round(time.time() - t0, 1)
    res["command"] = " ".join(["python scripts/fd_agreement.py", *(argv if argv is not None else sys.argv[1:])])
    (a.out / "agreement.json").write_text(json.dumps(res, indent=1))
    metrics = [m for m in ("fd", "fd2", "fid") if m in res]
    print(f"\n| row | accuracy | {' | '.join(metrics)} |\n|---|---|{'---|' * len(metrics)}")
    for r in rows:
        cells = []
        for m in metrics:
            v = res[m][r]
            cells.append(f"{v['fd']:.2f}" + (f" ({v['delta']:+.2f} [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}])"
                                             if "delta" in v else ""))
        print(f"| {r} | {res['accuracy'][r]:.3f} | {' | '.join(cells)} |")
    print(f"\n{res['command']}  ({res['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()

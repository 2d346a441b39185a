"""Cheap stand-in scorers shared by the tests: deterministic, no weights, no torch modules."""

from qsched.images import to_tensor
from qsched.scoring import JAQ


class BrightTC:
    """Stand-in alignment scorer: 100 * mean brightness."""

    def __call__(self, images, prompts):
        return 100 * to_tensor(images).mean(dim=(1, 2, 3))


class ContrastIQ:
    """Stand-in quality scorer: 10 * per-image std."""

    def __call__(self, images):
        return 10 * to_tensor(images).std(dim=(1, 2, 3))


def fake_jaq(k: float = 2.0) -> JAQ:
    return JAQ(BrightTC(), ContrastIQ(), k=k)


def tiny_testbed_evaluators():
    """A randomly initialised testbed classifier (as ClassifierFD, with reference statistics of random images)
    and tiny CLIP: the real metric code paths without the shipped weights. Returns (cfd, ref, clip)."""
    import torch

    from qsched.testbed.classifier import FashionClassifier
    from qsched.testbed.clip import TinyCLIP
    from qsched.frechet import feature_stats
    from qsched.testbed.metrics import ClassifierFD

    torch.manual_seed(0)
    cfd = ClassifierFD(classifier=FashionClassifier(width=4, feat_dim=8).eval())
    ref = feature_stats(cfd.features(torch.rand(64, 1, 32, 32)))
    return cfd, ref, TinyCLIP(width=4, embed_dim=16, text_hidden=16).eval()


def run_python(code: str) -> str:
    """Run ``code`` in a fresh Python process with the checkout on ``sys.path`` (import state matters); its
    stdout, asserting it exited 0."""
    import os
    import subprocess
    import sys
    import textwrap

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout

"""The independent FD feature extractor (features2): shipped weights, reference statistics, augmentation."""

import json

import numpy as np
import pytest
import torch

from qsched.testbed.data import load_fashion_mnist
from qsched.testbed.features2 import (FD2_REF_FILE, FEATURES2_DIM, Features2Net, features2_fd, load_features2,
                                      load_features2_net)
from qsched.frechet import feature_stats, frechet_distance, load_stats
from qsched.testbed.train_features import augment
from qsched.testbed.weights_io import WEIGHTS_DIR


@pytest.fixture(scope="module")
def real():
    return load_fashion_mnist("test", limit=1200)


def test_shipped_weights_give_finite_features_of_the_documented_dimension(real):
    feats = load_features2()(real.images[:64])
    assert feats.shape == (64, FEATURES2_DIM) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and feats.std(axis=0).mean() > 0  # not a constant map


def test_shipped_extractor_classifies_real_images(real):
    meta = json.loads((WEIGHTS_DIR / "features2.json").read_text())
    net = load_features2_net()
    with torch.no_grad():
        acc = float((net(real.images[:500]).argmax(-1) == real.labels[:500]).float().mean())
    assert acc > 0.8 and meta["test_accuracy"] > 0.8
    assert meta["seed"] != json.loads((WEIGHTS_DIR / "classifier.json").read_text())["seed"]


def test_fd_between_real_halves_is_far_below_fd_to_noise(real):
    f = load_features2()
    a, b = f(real.images[:600]), f(real.images[600:1200])
    noise = f(torch.rand(600, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    fd_ab = frechet_distance(*feature_stats(a), *feature_stats(b))
    fd_noise = frechet_distance(*feature_stats(a), *feature_stats(noise))
    assert fd_ab < 0.05 * fd_noise
    assert features2_fd(real.images[:600]) < 0.05 * features2_fd(torch.rand(600, 1, 32, 32))


def test_reference_statistics_cover_the_test_set():
    mu, sigma, meta = load_stats(WEIGHTS_DIR / FD2_REF_FILE)
    assert mu.shape == (FEATURES2_DIM,) and sigma.shape == (FEATURES2_DIM, FEATURES2_DIM)
    assert int(meta["n_images"]) == 10000 and np.isfinite(sigma).all()


def test_non_finite_images_are_rejected():
    x = torch.rand(4, 1, 32, 32)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="1 of 4"):
        load_features2()(x)


def test_wrong_input_shape_is_rejected():
    with pytest.raises(ValueError, match="expected images"):
        Features2Net().features(torch.rand(2, 3, 32, 32))


def test_augment_is_seeded_in_range_and_changes_images(real):
    x = real.images[:32]
    a1, a2 = augment(x, torch.Generator().manual_seed(5)), augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(6))
    assert a1.shape == x.shape and torch.equal(a1, a2) and not torch.equal(a1, b)
    assert float(a1.min()) >= 0.0 and float(a1.max()) <= 1.0
    assert float((a1 - x).abs().mean()) > 0.02


def test_training_script_writes_loadable_weights_and_statistics(tmp_path):
    from qsched.testbed.train_features import main

    main(["--out", str(tmp_path), "--limit", "256", "--steps", "3", "--batch-size", "32"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["fd2_ref_test.safetensors", "features2.json", "features2.safetensors"]  # no temp/ckpt left
    feats = load_features2(weights_dir=tmp_path)(torch.rand(3, 1, 32, 32))
    assert feats.shape == (3, FEATURES2_DIM)
    assert json.loads((tmp_path / "features2.json").read_text())["steps"] == 3

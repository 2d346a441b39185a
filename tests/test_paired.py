"""Paired comparisons over the same images (qsched.paired), per-image metric records, and evaluate's CIs."""

import numpy as np
import pytest

from qsched.frechet import FrechetReference, feature_stats
from qsched.paired import load_per_image, paired_cis, save_per_image


def _ref(d=12, seed=0):
    rng = np.random.default_rng(seed)
    return feature_stats(rng.normal(size=(400, d)))


@pytest.mark.parametrize("n", [5, 30])  # N <= D: the Gram-matrix path (round-off of the rank-deficient D x D
# spectrum is the 1e-8 difference), N > D: the covariance path
def test_distance_of_features_equals_distance_of_stats(n):
    mu, sigma = _ref(d=16)
    r = FrechetReference(mu, sigma)
    x = np.random.default_rng(1).normal(loc=0.3, size=(n, 16))
    assert r.distance_of_features(x) == pytest.approx(r.distance(*feature_stats(x)), rel=1e-6)


def _record(n, shift=0.0, acc=0.5, jaq=50.0, seed=0):
    rng = np.random.default_rng(seed)
    return {"finite": np.ones(n, bool), "fd": rng.normal(loc=shift, size=(n, 12)),
            "accuracy": rng.random(n) < acc, "jaq": jaq + rng.normal(size=n)}


def test_paired_cis_detect_a_real_difference_and_none_where_there_is_none():
    ref = {"fd": _ref()}
    a = _record(300)
    same = paired_cis(a, {k: v.copy() for k, v in a.items()}, ref, n_boot=50)
    for k in ("fd", "accuracy", "jaq"):
        assert same[k] == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    b = {**a, "fd": a["fd"] + 0.5, "jaq": a["jaq"] + 1.0}  # same images, features moved, JAQ up by 1
    out = paired_cis(a, b, ref, n_boot=100)
    assert out["fd"]["ci_low"] > 0 and out["fd"]["ci_low"] <= out["fd"]["diff"] <= out["fd"]["ci_high"]
    assert out["jaq"]["diff"] == pytest.approx(1.0) and out["jaq"]["ci_low"] == pytest.approx(1.0)
    assert out["accuracy"]["diff"] == 0.0
    # unpaired noise of the same size would not give an interval this narrow: pairing removes the image spread
    c = _record(300, seed=5)
    assert out["jaq"]["ci_high"] - out["jaq"]["ci_low"] < 1e-9 < (
        paired_cis(a, {**c, "jaq": c["jaq"] + 1.0}, ref, n_boot=100)["jaq"]["ci_high"]
        - paired_cis(a, {**c, "jaq": c["jaq"] + 1.0}, ref, n_boot=100)["jaq"]["ci_low"])


def test_paired_cis_bad_input_and_nonfinite_rows():
    ref = {"fd": _ref()}
    with pytest.raises(ValueError, match="same images"):
        paired_cis(_record(10), _record(11), ref)
    a, b = _record(20), _record(20, seed=1)
    b["finite"][:19] = False  # one finite image: FD undefined, skipped; means still compared
    out = paired_cis(a, b, ref, n_boot=20)
    assert "fd" not in out and "accuracy" in out
    b["finite"][:] = True
    b["finite"][:3] = False  # non-finite rows are left out of FD, whatever their features hold
    b["fd"][:3] = 1e6
    assert paired_cis(a, b, ref, n_boot=0)["fd"]["diff"] < 100
    assert "fd" not in paired_cis(a, b, None, n_boot=5)  # no reference: no FD


def test_per_image_record_round_trip_and_legacy_names(tmp_path):
    rec = _record(7)
    back = load_per_image(save_per_image(tmp_path / "r.safetensors", rec))
    assert set(back) == set(rec)
    np.testing.assert_allclose(back["fd"], rec["fd"], rtol=1e-6)
    assert back["accuracy"].dtype == bool and back["finite"].dtype == bool  # masks, not integer indices
    np.testing.assert_array_equal(back["accuracy"], rec["accuracy"])
    from safetensors.numpy import save_file

    save_file({"features": rec["fd"], "correct": rec["accuracy"].astype(np.uint8), "jaq": rec["jaq"],
               "finite": rec["finite"].astype(np.uint8)}, str(tmp_path / "old.safetensors"))
    assert set(load_per_image(tmp_path / "old.safetensors")) == {"fd", "accuracy", "jaq", "finite"}
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    from qsched.errors import CorruptFileError

    with pytest.raises(CorruptFileError):
        load_per_image(tmp_path / "bad.safetensors")


def test_evaluate_reports_paired_cis_that_match_its_rows():
    """The per-image records behind the comparisons reproduce the rows' own numbers (alignment), and every
    comparison's interval contains its difference."""
    from fakes import tiny_testbed_evaluators
    from qsched.evaluate import evaluate
    from qsched.metrics import AccuracyMetric, FrechetMetric, JAQMetric
    from qsched.schedule import Schedule
    from qsched.scoring import JAQ, TestbedCLIPIQA, TestbedCLIPScore
    from qsched.testbed.pipeline import tiny_testbed_pipeline

    cfd, ref, clip = tiny_testbed_evaluators()
    jaq = JAQ(TestbedCLIPScore(model=clip), TestbedCLIPIQA(model=clip))
    pipe = tiny_testbed_pipeline(seed=0)
    res = evaluate(pipe_loader=lambda: pipe, steps=2, qsched_schedule=Schedule.linear(0.9, 1.05, 2), n_images=12,
                   batch_size=5, configs=("fp-original", "quant-naive", "quant-qsched"), progress=False,
                   metrics=[FrechetMetric("fd", cfd.features, lambda: ref), AccuracyMetric(cfd.predict),
                            JAQMetric(jaq)], paired_resamples=40)
    assert set(res.comparisons) == {"quant-qsched vs quant-naive", "quant-naive vs fp-original",
                                    "quant-qsched vs fp-original"}
    for cfg, rec in res.per_image.items():
        row = res.rows[cfg]
        assert len(rec["finite"]) == 12
        assert rec["accuracy"].mean() == pytest.approx(row["accuracy"])
        assert rec["jaq"].mean() == pytest.approx(row["jaq"])
        assert FrechetReference(*ref).distance_of_features(rec["fd"]) == pytest.approx(row["fd"], rel=1e-6)
    for name, c in res.comparisons.items():
        b, a = name.split(" vs ")
        assert c["fd"]["diff"] == pytest.approx(res.rows[b]["fd"] - res.rows[a]["fd"], rel=1e-6, abs=1e-9)
        for k in ("fd", "accuracy", "jaq"):
            assert c[k]["ci_low"] <= c[k]["diff"] + 1e-9 and c[k]["diff"] <= c[k]["ci_high"] + 1e-9, (name, k)
    assert "Paired differences" in res.to_markdown()
    assert "comparisons" in res.to_dict() and "per_image" not in res.to_dict()
    none = evaluate(pipe_loader=lambda: pipe, steps=2, n_images=4, configs=("fp-original", "quant-naive"),
                    progress=False, metrics=[JAQMetric(jaq)], paired_resamples=0)
    assert none.comparisons == {}

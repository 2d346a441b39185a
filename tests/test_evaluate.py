"""Side-by-side evaluation on the tiny random testbed pipeline with injected (tiny, random) metrics."""

import json
import os

import numpy as np
import pytest
import torch

from qsched.evaluate import EvalResult, evaluate
from qsched.frechet import load_reference_stats
from qsched.metrics import AccuracyMetric, EvalMetric, FrechetMetric, JAQMetric, build_metrics
from qsched.prompts import load_prompts
from qsched.quantization import quant_spec_of
from qsched.schedule import Schedule

from fakes import tiny_testbed_evaluators

STEPS = 2


@pytest.fixture(scope="module")
def pipe():
    from qsched.testbed.pipeline import tiny_testbed_pipeline

    return tiny_testbed_pipeline(seed=0)


@pytest.fixture(scope="module")
def tiny_metrics():
    """Real metric adapters around randomly initialised testbed networks (no shipped weights needed)."""
    from qsched.scoring import JAQ, TestbedCLIPIQA, TestbedCLIPScore

    cfd, ref, clip = tiny_testbed_evaluators()
    jaq = JAQ(TestbedCLIPScore(model=clip), TestbedCLIPIQA(model=clip))
    return lambda: [FrechetMetric("fd", cfd.features, lambda: ref), AccuracyMetric(cfd.predict), JAQMetric(jaq)]


class Recorder(EvalMetric):
    """Records what the evaluation feeds a metric; reports the mean pixel of the finite images."""

    keys = ("mean_pixel",)

    def __init__(self):
        self.calls = []
        self.resets = 0
        self.reset()

    def reset(self):
        self.resets += 1
        self.sum, self.n = 0.0, 0

    def update(self, images, prompts, labels, finite):
        self.calls.append((tuple(images.shape), list(prompts), None if labels is None else list(labels),
                           finite.tolist()))
        self.sum += float(images[finite].sum())
        self.n += int(finite.sum()) * images[0].numel()

    def compute(self):
        return {"mean_pixel": self.sum / self.n if self.n else None}


def test_side_by_side_rows_metrics_and_restoration(pipe, tiny_metrics, tmp_path):
    base_sched, base_unet = pipe.scheduler, pipe.unet
    rec = Recorder()
    prompts = load_prompts("testbed-heldout", n=4, seed=1)
    res = evaluate(pipe_loader=lambda: pipe, steps=STEPS, qsched_schedule=Schedule.linear(0.9, 1.05, STEPS),
                   fp_schedule=Schedule.linear(1.1, 0.95, STEPS), prompts=prompts, n_images=6, batch_size=3,
                   metrics=[*tiny_metrics(), rec], progress=False, n_samples=4)
    assert list(res.rows) == ["fp-original", "quant-naive", "quant-qsched", "fp-tuned"]
    for cfg, row in res.rows.items():
        for k in ("fd", "accuracy", "jaq", "clipscore", "iq", "mean_pixel", "gen_seconds", "images_per_s"):
            assert row[k] is not None and np.isfinite(row[k]), (cfg, k)
        assert row["n_images"] == 6 and row["n_nonfinite"] == 0
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["jaq"] == pytest.approx(row["clipscore"] + 2 * row["iq"])
        assert res.samples[cfg].shape == (4, 32, 32, 1) and res.samples[cfg].dtype == np.uint8
    # prompts cycle, labels follow, seeds are seed + i, batches of 3
    assert rec.resets == 1 + 4
    first_cfg_calls = rec.calls[:2]
    assert [c[0][0] for c in first_cfg_calls] == [3, 3]
    assert first_cfg_calls[1][1] == [prompts.prompts[3], prompts.prompts[0], prompts.prompts[1]]
    assert first_cfg_calls[1][2] == [prompts.labels[3], prompts.labels[0], prompts.labels[1]]
    assert res.seeds == list(range(6)) and res.sample_prompts == res.prompts[:4]
    # every config changes the images (quantization / coefficients really applied)
    s = res.samples
    for a, b in (("fp-original", "quant-naive"), ("fp-original", "fp-tuned"), ("quant-naive", "quant-qsched")):
        assert not np.array_equal(s[a], s[b]), (a, b)
    # the caller's pipeline is left as it was
    assert pipe.scheduler is base_sched and pipe.unet is base_unet and quant_spec_of(pipe.unet) is None
    assert res.schedules["quant-qsched"]["params"] == {"model_start": 0.9, "sample_start": 1.05}
    assert res.schedules["fp-original"] is None
    assert res.versions["torch"] == torch.__version__ and res.spec == "w4a8" and res.steps == STEPS

    # JSON round trip with sample PNGs; markdown shows the numbers
    path = res.to_json(tmp_path / "eval.json")
    back = EvalResult.from_json(path)
    assert back.rows == json.loads(json.dumps(res.rows))
    for cfg in res.samples:
        np.testing.assert_array_equal(back.samples[cfg], res.samples[cfg])
    assert "pickle" not in path.read_text() and (tmp_path / "eval_samples").is_dir()
    md = res.to_markdown()
    assert f"{res.rows['quant-qsched']['fd']:.4f}" in md and f"{res.rows['fp-original']['jaq']:.4f}" in md
    assert md.count("\n| ") >= 5


def test_same_noise_across_configs_and_batch_sizes(pipe):
    """An identity fp schedule reproduces fp-original exactly; per-image seeds make batching irrelevant."""
    kw = dict(pipe_loader=lambda: pipe, steps=STEPS, n_images=4, metrics=(), progress=False,
              configs=("fp-original", "fp-tuned"), fp_schedule=Schedule.identity(STEPS))
    a = evaluate(batch_size=4, **kw)
    b = evaluate(batch_size=3, seed=0, **kw)
    np.testing.assert_array_equal(a.samples["fp-original"], a.samples["fp-tuned"])
    np.testing.assert_array_equal(a.samples["fp-original"], b.samples["fp-original"])
    c = evaluate(batch_size=4, seed=7, **kw)
    assert not np.array_equal(a.samples["fp-original"], c.samples["fp-original"])


def test_nonfinite_images_counted_and_excluded(pipe, tiny_metrics):
    """NaN images (injected into the quantized denoiser's output for the first item of each batch)."""
    from qsched.testbed.pipeline import tiny_testbed_pipeline

    p = tiny_testbed_pipeline(seed=1)

    def nan_first(module, args, out):
        if quant_spec_of(module) is not None:
            out.sample[0] = float("nan")
        return out

    p.unet.register_forward_hook(nan_first)
    rec = Recorder()
    res = evaluate(pipe_loader=lambda: p, steps=STEPS, n_images=4, batch_size=2, progress=False,
                   configs=("fp-original", "quant-naive"), metrics=[*tiny_metrics(), rec])
    fp, q = res.rows["fp-original"], res.rows["quant-naive"]
    assert fp["n_nonfinite"] == 0 and q["n_nonfinite"] == 2
    assert q["n_invalid"] >= 2 and q["fd"] is not None and np.isfinite(q["fd"])
    assert q["accuracy"] <= 0.5  # two of four images cannot be right
    assert any("quant-naive: 2 of 4 images contain NaN" in n for n in res.notes)
    assert [c[3] for c in rec.calls[2:]] == [[False, True], [False, True]]
    json.loads(json.dumps(res.to_dict(), allow_nan=False))


def test_skips_and_errors(pipe, tmp_path):
    res = evaluate(pipe_loader=lambda: pipe, steps=STEPS, n_images=2, metrics=(), progress=False)
    assert list(res.rows) == ["fp-original", "quant-naive"]
    assert any("fp-tuned skipped" in n for n in res.notes) and any("quant-qsched skipped" in n for n in res.notes)
    with pytest.raises(ValueError, match="unknown config"):
        evaluate(pipe_loader=lambda: pipe, configs=("fp",), metrics=(), progress=False)
    with pytest.raises(ValueError, match="steps"):
        evaluate(pipe_loader=lambda: pipe, steps=3, qsched_schedule=Schedule.linear(1, 1, 2), metrics=(),
                 progress=False)
    with pytest.raises(ValueError, match="prompts"):
        evaluate(model="pcm", pipe_loader=lambda: pipe, metrics=(), progress=False)
    with pytest.raises(ValueError, match="unknown metric"):
        build_metrics("testbed", ["fdd"])
    notes = []
    assert build_metrics("pcm", ["fd", "accuracy"], notes=notes) == [] and len(notes) == 2
    notes = []
    assert build_metrics("pcm", ["jaq"], notes=notes) == []  # offline: no CLIP ViT-L/14 weights
    assert "clipscore/jaq skipped" in notes[0] and "sd15" in notes[0]
    with pytest.raises(ValueError, match="reference statistics"):
        build_metrics("pcm", ["fid"])
    with pytest.raises(FileNotFoundError):
        EvalResult.from_json(tmp_path / "missing.json")


def test_already_quantized_model_runs_quant_rows_only(pipe):
    import copy

    from qsched.quantization import quantize

    q = copy.deepcopy(pipe)
    quantize(q, spec="w8a8")
    res = evaluate(pipe_loader=lambda: q, steps=STEPS, n_images=2, metrics=(), progress=False,
                   qsched_schedule=Schedule.linear(0.95, 1.0, STEPS))
    assert list(res.rows) == ["quant-naive", "quant-qsched"] and res.spec == "w8a8"
    assert any("already quantized" in n for n in res.notes)


def test_reference_stats_files(tmp_path):
    from qsched.frechet import save_stats

    mu, sigma = np.arange(3.0), np.eye(3) * 2
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    save_stats(tmp_path / "ref.safetensors", mu, sigma, packed=True)
    for name in ("ref.npz", "ref.safetensors"):
        m, s = load_reference_stats(tmp_path / name)
        np.testing.assert_allclose(m, mu)
        np.testing.assert_allclose(s, sigma)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="mu"):
        load_reference_stats(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        load_reference_stats(tmp_path / "none.npz")


def test_real_family_pipeline_generator_per_image():
    """A tiny diffusers SD pipeline (TCD, as PCM) runs through the same code path."""
    from qsched.testing import tiny_pipeline

    p = tiny_pipeline("pcm")
    rec = Recorder()
    res = evaluate(model="pcm", pipe_loader=lambda: p, prompts=load_prompts("testbed-calib", n=3), steps=2,
                   batch_size=2, metrics=[rec], configs=("fp-original", "quant-naive"), progress=False,
                   call_kwargs={"height": 32, "width": 32, "guidance_scale": 0.0})
    assert res.samples["fp-original"].shape == (3, 32, 32, 3)
    assert rec.calls[0][0] == (2, 3, 32, 32) and res.rows["quant-naive"]["n_nonfinite"] == 0
    assert not np.array_equal(res.samples["fp-original"], res.samples["quant-naive"])


def test_shipped_testbed_default_evaluation(tmp_path):
    """The default evaluation on the shipped weights: every metric finite, identity Q-Sched == naive exactly."""
    res = evaluate(model="testbed", n_images=int(os.environ.get("QSCHED_SMOKE_N", "40")), progress=False,
                   qsched_schedule=Schedule.linear(1.0, 1.0, 4))
    for row in res.rows.values():
        for k in ("fd", "accuracy", "clipscore", "jaq"):
            assert row[k] is not None and np.isfinite(row[k])
    naive, qs = res.rows["quant-naive"], res.rows["quant-qsched"]
    assert all(naive[k] == qs[k] for k in ("fd", "accuracy", "clipscore", "jaq"))
    assert res.rows["fp-original"]["accuracy"] >= 0.6  # the shipped student follows held-out prompts
    res.to_json(tmp_path / "smoke.json")

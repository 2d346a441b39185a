"""The one runner: seed rule, schedule install/restore, and identical images for identical (prompt, seed)
whichever caller draws them (calibrate, evaluate, the runner itself), plus evaluation across processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qsched.calibrate import calibrate
from qsched.evaluate import evaluate
from qsched.metrics import EvalMetric
from qsched.prompts import PromptSet
from qsched.quantization import quantized_copy
from qsched.runner import generate, generate_batches, image_seed, using_schedule
from qsched.schedule import Schedule
from qsched.scheduler import QSchedScheduler
from qsched.scoring import JAQ
from qsched.testing import tiny_pipeline

from fakes import BrightTC, ContrastIQ

PROMPTS = ["a bag", "a red coat", "a dress"]
KW = {"height": 32, "width": 32, "guidance_scale": 0.0}


@pytest.fixture(scope="module")
def pipes():
    fp = tiny_pipeline("pcm")
    fp.set_progress_bar_config(disable=True)
    q, _ = quantized_copy(fp, "w4a8")
    return fp, q


def test_seed_rule_is_documented_and_batch_independent(pipes):
    q, _ = pipes  # full precision: batch composition changes float round-off only (quantized: rounding flips)
    assert image_seed(0, 7) == 7 and image_seed(2, 1) == 2 * 100003 + 1
    whole = generate(q, PROMPTS, 2, seed=3, call_kwargs=KW)
    parts = torch.cat([b for _, b in generate_batches(q, PROMPTS, 2, seed=3, batch_size=1, call_kwargs=KW)])
    assert whole.shape[0] == 3 and torch.allclose(whole, parts, atol=1e-5)
    # image i of a later slice equals image i of the whole run
    tail = generate(q, PROMPTS[1:], 2, seed=3, start=1, batch_size=2, call_kwargs=KW)
    assert torch.allclose(tail, whole[1:], atol=1e-5)
    assert not torch.allclose(generate(q, PROMPTS, 2, seed=4, call_kwargs=KW), whole)


def test_using_schedule_installs_and_restores(pipes):
    _, q = pipes
    before = q.scheduler
    with using_schedule(q, Schedule.linear(0.9, 1.1, 2)):
        assert isinstance(q.scheduler, QSchedScheduler) and q.scheduler.schedule.kind == "linear"
    assert q.scheduler is before
    saved = Schedule.linear(0.95, 1.0, 2)
    q.scheduler = QSchedScheduler.from_scheduler(before, saved)  # a pipeline saved with a schedule
    try:
        with using_schedule(q, None):
            assert q.scheduler.schedule is None  # the model's own sampler
        assert q.scheduler.schedule == saved
    finally:
        q.scheduler = before


def test_quantized_copy_leaves_the_original(pipes):
    fp, q = pipes
    assert q.unet is not fp.unet and q.scheduler is not fp.scheduler and q.text_encoder is fp.text_encoder
    from qsched.quantization import quant_spec_of

    assert quant_spec_of(fp) is None and quant_spec_of(q) == "w4a8"


class _Recorder:
    """A JAQ stand-in alignment scorer that keeps every image it was shown."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []
        self.tc = BrightTC()

    def __call__(self, images, prompts):
        self.seen.append(images.clone())
        return self.tc(images, prompts)


class _Keep(EvalMetric):
    keys = ()

    def __init__(self):
        self.reset()

    def reset(self):
        self._s_images: list[torch.Tensor] = []

    def update(self, images, prompts, labels, finite):
        self._s_images.append(images.clone())

    def compute(self):
        return {}


def test_calibrate_evaluate_and_runner_draw_identical_images(pipes):
    fp, q = pipes
    rec = _Recorder()
    calibrate(q, PROMPTS, 2, jaq=JAQ(rec, ContrastIQ()), n_trials=1, progress=False, call_kwargs=KW)
    calib_identity = rec.seen[0]  # the identity trial comes first
    keep = _Keep()
    evaluate(model="testbed", spec="w4a8", steps=2, prompts=PromptSet(name="p", prompts=PROMPTS), n_images=3,
             batch_size=3, metrics=[keep], configs=["quant-naive"], pipe_loader=lambda: fp, progress=False,
             call_kwargs=KW)
    eval_naive = torch.cat(keep._s_images)
    direct = generate(q, PROMPTS, 2, seed=0, call_kwargs=KW)
    assert torch.equal(calib_identity, direct)
    assert torch.equal(eval_naive, direct)


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher is not on PATH")
def test_evaluate_across_two_processes_equals_one(tmp_path):
    """`accelerate launch` with 2 CPU processes shares the batches and gathers the metric states: the numbers
    equal a single-process run with the same seeds."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    args = ["-m", "qsched", "evaluate", "--steps", "2", "--n-images", "12", "--batch-size", "3",
            "--metrics", "fd,accuracy,jaq", "--no-progress", "--device", "cpu"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "one" / "evaluation.json").read_text())
    r2 = json.loads((tmp_path / "two" / "evaluation.json").read_text())
    assert r2["args"]["processes"] == 2 and r1["args"]["processes"] == 1
    assert set(r1["rows"]) == set(r2["rows"]) == {"fp-original", "quant-naive"}
    for cfg in r1["rows"]:
        for key in ("fd", "accuracy", "jaq", "clipscore", "n_nonfinite"):
            assert r2["rows"][cfg][key] == pytest.approx(r1["rows"][cfg][key], rel=1e-9, abs=1e-12), (cfg, key)

"""The embedded testbed: data, captions, pipeline behaviour, training scripts, shipped weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qsched.errors import QSchedError
from qsched.testbed import data
from qsched.testbed.pipeline import TestbedPipeline, load_testbed_pipeline, tiny_testbed_pipeline


def test_captions_heldout_disjoint_from_training():
    train, _ = data.all_captions("train")
    held, held_labels = data.all_captions("heldout")
    assert not set(train) & set(held)
    assert set(held_labels) == set(range(10))
    with pytest.raises(ValueError):
        data.captions_for(0, "test")


def test_heldout_prompts_balanced_and_deterministic():
    p1, l1 = data.heldout_prompts(40, seed=3)
    p2, l2 = data.heldout_prompts(40, seed=3)
    assert p1 == p2 and l1 == l2
    assert np.bincount(l1).tolist() == [4] * 10
    for p, c in zip(p1, l1):
        assert p in data.captions_for(c, "heldout")


def test_fashion_mnist_loads_padded():
    ds = data.load_fashion_mnist("test", limit=16)
    assert ds.images.shape == (16, 1, 32, 32) and ds.labels.shape == (16,)
    assert ds.images.min() >= 0 and ds.images.max() <= 1
    assert ds.images[:, :, :2].abs().sum() == 0  # zero padding


def test_missing_dataset_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.load_fashion_mnist("test")


@pytest.fixture(scope="module")
def tiny():
    return tiny_testbed_pipeline(seed=0)


def _gen(pipe, **kw):
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(["a sneaker", "a bag"], num_inference_steps=kw.pop("steps", 2), **kw).images


def test_pipeline_output_types_and_determinism(tiny):
    pt = _gen(tiny, output_type="pt")
    npy = _gen(tiny, output_type="np")
    pil = _gen(tiny, output_type="pil")
    assert pt.shape == (2, 1, 32, 32) and npy.shape == (2, 32, 32, 1) and len(pil) == 2
    assert torch.equal(pt.permute(0, 2, 3, 1), torch.from_numpy(npy))
    assert pil[0].size == (32, 32) and pil[0].mode == "L"
    assert torch.equal(pt, _gen(tiny, output_type="pt"))
    assert not torch.equal(pt, _gen(tiny, output_type="pt", generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError):
        tiny("x", output_type="latent")
    with pytest.raises(ValueError):
        tiny([], output_type="pt")


def test_zero_steps_is_a_clear_error(tiny):
    with pytest.raises(QSchedError, match="num_inference_steps must be an integer >= 1"):  # was ZeroDivisionError
        tiny("a", num_inference_steps=0)


def test_guidance_scale_changes_student_output(tiny):
    a = _gen(tiny, output_type="pt", guidance_scale=1.5)
    b = _gen(tiny, output_type="pt", guidance_scale=4.0)
    assert not torch.equal(a, b)


def test_teacher_uses_classifier_free_guidance():
    pipe = tiny_testbed_pipeline(seed=0, student=False)
    a = _gen(pipe, output_type="pt", guidance_scale=1.0, steps=3)
    b = _gen(pipe, output_type="pt", guidance_scale=3.0, steps=3)
    assert not torch.equal(a, b)


def test_pipeline_save_load_roundtrip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    back = TestbedPipeline.from_pretrained(tmp_path)
    back.set_progress_bar_config(disable=True)
    assert torch.allclose(_gen(tiny, output_type="pt"), _gen(back, output_type="pt"), atol=1e-5)


def test_pipeline_works_with_schedule_and_quantization(tiny):
    from qsched import Schedule, apply_schedule
    from qsched.quantization import quant_spec_of, quantize

    pipe = tiny_testbed_pipeline(seed=0)
    base = _gen(pipe, output_type="pt", steps=4)
    apply_schedule(pipe, Schedule.identity(4))
    assert torch.equal(base, _gen(pipe, output_type="pt", steps=4))
    apply_schedule(pipe, Schedule.linear(0.9, 1.05, 4))
    assert not torch.equal(base, _gen(pipe, output_type="pt", steps=4))
    quantize(pipe, "w4a8")
    assert quant_spec_of(pipe) == "w4a8"


def test_training_scripts_run_and_resume(tmp_path):
    from qsched.testbed import train_student, train_teacher

    common = ["--limit", "64", "--batch-size", "4", "--ckpt-every", "1", "--log-every", "1", "--threads", "1"]
    train_teacher.main(["--steps", "2", "--work", str(tmp_path / "t"), "--out", str(tmp_path / "w"), *common])
    assert json.loads((tmp_path / "t" / "ckpt.json").read_text())["step"] == 2
    train_teacher.main(["--steps", "3", "--work", str(tmp_path / "t"), "--out", str(tmp_path / "w"), *common])
    assert json.loads((tmp_path / "t" / "ckpt.json").read_text())["step"] == 3  # resumed, one more step
    train_student.main(["--steps", "2", "--teacher", str(tmp_path / "w" / "teacher.safetensors"),
                        "--work", str(tmp_path / "s"), "--out", str(tmp_path / "w"), *common])
    pipe = load_testbed_pipeline("student", weights_dir=tmp_path / "w")
    img = pipe("a coat", num_inference_steps=2, output_type="pt").images
    assert img.shape == (1, 1, 32, 32) and torch.isfinite(img).all()


def test_v_student_training_converts_and_continues(tmp_path):
    """v-prediction student: conversion steps, LCD with the auxiliary loss, --init provenance, and a pipeline whose
    LCMScheduler reads the exported prediction type."""
    from qsched.testbed import train_student

    common = ["--limit", "64", "--batch-size", "4", "--log-every", "1", "--threads", "1", "--prediction-type",
              "v_prediction", "--teacher", "qsched/testbed/weights/teacher.safetensors"]
    train_student.main(["--steps", "3", "--convert-steps", "2", "--work", str(tmp_path / "a"),
                        "--out", str(tmp_path / "a" / "out"), *common])
    first = json.loads((tmp_path / "a" / "out" / "student.json").read_text())
    assert first["prediction_type"] == "v_prediction"
    assert first["train"]["phases"][0]["convert_steps"] == 2
    train_student.main(["--steps", "2", "--aux-denoise", "0.5", "--init", str(tmp_path / "a" / "out" / "student.safetensors"),
                        "--work", str(tmp_path / "b"), "--out", str(tmp_path / "w"), *common])
    meta = json.loads((tmp_path / "w" / "student.json").read_text())
    assert meta["train"]["init_from"] == first["train"]  # provenance of the starting weights is kept
    pipe = load_testbed_pipeline("student", weights_dir=tmp_path / "w")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    img = pipe("a coat", num_inference_steps=1, output_type="pt").images
    assert torch.isfinite(img).all()
    with pytest.raises(SystemExit):  # conversion only makes sense for a v student
        train_student.parse_args(["--convert-steps", "5"])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_consistency_function_matches_lcm_scheduler(prediction_type):
    """What LCD trains (c_skip x_t + c_out x0(output)) is exactly what LCMScheduler outputs at 1 step."""
    from diffusers import LCMScheduler

    from qsched.testbed.models import NOISE_SCHEDULE
    from qsched.testbed.train_student import boundary_scalings, predicted_x0

    cfg = {k: v for k, v in NOISE_SCHEDULE.items() if k not in ("clip_sample", "set_alpha_to_one")}
    sched = LCMScheduler(**cfg | {"prediction_type": prediction_type}, original_inference_steps=50,
                         timestep_spacing="leading")
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    g = torch.Generator().manual_seed(0)
    xt, out = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    denoised = sched.step(out, t, xt, return_dict=True).denoised
    at = sched.alphas_cumprod[t].view(1, 1, 1, 1)
    cs, co = boundary_scalings(torch.tensor([int(t)]))
    assert torch.allclose(cs * xt + co * predicted_x0(out, xt, at, prediction_type), denoised, atol=1e-5)


def test_unknown_variant_and_missing_weights(tmp_path):
    with pytest.raises(ValueError, match="variant"):
        load_testbed_pipeline("giant")
    with pytest.raises(FileNotFoundError, match="train_student"):
        load_testbed_pipeline("student", weights_dir=tmp_path)


def test_shipped_student_draws_the_prompted_class():
    """The shipped 4-step student must produce recognisable, prompt-following images (held-out wording)."""
    from qsched.testbed.metrics import ClassifierFD

    pipe = load_testbed_pipeline("student")
    prompts, labels = data.heldout_prompts(100, seed=7)
    imgs = pipe(prompts, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    acc = ClassifierFD().class_accuracy(imgs, labels)
    assert acc >= 0.7, acc


def test_shipped_student_is_usable_at_one_step():
    """The shipped student predicts v, so one LCM step already gives recognisable images (the card measures 2k)."""
    from qsched.testbed.metrics import ClassifierFD

    pipe = load_testbed_pipeline("student")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    prompts, labels = data.heldout_prompts(100, seed=7)
    imgs = pipe(prompts, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    acc = ClassifierFD().class_accuracy(imgs, labels)
    assert acc >= 0.6, acc


def test_model_card_rerenders_and_remeasures_speed(tmp_path):
    """--render-only reproduces the shipped card from card.json; --speed-only replaces only the speed figure."""
    import shutil

    from qsched.testbed import card

    shutil.copy(card.HERE / "card.json", tmp_path / "card.json")
    card.main(["--render-only", "--out", str(tmp_path)])
    assert (tmp_path / "MODEL_CARD.md").read_text() == (card.HERE / "MODEL_CARD.md").read_text()
    before = json.loads((tmp_path / "card.json").read_text())
    after = card.main(["--speed-only", "--out", str(tmp_path)])
    assert after["student_images_per_s_4steps_b64"] > 0 and "speed_remeasured" in after
    assert json.loads((tmp_path / "card.json").read_text()) == json.loads(json.dumps(after, default=str))
    speed_keys = ("student_images_per_s_4steps_b64", "speed_remeasured")
    assert {k: v for k, v in after.items() if k not in speed_keys} == \
        {k: v for k, v in before.items() if k not in speed_keys}
    assert "re-measured alone" in (tmp_path / "MODEL_CARD.md").read_text()


def test_steps_trend_paired_and_resumable(tmp_path, capsys):
    """qsched.testbed.trend: every row on the same images, paired CIs around their differences, rows reused on a
    rerun; the card's step targets read those CIs."""
    from qsched.testbed.card import trend_targets
    from qsched.testbed.trend import main as trend

    argv = ["--n", "6", "--teacher-n", "4", "--teacher-steps", "2", "--fid-n", "0", "--boot", "10",
            "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out" / "new")]  # --out created, not required
    t = trend(argv)
    assert set(t["rows"]) == {"student-1", "student-2", "student-4", "student-8", "teacher"}
    assert t["rows"]["teacher"]["n"] == 4 and t["rows"]["student-8"]["n"] == 6
    for name, p in t["pairs"].items():
        b, a = name.split(" vs ")
        if a != "teacher":
            assert p["fd"]["diff"] == pytest.approx(t["rows"][b]["fd"] - t["rows"][a]["fd"], rel=1e-6)
            assert p["accuracy"]["diff"] == pytest.approx(t["rows"][b]["accuracy"] - t["rows"][a]["accuracy"])
        for k in ("fd", "fd2", "accuracy", "jaq"):
            assert p[k]["ci_low"] <= p[k]["diff"] + 1e-9 <= p[k]["ci_high"] + 2e-9, (name, k)
    assert set(t["pairs"]["student-4 vs teacher"]["ratio"]) == {"fd", "fd2"}
    assert json.loads((tmp_path / "out" / "new" / "trend.json").read_text())["rows"] == t["rows"]
    capsys.readouterr()
    again = trend(argv)
    assert "images in" not in capsys.readouterr().out and again["rows"] == t["rows"]  # rows reused, not redrawn
    from qsched.testbed.trend import _weights_id  # a row is tied to the weights that drew it (retrained: redrawn)
    names = sorted(p.name for p in (tmp_path / "w").iterdir())
    assert len(names) == 5 and all(_weights_id("teacher" if n.startswith("teacher") else "student") in n for n in names)
    # the card's targets: an 8-step CI entirely above 0 is "worse beyond noise"; one that straddles 0 is not
    fake = {"settings": {"teacher_n": 4, "fid_n": 0}, "pairs": {
        "student-2 vs student-1": {"fd": {"diff": -1.0, "ci_low": -1.5, "ci_high": -0.5}},
        "student-4 vs student-2": {"fd": {"diff": -0.3, "ci_low": -0.6, "ci_high": -0.1}},
        "student-8 vs student-4": {"fd": {"diff": 0.3, "ci_low": 0.1, "ci_high": 0.5}},
        "student-4 vs teacher": {"ratio": {"fd": 0.9}}}}
    got = {name: ok for name, _, ok in trend_targets(fake)}
    assert got == {"FD improves 1 -> 2 -> 4 steps (both CIs below 0)": True,
                   "FD: 8 steps no worse than 4 beyond noise (CI not above 0)": False,
                   "student 4-step FD <= 1.2 x teacher (4 images, trend)": True}

"""Tests for the qsched command line (typer CliRunner) on a tiny random testbed pipeline and stand-in scorers."""

from __future__ import annotations

import copy
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

import qsched
from qsched import cli
from qsched.scoring import JAQ

from fakes import BrightTC, ContrastIQ

runner = CliRunner()


@pytest.fixture(scope="module")
def base_pipe():
    from qsched.testbed.pipeline import tiny_testbed_pipeline

    return tiny_testbed_pipeline(seed=0)


@pytest.fixture
def tiny(monkeypatch, base_pipe):
    """Route model loading to fresh copies of a tiny testbed pipeline and JAQ to cheap stand-in scorers."""
    loaded = []

    def load(model, device):
        from qsched.pipelines import MODELS

        if model not in MODELS:  # the real loader's validation, without loading anything
            return cli.__dict__["_real_load"](model, device)
        loaded.append(model)
        return copy.deepcopy(base_pipe)

    monkeypatch.setitem(cli.__dict__, "_real_load", cli._load_pipeline)
    monkeypatch.setattr(cli, "_load_pipeline", load)
    monkeypatch.setattr(cli, "_make_jaq", lambda preset, device, k: JAQ(BrightTC(), ContrastIQ(), k=k))
    return loaded


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    assert "Traceback" not in result.output
    return err


def test_help_and_version():
    r = runner.invoke(cli.app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("calibrate", "generate", "quantize", "evaluate", "report"):
        assert cmd in r.output
    r = runner.invoke(cli.app, ["--version"])
    assert r.exit_code == 0 and qsched.__version__ in r.output
    r = runner.invoke(cli.app, ["calibrate", "--help"])
    assert r.exit_code == 0 and "--parametrization" in r.output


def test_calibrate_end_to_end_then_generate_and_report(tiny, tmp_path):
    out = tmp_path / "calib"
    r = runner.invoke(cli.app, ["calibrate", "--trials", "3", "--n-prompts", "4", "--steps", "2", "--out", str(out),
                                "--no-progress", "--parametrization", "linear", "--n-validation", "0"])
    assert r.exit_code == 0, r.output
    assert "original" in r.output and "best found" in r.output and "model evaluations" in r.output
    flat = " ".join(r.output.split())
    assert "text-image" in flat and "c^e multiplies the model's prediction and c^x the sample" in flat
    # loaded once: the quantized pipeline is a copy of it, and the full-precision one is only run for the
    # report's image grid, after calibration
    assert tiny == ["testbed"]
    html = (out / "report" / "report.html").read_text()
    assert "w4a8 + Q-Sched" in html and "full precision" in html
    data = json.loads((out / "calibration.json").read_text())
    assert len(data["trials"]) == 3 and data["quant_spec"] == "w4a8" and data["steps"] == 2
    assert data["model"] == "testbed" and len(data["prompts"]) == 4
    # calibration prompts use the calibration wording: neither the training nor the held-out evaluation wording
    from qsched.testbed.data import all_captions

    assert not set(data["prompts"]) & set(all_captions("heldout")[0])
    assert not set(data["prompts"]) & set(all_captions("train")[0])
    assert set(data["prompts"]) <= set(all_captions("calib")[0])
    # 1 evaluation per step for the first trial, the first step cached afterwards
    assert data["model_evals"] == 2 + 2 * 1 and data["cache_hits"] == 2
    assert (out / "schedules.json").exists() and (out / "scheduler" / "scheduler_config.json").exists()
    assert (out / "report" / "report.html").exists()

    # the default: validated on other prompts and seeds, with a one-sentence verdict
    v = tmp_path / "validated"
    r = runner.invoke(cli.app, ["calibrate", "--trials", "4", "--n-prompts", "3", "--n-validation", "4", "--steps",
                                "2", "--out", str(v), "--no-progress"])
    assert r.exit_code == 0, r.output
    vdata = json.loads((v / "calibration.json").read_text())
    assert vdata["decision"] in ("qsched", "identity") and vdata["parametrization"] == "auto"
    assert " ".join(vdata["verdict"].split())[1:40] in " ".join(r.output.split())  # the verdict is printed
    if vdata["validation"]:  # (None only when the search found nothing but the identity)
        assert len(vdata["validation"]["prompts"]) == 4
        assert not set(vdata["prompts"]) & set(vdata["validation"]["prompts"])
    r = runner.invoke(cli.app, ["calibrate", "--trials", "4", "--n-prompts", "3", "--n-validation", "4", "--steps",
                                "2", "--out", str(v), "--no-progress"])
    assert r.exit_code == 0 and "continued the stored study" in r.output

    img = tmp_path / "img.png"
    r = runner.invoke(cli.app, ["generate", "a photo of a bag", "--schedule", str(out), "--out", str(img)])
    assert r.exit_code == 0, r.output
    assert "Q-Sched schedule" in r.output
    assert Image.open(img).size == (32, 32)

    img2 = tmp_path / "img2.png"
    r = runner.invoke(cli.app, ["generate", "a photo of a bag", "--out", str(img2), "--steps", "2",
                                "--model-coeff", "1.1,1", "--sample-coeff", "0.95,1"])
    assert r.exit_code == 0, r.output

    rep = tmp_path / "rep"
    r = runner.invoke(cli.app, ["report", "--calibration", str(out), "--out", str(rep)])
    assert r.exit_code == 0, r.output
    assert (rep / "report.html").exists()

    ev = tmp_path / "ev"
    r = runner.invoke(cli.app, ["evaluate", "--schedule", str(out), "--steps", "2", "--n-images", "2", "--metrics",
                                "jaq", "--out", str(ev), "--no-progress"])
    assert r.exit_code == 0, r.output
    rows = json.loads((ev / "evaluation.json").read_text())["rows"]
    assert {"fp-original", "quant-naive", "quant-qsched"} <= set(rows)

    # the same command resumes (nothing left to run) and reports the same best schedule
    r = runner.invoke(cli.app, ["calibrate", "--trials", "3", "--n-prompts", "4", "--steps", "2", "--out", str(out),
                                "--no-progress", "--parametrization", "linear", "--n-validation", "0"])
    assert r.exit_code == 0, r.output
    again = json.loads((out / "calibration.json").read_text())
    assert again["schedule"] == data["schedule"] and again["model_evals"] == 0


def test_quantize_command(tiny, tmp_path):
    r = runner.invoke(cli.app, ["quantize", "--spec", "w8a8", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    assert "w8a8" in r.output and "saved" in r.output
    assert any((tmp_path / "q").iterdir())


def test_bad_inputs_exit_2_with_one_line(tiny, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (["calibrate", "--prompts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")], "not found"),
        (["calibrate", "--prompts", str(empty), "--out", str(tmp_path / "o")], "empty"),
        (["calibrate", "--model", "no-such-model", "--out", str(tmp_path / "o")], "no-such-model"),
        (["calibrate", "--spec", "w4a99", "--out", str(tmp_path / "o")], "spec"),
        (["calibrate", "--spec", "banana", "--out", str(tmp_path / "o")], "banana"),
        (["calibrate", "--out", str(a_file / "sub")], "cannot create"),
        (["calibrate", "--grid-range", "0,1.2", "--out", str(tmp_path / "o")], "grid-range"),
        (["calibrate", "--grid-range", "1.2,0.8", "--out", str(tmp_path / "o")], "grid-range"),
        (["calibrate", "--parametrization", "cubic", "--out", str(tmp_path / "o")], "cubic"),
        (["calibrate", "--seeds", "a,b", "--out", str(tmp_path / "o")], "seeds"),
        (["generate", "a bag", "--model-coeff", "0.9,-1", "--out", str(tmp_path / "i.png")], "model-coeff"),
        (["generate", "a bag", "--model-coeff", "nan,1", "--out", str(tmp_path / "i.png")], "model-coeff"),
        (["generate", "a bag", "--schedule", str(tmp_path / "nope"), "--out", str(tmp_path / "i.png")], "not found"),
        (["generate", "a bag", "--out", str(a_file / "i.png")], "cannot create"),
        (["quantize", "--spec", "w4a99", "--out", str(tmp_path / "q")], "spec"),
        (["quantize", "--model", "no-such-model", "--out", str(tmp_path / "q")], "no-such-model"),
        (["report", "--calibration", str(tmp_path / "nothing")], "not found"),
    ]
    for args, needle in cases:
        r = runner.invoke(cli.app, args)
        line = _error_line(r)
        assert needle in line, (args, line)
    assert tiny == []  # every check failed before a pipeline was built, or in the loader itself


def test_generate_schedule_for_missing_spec_is_a_clear_error(tiny, tmp_path):
    from qsched.calibrate import save_schedule
    from qsched.schedule import Schedule

    save_schedule(tmp_path, "w8a8", Schedule.linear(0.9, 1.1, 4), "testbed", 4)
    r = runner.invoke(cli.app, ["generate", "a bag", "--schedule", str(tmp_path), "--out", str(tmp_path / "i.png")])
    line = _error_line(r)
    assert "w4a8" in line and "w8a8" in line


def test_generate_runs_the_schedule_saved_with_the_model(tiny, base_pipe, tmp_path):
    """A checkpoint saved with a calibrated schedule generates with it (as qsched.load_pipeline does), unless the
    step count differs; an explicit schedule still wins."""
    import numpy as np
    from PIL import Image

    from qsched.checkpoint import save_quantized
    from qsched.quantization import quantize
    from qsched.schedule import Schedule
    from qsched.scheduler import apply_schedule

    pipe = apply_schedule(copy.deepcopy(base_pipe), Schedule.linear(0.8, 1.15, 2))
    quantize(pipe, "w4a8")
    save_quantized(pipe, tmp_path / "ckpt")
    png = lambda name: np.asarray(Image.open(tmp_path / name))  # noqa: E731
    run = lambda *a: runner.invoke(cli.app, ["generate", "a bag", "--model", str(tmp_path / "ckpt"), *a])  # noqa

    r = run("--out", str(tmp_path / "saved.png"))
    assert r.exit_code == 0, r.output
    assert "saved with the model" in " ".join(r.output.split())
    sched = Schedule.linear(0.8, 1.15, 2)
    r = run("--model-coeff", ",".join(map(str, sched.model_coeff)), "--sample-coeff",
            ",".join(map(str, sched.sample_coeff)), "--out", str(tmp_path / "manual.png"))
    assert r.exit_code == 0, r.output
    r = run("--model-coeff", "1,1", "--sample-coeff", "1,1", "--out", str(tmp_path / "identity.png"))
    assert r.exit_code == 0, r.output
    assert np.array_equal(png("saved.png"), png("manual.png"))
    assert not np.array_equal(png("saved.png"), png("identity.png"))
    r = run("--steps", "3", "--out", str(tmp_path / "three.png"))
    assert r.exit_code == 0, r.output
    assert "saved with the model is for 2 steps" in " ".join(r.output.split())


# ---------------------------------------------------------------------------------------------- calibrate: one
# output directory for several specs, shared with the Python API, and options that mean what their help says


def test_calibrate_n_validation_0_searches_every_prompt(tiny, tmp_path):
    out = tmp_path / "c"
    r = runner.invoke(cli.app, ["calibrate", "--steps", "2", "--n-prompts", "6", "--n-validation", "0", "--trials",
                                "4", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "validating on" not in flat and "not validated: no validation prompts given" in flat
    data = json.loads((out / "calibration.json").read_text())
    assert len(data["prompts"]) == 6 and data["validation"] is None


@pytest.mark.parametrize("trials", [1, 2, 3, 5])
def test_calibrate_runs_exactly_the_trials_asked(tiny, tmp_path, trials):
    out = tmp_path / "c"
    r = runner.invoke(cli.app, ["calibrate", "--steps", "3", "--n-prompts", "2", "--n-validation", "0", "--trials",
                                str(trials), "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert f"trials: {trials} complete" in " ".join(r.output.split())
    data = json.loads((out / "calibration.json").read_text())
    assert sum(t["state"] == "COMPLETE" for t in data["trials"]) == trials


def test_readme_cli_synopsis_shows_the_real_defaults():
    """The README's `qsched calibrate [--option default] ...` line matches the command's defaults."""
    import re
    from pathlib import Path

    import typer.main

    from qsched.pipelines import MODELS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("qsched calibrate ["))
    shown = dict(re.findall(r"\[(--[\w-]+) ([^\]]+)\]", line))
    params = {o: p for p in typer.main.get_command(cli.app).commands["calibrate"].params for o in p.opts}
    implied = {"--steps": MODELS["testbed"].steps, "--trials": cli.DEFAULT_TRIALS}  # None in the code: resolved
    assert len(shown) >= 8
    for opt, value in shown.items():
        if value.isupper():  # a placeholder (FILE)
            continue
        default = params[opt].default
        assert str(implied[opt] if default is None else default) == value, (opt, value, default)



def test_bad_seeds_fail_before_anything_loads_or_is_written(tiny, tmp_path):
    for args, needle in [(["calibrate", "--seeds=-1"], "--seeds"), (["calibrate", "--validation-seeds", "1,-3"],
                                                                      "--validation-seeds"),
                         (["calibrate", "--seeds", str(2**62)], "--seeds"), (["evaluate", "--seed", "-1"], "--seed")]:
        out = tmp_path / "o"
        line = _error_line(runner.invoke(cli.app, [*args, "--out", str(out), "--no-progress"]))
        assert not out.exists()  # no output directory, no study.db
        assert needle in line and "out of range" in line, line
    line = _error_line(runner.invoke(cli.app, ["generate", "a bag", "--seed", "-1", "--out", str(tmp_path / "i.png")]))
    assert "--seed" in line
    assert tiny == []


SMALL = ["--steps", "2", "--n-prompts", "2", "--n-validation", "0", "--parametrization", "linear", "--trials", "2",
         "--no-progress"]


def test_cli_and_python_api_share_a_study(tiny, base_pipe, tmp_path, monkeypatch):
    """`qsched calibrate`, then the README's Python snippet (qsched.load_pipeline("testbed"), quantize, calibrate)
    on the same output directory: both name the model "testbed", so the API continues the CLI's study."""
    from qsched import pipelines
    from qsched.errors import QSchedError
    from qsched.prompts import load_prompts
    from qsched.quantization import quantize

    out = tmp_path / "calib"
    r = runner.invoke(cli.app, ["calibrate", *SMALL, "--out", str(out)])
    assert r.exit_code == 0, r.output
    monkeypatch.setattr(pipelines, "_import_loader", lambda path: lambda device: copy.deepcopy(base_pipe))
    pipe = qsched.load_pipeline("testbed")
    assert pipe.name_or_path == "testbed"
    quantize(pipe, "w4a8")
    ps = load_prompts("testbed-calib", 2).prompts
    kw = dict(parametrization="linear", n_trials=2, validation_prompts=[], out_dir=out, progress=False,
              jaq=JAQ(BrightTC(), ContrastIQ()))
    res = qsched.calibrate(pipe, ps, 2, **kw)
    assert res.model == "testbed" and res.resumed and res.model_evals == 0
    with pytest.raises(QSchedError, match="other settings"):  # one line for the user, not a bare ValueError
        qsched.calibrate(pipe, ps[:1], 2, **kw)


def test_second_spec_in_the_same_out_dir_keeps_the_first(tiny, tmp_path):
    """The README's sequence: calibrate (w4a8), then --spec w4a4 into the same directory; each spec has its own
    study, schedules.json holds both, each spec's calibration/scheduler/report is kept, and evaluating either
    spec reports that spec's calibration."""
    out = tmp_path / "calib"
    for spec in ("w4a8", "w4a4"):
        r = runner.invoke(cli.app, ["calibrate", "--spec", spec, *SMALL, "--out", str(out)])
        assert r.exit_code == 0, r.output
    table = json.loads((out / "schedules.json").read_text())["schedules"]
    assert set(table) == {"w4a8", "w4a4"}
    for spec in ("w4a8", "w4a4"):
        own = json.loads((out / spec / "calibration.json").read_text())
        assert own["quant_spec"] == spec and own["study_name"] == f"qsched-{spec}-linear-optuna-2steps"
        assert own["schedule"] == table[spec]["schedule"]
        assert json.loads((out / spec / "scheduler" / "qsched_schedule.json").read_text())["quant_spec"] == spec
        assert (out / spec / "report" / "report.html").is_file()
    assert json.loads((out / "calibration.json").read_text())["quant_spec"] == "w4a4"  # the last run's
    # the first spec's command resumes its own study
    r = runner.invoke(cli.app, ["calibrate", "--spec", "w4a8", *SMALL, "--out", str(out)])
    assert r.exit_code == 0 and "continued the stored study" in r.output, r.output
    assert json.loads((out / "w4a8" / "calibration.json").read_text())["model_evals"] == 0
    for spec in ("w4a8", "w4a4"):
        ev = tmp_path / f"ev-{spec}"
        r = runner.invoke(cli.app, ["evaluate", "--spec", spec, "--schedule", str(out), "--steps", "2",
                                    "--n-images", "2", "--metrics", "jaq", "--out", str(ev), "--no-progress"])
        assert r.exit_code == 0, r.output
        assert json.loads((ev / "report.json").read_text())["calibration"]["spec"] == spec

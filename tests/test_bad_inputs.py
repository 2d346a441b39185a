"""The bad-input and fault corpus (issue 13): every bad input is one ``error: ...`` line naming the offending
value or file, exit code 2 and no traceback (CLI), or the documented exception type (Python API); faults (full
disk, Ctrl-C, SIGTERM) leave nothing stored corrupted.

One tiny testbed pipeline is loaded per module and shared; the CLI runs in-process (typer's CliRunner) with
``_load_pipeline`` routed to copies of it and cheap stand-in scorers. Only the signal tests start processes.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qsched import cli
from qsched.errors import CorruptFileError, OutputError, QSchedError
from qsched.scoring import JAQ

from fakes import BrightTC, ContrastIQ, fake_jaq

runner = CliRunner()
HERE = Path(__file__).resolve().parent


# ============================================================================================== fixtures


@pytest.fixture(scope="module")
def base_pipe():
    from qsched.testbed.pipeline import tiny_testbed_pipeline

    return tiny_testbed_pipeline(seed=0)


@pytest.fixture
def tiny(monkeypatch, base_pipe):
    """Model loading -> copies of the shared tiny pipeline (paths still go through the real loader)."""
    real = cli._load_pipeline

    def load(model, device):
        from qsched.pipelines import MODELS

        return copy.deepcopy(base_pipe) if model in MODELS else real(model, device)

    monkeypatch.setattr(cli, "_load_pipeline", load)
    monkeypatch.setattr(cli, "_make_jaq", lambda preset, device, k: JAQ(BrightTC(), ContrastIQ(), k=k))


def _corrupt_copy(src: Path, dst: Path, name: str, data: bytes | str) -> Path:
    shutil.copytree(src, dst)
    target = dst / name
    target.write_bytes(data if isinstance(data, bytes) else data.encode())
    return dst


@pytest.fixture(scope="module")
def F(tmp_path_factory, base_pipe):
    """Every kind of file qsched reads, good and damaged, made once for the module."""
    from qsched.calibrate import calibrate
    from qsched.evaluate import EvalResult
    from qsched.quantization import quantized_copy
    from qsched.testbed.text import minilm_path

    d = tmp_path_factory.mktemp("corpus")
    f = {"d": d}
    # a real (tiny) W4A8 calibration, 2 steps: calibration.json, schedules.json, scheduler/
    qpipe, _ = quantized_copy(base_pipe, "w4a8")
    calib = d / "calib"
    calibrate(qpipe, ["a bag", "a coat"], 2, jaq=fake_jaq(), parametrization="linear", n_trials=2, out_dir=calib,
              progress=False, model_name="testbed")
    f["calib"] = calib
    sched_dir = calib / "scheduler"
    f["trunc_sched_cfg"] = _corrupt_copy(sched_dir, d / "s_trunc", "scheduler_config.json",
                                         (sched_dir / "scheduler_config.json").read_text()[:40])
    f["bin_sched_cfg"] = _corrupt_copy(sched_dir, d / "s_bin", "scheduler_config.json", os.urandom(200) + b"\xff")
    cfg = json.loads((sched_dir / "scheduler_config.json").read_text())
    f["type_sched_cfg"] = _corrupt_copy(sched_dir, d / "s_type", "scheduler_config.json",
                                        json.dumps({**cfg, "schedule": {"kind": "linear", "steps": 2,
                                                                        "params": [1, 2]}}))
    sj = json.loads((calib / "schedules.json").read_text())
    f["trunc_sj"] = _write(d / "trunc" / "schedules.json", (calib / "schedules.json").read_text()[:50])
    f["bin_sj"] = _write(d / "bin" / "schedules.json", b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    f["nomap_sj"] = _write(d / "nomap" / "schedules.json", json.dumps({"format": "qsched.schedules/1"}))
    f["int_sj"] = _write(d / "int" / "schedules.json", json.dumps({"schedules": {"w4a8": 5}}))
    nan = copy.deepcopy(sj)
    nan["schedules"]["w4a8"]["schedule"] = {"kind": "linear", "steps": 2,
                                            "params": {"model_start": float("nan"), "sample_start": 1.0}}
    f["nan_sj"] = _write(d / "nan" / "schedules.json", json.dumps(nan))  # Python's json writes NaN
    f["empty_dir"] = (d / "empty").mkdir() or d / "empty"
    f["png_dir"] = (d / "d.png").mkdir() or d / "d.png"
    # calibration.json damaged
    f["trunc_cal"] = _corrupt_copy(calib, d / "c_trunc", "calibration.json",
                                   (calib / "calibration.json").read_text()[:100])
    f["bin_cal"] = _corrupt_copy(calib, d / "c_bin", "calibration.json", os.urandom(300) + b"\xfe")
    cal = json.loads((calib / "calibration.json").read_text())
    f["type_cal"] = _corrupt_copy(calib, d / "c_type", "calibration.json", json.dumps({**cal, "trials": "many"}))
    f["list_cal"] = _corrupt_copy(calib, d / "c_list", "calibration.json", "[1, 2, 3]")
    f["empty_cal"] = _corrupt_copy(calib, d / "c_empty", "calibration.json", "")
    # evaluation.json
    ev = EvalResult(rows={"quant-naive": {"jaq": 1.0, "n_images": 2}}, model="testbed", spec="w4a8", steps=2,
                    seeds=[0, 1], prompt_set="p", n_images=2, configs=["quant-naive"], metrics=["jaq"])
    good_ev = ev.to_json(d / "ev" / "evaluation.json")
    f["good_ev"] = good_ev
    f["trunc_ev"] = _write(d / "ev_trunc.json", good_ev.read_text()[:60])
    f["bin_ev"] = _write(d / "ev_bin.json", os.urandom(100) + b"\xff")
    f["type_ev"] = _write(d / "ev_type.json", json.dumps({**json.loads(good_ev.read_text()), "rows": [1, 2]}))
    f["empty_obj_ev"] = _write(d / "ev_obj.json", "{}")
    f["str_ev"] = _write(d / "ev_str.json", '"just a string"')
    # prompt files of every format
    f["p_empty"] = _write(d / "p" / "empty.txt", "\n  \n# only a comment\n")
    f["p_bin_txt"] = _write(d / "p" / "bin.txt", b"\x00\xff\xfe" + os.urandom(64))
    f["p_nul_txt"] = _write(d / "p" / "nul.txt", b"a red bag\n\x00\x01\x02\nshoes\n")  # valid UTF-8, still binary
    f["p_bin_csv"] = _write(d / "p" / "bin.csv", b"prompt\n\xff\xfe\x00" + os.urandom(32))
    f["p_trunc_json"] = _write(d / "p" / "trunc.json", '{"1": {"prompt": "a bag", "categ')
    f["p_type_json"] = _write(d / "p" / "type.json", json.dumps({"1": 5, "2": 6}))
    f["p_ann_json"] = _write(d / "p" / "ann.json", json.dumps({"annotations": 7}))
    f["p_num_json"] = _write(d / "p" / "num.json", "42")
    f["p_bad_yaml"] = _write(d / "p" / "bad.yaml", "a: [unclosed\n  b: {")
    f["p_scalar_yaml"] = _write(d / "p" / "scalar.yaml", "just one string")
    f["p_bin_yaml"] = _write(d / "p" / "bin.yaml", os.urandom(64) + b"\xff")
    f["p_three"] = _write(d / "p" / "three.txt", "a bag\na coat\na shoe\n")
    f["p_dir"] = (d / "p" / "adir").mkdir() or d / "p" / "adir"
    f["p_long"] = _write(d / "p" / "long.txt", "a bag " + "very " * 30 + "long\n")
    f["a_file"] = _write(d / "file.txt", "x")
    # a saved testbed pipeline: tiny UNet + scheduler, the packaged MiniLM linked in; then damaged copies
    model = d / "model"
    base_pipe.unet.save_pretrained(str(model / "unet"))
    base_pipe.scheduler.save_pretrained(str(model / "scheduler"))
    (model / "text_encoder").symlink_to(minilm_path())
    (model / "tokenizer").symlink_to(minilm_path())
    index = {"_class_name": "TestbedPipeline", "_diffusers_version": "0.42.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "LCMScheduler"],
             "text_encoder": ["transformers", "BertModel"], "tokenizer": ["transformers", "BertTokenizerFast"]}
    _write(model / "model_index.json", json.dumps(index))
    weights = (model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    f["m_trunc_st"] = _corrupt_copy(model, d / "m_trunc", "unet/diffusion_pytorch_model.safetensors",
                                    weights[: len(weights) // 2])
    f["m_head_st"] = _corrupt_copy(model, d / "m_head", "unet/diffusion_pytorch_model.safetensors",
                                   weights[:8] + b"{not json at all" + weights[24:])
    f["m_len_st"] = _corrupt_copy(model, d / "m_len", "unet/diffusion_pytorch_model.safetensors",
                                  (10**12).to_bytes(8, "little") + weights[8:])
    f["m_module"] = _corrupt_copy(model, d / "m_module", "model_index.json",
                                  json.dumps({**index, "unet": ["diffusers", "NoSuchUNetModel"]}))
    f["m_nolib"] = _corrupt_copy(model, d / "m_nolib", "model_index.json",
                                 json.dumps({**index, "unet": ["no_such_library", "UNet"]}))
    f["m_trunc_idx"] = _corrupt_copy(model, d / "m_trunc_idx", "model_index.json", json.dumps(index)[:30])
    f["m_bin_idx"] = _corrupt_copy(model, d / "m_bin_idx", "model_index.json", os.urandom(50) + b"\xff")
    f["m_list_idx"] = _corrupt_copy(model, d / "m_list_idx", "model_index.json", "[]")
    f["m_missing"] = _corrupt_copy(model, d / "m_missing", "model_index.json", json.dumps(index))
    shutil.rmtree(f["m_missing"] / "unet")
    f["m_file"] = _write(d / "weights.safetensors", weights)
    return f


def _write(p: Path, data: bytes | str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


def _error_line(result) -> str:
    """The one ``error:`` line of a failed command (asserting exit 2, one line, no traceback)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    assert "Traceback" not in result.output
    return err


# ============================================================================================== the CLI corpus
# (id, argv builder taking the file table and tmp_path, text the error line must contain)

O = "--out"
CALIBRATE = [
    ("prompts-missing", lambda f, t: ["--prompts", str(t / "missing.txt")], "missing.txt"),
    ("prompts-empty", lambda f, t: ["--prompts", str(f["p_empty"])], "empty.txt"),
    ("prompts-binary-txt", lambda f, t: ["--prompts", str(f["p_bin_txt"])], "bin.txt"),
    ("prompts-nul-txt", lambda f, t: ["--prompts", str(f["p_nul_txt"])], "nul.txt is not UTF-8 text (binary?)"),
    ("prompts-binary-csv", lambda f, t: ["--prompts", str(f["p_bin_csv"])], "bin.csv"),
    ("prompts-truncated-json", lambda f, t: ["--prompts", str(f["p_trunc_json"])], "trunc.json"),
    ("prompts-json-wrong-types", lambda f, t: ["--prompts", str(f["p_type_json"])], "type.json"),
    ("prompts-json-annotations-int", lambda f, t: ["--prompts", str(f["p_ann_json"])], "ann.json"),
    ("prompts-json-number", lambda f, t: ["--prompts", str(f["p_num_json"])], "num.json"),
    ("prompts-bad-yaml", lambda f, t: ["--prompts", str(f["p_bad_yaml"])], "bad.yaml"),
    ("prompts-scalar-yaml", lambda f, t: ["--prompts", str(f["p_scalar_yaml"])], "scalar.yaml"),
    ("prompts-binary-yaml", lambda f, t: ["--prompts", str(f["p_bin_yaml"])], "bin.yaml"),
    ("prompts-dir", lambda f, t: ["--prompts", str(f["p_dir"])], "adir"),
    ("prompts-too-few", lambda f, t: ["--prompts", str(f["p_three"]), "--n-prompts", "5"], "holds 3 prompts"),
    ("testbed-prompts-repeat", lambda f, t: ["--n-prompts", "30", "--n-validation", "96"], "120 distinct prompts"),
    ("model-unknown", lambda f, t: ["--model", "no-such-model"], "no-such-model"),
    ("model-dir-no-prompts", lambda f, t: ["--model", str(f["empty_dir"])], "--prompts"),
    ("spec-unknown-bits", lambda f, t: ["--spec", "w4a99"], "w4a99"),
    ("spec-banana", lambda f, t: ["--spec", "banana"], "banana"),
    ("spec-empty", lambda f, t: ["--spec", ""], "spec"),
    ("device-cuda", lambda f, t: ["--device", "cuda"], "cuda"),
    ("device-cuda-7", lambda f, t: ["--device", "cuda:7"], "cuda:7"),
    ("device-banana", lambda f, t: ["--device", "banana"], "banana"),
    ("device-mps", lambda f, t: ["--device", "mps"], "mps"),
    ("out-under-file", lambda f, t: [O, str(f["a_file"] / "sub")], "file.txt is a file, not a directory"),
    ("out-is-file", lambda f, t: [O, str(f["a_file"])], "file.txt"),
    ("grid-range-zero", lambda f, t: ["--grid-range", "0,1.2"], "grid-range"),
    ("grid-range-reversed", lambda f, t: ["--grid-range", "1.2,0.8"], "1.2,0.8"),
    ("grid-range-nan", lambda f, t: ["--grid-range", "nan,1.2"], "nan"),
    ("grid-range-inf", lambda f, t: ["--grid-range", "0.8,inf"], "inf"),
    ("grid-range-words", lambda f, t: ["--grid-range", "low,high"], "low,high"),
    ("grid-range-huge", lambda f, t: ["--grid-range", "0.8,1e30"], "<= 10"),
    ("study-name-empty", lambda f, t: ["--study-name", " "], "--study-name is empty"),
    ("model-empty", lambda f, t: ["--model", ""], "--model is empty"),
    ("parametrization-unknown", lambda f, t: ["--parametrization", "cubic"], "also takes auto"),
    ("grid-range-one", lambda f, t: ["--grid-range", "0.9"], "0.9"),
    ("grid-points-zero", lambda f, t: ["--grid-points", "0", "--strategy", "grid"], "grid-points"),
    ("parametrization", lambda f, t: ["--parametrization", "cubic"], "cubic"),
    ("strategy", lambda f, t: ["--strategy", "random"], "random"),
    ("sampler", lambda f, t: ["--sampler", "banana"], "banana"),
    ("seeds-words", lambda f, t: ["--seeds", "a,b"], "a,b"),
    ("seeds-empty", lambda f, t: ["--seeds", ","], "--seeds"),
    ("seeds-float", lambda f, t: ["--seeds", "1.5"], "1.5"),
    ("validation-seeds", lambda f, t: ["--validation-seeds", "x"], "--validation-seeds"),
    ("seeds-negative", lambda f, t: ["--seeds", "-1", "--n-prompts", "2", "--n-validation", "0"], "seed -1"),
    ("seeds-huge", lambda f, t: ["--seeds", str(10**20), "--n-prompts", "2", "--n-validation", "0"], str(10**20)),
    ("n-validation-1", lambda f, t: ["--n-validation", "1"], "--n-validation"),
    ("n-validation-negative", lambda f, t: ["--n-validation", "-3"], "-3"),
    ("n-prompts-0", lambda f, t: ["--n-prompts", "0"], "--n-prompts"),
    ("k-nan", lambda f, t: ["--k", "nan"], "nan"),
    ("k-inf", lambda f, t: ["--k", "inf"], "inf"),
    ("k-negative", lambda f, t: ["--k", "-1"], "-1"),
    ("steps-0", lambda f, t: ["--steps", "0"], "--steps"),
    ("steps-1000", lambda f, t: ["--steps", "1000"], "at most 50"),
    ("steps-51", lambda f, t: ["--steps", "51"], "--steps 51: the model's LCMScheduler samples in at most 50"),
    ("trials-0", lambda f, t: ["--trials", "0"], "--trials"),
    ("guidance-nan", lambda f, t: ["--guidance-scale", "nan"], "nan"),
    ("guidance-inf", lambda f, t: ["--guidance-scale", "inf"], "inf"),
    ("storage-scheme", lambda f, t: ["--storage", "notaurl://x"], "notaurl"),
    ("storage-journal", lambda f, t: ["--storage", "study.log"], "study.log"),
    ("storage-no-driver", lambda f, t: ["--storage", "postgresql://u@h/db"], "driver"),
    ("grid-too-big", lambda f, t: ["--strategy", "grid", "--parametrization", "per-step", "--grid-points", "50",
                                   "--n-prompts", "2", "--n-validation", "0"], "candidates"),
]

GENERATE = [
    ("prompt-empty", lambda f, t: [""], "prompt"),
    ("prompt-blank", lambda f, t: ["   "], "prompt"),
    ("coeff-negative", lambda f, t: ["a bag", "--model-coeff", "0.9,-1"], "-1"),
    ("coeff-nan", lambda f, t: ["a bag", "--model-coeff", "nan,1"], "nan"),
    ("coeff-inf", lambda f, t: ["a bag", "--model-coeff", "1,inf"], "inf"),
    ("coeff-words", lambda f, t: ["a bag", "--model-coeff", "a,b"], "a,b"),
    ("coeff-lengths", lambda f, t: ["a bag", "--model-coeff", "1,1", "--sample-coeff", "1"], "same length"),
    ("coeff-empty-entry", lambda f, t: ["a bag", "--model-coeff", "1,,1,1"], "empty entry (entry 2 of '1,,1,1')"),
    ("sample-coeff-zero", lambda f, t: ["a bag", "--model-coeff", "1,1", "--sample-coeff", "0,1"], "0"),
    ("model-coeff-huge", lambda f, t: ["a bag", "--model-coeff", "1e30,1", "--sample-coeff", "1,1"], "<= 10"),
    ("schedule-missing", lambda f, t: ["a bag", "--schedule", str(t / "nope")], "nope"),
    ("schedule-and-coeff", lambda f, t: ["a bag", "--schedule", str(f["calib"]), "--model-coeff", "1"], "either"),
    ("sched-cfg-truncated", lambda f, t: ["a bag", "--schedule", str(f["trunc_sched_cfg"])], "scheduler_config.json"),
    ("sched-cfg-binary", lambda f, t: ["a bag", "--schedule", str(f["bin_sched_cfg"])], "scheduler_config.json"),
    ("sched-cfg-wrong-types", lambda f, t: ["a bag", "--schedule", str(f["type_sched_cfg"])],
     "s_type/scheduler_config.json"),
    ("schedules-truncated", lambda f, t: ["a bag", "--schedule", str(f["trunc_sj"])], "schedules.json"),
    ("schedules-binary", lambda f, t: ["a bag", "--schedule", str(f["bin_sj"])], "schedules.json"),
    ("schedules-no-mapping", lambda f, t: ["a bag", "--schedule", str(f["nomap_sj"])], "schedules.json"),
    ("schedules-entry-int", lambda f, t: ["a bag", "--schedule", str(f["int_sj"])], "w4a8"),
    ("schedules-nan", lambda f, t: ["a bag", "--schedule", str(f["nan_sj"])],
     "nan/schedules.json: Schedule parameter model_start must be finite, > 0 and <= 10, got nan"),
    ("calib-dir-other-spec", lambda f, t: ["a bag", "--schedule", str(f["calib"]), "--spec", "w8a8"], "w8a8"),
    ("scheduler-dir-other-spec", lambda f, t: ["a bag", "--schedule", str(f["calib"] / "scheduler"), "--spec",
                                               "w8a8"], "calibrated for quantization spec 'w4a8'"),
    ("scheduler-cfg-other-spec", lambda f, t: ["a bag", "--schedule", str(f["calib"] / "scheduler" /
                                               "scheduler_config.json"), "--spec", "none"], "'w4a8'"),
    ("calib-dir-full-precision", lambda f, t: ["a bag", "--schedule", str(f["calib"]), "--spec", "none"], "'none'"),
    ("schedule-other-steps", lambda f, t: ["a bag", "--schedule", str(f["calib"]), "--steps", "3"], "3"),
    ("schedule-dir-empty", lambda f, t: ["a bag", "--schedule", str(f["empty_dir"])], "empty"),
    ("out-existing-dir", lambda f, t: ["a bag", O, str(f["png_dir"])], "d.png is a directory"),
    ("out-not-image", lambda f, t: ["a bag", O, str(t / "x.txt")], "x.txt"),
    ("out-under-file", lambda f, t: ["a bag", O, str(f["a_file"] / "i.png")], "file.txt"),
    ("steps-1000", lambda f, t: ["a bag", "--steps", "1000"], "at most 50"),
    ("steps-0", lambda f, t: ["a bag", "--steps", "0"], "--steps"),
    ("guidance-nan", lambda f, t: ["a bag", "--guidance-scale", "nan"], "nan"),
    ("guidance-minus-inf", lambda f, t: ["a bag", "--guidance-scale", "-inf"], "-inf"),
    ("device-cuda", lambda f, t: ["a bag", "--device", "cuda"], "cuda"),
    ("seed-huge", lambda f, t: ["a bag", "--seed", str(10**20)], str(10**20)),
    ("model-truncated-safetensors", lambda f, t: ["a bag", "--model", str(f["m_trunc_st"]), "--spec", "none"],
     "m_trunc"),
    ("model-header-corrupted", lambda f, t: ["a bag", "--model", str(f["m_head_st"]), "--spec", "none"], "m_head"),
    ("model-header-length", lambda f, t: ["a bag", "--model", str(f["m_len_st"]), "--spec", "none"], "m_len"),
    ("model-index-missing-class", lambda f, t: ["a bag", "--model", str(f["m_module"]), "--spec", "none"],
     "m_module"),
    ("model-index-missing-library", lambda f, t: ["a bag", "--model", str(f["m_nolib"]), "--spec", "none"],
     "m_nolib"),
    ("model-index-truncated", lambda f, t: ["a bag", "--model", str(f["m_trunc_idx"]), "--spec", "none"],
     "model_index.json"),
    ("model-index-binary", lambda f, t: ["a bag", "--model", str(f["m_bin_idx"]), "--spec", "none"],
     "model_index.json"),
    ("model-index-list", lambda f, t: ["a bag", "--model", str(f["m_list_idx"]), "--spec", "none"],
     "model_index.json"),
    ("model-missing-component", lambda f, t: ["a bag", "--model", str(f["m_missing"]), "--spec", "none"],
     "m_missing"),
    ("model-is-a-file", lambda f, t: ["a bag", "--model", str(f["m_file"])], "weights.safetensors"),
    ("model-empty-dir", lambda f, t: ["a bag", "--model", str(f["empty_dir"])], "empty"),
]

QUANTIZE = [
    ("spec-none", lambda f, t: ["--spec", "none", O, str(t / "q")], "'none'"),
    ("spec-unknown", lambda f, t: ["--spec", "w4a99", O, str(t / "q")], "w4a99"),
    ("out-under-file", lambda f, t: [O, str(f["a_file"] / "q")], "file.txt"),
    ("device-cuda", lambda f, t: ["--device", "cuda", O, str(t / "q")], "cuda"),
    ("model-unknown", lambda f, t: ["--model", "no-such-model", O, str(t / "q")], "no-such-model"),
    ("model-corrupted", lambda f, t: ["--model", str(f["m_head_st"]), O, str(t / "q")], "m_head"),
]

EVALUATE = [
    ("prompts-missing", lambda f, t: ["--prompts", str(t / "missing.txt")], "missing.txt"),
    ("prompts-binary", lambda f, t: ["--prompts", str(f["p_bin_txt"])], "bin.txt"),
    ("prompts-truncated-json", lambda f, t: ["--prompts", str(f["p_trunc_json"])], "trunc.json"),
    ("n-images-0", lambda f, t: ["--n-images", "0"], "--n-images"),
    ("batch-size-0", lambda f, t: ["--batch-size", "0"], "--batch-size"),
    ("steps-1000", lambda f, t: ["--steps", "1000"], "at most 50"),
    ("schedule-truncated", lambda f, t: ["--schedule", str(f["trunc_sj"])], "schedules.json"),
    ("schedule-other-spec", lambda f, t: ["--schedule", str(f["calib"] / "scheduler"), "--spec", "w8a8"], "w4a8"),
    ("fp-schedule-quantized", lambda f, t: ["--fp-schedule", str(f["calib"])], "'none'"),
    ("metrics-unknown", lambda f, t: ["--metrics", "banana", "--n-images", "1"], "banana"),
    ("metrics-empty", lambda f, t: ["--metrics", " , "], "--metrics is empty"),
    ("spec-none", lambda f, t: ["--spec", "none"], "--spec must be a quantization spec"),
    ("real-model-no-prompts", lambda f, t: ["--model", "lcm-sd15"], "--prompts is needed"),
    ("device-cuda", lambda f, t: ["--device", "cuda"], "cuda"),
    ("out-under-file", lambda f, t: [O, str(f["a_file"] / "ev")], "file.txt"),
    ("spec-banana", lambda f, t: ["--spec", "banana"], "banana"),
    ("seed-negative", lambda f, t: ["--seed", "-5", "--n-images", "1", "--metrics", ""], "seed -5"),
]

REPORT = [
    ("nothing", lambda f, t: [], "--calibration"),
    ("calibration-missing", lambda f, t: ["--calibration", str(t / "nothing")], "nothing"),
    ("calibration-no-json", lambda f, t: ["--calibration", str(f["empty_dir"])], "empty"),
    ("calibration-truncated", lambda f, t: ["--calibration", str(f["trunc_cal"])], "calibration.json"),
    ("calibration-binary", lambda f, t: ["--calibration", str(f["bin_cal"])], "calibration.json"),
    ("calibration-wrong-types", lambda f, t: ["--calibration", str(f["type_cal"])], "trials"),
    ("calibration-list", lambda f, t: ["--calibration", str(f["list_cal"])], "calibration.json"),
    ("calibration-empty-file", lambda f, t: ["--calibration", str(f["empty_cal"])], "calibration.json"),
    ("evaluation-missing", lambda f, t: ["--evaluation", str(t / "ev.json")], "ev.json"),
    ("evaluation-truncated", lambda f, t: ["--evaluation", str(f["trunc_ev"])], "ev_trunc.json"),
    ("evaluation-binary", lambda f, t: ["--evaluation", str(f["bin_ev"])], "ev_bin.json"),
    ("evaluation-wrong-types", lambda f, t: ["--evaluation", str(f["type_ev"])], "ev_type.json"),
    ("evaluation-empty-object", lambda f, t: ["--evaluation", str(f["empty_obj_ev"])], "ev_obj.json"),
    ("evaluation-string", lambda f, t: ["--evaluation", str(f["str_ev"])], "ev_str.json"),
    ("out-under-file", lambda f, t: ["--evaluation", str(f["good_ev"]), O, str(f["a_file"] / "r")], "file.txt"),
]

BENCH = [
    ("jobs-0", lambda f, t: ["--jobs", "0"], "--jobs"),
    ("fid-rows", lambda f, t: ["--fid-rows", "fp32:banana"], "fp32:banana"),
    ("threads-0", lambda f, t: ["--threads", "0"], "threads"),
    ("eval-images-0", lambda f, t: ["--eval-images", "0"], "eval_images"),
    ("calib-trials-0", lambda f, t: ["--calib-trials", "0"], "calib_trials"),
    ("sd15-mode", lambda f, t: ["--sd15", "maybe"], "maybe"),
    ("default-specs", lambda f, t: ["--default-specs", "w9a9"], "w9a9"),
    ("fid-images-0", lambda f, t: ["--fid-images", "0"], "fid_images"),
    ("out-under-file", lambda f, t: ["--quick", O, str(f["a_file"] / "B.md"), "--work", str(t / "w")],
     "file.txt"),
    ("out-is-dir", lambda f, t: ["--quick", O, str(t), "--work", str(t / "w")], "is a directory"),
]


def test_bench_checks_out_before_running_and_quick_keeps_the_published_file(tmp_path, monkeypatch):
    import qsched.bench.driver as driver

    calls = []
    monkeypatch.setattr(driver, "run_bench", lambda s, env, out, **kw: calls.append(out) or {})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    r = runner.invoke(cli.app, ["bench", "--quick", O, str(tmp_path / "file.txt" / "B.md")])
    assert "file.txt" in _error_line(r) and calls == []  # refused before the benchmark ran
    r = runner.invoke(cli.app, ["bench", "--quick"])
    assert r.exit_code == 0, r.output
    assert calls == [Path("runs/bench-quick/BENCHMARKS.md")]  # not ./BENCHMARKS.md

CLI_CASES = [(cmd, *c) for cmd, cases in (("calibrate", CALIBRATE), ("generate", GENERATE), ("quantize", QUANTIZE),
                                          ("evaluate", EVALUATE), ("report", REPORT), ("bench", BENCH))
             for c in cases]


@pytest.mark.parametrize("cmd,case,argv,needle", CLI_CASES, ids=[f"{c[0]}-{c[1]}" for c in CLI_CASES])
def test_cli_bad_input_is_one_error_line(cmd, case, argv, needle, F, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [cmd, *argv(F, tmp_path)]
    if cmd in ("calibrate", "evaluate") and O not in args:
        args += [O, str(tmp_path / "out")]
    if cmd in ("calibrate", "evaluate"):
        args.append("--no-progress")
    if cmd == "generate" and O not in args:
        args += [O, str(tmp_path / "i.png")]
    r = runner.invoke(cli.app, args)
    line = _error_line(r)
    assert needle in line, (args, line)
    if cmd in ("calibrate", "evaluate"):  # refused input leaves no empty output directory behind
        assert not (tmp_path / "out").exists() or any((tmp_path / "out").iterdir()), (args, line)


# ============================================================================================== Python entry points


def _api_cases():
    from qsched.schedule import Schedule

    nan, inf = float("nan"), float("inf")
    return [
        ("schedule-linear-nan", lambda f, p: Schedule.linear(nan, 1.0, 4), QSchedError, "nan"),
        ("schedule-linear-inf", lambda f, p: Schedule.linear(1.0, inf, 4), QSchedError, "inf"),
        ("schedule-ramp-zero", lambda f, p: Schedule.ramp(0.0, 1, 1, 1, 4), QSchedError, "0.0"),
        ("schedule-per-step-lengths", lambda f, p: Schedule.per_step([1.0], [1.0, 1.0]), QSchedError, "same length"),
        ("schedule-steps-0", lambda f, p: Schedule.identity(0), QSchedError, "0"),
        ("schedule-steps-float", lambda f, p: Schedule.identity(2.5), QSchedError, "2.5"),
        ("schedule-kind", lambda f, p: Schedule.from_params("cubic", {}, 2), QSchedError, "cubic"),
        ("schedule-params-missing", lambda f, p: Schedule.from_params("ramp", {"model_start": 1}, 2), QSchedError,
         "model_end"),
        ("schedule-from-dict-list-params", lambda f, p: Schedule.from_dict({"kind": "linear", "steps": 2,
                                                                            "params": [1, 2]}), QSchedError, "params"),
        ("schedule-from-dict-number-vector", lambda f, p: Schedule.from_dict(
            {"kind": "identity", "steps": 2, "params": {}, "model_coeff": 5}), QSchedError, "5"),
        ("schedule-from-dict-not-dict", lambda f, p: Schedule.from_dict([1, 2]), QSchedError, "[1, 2]"),
        ("schedule-param-string", lambda f, p: Schedule.linear("big", 1, 2), QSchedError, "big"),
        ("load-schedule-missing", lambda f, p: __import__("qsched.schedule").schedule.load_schedule(
            f["d"] / "nope"), FileNotFoundError, "nope"),
        ("load-schedule-truncated", lambda f, p: __import__("qsched.schedule").schedule.load_schedule(
            f["trunc_sj"], spec="w4a8"), CorruptFileError, "schedules.json"),
        ("load-schedule-binary-cfg", lambda f, p: __import__("qsched.schedule").schedule.load_schedule(
            f["bin_sched_cfg"]), CorruptFileError, "scheduler_config.json"),
        ("load-schedule-other-spec", lambda f, p: __import__("qsched.schedule").schedule.load_schedule(
            f["calib"] / "scheduler", spec="w8a8"), QSchedError, "w4a8"),
        ("load-schedule-other-steps", lambda f, p: __import__("qsched.schedule").schedule.load_schedule(
            f["calib"], spec="w4a8", steps=4), QSchedError, "4"),
        ("quantspec-bits", lambda f, p: _quantspec("w4a99"), QSchedError, "w4a99"),
        ("quantspec-empty", lambda f, p: _quantspec(""), QSchedError, "''"),
        ("quantspec-words", lambda f, p: _quantspec("four bits"), QSchedError, "four bits"),
        ("quantize-spec", lambda f, p: __import__("qsched.quantization").quantization.quantize(
            copy.deepcopy(p.unet), "w3a3x"), QSchedError, "w3a3x"),
        ("load-pipeline-unknown", lambda f, p: _load_pipeline("no-such-model"), QSchedError, "no-such-model"),
        ("load-pipeline-corrupted", lambda f, p: _load_pipeline(f["m_head_st"]), CorruptFileError, "m_head"),
        ("load-pipeline-index", lambda f, p: _load_pipeline(f["m_trunc_idx"]), CorruptFileError, "model_index.json"),
        ("load-pipeline-dtype", lambda f, p: _load_pipeline("testbed", dtype="float8"), QSchedError, "float8"),
        ("load-prompts-binary", lambda f, p: _load_prompts(f["p_bin_txt"]), CorruptFileError, "bin.txt"),
        ("load-prompts-yaml", lambda f, p: _load_prompts(f["p_bad_yaml"]), CorruptFileError, "bad.yaml"),
        ("load-prompts-n", lambda f, p: _load_prompts("testbed-calib", n=0), QSchedError, "0"),
        ("calibrate-no-prompts", lambda f, p: _calibrate(p, []), QSchedError, "prompt"),
        ("calibrate-guidance-nan", lambda f, p: _calibrate(p, ["a", "b"], guidance_scale=nan), QSchedError, "nan"),
        ("calibrate-steps-1000", lambda f, p: _calibrate(p, ["a", "b"], steps=1000), QSchedError, "at most 50"),
        ("calibrate-grid-range-nan", lambda f, p: _calibrate(p, ["a", "b"], grid_range=(nan, 1.2)), QSchedError,
         "nan"),
        ("calibrate-sampler", lambda f, p: _calibrate(p, ["a", "b"], sampler="random"), QSchedError, "random"),
        ("calibrate-load-binary", lambda f, p: _calib_load(f["bin_cal"]), CorruptFileError, "calibration.json"),
        ("evaluate-n-images", lambda f, p: _evaluate(p, n_images=0), QSchedError, "0"),
        ("evaluate-configs", lambda f, p: _evaluate(p, configs=["fp-bogus"]), QSchedError, "fp-bogus"),
        ("evaluate-guidance-inf", lambda f, p: _evaluate(p, call_kwargs={"guidance_scale": inf}), QSchedError,
         "inf"),
        ("evalresult-truncated", lambda f, p: _eval_load(f["trunc_ev"]), CorruptFileError, "ev_trunc.json"),
        ("evalresult-wrong-types", lambda f, p: _eval_load(f["type_ev"]), CorruptFileError, "rows"),
        ("generate-guidance-nan", lambda f, p: __import__("qsched.runner").runner.generate(
            p, ["a bag"], 2, call_kwargs={"guidance_scale": nan}), QSchedError, "nan"),
    ]


def _quantspec(s):
    from qsched.quantization import QuantSpec

    return QuantSpec.parse(s)


def _load_pipeline(name, **kw):
    from qsched.pipelines import load_pipeline

    return load_pipeline(str(name), **kw)


def _load_prompts(src, **kw):
    from qsched.prompts import load_prompts

    return load_prompts(str(src), **kw)


def _calibrate(pipe, prompts, steps=2, **kw):
    from qsched.calibrate import calibrate

    return calibrate(pipe, prompts, steps, jaq=fake_jaq(), n_trials=2, progress=False, **kw)


def _calib_load(d):
    from qsched.calibrate import CalibrationResult

    return CalibrationResult.load(d)


def _evaluate(pipe, **kw):
    from qsched.evaluate import evaluate

    return evaluate("testbed", steps=2, n_images=kw.pop("n_images", 1), metrics=[], pipe_loader=lambda: pipe,
                    progress=False, **kw)


def _eval_load(p):
    from qsched.evaluate import EvalResult

    return EvalResult.from_json(p)


API_CASES = _api_cases()


@pytest.mark.parametrize("case,call,exc,needle", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_documented_type(case, call, exc, needle, F, base_pipe):
    with pytest.raises(exc) as info:
        call(F, base_pipe)
    # every one is qsched.QSchedError, as the README says (a ValueError, so catchable as before), or a missing file
    assert isinstance(info.value, QSchedError) or exc is FileNotFoundError
    msg = str(info.value)
    assert needle in msg and "\n" not in msg.strip(), msg


def test_corpus_size():
    assert len(CLI_CASES) + len(API_CASES) >= 80
    assert {c[0] for c in CLI_CASES} == {"calibrate", "generate", "quantize", "evaluate", "report", "bench"}


# ============================================================================================== faults


def _enospc_after(monkeypatch, nbytes: int = 16384, match: str = ""):
    """Make writes through os.fdopen (write_atomic's) fail with ENOSPC after ``nbytes`` bytes, like a full disk."""
    real = os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh, self.n = fh, 0

        def write(self, b):
            if self.n + len(b) > nbytes:
                self.fh.write(b[: max(0, nbytes - self.n)])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.n += len(b)
            return self.fh.write(b)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def fdopen(fd, *a, **kw):
        fh = real(fd, *a, **kw)
        return Full(fh) if match in os.readlink(f"/proc/self/fd/{fd}") else fh

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_full_disk_while_writing_the_report_keeps_the_old_one(F, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    r = runner.invoke(cli.app, ["report", "--calibration", str(F["calib"]), O, str(out)])
    assert r.exit_code == 0, r.output
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before["report.html"]) > 16384  # so that a truncated write would show
    _enospc_after(monkeypatch, 16384, match="report.html")
    r = runner.invoke(cli.app, ["report", "--calibration", str(F["calib"]), O, str(out), "--title", "other"])
    line = _error_line(r)
    assert "report.html" in line and "No space left" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old report intact, no temporary files


def test_full_disk_writing_the_image(tiny, tmp_path, monkeypatch):
    _enospc_after(monkeypatch, 10, match="i.png")
    r = runner.invoke(cli.app, ["generate", "a bag", "--steps", "2", O, str(tmp_path / "i.png")])
    assert "i.png" in _error_line(r)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_mid_search_is_one_line_and_the_study_continues(tiny, tmp_path, monkeypatch):
    """SQLite's "database or disk is full" while Optuna stores a trial (Optuna then raises "AssertionError:
    Should not reach."): one error line; completed trials are kept and the same command continues."""
    import optuna
    from sqlalchemy.exc import OperationalError

    real = optuna.storages.RDBStorage.set_trial_state_values
    calls = {"n": 0}

    def full(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OperationalError("UPDATE trials", {}, Exception("database or disk is full"))
        return real(self, *a, **kw)

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", full)
    out = tmp_path / "c"
    args = ["calibrate", "--steps", "2", "--n-prompts", "2", "--n-validation", "0", "--parametrization", "linear",
            "--trials", "4", O, str(out), "--no-progress"]
    line = _error_line(runner.invoke(cli.app, args))
    assert "disk is full" in line and "study" in line
    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", real)
    r = runner.invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    assert "continued the stored study" in r.output
    data = json.loads((out / "calibration.json").read_text())
    assert sum(t["state"] == "COMPLETE" for t in data["trials"]) == 4


def test_keyboard_interrupt_and_sigterm_in_process_exit_130(tiny, tmp_path, monkeypatch):
    import importlib

    ev_mod = importlib.import_module("qsched.evaluate")  # the module (qsched.evaluate is the function)

    def interrupted(**kw):
        raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(ev_mod, "evaluate", interrupted)
    r = runner.invoke(cli.app, ["evaluate", O, str(tmp_path / "e"), "--no-progress"])
    assert r.exit_code == 130 and "interrupted" in r.stderr and "same command" in r.stderr
    assert "Traceback" not in r.output

    def terminated(**kw):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered as KeyboardInterrupt inside a command
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(ev_mod, "evaluate", terminated)
    r = runner.invoke(cli.app, ["evaluate", O, str(tmp_path / "e"), "--no-progress"])
    assert r.exit_code == 130 and "SIGTERM" in r.stderr, r.output
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored


def test_signal_during_a_write_is_held_until_the_write_is_done(tmp_path, monkeypatch):
    from qsched._util import write_atomic

    target = tmp_path / "x.json"
    real = os.fsync

    def fsync_then_signalled(fd):  # Ctrl-C arrives while the temporary file is open, inside write_atomic
        os.kill(os.getpid(), signal.SIGINT)
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync_then_signalled)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a `&` job ignores SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            write_atomic(target, b"{}" * 1000)
    finally:
        signal.signal(signal.SIGINT, old)
    assert target.read_bytes() == b"{}" * 1000  # finished, then interrupted
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def _worker(args, slow: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           "QSCHED_WORKER_SLOW": str(slow), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(HERE / "cli_worker.py"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _signal_after(proc: subprocess.Popen, n_scored: int, sig: int) -> tuple[str, str]:
    seen = 0
    for line in proc.stdout:
        if line.startswith("scored"):
            seen += 1
            if seen == n_scored:
                proc.send_signal(sig)
                break
    out, err = proc.communicate(timeout=120)
    return out, err


def test_sigint_then_sigterm_during_calibrate_then_resume(tmp_path):
    """Real processes: Ctrl-C after the first trials, then the same command (which continues the stored study)
    stopped by SIGTERM. Each stop exits 130 with the command that resumes; the study stays consistent: no trial
    left running, the first run's trials kept as they were, the second run's added to them."""
    import optuna

    out = tmp_path / "c"
    args = ["calibrate", "--steps", "2", "--n-prompts", "2", "--n-validation", "0", "--parametrization", "linear",
            "--trials", "20", O, str(out), "--no-progress"]
    runs = []
    for sig, name in ((signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")):
        p = _worker(args, slow=0.3)
        _, err = _signal_after(p, 2, sig)
        assert p.returncode == 130, err
        assert "Traceback" not in err and "interrupted" in err and name in err, err
        assert "qsched calibrate" in err and str(out) in err  # the command that resumes
        assert "Loading weights" not in err and "it/s" not in err  # not a terminal: no third-party bars
        assert not any(out.glob("**/*.tmp"))
        study = optuna.load_study(study_name="qsched-w4a8-linear-optuna-2steps",
                                  storage=f"sqlite:///{out / 'study.db'}")
        assert not [t for t in study.trials if t.state.name == "RUNNING"]
        runs.append([(t.number, t.params) for t in study.trials if t.state.name == "COMPLETE"])
    first, second = runs
    assert len(first) >= 1 and second[:len(first)] == first and len(second) > len(first)


# ============================================================================================== warnings, quiet


def test_truncated_prompt_warns_once_in_one_line(tiny, tmp_path):
    long_prompt = "a bag " + "very " * 20_000 + "long"
    r = runner.invoke(cli.app, ["generate", long_prompt, "--steps", "2", O, str(tmp_path / "i.png")])
    assert r.exit_code == 0, r.output
    warns = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1 and "truncated" in warns[0] and "16 tokens" in warns[0] and "100,010" in warns[0], warns


def test_stored_study_with_more_trials_than_asked_warns(tiny, tmp_path):
    out = tmp_path / "c"
    base = ["calibrate", "--steps", "2", "--n-prompts", "2", "--n-validation", "0", "--parametrization", "linear",
            O, str(out), "--no-progress"]
    assert runner.invoke(cli.app, [*base, "--trials", "4"]).exit_code == 0
    r = runner.invoke(cli.app, [*base, "--trials", "2"])
    assert r.exit_code == 0, r.output
    warns = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1 and "4 completed trials" in warns[0] and "2 asked" in warns[0], r.stderr


def test_no_progress_silences_third_party_bars(capfd, monkeypatch):
    from qsched.testbed.text import load_minilm

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    tlog.enable_progress_bar()
    load_minilm("cpu")
    assert "Loading weights" in capfd.readouterr().err  # the bar the issue saw
    cli._quiet_third_party(progress=False)
    try:
        load_minilm("cpu")
        assert "Loading weights" not in capfd.readouterr().err
        assert not tlog.is_progress_bar_enabled() and not dlog.is_progress_bar_enabled()
    finally:
        tlog.enable_progress_bar()
        dlog.enable_progress_bar()
        os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)


def test_writers_leave_no_temporary_files(F):
    assert not [p for p in F["calib"].rglob("*") if p.name.endswith(".tmp")]
    assert (F["calib"] / "scheduler" / "qsched_schedule.json").exists()
    assert math.isfinite(json.loads((F["calib"] / "calibration.json").read_text())["best"]["jaq"])



def test_interruptible_lets_signals_through_only_inside(monkeypatch):
    """Inside deferred_interrupts a signal waits; inside interruptible() (the scoring) it is delivered at once."""
    from qsched.interrupts import deferred_interrupts, interruptible

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    seen = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                seen.append("held")  # still running: the signal waits
                with interruptible():
                    seen.append("never")  # the held signal is delivered on entry
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupts():
                with interruptible():
                    os.kill(os.getpid(), signal.SIGINT)
                    for _ in range(1000):
                        pass
                    seen.append("never")
    finally:
        signal.signal(signal.SIGINT, old)
    assert seen == ["held"]

"""train_student's multi-step fine-tune options: --aux-t-max, --slow-ema, --export-net."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qsched.testbed import train_student


def test_slow_ema_is_checkpointed_and_exported_on_request(tmp_path):
    common = ["--limit", "64", "--batch-size", "4", "--log-every", "1", "--threads", "1", "--prediction-type",
              "v_prediction", "--teacher", "qsched/testbed/weights/teacher.safetensors",
              "--init", "qsched/testbed/weights/student.safetensors", "--aux-denoise", "1.0", "--aux-t-max", "500",
              "--slow-ema", "0.9", "--steps", "2", "--work", str(tmp_path / "run")]
    train_student.main([*common, "--out", str(tmp_path / "t")])
    ck = load_file(str(tmp_path / "run" / "ckpt.safetensors"))
    phase = json.loads((tmp_path / "run" / "ckpt.json").read_text())["phases"][-1]
    assert phase["aux_t_max"] == 500 and phase["slow_ema"] == 0.9
    # resuming at the last step exports again without training: target by default, slow EMA on request
    train_student.main([*common, "--out", str(tmp_path / "s"), "--export-net", "slow_ema"])
    for out, prefix in (("t", "target."), ("s", "slow_ema.")):
        exported = load_file(str(tmp_path / out / "student.safetensors"))
        assert json.loads((tmp_path / out / "student.json").read_text())["train"]["exported"] == prefix[:-1]
        for k, v in exported.items():
            assert torch.equal(v, ck[prefix + k].half()), k
    assert not all(torch.equal(ck["target." + k], ck["slow_ema." + k]) for k in exported)


@pytest.mark.parametrize("argv", [["--aux-t-max", "0"], ["--aux-t-max", "1001"], ["--slow-ema", "1.0"],
                                  ["--export-net", "slow_ema"]])
def test_bad_finetune_options_are_rejected(argv):
    with pytest.raises(SystemExit):
        train_student.parse_args(argv)

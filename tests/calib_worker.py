"""A calibration worker process for the reproducibility tests: tiny W4A8 pipeline, cheap stand-in JAQ.

    python tests/calib_worker.py OUT [--storage URL] [--trials N] [--kill-at K] [--slow S]

``--kill-at K`` SIGKILLs the process during its K-th scoring (no cleanup, like ``kill -9``); ``--slow`` sleeps
per scoring so that two workers overlap. Prints the result's trial params as JSON on success.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakes import BrightTC, ContrastIQ  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--storage")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--slow", type=float, default=0.0)
    a = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from qsched.calibrate import calibrate
    from qsched.quantization import quantize
    from qsched.scoring import JAQ
    from qsched.testing import tiny_pipeline

    calls = {"n": 0}

    class Scorer(BrightTC):
        def __call__(self, images, prompts):
            calls["n"] += 1
            if a.kill_at and calls["n"] == a.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(a.slow)
            return super().__call__(images, prompts)

    pipe = tiny_pipeline("pcm")
    pipe.set_progress_bar_config(disable=True)
    quantize(pipe, "w4a8")
    res = calibrate(pipe, ["a bag", "a red coat"], 2, jaq=JAQ(Scorer(), ContrastIQ()), parametrization="linear",
                    n_trials=a.trials, storage=a.storage, study_name="w" if a.storage else None, out_dir=a.out,
                    progress=False, call_kwargs={"height": 32, "width": 32, "guidance_scale": 0.0})
    print(json.dumps({"schedule": res.schedule.to_dict(), "best": res.best["jaq"],
                      "trials": [[t["state"], t["params"]] for t in res.trials]}))


if __name__ == "__main__":
    main()

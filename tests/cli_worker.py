"""Run the real ``qsched`` CLI in its own process on the tiny testbed pipeline with cheap stand-in scorers.

    python tests/cli_worker.py calibrate --out DIR ...      (any qsched command line)

The pipeline loads inside the command (as the real loader does), so third-party progress bars would show on
stderr unless the CLI silences them. For the signal tests: every scoring prints ``scored N`` on stdout (flushed) and sleeps ``QSCHED_WORKER_SLOW``
seconds, so that a test can send SIGINT/SIGTERM in the middle of a search.
"""

from __future__ import annotations

import copy
import functools
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakes import BrightTC, ContrastIQ  # noqa: E402


def main() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when started from a `&` job
    import torch

    torch.set_num_threads(1)
    from qsched import cli
    from qsched.scoring import JAQ
    from qsched.testbed.pipeline import tiny_testbed_pipeline

    slow = float(os.environ.get("QSCHED_WORKER_SLOW", "0"))
    calls = {"n": 0}

    class Scorer(BrightTC):
        def __call__(self, images, prompts):
            calls["n"] += 1
            print(f"scored {calls['n']}", flush=True)
            time.sleep(slow)
            return super().__call__(images, prompts)

    base = functools.lru_cache(maxsize=1)(lambda: tiny_testbed_pipeline(seed=0))  # loaded inside the command,
    cli._load_pipeline = lambda model, device: copy.deepcopy(base())  # so its "Loading weights" bar would show
    cli._make_jaq = lambda preset, device, k: JAQ(Scorer(), ContrastIQ(), k=k)
    sys.argv = ["qsched", *sys.argv[1:]]
    cli.app()


if __name__ == "__main__":
    main()

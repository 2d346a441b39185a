"""Helper processes for tests/test_bench.py's unit-store tests (spawned: importing this module stays light)."""

import os
import time
from pathlib import Path

from qsched.bench.units import Job, UnitStore


class Quiet:
    def print(self, *a, **k):
        pass

    rule = print


def jobs(names, log, seconds, ready=None):
    """Jobs whose compute appends 'pid name' to ``log`` (one write, O_APPEND), then sleeps."""

    def compute(name):
        def run(d):
            if ready is not None:
                Path(ready).touch()
            with open(log, "a") as fh:
                fh.write(f"{os.getpid()} {name}\n")
            time.sleep(seconds)
            return {"v": name, "pid": os.getpid()}

        return run

    return [Job("k", n, {"n": n}, compute(n)) for n in names]


def share(work, names, log, seconds, ready, go, queue):
    """Announce readiness, wait for ``go``, run every job on the shared store, report what happened."""
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.01)
    store = UnitStore(work, Quiet())
    res = store.run_all(jobs(names, log, seconds))
    queue.put({"pid": os.getpid(), "results": res, "computed": store.computed, "skipped": store.skipped})


def hold(work, name, log, seconds, ready):
    """Compute one unit slowly (touching ``ready`` once its lock is held)."""
    UnitStore(work, Quiet()).run_all(jobs([name], log, seconds, ready=ready))

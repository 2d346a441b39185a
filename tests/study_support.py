"""Shared helpers for the study tests: one created testbed study per session (copied per test module)."""

from __future__ import annotations

import shutil
from pathlib import Path

from qsched.schedule import Schedule

# Distinct class accuracies on the testbed (weight bits 2 ruin the model); a w4a8 system with a schedule dir.
SYSTEMS = ["fp32:original", "w3a8:original", "w2a8:original"]
N_PROMPTS = 6
_CACHE: dict[str, Path] = {}


def master_study(base: Path) -> Path:
    """Create the shared study once (images + manifest, no votes)."""
    if "dir" not in _CACHE:
        from typer.testing import CliRunner

        from qsched.schedule import save_schedule
        from qsched.cli import app

        sched_dir = base / "calib"
        save_schedule(sched_dir, "w4a8", Schedule.linear(1.0, 0.98, 4), "testbed", 4)
        d = base / "study-master"
        # through the CLI, with the syntax: --systems A B C ...
        r = CliRunner().invoke(app, ["study", "create", str(d), "--systems", *SYSTEMS, f"w4a8:{sched_dir}",
                                     "--prompts", "testbed-heldout", "--n-prompts", str(N_PROMPTS), "--seeds", "0"])
        assert r.exit_code == 0, r.output
        assert f"{len(SYSTEMS) + 1} systems x {N_PROMPTS} images" in r.output, r.output
        _CACHE["dir"] = d
    return _CACHE["dir"]


def fresh_study(tmp_path_factory, name: str) -> Path:
    """A private copy of the shared study (its own empty vote database)."""
    src = master_study(tmp_path_factory.getbasetemp())
    dst = tmp_path_factory.mktemp(name) / "study"
    shutil.copytree(src, dst)
    return dst

"""qsched study end to end over real HTTP (uvicorn on 127.0.0.1): simulated raters, 50 concurrent raters,
clean Ctrl-C shutdown of `qsched study serve`."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from study_support import fresh_study  # noqa: E402

from qsched.study.app import create_app  # noqa: E402
from qsched.study.raters import ClassifierScorer, RandomScorer, add_raters, run_raters  # noqa: E402
from qsched.study.server import ServerThread, free_port  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return fresh_study(tmp_path_factory, "server")


def _class_accuracy(study_dir, manifest):
    import torch

    from qsched.testbed.classifier import load_classifier

    clf = load_classifier()
    acc = {}
    for s in manifest["systems"]:
        ims = [np.asarray(Image.open(study_dir / manifest["images"][s["id"]][f"{i}:0"]).convert("L"), np.float32)
               for i in range(len(manifest["prompts"]))]
        with torch.no_grad():
            pred = clf(torch.from_numpy(np.stack(ims) / 255.0)[:, None]).argmax(1).numpy()
        acc[s["name"]] = float((pred == np.asarray(manifest["labels"])).mean())
    return acc


def test_simulated_classifier_raters_rank_systems_by_class_accuracy(study):
    from typer.testing import CliRunner

    from qsched.study.cli import study_app

    app = create_app(study, seed=0)
    m = app.state.manifest
    scorer = ClassifierScorer.from_manifest(m)
    with ServerThread(app) as url:
        tokens = add_raters(url, app.state.admin_token, 3)
        summary = run_raters(url, tokens, lambda i: scorer, votes_per_rater=10_000, noise=0.02)
    n_sys = len(m["systems"])
    per_rater = len(m["prompts"]) * n_sys * (n_sys - 1) // 2
    assert summary["finished"] == 3 and summary["accepted"] == summary["sent"] == 3 * per_rater
    r = CliRunner().invoke(study_app, ["results", str(study), "--n-boot", "100"])
    assert r.exit_code == 0, r.output
    import json

    res = json.loads((study / "results" / "results.json").read_text())
    assert res["n_votes"] == 3 * per_rater and (study / "results" / "results.html").exists()
    elo = {row["system"]: row["elo"] for row in res["bradley_terry"]}
    acc = _class_accuracy(study, m)
    # every pair of systems whose class accuracy differs clearly is ordered the same way by the raters' Elo
    checked = 0
    for a in acc:
        for b in acc:
            if acc[a] - acc[b] >= 0.3:
                assert elo[a] > elo[b], (acc, elo)
                checked += 1
    assert checked >= 2, acc


def test_fifty_concurrent_raters_lose_no_vote_and_record_none_twice(study, capsys):
    app = create_app(study, seed=3)
    store = app.state.store
    before = store.n_votes()
    n_raters, per = 50, 4
    with ServerThread(app) as url:
        tokens = add_raters(url, app.state.admin_token, n_raters)
        s = run_raters(url, tokens, lambda i: RandomScorer(i), votes_per_rater=per, replay=True)
    stored = store.n_votes() - before
    rows = store.query("SELECT pair_id, rater FROM votes")
    dup = len(rows) - len({r["pair_id"] for r in rows})
    assert s["sent"] == s["accepted"] == stored == n_raters * per and not s["errors"]
    assert dup == 0 and s["replays_sent"] == s["replays_rejected"] == n_raters * per
    comps = store.query("SELECT rater, prompt, seed, sys_a, sys_b FROM pairs")
    assert len(comps) == len({tuple(r) for r in comps})
    per_rater = Counter(r["rater"] for r in store.query("SELECT rater FROM votes WHERE rater IN "
                                                        "(SELECT name FROM raters ORDER BY created_at DESC LIMIT 50)"))
    assert set(per_rater.values()) == {per}
    with capsys.disabled():
        print(f"\n[study concurrency] raters={n_raters} votes sent={s['sent']} stored={stored} duplicates={dup} "
              f"replays rejected={s['replays_rejected']}/{s['replays_sent']} wall={s['wall_s']:.2f}s")


def test_serve_stops_cleanly_on_ctrl_c_and_keeps_votes(study):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-u", "-m", "qsched.study.cli", "serve", str(study), "--port", str(port),
                             "--raters", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        tokens = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line or line.startswith("results:"):
                break
            if line.startswith("rater "):
                tokens += re.findall(r"\?token=([\w-]+)", line)
        assert tokens, "serve printed no rater link"
        token = tokens[-1]  # the rater --raters 1 just created (earlier tests' raters are listed first)
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        h = {"X-Rater-Token": token}
        j = httpx.get(f"{url}/api/next", headers=h, timeout=10).json()
        assert httpx.post(f"{url}/api/vote", headers=h, json={"pair_id": j["pair_id"], "answer": "both_bad"},
                          timeout=10).status_code == 200
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "stopped;" in out
    con = sqlite3.connect(study / "votes.sqlite")
    assert con.execute("SELECT answer FROM votes WHERE pair_id=?", (j["pair_id"],)).fetchone() == ("both_bad",)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()

"""qsched study: creation, vote store, pair scheduling and the HTTP API's safety rules (FastAPI TestClient)."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("evalica")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from study_support import N_PROMPTS, SYSTEMS, fresh_study  # noqa: E402

from qsched.study.app import create_app  # noqa: E402
from qsched.study.create import StudyError, create_study, load_manifest, parse_system  # noqa: E402
from qsched.study.store import Store  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return fresh_study(tmp_path_factory, "api")


def _client(study_dir, seed=0):
    app = create_app(study_dir, seed=seed)
    return app, TestClient(app)


def _rater(client, app, name=None):
    r = client.post("/api/admin/raters", headers={"X-Admin-Token": app.state.admin_token},
                    json={"name": name} if name else None)
    assert r.status_code == 200, r.text
    return {"X-Rater-Token": r.json()["token"]}


# ------------------------------------------------------------------------------------------------ create
def test_parse_system_accepts_and_rejects(tmp_path):
    s = parse_system("w4a8")
    assert (s.spec, s.schedule) == ("w4a8", None)
    assert parse_system("fp32:original").spec is None
    with pytest.raises(StudyError, match="w9a8"):
        parse_system("w9a8:original")
    with pytest.raises(StudyError, match="nowhere"):
        parse_system(f"w4a8:{tmp_path / 'nowhere'}")
    with pytest.raises(StudyError, match="at least two"):
        create_study(tmp_path / "s", ["fp32:original"])
    with pytest.raises(StudyError, match="duplicate"):
        create_study(tmp_path / "s", ["fp32:original", "fp32"])
    assert parse_system("fp32").id == parse_system("none:original").id != parse_system("w4a8").id
    named = parse_system(f"W4A8 Q-Sched = w4a8:{tmp_path}")
    assert (named.name, named.spec, named.schedule) == ("W4A8 Q-Sched", "w4a8", str(tmp_path))


def test_manifest_covers_every_system_prompt_and_seed(study):
    m = load_manifest(study)
    assert len(m["systems"]) == len(SYSTEMS) + 1
    assert len(m["prompts"]) == N_PROMPTS and m["seeds"] == [0] and len(m["classes"]) == N_PROMPTS
    sched_sys = m["systems"][-1]
    assert sched_sys["spec"] == "w4a8" and sched_sys["schedule"]
    for s in m["systems"]:
        files = m["images"][s["id"]]
        assert len(files) == N_PROMPTS
        for rel in files.values():
            assert Image.open(study / rel).size == (32, 32)
    # the scheduled system differs from nothing else by construction; the w2a8 system must differ from fp32
    a = Image.open(study / m["images"][m["systems"][0]["id"]]["0:0"]).tobytes()
    b = Image.open(study / m["images"][m["systems"][2]["id"]]["0:0"]).tobytes()
    assert a != b


class _CountingPipe:
    """Stands in for a pipeline: counts calls (class-wide: the study deep-copies it), returns a grey image."""

    calls = 0

    def __call__(self, prompt, generator, num_inference_steps, output_type, **kw):
        type(self).calls += 1
        return type("Out", (), {"images": [Image.new("L", (32, 32), 128)]})()


def test_create_resumes_only_missing_images(study, tmp_path):
    import shutil

    d = tmp_path / "resume"
    shutil.copytree(study, d, ignore=shutil.ignore_patterns("votes.sqlite*"))
    m = load_manifest(d)
    fp = m["systems"][0]
    missing = d / m["images"][fp["id"]]["1:0"]
    missing.unlink()
    pipe = _CountingPipe()
    m2 = create_study(d, [s["name"] for s in m["systems"]], "testbed-heldout", n_prompts=N_PROMPTS, pipe=pipe)
    assert _CountingPipe.calls == 1 and missing.exists()
    assert m2["images"] == m["images"]
    with pytest.raises(StudyError, match="other prompts"):
        create_study(d, [s["name"] for s in m["systems"]], "testbed-heldout", n_prompts=N_PROMPTS + 1, pipe=pipe)


class _SchedPipe:
    """A fake pipeline with a real diffusers scheduler; records the c^e coefficients in force at each call."""

    calls: list = []

    def __init__(self):
        from diffusers import LCMScheduler

        self.scheduler = LCMScheduler()

    def __call__(self, prompt, generator, num_inference_steps, output_type, **kw):
        sched = getattr(self.scheduler, "schedule", None)
        type(self).calls.append(None if sched is None else sched.to_dict()["model_coeff"][0])
        return type("Out", (), {"images": [Image.new("L", (32, 32), 100)]})()


def test_interrupted_create_resumes_and_applies_schedules(tmp_path):
    from qsched.schedule import save_schedule
    from qsched.schedule import Schedule

    save_schedule(tmp_path / "cal", None, Schedule.linear(1.1, 1.0, 4), "testbed", 4)
    systems, d = ["fp32:original", f"tuned=fp32:{tmp_path / 'cal'}"], tmp_path / "s"

    def stop_after_two(done, total, name):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        create_study(d, systems, n_prompts=3, pipe=_SchedPipe(), progress=stop_after_two)
    with pytest.raises(StudyError, match="did not finish"):
        load_manifest(d)
    with pytest.raises(StudyError, match="other prompts"):
        create_study(d, systems, n_prompts=4, pipe=_SchedPipe())
    m = create_study(d, systems, n_prompts=3, pipe=_SchedPipe())
    assert _SchedPipe.calls == [None, None, None, 1.1, 1.1, 1.1]  # 2 before the interrupt, 4 after; no repeats
    assert load_manifest(d)["complete"] and m["systems"][1]["coefficients"]["model_coeff"][0] == pytest.approx(1.1)
    assert m["systems"][1]["name"] == "tuned" and m["systems"][0]["coefficients"] is None


# ------------------------------------------------------------------------------------------------ store
def test_store_is_wal_and_survives_restart(tmp_path):
    db = tmp_path / "v.sqlite"
    s = Store(db)
    name, _ = s.add_rater("ann")
    with s.tx() as c:
        pid = s.issue_pair(c, name, 0, 0, "b", "a")
    s.record_vote(name, pid, "left")
    s.close()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    s2 = Store(db)  # a "restarted server"
    (v,) = s2.votes()
    assert (v["rater"], v["left_sys"], v["right_sys"], v["answer"]) == ("ann", "b", "a", "left")
    assert v["created_at"] > 0 and v["latency_s"] >= 0


# ------------------------------------------------------------------------------------------------ scheduling
def test_scheduler_balances_and_never_repeats(study, tmp_path):
    import shutil

    d = tmp_path / "sched"
    shutil.copytree(study, d, ignore=shutil.ignore_patterns("votes.sqlite*"))
    app, c = _client(d, seed=1)
    raters = [_rater(c, app) for _ in range(3)]
    n_sys = len(load_manifest(d)["systems"])
    per_rater = N_PROMPTS * n_sys * (n_sys - 1) // 2
    first = c.get("/api/next", headers=raters[0]).json()
    assert c.get("/api/next", headers=raters[0]).json()["pair_id"] == first["pair_id"]  # reload: same pair
    for step in range(per_rater):
        for h in raters[: 3 if step < 10 else 1]:  # 3 raters interleaved for 10 votes, then one goes on alone
            j = c.get("/api/next", headers=h).json()
            assert not j["done"]
            assert c.post("/api/vote", headers=h, json={"pair_id": j["pair_id"], "answer": "tie"}).status_code == 200
        if step == 9:
            rows = app.state.store.query("SELECT prompt, seed, sys_a, sys_b FROM pairs")
            pair_n = Counter((r["sys_a"], r["sys_b"]) for r in rows)
            assert len(pair_n) == n_sys * (n_sys - 1) // 2 and max(pair_n.values()) - min(pair_n.values()) <= 1
            for sp in pair_n:
                items = Counter(r["prompt"] for r in rows if (r["sys_a"], r["sys_b"]) == sp)
                counts = [items[p] for p in range(N_PROMPTS)]  # prompts never issued for this pair count 0
                assert max(counts) - min(counts) <= 1, (sp, counts)
            overall = Counter(r["prompt"] for r in rows)
            assert max(overall.values()) - min(overall[p] for p in range(N_PROMPTS)) <= 2, overall
    assert c.get("/api/next", headers=raters[0]).json()["done"] is True
    rows = app.state.store.query("SELECT rater, prompt, seed, sys_a, sys_b, left_sys FROM pairs")
    mine = [(r["prompt"], r["seed"], r["sys_a"], r["sys_b"]) for r in rows if r["rater"] == "rater-001"]
    assert len(mine) == len(set(mine)) == per_rater
    lefts = Counter(r["left_sys"] == r["sys_a"] for r in rows)
    assert lefts[True] > 0.2 * len(rows) and lefts[False] > 0.2 * len(rows)  # sides randomised


# ------------------------------------------------------------------------------------------------ API safety
def test_tokens_pairs_and_malformed_requests(study):
    app, c = _client(study)
    a, b = _rater(c, app, "alice"), _rater(c, app, "bob")
    assert c.get("/api/next").status_code == 401
    assert c.get("/api/next", headers={"X-Rater-Token": "forged"}).status_code == 401
    assert c.get("/").status_code == 401 and "Which image" not in c.get("/").text
    assert "Which image" in c.get(f"/?token={a['X-Rater-Token']}").text
    j = c.get("/api/next", headers=a).json()
    assert set(j) >= {"pair_id", "prompt", "images"} and all(s not in json.dumps(j) for s in ("fp32", "w2a8", "w3a8"))
    pid = j["pair_id"]
    bad = [({"pair_id": pid, "answer": "up"}, 422), ({"pair_id": pid}, 422), ({"answer": "left"}, 422),
           ({"pair_id": pid, "answer": "left", "x": 1}, 422), ({"pair_id": "x" * 65, "answer": "left"}, 422),
           ({"pair_id": "never-issued", "answer": "left"}, 404)]
    for body, code in bad:
        r = c.post("/api/vote", headers=a, json=body)
        assert r.status_code == code, (body, r.text)
        assert r.json()["error"]
    r = c.post("/api/vote", headers={**a, "Content-Type": "application/json"}, content=b"{not json")
    assert r.status_code == 422 and r.json()["error"]
    assert c.post("/api/vote", json={"pair_id": pid, "answer": "left"}).status_code == 401
    assert c.post("/api/vote", headers=b, json={"pair_id": pid, "answer": "left"}).status_code == 403
    assert c.post("/api/vote", headers=a, json={"pair_id": pid, "answer": "left"}).status_code == 200
    r = c.post("/api/vote", headers=a, json={"pair_id": pid, "answer": "right"})  # replay
    assert r.status_code == 409 and "already" in r.json()["error"]
    assert [v["answer"] for v in app.state.store.votes()] == ["left"]


def test_images_need_the_raters_pair_and_no_path_traversal(study):
    app, c = _client(study)
    a, b = _rater(c, app), _rater(c, app)
    j = c.get("/api/next", headers=a).json()
    r = c.get(j["images"]["left"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
    assert c.get(j["images"]["left"].split("?")[0]).status_code == 401
    assert c.get(j["images"]["left"].split("?")[0], headers=b).status_code == 404  # another rater's pair
    tok = a["X-Rater-Token"]
    secret = (study / "manifest.json").read_text()[:40]
    for url in (f"/api/image/{j['pair_id']}/top", f"/api/image/..%2F..%2Fmanifest.json/left?token={tok}",
                f"/api/image/{j['pair_id']}/..%2F..%2Fmanifest.json?token={tok}",
                f"/api/image/%2E%2E/left?token={tok}", f"/images/../manifest.json?token={tok}",
                f"/../manifest.json?token={tok}", f"/api/image/../../votes.sqlite?token={tok}",
                f"/images/{load_manifest(study)['systems'][0]['id']}/00000_0.png?token={tok}"):
        r = c.get(url)
        assert 400 <= r.status_code < 500, url
        assert secret not in r.text and b"SQLite" not in r.content


def test_admin_token_guards_results(study):
    app, c = _client(study)
    assert c.get("/api/results").status_code == 401
    assert c.get("/api/results", headers={"X-Admin-Token": "nope"}).status_code == 401
    assert c.post("/api/admin/raters", headers={"X-Admin-Token": "nope"}).status_code == 401
    assert c.get("/results").status_code == 401
    r = c.get("/api/results", headers={"X-Admin-Token": app.state.admin_token})
    assert r.status_code == 200 and "bradley_terry" in r.json()
    assert "<h1>" in c.get(f"/results?token={app.state.admin_token}").text
    h = {"X-Admin-Token": app.state.admin_token}
    assert c.post("/api/admin/raters", headers=h, json={"name": "../etc"}).status_code == 422
    c.post("/api/admin/raters", headers=h, json={"name": "dup"})
    assert c.post("/api/admin/raters", headers=h, json={"name": "dup"}).status_code == 409


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_errors_are_one_line(study, tmp_path):
    from typer.testing import CliRunner

    from qsched.cli import app

    run = CliRunner().invoke
    # `--systems a b` takes b as a further system: the bad second one is named
    r = run(app, ["study", "create", str(tmp_path / "s"), "--systems", "fp32:original", "w9a8:original"])
    assert r.exit_code == 2 and "w9a8" in r.output and "Traceback" not in r.output
    r = run(app, ["study", "create", str(tmp_path / "s"), "--systems", "fp32:original", "--seeds", "0,x"])
    assert r.exit_code == 2 and "seeds" in r.output
    (tmp_path / "afile").write_text("x")  # a study directory under a file: one line, nothing loaded
    r = run(app, ["study", "create", str(tmp_path / "afile" / "s"), "--systems", "fp32:original", "w4a8:original"])
    assert r.exit_code == 2 and "cannot create study directory" in r.output and "Traceback" not in r.output
    r = run(app, ["study", "create", str(tmp_path / "s"), "--systems", "fp32:original", "w4a8:original",
                  "--n-prompts", "0"])
    assert r.exit_code == 2 and "--n-prompts must be >= 1" in r.output
    r = run(app, ["study", "results", str(tmp_path)])
    assert r.exit_code == 2 and "not a study directory" in r.output
    (tmp_path / "manifest.json").write_text("{")
    r = run(app, ["study", "serve", str(tmp_path)])
    assert r.exit_code == 2 and "not valid JSON" in r.output
    r = run(app, ["study", "serve", str(study), "--port", "0"])
    assert r.exit_code == 2 and "--port" in r.output


def test_generate_system_images_depends_only_on_prompt_index_and_seed():
    import numpy as np

    import qsched
    from qsched.images import to_uint8
    from qsched.runner import generate
    from qsched.study.create import generate_system_images

    pipe = qsched.load_pipeline("testbed")
    both = generate_system_images(pipe, ["a sandal", "a bag"], [5, 6], 0, 4)
    alone = generate_system_images(pipe, ["a bag"], [6], 0, 4)
    other = generate_system_images(pipe, ["a bag"], [6], 1, 4)
    assert np.array_equal(np.asarray(both[1]), np.asarray(alone[0]))
    assert not np.array_equal(np.asarray(alone[0]), np.asarray(other[0]))
    # the one runner's image: what evaluate/calibrate draw for prompt index 6 of seed 0
    assert np.array_equal(np.asarray(alone[0]), to_uint8(generate(pipe, ["a bag"], 4, seed=0, start=6))[0, ..., 0])
    with pytest.raises(StudyError, match="2 prompts but 1 image indices"):
        generate_system_images(pipe, ["a", "b"], [1], 0, 4)

"""qsched.bench end to end on the tiny random testbed pipeline with tiny injected scorers (no shipped weights)."""

import json
import re

import pytest
import torch

from qsched.bench import BenchEnv, BenchSettings, headline_table, main, parse_fid_rows, run_bench

from fakes import tiny_testbed_evaluators


class _Quiet:
    """A console stand-in that records what the bench prints."""

    def __init__(self):
        self.lines = []

    def print(self, *a, **k):
        self.lines.append(" ".join(str(x) for x in a))

    def rule(self, *a, **k):
        self.lines.append("---- " + " ".join(str(x) for x in a))


@pytest.fixture(scope="module")
def env_factory():
    """A BenchEnv on the tiny testbed pipeline with tiny random classifier / CLIP / 'Inception' stand-ins."""
    from qsched.metrics import AccuracyMetric, FrechetMetric, JAQMetric
    from qsched.scoring import JAQ, TestbedCLIPIQA, TestbedCLIPScore
    from qsched.frechet import feature_stats
    from qsched.testbed.pipeline import tiny_testbed_pipeline

    cfd, ref, clip = tiny_testbed_evaluators()
    cfd._ref = ref  # the tiny classifier's reference statistics
    proj = torch.randn(32 * 32, 6, generator=torch.Generator().manual_seed(1))
    fid_ref = feature_stats(torch.rand(64, 32 * 32) @ proj)
    pipe = tiny_testbed_pipeline(seed=0)

    def make(counter):
        def load():
            counter["loads"] += 1
            return pipe

        return BenchEnv(
            load_pipe=load, jaq=lambda: JAQ(TestbedCLIPScore(model=clip), TestbedCLIPIQA(model=clip)), name="tiny",
            eval_metrics=lambda: [FrechetMetric("fd", cfd.features, lambda: ref), AccuracyMetric(cfd.predict),
                                  JAQMetric(JAQ(TestbedCLIPScore(model=clip), TestbedCLIPIQA(model=clip)))],
            fid_metrics=lambda: [FrechetMetric("fid", lambda x: x.reshape(x.shape[0], -1) @ proj, lambda: fid_ref)],
            evaluator=lambda: cfd)

    return make


def tiny_settings(**kw):
    return BenchSettings.quick(steps=(2,), precisions=("fp32", "w4a8"), calib_prompts=3, calib_trials=2,
                               eval_images=6, eval_batch=3, fid_images=4,
                               fid_rows=parse_fid_rows("fp32:original,w4a8:qsched"), grid_points=3, search_steps=2,
                               search_trials=3, search_seeds=(0, 1), speed_batch=2, speed_steps=2, speed_repeats=2,
                               overhead_calls=40, rss=False, sd15="skip", progress=False, default_draws=2,
                               default_images=6, default_search_prompts=3, default_val_prompts=3, default_trials=3,
                               **kw)


def test_quick_path_end_to_end_and_resume(env_factory, tmp_path):
    counter = {"loads": 0}
    out, work = tmp_path / "BENCHMARKS.md", tmp_path / "work"
    con = _Quiet()
    R = run_bench(tiny_settings(), env_factory(counter), out=out, work=work, command="python -m qsched.bench --x",
                  console=con)
    md = out.read_text()
    for heading in ("## 1. Quality", "## 2. Search cost", "## 3. Size and speed", "## Headline", "QUICK MODE",
                    "## Default path"):
        assert heading in md
    # the default path: every draw calibrated with the defaults; a kept identity differs by exactly 0
    D = R["default"]["rows"]["2:w4a8"]
    assert len(D["draws"]) == 2 and D["kept_identity"] == sum(d["decision"] != "qsched" for d in D["draws"])
    for d in D["draws"]:
        assert d["fd"]["ci_low"] <= d["fd"]["diff"] <= d["fd"]["ci_high"]
        if d["decision"] != "qsched":
            assert d["fd"]["diff"] == d["accuracy"]["diff"] == d["jaq"]["diff"] == 0.0
    assert "pending" not in md
    assert "python -m qsched.bench --x" in md and "cores" in md and "torch " in md
    assert (tmp_path / "benchmarks_search.png").stat().st_size > 1000
    assert "![search cost](benchmarks_search.png)" in md
    assert (tmp_path / "benchmarks_samples.png").exists()

    # section 1: every row of the 2-step table measured, the best parametrization chosen by its validation gain
    # (largest mean among those whose interval is above zero; none: the original schedule, do no harm)
    cal = R["calibrations"]["2"]["w4a8"]
    order = ["linear", "ramp", "per-step"]
    # validated, unless the search found nothing better than the identity
    def identity(sch):
        return set(sch["model_coeff"]) | set(sch["sample_coeff"]) == {1.0}

    assert all(cal[p]["validation_gain"] is not None or identity(cal[p]["schedule"]) for p in order)
    reliable = [p for p in order if (cal[p]["validation_gain"] or {}).get("ci_low", 0) > 0]
    expected = max(reliable, key=lambda p: (cal[p]["validation_gain"]["mean"], -order.index(p))) if reliable else None
    assert cal["_chosen"] == expected
    for prec in ("fp32", "w4a8"):
        for label in ("original", "qsched-linear", "qsched-best", "fp32-tuned"):
            row = R["rows"]["2"][prec][label]["row"]
            assert 0.0 <= row["accuracy"] <= 1.0 and row["fd"] >= 0 and row["n_images"] == 6
    # every Q-Sched row: one entry per calibration draw, each with its paired CIs against the original schedule
    # (exactly 0 where the draw kept the original), "best" also against fp32's original
    for label in ("qsched-linear", "qsched-best", "fp32-tuned"):
        ds = R["row_draws"]["2"]["w4a8"][label]
        assert [e["draw"] for e in ds] == [0, 1]
        for e in ds:
            v = e["vs_original"]
            assert v["fd"]["ci_low"] <= v["fd"]["diff"] + 1e-9 and v["fd"]["diff"] <= v["fd"]["ci_high"] + 1e-9
            if e["schedule"] is None:
                assert v["fd"]["diff"] == v["accuracy"]["diff"] == 0.0
            assert ("vs_fp32" in e) == (label == "qsched-best")
    # "best" also against the fair control: fp32 with the schedule tuned on itself in the same draw
    tuned = {e["draw"]: e for e in R["row_draws"]["2"]["w4a8"]["fp32-tuned"]}
    for e in R["row_draws"]["2"]["w4a8"]["qsched-best"]:
        assert ("vs_fp32_tuned" in e) == ("file" in e and "file" in tuned[e["draw"]])
        if "vs_fp32_tuned" in e:
            assert e["vs_fp32_tuned"]["fd"]["diff"] == pytest.approx(
                e["row"]["fd"] - tuned[e["draw"]]["row"]["fd"], rel=1e-5, abs=1e-9)
    assert "ΔFD vs fp32 tuned" in md
    # the per-draw table: one line per Q-Sched best draw, its vs-original FD CI as computed
    per_draw = md.split("### Per-draw paired CIs")[1].split("\n## ")[0]
    best = R["row_draws"]["2"]["w4a8"]["qsched-best"]
    lines = [ln for ln in per_draw.splitlines() if ln.startswith("| w4a8 |")]
    assert len(lines) == len(best) >= 2
    c = best[0]["vs_original"]["fd"]
    assert f"{c['diff']:+.2f} [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]" in lines[0]
    orig = R["rows"]["2"]["w4a8"]["original"]["row"]
    for e in R["row_draws"]["2"]["w4a8"]["qsched-linear"]:
        assert e["vs_original"]["fd"]["diff"] == pytest.approx(e["row"]["fd"] - orig["fd"], rel=1e-5, abs=1e-9)
    assert "mean ± sd over 2 calibration draws" in md and "Do the classifier's FD and Inception FID agree" in md
    assert R["prompts"]["disjoint"] and not set(R["prompts"]["calibration"]["prompts"]) & set(
        __import__("qsched.prompts", fromlist=["x"]).load_prompts("testbed-heldout", n=6).prompts)
    assert set(R["fid"]["rows"]) == {"fp32:original", "w4a8:qsched-best"}
    assert all(r["row"]["fid"] >= 0 for r in R["fid"]["rows"].values())
    fid_table = R["markdown"].split("### Inception FID")[1].split("###")[0]
    w4a8_cells = [ln for ln in fid_table.splitlines() if ln.startswith("| w4a8 |")][0].split("|")[2:-1]
    assert w4a8_cells[0].strip() == "-" and w4a8_cells[2].strip() != "-"  # original not selected, best selected

    # section 2: grid of 3x3 + identity, curves monotone, forwards counted per trial
    sr = R["search"]
    gx, gy = sr["grid"]["curve"]
    assert sr["grid"]["n_trials"] == 9 and len(gx) == 9  # the grid's (1, 1) point is the identity trial
    assert all(b >= a for a, b in zip(gy, gy[1:])) and all(b >= a for a, b in zip(gx, gx[1:])) and gx[-1] > gx[0]
    for r in sr["tpe"].values():
        x, y = r["curve"]
        if r["to_exact"] is not None:
            assert y[x.index(r["to_exact"])] >= sr["grid"]["best_jaq"] - 1e-12
    assert "forwards to grid best" in md

    # section 3: packed 4-bit file well below fp16 on the quantized part, speeds measured
    files = R["sizes"]["files"]
    assert files["packed w8"] < files["fp32"] and files["packed w4"] < files["fp32"] and files["fp16"] < files["fp32"]
    res = R["sizes"]["resident"]
    assert res["w4a8 keep_packed"] < res["w4a8 simulated"]
    for v in R["speed"]["variants"].values():
        assert v["images_per_s"] > 0 and v["ms_per_step"] > 0 and len(v["call_seconds"]) == 2
    assert R["speed"]["overhead"]["wrapped_us"] > 0

    # headline: one line per precision, 4 columns, the command
    head = headline_table(R)
    assert head == R["headline"] and "python -m qsched.bench --x" in head
    assert len(re.findall(r"^\| (fp32|w4a8) \|", head, re.M)) == 2
    assert all(line in md for line in head.splitlines() if line.startswith("|"))
    assert counter["loads"] == 1 and R["computed"] and not R["skipped"]

    # resume: nothing recomputed, the pipeline never loaded, same numbers
    con2 = _Quiet()
    R2 = run_bench(tiny_settings(), env_factory(counter), out=out, work=work, command="python -m qsched.bench --x",
                   console=con2)
    assert R2["computed"] == [] and len(R2["skipped"]) == len(R["computed"])
    assert counter["loads"] == 1
    assert R2["headline"] == R["headline"]
    assert R2["search"]["grid"]["best_jaq"] == R["search"]["grid"]["best_jaq"]

    # a killed run: drop one evaluation row's result -> only that unit runs again
    victim = next((work / "units" / "eval").glob("2s-w4a8-original-*/result.json"))
    victim.unlink()
    R3 = run_bench(tiny_settings(), env_factory(counter), out=out, work=work, command="c", console=_Quiet())
    assert R3["computed"] == ["eval/2s-w4a8-original"]
    assert R3["rows"]["2"]["w4a8"]["original"]["row"]["fd"] == pytest.approx(R["rows"]["2"]["w4a8"]["original"]
                                                                               ["row"]["fd"])

    # --fresh recomputes everything
    R4 = run_bench(tiny_settings(), env_factory(counter), out=out, work=work, fresh=True, console=_Quiet(),
                   sections=("size",))
    assert R4["skipped"] == [] and R4["computed"]
    assert json.loads((work / "results.json").read_text())["settings"]["mode"] == "quick"


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="PRECISION:LABEL"):
        parse_fid_rows("w4a8:magic")
    with pytest.raises(ValueError, match="fp32"):
        BenchSettings(precisions=("w4a8",))
    with pytest.raises(ValueError, match="unknown precision"):
        BenchSettings(precisions=("fp32", "w3a3"))
    assert parse_fid_rows("") == () and BenchSettings(fid_rows=()).fid_rows == ()
    everything = parse_fid_rows("all")
    assert len(everything) == 16 and everything[0] == ("fp32", "original") and BenchSettings().fid_rows == everything
    assert parse_fid_rows("w4a8:qsched, fp32:tuned") == (("w4a8", "qsched-best"), ("fp32", "fp32-tuned"))
    (tmp_path / "units").mkdir()
    with pytest.raises(ValueError, match="refusing"):
        run_bench(tiny_settings(), BenchEnv(load_pipe=lambda: None, jaq=lambda: None), work=tmp_path, fresh=True,
                  out=tmp_path / "B.md", console=_Quiet())
    with pytest.raises(SystemExit):
        main(["--fid-rows", "nope"])
    with pytest.raises(SystemExit):
        main(["--jobs", "0"])
    unpicklable = BenchEnv(load_pipe=lambda: None, jaq=lambda: None)
    with pytest.raises(ValueError, match="pickled"):  # helper processes need an env they can receive
        run_bench(tiny_settings(), unpicklable, work=tmp_path / "j", out=tmp_path / "B.md", console=_Quiet(), jobs=2)
    with pytest.raises(ValueError, match="unknown section"):
        run_bench(tiny_settings(), unpicklable, work=tmp_path / "j", out=tmp_path / "B.md", console=_Quiet(),
                  sections=("speed",))


def _spawn(target, *args):
    import multiprocessing as mp

    p = mp.get_context("spawn").Process(target=target, args=args)
    p.start()
    return p


def _wait_for(path, proc, timeout=60.0):
    import time

    t0 = time.time()
    while not path.exists():
        assert proc.is_alive() or path.exists(), "helper process died"
        assert time.time() - t0 < timeout, f"timed out waiting for {path}"
        time.sleep(0.02)


def test_unit_store_processes_never_compute_one_unit_twice_and_reruns_reuse(tmp_path):
    """Three processes on one store: every unit computed exactly once, all see the same results; a rerun computes
    nothing."""
    import multiprocessing as mp

    import _unit_workers as uw

    from qsched.bench.units import UnitStore

    names = [f"u{i}" for i in range(6)]
    log, go = tmp_path / "log.txt", tmp_path / "go"
    queue = mp.get_context("spawn").Queue()
    procs = [_spawn(uw.share, tmp_path / "w", names, log, 0.3, tmp_path / f"ready{i}", go, queue) for i in range(3)]
    for i, p in enumerate(procs):
        _wait_for(tmp_path / f"ready{i}", p)
    go.touch()
    reports = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    lines = log.read_text().splitlines()
    assert sorted(line.split()[1] for line in lines) == names  # each unit computed once, by someone
    computed = [t for r in reports for t in r["computed"]]
    assert sorted(computed) == [f"k/{n}" for n in names]
    for r in reports:  # everyone got every result, the one its computer wrote
        assert [x["v"] for x in r["results"]] == names
        assert sorted(r["computed"] + r["skipped"]) == sorted(f"k/{n}" for n in names)
        by = {line.split()[1]: int(line.split()[0]) for line in lines}
        assert all(x["pid"] == by[x["v"]] for x in r["results"])

    calls = []
    store = UnitStore(tmp_path / "w", _Quiet())
    again = store.run_all([j.__class__(j.kind, j.name, j.config, lambda d: calls.append(d) or {"v": "new"})
                           for j in uw.jobs(names, log, 0)])
    assert calls == [] and store.computed == [] and [x["v"] for x in again] == names


def test_unit_store_passes_over_held_units_and_takes_over_a_killed_workers(tmp_path):
    """A unit another live process is computing is passed over, then collected (not recomputed); the lock of a
    killed process is released by the OS, so its unit is computed by the next one."""
    import _unit_workers as uw

    from qsched.bench.units import Job, UnitStore

    work, log = tmp_path / "w", tmp_path / "log.txt"
    calls = []

    def job(name):
        return Job("k", name, {"n": name}, lambda d: calls.append(name) or {"v": name, "pid": 0})

    other = _spawn(uw.hold, work, "x", log, 1.5, tmp_path / "ready")
    _wait_for(tmp_path / "ready", other)
    store = UnitStore(work, _Quiet())
    res = store.run_all([job("x"), job("y")])
    other.join(30)
    assert calls == ["y"] and store.computed == ["k/y"] and store.skipped == ["k/x"]
    assert res[0] == {"v": "x", "pid": other.pid} and res[1]["v"] == "y"

    killed = _spawn(uw.hold, work, "z", log, 600, tmp_path / "ready-z")
    _wait_for(tmp_path / "ready-z", killed)
    killed.kill()
    killed.join(30)
    store = UnitStore(work, _Quiet())
    assert store.run_all([job("z")]) == [{"v": "z", "pid": 0}] and store.computed == ["k/z"]
    assert not list((work / "units").rglob("*.tmp"))  # atomic writes leave no temporary files


def test_sd15_measurement_runs_in_process_as_a_unit_and_is_read_back(tmp_path, monkeypatch):
    """Section 3's SD1.5-sized UNet numbers come from qsched.bench.sd15 in this process (tiny widths here, no
    speed part), stored as a unit that ``sd15="read"`` (the --quick default) finds again."""
    from qsched.bench import sd15, size_speed
    from qsched.bench.units import UnitStore

    real = sd15.measure
    monkeypatch.setattr(sd15, "measure", lambda **kw: real(**{**kw, "smoke": True, "speed": False}))
    r = size_speed._sd15(BenchSettings.quick(sd15="run"), UnitStore(tmp_path, _Quiet()))
    d = r["data"]
    assert r["ran"] and d["smoke"] and d["layers_quantized"] > 0 and 0 < d["packed_ratio"] < 0.5
    assert d["tiny_rel_error"]["w8a8"] < d["tiny_rel_error"]["w4a8"] < d["tiny_rel_error"]["w4a4"]
    again = size_speed._sd15(BenchSettings.quick(), UnitStore(tmp_path, _Quiet()))
    assert again["data"] == d and again["reused"].endswith("result.json")


def test_family_wise_harms_widens_per_draw_intervals():
    from qsched.bench.default_path import family_wise_harms

    def draw(fd, acc, decision="qsched"):
        return {"decision": decision, "fd": {"diff": fd[0], "ci_low": fd[1], "ci_high": fd[2]},
                "accuracy": {"diff": acc[0], "ci_low": acc[1], "ci_high": acc[2]}}

    borderline = draw((-1.0, -1.2, -0.8), (-0.010, -0.017, -0.002))  # accuracy worse at 95%, not after widening
    clear = draw((+2.0, +1.8, +2.2), (0.0, -0.005, 0.005))  # FD worse by 20 standard errors
    kept = draw((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), decision="identity")
    assert family_wise_harms([borderline] * 5 + [kept]) == (0, 10)
    assert family_wise_harms([borderline] * 5 + [clear, kept]) == (1, 12)
    assert family_wise_harms([kept]) == (0, 0)


def test_default_section_lists_every_draw_with_its_intervals():
    """The default-path section shows each draw's validation gain and held-out changes with their 95% CIs."""
    from qsched.bench.default_path import render_default

    def m(d, lo, hi):
        return {"diff": d, "ci_low": lo, "ci_high": hi}

    kept = {"draw": 0, "decision": "qsched", "chosen": "ramp", "wall_time_s": 99.6,
            "validation_gain": {"mean": 2.5, "ci_low": 1.25, "ci_high": 3.75},
            "fd": m(-1.5, -1.75, -1.25), "accuracy": m(0.01, 0.002, 0.018), "jaq": m(0.5, 0.25, 0.75)}
    ident = {"draw": 1, "decision": "identity", "chosen": "linear", "wall_time_s": 80.0,
             "validation_gain": {"mean": 0.1, "ci_low": -0.5, "ci_high": 0.7},
             "fd": m(0.0, 0.0, 0.0), "accuracy": m(0.0, 0.0, 0.0), "jaq": m(0.0, 0.0, 0.0)}
    row = {"steps": 4, "spec": "w4a8", "original": {"fd": 5.0, "fd2": None, "accuracy": 0.87, "jaq": 57.0},
           "draws": [kept, ident], "kept_identity": 1, "harm_fd": 0, "help_fd": 1, "harm_accuracy": 0,
           "help_accuracy": 1}
    R = {"default": {"rows": {"4:w4a8": row}, "images": 100, "draws": 2, "search_prompts": 4, "val_prompts": 4,
                     "val_seeds": [1], "trials": 6}}
    text = "\n".join(render_default(R))
    assert "| 4 | w4a8 | 0 | ramp | +2.50 [+1.25, +3.75] | -1.50 [-1.75, -1.25] | - | +0.010 [+0.002, +0.018] |" in text
    assert "| 4 | w4a8 | 1 | original | +0.10 [-0.50, +0.70] | +0.00 [+0.00, +0.00] |" in text
    assert "1 kept the original schedule" in text


def test_units_are_keyed_by_the_jaq_scorer():
    """A retrained tiny CLIP must not reuse calibrations (or JAQ rows) made with another scorer."""
    import dataclasses

    from qsched.bench.env import BenchEnv
    from qsched.testbed.pipeline import WEIGHTS_DIR
    from qsched.testbed.weights_io import file_digest

    a = BenchEnv(load_pipe=lambda: None, jaq=lambda: None, name="m", scorer="aaaa")
    assert a.key != dataclasses.replace(a, scorer="bbbb").key and a.key.startswith("m")
    assert BenchEnv(load_pipe=lambda: None, jaq=lambda: None, name="m").key == "m"
    tb = BenchEnv.testbed()
    assert tb.scorer == file_digest(WEIGHTS_DIR / "tiny_clip.safetensors", 8) and tb.scorer in tb.key

"""HTML/JSON/Markdown report from synthetic calibration and evaluation results (no pipeline needed)."""

import base64
import io
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from qsched.evaluate import EvalResult
from qsched.report import calibration_summary, landscape_figure, write_report
from qsched.schedule import Schedule

GRID = [0.8, 0.9, 1.0, 1.1, 1.2]


def _eval_result() -> EvalResult:
    rng = np.random.default_rng(0)
    rows = {}
    for i, cfg in enumerate(["fp-original", "quant-naive", "quant-qsched", "fp-tuned"]):
        rows[cfg] = {"fd": 12.3456 + i * 1.1111, "accuracy": 0.61 + 0.01 * i, "clipscore": 23.4567 - i,
                     "iq": 0.4321 + 0.01 * i, "jaq": 24.3209 - i / 3, "n_invalid": 0, "n_images": 8,
                     "n_nonfinite": i == 1 and 2 or 0, "gen_seconds": 1.5 + i, "images_per_s": 8 / (1.5 + i)}
    samples = {cfg: rng.integers(0, 256, (3, 32, 32, 1), dtype=np.uint8) for cfg in rows}
    prompts = ["a catalogue shot of a top", "my favourite chinos", "a close-up of the anorak"]
    return EvalResult(rows=rows, model="testbed", spec="w4a8", steps=4, seeds=list(range(8)),
                      prompt_set="testbed-heldout", n_images=8, configs=list(rows), metrics=["fd", "jaq"],
                      schedules={"fp-original": None, "quant-naive": None,
                                 "quant-qsched": Schedule.linear(0.9, 1.1, 4).to_dict(),
                                 "fp-tuned": Schedule.linear(1.05, 0.98, 4).to_dict()},
                      prompts=prompts * 3, notes=["quant-naive: 2 of 8 images contain NaN/inf"],
                      sample_prompts=prompts, sample_seeds=[0, 1, 2], samples=samples)


def _grid_calibration():
    trials = []
    n = 0
    for a in GRID:
        for b in GRID:
            trials.append({"number": n, "params": {"model_start": a, "sample_start": b},
                           "jaq": 10 - (a - 0.9) ** 2 - (b - 1.1) ** 2, "tc": 9.0, "iq": 0.4, "state": "COMPLETE",
                           "role": "search", "model_evals": 8})
            n += 1
    trials.append({"number": n, "params": {"model_start": 1.0, "sample_start": 1.0}, "jaq": 9.95, "tc": 9.0,
                   "iq": 0.4, "state": "COMPLETE", "role": "identity", "model_evals": 0})
    return SimpleNamespace(schedule=Schedule.linear(0.9, 1.1, 4), naive={"jaq": 9.95}, best={"jaq": 10.0},
                           trials=trials, parametrization="linear", strategy="grid", model_evals=200, steps=4,
                           quant_spec="w4a8", model="testbed", prompts=["a", "b"])


def _decode_imgs(page: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(m))))
            for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_with_grid_heatmap_table_and_images(tmp_path):
    ev, cal = _eval_result(), _grid_calibration()
    path = write_report(tmp_path / "rep", calibration=cal, evaluation=ev)
    page = path.read_text(encoding="utf-8")
    assert path.name == "report.html" and page.startswith("<!DOCTYPE html>")
    # self-contained: no external references of any kind
    assert "http" not in page.lower() and "<script" not in page and "<link" not in page
    assert not re.search(r'src="(?!data:image/png;base64,)', page)
    # the table numbers
    for row in ev.rows.values():
        for key in ("fd", "jaq", "clipscore"):
            assert f"{row[key]:.4f}" in page
    assert "NaN/inf" in page  # the notes
    # images: landscape + coefficients + 4 configs x 3 samples; the grid cells decode to the samples
    imgs = _decode_imgs(page)
    assert len(imgs) == 2 + 4 * 3
    cells = [a for a in imgs if a.shape == (32, 32)]
    np.testing.assert_array_equal(cells[0], ev.samples["fp-original"][0, ..., 0])
    np.testing.assert_array_equal(cells[-1], ev.samples["fp-tuned"][-1, ..., 0])
    for p in ev.sample_prompts:
        assert p in page
    # JSON and Markdown carry the same numbers
    rj = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rj["figures"]["landscape"] == "heatmap"
    assert rj["evaluation"]["rows"]["quant-qsched"]["fd"] == pytest.approx(ev.rows["quant-qsched"]["fd"])
    assert rj["calibration"]["best_jaq"] == 10.0 and rj["calibration"]["gain"] == pytest.approx(0.05)
    assert len(rj["calibration"]["trials"]) == 26
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"{ev.rows['fp-tuned']['jaq']:.4f}" in md and "![JAQ heatmap](landscape.png)" in md
    for f in ("landscape.png", "coefficients.png", "grid.png"):
        assert Image.open(tmp_path / "rep" / f).size[0] > 50


def test_history_path_and_saved_calibration_dir(tmp_path):
    from qsched.calibrate import CalibrationResult

    rng = np.random.default_rng(1)
    trials = [{"number": i, "params": {"model_start": float(a), "sample_start": float(b)}, "jaq": float(j),
               "tc": 9.0, "iq": 0.5, "n_invalid": 0, "state": "COMPLETE", "role": "search", "model_evals": 4,
               "cache_hits": 0} for i, (a, b, j) in enumerate(rng.uniform(0.8, 1.2, (12, 3)) * [1, 1, 10])]
    trials.append({"number": 12, "params": {}, "jaq": None, "state": "FAIL", "model_evals": 0})
    res = CalibrationResult(
        schedule=Schedule.linear(trials[3]["params"]["model_start"], trials[3]["params"]["sample_start"], 4),
        best={"jaq": max(t["jaq"] for t in trials[:12])}, naive={"jaq": 9.0}, trials=trials, prompts=["p"] * 5,
        seeds=[0], model="testbed", quant_spec="w4a8", steps=4, parametrization="linear", strategy="optuna",
        sampler="tpe", k=2.0, grid_range=[0.8, 1.2], guidance_scale=None, model_evals=48, cache_hits=0,
        text_encoder_evals=1, text_encoder_hits=0, n_images=5, wall_time_s=1.0)
    cdir = res.save(tmp_path / "calib")
    s = calibration_summary(res)
    fig, kind = landscape_figure(s)
    assert kind == "history" and fig.startswith(b"\x89PNG")
    # a grid over a non-linear parametrization also falls back to the history plot
    assert landscape_figure({**s, "strategy": "grid", "parametrization": "ramp"})[1] == "history"
    path = write_report(tmp_path / "rep", calibration=cdir)
    page = path.read_text()
    assert "http" not in page.lower()
    assert len(_decode_imgs(page)) == 2  # history + coefficients
    rj = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rj["figures"]["landscape"] == "history" and rj["calibration"]["spec"] == "w4a8"
    assert f"{rj['calibration']['best_jaq']:.4f}" in page
    assert rj["calibration"]["schedule"]["model_coeff"] == list(res.schedule.model_coeff)


def test_report_from_eval_json_and_errors(tmp_path):
    ev = _eval_result()
    jp = ev.to_json(tmp_path / "ev" / "eval.json")
    path = write_report(tmp_path / "rep", evaluation=jp)
    page = path.read_text()
    assert f"{ev.rows['quant-naive']['accuracy']:.4f}" in page
    assert len(_decode_imgs(page)) == 1 + 4 * 3  # coefficients + samples read back from PNG
    with pytest.raises(ValueError, match="nothing to report"):
        write_report(tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "y", calibration=tmp_path / "no-such-dir")

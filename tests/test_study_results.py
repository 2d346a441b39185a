"""qsched study results: Bradley-Terry/Elo (evalica) with bootstrap CIs, win rates, agreement, output files."""

from __future__ import annotations

import csv
import json
import math
import random

import pytest

pytest.importorskip("evalica")

from qsched.study.results import (bradley_terry_elo, compute_results, rater_agreement, win_matrix,  # noqa: E402
                                  write_results)

SYSTEMS = ["a", "b", "c"]
MANIFEST = {"systems": [{"id": k, "name": f"sys-{k}"} for k in SYSTEMS], "prompts": ["p0", "p1"],
            "classes": ["shoe", "bag"], "model": "testbed", "steps": 4}


def _votes(strength, n=300, seed=0, raters=("r1",)):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        x, y = rng.sample(list(strength), 2)
        p = 1 / (1 + math.exp(strength[y] - strength[x]))
        out.append({"left_sys": x, "right_sys": y, "answer": "left" if rng.random() < p else "right",
                    "rater": raters[i % len(raters)], "prompt": i % 2, "seed": 0})
    return out


def test_bt_recovers_order_and_cis_cover_the_estimate():
    votes = _votes({"a": 1.0, "b": 0.0, "c": -1.0})
    res = compute_results(MANIFEST, votes, n_boot=100)
    rows = res["bradley_terry"]
    assert [r["system"] for r in rows] == ["sys-a", "sys-b", "sys-c"]
    for r in rows:
        assert r["ci_low"] < r["elo"] < r["ci_high"]
        assert r["wins"] + r["losses"] + r["ties"] + r["both_bad"] == r["n"]
    assert abs(sum(r["elo"] for r in rows) / 3 - 1000) < 1e-6
    # a 1-logit gap is 400/ln(10) ~ 174 Elo points; allow sampling error
    gap = rows[0]["elo"] - rows[2]["elo"]
    assert 200 < gap < 500
    assert set(res["per_class"]) == {"shoe", "bag"}


def test_win_matrix_and_draws():
    votes = [{"left_sys": "a", "right_sys": "b", "answer": "left"}, {"left_sys": "b", "right_sys": "a", "answer": "tie"},
             {"left_sys": "a", "right_sys": "c", "answer": "both_bad"}]
    rate, n = win_matrix(votes, SYSTEMS)
    assert rate[0][1] == pytest.approx(0.75) and rate[1][0] == pytest.approx(0.25) and n[0][1] == 2
    assert rate[0][2] == pytest.approx(0.5) and rate[1][2] is None
    assert rate[0][0] is None


def test_an_unbeaten_system_gets_a_finite_score():
    votes = [{"left_sys": "a", "right_sys": "b", "answer": "left"}] * 5
    e = bradley_terry_elo(votes, SYSTEMS)
    assert all(math.isfinite(v) for v in e.values()) and e["a"] > e["c"] > e["b"]


def test_rater_agreement_counts_answers_in_system_terms():
    # r2 sees the same comparison with sides swapped and agrees: agreement is about systems, not sides
    v = [{"left_sys": "a", "right_sys": "b", "answer": "left", "rater": "r1", "prompt": 0, "seed": 0},
         {"left_sys": "b", "right_sys": "a", "answer": "right", "rater": "r2", "prompt": 0, "seed": 0},
         {"left_sys": "a", "right_sys": "c", "answer": "left", "rater": "r1", "prompt": 1, "seed": 0},
         {"left_sys": "a", "right_sys": "c", "answer": "right", "rater": "r2", "prompt": 1, "seed": 0},
         {"left_sys": "b", "right_sys": "c", "answer": "tie", "rater": "r1", "prompt": 1, "seed": 0}]
    ag = rater_agreement(v)
    assert ag["n_comparisons_shared"] == 2 and ag["n_rater_pairs"] == 2 and ag["percent_agreement"] == 0.5
    same = rater_agreement(_votes({"a": 1, "b": 0, "c": -1}, 60, raters=("r1",))
                           + [dict(x, rater="r2") for x in _votes({"a": 1, "b": 0, "c": -1}, 60, raters=("r1",))])
    assert same["percent_agreement"] == 1.0 and same["krippendorff_alpha"] == pytest.approx(1.0)


def test_write_results_json_csv_html(tmp_path):
    res = compute_results(MANIFEST, _votes({"a": 0.5, "b": 0.0, "c": 0.0}, 120), n_boot=50)
    paths = write_results(tmp_path, res)
    assert json.loads(paths["json"].read_text())["n_votes"] == 120
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["system"] for r in rows] == [r["system"] for r in res["bradley_terry"]]
    grid = list(csv.reader(paths["win_rate_csv"].open()))
    assert grid[0][1:] == ["sys-a", "sys-b", "sys-c"] and len(grid) == 4
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 2 and "http://" not in page and "https://" not in page
    assert "sys-a" in page and "Krippendorff" in page


def test_no_votes_is_not_an_error():
    res = compute_results(MANIFEST, [], n_boot=10)
    assert res["n_votes"] == 0 and all(r["elo"] is None for r in res["bradley_terry"])

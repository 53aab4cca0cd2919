"""Smoke test of the portfolio-margin benchmark (bench/portfolio.py): it runs end to end on
a few books, writes its JSON and PNG, and its numpy baseline and the reference agree with
the Cython kernel. No timing is asserted."""

from __future__ import annotations

import json

import numpy as np

from bench import portfolio as bench
from engine.risk import portfolio as pm


def test_run_small(tmp_path):
    out = tmp_path / "portfolio.json"
    result = bench.run(portfolios=200, legs=5, json_out=out, reference_sample=40, reps=2, quiet=True)
    doc = json.loads(out.read_text())
    assert doc == json.loads(json.dumps(result))
    for key in ("cython_ms", "cython_ms_p99", "numpy_ms", "numpy_ms_p99", "reference_ms", "ratios", "hardware"):
        assert key in doc, key
    assert (doc["portfolios"], doc["legs"], doc["scenarios"]) == (200, 5, 27)
    assert doc["leg_scenarios"] == 200 * 5 * 27
    assert doc["agreement"]["agree"]
    assert doc["agreement"]["reference_max_rel_to_gross"] <= 1e-9
    assert (tmp_path / "portfolio.png").stat().st_size > 0


def test_numpy_baseline_matches_the_checked_api():
    packed, _ = bench.build(50, 3, seed=3)
    got = bench.numpy_requirements(packed, pm.scenario_grid(), pm.DEFAULT_PARAMS)
    want = pm.requirements_packed(packed)
    scale = np.maximum(bench.gross(packed), 1e-12)
    assert np.max(np.abs(got["requirement"] - want["requirement"]) / scale) <= 1e-6
    assert np.array_equal(got["short_min"] > 0, want["short_min"] > 0)

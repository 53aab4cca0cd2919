"""Smoke test of the CURVE benchmark (bench/curve.py): a tiny run through its command
line writes its JSON and PNG with every loop's sample count, and leaves no temporary
directory. A CURVE client meeting a plain server (or the reverse) never completes its
handshake and the run would fail on its 10 s receive timeout, so a finished run shows
the engine with ``[security]`` answered CURVE clients. No timing is asserted."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

from bench import curve


@pytest.mark.timeout(180)
def test_run_300_round_trips_per_loop(tmp_path):
    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("me-bench-curve-")}
    out = tmp_path / "curve.json"
    assert curve.main(["--accounts", "200", "--checks", "300", "--warmup", "30", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    for key in ("floor_plain", "floor_curve", "engine_plain", "engine_curve"):
        assert doc[key]["count"] == 300, key
    assert doc["engine_curve_cost_p50_us"] == doc["engine_curve"]["p50"] - doc["engine_plain"]["p50"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("me-bench-curve-")} == before

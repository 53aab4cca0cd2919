"""Smoke test of the acknowledgement benchmark (bench/acks.py): a tiny run through the
command line writes its JSON and PNG, every frame it sent was acknowledged code 0 and
applied (the bench asserts the codes; ``complete`` checks the legs and exit codes), in
both journal modes. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from bench import acks


@pytest.mark.timeout(180)
def test_run_200_frames_each_mode(tmp_path):
    out = tmp_path / "acks.json"
    assert acks.main(["--accounts", "500", "--frames", "200", "--deposits", "50", "--warmup", "20",
                      "--dir", str(tmp_path), "--json", str(out), "--quiet"]) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] is True
    for mode in ("interval", "ack"):
        r = doc[mode]
        # (20 warmup + 200 + 200) frames of 10 fills, 2 legs a fill = 8,400 legs
        assert (r["legs_applied"], r["legs_expected"]) == (8_400, 8_400)
        assert r["fills_ack_rtt_us"]["count"] == 200 and r["deposit_rtt_us"]["count"] == 50
        assert r["journal_bytes"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("me-bench-acks-")] == []

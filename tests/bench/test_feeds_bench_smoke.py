"""Smoke test of the feeds benchmark (bench/feeds.py): a tiny run against a real engine
(supervisor, gateway, workers; ipc sockets under a temporary directory) writes its JSON
and PNG, every fill sent is applied (two legs each), and order checks are answered. No
timing is asserted."""

from __future__ import annotations

import json

import pytest

from bench import feeds

REQUIRED = ("floor_rtt_p50_us", "floor_rtt_p99_us", "order_check_p50_us", "order_check_p99_us",
            "fills_per_s", "fills_batched_per_s")
EXTRAS = ("hardware", "settings", "intake_fills_per_s", "intake_fills_batched_per_s",
          "order_check_throughput_per_s", "intake_unblocked_fills_per_s", "targets", "floor",
          "order_check", "fills")


@pytest.mark.timeout(120)
def test_run_3000_fills_300_checks(tmp_path):
    out = tmp_path / "feeds.json"
    result = feeds.run(out, accounts=200, checks=300, warmup=50, throughput_checks=300, inflight=16,
                       fills=3000, batch=50, workers=1, timeout_s=60, quiet=True)

    doc = json.loads(out.read_text())
    for key in REQUIRED + EXTRAS:
        assert key in doc, key
    assert doc == json.loads(json.dumps(result))
    for key in REQUIRED:
        assert doc[key] > 0, key
    for label, per_frame in (("single", 1), ("batched", 50)):
        run = doc["fills"][label]
        assert run["frames"] == 3000 // per_frame            # 3000 fills / 50 per frame = 60 frames
        assert run["legs_applied"] == run["legs_expected"] == 2 * 3000   # two legs per fill
        assert not run["timed_out"]
    assert doc["applied_equals_sent"]
    assert doc["legs_applied"] == 2 * doc["fills_sent"]
    assert doc["order_check"]["rtt_us"]["count"] == 300
    assert doc["settings"]["workers"] == 1
    assert (tmp_path / "feeds.png").stat().st_size > 0

"""Smoke test of the end-to-end latency benchmark (bench/latency.py): a 2000-account book,
floors and engine over real processes and tcp sockets, about 3 s of ticks per run; the
JSON has its keys and the orders were matched to the ticks that caused them. No timing
is asserted."""

from __future__ import annotations

import json
import os

import pytest

from bench import latency

REQUIRED = ("floor_p50_us", "floor_p99_us", "engine_p50_us", "engine_p99_us", "engine_p999_us",
            "accounts", "holders", "rate")
EXTRAS = ("floor_p90_us", "floor_p999_us", "floor_max_us", "floor2_p50_us", "floor2_p99_us",
          "engine_p90_us", "engine_max_us", "engine_last_p50_us", "engine_last_p99_us",
          "max_rate_p99_under_1ms", "breakdown_us", "sweep", "hardware", "settings", "targets",
          "floor_after_p50_us", "floor_after_p99_us", "floor_bracket_p50_us", "floor_bracket_p99_us",
          "floor_before_p50_us", "floor_before_p99_us")


@pytest.mark.timeout(120)
def test_run_2000_accounts(tmp_path):
    out = tmp_path / "latency.json"
    # The 200 holders of the ticked instrument in slices of 16: each holders' pass (1b)
    # runs in 13 slices, ticks arriving between them, as a million-account book's passes
    # do (8,192 holders a slice); the orders must still match the staircase exactly.
    result = latency.run(accounts=2000, holders_fraction=0.1, rate=100, json_out=out, duration_s=2.6,
                         per_tick=2, leg_s=0.2, sweep=True, sweep_rates=(200,), sweep_duration_s=2.6,
                         quiet=True, rounds=2, holders_slice=16)

    doc = json.loads(out.read_text())
    for key in REQUIRED + EXTRAS:
        assert key in doc, key
    assert doc == result
    assert (doc["accounts"], doc["holders"], doc["rate"]) == (2000, 200, 100.0)
    assert doc["settings"]["holders_slice"] == 16
    c = doc["engine"]["counts"]
    # every measured tick breaches exactly per_tick staircase accounts; their orders came
    # back carrying the tick's seq (or a later one when the worker coalesced ticks)
    assert c["ticks"] >= 40
    assert c["ticks_with_all_orders"] >= 0.95 * c["ticks"]
    assert c["matched_by_tick_seq"] >= 0.9 * c["expected_orders"]
    assert c["unexpected_account"] == 0 and c["reissued"] == 0 and c["before_expected_tick"] == 0
    assert all(doc[f]["lost"] == 0 for f in ("floor", "floor_before", "floor2", "floor_after"))
    # two rounds of (floor block, engine block), pooled: each block's schedule has
    # settings.block_bursts bursts, so the pooled floor holds twice one block's ticks
    assert doc["settings"]["rounds"] == 2
    assert doc["floor"]["blocks"] == 2 and len(doc["engine"]["block_p99_us"]) == 2
    assert doc["floor"]["ticks"] == c["ticks"] == doc["settings"]["measured_ticks"]
    # the targets are held to the interleaved floor; the isolated floors' mean is beside it
    assert doc["targets"]["engine_p99_minus_floor_p99_us"] == doc["engine_p99_us"] - doc["floor_p99_us"]
    assert doc["targets"]["engine_p99_le_floor_p99_plus_60us"] == \
        (doc["engine_p99_us"] <= doc["floor_p99_us"] + 60)
    assert doc["floor_bracket_p50_us"] == (doc["floor_before_p50_us"] + doc["floor_after_p50_us"]) / 2
    # and round by round: each engine block against the floor block just before it
    p99 = doc["targets"]["paired_p99"]
    assert p99["rounds"] == 2 and p99["gaps_us"] == [
        e - f for f, e in zip(doc["floor"]["block_p99_us"], doc["engine"]["block_p99_us"])]
    for key in ("send2_to_markprice_recv", "markprice_recv_to_decided", "decided_to_sent",
                "sent_to_load_recv"):
        assert doc["breakdown_us"][key]["count"] > 0, key
    assert len(doc["sweep"]) == 1 and doc["sweep"][0]["rate"] == 200
    assert doc["sweep"][0]["floor"]["count"] > 0           # the floor at the sweep's rate
    assert doc["book"]["liq_price_max_rel_err"] <= 1e-7
    assert (tmp_path / "latency.png").stat().st_size > 0
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(doc["settings"]["shm_name"])]


def test_paired_gaps_round_by_round():
    # floor blocks 200, 180, 250 us; engine blocks 210, 240, 240 us -> gaps +10, +60, -10:
    # median +10; within a 15 us target: +10 and -10, 2 of 3 rounds
    d = latency.paired_gaps([200.0, 180.0, 250.0], [210.0, 240.0, 240.0], 15.0)
    assert d == {"gaps_us": [10.0, 60.0, -10.0], "median_us": 10.0, "rounds_within": 2, "rounds": 3}
    # a block without ticks (None) drops its round; none left gives no median
    assert latency.paired_gaps([200.0, None], [None, 230.0], 15.0) == \
        {"gaps_us": [], "median_us": None, "rounds_within": 0, "rounds": 0}

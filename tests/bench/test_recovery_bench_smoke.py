"""Smoke test of the recovery benchmark (bench/recovery.py): a tiny run writes its JSON
and PNG through the command line, replays every fill it journaled, and loads back the
book it snapshotted (the bench asserts both). No timing is asserted."""

from __future__ import annotations

import json

import pytest

from bench import recovery


@pytest.mark.timeout(120)
def test_run_2000_accounts_3000_fills(tmp_path):
    out = tmp_path / "recovery.json"
    assert recovery.main(["--accounts", "2000", "--fills", "3000", "--reps", "1", "--dir", str(tmp_path),
                          "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert (doc["accounts"], doc["fills"], doc["batch"]) == (2000, 3000, 100)
    # 3000 fills / 100 a frame = 30 records, every one decoded and replayed
    for key in ("copy_book_s", "raw_copy_s", "snapshot_write_s", "raw_write_fsync_s", "snapshot_load_s", "raw_read_s", "replay_s",
                "decode_only_s", "replay_fills_per_s", "decode_only_fills_per_s",
                "replay_reference_s", "replay_reference_fills_per_s", "drain_ns_per_leg",
                "drain_in_cache_ns_per_leg"):
        assert doc[key] > 0, key
    # 2000 accounts: 128-byte rows and 8 32-byte slots each = 768,000 bytes, plus the
    # partition row (128), before the npz framing
    assert doc["raw_bytes"] == 2000 * (128 + 8 * 32) + 128
    assert doc["snapshot_bytes"] > doc["raw_bytes"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("me-bench-recovery-")] == []

"""Smoke test of the kernel benchmark (bench/kernel.py): it runs end to end on a small
book, writes its JSON and PNG, removes its shared-memory segment, and its numpy version
of the rule agrees with the Cython kernel. No timing is asserted."""

from __future__ import annotations

import json
import os

from bench import kernel

REQUIRED = ("cython_ms", "numpy_ms", "reference_ms", "bandwidth_floor_ms", "incremental_tick_us",
            "accounts", "positions")
EXTRAS = ("cython_ms_p90", "ratios", "holders", "incremental_tick_p99_us", "hardware",
          "reference_kind", "reference_sample")


def test_run_2000_accounts_4_positions(tmp_path):
    out = tmp_path / "kernel.json"
    result = kernel.run(accounts=2000, positions=4, json_out=out, plot_out=None,
                        reference_sample=100, reps=2, ticks=10, quiet=True)

    doc = json.loads(out.read_text())
    for key in REQUIRED + EXTRAS:
        assert key in doc, key
    assert doc == json.loads(json.dumps(result))
    assert (doc["accounts"], doc["positions"]) == (2000, 4)
    assert doc["holders"] == 200                        # exactly 10 % hold instrument 0
    assert doc["reference_kind"] in ("fractions", "python-float")
    # numpy written in the kernel's operation and summation order: same figures, same status
    assert doc["agreement"]["agree"]
    assert doc["agreement"]["max_rel_diff"] <= 1e-9
    assert doc["agreement"]["status_mismatches"] == 0
    assert doc["reference_agreement"]["status_mismatches"] == 0
    assert doc["incremental"]["max_rel_diff_vs_numpy"] <= 1e-9
    # the pass split over threads writes exactly what the one-thread pass wrote
    bd = doc["bound"]
    assert bd["parallel_agrees"] is True
    assert bd["threads"] == len(os.sched_getaffinity(0))
    assert bd["in_cache_rows"] == 2000                  # min(CACHE_ROWS = 4096, 2000 accounts)
    assert bd["rounds"] == 6                            # 3 x reps, interleaved
    assert bd["cython_over_floor_by_round"] > 0 and bd["cython_parallel_over_parallel_floor_by_round"] > 0
    assert bd["in_cache_ns_per_account"] > 0 and bd["setup_us_per_call"] > 0
    assert bd["cython_parallel_over_parallel_floor"] == (
        bd["cython_parallel_ms"] / bd["bandwidth_floor_parallel_ms"])
    assert (tmp_path / "kernel.png").stat().st_size > 0
    assert not os.path.exists(f"/dev/shm/me-bench-{os.getpid()}")


def test_numpy_pass_matches_kernel_with_fewer_positions_than_slots():
    """Accounts with different position counts (masked slots) still agree exactly."""
    import numpy as np

    from engine.risk import margin

    store = kernel.build_store(None, 500, 3, seed=7, quiet=True)
    try:
        store.accounts["n_positions"][:500:2] = 1          # every other account: 1 position
        snap = store.price_snapshot()
        margin.full_pass(store, 0, snap)
        want = store.accounts[:500].copy()
        got = kernel.numpy_pass(store, 0, snap, write=False)
        for f in ("collateral_usd", "cross_equity_usd", "cross_im_usd", "cross_mm_usd", "status"):
            np.testing.assert_array_equal(got[f], want[f], err_msg=f)
    finally:
        store.detach()

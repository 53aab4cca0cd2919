"""Compare the engine's mark with Binance's published mark during the 2025-10-10 crash.

Replays every Gemini BTCUSD trade of 2025-10-10 (UTC) through ``MarkPriceCalculator``
and, at each minute's close, compares the engine's mark with the close of Binance
COIN-M ``BTCUSD_PERP`` 1-minute mark-price klines (bar close at ``ts_ns + 60 s``, the
replay's bar rule). Writes per-minute absolute and relative differences with
p50/p99/max as JSON, and a PNG plot (matplotlib, Agg backend).

Settings and why:

- one venue (Gemini is the only real BTCUSD trade record of that day in the data set,
  and nothing is synthesized), so ``quorum = 1``;
- ``staleness = 120 s``: Gemini is thin (p99 gap between trades 45 s, 20 gaps over
  120 s); a stale venue freezes the mark at its last good value, which here is the last
  trade anyway;
- no basis samples: no matching-engine mid of a BTCUSD perpetual is in the data set, so
  ``mark = index``. The reference is a perpetual's mark, so part of the difference is
  that contract's own basis and Binance's multi-venue index.

Usage::

    python bench/mark_vs_reference.py --json bench/results/mark_vs_binance_2025-10-10.json
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from feeds.oracle.index import NS_PER_S, MarkPriceCalculator, OracleParams  # noqa: E402
from feeds.oracle.replay import (CRASH_BINANCE_MARK_1M, CRASH_GEMINI_TRADES,  # noqa: E402
                                 data_dir, trade_ticks)

INSTRUMENT = "BTC-USD"
DAY_START_NS = int(datetime(2025, 10, 10, tzinfo=timezone.utc).timestamp()) * NS_PER_S
DAY_END_NS = DAY_START_NS + 86_400 * NS_PER_S
PARAMS = OracleParams(staleness_ns=120 * NS_PER_S, quorum=1)
DEFAULT_JSON = REPO_ROOT / "bench" / "results" / "mark_vs_binance_2025-10-10.json"


def reference_closes(path: Path) -> list[tuple[int, float]]:
    """Return (close time ns, close mark price) of the reference bars closing on the day."""
    closes = []
    with gzip.open(path, "rt", newline="") as handle:
        for row in csv.DictReader(handle):
            close_ns = int(row["ts_ns"]) + int(row["interval_s"]) * NS_PER_S
            if DAY_START_NS < close_ns <= DAY_END_NS:
                closes.append((close_ns, float(row["close"])))
    return sorted(closes)


def replay(root: Path) -> dict:
    """Run the replay and return the per-minute comparison and its summary."""
    calc = MarkPriceCalculator(PARAMS)
    ticks = iter(trade_ticks(root / CRASH_GEMINI_TRADES, INSTRUMENT, symbols=["BTCUSD"],
                             start_ns=DAY_START_NS, end_ns=DAY_END_NS))
    pending = next(ticks, None)
    n_ticks = n_events = 0
    minutes = []
    for close_ns, ref_price in reference_closes(root / CRASH_BINANCE_MARK_1M):
        # invariant: every tick with venue_ts_ns <= close_ns has been applied
        while pending is not None and pending.venue_ts_ns <= close_ns:
            code, events = calc.on_tick(*pending, now_ns=pending.venue_ts_ns)
            n_ticks += code == 0
            n_events += len(events)
            pending = next(ticks, None)
        n_events += len(calc.on_timer(close_ns))
        state = calc.state(INSTRUMENT, close_ns)
        if state.mark is None:
            continue
        minutes.append({"close_ts_ns": close_ns, "engine_mark": state.mark,
                        "reference_mark": ref_price, "frozen": state.frozen,
                        "abs_diff": abs(state.mark - ref_price),
                        "rel_diff": abs(state.mark - ref_price) / ref_price})
    abs_diff = np.array([m["abs_diff"] for m in minutes])
    rel_diff = np.array([m["rel_diff"] for m in minutes])

    def summary(values: np.ndarray) -> dict:
        return {"p50": float(np.percentile(values, 50)),
                "p99": float(np.percentile(values, 99)), "max": float(values.max())}

    return {
        "what": "engine mark (Gemini BTCUSD trades, one venue) vs Binance COIN-M "
                "BTCUSD_PERP 1m mark-price kline close, 2025-10-10 UTC",
        "params": {"staleness_ns": PARAMS.staleness_ns, "quorum": PARAMS.quorum,
                   "max_deviation": PARAMS.max_deviation, "max_basis": PARAMS.max_basis,
                   "basis_samples": 0},
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "n_ticks_accepted": n_ticks,
        "n_events": n_events,
        "n_minutes": len(minutes),
        "n_minutes_frozen": sum(m["frozen"] for m in minutes),
        "abs_diff_usd": summary(abs_diff),
        "rel_diff": summary(rel_diff),
        "minutes": minutes,
    }


def plot(result: dict, path: Path) -> None:
    """Write the two mark series and the relative difference as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = result["minutes"]
    hours = [(m["close_ts_ns"] - DAY_START_NS) / (3600 * NS_PER_S) for m in minutes]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.plot(hours, [m["reference_mark"] for m in minutes], lw=0.8,
             label="Binance COIN-M BTCUSD_PERP mark (1m close)")
    top.plot(hours, [m["engine_mark"] for m in minutes], lw=0.8,
             label="engine mark (Gemini BTCUSD trades)")
    top.set_ylabel("USD")
    top.legend(loc="lower left")
    top.set_title("2025-10-10: engine mark vs Binance mark, minute by minute")
    bottom.plot(hours, [1e4 * m["rel_diff"] for m in minutes], lw=0.8, color="tab:red")
    bottom.set_ylabel("|diff| (bp)")
    bottom.set_xlabel("hour (UTC)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help="output JSON path; the PNG goes beside it (.png)")
    parser.add_argument("--data", type=Path, default=None,
                        help="data directory (default: $MARGIN_ENGINE_DATA or ../shared/data)")
    args = parser.parse_args(argv)
    root = args.data or data_dir()
    if not (root / CRASH_GEMINI_TRADES).exists():
        print(f"data not found under {root}", file=sys.stderr)
        return 2
    result = replay(root)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    plot(result, args.json.with_suffix(".png"))
    print(f"minutes={result['n_minutes']} frozen={result['n_minutes_frozen']} "
          f"abs_diff_usd p50={result['abs_diff_usd']['p50']:.2f} "
          f"p99={result['abs_diff_usd']['p99']:.2f} max={result['abs_diff_usd']['max']:.2f} "
          f"rel_diff p50={result['rel_diff']['p50']:.5f} p99={result['rel_diff']['p99']:.5f} "
          f"max={result['rel_diff']['max']:.5f}")
    print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Replay recorded market data (gzip CSVs under the shared data directory) as oracle ticks.

The data is read in place, never copied into the repository. Its directory is
``$MARGIN_ENGINE_DATA`` if set, else ``../shared/data`` relative to the repository root.

Tick timing:

- trade files (``ts_ns``, ``price``): one tick per trade at the trade's ``ts_ns``;
- bar files (``ts_ns`` = bar open, ``interval_s``, ``close``): one tick per bar, the
  bar's ``close`` at the bar's close time ``ts_ns + interval_s * 1e9`` (a close is not
  known before the bar ends, so an earlier time would leak the future).

Each tick's venue is ``"<venue>:<symbol>"`` (for example ``kraken:XBTUSDC``): one quote
currency of one exchange is one index constituent.
"""

from __future__ import annotations

import csv
import gzip
import heapq
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from feeds.oracle.index import NS_PER_S, Tick

DATA_ENV = "MARGIN_ENGINE_DATA"
REPO_ROOT = Path(__file__).resolve().parents[2]

DEPEG_BARS = "usdc_depeg_2023-03_btc_bars_binanceus_kraken.csv.gz"
CRASH_GEMINI_TRADES = "crash_2025-10-10_gemini_trades_btcusd_ethusd.csv.gz"
CRASH_BINANCE_MARK_1M = "crash_2025-10-10_binance_coinm_btcusd_perp_markprice_1m.csv.gz"


def data_dir() -> Path:
    """Return ``$MARGIN_ENGINE_DATA`` or ``<repo root>/../shared/data``."""
    configured = os.environ.get(DATA_ENV)
    return Path(configured) if configured else (REPO_ROOT.parent / "shared" / "data")


def _rows(path: Path) -> Iterator[dict[str, str]]:
    with gzip.open(path, "rt", newline="") as handle:
        yield from csv.DictReader(handle)


def _sorted_by_ts(ticks: Iterable[Tick]) -> list[Tick]:
    # stable: ticks with equal timestamps keep file order
    return sorted(ticks, key=lambda tick: tick.venue_ts_ns)


def bar_ticks(path: Path, instrument: str, symbols: Iterable[str] | None = None,
              start_ns: int | None = None, end_ns: int | None = None) -> Iterator[Tick]:
    """Yield bar closes as ticks at bar close time, in time order.

    ``symbols`` keeps only those symbols (all when ``None``); ``start_ns <= tick time <
    end_ns`` bounds the window. The file is read once and sorted in memory because bars
    of different intervals close out of file order.
    """
    wanted = None if symbols is None else set(symbols)
    ticks = []
    for row in _rows(path):
        if wanted is not None and row["symbol"] not in wanted:
            continue
        close_ns = int(row["ts_ns"]) + int(row["interval_s"]) * NS_PER_S
        if (start_ns is not None and close_ns < start_ns) or (
                end_ns is not None and close_ns >= end_ns):
            continue
        ticks.append(Tick(instrument, f"{row['venue']}:{row['symbol']}",
                          float(row["close"]), close_ns))
    yield from _sorted_by_ts(ticks)


def trade_ticks(path: Path, instrument: str, symbols: Iterable[str] | None = None,
                start_ns: int | None = None, end_ns: int | None = None) -> Iterator[Tick]:
    """Yield trades as ticks at their exchange ``ts_ns``, in time order."""
    wanted = None if symbols is None else set(symbols)
    ticks = []
    for row in _rows(path):
        if wanted is not None and row["symbol"] not in wanted:
            continue
        ts_ns = int(row["ts_ns"])
        if (start_ns is not None and ts_ns < start_ns) or (
                end_ns is not None and ts_ns >= end_ns):
            continue
        ticks.append(Tick(instrument, f"{row['venue']}:{row['symbol']}",
                          float(row["price"]), ts_ns))
    yield from _sorted_by_ts(ticks)


def merge(*streams: Iterable[Tick]) -> Iterator[Tick]:
    """Merge time-ordered tick streams into one time-ordered stream."""
    return heapq.merge(*streams, key=lambda tick: tick.venue_ts_ns)


def paced(ticks: Iterable[Tick], speed: float = 1.0,
          clock_ns: Callable[[], int] = time.monotonic_ns,
          sleep_s: Callable[[float], None] = time.sleep) -> Iterator[Tick]:
    """Yield ``ticks`` paced to their timestamps.

    ``speed`` 1.0 is recorded speed, 60.0 is one recorded minute per second, and
    ``math.inf`` is as fast as possible (no sleeping). Tick ``k`` is released at
    ``t0 + (ts_k - ts_0) / speed`` on ``clock_ns``, measured from the first tick, so a
    slow consumer does not accumulate drift.
    """
    if not speed > 0:
        raise ValueError(f"speed must be > 0, got {speed!r}")
    first_ts_ns = start_ns = None
    for tick in ticks:
        if math.isinf(speed):
            yield tick
            continue
        if first_ts_ns is None:
            first_ts_ns, start_ns = tick.venue_ts_ns, clock_ns()
        due_ns = start_ns + (tick.venue_ts_ns - first_ts_ns) / speed
        wait_ns = due_ns - clock_ns()
        if wait_ns > 0:
            sleep_s(wait_ns / NS_PER_S)
        yield tick

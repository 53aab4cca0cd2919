"""Venue adapters: the venues' own documented example messages, then malformed ones."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.codes import Code
from feeds.oracle.adapters import (VENUE_BINANCE_USDM, VENUE_BYBIT, VENUE_KRAKEN,
                                   binance_usdm_mark_price, bybit_v5_ticker,
                                   kraken_v2_ticker, rfc3339_to_ns)
from feeds.oracle.index import MarkPriceCalculator, Tick

MS = 1_000_000  # ns per ms

# Binance USD-M futures, "Mark Price Stream" (<symbol>@markPrice), Response Example:
# https://developers.binance.com/docs/derivatives/usds-margined-futures/websocket-market-streams/Mark-Price-Stream
# (read from its mirror developers.binance.me; the // field comments removed to make it JSON)
BINANCE_USDM_MARK_PRICE_DOC = json.loads("""
{
  "e": "markPriceUpdate",
  "E": 1562305380000,
  "s": "BTCUSDT",
  "p": "11794.15000000",
  "i": "11784.62659091",
  "P": "11784.25641265",
  "r": "0.00038167",
  "T": 1562306400000
}
""")

# Kraken Spot WebSocket v2, "ticker" channel, snapshot/update example:
# https://docs.kraken.com/exchange/api-reference/spot-websocket-v2/ticker
# (read from the same docs on kraken-sandbox.mintlify.app/exchange/api-reference/spot-websocket-v2/ticker)
KRAKEN_V2_TICKER_DOC = json.loads("""
{
  "channel": "ticker",
  "type": "snapshot",
  "data": [
    {
      "symbol": "ALGO/USD",
      "bid": 0.10025,
      "bid_qty": 740.0,
      "ask": 0.10036,
      "ask_qty": 1361.44813783,
      "last": 0.10035,
      "volume": 997038.98383185,
      "vwap": 0.10148,
      "low": 0.09979,
      "high": 0.10285,
      "change": -0.00017,
      "change_pct": -0.17,
      "timestamp": "2023-09-25T09:04:31.742648Z"
    }
  ]
}
""")

# Bybit v5 WebSocket public "Ticker" (tickers.{symbol}), Response Example, Linear tab:
# https://bybit-exchange.github.io/docs/v5/websocket/public/ticker
# (source file docs/v5/websocket/public/ticker.mdx in github.com/bybit-exchange/docs)
BYBIT_V5_LINEAR_TICKER_DOC = json.loads("""
{
  "topic": "tickers.BTCUSDT",
  "type": "snapshot",
  "data": {
    "symbol": "BTCUSDT",
    "tickDirection": "PlusTick",
    "price24hPcnt": "0.017103",
    "lastPrice": "17216.00",
    "prevPrice24h": "16926.50",
    "highPrice24h": "17281.50",
    "lowPrice24h": "16915.00",
    "prevPrice1h": "17238.00",
    "markPrice": "17217.33",
    "indexPrice": "17227.36",
    "openInterest": "68744.761",
    "openInterestValue": "1183601235.91",
    "turnover24h": "1570383121.943499",
    "volume24h": "91705.276",
    "nextFundingTime": "1673280000000",
    "fundingRate": "-0.000212",
    "bid1Price": "17215.50",
    "bid1Size": "84.489",
    "ask1Price": "17216.00",
    "ask1Size": "83.020"
  },
  "cs": 24987956059,
  "ts": 1673272861686
}
""")

BINANCE_SYMBOLS = {"BTCUSDT": "BTC-USDT"}
KRAKEN_SYMBOLS = {"ALGO/USD": "ALGO-USD"}
BYBIT_SYMBOLS = {"BTCUSDT": "BTC-USDT"}


def test_binance_usdm_mark_price_documented_example():
    code, ticks = binance_usdm_mark_price(BINANCE_USDM_MARK_PRICE_DOC, BINANCE_SYMBOLS)
    # p = "11794.15000000"; E = 1562305380000 ms -> * 1e6 ns
    assert (code, ticks) == (Code.OK, [Tick("BTC-USDT", VENUE_BINANCE_USDM, 11794.15,
                                            1562305380000 * MS)])


def test_binance_usdm_index_price_field():
    _, ticks = binance_usdm_mark_price(BINANCE_USDM_MARK_PRICE_DOC, BINANCE_SYMBOLS,
                                       price_field="i")
    assert ticks[0].price == 11784.62659091


def test_kraken_v2_ticker_documented_example():
    code, ticks = kraken_v2_ticker(KRAKEN_V2_TICKER_DOC, KRAKEN_SYMBOLS)
    assert code is Code.OK and len(ticks) == 1
    tick = ticks[0]
    assert (tick.instrument, tick.venue) == ("ALGO-USD", VENUE_KRAKEN)
    assert tick.price == pytest.approx(0.100305, abs=1e-15)  # (0.10025 + 0.10036) / 2
    # 2023-09-25T09:04:31Z = 1695632671 s (calendar.timegm), + 0.742648 s
    assert tick.venue_ts_ns == 1695632671 * 1_000_000_000 + 742_648_000


def test_bybit_v5_linear_ticker_documented_example():
    code, ticks = bybit_v5_ticker(BYBIT_V5_LINEAR_TICKER_DOC, BYBIT_SYMBOLS)
    # mid = (17215.50 + 17216.00) / 2 = 17215.75; ts = 1673272861686 ms
    assert (code, ticks) == (Code.OK, [Tick("BTC-USDT", VENUE_BYBIT, 17215.75,
                                            1673272861686 * MS)])


def test_bybit_delta_without_book_falls_back_to_last_price():
    delta = {"topic": "tickers.BTCUSDT", "type": "delta", "ts": 1673272861786,
             "data": {"symbol": "BTCUSDT", "lastPrice": "17220.00"}}
    assert bybit_v5_ticker(delta, BYBIT_SYMBOLS) == (
        Code.OK, [Tick("BTC-USDT", VENUE_BYBIT, 17220.0, 1673272861786 * MS)])
    del delta["data"]["lastPrice"]
    assert bybit_v5_ticker(delta, BYBIT_SYMBOLS) == (Code.WIRE_MISSING_FIELD, [])


def test_rfc3339_fractions_to_nanoseconds():
    assert rfc3339_to_ns("1970-01-01T00:00:01Z") == 1_000_000_000
    assert rfc3339_to_ns("1970-01-01T00:00:00.5Z") == 500_000_000
    assert rfc3339_to_ns("1970-01-01T00:00:00.000000001Z") == 1


def mutated(doc, path, value):
    """Return a deep copy of ``doc`` with ``path`` set to ``value`` (or deleted)."""
    out = copy.deepcopy(doc)
    target = out
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return out


DELETE = object()


@pytest.mark.parametrize("adapter, symbols, msg, expected", [
    pytest.param(binance_usdm_mark_price, BINANCE_SYMBOLS, None, Code.WIRE_NOT_A_MAP,
                 id="binance-none"),
    pytest.param(binance_usdm_mark_price, BINANCE_SYMBOLS, [1, 2], Code.WIRE_NOT_A_MAP,
                 id="binance-list"),
    pytest.param(binance_usdm_mark_price, BINANCE_SYMBOLS,
                 mutated(BINANCE_USDM_MARK_PRICE_DOC, ["e"], "kline"), Code.WIRE_UNKNOWN_TYPE,
                 id="binance-other-event"),
    pytest.param(binance_usdm_mark_price, BINANCE_SYMBOLS,
                 mutated(BINANCE_USDM_MARK_PRICE_DOC, ["p"], DELETE), Code.WIRE_MISSING_FIELD,
                 id="binance-no-price"),
    pytest.param(binance_usdm_mark_price, BINANCE_SYMBOLS,
                 mutated(BINANCE_USDM_MARK_PRICE_DOC, ["p"], "NaN"), Code.ORACLE_BAD_PRICE,
                 id="binance-nan-price"),
    pytest.param(binance_usdm_mark_price, BINANCE_SYMBOLS,
                 mutated(BINANCE_USDM_MARK_PRICE_DOC, ["p"], "0.00000000"),
                 Code.ORACLE_BAD_PRICE, id="binance-zero-price"),
    pytest.param(binance_usdm_mark_price, BINANCE_SYMBOLS,
                 mutated(BINANCE_USDM_MARK_PRICE_DOC, ["p"], "abc"), Code.WIRE_BAD_FIELD_TYPE,
                 id="binance-text-price"),
    pytest.param(binance_usdm_mark_price, BINANCE_SYMBOLS,
                 mutated(BINANCE_USDM_MARK_PRICE_DOC, ["E"], "soon"), Code.WIRE_BAD_FIELD_TYPE,
                 id="binance-text-time"),
    pytest.param(binance_usdm_mark_price, BINANCE_SYMBOLS,
                 mutated(BINANCE_USDM_MARK_PRICE_DOC, ["s"], "ETHUSDT"),
                 Code.ORACLE_UNKNOWN_INSTRUMENT, id="binance-unmapped-symbol"),
    pytest.param(kraken_v2_ticker, KRAKEN_SYMBOLS,
                 mutated(KRAKEN_V2_TICKER_DOC, ["data"], []), Code.WIRE_BAD_VALUE,
                 id="kraken-empty-data"),
    pytest.param(kraken_v2_ticker, KRAKEN_SYMBOLS,
                 mutated(KRAKEN_V2_TICKER_DOC, ["data", 0, "bid"], 0.2), Code.ORACLE_BAD_PRICE,
                 id="kraken-crossed-book"),
    pytest.param(kraken_v2_ticker, KRAKEN_SYMBOLS,
                 mutated(KRAKEN_V2_TICKER_DOC, ["data", 0, "ask"], None),
                 Code.WIRE_BAD_FIELD_TYPE, id="kraken-ask-null"),
    pytest.param(kraken_v2_ticker, KRAKEN_SYMBOLS,
                 mutated(KRAKEN_V2_TICKER_DOC, ["data", 0, "timestamp"], "yesterday"),
                 Code.WIRE_BAD_VALUE, id="kraken-bad-timestamp"),
    pytest.param(kraken_v2_ticker, KRAKEN_SYMBOLS,
                 mutated(KRAKEN_V2_TICKER_DOC, ["data", 0, "timestamp"],
                         "2023-02-30T00:00:00Z"), Code.WIRE_BAD_VALUE, id="kraken-no-such-day"),
    pytest.param(kraken_v2_ticker, KRAKEN_SYMBOLS,
                 mutated(KRAKEN_V2_TICKER_DOC, ["channel"], "book"), Code.WIRE_UNKNOWN_TYPE,
                 id="kraken-other-channel"),
    pytest.param(kraken_v2_ticker, KRAKEN_SYMBOLS,
                 mutated(KRAKEN_V2_TICKER_DOC, ["data", 0], "ALGO/USD"), Code.WIRE_NOT_A_MAP,
                 id="kraken-entry-not-map"),
    pytest.param(bybit_v5_ticker, BYBIT_SYMBOLS,
                 mutated(BYBIT_V5_LINEAR_TICKER_DOC, ["topic"], "orderbook.50.BTCUSDT"),
                 Code.WIRE_UNKNOWN_TYPE, id="bybit-other-topic"),
    pytest.param(bybit_v5_ticker, BYBIT_SYMBOLS,
                 mutated(BYBIT_V5_LINEAR_TICKER_DOC, ["data", "bid1Price"], "-1"),
                 Code.ORACLE_BAD_PRICE, id="bybit-negative-bid"),
    pytest.param(bybit_v5_ticker, BYBIT_SYMBOLS,
                 mutated(BYBIT_V5_LINEAR_TICKER_DOC, ["data", "ask1Price"], ""),
                 Code.WIRE_BAD_FIELD_TYPE, id="bybit-empty-ask"),
    pytest.param(bybit_v5_ticker, BYBIT_SYMBOLS,
                 mutated(BYBIT_V5_LINEAR_TICKER_DOC, ["ts"], True), Code.WIRE_BAD_FIELD_TYPE,
                 id="bybit-bool-ts"),
    pytest.param(bybit_v5_ticker, BYBIT_SYMBOLS,
                 mutated(BYBIT_V5_LINEAR_TICKER_DOC, ["data"], "x"), Code.WIRE_NOT_A_MAP,
                 id="bybit-data-not-map"),
])
def test_malformed_message_is_rejected_with_code(adapter, symbols, msg, expected):
    assert adapter(msg, symbols) == (expected, [])


def test_adapter_ticks_feed_the_calculator():
    calc = MarkPriceCalculator()
    _, binance = binance_usdm_mark_price(BINANCE_USDM_MARK_PRICE_DOC, BINANCE_SYMBOLS)
    _, bybit = bybit_v5_ticker(BYBIT_V5_LINEAR_TICKER_DOC, BYBIT_SYMBOLS)
    for tick in binance + bybit:
        assert calc.on_tick(*tick, now_ns=tick.venue_ts_ns)[0] is Code.OK


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["e", "E", "s", "p", "i", "channel", "type", "data",
                                       "symbol", "bid", "ask", "timestamp", "topic", "ts",
                                       "bid1Price", "ask1Price", "lastPrice"]), inner,
                      max_size=8),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_adapters_never_raise(msg):
    for adapter, symbols in ((binance_usdm_mark_price, BINANCE_SYMBOLS),
                             (kraken_v2_ticker, KRAKEN_SYMBOLS),
                             (bybit_v5_ticker, BYBIT_SYMBOLS)):
        code, ticks = adapter(msg, symbols)
        assert isinstance(code, Code)
        assert (code is Code.OK) == bool(ticks)

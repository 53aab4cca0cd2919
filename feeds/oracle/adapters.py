"""Normalize real venues' ticker messages into oracle ticks.

Each adapter takes one decoded JSON message (a ``dict``, as ``json.loads`` returns it)
and a ``symbol_map`` from the venue's symbol to the engine's instrument name, and
returns ``(Code, list[Tick])``; it never raises. A message for a symbol not in the map
is rejected with ``ORACLE_UNKNOWN_INSTRUMENT``.

Price taken per venue (documented message formats):

========================== =================================== ====================
venue / stream             price                               ``venue_ts_ns``
========================== =================================== ====================
Binance USD-M              ``p`` (mark price; ``i`` = index    ``E`` event time, ms
``<symbol>@markPrice``     price with ``price_field="i"``)
Kraken WS v2 ``ticker``    mid = (``bid`` + ``ask``) / 2       ``timestamp``, RFC 3339
Bybit v5 ``tickers.*``     mid = (``bid1Price`` + ``ask1Price``) top-level ``ts``, ms
                           / 2; ``lastPrice`` in a delta that
                           carries no book
========================== =================================== ====================

A book ticker's mid is ``(bid + ask) / 2``; a crossed or one-sided book
(``bid <= 0``, ``ask <= 0`` or ``bid > ask``) is rejected with ``ORACLE_BAD_PRICE``.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any, Mapping

from engine.codes import Code
from feeds.oracle.index import Tick

NS_PER_MS = 1_000_000

VENUE_BINANCE_USDM = "binance-usdm"
VENUE_KRAKEN = "kraken"
VENUE_BYBIT = "bybit"

_RFC3339 = re.compile(r"^([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2})"
                      r"(?:\.([0-9]{1,9}))?Z$")

Result = tuple[Code, list[Tick]]


class _Reject(Exception):
    """Internal: carries a reject code out of nested field parsing."""

    def __init__(self, code: Code) -> None:
        super().__init__(code)
        self.code = code


def _field(obj: Any, key: str) -> Any:
    if not isinstance(obj, dict):
        raise _Reject(Code.WIRE_NOT_A_MAP)
    if key not in obj:
        raise _Reject(Code.WIRE_MISSING_FIELD)
    return obj[key]


def _price(text: Any) -> float:
    """Parse a decimal price sent as a string or a JSON number; finite and > 0."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise _Reject(Code.WIRE_BAD_FIELD_TYPE)
    try:
        value = float(text)
    except (ValueError, OverflowError):
        raise _Reject(Code.WIRE_BAD_FIELD_TYPE) from None
    if not math.isfinite(value) or value <= 0:
        raise _Reject(Code.ORACLE_BAD_PRICE)
    return value


def _ms_to_ns(value: Any) -> int:
    """Convert epoch milliseconds (JSON integer or digit string) to nanoseconds."""
    if isinstance(value, bool):
        raise _Reject(Code.WIRE_BAD_FIELD_TYPE)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not isinstance(value, int):
        raise _Reject(Code.WIRE_BAD_FIELD_TYPE)
    if value <= 0:
        raise _Reject(Code.WIRE_BAD_VALUE)
    return value * NS_PER_MS


def rfc3339_to_ns(text: Any) -> int:
    """Convert ``YYYY-MM-DDTHH:MM:SS[.fraction]Z`` (UTC) to epoch ns, fraction to 1 ns."""
    if not isinstance(text, str):
        raise _Reject(Code.WIRE_BAD_FIELD_TYPE)
    match = _RFC3339.match(text)
    if match is None:
        raise _Reject(Code.WIRE_BAD_VALUE)
    try:
        whole = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise _Reject(Code.WIRE_BAD_VALUE) from None
    seconds = int(whole.replace(tzinfo=timezone.utc).timestamp())
    fraction_ns = int((match.group(2) or "0").ljust(9, "0"))
    return seconds * 1_000_000_000 + fraction_ns


def _mid(bid: float, ask: float) -> float:
    if bid > ask:
        raise _Reject(Code.ORACLE_BAD_PRICE)
    return 0.5 * (bid + ask)


def _instrument(symbol: Any, symbol_map: Mapping[str, str]) -> str:
    if not isinstance(symbol, str):
        raise _Reject(Code.WIRE_BAD_FIELD_TYPE)
    if symbol not in symbol_map:
        raise _Reject(Code.ORACLE_UNKNOWN_INSTRUMENT)
    return symbol_map[symbol]


def _guarded(parse) -> Result:
    try:
        return Code.OK, parse()
    except _Reject as reject:
        return reject.code, []


def binance_usdm_mark_price(msg: Any, symbol_map: Mapping[str, str],
                            price_field: str = "p") -> Result:
    """Normalize a Binance USD-M ``markPriceUpdate`` (``<symbol>@markPrice[@1s]``).

    ``price_field`` is ``"p"`` (Binance's mark price) or ``"i"`` (its index price);
    ``venue_ts_ns = E * 1e6``.
    """
    def parse() -> list[Tick]:
        if _field(msg, "e") != "markPriceUpdate":
            raise _Reject(Code.WIRE_UNKNOWN_TYPE)
        instrument = _instrument(_field(msg, "s"), symbol_map)
        return [Tick(instrument, VENUE_BINANCE_USDM, _price(_field(msg, price_field)),
                     _ms_to_ns(_field(msg, "E")))]
    return _guarded(parse)


def kraken_v2_ticker(msg: Any, symbol_map: Mapping[str, str]) -> Result:
    """Normalize a Kraken WebSocket v2 ``ticker`` snapshot or update.

    One tick per entry of ``data``: ``price = (bid + ask) / 2``,
    ``venue_ts_ns`` from the entry's RFC 3339 ``timestamp``.
    """
    def parse() -> list[Tick]:
        if _field(msg, "channel") != "ticker":
            raise _Reject(Code.WIRE_UNKNOWN_TYPE)
        if _field(msg, "type") not in ("snapshot", "update"):
            raise _Reject(Code.WIRE_UNKNOWN_TYPE)
        entries = _field(msg, "data")
        if not isinstance(entries, list):
            raise _Reject(Code.WIRE_BAD_FIELD_TYPE)
        if not entries:
            raise _Reject(Code.WIRE_BAD_VALUE)
        ticks = []
        for entry in entries:
            instrument = _instrument(_field(entry, "symbol"), symbol_map)
            mid = _mid(_price(_field(entry, "bid")), _price(_field(entry, "ask")))
            ticks.append(Tick(instrument, VENUE_KRAKEN, mid,
                              rfc3339_to_ns(_field(entry, "timestamp"))))
        return ticks
    return _guarded(parse)


def bybit_v5_ticker(msg: Any, symbol_map: Mapping[str, str]) -> Result:
    """Normalize a Bybit v5 public ``tickers.{symbol}`` message (linear/inverse).

    ``price = (bid1Price + ask1Price) / 2`` when both are present; a ``delta`` carries only
    changed fields, so without both book fields it falls back to ``lastPrice``; with
    neither it is ``WIRE_MISSING_FIELD``. ``venue_ts_ns = ts * 1e6``.
    """
    def parse() -> list[Tick]:
        topic = _field(msg, "topic")
        if not isinstance(topic, str) or not topic.startswith("tickers."):
            raise _Reject(Code.WIRE_UNKNOWN_TYPE)
        if _field(msg, "type") not in ("snapshot", "delta"):
            raise _Reject(Code.WIRE_UNKNOWN_TYPE)
        data = _field(msg, "data")
        instrument = _instrument(_field(data, "symbol"), symbol_map)
        if "bid1Price" in data and "ask1Price" in data:
            price = _mid(_price(data["bid1Price"]), _price(data["ask1Price"]))
        else:
            price = _price(_field(data, "lastPrice"))
        return [Tick(instrument, VENUE_BYBIT, price, _ms_to_ns(_field(msg, "ts")))]
    return _guarded(parse)

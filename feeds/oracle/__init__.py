"""Oracle prices: venue adapters, replay of recorded data, and the index/mark rules."""

from feeds.oracle.index import Event, MarkPriceCalculator, OracleParams, PriceState, Tick

__all__ = ["Event", "MarkPriceCalculator", "OracleParams", "PriceState", "Tick"]

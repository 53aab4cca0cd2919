"""Simulators that speak only the wire protocol (``feeds/protocol.py``) to the engine.

- ``feeds.sim.venues``: oracle venues (a shared "true" price path per instrument, a noisy
  quote of it per venue, outages and spikes, a ``crash`` for the demo) and the replay of
  recorded ticks, sent as ORACLE_TICKs on a PUSH socket.
- ``feeds.sim.matching``: a matching engine that funds accounts (DEPOSIT), checks orders
  (ORDER_CHECK), sends FILLs (one per frame or BATCHed) and fills the engine's
  LIQUIDATION_ORDERs against a backstop account.

Neither imports the engine's store or runtime: they are clients, like a real venue
adapter or matching engine would be. Names are imported lazily so that
``python -m feeds.sim.venues`` / ``python -m feeds.sim.matching`` run cleanly.
"""

_EXPORTS = {
    "VenueSim": "feeds.sim.venues", "run_venues": "feeds.sim.venues",
    "replay_venues": "feeds.sim.venues",
    "MatchingSim": "feeds.sim.matching", "MatchingStats": "feeds.sim.matching",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'feeds.sim' has no attribute {name!r}")

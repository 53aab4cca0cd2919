"""Simulated oracle venues: ORACLE_TICKs on a PUSH socket, as real venue adapters send them.

Price model (``VenueSim``, pure: no sockets, no clock reads; time advances by ``step``):

- *roots*: per underlying base (``BTC`` for ``BTCUSDT``), one "true" price path, a
  geometric random walk ``p <- p * exp(-s^2 dt / 2 + s sqrt(dt) Z)`` (``s`` =
  ``vol_per_sqrt_s``) with occasional jumps (rate ``jump_rate_per_s``, log size
  ``N(0, jump_sigma)``) and any scheduled ``crash`` (a log-linear drop over ``over_s``);
- *followers*: other linear/inverse contracts of the same base (``BTCUSD``,
  ``BTCUSDT-20261225``) move with their root: ``p = p0 * root / root0``;
- *options* (``BASE-YYYYMMDD-STRIKE-C|P``, or ``option_specs``): Black-Scholes (r = 0) on
  the root at the implied volatility that reproduces the start price;
- *assets* (collateral prices): ``BTC``/``ETH``/``STETH`` from their perps' paths
  (``asset_sources``), ``USDT``/``USDC`` fixed at 1.0 (``fixed_assets``).

Each venue quotes every name as ``true * exp(N(0, noise_bps / 1e4))``. Venue faults:
*outages* (the venue sends nothing for a while) and *spikes* (the venue prints
``true * (1 +- spike_pct)`` for ``spike_ticks`` steps), at random (``outage_rate_per_s``,
``spike_rate_per_s``, per venue) or forced (``outage()``, ``spike()``). Everything is
drawn from one ``random.Random(seed)``: the same seed and steps give the same ticks.

``run_venues`` paces a ``VenueSim`` at ``rate_hz`` steps per second and sends every tick
on one PUSH socket (one stream, seq 1, 2, 3, ...); ``replay_venues`` sends recorded ticks
(``feeds/oracle/replay.py``) the same way, re-timed to now so that they are fresh.

CLI::

    python -m feeds.sim.venues --endpoint tcp://127.0.0.1:5701 --duration 10
    python -m feeds.sim.venues --duration 30 --crash BTCUSDT:0.3:5:10   # -30% over 5 s at t=10 s
    python -m feeds.sim.venues --replay depeg --speed 600
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import random
import re
import sys
import threading
import time
from collections import Counter
from typing import Callable, Iterable, Mapping, NamedTuple

import zmq

from feeds.oracle.index import NS_PER_S, Tick
from feeds.protocol import MsgType, Sequencer, encode

YEAR_S = 365.25 * 86_400

#: collateral asset -> (instrument whose path it follows, price ratio)
DEFAULT_ASSET_SOURCES: dict[str, tuple[str, float]] = {
    "BTC": ("BTCUSDT", 1.0),
    "ETH": ("ETHUSDT", 1.0),
    "STETH": ("ETHUSDT", 3390.0 / 3400.0),      # default.toml's price_usd ratio
}
#: collateral assets quoted at a fixed price (plus venue noise)
DEFAULT_FIXED_ASSETS: dict[str, float] = {"USDT": 1.0, "USDC": 1.0}

#: recorded oracle symbol -> engine names it is sent as (replay_venues)
DEFAULT_REPLAY_MAP: dict[str, tuple[str, ...]] = {
    "BTC-USD": ("BTCUSDT", "BTC"),
    "ETH-USD": ("ETHUSDT", "ETH"),
}

_OPTION_RE = re.compile(r"^([A-Z0-9]+)-(\d{8})-(\d+(?:\.\d+)?)-([CP])$")
_QUOTES = ("USDT", "USDC", "USD")


class OptionSpec(NamedTuple):
    """An option priced off ``underlying``'s path (Black-Scholes, r = 0)."""

    underlying: str
    strike: float
    is_call: bool
    expiry_s: float          # seconds to expiry at sim time 0


def base_of(name: str) -> str:
    """``BTCUSDT`` -> ``BTC``, ``BTCUSDT-20261225`` -> ``BTC``, ``BTC-20261225-90000-P`` -> ``BTC``."""
    head = name.split("-")[0]
    for q in _QUOTES:
        if head.endswith(q) and len(head) > len(q):
            return head[:-len(q)]
    return head


def parse_option(name: str, now_ns: int | None = None) -> tuple[str, float, bool, float] | None:
    """``BTC-20261225-90000-P`` -> (base, strike, is_call, seconds to expiry 08:00 UTC), else None."""
    m = _OPTION_RE.match(name)
    if not m:
        return None
    try:
        day = _dt.datetime.strptime(m.group(2), "%Y%m%d").replace(hour=8, tzinfo=_dt.timezone.utc)
    except ValueError:
        return None
    now_s = (time.time_ns() if now_ns is None else now_ns) / NS_PER_S
    return m.group(1), float(m.group(3)), m.group(4) == "C", max(day.timestamp() - now_s, 86_400.0)


def _ncdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def black_scholes(spot: float, strike: float, t_years: float, vol: float, is_call: bool) -> float:
    """Undiscounted (r = 0) Black-Scholes price; intrinsic value when ``t`` or ``vol`` is 0."""
    if t_years <= 0 or vol <= 0:
        return max(spot - strike, 0.0) if is_call else max(strike - spot, 0.0)
    sd = vol * math.sqrt(t_years)
    d1 = (math.log(spot / strike) + 0.5 * sd * sd) / sd
    d2 = d1 - sd
    if is_call:
        return spot * _ncdf(d1) - strike * _ncdf(d2)
    return strike * _ncdf(-d2) - spot * _ncdf(-d1)


def implied_vol(price: float, spot: float, strike: float, t_years: float, is_call: bool) -> float:
    """Bisection in [0.01, 5.0]; clamps when ``price`` is outside the range it spans."""
    lo, hi = 0.01, 5.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if black_scholes(spot, strike, t_years, mid, is_call) < price:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class VenueSim:
    """True price paths and per-venue noisy quotes (see the module docstring).

    Parameters
    ----------
    instruments : mapping
        Engine instrument name -> start price (e.g. ``{"BTCUSDT": 95000.0}``).
    n_venues : int
        Venues named ``venues`` or ``sim-venue-0 .. n-1``.
    seed : int
        Seed of the one random generator.
    vol_per_sqrt_s : float
        Diffusion volatility per sqrt(second) of the roots (0.0001: about 2.9 %/day, 56 %/yr).
    jump_rate_per_s, jump_sigma : float
        Poisson rate of jumps per root and their log-size standard deviation.
    noise_bps : float
        Standard deviation of a venue's quote around the true price, basis points.
    outage_rate_per_s, outage_s : float, (float, float)
        Per-venue rate at which random outages start and their duration range.
    spike_rate_per_s, spike_pct, spike_ticks :
        Per-venue rate of random spikes (one instrument, sign random), size, length.
    asset_sources, fixed_assets :
        Collateral asset prices (only those whose source instrument is simulated).
    option_specs :
        Options priced off another instrument; by default parsed from option names.

    Thread safety: ``step`` and the fault/crash methods take one lock, so another
    thread (a demo driver) may call ``crash`` while ``run_venues`` steps the sim.
    """

    def __init__(self, instruments: Mapping[str, float], n_venues: int = 3, seed: int = 0, *,
                 venues: Iterable[str] | None = None,
                 vol_per_sqrt_s: float = 0.0001, jump_rate_per_s: float = 0.005,
                 jump_sigma: float = 0.01, noise_bps: float = 2.0,
                 outage_rate_per_s: float = 1 / 300, outage_s: tuple[float, float] = (2.0, 8.0),
                 spike_rate_per_s: float = 1 / 120, spike_pct: float = 0.20, spike_ticks: int = 3,
                 asset_sources: Mapping[str, tuple[str, float]] | None = None,
                 fixed_assets: Mapping[str, float] | None = None,
                 option_specs: Mapping[str, OptionSpec] | None = None,
                 now_ns: int | None = None):
        if not instruments:
            raise ValueError("no instruments")
        for name, p in instruments.items():
            if not (isinstance(p, (int, float)) and math.isfinite(p) and p > 0):
                raise ValueError(f"{name}: start price must be finite and > 0, got {p!r}")
        self.venues = list(venues) if venues is not None else [f"sim-venue-{i}" for i in range(n_venues)]
        if not self.venues:
            raise ValueError("no venues")
        self.rng = random.Random(seed)
        self.vol = vol_per_sqrt_s
        self.jump_rate, self.jump_sigma = jump_rate_per_s, jump_sigma
        self.noise = noise_bps / 1e4
        self.outage_rate, self.outage_range = outage_rate_per_s, outage_s
        self.spike_rate, self.spike_pct, self.spike_ticks = spike_rate_per_s, spike_pct, spike_ticks
        self.t_s = 0.0
        self.start = dict(instruments)
        self._lock = threading.Lock()
        self.stats: Counter = Counter()

        # Classify: options, roots (first non-option of each base), followers.
        specs = dict(option_specs or {})
        roots_by_base: dict[str, str] = {}
        for name in instruments:
            if name not in specs and parse_option(name, now_ns) is None:
                roots_by_base.setdefault(base_of(name), name)
        for name in instruments:
            if name in specs:
                continue
            parsed = parse_option(name, now_ns)
            if parsed is not None and parsed[0] in roots_by_base:
                base, strike, call, expiry_s = parsed
                specs[name] = OptionSpec(roots_by_base[base], strike, call, expiry_s)
        self.options = specs
        # An option without a simulated underlying walks on its own, like a root.
        self.roots = {n for n in instruments if n not in specs and (
            roots_by_base.get(base_of(n)) == n or parse_option(n, now_ns) is not None)}
        self.followers = {n: roots_by_base[base_of(n)] for n in instruments
                          if n not in specs and n not in self.roots}
        self.price_now: dict[str, float] = {n: float(p) for n, p in instruments.items()}
        self._iv: dict[str, float] = {}
        for name, sp in specs.items():
            if sp.underlying not in instruments:
                raise ValueError(f"{name}: underlying {sp.underlying!r} is not simulated")
            self._iv[name] = implied_vol(self.start[name], self.start[sp.underlying], sp.strike,
                                         sp.expiry_s / YEAR_S, sp.is_call)
        srcs = DEFAULT_ASSET_SOURCES if asset_sources is None else asset_sources
        self.asset_sources = {a: s for a, s in srcs.items() if s[0] in instruments}
        self.fixed_assets = dict(DEFAULT_FIXED_ASSETS if fixed_assets is None else fixed_assets)
        self.names = list(instruments) + list(self.asset_sources) + list(self.fixed_assets)
        self._crashes: list[tuple[str, float, float, float]] = []   # root, t0, t1, total log move
        self._down_until: dict[str, float] = {}
        self._spikes: dict[str, list] = {}                          # venue -> [names|None, factor, left]
        self._latency_ns = {v: self.rng.randrange(0, 3_000_000) for v in self.venues}
        self._derive()

    # --- queries -------------------------------------------------------------------------

    def price(self, name: str) -> float:
        """Current true price of an instrument or asset."""
        return self.price_now[name]

    def true_prices(self) -> dict[str, float]:
        with self._lock:
            return dict(self.price_now)

    def venue_up(self, venue: str) -> bool:
        return self._down_until.get(venue, -1.0) <= self.t_s

    # --- faults and scripted moves -------------------------------------------------------

    def _venue(self, venue: str | int) -> str:
        v = self.venues[venue] if isinstance(venue, int) else venue
        if v not in self.venues:
            raise KeyError(f"unknown venue {venue!r}")
        return v

    def _root(self, name: str) -> str:
        if name in self.roots:
            return name
        if name in self.followers:
            return self.followers[name]
        if name in self.options:
            return self._root(self.options[name].underlying)
        if name in self.asset_sources:
            return self._root(self.asset_sources[name][0])
        raise KeyError(f"{name!r} has no simulated price path")

    def crash(self, instrument: str, pct: float, over_s: float) -> None:
        """Drive ``instrument``'s path (its root's: followers, options and assets of that
        base move with it) down by ``pct`` (0.3 = -30 %) over the next ``over_s`` seconds
        of sim time, on top of the random walk. A negative ``pct`` is a rally."""
        if not (pct < 1.0 and pct != 0.0 and math.isfinite(pct)):
            raise ValueError(f"pct must be < 1 and non-zero, got {pct!r}")
        if not over_s > 0:
            raise ValueError(f"over_s must be > 0, got {over_s!r}")
        with self._lock:
            root = self._root(instrument)
            self._crashes.append((root, self.t_s, self.t_s + over_s, math.log(1.0 - pct)))
            self.stats["crashes"] += 1

    def outage(self, venue: str | int, duration_s: float) -> None:
        """Venue sends nothing for the next ``duration_s`` seconds of sim time."""
        with self._lock:
            v = self._venue(venue)
            self._down_until[v] = max(self._down_until.get(v, 0.0), self.t_s + duration_s)
            self.stats["outages"] += 1

    def spike(self, venue: str | int, pct: float | None = None, ticks: int | None = None,
              names: Iterable[str] | None = None) -> None:
        """Venue prints ``true * (1 + pct)`` (default ``+spike_pct``) for its next ``ticks``
        steps, on ``names`` (default: every name it quotes)."""
        with self._lock:
            v = self._venue(venue)
            pct = self.spike_pct if pct is None else pct
            self._spikes[v] = [None if names is None else frozenset(names), 1.0 + pct,
                               self.spike_ticks if ticks is None else ticks]
            self.stats["spikes"] += 1

    # --- time ----------------------------------------------------------------------------

    def _derive(self) -> None:
        p = self.price_now
        for n, root in self.followers.items():
            p[n] = self.start[n] * p[root] / self.start[root]
        for n, sp in self.options.items():
            t_years = max(sp.expiry_s - self.t_s, 0.0) / YEAR_S
            v = black_scholes(p[sp.underlying], sp.strike, t_years, self._iv[n], sp.is_call)
            p[n] = max(v, self.start[n] * 1e-4)          # an oracle price must stay > 0
        for a, (src, ratio) in self.asset_sources.items():
            p[a] = p[src] * ratio
        for a, px in self.fixed_assets.items():
            p[a] = px

    def step(self, dt_s: float, now_ns: int | None = None) -> list[Tick]:
        """Advance sim time by ``dt_s`` and return this step's ticks: one per (venue up,
        name), venue by venue. ``venue_ts_ns`` is ``now_ns`` (default: wall clock) minus
        the venue's fixed latency (0..3 ms)."""
        if not dt_s > 0:
            raise ValueError(f"dt_s must be > 0, got {dt_s!r}")
        now_ns = time.time_ns() if now_ns is None else now_ns
        rng = self.rng
        with self._lock:
            t0, t1 = self.t_s, self.t_s + dt_s
            sd = self.vol * math.sqrt(dt_s)
            for root in sorted(self.roots):
                move = -0.5 * sd * sd + sd * rng.gauss(0.0, 1.0)
                if self.jump_rate > 0 and rng.random() < self.jump_rate * dt_s:
                    move += rng.gauss(0.0, self.jump_sigma)
                    self.stats["jumps"] += 1
                for r, c0, c1, total in self._crashes:
                    if r == root:
                        overlap = min(t1, c1) - max(t0, c0)
                        if overlap > 0:
                            move += total * overlap / (c1 - c0)
                self.price_now[root] *= math.exp(move)
            self._crashes = [c for c in self._crashes if c[2] > t1]
            self.t_s = t1
            self._derive()

            ticks: list[Tick] = []
            inst_names = list(self.start)
            for v in self.venues:
                if self.outage_rate > 0 and self.venue_up(v) and rng.random() < self.outage_rate * dt_s:
                    self._down_until[v] = t1 + rng.uniform(*self.outage_range)
                    self.stats["outages"] += 1
                if self.spike_rate > 0 and v not in self._spikes and rng.random() < self.spike_rate * dt_s:
                    sign = 1.0 if rng.random() < 0.5 else -1.0
                    self._spikes[v] = [frozenset([rng.choice(inst_names)]),
                                       1.0 + sign * self.spike_pct, self.spike_ticks]
                    self.stats["spikes"] += 1
                if not self.venue_up(v):
                    continue
                spike = self._spikes.get(v)
                ts = now_ns - self._latency_ns[v]
                for name in self.names:
                    px = self.price_now[name] * math.exp(rng.gauss(0.0, self.noise))
                    if spike is not None and (spike[0] is None or name in spike[0]):
                        px *= spike[1]
                    ticks.append(Tick(name, v, px, ts))
                if spike is not None:
                    spike[2] -= 1
                    if spike[2] <= 0:
                        del self._spikes[v]
            return ticks

    @classmethod
    def from_config(cls, config=None, **kw) -> "VenueSim":
        """A sim of every instrument of an engine ``Config`` (default: ``load_default()``)
        at its configured ``mark_price``, options from their ``underlying``/``strike``."""
        cfg = config if config is not None else _default_config()
        now_s = time.time()
        specs = {i.name: OptionSpec(i.underlying, i.strike, i.is_call,
                                    max(i.expiry_ns / NS_PER_S - now_s, 86_400.0))
                 for i in cfg.instruments if i.underlying}
        kw.setdefault("option_specs", specs)
        return cls({i.name: i.mark_price for i in cfg.instruments}, **kw)


def _default_config():
    from engine.config import load_default
    return load_default()


# ---------------------------------------------------------------------------------------
# Sockets
# ---------------------------------------------------------------------------------------

def _push_socket(endpoint: str, hwm: int, ctx: zmq.Context | None) -> zmq.Socket:
    sock = (ctx or zmq.Context.instance()).socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.connect(endpoint)
    return sock


def _send_tick(sock: zmq.Socket, seq: Sequencer, instrument: str, venue: str, price: float,
               venue_ts_ns: int, stats: Counter) -> None:
    """Encode with the next seq and send without blocking; a tick the socket cannot take
    (HWM reached) is dropped and does not use up a sequence number (no false gap)."""
    frame = encode(MsgType.ORACLE_TICK, {"venue": venue, "instrument": instrument, "price": price,
                                         "venue_ts_ns": venue_ts_ns},
                   seq=seq.last + 1, ts_ns=time.time_ns())
    try:
        sock.send(frame, zmq.NOBLOCK)
    except zmq.Again:
        stats["dropped"] += 1
        return
    seq.last += 1
    stats["sent"] += 1


def run_venues(endpoint: str, instruments: Mapping[str, float], n_venues: int = 3,
               rate_hz: float = 20.0, duration_s: float | None = 10.0, seed: int = 0,
               stop_event: threading.Event | None = None, *, sim: VenueSim | None = None,
               hwm: int = 10_000, ctx: zmq.Context | None = None,
               on_step: Callable[[VenueSim], None] | None = None, linger_ms: int = 0,
               **sim_kwargs) -> dict:
    """Step a ``VenueSim`` ``rate_hz`` times per second and send its ticks as ORACLE_TICKs.

    One PUSH socket connected to ``endpoint`` (LINGER 0, SNDHWM ``hwm``): one stream,
    seq 1, 2, 3, ... Runs ``duration_s`` seconds (``None``: until ``stop_event`` is set).
    ``sim`` supplies a prepared simulator (keep a reference to ``crash`` it while this
    runs); otherwise one is built from ``instruments``, ``n_venues``, ``seed`` and
    ``sim_kwargs``. ``on_step(sim)`` runs after every step. The socket's LINGER is 0 (a
    dead engine never holds the process); ``linger_ms`` > 0 gives the queued tail that
    long to leave at the final close. Returns counters: ``steps``, ``sent``, ``dropped``
    (socket at its HWM: dropped without taking a seq), ``last_seq``.
    """
    if not rate_hz > 0:
        raise ValueError(f"rate_hz must be > 0, got {rate_hz!r}")
    if sim is None:
        sim = VenueSim(instruments, n_venues=n_venues, seed=seed, **sim_kwargs)
    stats: Counter = Counter()
    seq = Sequencer()
    dt = 1.0 / rate_hz
    sock = _push_socket(endpoint, hwm, ctx)
    try:
        t0 = time.monotonic()
        k = 0
        while not (stop_event is not None and stop_event.is_set()):
            if duration_s is not None and k * dt >= duration_s:
                break
            wait = t0 + k * dt - time.monotonic()
            if wait > 0:
                if stop_event is not None:
                    if stop_event.wait(wait):
                        break
                else:
                    time.sleep(wait)
            for tick in sim.step(dt, time.time_ns()):
                _send_tick(sock, seq, tick.instrument, tick.venue, tick.price, tick.venue_ts_ns, stats)
            k += 1
            stats["steps"] = k
            if on_step is not None:
                on_step(sim)
    finally:
        sock.close(linger=linger_ms)
    stats["last_seq"] = seq.last
    return dict(stats)


def replay_venues(endpoint: str, ticks_iterable: Iterable[Tick], speed: float = 1.0, *,
                  stop_event: threading.Event | None = None,
                  instrument_map: Mapping[str, str | Iterable[str]] | None = None,
                  retime: bool = True, max_ticks: int | None = None,
                  hwm: int = 10_000, ctx: zmq.Context | None = None, linger_ms: int = 0) -> dict:
    """Send recorded ticks (``feeds.oracle.replay``) as ORACLE_TICKs, paced by ``speed``
    (``math.inf``: as fast as possible).

    ``instrument_map`` renames the recorded oracle symbols to engine names; a symbol may
    fan out to several (default ``DEFAULT_REPLAY_MAP``: ``BTC-USD`` -> ``BTCUSDT`` and the
    ``BTC`` asset); unmapped symbols go out unchanged. With ``retime`` (default) each
    tick's ``venue_ts_ns`` is the wall clock at send, so that a live engine sees fresh
    prices; otherwise the recorded timestamp. ``linger_ms`` as in ``run_venues`` (a short
    replay sent before the connection is up needs it). Returns counters like
    ``run_venues`` plus ``ticks`` (recorded ticks read).
    """
    from feeds.oracle.replay import paced

    mapping = DEFAULT_REPLAY_MAP if instrument_map is None else instrument_map
    targets: dict[str, tuple[str, ...]] = {}
    stats: Counter = Counter()
    seq = Sequencer()
    sock = _push_socket(endpoint, hwm, ctx)

    def sleep_s(s: float) -> None:
        if stop_event is not None:
            stop_event.wait(s)
        else:
            time.sleep(s)

    try:
        for tick in paced(ticks_iterable, speed, sleep_s=sleep_s):
            if stop_event is not None and stop_event.is_set():
                break
            if max_ticks is not None and stats["ticks"] >= max_ticks:
                break
            stats["ticks"] += 1
            names = targets.get(tick.instrument)
            if names is None:
                m = mapping.get(tick.instrument, tick.instrument)
                names = targets[tick.instrument] = (m,) if isinstance(m, str) else tuple(m)
            ts = time.time_ns() if retime else tick.venue_ts_ns
            for name in names:
                _send_tick(sock, seq, name, tick.venue, float(tick.price), ts, stats)
    finally:
        sock.close(linger=linger_ms)
    stats["last_seq"] = seq.last
    return dict(stats)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

def _replay_source(which: str) -> Iterable[Tick]:
    from feeds.oracle import replay as R

    d = R.data_dir()
    if which == "depeg":
        return R.bar_ticks(d / R.DEPEG_BARS, "BTC-USD")
    if which == "crash":
        path = d / R.CRASH_GEMINI_TRADES
        return R.merge(R.trade_ticks(path, "BTC-USD", ["BTCUSD"]),
                       R.trade_ticks(path, "ETH-USD", ["ETHUSD"]))
    raise ValueError(which)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m feeds.sim.venues",
                                 description="Simulated oracle venues sending ORACLE_TICKs (PUSH).")
    ap.add_argument("--endpoint", default=None, help="engine oracle PULL endpoint (default: config)")
    ap.add_argument("--config", default=None, help="engine TOML (default: the embedded one)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds (0: until Ctrl-C)")
    ap.add_argument("--rate", type=float, default=20.0, help="steps per second (each: every venue x name)")
    ap.add_argument("--venues", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--instruments", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--no-faults", action="store_true", help="no random outages or spikes")
    ap.add_argument("--crash", action="append", default=[], metavar="NAME:PCT:OVER_S:AT_S",
                    help="e.g. BTCUSDT:0.3:5:10 = -30%% over 5 s starting 10 s in")
    ap.add_argument("--replay", choices=("depeg", "crash"), default=None,
                    help="send recorded ticks instead of simulated ones")
    ap.add_argument("--speed", type=float, default=60.0, help="replay speed (inf: no pacing)")
    args = ap.parse_args(argv)

    if args.config:
        from engine.config import load
        cfg = load(args.config)
    else:
        cfg = _default_config()
    endpoint = args.endpoint or cfg.endpoints.oracle
    stop = threading.Event()
    duration = args.duration if args.duration > 0 else None
    if duration is not None:
        timer = threading.Timer(duration, stop.set)
        timer.daemon = True
        timer.start()
    try:
        if args.replay:
            stats = replay_venues(endpoint, _replay_source(args.replay), args.speed, stop_event=stop,
                                  linger_ms=1000)
        else:
            kw = {"n_venues": args.venues, "seed": args.seed}
            if args.no_faults:
                kw.update(outage_rate_per_s=0.0, spike_rate_per_s=0.0)
            sim = VenueSim.from_config(cfg, **kw)
            if args.instruments:
                wanted = set(args.instruments.split(","))
                sim = VenueSim({n: p for n, p in sim.start.items() if n in wanted},
                               option_specs={n: s for n, s in sim.options.items() if n in wanted}, **kw)
            crashes = []
            for spec in args.crash:
                name, pct, over, at = spec.split(":")
                crashes.append((float(at), name, float(pct), float(over)))
            crashes.sort()

            def on_step(s: VenueSim) -> None:
                while crashes and s.t_s >= crashes[0][0]:
                    _, name, pct, over = crashes.pop(0)
                    s.crash(name, pct, over)
                    print(f"t={s.t_s:.1f}s crash {name} {-pct:+.0%} over {over:g}s", file=sys.stderr)

            stats = run_venues(endpoint, sim.start, rate_hz=args.rate, duration_s=None,
                               stop_event=stop, sim=sim, on_step=on_step, linger_ms=1000)
            stats["true_prices"] = sim.true_prices()
            stats["faults"] = dict(sim.stats)
    except KeyboardInterrupt:
        stats = {"interrupted": True}
    finally:
        stop.set()
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

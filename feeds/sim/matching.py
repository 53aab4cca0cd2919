"""Simulated matching engine: a client of the engine that speaks only the wire protocol.

Sockets (all connect; the engine binds), LINGER 0, HWMs set, never a blocking receive::

    checks   DEALER -> engine ROUTER   DEPOSIT, ORDER_CHECK out; COLLATERAL_REPLY,
                                       ORDER_CHECK_REPLY, REJECT back (by request_id)
    fills    PUSH   -> engine PULL     FILL, or BATCH of FILLs
    orders   PULL   <- engine PUSH     LIQUIDATION_ORDER in

What it does:

1. ``fund_accounts()``: one DEPOSIT per account ``1..n_accounts`` (a random whole amount
   of ``deposit_asset`` in ``deposit_range``, in asset units) plus ``backstop_deposits``
   for the backstop account; waits for the COLLATERAL_REPLYs (timeout).
2. The trading loop (``run`` in this thread, or ``start``/``stop`` in a background one):
   ``rate_hz`` times a second it picks an instrument, a taker and a maker (distinct
   accounts), a signed quantity of 1.. lots (``qty_units`` = lots; at most
   ``max_order_usd`` of notional) and a price ``price_fn(name) * (1 +- price_jitter)``;
   sends an ORDER_CHECK for the taker (up to ``max_in_flight`` in flight, correlated by
   ``request_id``) and, when the reply's code is 0, a FILL. Fees, in settle-asset units::

       notional = |qty_units| / qty_scale * contract_size * price        (linear, option)
       notional = |qty_units| / qty_scale * contract_size / price        (inverse: in coin)
       fee_units = round_half_away(notional * rate * settle_scale)
       taker rate = +0.0005 (5 bps), maker rate = -0.0001 (1 bp rebate)

   Fills go out one per frame (``batch_size`` 1) or as BATCHes of up to ``batch_size``
   (flushed at least every ``batch_interval_s``); every fill has its own seq.
3. Liquidations: each LIQUIDATION_ORDER is filled at once against ``backstop_account``
   (maker) at the order's ``limit_price_units``, the liquidated account as taker with the
   order's signed quantity, same fee rates; the FILL goes out on the fills socket. With
   ``cancel_past_market`` the book is honest about immediate-or-cancel instead: an order
   whose limit is worse than the market for the backstop (a sell limited above the
   market, a buy below it: an account below bankruptcy) is cancelled, no fill
   (``liquidations_cancelled``); the engine's takeover then has it (the demo).

All sockets belong to the thread that runs the loop: call ``fund_accounts`` before
``start`` (or from the thread that calls ``run``), never while the background loop runs.

CLI::

    python -m feeds.sim.matching --duration 10 --accounts 1000 --rate 500
    python -m feeds.sim.matching --duration 60 --venues tcp://127.0.0.1:5701   # with venue sim
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, NamedTuple

import zmq

from feeds.protocol import (MsgType, Rejected, SeqStatus, Sequencer, SequenceTracker, decode,
                            encode, encode_batch)

TAKER_FEE_RATE = 0.0005       # 5 bps
MAKER_FEE_RATE = -0.0001      # 1 bp rebate
BACKSTOP_ACCOUNT = 999_999

_REPLY_TYPES = frozenset({MsgType.ORDER_CHECK_REPLY, MsgType.COLLATERAL_REPLY, MsgType.REJECT})
_ORDER_TYPES = frozenset({MsgType.LIQUIDATION_ORDER})


class SimInstrument(NamedTuple):
    """What the sim needs of an instrument (built from ``engine.instruments.Instrument``)."""

    name: str
    index: int                 # engine instrument id
    inverse: bool
    contract_size: float
    qty_scale: int
    price_scale: int
    settle: str
    settle_scale: int
    mark_price: float

    @classmethod
    def of(cls, inst, asset_scales: Mapping[str, int]) -> "SimInstrument":
        if isinstance(inst, SimInstrument):
            return inst
        kind = inst.kind
        inverse = bool(getattr(kind, "is_inverse", False)) or str(kind).lower().startswith("inverse")
        return cls(inst.name, int(inst.index), inverse, float(inst.contract_size), int(inst.qty_scale),
                   int(inst.price_scale), inst.settle, int(asset_scales[inst.settle]),
                   float(inst.mark_price))


def round_half_away(x: float) -> int:
    """Round to the nearest integer, halves away from zero (no banker's rounding)."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def fee_units(inst: SimInstrument, qty_units: int, price_units: int, rate: float) -> int:
    """Fee in settle-asset units for a fill of ``qty_units`` at ``price_units`` (see module doc)."""
    qty = abs(qty_units) / inst.qty_scale
    price = price_units / inst.price_scale
    notional = qty * inst.contract_size / price if inst.inverse else qty * inst.contract_size * price
    return round_half_away(notional * rate * inst.settle_scale)


@dataclass
class MatchingStats:
    fills_sent: int = 0
    fill_frames_sent: int = 0
    checks_sent: int = 0
    checks_accepted: int = 0
    checks_rejected: collections.Counter = field(default_factory=collections.Counter)  # code -> n
    checks_timed_out: int = 0
    checks_dropped: int = 0          # DEALER would block (HWM): not sent
    replies_unmatched: int = 0       # reply for no request in flight
    replies_bad: collections.Counter = field(default_factory=collections.Counter)       # decode code -> n
    deposits_sent: int = 0
    deposits_applied: int = 0
    deposits_failed: collections.Counter = field(default_factory=collections.Counter)   # code -> n
    liquidations_received: int = 0
    liquidations_filled: int = 0
    liquidations_cancelled: int = 0  # cancel_past_market: IOC limit beyond the market, no fill
    liquidations_bad: collections.Counter = field(default_factory=collections.Counter)  # code -> n
    liquidation_seq_gaps: int = 0
    liquidation_duplicates: int = 0
    check_latency_ns: list = field(default_factory=list)

    def summary(self) -> dict:
        out = {k: (dict(v) if isinstance(v, collections.Counter) else v)
               for k, v in self.__dict__.items() if k != "check_latency_ns"}
        lat = sorted(self.check_latency_ns)
        if lat:
            pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
            out["check_latency_us"] = {"n": len(lat), "p50": pick(0.5) / 1e3, "p99": pick(0.99) / 1e3,
                                       "p999": pick(0.999) / 1e3, "max": lat[-1] / 1e3}
        return out


class _Pending(NamedTuple):
    kind: int               # MsgType.ORDER_CHECK or MsgType.DEPOSIT
    sent_ns: int            # monotonic
    seq: int
    order: tuple | None     # (inst, taker, maker, qty_units, price_units) for a check


class MatchingSim:
    """A simulated matching engine (module docstring). Parameters beyond the brief's:

    ``price_fn(name) -> float``: reference price per instrument (default: config mark);
    ``assets``: asset name -> scale (default from the config); ``config``: an engine
    ``Config`` (default ``load_default()``) used to resolve instrument names and ids.
    """

    def __init__(self, fills_endpoint: str, checks_endpoint: str, orders_endpoint: str,
                 instruments: Iterable | None = None, n_accounts: int = 100, seed: int = 0, *,
                 price_fn: Callable[[str], float] | None = None,
                 config=None, assets: Mapping[str, int] | None = None,
                 rate_hz: float = 200.0, batch_size: int = 1, batch_interval_s: float = 0.005,
                 max_in_flight: int = 256, max_order_usd: float = 5_000.0, price_jitter: float = 0.0005,
                 taker_fee_rate: float = TAKER_FEE_RATE, maker_fee_rate: float = MAKER_FEE_RATE,
                 backstop_account: int = BACKSTOP_ACCOUNT,
                 deposit_asset: str = "USDT", deposit_range: tuple[float, float] = (1_000, 100_000),
                 backstop_deposits: Mapping[str, float] | None = None,
                 check_timeout_s: float = 5.0, hwm: int = 100_000, max_latency_samples: int = 1_000_000,
                 cancel_past_market: bool = False, ctx: zmq.Context | None = None):
        if n_accounts < 1:
            raise ValueError("n_accounts must be >= 1")
        if not 1 <= batch_size <= 4096:
            raise ValueError("batch_size must be in 1..4096")
        self.cfg = config
        if self.cfg is None and (assets is None or instruments is None
                                 or any(isinstance(i, str) for i in instruments)):
            from engine.config import load_default
            self.cfg = load_default()
        scales = dict(assets) if assets is not None else {a.name: a.scale for a in self.cfg.assets}
        table = list(self.cfg.instruments) if self.cfg is not None else []
        chosen = table if instruments is None else [
            (self.cfg.instrument(i) if isinstance(i, str) else i) for i in instruments]
        self.instruments = [SimInstrument.of(i, scales) for i in chosen]
        if not self.instruments and rate_hz > 0:
            raise ValueError("no instruments to trade")
        self.by_index = {si.index: si for si in (SimInstrument.of(i, scales) for i in table)}
        self.by_index.update({si.index: si for si in self.instruments})
        self.asset_scales = scales
        self.price_fn = price_fn or (lambda name, _m={i.name: i.mark_price for i in self.instruments}: _m[name])
        self.n_accounts = n_accounts
        self.rng = random.Random(seed)
        self.rate_hz = rate_hz
        self.batch_size, self.batch_interval_ns = batch_size, int(batch_interval_s * 1e9)
        self.max_in_flight = max_in_flight
        self.max_order_usd = max_order_usd
        self.price_jitter = price_jitter
        self.taker_rate, self.maker_rate = taker_fee_rate, maker_fee_rate
        self.backstop = backstop_account
        self.cancel_past_market = cancel_past_market
        self.deposit_asset, self.deposit_range = deposit_asset, deposit_range
        self.backstop_deposits = ({"USDT": 1e9, "BTC": 1e4} if backstop_deposits is None
                                  else dict(backstop_deposits))
        self.check_timeout_ns = int(check_timeout_s * 1e9)
        self.max_latency_samples = max_latency_samples
        self.stats = MatchingStats()
        self.balances: dict[tuple[int, str], int] = {}     # (account, asset) -> last reply balance
        self.on_liquidation: Callable[[dict, dict], None] | None = None   # (order, fill)

        self.zctx = ctx or zmq.Context.instance()
        self.checks = self._socket(zmq.DEALER, checks_endpoint, hwm)
        self.fills = self._socket(zmq.PUSH, fills_endpoint, hwm)
        self.orders = self._socket(zmq.PULL, orders_endpoint, hwm)
        self.seq_checks = Sequencer()
        self.seq_fills = Sequencer()
        # LIQUIDATION_ORDER sequence numbers count per engine worker; the stream is
        # identified by order_id >> 52 (docs/protocol.md).
        self.orders_trackers: dict[int, SequenceTracker] = {}
        self._next_request = 1
        self._next_trade = 1
        self._pending: dict[int, _Pending] = {}            # request_id -> pending
        self._req_by_seq: dict[int, int] = {}              # DEALER seq -> request_id
        self._batch: list[dict] = []
        self._batch_started_ns = 0
        self._outbox: collections.deque[bytes] = collections.deque()   # fills frames not yet taken
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # --- sockets -------------------------------------------------------------------------

    def _socket(self, kind: int, endpoint: str, hwm: int) -> zmq.Socket:
        s = self.zctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, hwm)
        s.setsockopt(zmq.RCVHWM, hwm)
        s.connect(endpoint)
        return s

    def _request(self, mtype: MsgType, fields: dict, order: tuple | None = None) -> bool:
        """Send a DEALER request; the seq is taken only if the socket takes the frame."""
        seq = self.seq_checks.last + 1
        frame = encode(mtype, fields, seq=seq, ts_ns=time.time_ns())
        try:
            self.checks.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return False
        self.seq_checks.last = seq
        rid = fields["request_id"]
        self._pending[rid] = _Pending(mtype, time.monotonic_ns(), seq, order)
        self._req_by_seq[seq] = rid
        return True

    def _new_request_id(self) -> int:
        rid = self._next_request
        self._next_request += 1
        return rid

    # --- replies -------------------------------------------------------------------------

    def _drain_replies(self) -> int:
        n = 0
        while True:
            try:
                frame = self.checks.recv(zmq.NOBLOCK)
            except zmq.Again:
                return n
            n += 1
            self._on_reply(frame, time.monotonic_ns())

    def _on_reply(self, frame: bytes, now_ns: int) -> None:
        m = decode(frame, types=_REPLY_TYPES)
        st = self.stats
        if type(m) is Rejected:
            st.replies_bad[int(m.code)] += 1
            return
        f = m.fields
        if m.type is MsgType.REJECT:
            rid = self._req_by_seq.get(f["ref_seq"])
            p = self._pending.pop(rid, None) if rid is not None else None
            if p is None:
                st.replies_unmatched += 1
                return
            self._req_by_seq.pop(p.seq, None)
            if p.kind is MsgType.DEPOSIT:
                st.deposits_failed[f["code"]] += 1
            else:
                st.checks_rejected[f["code"]] += 1
            return
        p = self._pending.pop(f["request_id"], None)
        if p is None or (p.kind is MsgType.DEPOSIT) != (m.type is MsgType.COLLATERAL_REPLY):
            if p is not None:                               # wrong reply type: keep waiting
                self._pending[f["request_id"]] = p
            st.replies_unmatched += 1
            return
        self._req_by_seq.pop(p.seq, None)
        if m.type is MsgType.COLLATERAL_REPLY:
            if f["code"] == 0:
                st.deposits_applied += 1
            else:
                st.deposits_failed[f["code"]] += 1
            acct, asset = p.order
            self.balances[(acct, asset)] = f["balance_units"]
            return
        if len(st.check_latency_ns) < self.max_latency_samples:
            st.check_latency_ns.append(now_ns - p.sent_ns)
        if f["code"] != 0:
            st.checks_rejected[f["code"]] += 1
            return
        st.checks_accepted += 1
        inst, taker, maker, qty, price = p.order
        self._add_fill(inst, maker, taker, qty, price)

    def _expire(self, now_ns: int) -> None:
        if not self._pending:
            return
        cutoff = now_ns - self.check_timeout_ns
        old = [rid for rid, p in self._pending.items() if p.sent_ns < cutoff]
        for rid in old:
            p = self._pending.pop(rid)
            self._req_by_seq.pop(p.seq, None)
            if p.kind is MsgType.DEPOSIT:
                self.stats.deposits_failed["timeout"] += 1
            else:
                self.stats.checks_timed_out += 1

    # --- fills ---------------------------------------------------------------------------

    def _add_fill(self, inst: SimInstrument, maker: int, taker: int, qty_units: int,
                  price_units: int) -> dict:
        fill = {"trade_id": self._next_trade, "instrument_id": inst.index,
                "maker_account": maker, "taker_account": taker,
                "qty_units": qty_units, "price_units": price_units,
                "maker_fee_units": fee_units(inst, qty_units, price_units, self.maker_rate),
                "taker_fee_units": fee_units(inst, qty_units, price_units, self.taker_rate),
                "taker_side": "buy" if qty_units > 0 else "sell"}
        self._next_trade += 1
        if not self._batch:
            self._batch_started_ns = time.monotonic_ns()
        self._batch.append(fill)
        if len(self._batch) >= self.batch_size:
            self._flush_batch()
        return fill

    def _flush_batch(self) -> None:
        """Encode the pending fills (one FILL, or one BATCH) and queue the frame."""
        if not self._batch:
            return
        msgs, self._batch = self._batch, []
        if self.batch_size == 1 and len(msgs) == 1:
            frame = self.seq_fills.encode(MsgType.FILL, msgs[0])
        else:
            frame = self.seq_fills.encode_batch(MsgType.FILL, msgs)
        self._outbox.append(frame)
        self.stats.fills_sent += len(msgs)
        self._send_outbox()

    def _send_outbox(self) -> None:
        """Send queued fills frames in order without blocking; what the socket does not
        take now stays queued (fills are never dropped: that would be a seq gap)."""
        ob = self._outbox
        while ob:
            try:
                self.fills.send(ob[0], zmq.NOBLOCK)
            except zmq.Again:
                return
            ob.popleft()
            self.stats.fill_frames_sent += 1

    # --- liquidations --------------------------------------------------------------------

    def _drain_orders(self) -> int:
        n = 0
        while True:
            try:
                frame = self.orders.recv(zmq.NOBLOCK)
            except zmq.Again:
                return n
            n += 1
            self._on_order(frame)

    def _on_order(self, frame: bytes) -> None:
        st = self.stats
        m = decode(frame, types=_ORDER_TYPES)
        if type(m) is Rejected:
            st.liquidations_bad[int(m.code)] += 1
            return
        tracker = self.orders_trackers.setdefault(m.fields["order_id"] >> 52, SequenceTracker())
        verdict = tracker.observe(m.seq)
        st.liquidations_received += 1
        if verdict.status is SeqStatus.DUPLICATE:
            st.liquidation_duplicates += 1
            return
        if verdict.status is SeqStatus.GAP:
            st.liquidation_seq_gaps += 1
        f = m.fields
        inst = self.by_index.get(f["instrument_id"])
        if inst is None:
            st.liquidations_bad["unknown_instrument"] += 1
            return
        if f["qty_units"] == 0 or f["limit_price_units"] <= 0 or f["account"] == self.backstop:
            st.liquidations_bad["bad_order"] += 1
            return
        # The order is IOC with a limit no worse than the bankruptcy price: the backstop
        # takes it at the market when that is better for the liquidated account.
        limit = f["limit_price_units"]
        market = round(float(self.price_fn(inst.name)) * inst.price_scale)
        if self.cancel_past_market and (limit > market if f["qty_units"] < 0 else limit < market):
            st.liquidations_cancelled += 1
            return
        price = max(limit, market) if f["qty_units"] < 0 else min(limit, market)
        fill = self._add_fill(inst, self.backstop, f["account"], f["qty_units"], price)
        self._flush_batch()                      # a liquidation fill goes out at once
        st.liquidations_filled += 1
        if self.on_liquidation is not None:
            self.on_liquidation(f, fill)

    # --- orders --------------------------------------------------------------------------

    def _send_check(self) -> bool:
        rng = self.rng
        inst = rng.choice(self.instruments)
        ref = float(self.price_fn(inst.name))
        if not (ref > 0 and math.isfinite(ref)):
            return False
        px = ref * (1.0 + rng.uniform(-self.price_jitter, self.price_jitter))
        price_units = max(1, round_half_away(px * inst.price_scale))
        price = price_units / inst.price_scale
        lot_usd = (inst.contract_size if inst.inverse else inst.contract_size * price) / inst.qty_scale
        max_lots = max(1, int(self.max_order_usd / lot_usd)) if lot_usd > 0 else 1
        qty = rng.randint(1, max_lots) * (1 if rng.random() < 0.5 else -1)
        if self.n_accounts >= 2:
            taker, maker = rng.sample(range(1, self.n_accounts + 1), 2)
        else:
            taker, maker = 1, self.backstop
        rid = self._new_request_id()
        ok = self._request(MsgType.ORDER_CHECK, {"request_id": rid, "account": taker,
                                                 "instrument_id": inst.index, "qty_units": qty,
                                                 "price_units": price_units},
                           (inst, taker, maker, qty, price_units))
        if ok:
            self.stats.checks_sent += 1
        else:
            self.stats.checks_dropped += 1
        return ok

    # --- funding -------------------------------------------------------------------------

    def fund_accounts(self, timeout_s: float = 10.0) -> dict:
        """DEPOSIT into accounts ``1..n_accounts`` and the backstop; wait for the replies.

        Returns ``{"sent", "applied", "failed": {code: n}, "missing"}`` (missing: no reply
        within ``timeout_s``; those requests are forgotten)."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("fund_accounts while the trading loop runs (sockets are its own)")
        scale = self.asset_scales[self.deposit_asset]
        lo, hi = self.deposit_range
        requests: list[tuple[int, str, int]] = []
        for acct in range(1, self.n_accounts + 1):
            whole = self.rng.randint(int(lo), int(hi))
            requests.append((acct, self.deposit_asset, whole * scale))
        for asset, amount in self.backstop_deposits.items():
            if asset in self.asset_scales:
                requests.append((self.backstop, asset, int(amount * self.asset_scales[asset])))
        before_ok, before_failed = self.stats.deposits_applied, sum(self.stats.deposits_failed.values())
        mine: set[int] = set()
        deadline = time.monotonic() + timeout_s
        queue = collections.deque(requests)
        poller = zmq.Poller()
        poller.register(self.checks, zmq.POLLIN)
        while time.monotonic() < deadline:
            while queue and len(self._pending) < self.max_in_flight:
                acct, asset, units = queue[0]
                rid = self._new_request_id()
                if not self._request(MsgType.DEPOSIT, {"request_id": rid, "account": acct,
                                                       "asset": asset, "amount_units": units},
                                     (acct, asset)):
                    break
                queue.popleft()
                mine.add(rid)
                self.stats.deposits_sent += 1
            if not queue and not (mine & self._pending.keys()):
                break
            if poller.poll(50):
                self._drain_replies()
        missing = mine & self._pending.keys()
        for rid in missing:
            self._req_by_seq.pop(self._pending.pop(rid).seq, None)
        failed = sum(self.stats.deposits_failed.values()) - before_failed
        return {"sent": len(mine), "applied": self.stats.deposits_applied - before_ok,
                "failed": failed, "failed_by_code": dict(self.stats.deposits_failed),
                "missing": len(missing) + len(queue)}

    # --- loop ----------------------------------------------------------------------------

    def run(self, duration_s: float | None = None) -> MatchingStats:
        """The trading loop in this thread until ``stop()`` or ``duration_s``."""
        poller = zmq.Poller()
        poller.register(self.checks, zmq.POLLIN)
        poller.register(self.orders, zmq.POLLIN)
        t0 = time.monotonic_ns()
        end = None if duration_s is None else t0 + int(duration_s * 1e9)
        interval = int(1e9 / self.rate_hz) if self.rate_hz > 0 else None
        issued = 0
        next_expiry = t0
        while not self._stop.is_set():
            now = time.monotonic_ns()
            if end is not None and now >= end:
                break
            if interval is not None:
                due = (now - t0) // interval + 1 - issued
                if due > 1000:                        # fell far behind: do not burst forever
                    issued += due - 1000
                    due = 1000
                while due > 0 and len(self._pending) < self.max_in_flight and len(self._outbox) < 10_000:
                    self._send_check()
                    issued += 1
                    due -= 1
            # wait for input until the next check / batch flush / outbox retry
            wait_ns = 10_000_000
            if interval is not None and len(self._pending) < self.max_in_flight:
                wait_ns = min(wait_ns, max(0, t0 + (issued) * interval - now))
            if self._batch:
                wait_ns = min(wait_ns, max(0, self._batch_started_ns + self.batch_interval_ns - now))
            if self._outbox:
                wait_ns = min(wait_ns, 1_000_000)
            events = dict(poller.poll(wait_ns / 1e6))
            if self.checks in events:
                self._drain_replies()
            if self.orders in events:
                self._drain_orders()
            now = time.monotonic_ns()
            if self._batch and now - self._batch_started_ns >= self.batch_interval_ns:
                self._flush_batch()
            if self._outbox:
                self._send_outbox()
            if now >= next_expiry:                   # a scan of the in-flight table, 20/s
                self._expire(now)
                next_expiry = now + 50_000_000
        self._flush_batch()
        self._send_outbox()
        return self.stats

    def start(self, duration_s: float | None = None) -> None:
        """Run the trading loop in a background thread."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, args=(duration_s,), name="matching-sim",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0, linger_ms: int = 0) -> MatchingStats:
        """Stop the loop (it flushes its last batch), join its thread, close the sockets
        (idempotent). The sockets' LINGER is 0; ``linger_ms`` > 0 gives frames still queued
        that long to leave (the fills socket's only: requests in flight are abandoned)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise RuntimeError("matching sim thread did not stop")
        if not self._closed:
            self.fills.close(linger=linger_ms)
            self.checks.close(0)
            self.orders.close(0)
            self._closed = True
        return self.stats

    def __enter__(self) -> "MatchingSim":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m feeds.sim.matching",
                                 description="Simulated matching engine (DEPOSIT, ORDER_CHECK, FILL, liquidations).")
    ap.add_argument("--config", default=None, help="engine TOML (default: the embedded one)")
    ap.add_argument("--fills", default=None, help="engine fills PULL endpoint (default: config)")
    ap.add_argument("--checks", default=None, help="engine checks ROUTER endpoint (default: config)")
    ap.add_argument("--orders", default=None, help="engine liquidation-orders PUSH endpoint (default: config)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of trading (0: until Ctrl-C)")
    ap.add_argument("--accounts", type=int, default=100)
    ap.add_argument("--rate", type=float, default=200.0, help="order checks per second")
    ap.add_argument("--batch", type=int, default=1, help="fills per frame (1: plain FILL frames)")
    ap.add_argument("--in-flight", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--instruments", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--backstop", type=int, default=BACKSTOP_ACCOUNT)
    ap.add_argument("--no-fund", action="store_true", help="skip the deposits")
    ap.add_argument("--fund-timeout", type=float, default=10.0)
    ap.add_argument("--venues", default=None, metavar="ENDPOINT",
                    help="also run the venue simulator to this oracle endpoint and trade near its prices")
    args = ap.parse_args(argv)

    from engine.config import load, load_default
    cfg = load(args.config) if args.config else load_default()
    ep = cfg.endpoints
    names = [n for n in args.instruments.split(",") if n] or None
    price_fn = None
    venue_thread = None
    stop = threading.Event()
    if args.venues:
        from feeds.sim.venues import VenueSim, run_venues
        vsim = VenueSim.from_config(cfg, seed=args.seed)
        price_fn = vsim.price
        venue_thread = threading.Thread(target=run_venues, daemon=True,
                                        args=(args.venues, vsim.start),
                                        kwargs={"duration_s": None, "stop_event": stop, "sim": vsim})
        venue_thread.start()
    sim = MatchingSim(args.fills or ep.fills, args.checks or ep.checks, args.orders or ep.orders,
                      names, args.accounts, args.seed, config=cfg, price_fn=price_fn,
                      rate_hz=args.rate, batch_size=args.batch, max_in_flight=args.in_flight,
                      backstop_account=args.backstop)
    out: dict = {}
    try:
        if not args.no_fund:
            out["funding"] = sim.fund_accounts(args.fund_timeout)
            print(f"funding: {out['funding']}", file=sys.stderr)
        sim.run(args.duration if args.duration > 0 else None)
    except KeyboardInterrupt:
        out["interrupted"] = True
    finally:
        stop.set()
        sim.stop(linger_ms=1000)
        if venue_thread is not None:
            venue_thread.join(2.0)
    out["stats"] = sim.stats.summary()
    print(json.dumps(out, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

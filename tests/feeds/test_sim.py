"""The venue and matching-engine simulators against a fake engine on real sockets.

Each test binds the engine's side itself (PULL / ROUTER / PUSH on random ports) and
speaks only the wire protocol (``feeds/protocol.py``) to the simulator.
"""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from feeds.oracle.index import Tick
from feeds.protocol import MsgType, Rejected, Sequencer, decode, encode
from feeds.sim.matching import MatchingSim, SimInstrument, fee_units
from feeds.sim.venues import VenueSim, replay_venues, run_venues

pytestmark = pytest.mark.integration

START = {"BTCUSDT": 95_000.0, "ETHUSDT": 3_400.0}
ASSETS = ["BTC", "ETH", "STETH", "USDT", "USDC"]          # derived from START's paths + fixed
QUIET = dict(jump_rate_per_s=0.0, outage_rate_per_s=0.0, spike_rate_per_s=0.0)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def bind(ctx: zmq.Context, kind: int) -> tuple[zmq.Socket, str]:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    return s, f"tcp://127.0.0.1:{port}"


def drain(sock: zmq.Socket, until: threading.Thread | None = None, quiet_ms: int = 300,
          deadline_s: float = 8.0) -> list:
    """Decode frames until ``until`` has finished and nothing came for ``quiet_ms``."""
    out = []
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if sock.poll(quiet_ms):
            out.append(decode(sock.recv()))
        elif until is None or not until.is_alive():
            break
    return out


def recv_one(sock: zmq.Socket, timeout_ms: int = 5000):
    assert sock.poll(timeout_ms), "nothing received"
    return sock.recv_multipart() if sock.type == zmq.ROUTER else sock.recv()


# ---------------------------------------------------------------------------------------
# Venues
# ---------------------------------------------------------------------------------------

def run_in_thread(**kw) -> threading.Thread:
    t = threading.Thread(target=run_venues, kwargs=kw, daemon=True)
    t.start()
    return t


@pytest.mark.timeout(30)
def test_venue_ticks_decode_with_consecutive_seq_and_sane_prices(ctx):
    pull, ep = bind(ctx, zmq.PULL)
    t = run_in_thread(endpoint=ep, instruments=START, n_venues=3, rate_hz=20, duration_s=1.0,
                      seed=7, ctx=ctx, linger_ms=2000, **QUIET)
    msgs = drain(pull, until=t)
    t.join(5)
    assert all(type(m) is not Rejected and m.type is MsgType.ORACLE_TICK for m in msgs)
    # 20 steps x 3 venues x (2 instruments + 5 assets) = 420 (linger_ms: none lost at close)
    assert len(msgs) == 420
    assert [m.seq for m in msgs] == list(range(1, len(msgs) + 1))
    names = {m.fields["instrument"] for m in msgs}
    assert names == set(START) | set(ASSETS)
    assert {m.fields["venue"] for m in msgs} == {"sim-venue-0", "sim-venue-1", "sim-venue-2"}
    now = time.time_ns()
    ref = dict(START, BTC=95_000.0, ETH=3_400.0, STETH=3_390.0, USDT=1.0, USDC=1.0)
    for m in msgs:
        f = m.fields
        # 1 s of 1 bp/sqrt(s) diffusion and 2 bp venue noise: far inside +-2 %
        assert abs(f["price"] / ref[f["instrument"]] - 1) < 0.02, f
        assert 0 <= now - f["venue_ts_ns"] < 10 * 10**9


@pytest.mark.timeout(30)
def test_spike_fault_shows_on_one_venue_only(ctx):
    pull, ep = bind(ctx, zmq.PULL)
    sim = VenueSim(START, n_venues=3, seed=3, **QUIET)
    sim.spike("sim-venue-1", pct=0.20, ticks=3)            # +20 % on its next 3 steps
    t = run_in_thread(endpoint=ep, instruments=START, rate_hz=20, duration_s=0.5, sim=sim, ctx=ctx,
                      linger_ms=2000)
    msgs = drain(pull, until=t)
    t.join(5)
    ref = dict(START, BTC=95_000.0, ETH=3_400.0, STETH=3_390.0, USDT=1.0, USDC=1.0)
    spiked = [m.fields for m in msgs if abs(m.fields["price"] / ref[m.fields["instrument"]] - 1) > 0.10]
    assert {f["venue"] for f in spiked} == {"sim-venue-1"}
    assert len(spiked) == 3 * 7                            # 3 steps x every name it quotes
    assert all(1.18 < f["price"] / ref[f["instrument"]] < 1.22 for f in spiked)
    assert sum(f["venue"] == "sim-venue-1" for f in (m.fields for m in msgs)) > len(spiked)


@pytest.mark.timeout(30)
def test_outage_silences_one_venue_then_it_returns():
    sim = VenueSim(START, n_venues=3, seed=1, **QUIET)
    sim.outage("sim-venue-2", 1.0)
    during = [t for _ in range(10) for t in sim.step(0.1, now_ns=1)]      # t = 0.1 .. 1.0 s
    after = sim.step(0.1, now_ns=1)
    assert {t.venue for t in during} == {"sim-venue-0", "sim-venue-1"}
    assert {t.venue for t in after} == {"sim-venue-0", "sim-venue-1", "sim-venue-2"}


@pytest.mark.timeout(30)
def test_crash_drives_the_root_and_everything_derived_from_it():
    sim = VenueSim({"BTCUSDT": 95_000.0, "BTCUSD": 95_000.0, "ETHUSDT": 3_400.0}, seed=2,
                   vol_per_sqrt_s=0.0, **QUIET)
    sim.crash("BTCUSD", 0.30, over_s=2.0)                  # a follower: its root crashes
    for _ in range(10):
        sim.step(0.1)
    mid = sim.price("BTCUSDT")
    for _ in range(20):
        sim.step(0.1)
    p = sim.true_prices()
    assert mid == pytest.approx(95_000 * 0.7 ** 0.5, rel=1e-9)   # log-linear: half way at 1 s
    assert p["BTCUSDT"] == pytest.approx(66_500.0, rel=1e-9)     # -30 % after 2 s, then flat
    assert p["BTCUSD"] == p["BTC"] == p["BTCUSDT"]
    assert p["ETHUSDT"] == 3_400.0 and p["USDT"] == 1.0


@pytest.mark.timeout(30)
def test_replay_sends_recorded_ticks_renamed_and_retimed(ctx):
    pull, ep = bind(ctx, zmq.PULL)
    old = 1_678_500_000 * 10**9                            # 2023-03-11
    ticks = [Tick("BTC-USD", "kraken:XBTUSDC", 20_000.0 + i, old + i * 10**9) for i in range(5)]
    stats = replay_venues(ep, ticks, speed=float("inf"), ctx=ctx, linger_ms=2000)
    msgs = drain(pull)
    assert stats["sent"] == 10 and stats["ticks"] == 5
    assert [m.seq for m in msgs] == list(range(1, 11))
    assert [(m.fields["instrument"], m.fields["price"]) for m in msgs[:2]] == [
        ("BTCUSDT", 20_000.0), ("BTC", 20_000.0)]
    assert all(m.fields["venue"] == "kraken:XBTUSDC" for m in msgs)
    assert all(abs(time.time_ns() - m.fields["venue_ts_ns"]) < 10 * 10**9 for m in msgs)


# ---------------------------------------------------------------------------------------
# Matching engine
# ---------------------------------------------------------------------------------------

@pytest.fixture
def engine(ctx):
    """The engine's three sockets: ROUTER for checks, PULL for fills, PUSH for orders."""
    router, checks_ep = bind(ctx, zmq.ROUTER)
    pull, fills_ep = bind(ctx, zmq.PULL)
    push, orders_ep = bind(ctx, zmq.PUSH)
    push.setsockopt(zmq.SNDTIMEO, 5000)
    return {"router": router, "fills": pull, "orders": push, "seq": Sequencer(),
            "eps": (fills_ep, checks_ep, orders_ep)}


def reply(engine, ident: bytes, mtype: MsgType, fields: dict) -> None:
    engine["router"].send_multipart([ident, engine["seq"].encode(mtype, fields)])


def check_reply(engine, ident: bytes, request_id: int, code: int) -> None:
    reply(engine, ident, MsgType.ORDER_CHECK_REPLY,
          {"request_id": request_id, "code": code, "post_equity_usd": 1000.0,
           "post_initial_margin_usd": 10.0})


@pytest.mark.timeout(30)
def test_deposits_are_sent_and_collateral_replies_handled(ctx, engine):
    sim = MatchingSim(*engine["eps"], ["BTCUSDT"], 2, seed=1, ctx=ctx,
                      deposit_range=(1_000, 1_000), backstop_deposits={"USDT": 1_000_000})
    result = {}
    t = threading.Thread(target=lambda: result.update(sim.fund_accounts(timeout_s=8)), daemon=True)
    t.start()
    seen = []
    for _ in range(3):
        ident, frame = recv_one(engine["router"])
        m = decode(frame)
        assert type(m) is not Rejected and m.type is MsgType.DEPOSIT
        seen.append(m.fields)
    assert [m["account"] for m in seen] == [1, 2, 999_999]
    assert {m["asset"] for m in seen} == {"USDT"}
    assert [m["amount_units"] for m in seen] == [1_000 * 10**6, 1_000 * 10**6, 10**6 * 10**6]
    for f in reversed(seen):                               # replies in any order
        ok = f["account"] != 2
        reply(engine, ident, MsgType.COLLATERAL_REPLY,
              {"request_id": f["request_id"], "code": 0 if ok else 3101,
               "balance_units": f["amount_units"] if ok else 0})
    t.join(10)
    assert not t.is_alive()
    assert result["sent"] == 3 and result["applied"] == 2 and result["failed"] == 1
    assert result["missing"] == 0
    assert sim.stats.deposits_failed == {3101: 1}
    assert sim.balances[(1, "USDT")] == 1_000 * 10**6 and sim.balances[(2, "USDT")] == 0
    sim.stop()


@pytest.mark.timeout(30)
def test_accepted_order_check_becomes_a_fill_with_the_stated_fees(ctx, engine):
    sim = MatchingSim(*engine["eps"], ["BTCUSDT"], 5, seed=4, ctx=ctx, rate_hz=20, max_in_flight=1,
                      price_fn=lambda name: 95_000.0, price_jitter=0.0, max_order_usd=95.0)
    sim.start()
    try:
        ident, frame = recv_one(engine["router"])
        first = decode(frame)
        assert first.type is MsgType.ORDER_CHECK
        check_reply(engine, ident, first.fields["request_id"], 4001)   # refused: no fill
        ident, frame = recv_one(engine["router"])
        check = decode(frame).fields
        assert check["request_id"] != first.fields["request_id"]
        check_reply(engine, ident, check["request_id"], 0)              # accepted
        fill_msg = decode(recv_one(engine["fills"]))
    finally:
        stats = sim.stop()
    assert type(fill_msg) is not Rejected and fill_msg.type is MsgType.FILL and fill_msg.seq == 1
    fill = fill_msg.fields
    assert fill["taker_account"] == check["account"] != fill["maker_account"]
    assert 1 <= fill["maker_account"] <= 5
    assert fill["instrument_id"] == check["instrument_id"] == 0           # BTCUSDT
    assert fill["qty_units"] == check["qty_units"] in (1, -1)            # max_order_usd: 1 lot
    assert fill["taker_side"] == ("buy" if fill["qty_units"] > 0 else "sell")
    assert fill["price_units"] == check["price_units"] == 950_000         # 95,000.0 x price_scale 10
    # notional = 1 unit / qty_scale 1000 x contract_size 1.0 x 95,000.0 = 95 USDT
    # taker: 95 x 0.0005 = 0.0475 USDT = 47,500 micro-USDT (USDT scale 10**6)
    # maker: 95 x -0.0001 = -0.0095 USDT = -9,500 micro-USDT (a rebate)
    assert fill["taker_fee_units"] == 47_500
    assert fill["maker_fee_units"] == -9_500
    assert stats.checks_rejected == {4001: 1} and stats.checks_accepted >= 1
    assert stats.fills_sent >= 1 and len(stats.check_latency_ns) >= 2
    assert all(x > 0 for x in stats.check_latency_ns)


@pytest.mark.timeout(30)
def test_fee_arithmetic_for_an_inverse_contract():
    btcusd = SimInstrument("BTCUSD", 4, True, 100.0, 1, 10, "BTC", 10**8, 95_000.0)
    # 3 contracts x 100 USD / 95,000 USD/BTC = 0.0031578947 BTC of notional
    # taker: x 0.0005 x 10**8 sat = 157.89 -> 158 sat; maker: x -0.0001 -> -31.58 -> -32 sat
    assert fee_units(btcusd, -3, 950_000, 0.0005) == 158
    assert fee_units(btcusd, -3, 950_000, -0.0001) == -32


@pytest.mark.timeout(30)
def test_liquidation_order_is_filled_against_the_backstop_at_the_limit(ctx, engine):
    # The market (93,000) is below the sell order's limit (94,000): the backstop fills at
    # the limit, the better price for the liquidated account an IOC limit allows.
    sim = MatchingSim(*engine["eps"], ["BTCUSDT"], 10, seed=5, ctx=ctx, rate_hz=0,
                      backstop_account=999_999, price_fn=lambda name: 93_000.0)
    sim.start()
    try:
        order = {"order_id": 9_000_001, "account": 7, "instrument_id": 0, "qty_units": -250,
                 "limit_price_units": 940_000, "reason": 6001, "tick_seq": 31,
                 "tick_recv_ns": time.time_ns(), "decided_ns": time.time_ns(),
                 "sent_ns": time.time_ns()}
        engine["orders"].send(encode(MsgType.LIQUIDATION_ORDER, order, seq=1, ts_ns=time.time_ns()))
        m = decode(recv_one(engine["fills"]))
    finally:
        stats = sim.stop()
    assert type(m) is not Rejected and m.type is MsgType.FILL
    f = m.fields
    assert (f["maker_account"], f["taker_account"]) == (999_999, 7)
    assert (f["qty_units"], f["price_units"], f["taker_side"]) == (-250, 940_000, "sell")
    # 250 units / 1000 = 0.25 BTC x 94,000.0 = 23,500 USDT of notional
    # taker 5 bps = 11.75 USDT = 11,750,000 units; maker -1 bp = -2.35 USDT = -2,350,000
    assert (f["taker_fee_units"], f["maker_fee_units"]) == (11_750_000, -2_350_000)
    assert stats.liquidations_received == 1 and stats.liquidations_filled == 1
    assert stats.checks_sent == 0


@pytest.mark.timeout(30)
def test_with_cancel_past_market_an_order_limited_beyond_the_market_gets_no_fill(ctx, engine):
    # The same sell limited at 94,000 with the market at 93,000 (an account below
    # bankruptcy): an honest immediate-or-cancel book cancels it; at a market of 95,000
    # (above the limit) it fills at the market, 950,000.
    price = [93_000.0]
    sim = MatchingSim(*engine["eps"], ["BTCUSDT"], 10, seed=5, ctx=ctx, rate_hz=0, backstop_account=999_999,
                      price_fn=lambda name: price[0], cancel_past_market=True)
    sim.start()
    try:
        order = {"order_id": 9_000_001, "account": 7, "instrument_id": 0, "qty_units": -250,
                 "limit_price_units": 940_000, "reason": 6003, "tick_seq": 31,
                 "tick_recv_ns": time.time_ns(), "decided_ns": time.time_ns(), "sent_ns": time.time_ns()}
        engine["orders"].send(encode(MsgType.LIQUIDATION_ORDER, order, seq=1, ts_ns=time.time_ns()))
        assert not engine["fills"].poll(500)
        price[0] = 95_000.0
        engine["orders"].send(encode(MsgType.LIQUIDATION_ORDER, {**order, "order_id": 9_000_002}, seq=2,
                                     ts_ns=time.time_ns()))
        m = decode(recv_one(engine["fills"]))
    finally:
        stats = sim.stop()
    assert type(m) is not Rejected and (m.fields["qty_units"], m.fields["price_units"]) == (-250, 950_000)
    assert (stats.liquidations_received, stats.liquidations_cancelled, stats.liquidations_filled) == (2, 1, 1)


@pytest.mark.timeout(30)
def test_batched_fills_form_batch_frames_with_consecutive_seqs(ctx, engine):
    sim = MatchingSim(*engine["eps"], ["BTCUSDT", "ETHUSDT", "SOLUSDT"], 20, seed=6, ctx=ctx,
                      rate_hz=500, max_in_flight=32, batch_size=5, batch_interval_s=5.0)
    sim.start()
    frames = []
    try:
        end = time.monotonic() + 8
        while len(frames) < 4 and time.monotonic() < end:
            if engine["router"].poll(10):
                ident, frame = engine["router"].recv_multipart()
                check_reply(engine, ident, decode(frame).fields["request_id"], 0)
            while engine["fills"].poll(0):
                frames.append(decode(engine["fills"].recv()))
    finally:
        sim.stop()
    assert len(frames) >= 4
    expected_seq, expected_trade = 1, 1
    for m in frames:
        assert type(m) is not Rejected and m.type is MsgType.BATCH and m.fields["of"] is MsgType.FILL
        msgs = m.fields["msgs"]
        assert len(msgs) == 5                              # full batches (interval is 5 s)
        assert m.seq == expected_seq                       # a batch of n takes n numbers
        assert [x["trade_id"] for x in msgs] == list(range(expected_trade, expected_trade + 5))
        assert all(x["taker_side"] == ("buy" if x["qty_units"] > 0 else "sell") for x in msgs)
        expected_seq += len(msgs)
        expected_trade += len(msgs)

"""``margin-engine demo``: the engine on its embedded default, against simulated venues
and a simulated matching engine, watched live in the terminal.

What runs (all real processes and sockets, on private ipc endpoints):

1. the engine: supervisor, fills/order-check gateway, margin workers (worker 0 also
   runs the mark-price stage: ``engine.price_stage``), liquidation gateway, over shared
   memory loaded with ``--accounts``
   leveraged accounts and a house account (the backstop liquidity provider);
2. an "exchange" process: three simulated oracle venues (random walk with jumps, venue
   outages and spikes) and a simulated matching engine (random trades between the
   accounts, each checked first with the engine's pre-trade check; liquidation orders
   filled against the backstop);
3. at 30 % of the run BTC and ETH crash (``--crash`` percent over a few seconds; 0: no
   crash), so the accounts nearest liquidation breach and the engine liquidates them,
   partially first, tier by tier.

The screen shows ticks/s, fills/s, marks, the accounts nearest liquidation, the
liquidations as they happen and the tick-to-decision latency the workers stamp on
each order (tick received -> order sent, inside the engine), by the stage that found
the breach (the ``stage`` of each order's event): the trigger index on the tick's hot
path (1a), or the holders' pass right after it (1b), which catches the breaches whose
trigger went stale because another mark moved -- in a crash of BTC and ETH together,
many; or the collateral pass, when the price of a collateral asset (BTC, ETH held as
margin) moved, timed from the tick that moved it. Orders re-sent after 2 s have no tick
of their own and are counted only.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, deque

import numpy as np
import zmq

from engine.codes import Code
from engine.config import load_default
from engine.liquidation.takeover import TakeoverPolicy
from engine.runtime.harness import LocalEngine, local_config
from engine.runtime.provision import HOUSE_ACCOUNT, provision
from engine.runtime.status import snapshot
from engine.runtime.supervisor import _exit_words
from engine.runtime.worker import STAGE_COLLATERAL, STAGE_FILL, STAGE_HOLDERS, STAGE_RESEND, STAGE_TRIGGER, STAGES
from feeds.protocol import MsgType, Rejected, decode

TAKEOVER_CODES = {int(Code.TAKEN_BY_BACKSTOP): "backstop", int(Code.TAKEN_BY_INSURANCE_FUND): "insurance fund",
                  int(Code.AUTO_DELEVERAGED): "ADL", int(Code.TAKEOVER_NO_ROUTE): "no taker"}
# The demo's insurance fund: an account of its own with 5M USDT; it takes (at the
# bankruptcy price) what the simulated book cancels: orders limited beyond the market.
INSURANCE_FUND_ACCOUNT = 999_998
INSURANCE_FUND_USDT = 5_000_000
LIQ_CODES = {int(Code.LIQ_BELOW_MAINTENANCE): "below maintenance",
             int(Code.LIQ_ISOLATED_BELOW_MAINTENANCE): "isolated below maintenance",
             int(Code.LIQ_BELOW_BANKRUPTCY): "below bankruptcy: closed in full"}
CRASH_INSTRUMENTS = ("BTCUSDT", "ETHUSDT")


class DemoError(Exception):
    """The demo could not run to its end: the engine did not start, or the simulated
    exchange died. One line saying why; ``margin-engine demo`` exits 1."""


class DemoInterrupted(Exception):
    """Ctrl-C (or SIGTERM, SIGHUP) before the run began: the engine is stopped and
    everything removed; ``margin-engine demo`` exits 130."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def code_name(code: int) -> str:
    """An event code's name (``EVENT_VENUE_READMITTED``), its number when it has none."""
    try:
        return Code(code).name
    except ValueError:
        return str(code)


class _ExchangeFailed(Exception):
    """Inside the exchange process: one of its threads died (the message says which)."""


def _exchange(cfg, n_accounts: int, duration_s: float, crash_at_s: float, crash_pct: float,
              seed: int, out, done) -> None:
    """Simulated venues and matching engine, in their own process (protocol only).

    ``done``: the receiving end of a pipe; anything on it ends the run early. ``out``:
    the sending end of one; at the end it carries ``("summary", stats)``, or as soon as
    something here fails (the venues' or the matching engine's thread died, or this
    process could not start them) ``("error", one line)``: the demo then stops.
    """
    # The demo stops us (a pipe message), not a signal. It started us with these
    # signals blocked, so a Ctrl-C while we imported stayed pending: ignoring them
    # discards it, and only then are they unblocked.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    failed: list[str] = []

    def on_thread_error(a) -> None:          # a thread's uncaught exception: report it, once
        failed.append(f"{a.thread.name if a.thread else 'a thread'} died: {a.exc_type.__name__}: {a.exc_value}")

    threading.excepthook = on_thread_error
    try:
        out.send(("summary", _simulate(cfg, n_accounts, duration_s, crash_at_s, crash_pct, seed,
                                       done, failed)))
    except _ExchangeFailed as e:
        out.send(("error", str(e)))
    except BaseException as e:               # noqa: BLE001 -- whatever it was, the demo hears it
        out.send(("error", failed[0] if failed else f"{type(e).__name__}: {e}"))


def _simulate(cfg, n_accounts, duration_s, crash_at_s, crash_pct, seed, done, failed) -> dict:
    from feeds.sim.matching import MatchingSim
    from feeds.sim.venues import VenueSim, run_venues

    ep = cfg.endpoints
    vsim = VenueSim.from_config(cfg, seed=seed)
    t0 = time.monotonic()
    crashed = [] if crash_pct else [0]       # --crash 0: none scheduled

    def on_step(sim) -> None:
        if not crashed and time.monotonic() - t0 >= crash_at_s:
            for name in CRASH_INSTRUMENTS:
                sim.crash(name, crash_pct, max(2.0, duration_s * 0.15))
            crashed.append(1)

    stop = threading.Event()
    venues = threading.Thread(target=run_venues, daemon=True, name="venue simulator", args=(ep.oracle, {}),
                              kwargs={"duration_s": None, "stop_event": stop, "sim": vsim,
                                      "rate_hz": 10.0, "on_step": on_step})
    venues.start()
    names = [i.name for i in cfg.instruments if i.kind.name in ("PERP", "FUTURE")]
    sim = None
    try:
        sim = MatchingSim(ep.fills, ep.checks, ep.orders, names, n_accounts, seed, config=cfg,
                          price_fn=vsim.price, rate_hz=300, backstop_account=HOUSE_ACCOUNT,
                          max_order_usd=2000, cancel_past_market=True)
        sim.start(duration_s)
        deadline = time.monotonic() + duration_s
        while True:                          # the run's length, or until the demo ends it early
            left = deadline - time.monotonic()
            if left <= 0 or done.poll(min(0.1, left)):
                break
            if failed or not venues.is_alive():   # the venues run until told to stop
                raise _ExchangeFailed(failed[0] if failed else "the venue simulator stopped")
    finally:
        stop.set()
        if sim is not None:
            sim.stop(linger_ms=500)
        venues.join(2.0)
    return sim.stats.summary()


def _percentiles(values) -> str:
    if not values:
        return "-"
    a = np.asarray(values)
    return " / ".join(f"{np.percentile(a, q):.0f}" for q in (50, 90, 99)) + " us"


def _by_stage(t2d: dict, counts: dict) -> str:
    """Orders by the stage that found them, with tick->order percentiles where a tick did."""
    return (f"trigger index (1a) {counts[STAGE_TRIGGER]}: tick->order p50/p90/p99 {_percentiles(t2d[STAGE_TRIGGER])}; "
            f"holders' pass (1b) {counts[STAGE_HOLDERS]}: {_percentiles(t2d[STAGE_HOLDERS])}; "
            f"collateral pass {counts[STAGE_COLLATERAL]}: {_percentiles(t2d[STAGE_COLLATERAL])}; "
            f"after a fill {counts[STAGE_FILL]}: fill->order {_percentiles(t2d[STAGE_FILL])}; "
            f"re-sent {counts[STAGE_RESEND]}")


class Screen:
    def __init__(self, tty: bool):
        self.tty = tty
        self.lines: list[str] = []

    def show(self, lines: list[str]) -> None:
        if self.tty:
            sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")
        else:
            sys.stdout.write("  |  ".join(lines[1:5]) + "\n")     # the counters, one line a refresh
        sys.stdout.flush()


def _start_exchange(mpc, args: tuple):
    """Start the exchange process with the stop signals blocked here, so that it starts
    with them blocked (a signal mask survives fork and exec): a Ctrl-C to the terminal's
    process group while it imports stays pending in it until it ignores them. Here the
    signal waits the few milliseconds of the start, and is then handled: nothing lost.

    The resource tracker is started first: starting it (on a process's first start)
    unblocks SIGINT and SIGTERM on its way out, which would undo the block."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    proc = mpc.Process(target=_exchange, daemon=True, name="demo exchange", args=args)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        proc.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return proc


def _exchange_result(proc, results, timeout_s: float):
    """The exchange's ``(kind, value)`` message, waiting at most ``timeout_s``; ``None``
    when it exited (or was still silent) without one. Returns as soon as either comes."""
    mp.connection.wait([results, proc.sentinel], timeout=timeout_s)
    try:
        if results.poll():
            return results.recv()
    except (EOFError, OSError):
        pass
    return None


def _stop_exchange(proc, stop_exchange, results) -> tuple | None:
    """Tell the exchange to stop, take its last message, make sure it is gone."""
    try:
        stop_exchange.send(True)       # early end (Ctrl-C): the exchange stops and reports
    except OSError:
        pass                           # it is gone already
    message = _exchange_result(proc, results, 8.0)
    proc.join(timeout=5)
    if proc.is_alive():                # it ignores SIGTERM: the stop above is its way out
        proc.kill()
        proc.join()
    return message


def run_demo(duration_s: float = 30.0, accounts: int = 5000, workers: int = 1, crash_pct: float = 0.12,
             seed: int = 7, tty: bool | None = None) -> dict:
    """Run the demo; return its summary (also printed).

    Ctrl-C, a closed terminal or a kill all end the run the same way: cleanly, with the
    engine stopped and its shared memory, sockets and temporary directory removed.
    Before the run began (the engine starting) that raises ``DemoInterrupted``; after,
    the run ends early and the summary is returned. ``DemoError`` when the engine did
    not start or the simulated exchange died, with everything removed as well.
    """
    tty = sys.stdout.isatty() if tty is None else tty
    stop: list = []
    old = {sig: signal.signal(sig, lambda *_: stop.append(1)) for sig in STOP_SIGNALS}
    try:
        root = tempfile.mkdtemp(prefix="me-demo-")
        try:
            return _run(root, stop, duration_s, accounts, workers, crash_pct, seed, tty)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _run(root: str, stop: list, duration_s: float, accounts: int, workers: int, crash_pct: float,
         seed: int, tty: bool) -> dict:
    base = dataclasses.replace(load_default(), liquidation=TakeoverPolicy(
        insurance_fund_account=INSURANCE_FUND_ACCOUNT, after_ms=500))
    cfg = local_config(root, base, accounts_capacity=max(accounts + 10, 1000), partitions=max(2, workers))
    print(f"margin-engine demo: loading {accounts:,} accounts (leveraged 2x-25x on BTC, ETH, SOL "
          f"perps and the BTC future) into shared memory /{cfg.engine.name} ...", file=sys.stderr)
    # on failure (Ctrl-C is only a flag here) the segments it made are unlinked
    def setup(st) -> None:
        provision(st, cfg, accounts, seed=seed)
        fund = st.add_account(INSURANCE_FUND_ACCOUNT)
        usdt = cfg.asset("USDT")
        st.set_balance(fund, usdt.index, INSURANCE_FUND_USDT * usdt.scale)
    engine = LocalEngine(cfg, setup=setup, n_workers=workers)
    ctx = zmq.Context.instance()
    events = ctx.socket(zmq.SUB)
    events.setsockopt(zmq.LINGER, 0)
    events.setsockopt(zmq.SUBSCRIBE, b"")
    started = False
    try:
        if not stop:
            try:
                engine.__enter__()          # a failed start stops what it started, unlinks the memory
                started = True
            except Exception as e:          # EngineFailure, TimeoutError, OSError
                if not stop:
                    raise DemoError(f"the engine did not start: {e}") from None
        if stop:                            # a Ctrl-C to the process group also kills the engine's
            raise DemoInterrupted()         # processes that had not yet set their signals
        return _live(engine, cfg, events, stop, duration_s, accounts, workers, crash_pct, seed, tty)
    finally:
        events.close()
        if not started:
            engine.discard()                # nothing runs: release the segments
        elif not hasattr(engine, "exit_codes"):   # running still: an error on the way
            engine.__exit__(None, None, None)


def _live(engine: LocalEngine, cfg, events, stop: list, duration_s: float, accounts: int, workers: int,
          crash_pct: float, seed: int, tty: bool) -> dict:
    store = engine.store
    names = [bytes(r["name"]).rstrip(b"\0").decode() for r in store.instruments]
    summary: dict = {}
    events.connect(cfg.endpoints.events)
    crash = f"BTC and ETH crash {crash_pct:.0%} at {duration_s * 0.3:.0f} s" if crash_pct else "no crash"
    print(f"engine up: {workers} worker{'' if workers == 1 else 's'}, blocking waits; starting venues and "
          f"matching engine; {crash}", file=sys.stderr)
    mpc = mp.get_context("spawn")
    results, results_w = mpc.Pipe(duplex=False)    # the exchange's summary, or why it failed
    done, stop_exchange = mpc.Pipe(duplex=False)   # a message on it ends the exchange early
    exch = _start_exchange(mpc, (cfg, accounts, duration_s, duration_s * 0.3, crash_pct, seed, results_w, done))
    results_w.close()                              # its copy is the exchange's now
    done.close()
    early = None          # what the exchange said, or how it ended, before the run's end
    try:
        screen = Screen(tty)
        start_marks = store.prices["mark"].copy()
        liqs: deque = deque(maxlen=8)
        n_liq = 0
        n_accounts_liquidated: set[int] = set()
        t2d: dict[str, list[float]] = {s: [] for s in STAGES if s != STAGE_RESEND}   # us, by stage
        by_stage = dict.fromkeys(STAGES, 0)
        other_events: deque = deque(maxlen=4)
        takeovers: Counter = Counter()                # route -> legs
        taken: deque = deque(maxlen=4)
        t0 = time.monotonic()
        end = t0 + duration_s
        last_t, last_seq, last_fills = t0, int(store.prices["price_seq"].sum()), int(store.partitions["fills_applied"].sum())
        rates = (0.0, 0.0)
        while not stop and time.monotonic() < end:
            deadline = min(time.monotonic() + 0.5, end)
            while time.monotonic() < deadline:
                if not events.poll(50):
                    continue
                m = decode(events.recv())
                if type(m) is Rejected or m.type != MsgType.ENGINE_EVENT:
                    continue
                f = m.fields
                if f["code"] in LIQ_CODES:
                    d = json.loads(f["detail"])
                    n_liq += 1
                    n_accounts_liquidated.add(f["account"])
                    by_stage[d["stage"]] += 1
                    if d["stage"] in t2d:
                        t2d[d["stage"]].append(d["tick_to_sent_us"])
                    liqs.append(f"  account {f['account']:>6}  {f['instrument']:<16} "
                                f"{'SELL' if d['qty_units'] < 0 else 'BUY '} {abs(d['qty_units']):>8} units  "
                                f"limit {d['limit_price_units'] / int(store.instruments[names.index(f['instrument'])]['price_scale']):>10.2f}"
                                f"  {LIQ_CODES[f['code']]:<18} "
                                + (f"tick->order {d['tick_to_sent_us']:.0f} us ({d['stage']})" if d["stage"] in t2d
                                   else f"({d['stage']})"))
                elif f["code"] in TAKEOVER_CODES:
                    route = TAKEOVER_CODES[f["code"]]
                    takeovers[route] += 1
                    d = json.loads(f["detail"]) if f["detail"].startswith("{") else {}
                    if "counterparty" in d:
                        taken.append(f"  account {d['liquidated_account']:>6}  {names[d['instrument_id']]:<16} "
                                     f"{abs(d['qty_units']):>8} units at {d['price_units'] / int(store.instruments[d['instrument_id']]['price_scale']):>10.2f}"
                                     f"  -> {route} (account {d['counterparty']})")
                else:
                    other_events.append(f"  [{code_name(f['code'])}] {f.get('instrument') or ''} {f['detail'][:70]}")
            if results.poll() or not exch.is_alive():   # it ended first: it failed
                early = _exchange_result(exch, results, 1.0)
                if early is None:
                    exch.join(1.0)
                    early = ("error", _exit_words(exch.exitcode))
                break
            now = time.monotonic()
            seq = int(store.prices["price_seq"].sum())
            fills = int(store.partitions["fills_applied"].sum())
            rates = ((seq - last_seq) / (now - last_t), (fills - last_fills) / 2 / (now - last_t))
            last_t, last_seq, last_fills = now, seq, fills
            s = snapshot(store, top=5)
            lines = [
                "margin-engine demo: simulated venues -> mark prices -> margin workers -> liquidation orders",
                f"t={min(now, end) - t0:5.1f}s of {duration_s:.0f}s   mark updates {rates[0]:6.0f}/s   fills applied {rates[1]:6.0f}/s   "
                f"accounts {s['accounts']:,}",
                f"liquidation orders {n_liq} ({len(n_accounts_liquidated)} accounts), by what found the breach:",
                f"  {_by_stage(t2d, by_stage)}",
                f"at risk now: {s['liquidatable']} in breach, {s['near_liquidation']} near (ratio >= 0.8); "
                f"bad debt {s['bad_debt_accounts']} accounts, {s['bad_debt_usd']:,.0f} USD (negative equity no takeover has covered)",
                "",
                "marks (change since start):",
            ]
            for i, p in enumerate(s["prices"][:5]):
                ch = (p["mark"] / start_marks[i] - 1) * 100 if start_marks[i] else 0.0
                lines.append(f"  {p['instrument']:<18}{p['mark']:>12.2f}  {ch:+6.2f}%  {'FROZEN' if p['frozen'] else ''}")
            lines += ["", "nearest liquidation (maintenance / equity; >= 1 is in breach):"]
            for a in s["nearest_liquidation"]:
                lines.append(f"  account {a['account']:>6}  equity {a['equity_usd']:>12,.2f}  maint {a['maintenance_usd']:>11,.2f}"
                             f"  ratio {a['margin_ratio'] if a['margin_ratio'] is not None else 'inf'}")
            lines += ["", "latest liquidations:"] + (list(liqs) or ["  (none yet: prices have not moved far enough)"])
            lines += ["", "takeovers (orders the book cancelled: limit beyond the market) "
                      + (", ".join(f"{k} {v}" for k, v in sorted(takeovers.items())) or "none yet") + ":"] \
                + (list(taken) or ["  (none yet)"])
            lines += ["", "other engine events:"] + (list(other_events) or ["  (none)"])
            screen.show(lines)
    finally:
        last = _stop_exchange(exch, stop_exchange, results)
        results.close()
        stop_exchange.close()
    kind, value = early or last or ("summary", None)
    if kind == "error":
        raise DemoError(f"the simulated exchange failed: {value}")
    summary["exchange"] = value
    engine.__exit__(None, None, None)
    summary.update({"accounts": accounts, "liquidation_orders": n_liq,
                    "accounts_liquidated": len(n_accounts_liquidated),
                    "orders_by_stage": by_stage, "takeovers": dict(takeovers),
                    "tick_to_order_us": {st: {q_: float(np.percentile(v, q_)) for q_ in (50, 90, 99)} if v else None
                                         for st, v in t2d.items()},
                    "engine_exit_codes": engine.exit_codes})
    ex = summary["exchange"] or {}
    print(f"\ndemo done: {n_liq} liquidation orders for {len(n_accounts_liquidated)} accounts; "
          f"{ex.get('fills_sent', 0)} fills sent, {ex.get('checks_sent', 0)} order checks "
          f"({ex.get('checks_accepted', 0)} accepted); orders found by the {_by_stage(t2d, by_stage)}; "
          f"takeovers {dict(takeovers) or 'none'}; "
          f"engine processes exited {sorted(set(engine.exit_codes.values()))}")
    return summary

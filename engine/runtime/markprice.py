"""Mark-price process: oracle ticks in, marks into the shared-memory price table.

1. receive an ORACLE_TICK on the oracle PULL socket (decode: a malformed frame is
   rejected with its code and counted; nothing changes);
2. fold it into the median-of-venues index (feeds/oracle/index.py); the common case
   (a clean instrument, a known venue, no exclusion, no freeze) runs in C from frame to
   published mark (``engine._wire.OracleFast``), and the reference folds those ticks in
   afterwards (``settle``), checking that it publishes the same mark;
3. publish the instrument's mark through its price row's seqlock with the tick's
   receive time and sequence number, and ring every worker's doorbell -- once per
   instrument for all the ticks that were already waiting (a burst of venue quotes
   wakes the workers once, stamped with its last tick);
4. a timer re-evaluates staleness: a price that loses its quorum is published frozen
   (liquidations on it pause) and an ENGINE_EVENT says so.

A tick whose ``instrument`` names a collateral asset (``BTC``, ``USDC``) updates that
asset's oracle price instead.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import zmq

from engine import _wire
from engine.codes import Code
from engine.runtime import curve, process
from engine.runtime.ctl import Control, Role
from engine.store import layout as L
from engine.store.shm import Store
from feeds.oracle.index import MarkPriceCalculator, OracleParams
from feeds.protocol import MsgType, Rejected, Sequencer, decode

NS = 1_000_000_000
MAX_FOLD = 256          # ticks folded into one publication at most (bounds the delay)
SETTLE_SLICE = 8        # C-taken ticks folded into the reference per idle turn (~1-15 us a
                        # tick in Python: 32 a slice reached 230-550 us at 2,000 ticks/s)
# After taking ticks, the reference's catch-up (``settle``: Python, tens of us) waits
# this long, any new tick ending the wait: the workers just rung re-margin and send
# their orders first, on a machine where they share the CPUs (the worker's own quiet
# period is ``worker.ORDERS_OUT_QUIET_NS``).
QUIET_AFTER_TICKS_NS = 200_000
TIMER_DEFER_MAX_NS = 50_000_000   # a due staleness timer waits up to this long for the catch-up
                            # slices: it settles every waiting tick first (~4 us each, up to
                            # SETTLE_BACKLOG_MAX), which held a worker-stage tick 1-2 ms
SETTLE_BACKLOG_MAX = 256    # past this many C-taken ticks the catch-up runs (a slice a turn)
                            # whatever the quiet period: at thousands of ticks a second the
                            # period never ends, and the timer would settle them all at once
POLLIN = int(zmq.POLLIN)



TICK_TYPES = frozenset({MsgType.ORACLE_TICK})          # what the ticks PULL takes
REJECT_EVENT_EVERY_S = 10     # refused ticks: at most one event per (code, venue, instrument) this often

class MarkPriceProcess:
    def __init__(self, name: str, oracle_endpoint: str, events_endpoint: str,
                 params: OracleParams | None = None, timer_ms: int = 200, *,
                 store: Store | None = None, ctl: Control | None = None, skip_worker: int = -1,
                 fast: bool = True):
        """``store``/``ctl``: segments already attached (worker 0 running this stage, see
        ``engine.price_stage``); ``skip_worker``: a doorbell not to ring (that worker's
        own: it re-margins right after publishing); ``fast``: take the common case in C
        (``engine._wire.OracleFast``; off when a venue registry restricts the feed)."""
        self.store = store if store is not None else Store.attach(name, readonly=False)
        self.ctl = ctl if ctl is not None else Control.attach(name + "-ctl")
        self.finish_torn_writes()
        self.skip_worker = skip_worker
        self.instruments = {bytes(r["name"]).rstrip(b"\0").decode(): i
                            for i, r in enumerate(self.store.instruments)}
        self.assets: dict[str, int] = {}
        self.calc = MarkPriceCalculator(params or OracleParams())
        self.zctx = process.zmq_context()
        self.sock = self.zctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        curve.bind(self.sock, oracle_endpoint, "oracle")    # behind the CURVE allowlist over tcp, when set
        self.events = self.zctx.socket(zmq.PUSH)
        self.events.setsockopt(zmq.LINGER, 500)
        self.events.setsockopt(zmq.SNDHWM, 10000)
        self.events.connect(events_endpoint)
        self.seq_events = Sequencer()
        self.timer_ns = timer_ms * 1_000_000
        self.last_tick: dict[str, tuple[int, int]] = {}     # name -> (recv_ns, seq) of its last tick
        self._held_events: list = []                         # events of ticks fold took, sent after it publishes
        self.counters = collections.Counter()
        self._reject_events: dict[tuple, tuple] = {}       # (code, venue, instrument) -> (last event ns, since)
        self.names = list(self.instruments)                  # table order
        self.fast = None
        p = self.calc.params
        if fast and p.registry is None:
            self.fast = _wire.OracleFast(
                self.store.addr(self.store.prices),
                self.store.header.ctypes.data + L.HEADER.fields["price_seq"][1], self.names,
                [self.ctl.doorbell_addr(w) for w in range(self.ctl.n_workers) if w != skip_worker],
                p.staleness_ns, p.quorum, p.max_deviation, p.max_basis, p.max_future_skew_ns)

    def set_asset_names(self, names: list[str]) -> None:
        self.assets = {n: i for i, n in enumerate(names)}

    def finish_torn_writes(self) -> list[str]:
        """This stage is the only writer of the price and asset rows. One killed inside a
        seqlock write (worker 0, which runs the stage by default, SIGKILLed mid-publish)
        leaves that row's counter odd, and every reader -- the workers' passes, the order
        checks -- would retry on it and give up with an error; so a new writer finishes
        those writes first (the row's next publication rewrites its content). Returns
        what it finished, e.g. ``["prices[0]"]``."""
        st = self.store
        return ([f"prices[{r}]" for r in st.finish_torn_writes(st.prices)]
                + [f"assets[{r}]" for r in st.finish_torn_writes(st.assets)])

    def rejected(self, code: Code, f: dict, recv_ns: int) -> None:
        """A tick refused by the oracle rule (2001 bad price, 2002 unknown instrument, 2003
        unknown venue, 2004 timestamp backwards, 2005 stale, 2007 timestamp ahead of the
        receive time by more than ``max_future_skew_ns``): counted, and an ENGINE_EVENT at
        most once per ``REJECT_EVENT_EVERY_S`` for each (code, venue, instrument), saying
        how many were refused since its last one -- a venue sending bad prices is an
        incident, but it must not flood the events stream."""
        self.counters[f"reject_{int(code)}"] += 1
        key = (int(code), f["venue"], f["instrument"])
        last_ns, since = self._reject_events.get(key, (None, 0))
        if last_ns is not None and recv_ns - last_ns < REJECT_EVENT_EVERY_S * 1_000_000_000:
            self._reject_events[key] = (last_ns, since + 1)
            return
        if len(self._reject_events) >= 10_000:          # names from a broken feed: bounded
            self._reject_events.clear()
        self._reject_events[key] = (recv_ns, 0)
        known = f["instrument"] in self.instruments or f["instrument"] in self.assets
        self.emit(code, f["instrument"] if known else None,
                  f"tick refused: venue={f['venue']} instrument={f['instrument']} price={f['price']!r} "
                  f"venue_ts_ns={f['venue_ts_ns']}" + (f"; {since} more refused since the last event"
                                                      if since else ""))

    def emit(self, code: int, instrument: str | None, detail: str) -> None:
        if not process.send_event(self.events, self.seq_events,
                                  {"code": int(code), "instrument": instrument, "detail": detail[:1000]}):
            self.counters["events_dropped"] += 1

    def on_frame(self, frame: bytes, recv_ns: int, publish: bool = True) -> str | None:
        """Fold one frame into the index; publish its mark unless ``publish`` is False.

        Returns the name of the instrument (or asset) the accepted tick moved, else None.
        """
        m = decode(frame, types=TICK_TYPES)
        if type(m) is Rejected:                    # another type: 1010, like every stream
            self.counters[f"reject_{int(m.code)}"] += 1
            return None
        f = m.fields
        name = f["instrument"]
        if name not in self.instruments and name not in self.assets:
            self.rejected(Code.ORACLE_UNKNOWN_INSTRUMENT, f, recv_ns)
            return None
        code, events = self.calc.on_tick(name, f["venue"], f["price"], f["venue_ts_ns"], recv_ns)
        if code != Code.OK:
            self.rejected(code, f, recv_ns)
            return None
        self.counters["ticks"] += 1
        self.last_tick[name] = (recv_ns, m.seq)
        if publish:
            self.publish(name, recv_ns, m.seq)
            for e in events:
                self.emit(e.code, e.instrument, e.detail)
        else:                                      # the caller publishes, then sends them
            self._held_events.extend(events)
        return name

    def _emit_held(self) -> None:
        """The events of the ticks ``fold`` took, once their marks are published: an event
        reports what the price row already says (a freeze, a resume)."""
        held, self._held_events = self._held_events, []
        for e in held:
            self.emit(e.code, e.instrument, e.detail)

    def publish(self, name: str, recv_ns: int, tick_seq: int) -> bool:
        """Publish ``name``'s current state; True when a new price went out (an
        instrument's row already holding its mark and frozen flag is left alone: no
        wake-up)."""
        st = self.calc.state(name, recv_ns)
        if st.mark is None:
            return False
        if name in self.assets:
            if not st.frozen:
                self.store.publish_asset_price(self.assets[name], st.mark, recv_ns)
                self.ring()                  # workers revalue collateral incrementally
                return True
            return False
        i = self.instruments[name]
        if self.row_holds(i, st):
            return False
        self.store.publish_mark(i, st.mark, st.index if st.index is not None else st.mark,
                                ts_ns=recv_ns, frozen=st.frozen, tick_seq=tick_seq)
        self.ring()
        return True

    def ring(self) -> None:
        """Wake the workers (all but ``skip_worker``) to a new price."""
        self.ctl.ring_all(skip=self.skip_worker)

    def fold(self, first_mark: bool = False) -> int:
        """Take every tick already waiting (up to MAX_FOLD), then publish each moved mark
        once: one wake-up per burst of venue quotes instead of one per quote. With
        ``first_mark`` (the stage running inside a worker) stop right after the first
        quote that publishes a new price instead, so the worker re-margins at once and
        the rest of the burst waits its turn (the caller then runs ``settle``). A tick
        the C path takes publishes its own mark at once. Returns the number of frames
        taken."""
        moved: dict[str, None] = {}
        fast = self.fast
        n = 0
        while n < MAX_FOLD:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            n += 1
            recv_ns = time.time_ns()
            if fast is not None:
                r = fast.on_frame(frame, recv_ns)
                if r == _wire.TICK_PUBLISHED:
                    if first_mark:
                        return n
                    os.sched_yield()        # the rung worker, if woken on this CPU, runs now:
                                            # process stage at 1M, published -> decided p50
                                            # 53 -> 14 us, p99 94 -> 55 us (bench latency)
                if r != _wire.TICK_FALLBACK:
                    continue
                self.settle()               # the reference catches up before it decides
            name = self.on_frame(frame, recv_ns, publish=False)
            if name is None:
                continue
            self.sync(name)
            if first_mark:
                if self.publish(name, *self.last_tick[name]):
                    self._emit_held()
                    return n
            else:
                moved[name] = None
        if moved:
            self.settle()                   # before the reference publishes
        for name in moved:
            self.publish(name, *self.last_tick[name])
        self._emit_held()
        return n

    def settle(self, limit: int = -1) -> None:
        """Fold the ticks the C path took (the oldest ``limit``; all when negative) into
        the reference, in order: lazily, when idle, and always before the reference
        decides a tick, publishes or runs its timer -- never between a tick and its
        orders. The reference must accept each with no event and, where C published a
        mark, arrive at the same one; otherwise (``fast_mismatch``, never seen in the tests) its answer is
        published and the C state re-synced: the reference wins."""
        fast = self.fast
        if fast is None or not fast.n_applied:
            return
        wrong: dict[str, tuple[int, int]] = {}
        for i, venue, price, venue_ts_ns, recv_ns, seq, mark in fast.take_applied(limit):
            name = self.names[i]
            code, events = self.calc.on_tick(name, venue, price, venue_ts_ns, recv_ns)
            if code == Code.OK:
                self.counters["ticks"] += 1
                self.counters["ticks_fast"] += 1
                self.last_tick[name] = (recv_ns, seq)
            else:
                self.counters[f"reject_{int(code)}"] += 1
            for e in events:
                self.emit(e.code, e.instrument, e.detail)
            if code != Code.OK or events or (mark is not None and self.calc.state(name, recv_ns).mark != mark):
                self.counters["fast_mismatch"] += 1
                wrong[name] = (recv_ns, seq)
        for name, (recv_ns, seq) in wrong.items():     # after the whole queue is folded
            self.sync(name)
            self.publish(name, recv_ns, seq)

    def sync(self, name: str) -> None:
        """Mirror the reference's state of instrument ``name`` into the C path."""
        i = self.instruments.get(name)
        if self.fast is not None and i is not None:
            self.fast.sync(i, *self.calc.export(name))

    def must_catch_up(self, now_ns: int, due_ns: int) -> bool:
        """A slice of the reference's catch-up runs this turn whatever the quiet period:
        ``SETTLE_BACKLOG_MAX`` C-taken ticks wait (a sustained burst), or the staleness
        timer, due at ``due_ns``, waits for the reference (so it rarely needs its whole
        settle after ``TIMER_DEFER_MAX_NS``)."""
        n = self.fast.n_applied if self.fast is not None else 0
        return n >= SETTLE_BACKLOG_MAX or (n > 0 and now_ns >= due_ns)

    def timer_due(self, now_ns: int, due_ns: int) -> bool:
        """The staleness timer, due at ``due_ns``, runs now: at once when the reference has
        caught up with the C path, else once the idle slices had ``TIMER_DEFER_MAX_NS`` to
        catch up (a 5 s staleness does not notice 50 ms; a tick stalled by a whole
        settle does)."""
        if now_ns < due_ns:
            return False
        return not (self.fast is not None and self.fast.n_applied) or now_ns >= due_ns + TIMER_DEFER_MAX_NS

    def on_timer(self, now_ns: int) -> None:
        """The staleness timer (every ``timer_ns``; inside worker 0 too, from
        ``TickWake.timer``): fold in the C path's ticks, re-evaluate every instrument at
        ``now_ns``, then publish each instrument whose mark or frozen flag now differs from
        its price row (each collateral asset whose live price differs from its row) --
        not only those with an event: a venue going stale moves the median with no
        freeze or exclusion -- and then send the events, so that a subscriber that sees
        one reads the price row it describes. A republished row keeps its ``tick_seq``."""
        self.settle()
        events = self.calc.on_timer(now_ns)
        for e in events:
            self.sync(e.instrument)             # a freeze, resume or exclusion: clean changes
        for name in self.rows_behind(now_ns):
            self.sync(name)
            i = self.instruments.get(name)
            self.publish(name, now_ns, int(self.store.prices[i]["tick_seq"]) if i is not None else 0)
        for e in events:
            self.emit(e.code, e.instrument, e.detail)

    def row_holds(self, i: int, st) -> bool:
        """Instrument ``i``'s price row holds the mark and frozen flag of ``st``."""
        pr = self.store.prices[i]
        return float(pr["mark"]) == st.mark and bool(int(pr["flags"]) & L.PRICE_FROZEN) == st.frozen

    def rows_behind(self, now_ns: int) -> list[str]:
        """Instruments whose price row differs from the reference's state at ``now_ns``
        (the mark, or the frozen flag), and assets whose row differs from a live price;
        the reference must have caught up (``settle``). Names with no mark yet are left
        alone: their rows keep the configured starting price."""
        calc, out = self.calc, []
        for name, i in self.instruments.items():
            st = calc.state(name, now_ns)
            if st.mark is not None and not self.row_holds(i, st):
                out.append(name)
        for name, k in self.assets.items():
            st = calc.state(name, now_ns)
            if st.mark is not None and not st.frozen and float(self.store.assets[k]["price_usd"]) != st.mark:
                out.append(name)
        return out

    def pause(self, timeout_ns: int) -> bool:
        """Wait up to ``timeout_ns`` for a tick, consuming nothing; True when one waits."""
        sock = self.sock
        return process.wait_until_ready(lambda: sock.get(zmq.EVENTS) & POLLIN, [sock.get(zmq.FD)],
                                        timeout_ns)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        process.short_slices()              # its sockets (and so its I/O thread) exist
        next_timer = time.time_ns() + self.timer_ns
        fast, quiet_until = self.fast, 0
        while not self.ctl.shutdown:
            behind = fast is not None and fast.n_applied
            backlog = self.must_catch_up(time.time_ns(), next_timer)
            if behind and not backlog and (left := quiet_until - time.monotonic_ns()) > 0:
                ready = self.pause(left)        # the workers first (QUIET_AFTER_TICKS_NS)
            else:
                ready = poller.poll(0 if behind else max(0, (next_timer - time.time_ns()) // 1_000_000))
            if ready:
                if self.fold():
                    quiet_until = time.monotonic_ns() + QUIET_AFTER_TICKS_NS
                if backlog:
                    self.settle(SETTLE_SLICE)   # a burst, or the timer waits: a slice a turn
            elif behind and (backlog or time.monotonic_ns() >= quiet_until):
                self.settle(SETTLE_SLICE)       # idle: the reference catches up,
                os.sched_yield()                # the CPU's other threads first between slices
            now = time.time_ns()
            if self.timer_due(now, next_timer):
                self.on_timer(now)
                next_timer = now + self.timer_ns
        self.sock.close()
        self.events.close()


def oracle_params(ap: argparse.ArgumentParser, a: argparse.Namespace) -> OracleParams:
    """The oracle rule's parameters from the stage's options (``--staleness-ms``,
    ``--quorum``, ``--max-deviation``); a value ``OracleParams`` refuses is a usage error
    naming the field (exit 2), before anything is attached or bound."""
    try:
        return OracleParams(staleness_ns=a.staleness_ms * 1_000_000, quorum=a.quorum,
                            max_deviation=a.max_deviation)
    except ValueError as e:
        ap.error(f"oracle parameters (--staleness-ms, --quorum, --max-deviation): {e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="engine.runtime.markprice")
    ap.add_argument("--name", required=True)
    ap.add_argument("--oracle", required=True)
    ap.add_argument("--events", required=True)
    ap.add_argument("--assets", default="", help="comma-separated asset names, in table order")
    ap.add_argument("--staleness-ms", type=int, default=5000)
    ap.add_argument("--quorum", type=int, default=2)
    ap.add_argument("--max-deviation", type=float, default=0.05)
    ap.add_argument("--cpu", type=int, default=-1)
    curve.add_args(ap)
    a = ap.parse_args(argv)
    params = oracle_params(ap, a)
    process.enter(a.cpu)
    curve.install(a)
    p = MarkPriceProcess(a.name, a.oracle, a.events, params)
    if a.assets:
        p.set_asset_names(a.assets.split(","))
    p.ctl.mark_ready(Role.MARKPRICE)
    p.run()
    print(json.dumps({"markprice": dict(p.counters)}), file=sys.stderr)
    curve.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

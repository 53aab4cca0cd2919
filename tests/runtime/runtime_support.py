"""Helpers of the runtime tests: a whole engine on private ipc endpoints, one client
socket per external endpoint, and a private from-scratch model of the books to compare with.

Every socket has LINGER 0 and every receive polls with a timeout, so a hang is a failure,
never a stuck run. Endpoints are ipc sockets under a short ``/tmp/me-rt-*`` directory (a
Unix socket path is at most 107 bytes; pytest's ``tmp_path`` can be longer).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import json
import os
import shutil
import tempfile
import time

import pytest
import zmq

from engine.accounting.fills import apply_fill_leg
from engine.codes import Code
from engine.config import Config, load_default
from engine.instruments import Kind
from engine.runtime.ctl import Control
from engine.runtime.harness import LocalEngine, local_config, wait_until  # noqa: F401 (wait_until: for the tests)
from engine.runtime.supervisor import Engine
from engine.runtime.worker import Worker
from engine.store.shm import Store
from feeds.protocol import Message, MsgType, Rejected, Sequencer, decode

USDT = 10**6                  # USDT units per USDT (asset scale)
ACCOUNTS_CAPACITY = 64        # small books: start-up and the full passes stay fast
MALFORMED = b"\xc1"           # 0xc1 is never used in msgpack: WIRE_MALFORMED (1001)


def fill(trade_id: int, taker: int, maker: int, qty_units: int, price_units: int, *,
         taker_fee: int = 0, maker_fee: int = 0, instrument: int = 0) -> dict:
    """A FILL body: ``qty_units`` is the taker's signed quantity."""
    return {"trade_id": trade_id, "instrument_id": instrument, "maker_account": maker,
            "taker_account": taker, "qty_units": qty_units, "price_units": price_units,
            "maker_fee_units": maker_fee, "taker_fee_units": taker_fee,
            "taker_side": "buy" if qty_units > 0 else "sell"}


# --------------------------------------------------------------------------- client
class Client:
    """The outside world of one engine: oracle venues, matching engine, custody, operators."""

    def __init__(self, endpoints):
        self.ctx = zmq.Context()
        self.oracle = self._socket(zmq.PUSH, endpoints.oracle)
        self.fills = self._socket(zmq.PUSH, endpoints.fills)
        self.checks = self._socket(zmq.DEALER, endpoints.checks)
        self.orders = self._socket(zmq.PULL, endpoints.orders)
        self.events = self._socket(zmq.SUB, endpoints.events)
        self.events.setsockopt(zmq.SUBSCRIBE, b"")
        self.seq_oracle = Sequencer()
        self.seq_fills = Sequencer()
        self.seq_checks = Sequencer()
        self.probes = 0                   # malformed fills frames sent to sync the SUB
        self.seen_events: list[dict] = []
        self.event_seqs: list[int] = []   # the events PUB's seq of every event received
        self.order_seqs: list[tuple[int, int]] = []   # (stream id: order_id >> 52, seq) of each order

    def _socket(self, kind: int, endpoint: str) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        return s

    def close(self) -> None:
        for s in (self.oracle, self.fills, self.checks, self.orders, self.events):
            s.close(0)
        self.ctx.term()

    # ------------------------------------------------------------------ receiving
    @staticmethod
    def recv(sock: zmq.Socket, timeout_s: float) -> Message | Rejected | None:
        """One decoded message, or None when nothing came within ``timeout_s``."""
        if not sock.poll(max(0, int(timeout_s * 1000))):
            return None
        return decode(sock.recv(zmq.NOBLOCK))

    def sync_events(self, timeout_s: float = 5.0) -> None:
        """Return once the SUB is connected and subscribed (PUB drops until then): send
        malformed fills frames until the gateway's 1001 event for one comes back."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.fills.send(MALFORMED)
            self.probes += 1
            m = self.recv(self.events, 0.05)
            if m is not None:
                while m is not None:                 # the answers to the other probes
                    self.event_seqs.append(m.seq)
                    self.seen_events.append(m.fields)
                    m = self.recv(self.events, 0.1)
                return
        pytest.fail("no ENGINE_EVENT came back on the events endpoint")

    def event(self, code: int, timeout_s: float = 3.0) -> dict:
        """The next ENGINE_EVENT with ``code`` (others are kept in ``seen_events``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.recv(self.events, max(0.0, deadline - time.monotonic()))
            if m is None:
                pytest.fail(f"no ENGINE_EVENT {code} within {timeout_s} s; saw "
                            f"{[e['code'] for e in self.seen_events]}")
            assert type(m) is Message and m.type == MsgType.ENGINE_EVENT, m
            self.seen_events.append(m.fields)
            self.event_seqs.append(m.seq)
            if m.fields["code"] == code:
                return m.fields

    def drain_events(self, within_s: float = 0.1) -> list[dict]:
        while (m := self.recv(self.events, within_s)) is not None:
            self.seen_events.append(m.fields)
            self.event_seqs.append(m.seq)
        return self.seen_events

    def orders_within(self, within_s: float) -> list[dict]:
        """Every LIQUIDATION_ORDER arriving until ``within_s`` passes with none."""
        out = []
        while (m := self.recv(self.orders, within_s)) is not None:
            assert type(m) is Message and m.type == MsgType.LIQUIDATION_ORDER, m
            self.order_seqs.append((m.fields["order_id"] >> 52, m.seq))
            out.append(m.fields)
        return out

    def order(self, timeout_s: float = 3.0) -> dict:
        m = self.recv(self.orders, timeout_s)
        if m is None:
            pytest.fail(f"no LIQUIDATION_ORDER within {timeout_s} s")
        assert type(m) is Message and m.type == MsgType.LIQUIDATION_ORDER, m
        self.order_seqs.append((m.fields["order_id"] >> 52, m.seq))
        return m.fields

    # ------------------------------------------------------------------ sending
    def tick(self, instrument: str, price: float, venues=("a", "b", "c")) -> list[int]:
        """One ORACLE_TICK per venue at ``price``; return their sequence numbers."""
        seqs = []
        for v in venues:
            self.oracle.send(self.seq_oracle.encode(MsgType.ORACLE_TICK, {
                "venue": v, "instrument": instrument, "price": float(price),
                "venue_ts_ns": time.time_ns()}))
            seqs.append(self.seq_oracle.last)
        return seqs

    def send_fills(self, fills: list[dict]) -> bytes:
        """One FILL (a single fill) or BATCH frame with the stream's next numbers."""
        if len(fills) == 1:
            frame = self.seq_fills.encode(MsgType.FILL, fills[0])
        else:
            frame = self.seq_fills.encode_batch(MsgType.FILL, fills)
        self.fills.send(frame)
        return frame

    def request(self, mtype: MsgType, fields: dict) -> None:
        self.checks.send(self.seq_checks.encode(mtype, fields))

    def reply(self, timeout_s: float = 3.0) -> Message:
        m = self.recv(self.checks, timeout_s)
        if m is None:
            pytest.fail(f"no reply on the checks endpoint within {timeout_s} s")
        assert type(m) is Message, m
        return m


# --------------------------------------------------------------------------- engines
class Running:
    """A started engine (``le``: LocalEngine) and its client."""

    def __init__(self, le: LocalEngine, client: Client, root: str, setup):
        self.le, self.client, self.root, self.setup = le, client, root, setup
        self.engine = le.engine
        self.store = le.store
        self.config: Config = le.config

    def row(self, account_id: int) -> int:
        return self.store.row_of(account_id)

    def log(self, role: str) -> str:
        with open(os.path.join(self.engine.runtime_dir, f"{role}.log")) as f:
            return f.read()

    def idle(self) -> bool:
        """Every partition's ring drained."""
        return all(self.engine.ctl.backlog(p) == 0 for p in range(self.store.n_partitions))


# --------------------------------------------------------------------------- model
def private_store(config: Config, setup) -> Store:
    """A private store with the engine's layout and the same ``setup`` applied."""
    e = config.engine
    st = Store.create(None, assets=list(config.assets), instruments=list(config.instruments),
                      accounts_capacity=e.accounts_capacity, n_partitions=e.partitions,
                      slots_per_account=e.slots_per_account)
    if setup is not None:
        setup(st)
    return st


def apply_privately(config: Config, setup, fills: list[dict]) -> Store:
    """The books after ``fills`` (all valid) applied from scratch with engine.accounting.fills,
    leg by leg as the gateway splits them: taker ``+q`` then maker ``-q``, isolated
    positions auto funded as the workers do."""
    st = private_store(config, setup)
    for f in fills:
        for acct, delta, fee in ((f["taker_account"], f["qty_units"], f["taker_fee_units"]),
                                 (f["maker_account"], -f["qty_units"], f["maker_fee_units"])):
            row = st.row_of(acct)
            res = apply_fill_leg(st, int(st.accounts[row]["partition"]), row, f["instrument_id"],
                                 delta, f["price_units"], fee, auto_fund=True)
            assert res.code == Code.OK, (f, res)
    return st


def book(store: Store) -> dict[int, tuple]:
    """account id -> (balances, sorted positions (instrument, mode, qty, cost, iso)), each
    account copied under its seqlock."""
    out = {}
    for p in range(store.n_partitions):
        lo, hi = store.partition_rows(p)
        for row in range(lo, hi):
            acct, slots = store.read_account(row)
            out[int(acct["account_id"])] = (
                tuple(int(x) for x in acct["balance"]),
                tuple(sorted((int(s["instrument"]), int(s["mode"]), int(s["qty"]), int(s["cost"]),
                              int(s["isolated_margin"])) for s in slots)))
    return out


def fee_pools(store: Store) -> list[tuple[int, ...]]:
    return [tuple(int(x) for x in store.read(store.partitions, p)["fee_pool"])
            for p in range(store.n_partitions)]


def money(store: Store) -> dict[int, int]:
    """Per asset: ``sum(balance) + sum(isolated_margin) + fee pools - sum(cost)`` (linear;
    ``+ sum(cost)`` inverse) -- what fills conserve exactly (engine/accounting/fills.py)."""
    total = collections.Counter()
    for bal, positions in book(store).values():
        for a, b in enumerate(bal):
            total[a] += b
        for ins, _mode, _q, cost, iso in positions:
            row = store.instruments[ins]
            settle = int(row["settle_asset"])
            total[settle] += (cost if Kind(int(row["kind"])).is_inverse else -cost) + iso
    for pool in fee_pools(store):
        for a, f in enumerate(pool):
            total[a] += f
    return {a: v for a, v in total.items() if v}


def position(store: Store, account_id: int, instrument: int = 0) -> tuple[int, int]:
    """(qty, cost) of one position, (0, 0) when the account has none."""
    acct, slots = store.read_account(store.row_of(account_id))
    for s in slots:
        if int(s["instrument"]) == instrument:
            return int(s["qty"]), int(s["cost"])
    return 0, 0


def balance(store: Store, account_id: int, asset: int = 0) -> int:
    acct, _ = store.read_account(store.row_of(account_id))
    return int(acct["balance"][asset])


def process_counters(log_text: str, key: str) -> dict:
    """The ``{key: {...}}`` JSON counters line a process prints to its log at a clean exit."""
    for line in reversed(log_text.splitlines()):
        if line.startswith("{"):
            obj = json.loads(line)
            if key in obj:
                return obj[key]
    raise AssertionError(f"no counters line with {key!r} in the log:\n{log_text[-2000:]}")




@contextlib.contextmanager
def in_process_worker(setup, *, events: bool = False, **engine_overrides):
    """A real Worker object in this process on real shared memory (the engine's own
    ``create_state`` with the embedded config, one partition), its orders and, with
    ``events``, its ENGINE_EVENTs on real ZeroMQ sockets bound here. ``setup(store)``
    fills the book before the worker starts. Yields ``(worker, store, events socket or
    None)``; everything made is released on exit, also when a step of the setup failed
    (each release is registered as soon as its resource exists)."""
    with contextlib.ExitStack() as undo:
        root = tempfile.mkdtemp(prefix="me-w-")
        undo.callback(shutil.rmtree, root, ignore_errors=True)
        config = local_config(root, partitions=1, **engine_overrides)
        engine = Engine(config, n_workers=1, quiet=True)
        store = engine.create_state()
        undo.callback(engine.ctl.unlink)
        undo.callback(store.unlink)
        setup(store)
        ctx = zmq.Context.instance()
        orders = ctx.socket(zmq.PULL)
        undo.callback(orders.close, 0)
        orders.bind(f"ipc://{root}/orders.sock")
        ev = None
        if events:
            ev = ctx.socket(zmq.PULL)
            undo.callback(ev.close, 0)
            ev.bind(f"ipc://{root}/events.sock")
        w = Worker(config.engine.name, 0, [0], orders_endpoint=f"ipc://{root}/orders.sock",
                   replies_endpoint=f"ipc://{root}/replies.sock",
                   events_endpoint=f"ipc://{root}/events.sock" if events else None,
                   holders_slice=config.engine.holders_slice)
        undo.callback(w.store.detach)
        for s in (w.orders, w.replies, w.events):
            if s is not None:
                undo.callback(s.close, 0)
        undo.callback(gc.unfreeze)               # Worker.start freezes this test process's objects
        w.start()
        yield w, store, ev


def gateway_state(root: str, partitions: int, accounts: list[int], capacity: int = 64):
    """For a ``Gateway`` object built in the test's own process: a store and a control
    segment under unique names (one worker a partition, rings of 64), ``accounts`` added,
    and ipc endpoints under ``root``. Returns ``(config, store, ctl, endpoints)``."""
    cfg = local_config(root, load_default(), partitions=partitions)
    e = cfg.engine
    store = Store.create(e.name, assets=list(cfg.assets), instruments=list(cfg.instruments),
                         accounts_capacity=capacity, n_partitions=partitions,
                         slots_per_account=e.slots_per_account, replace=True)
    ctl = Control.create("/" + e.name + "-ctl", partitions, partitions, e.slots_per_account, ring_capacity=64)
    for a in accounts:
        store.add_account(a)
    return cfg, store, ctl, {k: f"ipc://{root}/{k}.sock" for k in ("fills", "checks", "replies", "events")}


def close_gateway(g, ctl: Control, store: Store) -> None:
    """Undo ``gateway_state`` and the Gateway built on it: the journal (and its sync
    thread), every socket, both segments."""
    g.journal.close()
    for s in (g.fills, g.checks, g.replies, g.events, g._wake_rx, g._wake_tx):
        s.close(0)
    ctl.unlink()
    store.unlink()
    store.detach()

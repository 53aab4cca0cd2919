"""``engine.journal_sync``: an acknowledgement never runs ahead of the disk.

A real store and control segment, a real Gateway with its ROUTER fills socket and its
checks ROUTER bound on ipc endpoints, real DEALER clients. The gateway's own methods run
in this process, one step at a time, with the journal's ``fdatasync`` (on its sync
thread) and the gateway's sender observed (each still does its work), so the test sees
the order in which the disk and the client are told:

- ``"ack"``: a fills ACK (code 0) and a COLLATERAL_REPLY that says applied leave only
  after the ``fdatasync`` that covers their journal records; one sync for a burst; an
  order check is answered while the sync runs; a failed sync sends nothing.
- ``"interval"``: they leave at once; the record is synced by the interval (or never,
  when the interval is 0 as here).
"""

from __future__ import annotations

import errno
import os
import time

import pytest
import zmq

from engine.codes import Code
from engine.runtime import gateway as G
from engine.runtime.ctl import RecordKind
from engine.runtime.journal import replay
from feeds.protocol import Message, MsgType, Sequencer, decode
from runtime_support import close_gateway, fill, gateway_state

pytestmark = pytest.mark.timeout(60)

TAKER, MAKER = 1, 2


class Observed:
    """The journal's fdatasync (on its sync thread) and the gateway's sends, in order."""

    def __init__(self, g: G.Gateway, sync_delay_s: float = 0.0):
        self.log: list[str] = []
        j = g.journal

        def observed_sync(fd):
            self.log.append(f"sync({j.written - j.synced})")
            time.sleep(sync_delay_s)
            os.fdatasync(fd)
            self.log.append("synced")
        j.sync_fn = observed_sync
        send = g._send_answer

        def observed_send(sock, ident, mtype, fields):
            self.log.append(f"send:{'fills' if sock is g.fills else 'checks'}:{MsgType(mtype).name}")
            return send(sock, ident, mtype, fields)
        g._send_answer = observed_send


def settle(g: G.Gateway) -> None:
    """What the gateway's loop does between turns: pump (starting a sync), wait for the
    sync thread, pump again (the held answers go)."""
    g.pump_answers()
    g.journal.wait_idle()
    g.pump_answers()


@pytest.fixture(params=["ack", "interval"])   # journal_sync
def gateway(request, tmp_path):
    root = str(tmp_path)
    cfg, store, ctl, ep = gateway_state(root, 1, [TAKER, MAKER], capacity=8)
    e = cfg.engine
    g = G.Gateway(e.name, ep["fills"], ep["checks"], ep["replies"], ep["events"], root, 1, [0],
                  fills_acks=True, journal_sync=request.param, journal_fsync_interval_s=0)
    g.set_asset_names([a.name for a in cfg.assets])
    ctx = zmq.Context.instance()
    clients = {}
    for k in ("fills", "checks", "replies"):
        s = ctx.socket(zmq.PUSH if k == "replies" else zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(ep[k])
        clients[k] = s
    yield request.param, g, ctl, clients
    for s in clients.values():
        s.close(0)
    close_gateway(g, ctl, store)


def recv(sock: zmq.Socket) -> list[bytes]:
    assert sock.poll(5000), "nothing arrived within 5 s"
    return sock.recv_multipart()


def answer(sock: zmq.Socket) -> Message:
    m = decode(recv(sock)[-1])
    assert type(m) is Message
    return m


def test_fills_acks_leave_after_the_sync_that_covers_their_frames(gateway):
    mode, g, ctl, c = gateway
    seq = Sequencer()
    obs = Observed(g)
    # Three frames in one burst (1 BTC at 50,000.0 each: qty_units 1000, price_units 500,000).
    for k in range(3):
        c["fills"].send(seq.encode(MsgType.FILL, fill(10 + k, TAKER, MAKER, 1000, 500_000)))
    frames = [recv(g.fills) for _ in range(3)]
    for ident, frame in frames:
        g.take_fills(frame, 1, ident)
    g.flush_fills(1)
    if mode == "ack":
        assert obs.log == [] and len(g._answers) == 3           # held: not on the disk yet
        settle(g)
        # One fdatasync for the burst's three records, then the three ACKs.
        assert obs.log == ["sync(3)", "synced"] + ["send:fills:ACK"] * 3
        assert g.journal.unsynced == 0 and g.journal.syncs == 1
    else:
        assert obs.log == ["send:fills:ACK"] * 3                 # from the page cache
        assert g.journal.unsynced == 3 and g.journal.syncs == 0
    acks = [answer(c["fills"]) for _ in range(3)]
    assert [(a.type, a.fields["ref_seq"], a.fields["code"]) for a in acks] == \
        [(MsgType.ACK, s, 0) for s in (1, 2, 3)]
    # The duplicate of frame 2 is answered 3001 at once: it adds nothing to the journal.
    obs.log.clear()
    g.take_fills(frames[1][1], 1, frames[1][0])
    dup = answer(c["fills"])
    assert (dup.fields["ref_seq"], dup.fields["code"]) == (2, int(Code.FILL_DUPLICATE))
    assert obs.log == ["send:fills:ACK"]
    assert [r.first_seq for r in replay(g.journal.path)] == [1, 2, 3]


@pytest.mark.parametrize("gateway", ["ack"], indirect=True)
def test_order_checks_are_answered_while_a_sync_runs(gateway):
    mode, g, ctl, c = gateway
    obs = Observed(g, sync_delay_s=0.3)          # a slow disk: 0.3 s an fdatasync
    seq = Sequencer()
    c["fills"].send(seq.encode(MsgType.FILL, fill(10, TAKER, MAKER, 1000, 500_000)))
    ident, frame = recv(g.fills)
    g.take_fills(frame, 1, ident)
    g.flush_fills(1)
    g.pump_answers()                              # the sync starts on the journal's thread
    assert g.journal.busy
    # ORDER_CHECK: buy 1 BTC at 50,000.0 for the taker, who has no collateral: refused 4001.
    c["checks"].send(Sequencer().encode(MsgType.ORDER_CHECK, {
        "request_id": 5, "account": TAKER, "instrument_id": 0, "qty_units": 1000, "price_units": 500_000}))
    cident, cframe = recv(g.checks)
    g.on_request(cident, cframe, 1)
    reply = answer(c["checks"])
    assert (reply.type, reply.fields["request_id"]) == (MsgType.ORDER_CHECK_REPLY, 5)
    assert g.journal.busy and obs.log == ["sync(1)"]         # answered mid-sync
    g.journal.wait_idle()
    g.pump_answers()
    assert obs.log == ["sync(1)", "synced", "send:fills:ACK"]
    assert answer(c["fills"]).fields["code"] == 0


@pytest.mark.parametrize("gateway", ["ack"], indirect=True)
def test_a_failed_fdatasync_sends_nothing_and_is_raised(gateway):
    mode, g, ctl, c = gateway

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")
    g.journal.sync_fn = failing
    c["fills"].send(Sequencer().encode(MsgType.FILL, fill(10, TAKER, MAKER, 1000, 500_000)))
    ident, frame = recv(g.fills)
    g.take_fills(frame, 1, ident)
    g.flush_fills(1)
    g.pump_answers()
    with pytest.raises(OSError, match="fdatasync failed"):
        g.journal.wait_idle()
    with pytest.raises(OSError, match="fdatasync failed"):
        g.pump_answers()                          # the gateway's loop stops here: it exits
    assert len(g._answers) == 1 and not c["fills"].poll(200)    # the ACK never left
    g.journal.sync_fn = os.fdatasync
    g.journal._error = None                       # let the fixture close the journal


def test_an_applied_deposit_is_answered_after_the_sync_a_refused_one_at_once(gateway):
    mode, g, ctl, c = gateway
    obs = Observed(g)
    seq = Sequencer()
    # DEPOSIT 5 USDT (5,000,000 units at scale 10**6) to the taker; WITHDRAWAL of 9 USDT refused.
    c["checks"].send(seq.encode(MsgType.DEPOSIT, {"request_id": 7, "account": TAKER, "asset": "USDT",
                                                  "amount_units": 5_000_000}))
    c["checks"].send(seq.encode(MsgType.WITHDRAWAL, {"request_id": 8, "account": TAKER, "asset": "USDT",
                                                     "amount_units": 9_000_000}))
    for _ in range(2):
        ident, frame = recv(g.checks)
        g.on_request(ident, frame, 1)
    # The worker's side, by hand: the ring holds both requests under the gateway's tickets.
    r, w = (int(x) for x in ctl.rings[0][0][["read_idx", "write_idx"]])
    recs = [ctl.records[0][i % ctl.capacity] for i in range(r, w)]
    assert [int(x["kind"]) for x in recs] == [int(RecordKind.DEPOSIT), int(RecordKind.WITHDRAWAL)]
    tickets = [int(x["ref"]) for x in recs]
    worker = Sequencer()
    c["replies"].send(worker.encode(MsgType.COLLATERAL_REPLY, {"request_id": tickets[0], "code": 0,
                                                              "balance_units": 5_000_000}))
    c["replies"].send(worker.encode(MsgType.COLLATERAL_REPLY, {
        "request_id": tickets[1], "code": int(Code.WITHDRAWAL_INSUFFICIENT_BALANCE), "balance_units": 5_000_000}))
    for _ in range(2):
        assert g.replies.poll(5000)
        g.on_worker_reply(g.replies.recv())
    if mode == "ack":
        assert obs.log == []                      # the refusal waits behind the applied deposit
        settle(g)
        assert obs.log == ["sync(1)", "synced", "send:checks:COLLATERAL_REPLY", "send:checks:COLLATERAL_REPLY"]
    else:
        assert obs.log == ["send:checks:COLLATERAL_REPLY"] * 2
    replies = [answer(c["checks"]) for _ in range(2)]
    assert [(m.fields["request_id"], m.fields["code"]) for m in replies] == \
        [(7, 0), (8, int(Code.WITHDRAWAL_INSUFFICIENT_BALANCE))]
    assert [decode(r.frame).fields["request_id"] for r in replay(g.journal.path)] == [7]
